"""How much refresh time the side stream hides, on one GPU (``python -m ds_structopt.bench.side_stream``).

One process, AdaDiag++ over LLaMA-1B-shaped matrices (``--layers`` blocks of q/k/v/o and
the MLP), each step preceded by a fixed matmul workload standing in for forward and
backward. Variants, all with staggered refreshes so every step carries about the same
refresh work:

- ``none``: no refresh after the first window (the cost of a step without refreshes);
- ``sync``: refreshes computed in the step (``refresh_from="current"``);
- ``ahead``: refreshes computed one step early on the side stream (``refresh_from="previous"``).

``hidden = 1 - (ahead - none) / (sync - none)`` in mean step time (measured after the first
refresh window): 1.0 means the side stream hid all refresh time behind the workload.
Writes a JSON file and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Optional, Sequence

import torch

import ds_structopt as dso

VARIANTS = {"none": {}, "sync": {"refresh_from": "current"}, "ahead": {"refresh_from": "previous"}}


def shapes(hidden: int, intermediate: int, layers: int) -> list[tuple[int, int]]:
    block = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    return block * layers


def run_variant(name: str, device: torch.device, mats: list[tuple[int, int]], steps: int, update_freq: int,
                workload: int) -> dict[str, Any]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(m, n, device=device) * 0.02) for m, n in mats]
    period = 10 * steps if name == "none" else update_freq  # "none": no refresh after the first window
    options = {"lr": 1e-4, "update_freq": period, "stagger_refresh": True, "first_refresh_window": update_freq,
               **VARIANTS[name]}
    opt = dso.AdaDiagPP(params, **options)
    grads = [torch.randn_like(p) for p in params]
    x = torch.randn(workload, workload, device=device)
    times = []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        y = x
        for _ in range(8):  # forward/backward stand-in on the main stream
            y = torch.tanh(y @ x)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    steady = times[2 * update_freq:]  # after the first refresh window and one full period
    return {"variant": name, "mean_step_s": statistics.mean(steady), "max_step_s": max(steady),
            "refreshes": opt.stats()["refreshes"], "steps": steps}


def run(device: str, hidden: int, intermediate: int, layers: int, steps: int, update_freq: int, workload: int,
        out: Optional[str]) -> dict[str, Any]:
    dev = torch.device(device)
    mats = shapes(hidden, intermediate, layers)
    rows = [run_variant(v, dev, mats, steps, update_freq, workload) for v in VARIANTS]
    by = {r["variant"]: r["mean_step_s"] for r in rows}
    refresh_cost = by["sync"] - by["none"]
    hidden_share = 1 - (by["ahead"] - by["none"]) / refresh_cost if refresh_cost > 0 else None
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "matrices": len(mats), "hidden": hidden, "intermediate": intermediate, "update_freq": update_freq,
              "workload": workload, "rows": rows, "refresh_cost_per_step_s": refresh_cost, "hidden_share": hidden_share}
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"side stream on {result['device']}: {result['matrices']} matrices, T={result['update_freq']}",
             "| variant | mean step (ms) | max step (ms) | refreshes |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['mean_step_s'] * 1e3:.2f} | {r['max_step_s'] * 1e3:.2f} | {r['refreshes']} |")
    share = result["hidden_share"]
    lines.append(f"refresh time hidden by the side stream: {'n/a' if share is None else f'{share:.0%}'}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5461)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--update-freq", type=int, default=8)
    p.add_argument("--workload", type=int, default=4096, help="side of the square matmuls standing in for fwd+bwd")
    p.add_argument("--out", default="runs/bench/side_stream.json")
    args = p.parse_args(argv)
    result = run(args.device, args.hidden, args.intermediate, args.layers, args.steps, args.update_freq,
                 args.workload, args.out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
