"""Atomic, rotated checkpoints around ``engine.save_checkpoint``.

DeepSpeed writes ``<root>/.incoming/<tag>/``; rank 0 then renames it to
``<root>/<tag>`` and atomically replaces ``<root>/latest``. A crash mid-save
leaves the previous checkpoint and ``latest`` untouched. Only the newest
``keep_last`` checkpoints are kept.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import torch.distributed as dist

INCOMING = ".incoming"


def save(engine: Any, root: str, step: int, client_state: dict[str, Any], keep_last: int) -> str:
    tag = f"step{step:08d}"
    incoming = os.path.join(root, INCOMING)
    engine.save_checkpoint(incoming, tag=tag, client_state=client_state, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    final = os.path.join(root, tag)
    if engine.global_rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(os.path.join(incoming, tag), final)
        _write_atomic(os.path.join(root, "latest"), tag)
        for old in sorted(t for t in os.listdir(root) if t.startswith("step"))[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def latest(root: str) -> Optional[str]:
    path = os.path.join(root, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(root, tag)) else None


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
