"""``get_megatron_optimizer``'s counterpart for our optimizers (megatron-core 0.16.x).

Matrices (2-D, not embedding/output) go to a :class:`TensorParallelStructured`;
every other parameter goes through megatron's own ``get_megatron_optimizer``
(its Adam/SGD choice, param groups, lr/wd multipliers and overrides). Both are
sharded by whole parameters over the data-parallel group (our cost model for
matrices, numel for the rest), then wrapped by megatron's FP32 or Float16
wrapper (bf16 master weights, fp16 loss scaling) and chained in an
:class:`OwnerShardedOptimizer`, which megatron's training loop, scheduler and
``clip_grad`` use unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.optimizer import OptimizerConfig, _get_param_groups, get_megatron_optimizer
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.core.optimizer.optimizer import ChainedOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer
from megatron.core.process_groups_config import ProcessGroupCollection

from ...distributed.ownership import MatrixInfo, plan_owners
from ...optim.registry import get_optimizer_class
from .owner_sharded import OwnerShardedOptimizer, SharedScale
from .tp_layout import layout_of
from .tp_optimizer import TP_MODES, TensorParallelStructured

MEGATRON_OWNED_OPTIONS = ("lr", "weight_decay")


def get_megatron_structopt_optimizer(config: OptimizerConfig, model_chunks: list[torch.nn.Module],
                                     optimizer: str = "AdaDiag++", options: Optional[dict[str, Any]] = None,
                                     tp_mode: str = "gather", cost_model: str = "flops",
                                     config_overrides: Optional[dict] = None, use_gloo_process_groups: bool = True,
                                     pg_collection: Optional[ProcessGroupCollection] = None) -> OwnerShardedOptimizer:
    """Our ``optimizer`` for megatron ``model_chunks`` (megatron DDP-wrapped, non-distributed grad buffers).

    ``config`` is megatron's ``OptimizerConfig``: lr, weight decay, ``clip_grad``, bf16/fp16 and
    loss-scale settings and the Adam hyperparameters of the elementwise parameters come from it;
    ``options`` are ours (``update_freq``, ``betas``, ``eps``, ...). ``tp_mode``: ``"gather"``
    (exact w.r.t. TP=1) or ``"local"`` (each TP shard its own block).
    """
    options = dict(options or {})
    _check(config, model_chunks, options, tp_mode)
    cls = get_optimizer_class(optimizer)
    resolved = cls.resolve_options(dict(options))  # one-line error for a bad option, before any state is made
    groups = pg_collection if pg_collection is not None else ProcessGroupCollection.use_mpu_process_groups()
    dp_group, tp_group = groups.dp_cp, groups.tp
    dp_size, dp_rank = torch.distributed.get_world_size(dp_group), torch.distributed.get_rank(dp_group)
    tp_size, tp_rank = torch.distributed.get_world_size(tp_group), torch.distributed.get_rank(tp_group)

    names = parameter_names(model_chunks)
    gated = any(getattr(getattr(c, "config", None), "gated_linear_unit", False) for c in model_chunks)
    matrices = [p for p in names if p.requires_grad and is_structured(p)]
    layouts = {p: layout_of(p, names[p], tp_size, tp_rank, gated) for p in matrices}
    infos = [MatrixInfo.of(names[p], *_full_rows_cols(p, layouts[p], tp_mode), cls, resolved) for p in matrices]
    matrix_owner = plan_owners(infos, dp_size, cost_model)

    # matrices: megatron's param groups (lr/wd multipliers, overrides) with only them trainable
    elementwise = [p for p in names if p.requires_grad and p not in layouts]
    with _only_trainable(matrices, names):
        matrix_groups = _get_param_groups(model_chunks, config, config_overrides)
    for group in matrix_groups:
        group["params"] = [p for p in group["params"] if matrix_owner[names[p]] == dp_rank]
    structured = TensorParallelStructured(
        matrix_groups, cls, options,
        names=[[names[p] for p in g["params"]] for g in matrix_groups],
        layouts=[[layouts[p] for p in g["params"]] for g in matrix_groups],
        tp_group=tp_group, tp_mode=tp_mode, lr=config.lr, weight_decay=config.weight_decay)

    # elementwise: megatron's own optimizer, built unwrapped, then sharded and wrapped like ours
    with _only_trainable(elementwise, names), _plain_precision(config):
        built = get_megatron_optimizer(config, model_chunks, config_overrides=config_overrides,
                                       use_gloo_process_groups=use_gloo_process_groups, pg_collection=pg_collection)
    inner_elementwise = [o.optimizer for o in (built.chained_optimizers if isinstance(built, ChainedOptimizer) else [built])
                         if getattr(o, "optimizer", None) is not None]
    element_owner = plan_owners([MatrixInfo(names[p], p.numel(), 1, 0.0, 0) for p in elementwise], dp_size, "numel")
    for inner in inner_elementwise:
        for group in inner.param_groups:
            group["params"] = [p for p in group["params"] if element_owner[names[p]] == dp_rank]

    owners = {**matrix_owner, **element_owner}
    params_by_owner: list[list[torch.Tensor]] = [[] for _ in range(dp_size)]
    for p in matrices + elementwise:
        params_by_owner[owners[names[p]]].append(p)
    scaler = _grad_scaler(config)
    wrapped = [_wrap(opt, config, tp_group, scaler) for opt in [structured, *inner_elementwise]]
    result = OwnerShardedOptimizer(wrapped, params_by_owner, dp_group, grad_scaler=scaler)
    result.structured = structured
    result.param_names = names
    result.owners = owners
    return result


def parameter_names(model_chunks: list[torch.nn.Module]) -> dict[torch.Tensor, str]:
    """Parameter -> its name in the unwrapped model (``chunk<i>.`` prefixed when there are several chunks)."""
    out: dict[torch.Tensor, str] = {}
    for i, chunk in enumerate(model_chunks):
        for name, p in chunk.named_parameters():
            while name.startswith("module."):
                name = name[len("module."):]
            out[p] = name if len(model_chunks) == 1 else f"chunk{i}.{name}"
    return out


def is_structured(p: torch.Tensor) -> bool:
    """2-D weights except the (vocab-sized) embedding and output layer, as megatron's own Muon splits them."""
    return p.dim() == 2 and not getattr(p, "is_embedding_or_output_parameter", False)


def _full_rows_cols(p: torch.Tensor, layout, tp_mode: str) -> tuple[int, int]:
    shape = layout.full_shape(p.shape) if (layout is not None and tp_mode == "gather") else tuple(p.shape)
    return int(shape[0]), int(shape[1])


def _check(config: OptimizerConfig, model_chunks: list[torch.nn.Module], options: dict[str, Any], tp_mode: str) -> None:
    if tp_mode not in TP_MODES:
        raise ValueError(f"tp_mode '{tp_mode}' is not one of {list(TP_MODES)}")
    for key in MEGATRON_OWNED_OPTIONS:
        if key in options:
            raise ValueError(f"options['{key}'] is set by megatron's OptimizerConfig.{key} (and its scheduler); remove it from options")
    if config.use_distributed_optimizer or any(getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False) for c in model_chunks):
        raise ValueError("use_distributed_optimizer=True: ds_structopt already shards optimizer state by whole "
                         "parameters over the data-parallel group; set use_distributed_optimizer=False in "
                         "OptimizerConfig and DistributedDataParallelConfig")
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if p.requires_grad and not getattr(p, "allreduce", True):
                raise ValueError(f"parameter '{name}' is an expert (MoE) parameter: expert parallelism is not supported yet")


class _only_trainable:
    """Temporarily freeze every parameter outside ``keep`` (megatron builds groups from requires_grad)."""

    def __init__(self, keep: list[torch.Tensor], names: dict[torch.Tensor, str]) -> None:
        keep_ids = {id(p) for p in keep}
        self.frozen = [p for p in names if p.requires_grad and id(p) not in keep_ids]

    def __enter__(self) -> None:
        for p in self.frozen:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p in self.frozen:
            p.requires_grad_(True)


class _plain_precision:
    """Build megatron's optimizer without its fp16/bf16 wrapper (we shard first, then wrap)."""

    def __init__(self, config: OptimizerConfig) -> None:
        self.config = config

    def __enter__(self) -> None:
        self.saved = (self.config.fp16, self.config.bf16)
        self.config.fp16 = self.config.bf16 = False

    def __exit__(self, *exc: Any) -> None:
        self.config.fp16, self.config.bf16 = self.saved


def _grad_scaler(config: OptimizerConfig):
    """The loss scaler megatron would make for this config (None for bf16/fp32 without a loss scale)."""
    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(initial_scale=config.initial_loss_scale, min_scale=config.min_loss_scale,
                                 growth_factor=2.0, backoff_factor=0.5, growth_interval=config.loss_scale_window,
                                 hysteresis=config.hysteresis)
    return None


def _wrap(opt: torch.optim.Optimizer, config: OptimizerConfig, tp_group, scaler):
    if config.fp16 or config.bf16:
        shared = SharedScale(scaler) if scaler is not None else None
        wrapped = Float16OptimizerWithFloat16Params(opt, config, shared, None)
    else:
        wrapped = FP32Optimizer(opt, config, None)
    wrapped.tp_group = tp_group
    return wrapped
