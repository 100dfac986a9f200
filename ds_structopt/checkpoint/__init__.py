"""Name-keyed optimizer state next to DeepSpeed's checkpoints, loadable at any world size.

DeepSpeed's ZeRO checkpoints store flat partitions tied to the world size that
wrote them. We write, per rank, ``<dir>/<tag>/ds_structopt/rank<r>.pt`` with
everything keyed by parameter name: the owned matrices' whole states, the
elementwise (AdamW) state and the fp32 master values of the pieces this rank
holds, each with its range in the flattened parameter. Loading reads every
rank's file and takes what the new layout needs, so 2 -> 1, 2 -> 4, 1 -> 2 all
continue the same trajectory. Files are written to a temporary name and
renamed, and hold only tensors and plain containers (``torch.load(...,
weights_only=True)`` reads them).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..zero.optimizer import DistributedStructuredOptimizer
from .safe_load import UnsafeCheckpointError, safe_load  # noqa: F401 (re-exported)
from .state_io import cpu_copy, to_device, write_text_atomic

SUBDIR = "ds_structopt"
FORMAT_VERSION = 2  # 2: param groups' hyperparameters (LR as the scheduler left it)


def _rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, SUBDIR, f"rank{rank:05d}.pt")


def local_state(opt: DistributedStructuredOptimizer) -> dict[str, Any]:
    """This rank's share, by name: owned matrix states, elementwise pieces, fp32 master pieces."""
    opt.math.settle()  # decompositions running ahead land in the states they belong to
    elements: dict[str, list[dict[str, Any]]] = {}
    masters: dict[str, list[dict[str, Any]]] = {}
    for e in opt.entries_with_pieces():
        for piece in e.pieces:
            masters.setdefault(e.name, []).append({"start": piece.start, "value": piece.param.detach().float().clone()})
            st = opt.elem_state.get(f"{e.name}#{piece.start}")
            if not e.is_matrix and st:
                elements.setdefault(e.name, []).append({"start": piece.start, "state": cpu_copy(st)})
    return {
        "version": FORMAT_VERSION,
        "world_size": opt.world,
        "matrix_state": {name: cpu_copy(st) for name, st in opt.matrix_state.items()},
        "elements": elements,
        "masters": masters,
        # groups' values as the scheduler left them: DeepSpeed's own optimizer state is not loaded
        # (tied to the saving world size), so without these a resume would restart the LR schedule
        "hyperparams": opt.hyperparams(),
    }


def save(opt: DistributedStructuredOptimizer, directory: str) -> None:
    """Write this rank's file atomically (temporary name, then rename); rank 0 adds meta.json."""
    path = _rank_file(directory, opt.rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(local_state(opt), tmp)
    os.replace(tmp, path)
    if opt.rank == 0:
        write_text_atomic(os.path.join(directory, SUBDIR, "meta.json"),
                          json.dumps({"version": FORMAT_VERSION, "world_size": opt.world, "optimizer": opt.math.NAME}))


def saved_world_size(directory: str) -> Optional[int]:
    """World size that wrote the checkpoint in ``directory`` (None if it has no ds_structopt state)."""
    meta = os.path.join(directory, SUBDIR, "meta.json")
    if not os.path.exists(meta):
        return None
    with open(meta) as f:
        return int(json.load(f)["world_size"])


@torch.no_grad()
def load(opt: DistributedStructuredOptimizer, directory: str) -> None:
    """Restore our state (and fp32 masters) from every rank's file, whatever the world size then."""
    folder = os.path.join(directory, SUBDIR)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint {directory} has no {SUBDIR}/ optimizer state (written without ds_structopt?)")
    files = sorted(f for f in os.listdir(folder) if f.startswith("rank") and f.endswith(".pt"))
    saved = [safe_load(os.path.join(folder, f)) for f in files]
    for f, s in zip(files, saved):
        version = s.get("version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ValueError(f"checkpoint {directory}: {SUBDIR}/{f} has format version {version!r}; this "
                             f"ds_structopt reads versions 1..{FORMAT_VERSION} (written by a newer release?)")
    world = {s["world_size"] for s in saved}
    if len(world) != 1 or len(saved) != world.pop():
        raise ValueError(f"checkpoint {directory}: expected one {SUBDIR} file per saving rank, found {files}")
    matrix_state: dict[str, dict[str, Any]] = {}
    elements: dict[str, list[dict[str, Any]]] = {}
    masters: dict[str, list[dict[str, Any]]] = {}
    for s in saved:
        matrix_state.update(s["matrix_state"])
        for name, items in s["elements"].items():
            elements.setdefault(name, []).extend(items)
        for name, items in s["masters"].items():
            masters.setdefault(name, []).extend(items)

    hyperparams = saved[0].get("hyperparams")  # format 1 has none: the groups keep their current values
    if hyperparams is not None:
        opt.load_hyperparams(hyperparams)
    opt.matrix_state.clear()
    opt.elem_state.clear()
    for e in opt.entries_with_pieces():
        if e.is_matrix and opt.owners[e.name] == opt.rank and e.name in matrix_state:
            opt.matrix_state[e.name] = to_device(matrix_state[e.name], opt.compute_device)
        full_master = _assemble(masters.get(e.name, []), lambda item: item["value"], e)
        for piece in e.pieces:
            if full_master is not None:
                piece.param.copy_(full_master.narrow(0, piece.start, piece.numel))
            if not e.is_matrix and e.name in elements:
                opt.elem_state[f"{e.name}#{piece.start}"] = _slice_state(elements[e.name], e, piece)


def _assemble(items: list[dict[str, Any]], value, e) -> Optional[torch.Tensor]:
    if not items:
        return None
    numel = 1
    for d in e.shape:
        numel *= int(d)
    full = torch.zeros(numel, dtype=torch.float32)
    for item in items:
        v = value(item).reshape(-1)
        full.narrow(0, item["start"], v.numel()).copy_(v)
    return full


def _slice_state(items: list[dict[str, Any]], e, piece) -> dict[str, Any]:
    """The elementwise state of one new piece, cut out of the saved pieces of the same parameter."""
    first = items[0]["state"]
    out: dict[str, Any] = {}
    for key, val in first.items():
        if isinstance(val, torch.Tensor) and val.dim() == 1:
            full = _assemble(items, lambda item, k=key: item["state"][k], e)
            out[key] = full.narrow(0, piece.start, piece.numel).clone().to(piece.param.device)
        else:
            out[key] = val
    return out


def wrap_engine_checkpointing(engine: Any, opt: DistributedStructuredOptimizer) -> None:
    """Make ``engine.save_checkpoint``/``load_checkpoint`` also save/restore our name-keyed state."""
    ds_save, ds_load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir: str, tag: Optional[str] = None, *args: Any, **kwargs: Any) -> Any:
        tag = tag if tag is not None else f"global_step{engine.global_steps}"
        result = ds_save(save_dir, tag, *args, **kwargs)
        save(opt, os.path.join(save_dir, str(tag)))
        if dist.is_initialized():
            dist.barrier()
        return result

    def load_checkpoint(load_dir: str, tag: Optional[str] = None, *args: Any, load_optimizer_states: bool = True,
                        **kwargs: Any) -> Any:
        if engine.zero_optimization_stage() == 3:
            resolved = tag
            if resolved is None and os.path.exists(os.path.join(load_dir, "latest")):
                with open(os.path.join(load_dir, "latest")) as f:
                    resolved = f.read().strip()
            written_by = saved_world_size(os.path.join(load_dir, str(resolved))) if resolved is not None else None
            if written_by is not None and written_by != opt.world:
                return _load_zero3_resharded(engine, opt, os.path.join(load_dir, str(resolved)), **kwargs)
        # DeepSpeed's own optimizer partitions are tied to the saving world size: rebuild them
        # from the module weights, then restore exact fp32 masters and our state by name.
        path, client_state = ds_load(load_dir, tag, *args, load_optimizer_states=False, **kwargs)
        if path is not None and load_optimizer_states:
            load(opt, os.path.dirname(path) if os.path.isfile(path) else path)
        return path, client_state

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


# Keys of DeepSpeed's model-states file that are DeepSpeed's own, not the user's client_state.
_DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
            "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
            "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
            "ds_version"}


@torch.no_grad()
def _load_zero3_resharded(engine: Any, opt: DistributedStructuredOptimizer, directory: str,
                          load_lr_scheduler_states: bool = True, **_: Any) -> tuple[str, dict[str, Any]]:
    """ZeRO-3 at a new world size: DeepSpeed's module files are per rank and cannot be re-cut, but our
    files hold every parameter's fp32 value by name, so weights, masters and state all come from them;
    step counters, LR scheduler and client state come from rank 0's model-states file."""
    states = os.path.join(directory, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    ckpt = torch.load(states, map_location="cpu", weights_only=False)
    load(opt, directory)
    for e in opt.entries_with_pieces():
        for piece in e.pieces:  # the model's own shard (bf16 or fp32) from the restored fp32 master
            e.lp.ds_tensor.view(-1).narrow(0, 0, piece.numel).copy_(piece.param)
    if load_lr_scheduler_states and engine.lr_scheduler is not None and ckpt.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    engine.global_steps = ckpt["global_steps"]
    engine.global_samples = ckpt.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = ckpt["skipped_steps"]
    return states, {k: v for k, v in ckpt.items() if k not in _DS_KEYS}
