"""Checkpoints that reload at another data-parallel size (megatron dist-checkpointing + our state by name).

Megatron's sharded optimizer state assumes every state tensor is shaped like its
parameter; ours is not (bases, factors, rotated moments). So a checkpoint is:

- ``model/``: the model through megatron's ``dist_checkpointing`` (reshardable
  across DP and TP like any megatron checkpoint);
- ``optim/tp<t>_pp<p>_dp<d>.pt``: what data-parallel rank d owns, keyed by
  parameter name: our per-matrix state, megatron's Adam state and fp32 master
  weights (bf16/fp16). Any DP size can load it: each rank takes the names it
  owns now from the files of its (TP, PP) position. Loading needs the same TP
  and PP sizes (``tp_mode="gather"`` state is whole-matrix, but the elementwise
  shards are not);
- ``common.pt``: sizes, loss-scaler state and the caller's ``extra`` (iteration,
  scheduler, ...).

A checkpoint is written into ``iter_<n>.tmp`` and renamed to ``iter_<n>`` only
when every rank has finished, then ``latest`` is replaced: a crash mid-save
leaves the previous checkpoint as ``latest``. Files hold tensors and plain
containers only (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from ...checkpoint.safe_load import safe_load
from ...checkpoint.state_io import cpu_copy, to_device, write_text_atomic

FORMAT_VERSION = 1


def _module(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron's DDP / Float16Module wrappers (what dist-checkpointing saves)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def _positions() -> tuple[int, int, int, int]:
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(with_context_parallel=True),
            parallel_state.get_data_parallel_world_size(with_context_parallel=True))


def _main_param(p: torch.Tensor) -> torch.Tensor:
    """The fp32 tensor the optimizer updates for model param ``p`` (its master copy under bf16/fp16)."""
    return getattr(p, "main_param", p)


def _owned_state(optimizer: Any) -> dict[str, Any]:
    names, rank = optimizer.param_names, dist.get_rank(optimizer.dp_group)
    optimizer.structured.settle()
    items = optimizer.structured.work_items()  # builds the structured optimizer if no step ran yet
    inner = optimizer.structured.inner
    structured = {n: cpu_copy(inner.state[w]) for n, w in items if w in inner.state}
    elementwise: dict[str, Any] = {}
    for wrapper in optimizer.chained_optimizers[1:]:
        for p in optimizer.params_by_owner[rank]:
            main = _main_param(p)
            if main in wrapper.optimizer.state:
                elementwise[names[p]] = cpu_copy(wrapper.optimizer.state[main])
    masters = {names[p]: _main_param(p).detach().float().cpu().clone() for p in optimizer.params_by_owner[rank]}
    return {"version": FORMAT_VERSION, "structured": structured, "elementwise": elementwise, "masters": masters}


def save_checkpoint(directory: str, iteration: int, model_chunks: list[torch.nn.Module], optimizer: Any,
                    extra: Optional[dict[str, Any]] = None) -> str:
    """Write ``<directory>/iter_<iteration>`` on every rank (collective); returns its path."""
    final = os.path.join(directory, f"iter_{iteration:07d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "model"))
        os.makedirs(os.path.join(tmp, "optim"))
    dist.barrier()
    sharded = {f"model{i}": _module(c).sharded_state_dict() for i, c in enumerate(model_chunks)}
    dist_checkpointing.save(sharded, os.path.join(tmp, "model"))
    tp, pp, dp, dp_size = _positions()
    torch.save(_owned_state(optimizer), os.path.join(tmp, "optim", f"tp{tp:02d}_pp{pp:02d}_dp{dp:03d}.pt"))
    if dist.get_rank() == 0:
        scaler = optimizer.grad_scaler.state_dict() if optimizer.grad_scaler is not None else {}
        torch.save({"version": FORMAT_VERSION, "iteration": iteration, "dp_size": dp_size,
                    "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
                    "pp_size": parallel_state.get_pipeline_model_parallel_world_size(),
                    "grad_scaler": scaler, "extra": extra or {}}, os.path.join(tmp, "common.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(os.path.join(directory, "latest"), os.path.basename(final))
    dist.barrier()
    return final


def latest_checkpoint(directory: str) -> Optional[str]:
    """Path of the checkpoint ``latest`` names, or None when there is none yet."""
    marker = os.path.join(directory, "latest")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return os.path.join(directory, f.read().strip())


@torch.no_grad()
def load_checkpoint(path: str, model_chunks: list[torch.nn.Module], optimizer: Any) -> dict[str, Any]:
    """Restore model, optimizer state and fp32 masters (at any DP size); returns ``common.pt``'s dict."""
    if os.path.exists(os.path.join(path, "latest")):
        path = latest_checkpoint(path)
    common = safe_load(os.path.join(path, "common.pt"))
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if (common["tp_size"], common["pp_size"]) != (tp_size, pp_size):
        raise ValueError(f"checkpoint {path} was written with TP={common['tp_size']} PP={common['pp_size']}; "
                         f"this run has TP={tp_size} PP={pp_size} (only the data-parallel size may change)")
    for i, chunk in enumerate(model_chunks):
        module = _module(chunk)
        sharded = {f"model{i}": module.sharded_state_dict()}
        module.load_state_dict(dist_checkpointing.load(sharded, os.path.join(path, "model"))[f"model{i}"])

    tp, pp, _, _ = _positions()
    folder = os.path.join(path, "optim")
    mine = [f for f in sorted(os.listdir(folder)) if f.startswith(f"tp{tp:02d}_pp{pp:02d}_")]
    if len(mine) != common["dp_size"]:
        raise ValueError(f"checkpoint {path}: expected {common['dp_size']} optimizer files for tp{tp:02d}_pp{pp:02d}, found {mine}")
    saved: dict[str, dict[str, Any]] = {"structured": {}, "elementwise": {}, "masters": {}}
    for f in mine:
        part = safe_load(os.path.join(folder, f))
        for key in saved:
            saved[key].update(part[key])

    names, rank = optimizer.param_names, dist.get_rank(optimizer.dp_group)
    for p in optimizer.params_by_owner[rank]:
        name = names[p]
        if name not in saved["masters"]:
            raise ValueError(f"checkpoint {path} has no state for parameter '{name}'")
        main = _main_param(p)
        main.copy_(saved["masters"][name])
        if main is not p:
            p.copy_(main)
        for wrapper in optimizer.chained_optimizers[1:]:
            if name in saved["elementwise"] and any(main is q for g in wrapper.optimizer.param_groups for q in g["params"]):
                wrapper.optimizer.state[main] = to_device(saved["elementwise"][name], main.device)
    items = optimizer.structured.work_items()
    inner = optimizer.structured.inner
    for name, w in items:
        if name in saved["structured"]:
            inner.state[w] = to_device(saved["structured"][name], w.device)
    if optimizer.grad_scaler is not None and common["grad_scaler"]:
        optimizer.grad_scaler.load_state_dict(common["grad_scaler"])
    return common
