"""Name-keyed optimizer state next to DeepSpeed's checkpoints, loadable at any world size.

DeepSpeed's ZeRO checkpoints store flat partitions tied to the world size that
wrote them. We write, per rank, ``<dir>/<tag>/ds_structopt/rank<r>.tensors``
with everything keyed by parameter name: the owned matrices' whole states, the
elementwise (AdamW) state and the fp32 master values of the pieces this rank
holds, each with its range in the flattened parameter (``tensor_file``: a JSON
header and raw bytes, no pickle).

Loading reads only what this rank needs now: its own file when the world size
and layout are unchanged, otherwise the headers of every file (the index by
name) and then just the element ranges of its new pieces and the states of the
matrices it now owns. So 2 -> 1, 2 -> 4, 1 -> 2 continue the same trajectory,
and a rank's host memory at resume is its own share, not the checkpoint.
Files of format 1 and 2 (``torch.save`` of the same structure) still load.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, Optional

import torch

from ..distributed.optimizer import DistributedStructuredOptimizer
from . import tensor_file
from .safe_load import UnsafeCheckpointError, safe_load  # noqa: F401 (re-exported)
from .state_io import write_text_atomic

SUBDIR = "ds_structopt"
# 2: param groups' hyperparameters (LR as the scheduler left it); 3: tensor files read by range,
# each naming the matrices its rank owned (so a resume at the same layout reads one file);
# 4: meta.json records every parameter's shape (``consolidated``)
FORMAT_VERSION = 4
_RANK_FILE = re.compile(r"^rank(\d+)\.(tensors|pt)$")


def rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, SUBDIR, f"rank{rank:05d}.tensors")


def local_state(opt: DistributedStructuredOptimizer) -> dict[str, Any]:
    """This rank's share, by name: owned matrix states, elementwise pieces, fp32 master pieces.
    Tensors are the live ones (written out at once by :func:`save`, one at a time)."""
    opt.math.settle()  # decompositions running ahead land in the states they belong to
    elements: dict[str, list[dict[str, Any]]] = {}
    masters: dict[str, list[dict[str, Any]]] = {}
    for e in opt.entries_with_pieces():
        for piece in e.pieces:
            masters.setdefault(e.name, []).append({"start": piece.start, "value": piece.param.detach().float()})
            st = opt.elem_state.get(f"{e.name}#{piece.start}")
            if not e.is_matrix and st:
                elements.setdefault(e.name, []).append({"start": piece.start, "state": dict(st)})
    return {
        "version": FORMAT_VERSION,
        "world_size": opt.world,
        "rank": opt.rank,
        "owned": sorted(_owned(opt)),
        "matrix_state": dict(opt.matrix_state),
        "elements": elements,
        "masters": masters,
        # groups' values as the scheduler left them: DeepSpeed's own optimizer state is not loaded
        # (tied to the saving world size), so without these a resume would restart the LR schedule
        "hyperparams": opt.hyperparams(),
    }


def save(opt: DistributedStructuredOptimizer, directory: str) -> list[str]:
    """Write this rank's file (fsynced, then renamed into place); rank 0 adds meta.json. Returns
    the files this rank wrote."""
    path = rank_file(directory, opt.rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensor_file.write(path, local_state(opt))
    if opt.rank != 0:
        return [path]
    meta = os.path.join(directory, SUBDIR, "meta.json")
    shapes = {e.name: list(e.shape) for entries in opt.entries for e in entries}  # for consolidated()
    write_text_atomic(meta, json.dumps({"version": FORMAT_VERSION, "world_size": opt.world, "optimizer": opt.math.NAME,
                                        "shapes": shapes}))
    return [path, meta]


def consolidated(directory: str) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 value by name, assembled from all ranks' master pieces (what
    DeepSpeed's ``zero_to_fp32.py`` gives from its own partitions, which we do not write):
    ``model.load_state_dict(consolidated(ckpt), strict=False)``. Needs the whole model in host
    memory, like that script."""
    meta = saved_meta(directory)
    if meta is None or "shapes" not in meta:
        raise ValueError(f"checkpoint {directory}: no {SUBDIR}/meta.json with parameter shapes "
                         "(written by an older ds_structopt)")
    folder = os.path.join(directory, SUBDIR)
    saved = _Saved(directory, [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if _RANK_FILE.match(f)])
    out = {}
    for name, shape in meta["shapes"].items():
        whole = _WholeParam(math.prod(int(d) for d in shape))
        out[name] = saved._range(saved.masters.get(name, []), lambda item: item["value"], whole, name).reshape(shape)
    return out


class _WholeParam:
    """A parameter's full element range, for :meth:`_Saved._range`."""

    def __init__(self, numel: int) -> None:
        self.start, self.numel = 0, numel


def saved_meta(directory: str) -> Optional[dict[str, Any]]:
    """meta.json of the checkpoint in ``directory`` (None if it has no ds_structopt state)."""
    meta = os.path.join(directory, SUBDIR, "meta.json")
    if not os.path.exists(meta):
        return None
    with open(meta) as f:
        return json.load(f)


def saved_world_size(directory: str) -> Optional[int]:
    """World size that wrote the checkpoint in ``directory`` (None if it has no ds_structopt state)."""
    meta = saved_meta(directory)
    return None if meta is None else int(meta["world_size"])


@torch.no_grad()
def load(opt: DistributedStructuredOptimizer, directory: str) -> None:
    """Restore our state (and fp32 masters) for this rank's current pieces and owned matrices."""
    folder = os.path.join(directory, SUBDIR)
    meta = saved_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"checkpoint {directory} has no {SUBDIR}/meta.json (written without ds_structopt?)")
    if meta.get("optimizer", opt.math.NAME) != opt.math.NAME:
        raise ValueError(f"checkpoint {directory} holds {meta['optimizer']} state; this run's optimizer is "
                         f"{opt.math.NAME} (optimizer.type changed: start a new run or keep the type)")
    files = {int(m.group(1)): os.path.join(folder, f) for f in os.listdir(folder) if (m := _RANK_FILE.match(f))}
    world = int(meta["world_size"])
    if sorted(files) != list(range(world)):
        raise ValueError(f"checkpoint {directory}: expected one {SUBDIR} file per saving rank (0..{world - 1}), "
                         f"found ranks {sorted(files)}")
    saved = None
    if world == opt.world:  # same layout: this rank's own file holds everything it needs
        saved = _Saved(directory, [files[opt.rank]])
        if not saved.serves(opt):
            saved = None
    if saved is None:
        saved = _Saved(directory, [files[r] for r in sorted(files)])
    saved.restore(opt)


class _Saved:
    """The saved state of some rank files, merged by name; tensors are read on demand."""

    def __init__(self, directory: str, paths: list[str]) -> None:
        self.directory = directory
        self.matrix: dict[str, Any] = {}
        self.elements: dict[str, list[dict[str, Any]]] = {}
        self.masters: dict[str, list[dict[str, Any]]] = {}
        self.owned: Optional[set[str]] = set()
        self.hyperparams = None
        for path in paths:
            tree = _read(path)
            self.matrix.update(tree["matrix_state"])
            for name, items in tree["elements"].items():
                self.elements.setdefault(name, []).extend(items)
            for name, items in tree["masters"].items():
                self.masters.setdefault(name, []).extend(items)
            self.owned = None if "owned" not in tree or self.owned is None else self.owned | set(tree["owned"])
            if self.hyperparams is None:
                self.hyperparams = tree.get("hyperparams")  # format 1 has none: the groups keep their values

    def serves(self, opt: DistributedStructuredOptimizer) -> bool:
        """Whether these files hold all of this rank's pieces and exactly the matrices it owns."""
        if self.owned is None or self.owned != _owned(opt):
            return False
        return all(_covered(self.masters.get(e.name, []), piece.start, piece.numel)
                   for e in opt.entries_with_pieces() for piece in e.pieces)

    def restore(self, opt: DistributedStructuredOptimizer) -> None:
        if self.hyperparams is not None:
            opt.load_hyperparams(self.hyperparams)
        opt.matrix_state.clear()
        opt.elem_state.clear()
        device = opt.compute_device
        for e in opt.entries_with_pieces():
            if e.is_matrix and opt.owners[e.name] == opt.rank and e.name in self.matrix:
                opt.matrix_state[e.name] = _materialize(self.matrix[e.name], device)
                opt.park_states([e.name])  # offloaded to NVMe: one matrix in memory at a time
            for piece in e.pieces:
                if e.name not in self.masters:
                    raise ValueError(f"checkpoint {self.directory} has no saved values for parameter {e.name!r} "
                                     "(was the model changed?)")
                self._range(self.masters[e.name], lambda item: item["value"], piece, e.name, into=piece.param)
                if not e.is_matrix and e.name in self.elements:
                    opt.elem_state[f"{e.name}#{piece.start}"] = self._elem_state(self.elements[e.name], piece, e.name)
                    opt.park_states([f"{e.name}#{piece.start}"])

    def _range(self, items: list[dict[str, Any]], value: Callable[[dict[str, Any]], Any], piece: Any,
               name: str, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements ``[piece.start, piece.start + piece.numel)`` of a flattened parameter's saved
        pieces, reading only the overlapping ranges (straight into ``into`` where it is a
        contiguous CPU tensor of the saved dtype: no staging buffer)."""
        start, end = piece.start, piece.start + piece.numel
        if piece.numel == 0:
            return torch.empty(0)
        if not _covered(items, start, piece.numel, value):  # checked first: nothing is overwritten then
            raise ValueError(f"checkpoint {self.directory}: saved pieces of {name!r} do not cover its elements "
                             f"[{start}, {end}) (files missing or from another model)")
        out: Optional[torch.Tensor] = None
        pos = start
        for item in sorted(items, key=lambda it: it["start"]):
            src = value(item)
            lo, hi = max(pos, item["start"]), min(end, item["start"] + _numel(src))
            if lo >= hi:
                continue
            if item["start"] > pos:
                break  # a gap
            if out is None:
                direct = (into is not None and into.device.type == "cpu" and into.is_contiguous()
                          and into.dtype == _dtype(src))
                out = into.view(-1) if direct else torch.empty(piece.numel, dtype=_dtype(src))
            target = out[lo - start: hi - start]
            if isinstance(src, tensor_file.TensorRef):
                src.read(lo - item["start"], hi - lo, out=target)
            else:
                target.copy_(src.reshape(-1).narrow(0, lo - item["start"], hi - lo))
            pos = hi
        if out is not None and into is not None and out.data_ptr() != into.data_ptr():
            into.view(-1).copy_(out)  # another device or dtype: one piece staged on the host
        assert out is not None and pos >= end
        return out

    def _elem_state(self, items: list[dict[str, Any]], piece: Any, name: str) -> dict[str, Any]:
        """The elementwise state of one new piece, cut out of the saved pieces of the same parameter."""
        device = piece.param.device
        out: dict[str, Any] = {}
        for key, val in items[0]["state"].items():
            if _is_tensorish(val) and len(_shape(val)) == 1:
                out[key] = self._range(items, lambda item, k=key: item["state"][k], piece, name).to(device)
            else:
                out[key] = _materialize(val, device)
        return out


def _owned(opt: DistributedStructuredOptimizer) -> set[str]:
    return {name for name, owner in opt.owners.items() if owner == opt.rank}


def _read(path: str) -> dict[str, Any]:
    """One rank file: a tensor file (format 3) or a tensors-only torch file (formats 1, 2), version checked."""
    tree = tensor_file.read(path) if tensor_file.is_tensor_file(path) else safe_load(path, mmap=True)
    version = tree.get("version") if isinstance(tree, dict) else None
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version!r}; this ds_structopt reads versions "
                         f"1..{FORMAT_VERSION} (written by a newer release?)")
    return tree


def _is_tensorish(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, tensor_file.TensorRef))


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def _numel(value: Any) -> int:
    return value.numel if isinstance(value, tensor_file.TensorRef) else value.numel()


def _dtype(value: Any) -> torch.dtype:
    return value.dtype


def _materialize(value: Any, device: torch.device) -> Any:
    """Saved state with every tensor read and placed on ``device`` (nested ones too: left on the
    CPU they would meet the GPU moments in the next step's math)."""
    if isinstance(value, tensor_file.TensorRef):
        return value.read().to(device)
    if isinstance(value, torch.Tensor):
        return value.to(device).clone() if value.device == torch.device(device) else value.to(device)
    if isinstance(value, dict):
        return {k: _materialize(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v, device) for v in value)
    return value


def _covered(items: list[dict[str, Any]], start: int, numel: int,
             value: Callable[[dict[str, Any]], Any] = lambda item: item["value"]) -> bool:
    """Whether the saved pieces ``items`` hold every element of ``[start, start + numel)``."""
    pos, end = start, start + numel
    for item in sorted(items, key=lambda it: it["start"]):
        if item["start"] > pos:
            break
        pos = max(pos, min(end, item["start"] + _numel(value(item))))
    return pos >= end
