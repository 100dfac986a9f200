"""``ds_structopt.initialize``: ``deepspeed.initialize`` with one of our optimizers named in the JSON.

Same arguments, same return value (engine, optimizer, dataloader, lr_scheduler).
The config is read and validated first, so a bad config fails with one line
before any process group exists.
"""
from __future__ import annotations

import argparse
import copy
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Union

import torch

from ..grouping import param_groups
from .deepspeed_config import ConfigError, StructOptConfig, parse_config

if TYPE_CHECKING:
    from ..distributed.optimizer import DistributedStructuredOptimizer
    from ..distributed.state_store import StateStore


def _config_source(args: Any, config: Any, config_params: Any) -> Any:
    if config is not None and config_params is not None:
        raise ConfigError("pass the DeepSpeed config as 'config' or 'config_params', not both")
    config = config if config is not None else config_params
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if config is not None and from_args is not None:
        raise ConfigError("DeepSpeed config given twice: in args.deepspeed_config and in config=")
    config = config if config is not None else from_args
    if config is None:
        raise ConfigError("no DeepSpeed config: pass config=<path or dict> or args.deepspeed_config")
    return config


def _init_distributed(timeout_s: float, required: Optional[bool]) -> None:
    """Start the process group ourselves so every collective has our timeout: a dead or hung rank
    makes the others fail within ``collective_timeout_s`` instead of DeepSpeed's 30 minutes."""
    import datetime

    import deepspeed
    import torch.distributed as dist

    if required is False or dist.is_initialized() or "RANK" not in os.environ:
        return
    timeout = datetime.timedelta(seconds=float(timeout_s))
    # DeepSpeed makes its data-parallel groups with new_group(), which takes torch's module-level
    # default (30 min), not the world group's timeout: make that default ours too.
    from torch.distributed import distributed_c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(distributed_c10d, name, None), datetime.timedelta):
            setattr(distributed_c10d, name, timeout)
    deepspeed.init_distributed(timeout=timeout, verbose=False)


def initialize(
    args: Any = None,
    model: Any = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    mpu: Any = None,
    dist_init_required: Optional[bool] = None,
    collate_fn: Any = None,
    config: Optional[Union[str, os.PathLike, Mapping[str, Any]]] = None,
    config_params: Optional[Union[str, Mapping[str, Any]]] = None,
    **kwargs: Any,
):
    """Drop-in for ``deepspeed.initialize`` that understands ``"type": "AdaDiag++"`` (and AdaDiag, ASGO, DASGO)."""
    parsed: StructOptConfig = parse_config(_config_source(args, config, config_params))
    if parsed.optimizer_cls is not None and mpu is not None:
        raise ConfigError("mpu (tensor/pipeline model parallelism) is not supported by ds_structopt's DeepSpeed "
                          "integration: its owners span the whole world; use the Megatron-core integration")
    if parsed.optimizer_cls is not None and optimizer is not None:
        raise ConfigError("the config names optimizer type "
                          f"'{parsed.optimizer_type}' and an optimizer object was passed too; give one of them")
    import deepspeed

    from ..distributed.optimizer import DistributedStructuredOptimizer
    from .deepspeed_ops import skip_unused_jit_ops
    from .launch_env import adopt_slurm_env

    adopt_slurm_env()
    skip_unused_jit_ops()
    _init_distributed(parsed.dist_options.collective_timeout_s, dist_init_required)

    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args) if not isinstance(args, argparse.Namespace) else argparse.Namespace(**vars(args))
        args.deepspeed_config = None
    if parsed.optimizer_cls is not None:
        if model_parameters is None:
            model_parameters = param_groups(model)
        cls, options, dist_options = parsed.optimizer_cls, parsed.options, parsed.dist_options

        def optimizer(params: Any) -> DistributedStructuredOptimizer:
            return DistributedStructuredOptimizer(params, cls, options, dist_options=dist_options)

    result = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required,
        collate_fn=collate_fn, config=parsed.ds_config, **kwargs,
    )
    attach_engine(result[0])
    return result


def attach_engine(engine: Any) -> Optional[DistributedStructuredOptimizer]:
    """After ``deepspeed.initialize`` (ours, or one a framework made): ZeRO-3 layouts, our
    checkpoint files beside DeepSpeed's, metrics to the monitor. Idempotent."""
    ours = find_optimizer(engine)
    if ours is None or getattr(engine, "_ds_structopt_attached", False):
        return ours
    from ..distributed.ownership import group_fan_out_note
    from .deepspeed_checkpoint import wrap_engine_checkpointing

    if engine.dp_world_size != ours.world:
        raise RuntimeError(f"ds_structopt: DeepSpeed's data-parallel world ({engine.dp_world_size} ranks) is not the "
                           f"optimizer's ({ours.world}); model/sequence parallel layouts are not supported here")
    note = group_fan_out_note(engine.zero_optimization_stage(), ours.world, ours.replicas.size)
    if note is not None and ours.rank == 0:
        print(note, flush=True)
    if engine.zero_optimization_stage() == 3:
        ours.flat_layouts = zero3_layouts(engine.optimizer)
        ours.flat_tensors = {id(t): t for t in engine.optimizer.fp32_partitioned_groups_flat}
    if engine.zero_nvme_offload_optimizer():
        ours.state_store = nvme_state_store(engine)
    if (engine.zero_cpu_offload() or engine.zero_nvme_offload_optimizer()) and ours.dist_options.offload_adam == "deepspeed":
        from .host_adam import load_host_adam

        ours.host_adam = load_host_adam()
    bracket_zero_steps(engine.optimizer, ours)
    wrap_engine_checkpointing(engine, ours)
    _log_metrics_to_monitor(engine, ours)
    engine._ds_structopt_attached = True
    return ours


def nvme_state_store(engine: Any) -> "StateStore":
    """Our state's files for ZeRO-Infinity (``offload_optimizer: nvme``): beside DeepSpeed's in
    ``nvme_path``, one folder per rank, through DeepSpeed's async I/O op with the config's
    ``aio`` settings."""
    import torch.distributed as dist
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from ..distributed.state_store import StateStore

    aio = engine.aio_config()
    handle = AsyncIOBuilder().load(verbose=False).aio_handle(
        block_size=aio["block_size"], queue_depth=aio["queue_depth"], single_submit=aio["single_submit"],
        overlap_events=aio["overlap_events"], intra_op_parallelism=aio["intra_op_parallelism"])
    folder = os.path.join(str(engine.zero_offload_optimizer().nvme_path), "ds_structopt", f"rank{dist.get_rank()}")
    return StateStore(folder, handle, pin=torch.cuda.is_available())


@contextmanager
def partitions_in_memory(engine: Any, write_back: bool) -> Iterator[None]:
    """ZeRO-Infinity keeps DeepSpeed's fp32 partitions on NVMe between steps, and our checkpoint
    reads (save) or writes (load, ``write_back``) them by name: every swapped sub-group's
    partition in host memory for the duration, then released or written back. Nothing to do
    without NVMe offload, or where DeepSpeed keeps a sub-group in memory (under 1 MiB)."""
    zero_opt = engine.optimizer
    if not engine.zero_nvme_offload_optimizer():
        yield
        return
    subs = [i for i in range(len(zero_opt.fp32_partitioned_groups_flat)) if zero_opt._swappable_optimizer_subgroup(i)]
    resident = []
    try:
        for i in subs:
            try:
                zero_opt._optimizer_states_and_gradient_swap_in(i)
            except AssertionError:  # DeepSpeed's pinned buffer pool is full
                raise RuntimeError(
                    f"ds_structopt: a checkpoint with offload_optimizer 'nvme' holds every sub-group's fp32 partition "
                    f"in host memory at once ({len(subs)} here); raise zero_optimization.offload_optimizer."
                    f"buffer_count to at least {len(subs) + 1} or sub_group_size") from None
            resident.append(i)
        yield
    finally:
        for i in resident:
            if write_back:
                zero_opt._writeback_swap_state(i, write_opt_state=True, write_gradients=False)
            else:
                zero_opt._release_swap_buffers(i)


def bracket_zero_steps(zero_opt: Any, ours: Any) -> None:
    """Make one DeepSpeed optimizer step one step for us, however many ``step()`` calls DeepSpeed
    splits it into (one per param group at ZeRO-1/2, per sub-group at ZeRO-3). The later groups'
    gradients wait in ``averaged_gradients`` until their turn: the first call's decision (non-finite
    anywhere; which elementwise parameters have a non-zero gradient) includes them, each with the
    fp32 partition DeepSpeed will flatten it onto."""
    if zero_opt is ours or getattr(zero_opt, "_ds_structopt_bracketed", False):
        return  # DeepSpeed calls us directly (no wrapper): one call is one step
    ds_step = zero_opt.step
    # with ZeRO-Offload DeepSpeed copies gradients straight onto the host partitions' .grad at the
    # accumulation boundary (ZeRO-1/2 ``cpu_offload``, ZeRO-3 ``offload_optimizer``): nothing waits
    # in averaged_gradients
    offloaded = bool(getattr(zero_opt, "cpu_offload", False) or getattr(zero_opt, "offload_optimizer", False))

    def pending() -> list[tuple[Any, list[Any]]]:
        waiting = getattr(zero_opt, "averaged_gradients", None) or {}
        flats = getattr(zero_opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3: one per sub-group
        if flats is None:
            flats = getattr(zero_opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2: one per param group
        out = []
        for key, grads in waiting.items():
            if grads is None:  # already handed over (or stepped)
                continue
            grads = [grads] if isinstance(grads, torch.Tensor) else list(grads)
            flat = flats[key] if flats is not None and isinstance(key, int) and 0 <= key < len(flats) else None
            out.append((flat, grads))
        if offloaded and flats is not None:  # ZeRO-Offload: every gradient is already on its partition's .grad
            out += [(flat, [flat.grad]) for key, flat in enumerate(flats)
                    if waiting.get(key) is None and flat.grad is not None]
        return out

    def step(*args: Any, **kwargs: Any) -> Any:
        with ours.optimizer_step(pending):
            return ds_step(*args, **kwargs)

    zero_opt.step = step
    zero_opt._ds_structopt_bracketed = True


def zero3_layouts(zero_opt: Any) -> dict[int, list[tuple[Any, int, int, int]]]:
    """For each ZeRO-3 sub-group's fp32 partition: (param, offset in the partition, start and
    length of this rank's range in the flattened param). Each param contributes its padded
    partition (``partition_numel``) in sub-group order; rank r holds [r*size, (r+1)*size)."""
    import torch.distributed as dist

    rank = dist.get_rank(group=zero_opt.dp_process_group)
    layouts = {}
    for sub_id, flat in enumerate(zero_opt.fp32_partitioned_groups_flat):
        entries, offset = [], 0
        for p in zero_opt.fp16_groups[sub_id]:
            size = p.partition_numel()
            start = rank * size
            entries.append((p, offset, start, max(0, min(size, p.ds_numel - start))))
            offset += size
        numel = zero_opt.fp16_partitioned_groups_flat_numel[sub_id]  # the flat may be swapped out (NVMe)
        if offset != numel:
            raise RuntimeError(f"ZeRO-3 partition layout mismatch in sub-group {sub_id}: {offset} != {numel}")
        layouts[id(flat)] = entries
    return layouts


def find_optimizer(engine: Any) -> Any:
    """Our DistributedStructuredOptimizer inside DeepSpeed's wrappers (ZeRO, fp16/bf16), or None."""
    from ..distributed.optimizer import DistributedStructuredOptimizer

    opt = getattr(engine, "optimizer", None)
    for _ in range(4):
        if isinstance(opt, DistributedStructuredOptimizer) or opt is None:
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


def metrics(engine: Any) -> dict[str, float]:
    """Per-rank optimizer metrics: state bytes, refreshes, failed decompositions, bytes our step moved."""
    opt = find_optimizer(engine)
    if opt is None:
        raise ValueError("this engine was not built by ds_structopt.initialize with a ds_structopt optimizer")
    return opt.metrics()


def _log_metrics_to_monitor(engine: Any, opt: Any) -> None:
    """After each optimizer step, send our metrics to the engine's monitor (TensorBoard/CSV/W&B) when one is on."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not getattr(monitor, "enabled", False):
        return
    ds_step = engine.step
    last = {"step": engine.global_steps}

    def step(*args: Any, **kwargs: Any) -> Any:
        out = ds_step(*args, **kwargs)
        if engine.global_steps != last["step"]:  # an optimizer step happened (not a micro-step)
            last["step"] = engine.global_steps
            values = opt.metrics()
            if engine.global_rank == 0:
                monitor.write_events([(f"ds_structopt/{k}", float(v), engine.global_samples) for k, v in values.items()])
        return out

    engine.step = step
