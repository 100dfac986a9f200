"""Make fake CUDA tensors usable through the Python methods a CPU-only torch build guards.

On torch 2.13.0+cpu, FakeTensorMode creates ``device="cuda"`` tensors and most ops on
them work, but a few Python bindings open a CUDA device guard *before* dispatch and
fail with "PyTorch is not linked with support for cuda devices" (``Tensor.copy_``,
``Tensor.contiguous``, ``Tensor.to`` onto CUDA, indexing ``t[a:b]``, ``t[i]``,
``t[mask] = v``, ...). :class:`DispatchingMethods`, a TorchFunctionMode (it runs before
the binding's guard), retries such a call through the ATen op of the same name
(``torch.ops.aten.<name>``; indexing through select/slice/index): same semantics, no
guard, and the fake mode sees it. ``pin_memory`` returns the tensor itself (fake tensors have no
host pages to lock; the fake mode has no implementation of it). Nothing of ds_structopt is replaced.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


def _basic_index(self: torch.Tensor, index: Any) -> torch.Tensor:
    """Ints, slices, Ellipsis and None through aten.select/slice/unsqueeze; tensors through aten.index."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) for i in items):
        return aten.index.Tensor(self, [i if isinstance(i, torch.Tensor) else None for i in items])
    out, dim = self, 0
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = self.dim() - sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:at] + (slice(None),) * fill + items[at + 1:]
    for i in items:
        if i is None:
            out = aten.unsqueeze.default(out, dim)
            dim += 1
        elif isinstance(i, int):
            out = aten.select.int(out, dim, i)
        elif isinstance(i, slice):
            out = aten.slice.Tensor(out, dim, i.start, i.stop, i.step or 1)
            dim += 1
        else:
            raise TypeError(f"simulated indexing does not handle {type(i).__name__}")
    return out


def _setitem(self: torch.Tensor, index: Any, value: Any) -> None:
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) for i in items):
        value = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=self.dtype, device=self.device)
        aten.index_put_.default(self, [i if isinstance(i, torch.Tensor) else None for i in items], value)
    else:
        target = _basic_index(self, index)
        if isinstance(value, torch.Tensor):
            aten.copy_.default(target, value)
        else:
            aten.fill_.Scalar(target, value)


def _to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    device = self.device if device is None else torch.device(device)
    dtype = self.dtype if dtype is None else dtype
    if device == self.device and dtype == self.dtype and not kwargs.get("copy", False):
        return self
    return aten._to_copy.default(self, dtype=dtype, device=device, non_blocking=non_blocking)


_ALIASES = {"__invert__": "bitwise_not", "__and__": "bitwise_and", "__or__": "bitwise_or",
            "__xor__": "bitwise_xor", "__neg__": "neg"}
_SPECIAL = {"__getitem__": _basic_index, "__setitem__": _setitem, "to": _to}


class DispatchingMethods(TorchFunctionMode):
    """Retries a call that a CPU build's CUDA guard refused through the same ATen op."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "pin_memory":  # fake tensors have no host pages to lock
            return args[0]
        try:
            return func(*args, **kwargs)
        except RuntimeError as exc:
            if "not linked with support for cuda" not in str(exc):
                raise
            name = getattr(func, "__name__", "")
            if name in _SPECIAL:
                return _SPECIAL[name](*args, **kwargs)
            dunder = name.startswith("__") and name.endswith("__")
            op = getattr(aten, _ALIASES.get(name, name[2:-2] if dunder else name), None)  # copy_ stays in place
            if op is None:
                raise
            return op(*args, **kwargs)
