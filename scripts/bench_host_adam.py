"""The elementwise AdamW under ZeRO-Offload: DeepSpeed's cpu_adam kernel (``integrations/host_adam.py``,
the default) against our foreach AdamW (``offload_adam: "torch"``), on host fp32 tensors, in one
run. Prints ms per step (median of 7 after a warm-up) and the ratio for each size.
Usage: .venv/bin/python scripts/bench_host_adam.py [ELEMENTS ...]   (default 1M and 16M)
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package
from ds_structopt.integrations.host_adam import load_host_adam  # noqa: E402
from ds_structopt.optim.adamw import adamw_step  # noqa: E402


def ms_per_step(step, params, grads, states, hyper) -> float:
    step(params, grads, states, **hyper)  # warm-up (and the states' creation)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        step(params, grads, states, **hyper)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(sizes: list[int]) -> None:
    kernel = load_host_adam()
    if kernel is None:
        raise SystemExit("DeepSpeed's cpu_adam op is unavailable (python -m ds_structopt.integrations.offload_ops builds it)")
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    print(f"torch threads: {torch.get_num_threads()}")
    for n in sizes:
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(n, generator=gen)]
        ours = ms_per_step(adamw_step, [torch.randn(n, generator=gen)], grads, [{}], hyper)
        theirs = ms_per_step(kernel.step, [torch.randn(n, generator=gen)], grads, [{}], hyper)
        print(f"{n:>11,d} elements: foreach AdamW {ours:8.2f} ms, cpu_adam {theirs:8.2f} ms, {ours / theirs:.1f}x")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1 << 20, 1 << 24])
