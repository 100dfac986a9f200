"""Full IEEE fp32 matmuls inside our math, whatever precision the user picked for the model.

Users often enable TF32 (``torch.backends.cuda.matmul.allow_tf32 = True`` or
``torch.set_float32_matmul_precision("high")``): fine for a forward pass, but
it leaves 10 mantissa bits to Gram products, rotations P^T G Q, V^{-1/2} M and
the Newton-Schulz iteration, whose errors compound over steps (an orthogonal
basis stops being orthogonal, Newton-Schulz stalls). :func:`full_fp32_matmul`
pins fp32 matmuls to "highest" around our code and restores the user's setting.

The setting is process-global (one ``at::Context``), and the refresh-ahead worker
thread computes while the main thread runs, so a lock and a depth counter make
it shared: pinned while any thread is inside, restored when the last one leaves.
While a background decomposition is running, the user's own fp32 matmuls on other
threads therefore run at full precision too (slower, never less accurate), and a
``torch.compile``d forward started then sees ``allow_tf32`` off: dynamo's global-state
guard includes it, so that forward recompiles (once per state).

torch >= 2.9 keeps two views of the setting: the legacy one
(``set_float32_matmul_precision``, ``allow_tf32``) and per-backend
``fp32_precision`` values (generic -> cuda/mkldnn -> matmul; a ``"none"`` leaf
inherits from its parent). The legacy setter writes the two matmul leaves; a
leaf setter does not update the legacy value, and reading the legacy value
raises once the two views disagree (e.g. after the user set only
``torch.backends.cuda.matmul.fp32_precision = "tf32"``). So we snapshot the two
leaves, set them to "ieee" (consistent with any legacy value, so it reads back),
read the legacy value, and pin through the legacy setter (both views agree);
on exit we restore the legacy value, then the leaves. A restored leaf whose
value equals its parent's is set back to ``"none"`` (inherit), which is what it
was unless the user had set it explicitly to the same value as its parent.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch

# (backend, op) leaves the legacy setter writes, each with the parent it inherits from.
_LEAVES = ((("cuda", "matmul"), ("cuda", "all")), (("mkldnn", "matmul"), ("mkldnn", "all")))
_HAS_LEAVES = hasattr(torch._C, "_get_fp32_precision_getter") and hasattr(torch._C, "_set_fp32_precision_setter")

_lock = threading.Lock()
_depth = 0
_saved: Optional[tuple[str, Optional[dict[tuple[str, str], str]]]] = None  # None: nothing to restore


def _get(backend: str, op: str) -> str:
    return torch._C._get_fp32_precision_getter(backend, op)


def _set(backend: str, op: str, value: str) -> None:
    torch._C._set_fp32_precision_setter(backend, op, value)


def _pin() -> Optional[tuple[str, Optional[dict[tuple[str, str], str]]]]:
    """Set full fp32 matmuls; returns what to restore (None: already full precision, nothing changed)."""
    if not _HAS_LEAVES:
        legacy = torch.get_float32_matmul_precision()
        if legacy == "highest":
            return None
        torch.set_float32_matmul_precision("highest")
        return legacy, None
    leaves = {leaf: _get(*leaf) for leaf, _ in _LEAVES}
    if all(value in ("none", "ieee") for value in leaves.values()):
        try:
            if torch.get_float32_matmul_precision() == "highest":
                return None
        except RuntimeError:  # the views disagree; handled below
            pass
    parents = {leaf: _get(*parent) for leaf, parent in _LEAVES}
    try:
        for leaf in leaves:
            _set(*leaf, "ieee")
        legacy = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
    except BaseException:
        for leaf, value in leaves.items():  # leave the user's setting as it was
            _set(*leaf, "none" if value == parents[leaf] else value)
        raise
    return legacy, {leaf: ("none" if value == parents[leaf] else value) for leaf, value in leaves.items()}


def _restore(saved: Optional[tuple[str, Optional[dict[tuple[str, str], str]]]]) -> None:
    if saved is None:
        return
    legacy, leaves = saved
    torch.set_float32_matmul_precision(legacy)
    for leaf, value in (leaves or {}).items():
        _set(*leaf, value)


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls in full IEEE precision inside (thread-safe, nestable); the user's setting after."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = _pin()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                saved, _saved = _saved, None
                _restore(saved)
