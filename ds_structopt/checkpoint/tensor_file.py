"""A file of nested tensors that is read by byte range, without pickle.

Layout: ``MAGIC``, an 8-byte little-endian header length, a JSON header, then
every tensor's raw bytes back to back. The header holds the nested structure
(dicts, lists, tuples, numbers, strings, dtypes) with each tensor replaced by
its dtype, shape and byte offset. So:

- loading runs no code from the file (there is no pickle to poison);
- a reader takes only what it needs: :meth:`TensorRef.read` reads one element
  range of one tensor straight into a new buffer (``readinto``), so a rank
  restoring its share holds that share and nothing else, at any world size;
- writing streams one tensor at a time to host memory (a GPU state is never
  copied to the host all at once), and the file is fsynced before it is renamed
  into place. A value that is not in memory (a state parked on NVMe,
  ``distributed.state_store.Parked``: anything with ``shape``, ``dtype`` and
  ``materialize()``) is read when its turn comes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Optional

import torch

MAGIC = b"DSSOTNS1"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64)}


@dataclass(frozen=True)
class TensorRef:
    """Where one saved tensor lives: read all of it, or a range of its flattened elements."""

    path: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, start: int = 0, numel: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the flattened tensor (all of it, shaped, by default),
        into ``out`` when given (a contiguous CPU tensor of this dtype and ``numel`` elements: no
        staging copy)."""
        whole = numel is None and out is None
        numel = (self.numel - start if out is None else out.numel()) if numel is None else numel
        if start < 0 or numel < 0 or start + numel > self.numel:
            raise ValueError(f"{self.path}: range [{start}, {start + numel}) outside a tensor of {self.numel} elements")
        if out is None:
            out = torch.empty(numel, dtype=self.dtype)
        elif out.dtype != self.dtype or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != numel:
            raise ValueError(f"{self.path}: cannot read {numel} {self.dtype} elements into {out.dtype} {tuple(out.shape)} "
                             f"on {out.device}")
        if numel:
            size = out.element_size()
            view = memoryview(out.view(torch.uint8).numpy()).cast("B")
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset + start * size)
                done = 0
                while done < len(view):
                    got = f.readinto(view[done:])
                    if not got:
                        raise ValueError(f"{self.path} ends before its tensor data (truncated?)")
                    done += got
        return out.reshape(self.shape) if whole else out


def write(path: str, tree: Any) -> int:
    """Write ``tree`` to ``path`` (temporary name, fsync, rename); returns the bytes written."""
    tensors: list[Any] = []
    skeleton = _encode(tree, tensors, "state")
    specs, offset = [], 0
    for t in tensors:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        specs.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset})
        offset += nbytes
    header = json.dumps({"tree": skeleton, "tensors": specs}).encode()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        for t in tensors:
            if math.prod(t.shape):
                t = t if isinstance(t, torch.Tensor) else t.materialize()
                host = t.detach().to("cpu").contiguous().reshape(-1)
                f.write(memoryview(host.view(torch.uint8).numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    return size


def read(path: str) -> Any:
    """The saved structure with every tensor as a :class:`TensorRef` (only the header is read)."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{path} is not a ds_structopt tensor file (bad magic)")
        (length,) = struct.unpack("<Q", head[len(MAGIC):])
        raw = f.read(length)
    if len(raw) != length:
        raise ValueError(f"{path}: header cut short (truncated?)")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable header ({exc})") from None
    base = len(MAGIC) + 8 + length
    refs = [TensorRef(path, base + int(s["offset"]), _dtype(path, s["dtype"]), tuple(int(d) for d in s["shape"]))
            for s in header["tensors"]]
    return _decode(header["tree"], refs)


def is_tensor_file(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _dtype(path: str, name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{path}: unsupported tensor dtype {name!r}")
    return _DTYPES[name]


def _deferred(value: Any) -> bool:
    """A tensor kept elsewhere until written (see the module's docstring)."""
    return all(hasattr(value, a) for a in ("shape", "dtype", "materialize")) and isinstance(value.dtype, torch.dtype)


def _encode(value: Any, tensors: list[Any], where: str) -> Any:
    if isinstance(value, torch.Tensor) or _deferred(value):
        if str(value.dtype).removeprefix("torch.") not in _DTYPES:
            raise TypeError(f"cannot save {where}: dtype {value.dtype} is not supported")
        tensors.append(value)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save {where}: {type(value).__name__} is not a tensor, number, string or container")


def _decode(value: Any, refs: list[TensorRef]) -> Any:
    if isinstance(value, list):
        return [_decode(v, refs) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return refs[value["__tensor__"]]
    if "__dtype__" in value:
        return _DTYPES[value["__dtype__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, refs) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, refs): _decode(v, refs) for k, v in value["__items__"]}
    return {k: _decode(v, refs) for k, v in value["__dict__"].items()}
