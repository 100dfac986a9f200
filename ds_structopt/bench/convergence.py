"""Convergence suite: tokens (steps) and time to AdamW's final loss, same budget for everybody.

One LLaMA config and corpus (default: ``bench10m``, 10.8M parameters, Python's
bundled docs as bytes), the same token budget, warmup + cosine schedule, data
order, init and parameter split for every optimizer; each optimizer's lr grid
is swept (same number of trials each) and its best run (lowest final eval loss)
is reported. Target = AdamW's best final eval loss; steps to target are
interpolated linearly between eval points; time counts training only (no eval).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..tables import markdown_table
from ..training.local import evaluate, lm_step
from . import optimizers as contenders
from . import report


@dataclass
class Settings:
    model: str = "bench10m"
    data: tuple[str, ...] = ("embedded",)
    tokenizer: Optional[str] = None
    seq_len: int = 128
    batch: int = 8
    steps: int = 200
    eval_every: int = 10
    eval_rows: int = 64
    warmup: float = 0.1
    min_lr_ratio: float = 0.1
    update_freq: int = 20
    elementwise_lr: float = 1e-3
    seed: int = 0
    trials: Optional[int] = None  # None: each optimizer's whole grid; k: the k grid points nearest the middle
    micro_batch: Optional[int] = None  # rows per forward (gradient accumulation); None: the whole batch
    device: str = "cpu"
    bf16: bool = False  # bf16 autocast for forward/backward (fp32 weights and optimizer state)


def load_data(s: Settings):
    from ..data.corpus import load_corpus

    return load_corpus(list(s.data), s.tokenizer, s.seq_len)


def build_model(s: Settings, vocab_size: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    from ..training.models import model_config

    torch.manual_seed(s.seed)
    return LlamaForCausalLM(model_config(s.model, vocab_size, s.seq_len))


def state_split(opt: contenders.PairedOptimizer) -> dict[str, int]:
    """Optimizer-state bytes: all, the matrices' part, and of that the rotations with their factors
    (ROTATION_KEYS) and the rest (moments)."""
    matrix = opt.matrix_part()
    rot = rest = 0
    for st in matrix.state.values():
        for key, v in st.items():
            size = sum(t.numel() * t.element_size() for t in contenders._tensors(v))
            if key in ROTATION_KEYS:
                rot += size
            else:
                rest += size
    return {"total": opt.state_bytes(), "matrices_rotations": rot, "matrices_other": rest}


# the bases and the factors they come from: ours P, Q and (basis="ema") L, R; SOAP its eigenbases Q and GG
ROTATION_KEYS = ("P", "Q", "L", "R", "GG")


def run_one(name: str, lr: float, s: Settings, data: Any, contender: Optional[contenders.Contender] = None,
            progress: Optional[Callable[[int, float, float], None]] = None) -> dict[str, Any]:
    """Train ``name`` (or ``contender``) at ``lr`` for ``s.steps``; eval every ``s.eval_every``
    steps, calling ``progress(step, eval_loss, train_seconds)`` after each eval."""
    from ..data.sampler import ShardedBatchSampler
    from ..training.schedule import warmup_cosine, warmup_steps

    device = torch.device(s.device)
    model = build_model(s, data.vocab_size).to(device)
    opt = contenders.build(contender or name, model, lr, update_freq=s.update_freq, elementwise_lr=s.elementwise_lr)
    options = opt.options()  # as built: what a later sweep compares its fresh build with
    sampler = ShardedBatchSampler(len(data.train), s.batch, seed=s.seed)
    eval_rows = (data.eval[: s.eval_rows] if len(data.eval) else data.train[: s.eval_rows]).to(device)
    warmup = warmup_steps(s.warmup, s.steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    with autocast:
        history = [{"step": 0, "seconds": 0.0, "eval_loss": evaluate(model, eval_rows, s.micro_batch or s.batch)}]
    train_seconds, diverged = 0.0, False
    for step in range(s.steps):
        t0 = timed()
        scale = warmup_cosine(step, s.steps, warmup, s.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        with autocast:
            loss = lm_step(model, opt, data.train[sampler.next_indices()].to(device).long(), micro=s.micro_batch)
        loss_value = loss.item()
        train_seconds += timed() - t0
        if not math.isfinite(loss_value):
            diverged = True
            break
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            with autocast:
                ev = evaluate(model, eval_rows, s.micro_batch or s.batch)
            history.append({"step": step + 1, "seconds": train_seconds, "eval_loss": ev, "train_loss": loss_value})
            if progress is not None:
                progress(step + 1, ev, train_seconds)
    final = history[-1]["eval_loss"] if not diverged else float("inf")
    return {"optimizer": name, "options": options, "lr": lr, "final_eval_loss": final, "diverged": diverged,
            "history": history,
            "train_seconds": train_seconds, "state_bytes": state_split(opt),
            "params": sum(p.numel() for p in model.parameters()),
            "matrix_params": sum(p.numel() for p in contenders.split_params(model)[0])}


def reach(history: Sequence[dict[str, float]], target: float) -> tuple[Optional[float], Optional[float]]:
    """(step, seconds) at which eval loss first reaches ``target``, linearly interpolated; None if never."""
    for prev, cur in zip(history, history[1:]):
        if cur["eval_loss"] <= target:
            span = prev["eval_loss"] - cur["eval_loss"]
            frac = 1.0 if span <= 0 else min(1.0, max(0.0, (prev["eval_loss"] - target) / span))
            return (prev["step"] + frac * (cur["step"] - prev["step"]),
                    prev["seconds"] + frac * (cur["seconds"] - prev["seconds"]))
    return None, None


def grid(name: str, trials: Optional[int]) -> list[float]:
    lrs = list((contenders.CONTENDERS.get(name) or contenders.VARIANTS[name]).lrs)
    if trials is None or trials >= len(lrs):
        return lrs
    mid = len(lrs) // 2
    order = sorted(range(len(lrs)), key=lambda i: (abs(i - mid), i))
    return [lrs[i] for i in sorted(order[:trials])]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r["optimizer"] not in best or r["final_eval_loss"] < best[r["optimizer"]]["final_eval_loss"]:
            best[r["optimizer"]] = r
    if "AdamW" not in best:
        raise ValueError("the convergence suite needs AdamW in --optimizers (it sets the target)")
    target = best["AdamW"]["final_eval_loss"]
    base_steps, base_seconds = reach(best["AdamW"]["history"], target)
    rows = {}
    for name, r in best.items():
        steps, seconds = reach(r["history"], target)
        st = r["state_bytes"]
        rows[name] = {
            "best_lr": r["lr"], "final_eval_loss": r["final_eval_loss"],
            "steps_to_target": steps, "steps_ratio": steps / base_steps if steps and base_steps else None,
            "seconds_to_target": seconds, "time_ratio": seconds / base_seconds if seconds and base_seconds else None,
            "train_seconds": r["train_seconds"],
            "state_bytes_per_param": st["total"] / r["params"],
            "matrix_state_elems_per_param_excl_rotations": st["matrices_other"] / 4 / r["matrix_params"],
            "matrix_rotation_bytes_per_param": st["matrices_rotations"] / r["matrix_params"],
        }
    return {"target_eval_loss": target, "best": rows}


def baseline_runs(path: str | Path, s: Settings) -> list[dict[str, Any]]:
    """AdamW's runs from an earlier convergence.json with the same settings (to compare variants to it)."""
    import json

    raw = json.loads(Path(path).read_text())
    theirs = {k: v for k, v in {**asdict(Settings()), **raw["settings"]}.items() if k != "trials"}  # older files lack newer keys
    ours = {k: v for k, v in asdict(s).items() if k != "trials"}
    ours["data"], theirs["data"] = list(ours["data"]), list(theirs["data"])
    if theirs != ours:
        diff = sorted(k for k in ours if ours[k] != theirs.get(k))
        raise ValueError(f"--baseline {path} was run with other settings ({', '.join(diff)})")
    return [r for r in raw["runs"] if r["optimizer"] == "AdamW"]


def run(s: Settings, names: Sequence[str], out_dir: str | Path, log: Any = None,
        baseline: Optional[str] = None) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, flush=True))
    data = load_data(s)
    runs = baseline_runs(baseline, s) if baseline else []
    names = [n for n in names if not (baseline and n == "AdamW")]
    for name in names:
        for lr in grid(name, s.trials):
            t = time.perf_counter()
            r = run_one(name, lr, s, data)
            runs.append(r)
            log(f"[convergence] {name:>18} lr {lr:<8g} final eval {r['final_eval_loss']:.4f}"
                f"{' (diverged)' if r['diverged'] else ''}  {time.perf_counter() - t:.0f} s")
    summary = summarize(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best_runs = {n: next(r for r in runs if r["optimizer"] == n and r["lr"] == summary["best"][n]["best_lr"])
                 for n in summary["best"]}
    pngs = [
        report.line_plot(out / "convergence_loss_vs_steps.png",
                         {n: ([h["step"] for h in r["history"]], [h["eval_loss"] for h in r["history"]])
                          for n, r in best_runs.items()}, "optimizer steps", "eval loss",
                         f"{s.model}: eval loss vs steps (best lr each)", summary["target_eval_loss"]),
        report.line_plot(out / "convergence_loss_vs_time.png",
                         {n: ([h["seconds"] for h in r["history"]], [h["eval_loss"] for h in r["history"]])
                          for n, r in best_runs.items()}, "training seconds", "eval loss",
                         f"{s.model}: eval loss vs time (best lr each)", summary["target_eval_loss"]),
    ]
    headers = ["optimizer", "best lr", "final eval loss", "steps to AdamW's final", "steps ratio",
               "time ratio", "state B/param", "matrix state (non-rotation) x params", "bases/factors B/matrix param"]
    table = [[n, b["best_lr"], b["final_eval_loss"], b["steps_to_target"] or "not reached", b["steps_ratio"],
              b["time_ratio"], b["state_bytes_per_param"], b["matrix_state_elems_per_param_excl_rotations"],
              b["matrix_rotation_bytes_per_param"]] for n, b in summary["best"].items()]
    md = (f"Convergence: model `{s.model}`, {s.steps} steps x {s.batch} x {s.seq_len} tokens, target = AdamW's "
          f"final eval loss {summary['target_eval_loss']:.4f}\n\n" + markdown_table(headers, table))
    files = report.write(out, "convergence", {"settings": asdict(s), "summary": summary, "runs": runs,
                                              "plots": pngs}, md)
    return {"summary": summary, "files": files, "plots": pngs}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings()
    p.add_argument("--model", default=d.model)
    p.add_argument("--data", nargs="+", default=list(d.data))
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--update-freq", type=int, default=d.update_freq)
    p.add_argument("--trials", type=int, default=None, help="lr grid points per optimizer (default: all, 3)")
    p.add_argument("--seed", type=int, default=d.seed, help="model init and data order")
    p.add_argument("--baseline", default=None,
                   help="reuse AdamW's runs from an earlier convergence.json (same settings) instead of rerunning")


def settings_from(args: argparse.Namespace, quick: bool) -> Settings:
    s = Settings(model=args.model, data=tuple(args.data), tokenizer=args.tokenizer, seq_len=args.seq_len,
                 batch=args.batch, steps=args.steps, eval_every=args.eval_every, update_freq=args.update_freq,
                 trials=args.trials, seed=args.seed)
    if quick:
        s.model, s.seq_len, s.steps, s.eval_every, s.eval_rows, s.update_freq = "tiny", 64, 20, 5, 16, 5
        s.trials = 1 if args.trials is None else args.trials
    return s
