"""Our state inside ``engine.save_checkpoint``/``load_checkpoint`` of a DeepSpeed engine.

- Saving writes DeepSpeed's files through :class:`SafeCheckpointEngine`: every file is
  fsynced, and a write that fails (disk full, I/O error) is recorded instead of raised,
  so the failing rank still walks through DeepSpeed's own barriers with the others
  (raising there would leave them waiting in a collective the failing rank never
  joins). After the write every rank learns whether any rank failed, and all of them
  raise :class:`CheckpointWriteError` together; ``latest`` is only written after that.
- DeepSpeed's fp32 optimizer partitions (``*_optim_states.pt``) are not written: they
  are tied to the saving world size and never read back; our files hold the fp32
  masters and every optimizer state by name.
- Loading reads DeepSpeed's files with ``weights_only=True`` (a poisoned checkpoint
  is refused in one line before any of it runs). At ZeRO-1/2 DeepSpeed restores the
  module, scheduler and client state, then we restore masters and state by name; at
  ZeRO-3 (whose DeepSpeed files are per rank and cannot be re-cut) weights, masters
  and state all come from our files, the rest from rank 0's model-states file of the
  tag asked for.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..checkpoint.safe_load import safe_load
from ..checkpoint.state_io import write_text_atomic
from ..comm import any_rank
from ..distributed.optimizer import DistributedStructuredOptimizer


class CheckpointWriteError(OSError):
    """A checkpoint could not be written on some rank (raised on every rank together)."""


def _engine_base() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return TorchCheckpointEngine


class SafeCheckpointEngine(_engine_base()):  # type: ignore[misc]
    """DeepSpeed's torch checkpoint engine with fsynced writes that record failures instead of
    raising them mid-collective, and ``weights_only`` loads."""

    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self.begin()

    def begin(self) -> None:
        self.written: list[str] = []
        self.error: Optional[BaseException] = None

    def save(self, state_dict: Any, path: str) -> None:
        if self.error is not None:  # one failure spoils the checkpoint: do not write the rest
            return
        try:
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
                f.flush()
                os.fsync(f.fileno())
            self.written.append(path)
        except (OSError, RuntimeError) as exc:  # RuntimeError: torch's zip writer reports ENOSPC as one
            self.error = type(exc)(f"writing {os.path.basename(path)}: {exc}")
            try:
                os.remove(path)
            except OSError:
                pass

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location if map_location is not None else "cpu")


def wrap_engine_checkpointing(engine: Any, opt: DistributedStructuredOptimizer) -> None:
    """Make ``engine.save_checkpoint``/``load_checkpoint`` also save/restore our name-keyed state."""
    from ..checkpoint import load, save
    from .deepspeed import partitions_in_memory

    if type(engine.checkpoint_engine) is _engine_base():
        engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    writer = engine.checkpoint_engine
    engine.save_zero_checkpoint = False  # DeepSpeed's fp32 partitions: ours hold all of it, by name
    ds_save, ds_load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir: str, tag: Optional[str] = None, client_state: Optional[dict[str, Any]] = None,
                        save_latest: bool = True, **kwargs: Any) -> Any:
        tag = str(tag if tag is not None else f"global_step{engine.global_steps}")
        folder = os.path.join(save_dir, tag)
        if isinstance(writer, SafeCheckpointEngine):
            writer.begin()
        result = ds_save(save_dir, tag, client_state=client_state or {}, save_latest=False, **kwargs)
        error = getattr(writer, "error", None)
        written = list(getattr(writer, "written", []))
        if error is None:
            try:
                with partitions_in_memory(engine, write_back=False):
                    written.extend(save(opt, folder))
            except (OSError, RuntimeError) as exc:
                error = exc
        if any_rank(error is not None, engine.device):
            where = f"rank {engine.global_rank}: {type(error).__name__}: {error}" if error is not None else \
                "another rank failed"
            raise CheckpointWriteError(f"checkpoint {folder} was not written ({where})")
        engine.ds_structopt_written = written  # what this rank wrote (it checks them: training/checkpoints.py)
        if save_latest and engine.global_rank == 0:
            write_text_atomic(os.path.join(save_dir, "latest"), tag)
        if dist.is_initialized():
            dist.barrier()
        return result

    def load_checkpoint(load_dir: str, tag: Optional[str] = None, *args: Any, load_optimizer_states: bool = True,
                        **kwargs: Any) -> Any:
        if engine.zero_optimization_stage() == 3:
            tag = tag if tag is not None else _latest_tag(load_dir)
            if tag is None:
                return None, None
            with partitions_in_memory(engine, write_back=True):
                return _load_zero3(engine, opt, os.path.join(load_dir, str(tag)), load_optimizer_states, **kwargs)
        # DeepSpeed's own optimizer partitions are not written: rebuild them from the module
        # weights, then restore exact fp32 masters and our state by name.
        path, client_state = ds_load(load_dir, tag, *args, load_optimizer_states=False, **kwargs)
        if path is not None and load_optimizer_states:
            load(opt, os.path.dirname(path) if os.path.isfile(path) else path)
        return path, client_state

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def _latest_tag(load_dir: str) -> Optional[str]:
    path = os.path.join(load_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


# Keys of DeepSpeed's model-states file that are DeepSpeed's own, not the user's client_state.
_DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
            "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
            "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
            "ds_version"}


@torch.no_grad()
def _load_zero3(engine: Any, opt: DistributedStructuredOptimizer, directory: str, load_optimizer_states: bool = True,
                load_lr_scheduler_states: bool = True, load_module_only: bool = False,
                **_: Any) -> tuple[str, dict[str, Any]]:
    """ZeRO-3 at any world size: DeepSpeed's module files are per rank (and its fp32 partitions are
    not written), but our files hold every parameter's fp32 value by name, so weights, masters and
    state all come from them; step counters, LR scheduler and client state come from rank 0's
    model-states file of this tag."""
    from ..checkpoint import load

    states = os.path.join(directory, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    ckpt = safe_load(states)
    load(opt, directory)
    for e in opt.entries_with_pieces():
        for piece in e.pieces:  # the model's own shard (bf16 or fp32) from the restored fp32 master
            e.lp.ds_tensor.view(-1).narrow(0, 0, piece.numel).copy_(piece.param)
    if not load_optimizer_states or load_module_only:
        opt.matrix_state.clear()
        opt.elem_state.clear()
    if load_module_only:
        return states, {}
    if load_lr_scheduler_states and engine.lr_scheduler is not None and ckpt.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    engine.global_steps = ckpt["global_steps"]
    engine.global_samples = ckpt.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = ckpt["skipped_steps"]
    return states, {k: v for k, v in ckpt.items() if k not in _DS_KEYS}
