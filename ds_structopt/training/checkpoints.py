"""Atomic, verified, rotated checkpoints around ``engine.save_checkpoint``.

DeepSpeed writes ``<root>/.incoming/<tag>/``; each rank SHA-256s the files it wrote
itself (in parallel), rank 0 records them all in ``manifest.json`` (size, hash,
writing rank), renames the folder to ``<root>/<tag>`` and atomically replaces
``<root>/latest``. So:

- a crash (or a killed rank) mid-save leaves the previous checkpoint and ``latest`` untouched;
- a save that fails on any rank (disk full mid-write, I/O error) is abandoned on every rank
  together, training goes on, and the previous checkpoint stays the newest: DeepSpeed's
  own writes go through ``integrations.deepspeed_checkpoint.SafeCheckpointEngine``, so a
  failing rank still joins DeepSpeed's barriers instead of leaving the others in them;
- a save that would not fit (free space below the size of the last checkpoint, on any
  rank's filesystem) is skipped up front with a warning;
- every file is fsynced before the checkpoint is published and older ones are rotated away;
- on resume each rank checks its share of the files against the manifest, the results are
  combined, and a truncated or corrupted checkpoint is reported in one line and the
  previous good one is used.

Only the newest ``keep_last`` checkpoints are kept (removed after a new one is published).
Each rank also saves its random generators (``rng.py``), restored by :func:`restore_rank_state`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Optional

import torch.distributed as dist

from .. import faults
from ..checkpoint.state_io import sha256_file, write_text_atomic
from ..comm import any_rank
from . import rng

INCOMING = ".incoming"
MANIFEST = "manifest.json"
RUN = "run.json"  # the run's description (training.run_config), judged at --resume


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files do not match its manifest (or it has none)."""


def save(engine: Any, root: str, step: int, client_state: dict[str, Any], keep_last: int,
         run: Optional[dict[str, Any]] = None) -> Optional[str]:
    """Write checkpoint ``step`` on every rank (collective). Returns its path, or None when it was not written.
    ``run``: the run's description, written by rank 0 as ``run.json`` (hashed with the rest)."""
    tag = f"step{step:08d}"
    rank = engine.global_rank
    incoming = os.path.join(root, INCOMING)
    folder = os.path.join(incoming, tag)
    problem = _space_problem(root)  # every rank looks at its own filesystem
    if any_rank(problem is not None, engine.device):
        if problem is not None:
            print(f"warning: rank {rank}: checkpoint {tag} skipped: {problem}; newest kept: {latest(root)}", flush=True)
        return None
    faults.after_space_check(step, rank, root)
    if rank == 0:  # left by a save that was killed before it was published: never mix it into this one
        shutil.rmtree(folder, ignore_errors=True)
    _barrier()
    error: Optional[BaseException] = None
    mine: dict[str, dict[str, Any]] = {}
    try:
        engine.save_checkpoint(incoming, tag=tag, client_state=client_state, save_latest=False)
        written = list(getattr(engine, "ds_structopt_written", [])) + [rng.save(folder, rank, engine.device)]
        if rank == 0 and run is not None:  # inside the try: a failed write is agreed on like the others
            written.append(os.path.join(folder, RUN))
            write_text_atomic(written[-1], json.dumps(run, indent=1))
        mine = {os.path.relpath(p, folder): _record(p, rank) for p in written}
    except (OSError, RuntimeError) as exc:  # disk full, I/O errors: never fatal, never published
        error = exc
    if any_rank(error is not None, engine.device):
        if error is not None:
            print(f"warning: rank {rank}: checkpoint {tag} failed ({type(error).__name__}: {error}); "
                  f"newest kept: {latest(root)}", flush=True)
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        _barrier()
        return None
    faults.during_save(step, rank)
    records = gather_objects(mine)
    final = os.path.join(root, tag)
    if rank == 0:
        files: dict[str, dict[str, Any]] = {}
        for part in records:
            files.update(part)
        write_manifest(folder, files)
        _fsync_tree(folder)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(folder, final)
        _fsync_dir(root)
        write_text_atomic(os.path.join(root, "latest"), tag)
        for old in sorted(t for t in os.listdir(root) if t.startswith("step"))[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return final


def restore_rank_state(folder: str, rank: int, device: Any) -> bool:
    """What a rank keeps beside DeepSpeed's files (its random generators); False if absent."""
    return rng.restore(folder, rank, device)


def read_run(folder: str) -> Optional[dict[str, Any]]:
    """The run description saved with the checkpoint in ``folder`` (None: written before run.json existed)."""
    path = os.path.join(folder, RUN)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_manifest(folder: str, records: Optional[dict[str, dict[str, Any]]] = None) -> None:
    """``manifest.json`` for every file in ``folder``: the ranks' own ``records`` (size, SHA-256,
    writing rank), and this process hashes any file no rank reported (meta files, other engines)."""
    files = dict(records or {})
    for path in sorted(_files(folder)):
        rel = os.path.relpath(path, folder)
        if rel not in files:
            files[rel] = _record(path, 0)
    write_text_atomic(os.path.join(folder, MANIFEST), json.dumps({"files": dict(sorted(files.items()))}, indent=1))


def verify(folder: str, rank: int = 0, world: int = 1) -> None:
    """Raise CorruptCheckpointError (one line, naming the file) unless this rank's share of the
    files matches the manifest: the files written by saving ranks ``r`` with ``r % world == rank``
    (all of them for ``world=1``), plus the check that no listed file is missing."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise CorruptCheckpointError(f"checkpoint {folder} has no {MANIFEST} (incomplete or not written by ds_structopt)")
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError) as exc:
        raise CorruptCheckpointError(f"checkpoint {folder}: unreadable {MANIFEST} ({exc})") from None
    for i, (rel, want) in enumerate(sorted(files.items())):
        file = os.path.join(folder, rel)
        if not os.path.exists(file):
            raise CorruptCheckpointError(f"checkpoint {folder}: {rel} is missing")
        if int(want.get("rank", i)) % world != rank:
            continue
        size = os.path.getsize(file)
        if size != want["bytes"]:
            raise CorruptCheckpointError(f"checkpoint {folder}: {rel} has {size} bytes, the manifest says {want['bytes']} (truncated?)")
        if sha256_file(file) != want["sha256"]:
            raise CorruptCheckpointError(f"checkpoint {folder}: {rel} does not match its SHA-256 in the manifest (corrupted)")


def latest(root: str) -> Optional[str]:
    path = os.path.join(root, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(root, tag)) else None


def candidates(root: str) -> list[str]:
    """Tags to resume from, best first: ``latest``, then the other published checkpoints, newest first."""
    if not os.path.isdir(root):
        return []
    tags = sorted((t for t in os.listdir(root) if t.startswith("step") and os.path.isdir(os.path.join(root, t))),
                  reverse=True)
    first = latest(root)
    return ([first] if first else []) + [t for t in tags if t != first]


def resume_tag(root: str, rank: int = 0, world: int = 1, device: Any = "cpu", log: Callable[[str], Any] = print) -> Optional[str]:
    """The newest checkpoint whose files match their manifest; a damaged one is reported and
    skipped. Collective when a process group is up: rank 0's listing is used by all, every rank
    checks its share of the files (:func:`verify`) and the verdicts are combined.

    None when there is no checkpoint at all; a one-line RuntimeError when there are some but
    none is intact (starting over would silently lose the work they hold)."""
    tags = _from_rank0(candidates(root) if rank == 0 else None)
    problems = []
    for tag in tags:
        try:
            verify(os.path.join(root, tag), rank, world)
            mine = None
        except CorruptCheckpointError as exc:
            mine = str(exc)
        found = [p for p in gather_objects(mine) if p is not None]
        if not found:
            return tag
        problems.append(found[0])
        if rank == 0:
            log(f"warning: {found[0]}; trying the previous checkpoint")
    if tags:
        raise RuntimeError(f"no intact checkpoint in {root}: {'; '.join(problems)}")
    return None


def _space_problem(root: str) -> Optional[str]:
    """Why a new checkpoint would not fit on this rank's filesystem, judged by the size of the
    newest one (None: go ahead). The whole size is asked of every rank: on a shared filesystem
    all of it lands there, on node-local disks this is an upper bound."""
    tag = latest(root)
    if tag is None:
        return None
    need = sum(os.path.getsize(p) for p in _files(os.path.join(root, tag)))
    try:
        os.makedirs(root, exist_ok=True)
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return f"{root} is not usable ({exc})"
    if free < need * 1.05:
        return f"{free / 2**20:.1f} MiB free in {root}, the last checkpoint took {need / 2**20:.1f} MiB"
    return None




def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (small: file records, verdicts), in rank order."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _from_rank0(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _record(path: str, rank: int) -> dict[str, Any]:
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path), "rank": rank}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: str) -> None:
    """The directory entries of a checkpoint's files (the files were fsynced by their writers)."""
    for base, _, _ in os.walk(folder):
        _fsync_dir(base)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _files(folder: str) -> list[str]:
    out = []
    for base, _, names in os.walk(folder):
        out.extend(os.path.join(base, n) for n in names if n != MANIFEST)
    return out
