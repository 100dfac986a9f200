"""Refresh suite: step-time spikes of basis refreshes, staggered vs not, with and without refresh-ahead.

Real DeepSpeed ranks (gloo, one thread each) train a LLaMA with the 130M
model's matrix shapes (hidden 768, MLP 2048, vocab 32000; ``--layers`` of the
12 to fit a CPU) at ZeRO-2 on tiny batches, so the optimizer dominates the
step. Every variant runs ``--windows`` refresh windows of T steps after
warm-up and records each step's time (the slowest rank's):

* ``no refresh``: T so large no refresh falls in the window (the floor);
* ``synchronous``: every matrix refreshes at the same step (the default);
* ``staggered``: ``stagger_refresh`` (each matrix at its own phase);
* ``staggered + ahead``: also ``refresh_from="previous"`` (decompositions in a
  worker thread, overlapped with communication and the next forward/backward).

Reported: median and max step over the windows and max/median; refresh time
per step = mean(variant) - mean(no refresh); share of it hidden by
refresh-ahead = 1 - (mean(ahead) - floor) / (mean(staggered) - floor).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from ..tables import markdown_table
from . import report
from .dist import launch_ranks, worker_entry, write_rank_result

VARIANTS = {
    "no refresh": {"update_freq": 10**9},
    "synchronous": {},
    "staggered": {"stagger_refresh": True},
    "staggered + ahead": {"stagger_refresh": True, "refresh_from": "previous"},
}


def worker(cfg: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import ds_structopt as dso

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    steps = cfg["warmup"] + cfg["windows"] * cfg["update_freq"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq_len"] + 1), generator=gen) for _ in range(steps)]
    params = dict(cfg["params"], update_freq=cfg["update_freq"])
    params.update(VARIANTS[cfg["variant"]])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["hidden"] // 64,
        max_position_embeddings=cfg["seq_len"], tie_word_embeddings=False))
    ds_cfg = {"train_batch_size": cfg["batch"], "train_micro_batch_size_per_gpu": cfg["batch"] // world,
              "zero_optimization": {"stage": cfg["stage"]}, "steps_per_print": 10**9,
              "optimizer": {"type": cfg["optimizer"], "params": params}}
    engine, *_ = dso.initialize(model=model, model_parameters=dso.param_groups(model), config=ds_cfg)
    times, losses = [], []
    for i, b in enumerate(batches):
        ids = b.chunk(world)[rank]
        dist.barrier()
        start = time.perf_counter()
        loss = engine(input_ids=ids[:, :-1], labels=ids[:, 1:].contiguous()).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    metrics = dso.metrics(engine)
    write_rank_result(cfg["out"], rank, {"times": times, "losses": losses, "refreshes": metrics["refreshes"]})


def run_variant(cfg: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    per_rank = launch_ranks("ds_structopt.bench.refresh", cfg, timeout)
    slowest = [max(ts) for ts in zip(*(r["times"] for r in per_rank))]  # a step ends when its slowest rank does
    timed = slowest[cfg["warmup"]:]
    med = statistics.median(timed)
    return {"step_times": slowest, "median_s": med, "max_s": max(timed), "mean_s": statistics.fmean(timed),
            "max_over_median": max(timed) / med, "refreshes": sum(r["refreshes"] for r in per_rank),
            "final_loss": per_rank[0]["losses"][-1]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    p.add_argument("--optimizer", default="AdaDiag++")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4, help="global sequences per step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--update-freq", type=int, default=4)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: getattr(args, k) for k in ("optimizer", "hidden", "intermediate", "layers", "vocab", "batch",
                                              "seq_len", "update_freq", "windows", "warmup", "stage")}
    settings["params"] = {"lr": 1e-3}
    ranks = args.ranks
    if args.quick:
        ranks = [2]
        settings.update(hidden=64, intermediate=128, layers=2, vocab=256, batch=4, seq_len=16, update_freq=3,
                        windows=1, warmup=1)
    runs = []
    for n in ranks:
        for variant in args.variants:
            t = time.perf_counter()
            result = run_variant(dict(settings, ranks=n, variant=variant))
            runs.append({"ranks": n, "variant": variant, **result})
            print(f"[refresh] {n} ranks {variant}: median {result['median_s']:.2f} s, max/median "
                  f"{result['max_over_median']:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return write(args.out, settings, runs)


def hidden_share(runs: list[dict[str, Any]], ranks: int) -> Optional[float]:
    by = {r["variant"]: r for r in runs if r["ranks"] == ranks}
    if not all(k in by for k in ("no refresh", "staggered", "staggered + ahead")):
        return None
    floor = by["no refresh"]["mean_s"]
    cost = by["staggered"]["mean_s"] - floor
    return None if cost <= 0 else 1.0 - (by["staggered + ahead"]["mean_s"] - floor) / cost


def write(out_dir: str, settings: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    floors = {r["ranks"]: r["mean_s"] for r in runs if r["variant"] == "no refresh"}
    rows = [[r["ranks"], r["variant"], r["median_s"], r["max_s"], r["max_over_median"], r["mean_s"],
             r["mean_s"] - floors[r["ranks"]] if r["ranks"] in floors else None] for r in runs]
    shares = {n: hidden_share(runs, n) for n in sorted({r["ranks"] for r in runs})}
    md = (f"Refresh: {settings['optimizer']} on LLaMA {settings['layers']} x {settings['hidden']} "
          f"(MLP {settings['intermediate']}, vocab {settings['vocab']}), ZeRO-{settings['stage']}, batch "
          f"{settings['batch']} x {settings['seq_len']}, T = {settings['update_freq']}, {settings['windows']} windows "
          f"after {settings['warmup']} warm-up steps; step time = slowest rank\n\n"
          + markdown_table(["ranks", "variant", "median s", "max s", "max / median", "mean s",
                                   "refresh s/step (mean - floor)"], rows)
          + "\n\nshare of refresh time hidden by refresh-ahead: "
          + ", ".join(f"{n} ranks {s:.0%}" if s is not None else f"{n} ranks n/a" for n, s in shares.items()) + "\n")
    series = {f"{r['ranks']}r {r['variant']}": (list(range(1, len(r["step_times"]) + 1)), r["step_times"]) for r in runs}
    plots = [report.line_plot(out / "refresh_step_times.png", series, "step", "seconds (slowest rank)",
                              "step time over refresh windows")]
    files = report.write(out, "refresh", {"settings": settings, "runs": runs, "hidden_share": shares, "plots": plots}, md)
    return {"files": files, "plots": plots}


if __name__ == "__main__":
    worker_entry(worker)
