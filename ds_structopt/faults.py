"""Deliberate faults, for proving recovery on real processes (off unless ``DS_STRUCTOPT_FAULTS`` is set).

``DS_STRUCTOPT_FAULTS`` holds ``;``-separated faults, each ``kind:key=value,...`` with
``|`` between list items, e.g. ``kill:rank=1,step=7;nan:step=3|9;decomp:call=2|5``:

- ``kill:rank=R,step=S``       rank R SIGKILLs itself as optimizer step S begins;
- ``hang:rank=R,step=S``       rank R stops (SIGSTOP) there: alive but silent, the others must time out;
- ``kill_save:rank=R,step=S``  rank R SIGKILLs itself in the middle of writing checkpoint S;
- ``fill_disk:rank=R,step=S[,leave=K]``  rank R fills the checkpoint filesystem just after the
  free-space check of checkpoint S (as another job would), leaving K KiB (default 256), so the
  save itself runs out of space mid-write (``<output-dir>/fault-disk-filler``; delete it to recover);
- ``nan:step=S|...[,rank=R]``  the loss of step S is NaN (all ranks, or only rank R), so are its gradients;
- ``decomp:call=N|...``        the N-th SVD/eigh call of this process raises (1-based; ``every=K``: every K-th).

Nothing here runs unless the variable is set; the training entry point calls :func:`install`.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Optional

ENV = "DS_STRUCTOPT_FAULTS"


def parse(text: Optional[str]) -> dict[str, list[dict[str, list[int]]]]:
    """``kind -> [ {key: [ints]} ]``; a malformed spec is one ValueError line naming it."""
    faults: dict[str, list[dict[str, list[int]]]] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(";"))):
        kind, _, args = item.partition(":")
        if kind not in ("kill", "hang", "kill_save", "fill_disk", "nan", "decomp"):
            raise ValueError(f"{ENV}: unknown fault kind {kind!r} in {item!r}")
        spec: dict[str, list[int]] = {}
        for pair in filter(None, args.split(",")):
            key, _, value = pair.partition("=")
            try:
                spec[key.strip()] = [int(v) for v in value.split("|")]
            except ValueError:
                raise ValueError(f"{ENV}: {key!r} needs integers, got {value!r} in {item!r}") from None
        faults.setdefault(kind, []).append(spec)
    return faults


_FAULTS = parse(os.environ.get(ENV))


def active() -> bool:
    """Whether any fault is configured (the entry point warns loudly and records it)."""
    return bool(_FAULTS)


def _matches(spec: dict[str, list[int]], **values: int) -> bool:
    return all(key not in spec or value in spec[key] for key, value in values.items())


def _signal_self(kind: str, what: str, **where: int) -> None:
    """Send this process the fault's signal when a ``kind`` fault matches ``where``."""
    signum = signal.SIGSTOP if kind == "hang" else signal.SIGKILL
    if any(_matches(spec, **where) for spec in _FAULTS.get(kind, ())):
        print(f"[fault injection] {what}: {signal.Signals(signum).name}", flush=True)
        os.kill(os.getpid(), signum)


def at_step(step: int, rank: int) -> None:
    """Called as optimizer step ``step`` (1-based) begins."""
    _signal_self("kill", f"rank {rank} at step {step}", step=step, rank=rank)
    _signal_self("hang", f"rank {rank} hangs at step {step}", step=step, rank=rank)


def during_save(step: int, rank: int) -> None:
    """Called between writing a checkpoint's files and publishing it."""
    _signal_self("kill_save", f"rank {rank} while saving step {step}", step=step, rank=rank)


def after_space_check(step: int, rank: int, root: str) -> None:
    """Called when checkpoint ``step`` has passed the free-space check, before anything is written."""
    for spec in _FAULTS.get("fill_disk", ()):
        if not _matches(spec, step=step, rank=rank):
            continue
        leave = spec.get("leave", [256])[0] * 1024
        path = os.path.join(os.path.dirname(os.path.abspath(root)), "fault-disk-filler")
        print(f"[fault injection] rank {rank} fills the disk of {root} before checkpoint {step}", flush=True)
        with open(path, "ab", buffering=0) as f:
            block = b"\0" * (1 << 20)
            try:
                while f.write(block):
                    pass
            except OSError:  # full: give back a little, so only the big checkpoint files fail
                pass
            size = f.seek(0, os.SEEK_END)
            f.truncate(max(0, size - leave))


def poison_loss(step: int, rank: int) -> bool:
    """True when the loss of ``step`` should be made NaN on this rank."""
    return any(_matches(spec, step=step, rank=rank) for spec in _FAULTS.get("nan", ()))


def install() -> None:
    """Make the configured SVD/eigh calls fail (through the hooks ``optim.linalg`` keeps for this)."""
    specs = _FAULTS.get("decomp")
    if not specs:
        return
    from .optim import linalg

    calls = {"n": 0}

    def failing(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            n = calls["n"]
            for spec in specs:
                every = spec.get("every", [0])[0]
                if n in spec.get("call", ()) or (every and n % every == 0):
                    raise RuntimeError(f"[fault injection] decomposition call {n} failed")
            return real(*args, **kwargs)
        return call

    linalg._svd, linalg._eigh = failing(linalg._svd), failing(linalg._eigh)
