"""Checkpoint I/O against size: write (fsynced), SHA-256 (what each rank does for its own files at
save and again at resume) and read-back of a rank file, per size; rates in MiB/s.

    python -m ds_structopt.bench.checkpoint_io --sizes 64 256 1024 --dir /tmp/ckio

A rank's time scales with its own share (each rank hashes and checks only its files, in parallel
with the others), so a 70B AdaDiag++ checkpoint of ~1.4 TB over 512 ranks is ~2.7 GiB per rank.
The page cache is dropped before reads where permitted (root), else reads may come from memory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Optional, Sequence

import torch

from ..checkpoint import tensor_file
from ..training.checkpoints import _sha256


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def measure(size_mib: int, folder: str) -> dict[str, float]:
    """Seconds to write, hash and read back one rank file of ``size_mib`` MiB of fp32 state."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank{size_mib}.tensors")
    n = size_mib * 2**20 // 4 // 4
    state = {"matrix_state": {f"m{i}": {"exp_avg": torch.randn(n)} for i in range(4)}}
    t0 = time.perf_counter()
    tensor_file.write(path, state)
    write = time.perf_counter() - t0
    cold = _drop_caches()
    t0 = time.perf_counter()
    _sha256(path)
    sha = time.perf_counter() - t0
    _drop_caches()
    t0 = time.perf_counter()
    tree = tensor_file.read(path)
    for st in tree["matrix_state"].values():
        st["exp_avg"].read()
    read = time.perf_counter() - t0
    os.remove(path)
    return {"mib": size_mib, "write_s": round(write, 3), "sha256_s": round(sha, 3), "read_s": round(read, 3),
            "write_mib_s": round(size_mib / write, 1), "sha256_mib_s": round(size_mib / sha, 1),
            "read_mib_s": round(size_mib / read, 1), "cold_cache": cold}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024], help="MiB per rank file")
    p.add_argument("--dir", default="runs/bench_checkpoint_io")
    args = p.parse_args(argv)
    rows = []
    for size in args.sizes:
        rows.append(measure(size, args.dir))
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
