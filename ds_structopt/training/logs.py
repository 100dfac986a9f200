"""Rank-0 logs: a progress line (tokens/s, ETA), metrics.csv, TensorBoard when installed, loss-curve PNG."""
from __future__ import annotations

import csv
import os
import time
from typing import Any, Optional

# rss_mb: rank 0's RSS; rss_mb_max: the largest over ranks; rss_mb_ranks: every rank's, space-separated
# in rank order (one CSV field). New columns go at the end: positions of the old ones never change.
FIELDS = ["step", "train_loss", "lr", "tokens", "seconds", "tokens_per_s", "eval_loss", "eval_ppl",
          "skipped_steps", "decomp_failures", "identity_fallbacks", "rss_mb", "open_fds", "rss_mb_max", "rss_mb_ranks",
          "structured_updates", "eligible_matrices", "elementwise_updates", "structured_updates_total"]
# structured_updates: matrices that got the structured update in the logged step (of eligible_matrices);
# elementwise_updates: parameters AdamW stepped in it; structured_updates_total: over the run


class TrainLog:
    def __init__(self, out_dir: str, total_steps: int, enabled: bool, resume: bool = False):
        self.enabled, self.total, self.start = enabled, total_steps, time.perf_counter()
        self.path = os.path.join(out_dir, "metrics.csv")
        self.rows: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if resume and os.path.exists(self.path):
            with open(self.path) as f:
                reader = csv.DictReader(f)
                self.rows = list(reader)
            if reader.fieldnames != FIELDS:  # written by another version: rewrite it with today's columns
                self.rows = [{k: r.get(k) or "" for k in FIELDS} for r in self.rows]
                tmp = self.path + ".tmp"
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, FIELDS)
                    writer.writeheader()
                    writer.writerows(self.rows)
                os.replace(tmp, self.path)
        else:
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, FIELDS).writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        except Exception:  # tensorboard not installed: CSV and PNG only
            self._tb = None

    def write(self, row: dict[str, Any], first_step: int) -> None:
        if not self.enabled:
            return
        row = {k: row.get(k, "") for k in FIELDS}
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
        if self._tb is not None:
            for key in ("train_loss", "lr", "tokens_per_s", "eval_loss", "eval_ppl", "skipped_steps", "decomp_failures",
                        "identity_fallbacks", "rss_mb", "rss_mb_max", "structured_updates", "elementwise_updates"):
                if row[key] != "":
                    self._tb.add_scalar(key, float(row[key]), int(row["step"]))
        done = int(row["step"]) - first_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, done) * (self.total - int(row["step"]))
        extra = f" | eval {float(row['eval_loss']):.4f} (ppl {float(row['eval_ppl']):.2f})" if row["eval_loss"] != "" else ""
        if row["structured_updates"] != "":
            extra += (f" | structured {row['structured_updates']}/{row['eligible_matrices']} matrices, "
                      f"AdamW {row['elementwise_updates']}")
        print(f"step {row['step']}/{self.total} | loss {float(row['train_loss']):.4f} | lr {float(row['lr']):.2e} | "
              f"{float(row['tokens_per_s']):.0f} tok/s | ETA {_hms(eta)}{extra}", flush=True)

    def plot(self, path: Optional[str] = None) -> Optional[str]:
        if not self.enabled or not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [int(r["step"]) for r in self.rows if r["train_loss"] != ""]
        losses = [float(r["train_loss"]) for r in self.rows if r["train_loss"] != ""]
        ev = [(int(r["step"]), float(r["eval_loss"])) for r in self.rows if r["eval_loss"] != ""]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, label="train loss")
        if ev:
            ax.plot(*zip(*ev), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        path = path or os.path.join(os.path.dirname(self.path), "loss_curve.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        if self._tb is not None:
            self._tb.close()
        return path


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
