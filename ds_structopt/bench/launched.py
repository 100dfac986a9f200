"""One regime run through the training entry point under a real launcher (``regime --launcher``).

The papers' sizes (60M-1B) need more than one GPU: the regime suite then trains each (contender,
lr, seed) with ``ds_structopt.train`` under ``torchrun`` or ``deepspeed``, from a DeepSpeed JSON
config this module writes (the contender's optimizer block, ZeRO stage, bf16, the suite's batch
split into micro-batches x ranks x accumulation), and reads the eval curve back from the run's
``metrics.csv``. What differs from the in-process runs (and why a launched sweep keeps its own
cache): the contender's optimizer steps every parameter (embeddings, norms and LM head at its
lr, as a user's run does; in-process they go to one shared AdamW at 1e-3), and ``seconds`` is the
entry point's wall clock (evals included). Contenders with no DeepSpeed config type (Adafactor,
SOAP, Muon) are refused in one line.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import convergence
from . import optimizers as contenders

LAUNCHERS = ("torchrun", "deepspeed")


@dataclass(frozen=True)
class Launch:
    launcher: str = "torchrun"
    nproc: int = 2                      # ranks per node (GPUs)
    nnodes: int = 1                     # the data-parallel world is nproc x nnodes
    zero_stage: int = 2
    launcher_args: tuple[str, ...] = ()  # passed to the launcher as is (multi-node: rendezvous/hostfile)

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    def check(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher '{self.launcher}': expected one of {', '.join(LAUNCHERS)}")
        if self.nproc < 1 or self.nnodes < 1:
            raise ValueError(f"--nproc {self.nproc} / --nnodes {self.nnodes}: need at least 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero-stage {self.zero_stage}: expected 0, 1, 2 or 3")
        if self.nnodes > 1 and self.launcher == "torchrun":  # torchrun must be started on every node
            raise ValueError(f"--nnodes {self.nnodes} with --launcher torchrun: this process starts one torchrun on "
                             "this node only; use --launcher deepspeed --launcher-args '--hostfile HOSTS "
                             "--master_addr NODE0' (its runner starts every node over ssh/pdsh)")
        if self.nnodes > 1 and not self.launcher_args:
            raise ValueError(f"--nnodes {self.nnodes} needs --launcher-args naming the nodes (deepspeed: '--hostfile HOSTS "
                             "--master_addr NODE0')")

    def key(self) -> dict[str, int]:
        """What changes a run's numbers (world size, ZeRO stage): the cache's key. Launcher and
        rendezvous addresses are left out so a sweep split over jobs keeps its cache."""
        return {"world": self.world, "zero_stage": self.zero_stage}


def check_contender(c: contenders.Contender) -> None:
    if c.ds_optimizer is None:
        raise ValueError(f"'{c.name}' cannot run through the training entry point (--launcher): it has no DeepSpeed "
                         "config optimizer type; run it in-process (no --launcher)")


def ds_config(c: contenders.Contender, lr: float, s: convergence.Settings, launch: Launch) -> dict[str, Any]:
    """The DeepSpeed config of one run: ``s.batch`` rows per step as micro-batches x world x
    accumulation, the contender's optimizer block at ``lr``, no DeepSpeed scheduler (the entry point
    applies the suite's warmup + cosine), gradient norm clipped at 1.0 (as in-process)."""
    check_contender(c)
    micro = s.micro_batch or max(1, s.batch // launch.world)
    if s.batch % (micro * launch.world):
        raise ValueError(f"batch {s.batch} rows is not a multiple of micro-batch {micro} x {launch.world} ranks: "
                         "change --batch, --micro-batch or --nproc")
    kind, fixed = c.ds_optimizer
    params: dict[str, Any] = {"lr": lr, **fixed}
    if c.ours:
        import ds_structopt as dso

        defaults = dso.get_optimizer_class(kind).DEFAULTS
        if "update_freq" in defaults:
            params.setdefault("update_freq", s.update_freq)
        if "weight_decay" in defaults:
            params.setdefault("weight_decay", 0.0)
    elif s.device == "cpu":
        params["torch_adam"] = True  # DeepSpeed's fused Adam is a GPU kernel
    return {
        "train_batch_size": s.batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": s.batch // (micro * launch.world),
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": launch.zero_stage},
        "bf16": {"enabled": bool(s.bf16)},
        "optimizer": {"type": kind, "params": json.loads(json.dumps(params))},
    }


def command(launch: Launch, train_args: Sequence[str], port: int) -> list[str]:
    """The launcher's command line around ``python -m ds_structopt.train <train_args>``."""
    if launch.launcher == "torchrun":
        where = list(launch.launcher_args) or ["--standalone"]
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(launch.nnodes),
                "--nproc_per_node", str(launch.nproc), *where, "-m", "ds_structopt.train", *train_args]
    deepspeed = shutil.which("deepspeed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if deepspeed is None:
        raise ValueError("--launcher deepspeed: the 'deepspeed' command is not on PATH (install the package)")
    # --num_nodes / --num_gpus with a hostfile take that many nodes and slots from it
    return [deepspeed, "--master_port", str(port), "--num_nodes", str(launch.nnodes), "--num_gpus", str(launch.nproc),
            *launch.launcher_args, "--module", "ds_structopt.train", *train_args]


def free_port() -> int:
    """A TCP port free now on this host (the deepspeed launcher's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def train_args(s: convergence.Settings, run_dir: Path, config_path: Path) -> list[str]:
    args = ["--model", s.model, "--data", *s.data, "--seq-len", str(s.seq_len), "--steps", str(s.steps),
            "--warmup", str(s.warmup), "--min-lr-ratio", str(s.min_lr_ratio), "--eval-every", str(s.eval_every),
            "--eval-rows", str(s.eval_rows), "--log-every", str(s.eval_every), "--save-every", str(s.steps),
            "--keep-last", "1", "--seed", str(s.seed), "--output-dir", str(run_dir), "--overwrite",
            "--deepspeed_config", str(config_path)]
    return args + (["--tokenizer", s.tokenizer] if s.tokenizer else [])


def history(run_dir: Path) -> list[dict[str, float]]:
    """The eval curve in the suite's format: step 0 (the entry point's first eval), then every eval row."""
    result = json.loads((run_dir / "result.json").read_text())
    rows = [{"step": 0, "seconds": 0.0, "eval_loss": float(result["first_eval_loss"])}]
    with open(run_dir / "metrics.csv") as f:
        for r in csv.DictReader(f):
            if r["eval_loss"] != "":
                rows.append({"step": int(r["step"]), "seconds": float(r["seconds"]),
                             "eval_loss": float(r["eval_loss"]), "train_loss": float(r["train_loss"])})
    return rows


def finished_history(run_dir: Path, steps: int) -> list[dict[str, float]]:
    """The run's eval curve if it reached ``steps``; a preempted or short run raises (its curve
    must not be cached as a finished run)."""
    preempted = json.loads((run_dir / "result.json").read_text()).get("preempted")
    hist = history(run_dir)
    if preempted or hist[-1]["step"] != steps:
        raise RuntimeError(f"the launched run in {run_dir} stopped at step {hist[-1]['step']} of {steps}"
                           f"{' (preempted)' if preempted else ''}; rerun the sweep to train it again")
    return hist


def run_one(c: contenders.Contender, lr: float, s: convergence.Settings, launch: Launch, run_dir: Path,
            params: int, matrix_params: int, options: str,
            progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Train ``c`` at ``lr`` through the launcher; returns the suite's run record. The run's
    checkpoint is deleted afterwards (a 1B model's is tens of GB per run); its config, log,
    metrics.csv and result.json stay in ``run_dir``. A failed launch raises with the log's tail
    (nothing is cached)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)  # an earlier attempt's must not pass for this one's
    config_path = run_dir / "ds_config.json"
    config_path.write_text(json.dumps(ds_config(c, lr, s, launch), indent=1))
    cmd = command(launch, train_args(s, run_dir, config_path), free_port())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                     os.environ.get("PYTHONPATH")])))
    log_path = run_dir / "launch.log"
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if progress is not None and "| eval " in line:
                progress(line.strip())
        rc = proc.wait()
    if rc != 0 or not (run_dir / "result.json").exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{c.name} lr {lr:g} seed {s.seed}: the launched run failed (exit {rc}); "
                           f"log {log_path}:\n{tail}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    hist = finished_history(run_dir, s.steps)
    final = hist[-1]["eval_loss"]
    return {"optimizer": c.name, "options": options, "lr": lr, "final_eval_loss": final if math.isfinite(final)
            else float("inf"), "diverged": not math.isfinite(final), "history": hist,
            "train_seconds": hist[-1]["seconds"], "state_bytes": None, "params": params,
            "matrix_params": matrix_params, "run_dir": str(run_dir)}
