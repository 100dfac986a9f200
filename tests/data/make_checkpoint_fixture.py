"""Regenerate the committed checkpoint fixture of the current format:

    .venv/bin/python tests/data/make_checkpoint_fixture.py

writes ``tests/data/checkpoint_v<FORMAT_VERSION>/`` (``checkpoint.save`` of a tiny deterministic
run: a 2-layer MLP, AdaDiag++ with update_freq 2, STEPS steps on a 1-rank gloo group, a few KB).
Older ``checkpoint_v*`` folders are kept: tests/test_checkpoint_format.py loads every one of them.
Run it only after a deliberate format change (with a FORMAT_VERSION bump) or a deliberate change of
the optimizer's math; the test says which.

The same functions drive the test, so the run is the same in both: :func:`deterministic_env` pins
what makes CPU float math differ between machines (threads, MKL's code path, ATen's vector width);
it must be set before torch is imported.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 3
SEED = 0


def deterministic_env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"}


def fixture_dir(version: int) -> Path:
    return HERE / f"checkpoint_v{version}"


def build(seed: int):
    """The model and a fresh optimizer (needs a process group)."""
    import torch

    import ds_structopt

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    # preset="paper": the options the fixtures were made with; they check the file format, so the
    # run must not follow a later change of AdaDiag++'s defaults
    return model, ds_structopt.distributed_optimizer(model, "AdaDiag++", lr=1e-2, update_freq=2, preset="paper")


def trained():
    """The fixture's run: STEPS steps on fixed inputs (a basis refresh included: update_freq 2)."""
    import torch

    model, opt = build(SEED)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(STEPS):
        x, y = torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    return model, opt


def init_group() -> None:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def provenance() -> dict[str, str]:
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "env": json.dumps(deterministic_env(), sort_keys=True)}


def main() -> None:
    if any(os.environ.get(k) != v for k, v in deterministic_env().items()):  # before torch is imported
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **deterministic_env()})
    sys.path.insert(0, str(HERE.parents[1]))
    import torch.distributed as dist

    from ds_structopt import checkpoint

    init_group()
    out = fixture_dir(checkpoint.FORMAT_VERSION)
    shutil.rmtree(out, ignore_errors=True)
    _, opt = trained()
    checkpoint.save(opt, str(out))
    (out / "provenance.json").write_text(json.dumps(provenance(), indent=1) + "\n")
    dist.destroy_process_group()
    print(f"wrote {out}: " + ", ".join(f"{p.relative_to(out)} ({p.stat().st_size} B)"
                                        for p in sorted(out.rglob("*")) if p.is_file()))


if __name__ == "__main__":
    main()
