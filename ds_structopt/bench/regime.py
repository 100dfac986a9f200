"""Paper-regime convergence suite: steps to AdamW's loss at the papers' ratios, several seeds.

The papers' LLaMA-on-C4 setting (GaLore's: 131k tokens per step, 10-20k steps, a basis
refresh every 200 steps) has ~0.002 tokens per step per parameter, ~20 tokens per parameter
and ~50 refreshes per run. This suite keeps those ratios at a size the machine can run:
tokens per step = ``tokens_per_step_per_param`` x parameters (gradient accumulation over
``micro_batch`` rows), ``tokens_per_param`` tokens in all, ``refreshes`` basis refreshes
(update_freq = steps / refreshes; SOAP refreshes at the same period). Each explicit
``--steps``/``--batch``/``--update-freq`` overrides its derived value (the papers' own sizes
on a GPU: ``--model 60m --data c4.jsonl --device cuda --bf16 --batch 512 --seq-len 256
--steps 10000 --update-freq 200``).

Protocol: each contender's lr grid is swept on the first seed and extended (x2 or /2) past an
edge optimum until the best lr is bracketed (at most ``max_extend`` extra points per side);
the best lr then runs on every other seed. The target is the better AdamW (beta2 0.999 or
0.95, by mean final eval loss); for each seed a contender's steps ratio is the steps it needs
to reach that seed's target loss over the steps the target AdamW needs. Mean and spread
(min, max over seeds) are reported; a ratio is "beyond the spread" when every seed agrees.
Finished runs are kept in the output JSON after each run and skipped on a rerun with the same
settings, so a sweep can be split over several invocations or jobs.

Sizes that need more than one GPU run through the training entry point: ``--launcher torchrun|deepspeed
--nproc N [--nnodes K --launcher-args ...] [--zero-stage S]`` trains every run with
``ds_structopt.train`` under that launcher (bench/launched.py) instead of in this process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..tables import markdown_table
from . import convergence, launched, report
from . import optimizers as contenders

SUITE = "convergence_regime"
TARGETS = ("AdamW", "AdamW b2=0.95")


@dataclass
class Regime:
    model: str = "tiny"  # 0.87M parameters: ~3 min per run on 2 CPU cores (bench10m-sized runs take ~10x that)
    data: tuple[str, ...] = ("stdlib",)
    tokenizer: Optional[str] = None
    seq_len: int = 128
    tokens_per_step_per_param: float = 0.002
    tokens_per_param: float = 2.2
    refreshes: int = 40
    micro_batch: int = 8
    eval_points: int = 20
    eval_rows: int = 256
    seeds: int = 2
    max_extend: int = 3
    device: str = "cpu"
    bf16: bool = False
    steps: Optional[int] = None  # explicit values override the derived ones
    batch: Optional[int] = None
    update_freq: Optional[int] = None


def derive(r: Regime, params: int) -> convergence.Settings:
    """The training settings that give ``params`` parameters the regime's ratios."""
    rows_per_step = r.tokens_per_step_per_param * params / r.seq_len
    batch = r.batch or max(r.micro_batch, round(rows_per_step / r.micro_batch) * r.micro_batch)
    steps = r.steps or math.ceil(r.tokens_per_param * params / (batch * r.seq_len))
    update_freq = r.update_freq or max(1, steps // r.refreshes)
    return convergence.Settings(
        model=r.model, data=tuple(r.data), tokenizer=r.tokenizer, seq_len=r.seq_len, batch=batch, steps=steps,
        eval_every=max(1, steps // r.eval_points), eval_rows=r.eval_rows, update_freq=update_freq,
        micro_batch=min(r.micro_batch, batch), device=r.device, bf16=r.bf16)


def ratios(s: convergence.Settings, params: int) -> dict[str, float]:
    """The paper-regime ratios ``s`` gives a model of ``params`` parameters (reported with the results)."""
    tokens_per_step = s.batch * s.seq_len
    return {"params": params, "tokens_per_step": tokens_per_step,
            "tokens_per_step_per_param": tokens_per_step / params,
            "tokens_per_param": tokens_per_step * s.steps / params, "refreshes": s.steps / s.update_freq}


def bracket(loss_at: Callable[[float], float], grid: Sequence[float], max_extend: int) -> tuple[float, bool]:
    """Best lr of ``grid`` extended x2 / /2 while the best is at an edge (at most ``max_extend``
    points per side); returns (best lr, whether it is bracketed by worse neighbours)."""
    losses = {lr: loss_at(lr) for lr in grid}
    added = {"low": 0, "high": 0}
    while True:
        lrs = sorted(losses)
        best = min(lrs, key=lambda lr: (losses[lr], lr))
        if len(lrs) > 1 and lrs[0] < best < lrs[-1]:
            return best, True
        side = "low" if best == lrs[0] else "high"
        if added[side] >= max_extend:
            return best, False
        added[side] += 1
        new = lrs[0] / 2 if side == "low" else lrs[-1] * 2
        losses[new] = loss_at(new)


class RunCache:
    """The suite's JSON: settings + finished runs (+ the last summaries), rewritten (atomically)
    after every run; other top-level keys already in the file are kept."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path, self.settings, self.runs, self.extra = path, settings, [], {}
        if path.exists():
            raw = json.loads(path.read_text())
            # only what a run depends on must match: seeds and max_extend change the protocol, not a run
            mine, theirs = settings["train"], raw.get("settings", {}).get("train", {})
            if mine != theirs:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise ValueError(f"{path} holds runs with other training settings ({', '.join(diff)}): "
                                 "use another --out or the same settings")
            self.runs = raw["runs"]
            self.extra = {k: v for k, v in raw.items() if k not in ("settings", "runs")}

    def find(self, name: str, lr: float, seed: int, options: str) -> Optional[dict[str, Any]]:
        """The finished run of ``name`` at (lr, seed), if it ran with these ``options``."""
        return next((r for r in self.runs if (r["optimizer"], r["lr"], r["seed"]) == (name, lr, seed)
                     and r.get("options") == options), None)

    def add(self, run: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> None:
        """Keep ``run``, replacing a run of the same (name, lr, seed) made with other options."""
        key = (run["optimizer"], run["lr"], run["seed"])
        self.runs = [r for r in self.runs if (r["optimizer"], r["lr"], r["seed"]) != key] + [run]
        self.write(extra)

    def write(self, extra: Optional[dict[str, Any]] = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        self.extra.update(extra or {})
        tmp.write_text(json.dumps({"settings": self.settings, **self.extra, "runs": self.runs}, indent=1))
        os.replace(tmp, self.path)


def contender(name: str) -> contenders.Contender:
    c = contenders.REGIME.get(name) or contenders.VARIANTS.get(name)
    if c is None:
        raise ValueError(f"unknown optimizer '{name}'; choose from {sorted(contenders.REGIME) + sorted(contenders.VARIANTS)}")
    return c


def sweep(r: Regime, names: Sequence[str], out_dir: str | Path, log: Callable[[str], None] = print,
          fixed_lr: Optional[float] = None, launch: Optional[launched.Launch] = None) -> dict[str, Any]:
    """Run (or take from the cache) every run of the protocol; returns the cache's runs.

    ``fixed_lr`` (an ablation screen): every contender but the AdamW targets runs only that lr,
    on every seed, instead of its bracketed grid; the runs share the cache with the full protocol.
    ``launch``: every run goes through the training entry point under that launcher; its settings
    join the cache's, so launched and in-process runs never mix."""
    missing = [n for n in TARGETS if n not in names]
    if len(missing) == len(TARGETS):
        raise ValueError(f"the regime suite needs {' or '.join(TARGETS)} in --optimizers (it sets the target)")
    for n in names:
        contender(n)
        if launch is not None:
            launched.check_contender(contender(n))
    if launch is not None:
        launch.check()
    data = convergence.load_data(convergence.Settings(model=r.model, data=tuple(r.data), tokenizer=r.tokenizer,
                                                      seq_len=r.seq_len))
    import torch

    # meta: the sizes and options need no weights (a 1B model's would be 4 GB here for nothing)
    with torch.device("meta"):
        model = convergence.build_model(convergence.Settings(model=r.model, seq_len=r.seq_len), data.vocab_size)
    params = sum(p.numel() for p in model.parameters())
    matrix_params = sum(p.numel() for p in contenders.split_params(model)[0])
    base = derive(r, params)
    # what each contender is now (class + every option but lr): a cached run counts only if it matches
    options = {n: contenders.build(contender(n), model, 1e-3, update_freq=base.update_freq).options() for n in names}
    settings = {"regime": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(r).items()},
                "train": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(base).items()}}
    if launch is not None:
        settings["train"]["launch"] = launch.key()
    cache = RunCache(Path(out_dir) / f"{SUITE}.json", settings)
    info = {"ratios": ratios(base, params), "train_tokens": len(data.train) * r.seq_len}
    epochs = base.steps * base.batch / len(data.train)
    log(f"[regime] {r.model}: {params / 1e6:.2f}M params, {base.batch} x {base.seq_len} tokens/step "
        f"({info['ratios']['tokens_per_step_per_param']:.4f}/param), {base.steps} steps "
        f"({info['ratios']['tokens_per_param']:.2f} tokens/param, {epochs:.2f} epochs of the data), "
        f"refresh every {base.update_freq} ({info['ratios']['refreshes']:.0f} refreshes), {r.seeds} seeds")
    counter = {"ran": 0, "cached": 0}
    used: list[dict[str, Any]] = []  # this invocation's runs (cached or new): what the summary reads

    def final_loss(name: str, lr: float, seed: int) -> float:
        found = cache.find(name, lr, seed, options[name])
        if found is None:
            s = replace(base, seed=seed)
            t0 = time.perf_counter()

            def progress(step: int, ev: float, seconds: float) -> None:
                eta = (time.perf_counter() - t0) / step * (s.steps - step)
                log(f"[regime] {name} lr {lr:g} seed {seed}: step {step}/{s.steps} eval {ev:.4f} "
                    f"({time.perf_counter() - t0:.0f} s, ETA {eta:.0f} s)")

            if launch is None:
                found = convergence.run_one(name, lr, s, data, contender=contender(name), progress=progress)
            else:
                slug = "".join(ch if ch.isalnum() or ch in ".=+-" else "_" for ch in name)
                found = launched.run_one(contender(name), lr, s, launch,
                                         Path(out_dir) / "launched" / f"{slug}_lr{lr:g}_seed{seed}", params,
                                         matrix_params, options[name],
                                         progress=lambda line: log(f"[regime] {name} lr {lr:g} seed {seed}: {line}"))
            found["seed"] = seed
            cache.add(found, {"info": info})
            counter["ran"] += 1
        else:
            counter["cached"] += 1
        used.append(found)
        return found["final_eval_loss"]

    best_lrs = {}
    for name in names:
        if fixed_lr is not None and name not in TARGETS:
            for seed in range(r.seeds):
                final_loss(name, fixed_lr, seed)
            best_lrs[name] = {"lr": fixed_lr, "bracketed": None}
            continue
        best, bracketed = bracket(lambda lr: final_loss(name, lr, 0), contender(name).lrs, r.max_extend)
        best_lrs[name] = {"lr": best, "bracketed": bracketed}
        for seed in range(1, r.seeds):
            final_loss(name, best, seed)
        log(f"[regime] {name}: best lr {best:g}{'' if bracketed else ' (NOT bracketed: edge of the extended grid)'}")
    log(f"[regime] {counter['ran']} runs trained, {counter['cached']} taken from {cache.path}")
    return {"cache": cache, "info": info, "best_lrs": best_lrs, "settings": base, "runs": used, "data": data}


def step_seconds(chosen: dict[str, tuple[contenders.Contender, float]], s: convergence.Settings, data: Any,
                 rounds: int = 3) -> dict[str, float]:
    """Seconds per optimizer step of each contender at its lr, measured now, here. Every contender
    takes its first step (state, first bases), then ``rounds`` times each in turn times one refresh
    period (T consecutive steps hold exactly one refresh); the median period counts. Taking turns
    spreads a drift of the host's speed over everybody (one contender after another moved the
    ratios by ~15 % between invocations); cached runs' own clocks mix hosts and sessions."""
    import torch

    from ..data.sampler import ShardedBatchSampler
    from ..training.local import lm_step
    from ..training.schedule import warmup_cosine, warmup_steps

    device = torch.device(s.device)
    warmup = warmup_steps(s.warmup, s.steps)
    runs = {}
    for name, (c, lr) in chosen.items():
        model = convergence.build_model(s, data.vocab_size).to(device)
        runs[name] = {"model": model, "lr": lr, "k": 0, "periods": [],
                      "opt": contenders.build(c, model, lr, update_freq=s.update_freq, elementwise_lr=s.elementwise_lr),
                      "sampler": ShardedBatchSampler(len(data.train), s.batch, seed=s.seed)}

    def step(name: str) -> torch.Tensor:  # the run's own next step, schedule included
        r = runs[name]
        for g in r["opt"].param_groups:
            g["lr"] = g["base_lr"] * warmup_cosine(r["k"], s.steps, warmup, s.min_lr_ratio)
        r["k"] += 1
        return lm_step(r["model"], r["opt"], data.train[r["sampler"].next_indices()].to(device).long(),
                       micro=s.micro_batch)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16):
        for name in runs:
            step(name)
        for _ in range(rounds):
            for name, r in runs.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(s.update_freq):
                    loss = step(name)
                sync()
                r["periods"].append((time.perf_counter() - t0) / s.update_freq)
                if not math.isfinite(loss.item()):  # a skipped step would look fast
                    raise RuntimeError(f"{name} lr {r['lr']:g}: non-finite loss while timing its steps")
    return {name: statistics.median(r["periods"]) for name, r in runs.items()}


def summarize(runs: Sequence[dict[str, Any]], best_lrs: dict[str, dict[str, Any]],
              seconds_per_step: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Per contender at its best lr: final loss and steps/time ratios to the target AdamW, per seed,
    with mean and (min, max). ``seconds_per_step`` (this host, now): adds each contender's
    ``time_ratio_same_host`` = steps ratio x its step time / the target's."""
    at_best = {n: sorted((r for r in runs if r["optimizer"] == n and r["lr"] == b["lr"]), key=lambda r: r["seed"])
               for n, b in best_lrs.items()}
    targets = [n for n in TARGETS if n in at_best]
    target = min(targets, key=lambda n: statistics.fmean(r["final_eval_loss"] for r in at_best[n]))
    goal = {r["seed"]: r for r in at_best[target]}
    rows = {}
    for name, rs in at_best.items():
        steps_r, time_r, finals = [], [], []
        for r in rs:
            finals.append(r["final_eval_loss"])
            base = goal.get(r["seed"])
            if base is None:
                continue
            base_steps, base_seconds = convergence.reach(base["history"], base["final_eval_loss"])
            steps, seconds = convergence.reach(r["history"], base["final_eval_loss"])
            steps_r.append(steps / base_steps if steps and base_steps else None)
            time_r.append(seconds / base_seconds if seconds and base_seconds else None)
        reached = [x for x in steps_r if x is not None]
        all_reached = bool(steps_r) and len(reached) == len(steps_r)
        st = rs[0]["state_bytes"]  # None: a launched run (its state lives in the ranks)
        rows[name] = {
            "best_lr": best_lrs[name]["lr"], "lr_bracketed": best_lrs[name]["bracketed"], "seeds": len(rs),
            "final_eval_loss": statistics.fmean(finals), "final_eval_loss_spread": [min(finals), max(finals)],
            "steps_ratio": statistics.fmean(reached) if all_reached else None,
            "steps_ratio_spread": [min(reached), max(reached)] if all_reached else None,
            "steps_ratio_per_seed": steps_r, "reached_seeds": len(reached),
            "time_ratio": statistics.fmean(time_r) if all_reached and None not in time_r else None,
            "step_seconds": (seconds_per_step or {}).get(name),
            "faster_than_target_on_every_seed": all_reached and max(reached) < 1.0,
            "state_bytes_per_param": st and st["total"] / rs[0]["params"],
            "matrix_state_elems_per_param_excl_rotations": st and st["matrices_other"] / 4 / rs[0]["matrix_params"],
            "matrix_rotation_bytes_per_param": st and st["matrices_rotations"] / rs[0]["matrix_params"],
        }
    base = (seconds_per_step or {}).get(target)
    for row in rows.values():
        row["time_ratio_same_host"] = (row["steps_ratio"] * row["step_seconds"] / base
                                       if base and row["step_seconds"] and row["steps_ratio"] is not None else None)
    return {"target": target, "target_eval_loss": statistics.fmean(r["final_eval_loss"] for r in at_best[target]),
            "best": rows}


def run(r: Regime, names: Sequence[str], out_dir: str | Path, log: Callable[[str], None] = print,
        fixed_lr: Optional[float] = None, launch: Optional[launched.Launch] = None,
        timing: bool = True) -> dict[str, Any]:
    """The sweep, then its table, plot and summary; a ``fixed_lr`` screen writes them as
    ``<suite>_ablation.*`` (and ``ablation_summary`` in the JSON), leaving the full protocol's.
    ``timing``: time every contender's step now, here, taking turns (``step_seconds``)."""
    done = sweep(r, names, out_dir, log, fixed_lr, launch)
    cache, s = done["cache"], done["settings"]
    timed = None
    if launch is None and timing:  # launched runs' seconds come from the cluster they ran on
        timed = step_seconds({n: (contender(n), b["lr"]) for n, b in done["best_lrs"].items()}, s, done["data"])
        for name, sec in timed.items():
            log(f"[regime] {name}: {sec:.3f} s/step on this host (median of 3 turns of {s.update_freq} steps)")
    summary = summarize(done["runs"], done["best_lrs"], timed)
    out = Path(out_dir)
    stem, key = (f"{SUITE}_ablation", "ablation_summary") if fixed_lr is not None else (SUITE, "summary")
    curves = {}
    for name, b in done["best_lrs"].items():
        rs = [x for x in done["runs"] if x["optimizer"] == name and x["lr"] == b["lr"] and not x["diverged"]]
        if rs and all(len(x["history"]) == len(rs[0]["history"]) for x in rs):
            curves[name] = ([h["step"] for h in rs[0]["history"]],
                            [statistics.fmean(x["history"][i]["eval_loss"] for x in rs) for i in range(len(rs[0]["history"]))])
    png = report.line_plot(out / f"{stem}_loss_vs_steps.png", curves, "optimizer steps", "eval loss (mean of seeds)",
                           f"{s.model}, paper regime: eval loss vs steps (best lr each)", summary["target_eval_loss"])
    info = done["info"]["ratios"]
    headers = ["optimizer", "best lr", "bracketed", "final eval loss (min-max)", "steps ratio (min-max)",
               "time ratio (same host)", "s/step", "time ratio (runs' own clocks)", "state B/param",
               "bases/factors B/matrix param"]

    def span(v: Optional[list[float]], digits: int) -> str:
        return "" if v is None else f" ({v[0]:.{digits}f}-{v[1]:.{digits}f})"

    table = [[n, b["best_lr"], {True: "yes", False: "no", None: "fixed"}[b["lr_bracketed"]],
              f"{b['final_eval_loss']:.4f}{span(b['final_eval_loss_spread'], 4)}",
              "not reached" + (f" on {b['seeds'] - b['reached_seeds']} seed(s)" if b["reached_seeds"] else "")
              if b["steps_ratio"] is None else f"{b['steps_ratio']:.3f}{span(b['steps_ratio_spread'], 3)}",
              b["time_ratio_same_host"], b["step_seconds"], b["time_ratio"], b["state_bytes_per_param"],
              b["matrix_rotation_bytes_per_param"]]
             for n, b in summary["best"].items()]
    md = (f"Paper-regime convergence: model `{s.model}` ({info['params'] / 1e6:.2f}M params), "
          f"{s.batch} x {s.seq_len} tokens/step ({info['tokens_per_step_per_param']:.4f} per param), {s.steps} steps "
          f"({info['tokens_per_param']:.2f} tokens per param), refresh every {s.update_freq} steps "
          f"({info['refreshes']:.0f} refreshes), {done['cache'].settings['regime']['seeds']} seeds; target = "
          f"{summary['target']}'s final eval loss per seed (mean {summary['target_eval_loss']:.4f})\n\n"
          + markdown_table(headers, table))
    cache.write({"info": done["info"], key: summary, "ablation_plots" if fixed_lr is not None else "plots": [png]})
    md_path = out / f"{stem}.md"
    md_path.write_text(md + "\n")
    return {"summary": summary, "files": {"json": str(cache.path), "markdown": str(md_path)}, "plots": [png]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Regime()
    p.add_argument("--model", default=d.model)
    p.add_argument("--data", nargs="+", default=list(d.data))
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="rows per forward (gradient accumulation)")
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--refreshes", type=int, default=d.refreshes, help="basis refreshes per run (sets update_freq)")
    p.add_argument("--tokens-per-param", type=float, default=d.tokens_per_param)
    p.add_argument("--max-extend", type=int, default=d.max_extend, help="lr points added per side to bracket the best")
    p.add_argument("--steps", type=int, default=None, help="override the derived number of steps")
    p.add_argument("--batch", type=int, default=None, help="override the derived rows per step")
    p.add_argument("--update-freq", type=int, default=None, help="override the derived refresh period")
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--launcher", choices=launched.LAUNCHERS, default=None,
                   help="train every run with ds_structopt.train under this launcher (sizes needing several GPUs); "
                        "default: in this process")
    p.add_argument("--nproc", type=int, default=2, help="--launcher: ranks (GPUs) per node")
    p.add_argument("--nnodes", type=int, default=1, help="--launcher deepspeed: nodes (name them in --launcher-args)")
    p.add_argument("--zero-stage", type=int, default=2, help="--launcher: ZeRO stage of the generated configs")
    p.add_argument("--launcher-args", default="",
                   help="--launcher: extra launcher arguments as one string, written --launcher-args='...' when it "
                        "starts with '-' (e.g. deepspeed's '--hostfile hosts --master_addr host0' for --nnodes > 1)")
    p.add_argument("--no-timing", action="store_true",
                   help="skip timing each contender's step on this host after the sweep (time ratio (same host))")
    p.add_argument("--fixed-lr", type=float, default=None,
                   help="ablation screen: every non-AdamW contender runs only this lr (every seed); "
                        "writes convergence_regime_ablation.*")


def regime_from(args: argparse.Namespace, quick: bool) -> Regime:
    r = Regime(model=args.model, data=tuple(args.data), tokenizer=args.tokenizer, seq_len=args.seq_len,
               micro_batch=args.micro_batch, seeds=args.seeds, refreshes=args.refreshes,
               tokens_per_param=args.tokens_per_param, max_extend=args.max_extend, steps=args.steps,
               batch=args.batch, update_freq=args.update_freq, device=args.device, bf16=args.bf16)
    if quick:  # CI smoke size: the whole protocol (bracketing, seeds, cache) on the tiny model
        r = replace(r, model="tiny", data=("embedded",), seq_len=32, micro_batch=4, eval_rows=16, max_extend=1,
                    steps=args.steps or 12, batch=args.batch or 8, update_freq=args.update_freq or 3, eval_points=4)
    return r


QUICK_OPTIMIZERS = ("AdamW", "AdamW b2=0.95", "AdaDiag++")


def launch_from(args: argparse.Namespace) -> Optional[launched.Launch]:
    import shlex

    if args.launcher is None:
        return None
    return launched.Launch(launcher=args.launcher, nproc=args.nproc, nnodes=args.nnodes, zero_stage=args.zero_stage,
                           launcher_args=tuple(shlex.split(args.launcher_args)))


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    launch = launch_from(args)
    names = args.optimizers or (list(QUICK_OPTIMIZERS) if args.quick else list(contenders.REGIME))
    if launch is not None and not args.optimizers:  # the default list: leave out what cannot be launched
        left = [n for n in names if contender(n).ds_optimizer is None]
        names = [n for n in names if n not in left]
        if left:
            print(f"[regime] --launcher: leaving out {', '.join(left)} (no DeepSpeed config optimizer type)", flush=True)
    return run(regime_from(args, args.quick), names, args.out, log=lambda m: print(m, flush=True),
               fixed_lr=args.fixed_lr, launch=launch, timing=not args.no_timing)
