"""Decomposition benchmark: time and accuracy of each way to get a gradient's singular bases.

``python -m ds_structopt.bench.decomp --device cuda --sizes 4096x4096 8192x8192 8192x28672``

For every size it times, on one gradient-like fp32 matrix (a rank-64 signal plus
noise, seeded): torch.linalg.svd with full_matrices False/True (on CUDA with
each ``driver``: default, gesvd, gesvdj, gesvda), eigh of the Gram matrix of
either side in fp32 and fp64 (the GEMM included), and the optimizer's own
``linalg.svd_bases`` for one side (the smaller, as AdaDiag rotates) and both
sides with each ``decomposition``. Each method gets ``--warmup`` untimed runs,
then the median of ``--repeats`` (CUDA synchronized around every run). Accuracy
columns, computed in fp64 from the returned bases: ``orth`` = max |B^T B - I|,
``offdiag`` = off-diagonal Frobenius mass of P^T G Q (both sides) or of
B^T (Gram) B (one side), relative to the whole. A method that raises (e.g. a
driver that does not support the shape) gets its error instead of a time.
Prints a markdown table and writes JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..optim import linalg

Bases = tuple[Optional[Tensor], Optional[Tensor]]
CUDA_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


def parse_size(text: str) -> tuple[int, int]:
    """'4096x11008' -> (4096, 11008)."""
    try:
        m, n = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 4096x11008, got {text!r}") from None
    if m < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return m, n


def gradient_like(m: int, n: int, device: torch.device, seed: int = 0) -> Tensor:
    """A decaying spectrum as gradients have (rank-64 signal + 10% noise), not a flat Gaussian one."""
    gen = torch.Generator().manual_seed(seed)
    r = min(64, m, n)
    g = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen) / r**0.5
    return (g + 0.1 * torch.randn(m, n, generator=gen)).to(device)


def methods(device: torch.device, m: int, n: int) -> dict[str, Callable[[Tensor], Bases]]:
    """Name -> function of one fp32 matrix returning (P or None, Q or None)."""
    out: dict[str, Callable[[Tensor], Bases]] = {}
    # cheapest first: a run cut short by its time limit still has the production paths
    small_left = m <= n
    out["svd_bases one-sided decomposition=auto"] = lambda g: _production(g, small_left, not small_left, "auto")
    for method in ("svd", "gram"):
        out[f"svd_bases two-sided decomposition={method}"] = (
            lambda g, method=method: _production(g, True, True, method))
    for side in ("left", "right"):
        for dtype in (torch.float32, torch.float64):
            def gram_eigh(g: Tensor, side: str = side, dtype: torch.dtype = dtype) -> Bases:
                x = g.to(dtype)
                vecs = torch.linalg.eigh(x @ x.mT if side == "left" else x.mT @ x)[1].flip(-1)
                return (vecs, None) if side == "left" else (None, vecs)

            out[f"eigh gram {side} {str(dtype).replace('torch.', '')}"] = gram_eigh
    drivers = CUDA_DRIVERS if device.type == "cuda" else (None,)
    for full in (False, True):
        for driver in drivers:
            name = f"svd full_matrices={full}" + (f" driver={driver}" if driver else "")

            def svd(g: Tensor, full: bool = full, driver: Optional[str] = driver) -> Bases:
                kwargs = {"driver": driver} if driver else {}
                u, _, vh = torch.linalg.svd(g, full_matrices=full, **kwargs)
                return u, vh.mT

            out[name] = svd
    return out


def _production(g: Tensor, left: bool, right: bool, method: str) -> Bases:
    res = linalg.svd_bases(g.unsqueeze(0), left, right, method)[0]
    if res is None:
        raise RuntimeError("svd_bases failed (returned None)")
    return res


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _offdiag(x: Tensor) -> float:
    diag = torch.zeros_like(x)
    diag.diagonal().copy_(x.diagonal())
    total = torch.linalg.matrix_norm(x)
    return float(torch.linalg.matrix_norm(x - diag) / total) if total > 0 else 0.0


def quality(g: Tensor, bases: Bases) -> dict[str, float]:
    """Orthogonality and diagonalization residual of the bases, in fp64."""
    p, q = (None if b is None else b.double() for b in bases)
    gd = g.double()
    orth = 0.0
    for b in (p, q):
        if b is not None:
            eye = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)
            orth = max(orth, float((b.mT @ b - eye).abs().max()))
    if p is not None and q is not None:
        off = _offdiag(p.mT @ gd @ q)
    elif p is not None:
        off = _offdiag(p.mT @ (gd @ gd.mT) @ p)
    else:
        off = _offdiag(q.mT @ (gd.mT @ gd) @ q)
    return {"orth": orth, "offdiag": off}


def run(device: str, sizes: Sequence[tuple[int, int]], repeats: int = 3, warmup: int = 1,
        only: Optional[Sequence[str]] = None, seed: int = 0, budget: Optional[float] = None,
        on_row: Optional[Callable[[dict[str, Any]], None]] = None) -> list[dict[str, Any]]:
    """One row per (size, method): median seconds (or the error) and the accuracy figures.

    ``budget``: a method whose first run takes longer is timed by that run alone (slow full
    SVDs of 8192x28672 would otherwise eat a GPU check's minutes). ``on_row`` sees each row
    as soon as it is measured (the CLI prints it and rewrites the JSON: a run cut short keeps
    what it measured)."""
    dev = torch.device(device)
    rows: list[dict[str, Any]] = []
    for m, n in sizes:
        g = gradient_like(m, n, dev, seed)
        for name, fn in methods(dev, m, n).items():
            if only and not any(key in name for key in only):
                continue
            row: dict[str, Any] = {"size": f"{m}x{n}", "method": name, "device": str(dev),
                                   "seconds": None, "orth": None, "offdiag": None, "error": None}
            try:
                times = []
                for i in range(max(warmup, 1 if budget else 0)):
                    _sync(dev)
                    start = time.perf_counter()
                    out = fn(g)
                    _sync(dev)
                    if budget and i == 0 and time.perf_counter() - start > budget:
                        times = [time.perf_counter() - start]
                        row["note"] = f"one run (over the {budget:g} s budget)"
                        break
                for _ in range(0 if times else repeats):
                    _sync(dev)
                    start = time.perf_counter()
                    out = fn(g)
                    _sync(dev)
                    times.append(time.perf_counter() - start)
                row["seconds"] = statistics.median(times)
                row.update(quality(g, out))
                del out
            except (RuntimeError, ValueError) as err:  # unsupported driver/shape, OOM: report, go on
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| size | method | seconds | orth | offdiag |", "|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['size']} | {r['method']} | {r['error']} | | |")
        else:
            lines.append(f"| {r['size']} | {r['method']} | {r['seconds']:.4g} | {r['orth']:.1e} | {r['offdiag']:.1e} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ds_structopt.bench.decomp", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(4096, 4096), (8192, 8192), (8192, 28672)],
                   help="MxN gradient shapes")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--only", nargs="+", default=None, help="run only methods whose name contains one of these")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/decomp.json", help="JSON output file")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: a method whose first run takes longer is reported from that run alone")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name(args.device)
            if args.device.startswith("cuda") else "cpu", "repeats": args.repeats, "warmup": args.warmup}
    done: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        done.append(row)
        print(markdown([row]).splitlines()[-1], flush=True)
        out.write_text(json.dumps({"meta": meta, "rows": done}, indent=2) + "\n")

    rows = run(args.device, args.sizes, args.repeats, args.warmup, args.only, args.seed, args.budget, record)
    print(markdown(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
