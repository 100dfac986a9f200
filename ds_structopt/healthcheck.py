"""``python -m ds_structopt.healthcheck`` (``ds-structopt check``): is this environment able to train?

The container HEALTHCHECK and the first thing to run on a new cluster node:
imports the package and DeepSpeed, checks the pinned versions, DeepSpeed's
accelerator and its communication backend, and that every optimizer builds
and steps on a small matrix. Prints one line per check; exit 1 on any failure.
"""
from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

PINNED = ("torch", "deepspeed", "transformers")


def _pins() -> dict[str, str]:
    """Versions from constraints.txt when it is beside the package (checkout, container), else none."""
    path = Path(__file__).resolve().parents[1] / "constraints.txt"
    if not path.exists():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def check_versions() -> str:
    pins, found, wrong = _pins(), [], []
    for name in PINNED:
        have = md.version(name)
        found.append(f"{name} {have}")
        want = pins.get(name)
        if want and have.split("+", 1)[0] != want:
            wrong.append(f"{name} {have} (constraints.txt pins {want})")
    if wrong:
        raise RuntimeError("version mismatch: " + ", ".join(wrong))
    return ", ".join(found)


def check_deepspeed() -> str:
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name, backend = acc.device_name(), acc.communication_backend_name()
    if torch.cuda.is_available() and name != "cuda":
        raise RuntimeError(f"CUDA is available but DeepSpeed chose accelerator '{name}' (check DS_ACCELERATOR)")
    if name == "cuda":
        if not torch.distributed.is_nccl_available():
            raise RuntimeError("CUDA build of torch without NCCL")
        return f"accelerator cuda ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}), backend {backend}"
    if not torch.distributed.is_gloo_available():
        raise RuntimeError(f"accelerator {name} but torch has no gloo backend")
    return f"accelerator {name}, backend {backend}"


def check_optimizers() -> str:
    import torch

    import ds_structopt as dso

    names = []
    for name in dso.OPTIMIZERS:
        w = torch.nn.Parameter(torch.randn(16, 8))
        opt = dso.build(name, [w])
        w.grad = torch.randn(16, 8)
        before = w.detach().clone()
        opt.step()
        if not torch.isfinite(w).all() or torch.equal(w, before):
            raise RuntimeError(f"{name} step did not produce a finite update")
        names.append(name)
    return "stepped " + ", ".join(names)


CHECKS: dict[str, Callable[[], str]] = {
    "versions": check_versions, "deepspeed": check_deepspeed, "optimizers": check_optimizers,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    failed = 0
    for name, check in CHECKS.items():
        try:
            print(f"ok    {name}: {check()}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every failing check, one line each
            failed += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
