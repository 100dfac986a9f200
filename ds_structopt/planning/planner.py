"""Predict, per rank, what a run of our optimizer costs: state memory, refresh load, bytes moved.

Everything is computed with the code the optimizer itself runs (ownership plan,
refresh phases, each family's state-size model) on DeepSpeed's partition
layout (``zero_layout``), so memory and our step's bytes are exact, not
estimates: ``tests/test_plan.py`` compares them with ``bench dist``. DeepSpeed's
own traffic (gradient reduction, parameter all-gather) is a model, reported
separately. Time projections divide FLOPs by a device FLOP/s and bytes by a
link bandwidth: a first-order estimate, stated as such.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from ..distributed.ownership import MatrixInfo, plan_replica_owners
from ..optim.refresh import PhasePlanner, first_refresh_window
from ..optim.registry import get_optimizer_class
from .model_shapes import ParamSpec
from .zero_layout import held_counts, holdings, zero3_partition_numel, zero12_partition_numel

FP32 = 4


@dataclass
class Plan:
    world: int
    ranks_per_node: int
    group_size: int
    stage: int
    optimizer: str
    update_freq: int
    stagger: bool
    ahead_steps: int                        # refresh_from="previous": decompositions start this many steps early
    params: int
    matrices: int
    state_bytes_per_rank: list[int]
    owned_matrices_per_rank: list[int]
    our_bytes_per_step: int                 # handed to collectives by our step, summed over ranks
    our_bytes_per_step_inter_node: int      # the part on collectives that span nodes
    our_bytes_sent_per_rank: list[int] = field(repr=False)  # what each rank sends in our step
    deepspeed_bytes_per_step: int           # DeepSpeed's own collectives (model), summed over ranks
    refresh_flops_per_step: list[list[float]] = field(repr=False)  # [rank][step in window]
    rotation_flops_per_step: list[float] = field(repr=False)       # [rank]
    first_window: int = 1                    # steps the first bases are spread over (1: all at step 1)
    first_refresh_flops_per_step: list[list[float]] = field(default_factory=list, repr=False)  # [rank][step < W]
    replica_owners: dict[str, list[int]] = field(default_factory=dict, repr=False)  # matrix -> owner per group
    offload: str = "none"                    # zero_optimization.offload_optimizer.device
    host_bytes_per_node: list[int] = field(default_factory=list)  # with offload to the CPU: each node's host memory
    nvme_bytes_per_node: list[int] = field(default_factory=list)  # with offload to NVMe: each node's files

    @property
    def refresh_max(self) -> float:
        """The heaviest refresh step of the run: the first window's or a later window's."""
        later = max(max(r) for r in self.refresh_flops_per_step)
        first = max((max(r) for r in self.first_refresh_flops_per_step if r), default=0.0)
        return max(later, first)

    @property
    def refresh_mean(self) -> float:
        return sum(sum(r) for r in self.refresh_flops_per_step) / (self.world * self.update_freq)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("refresh_flops_per_step")
        out.pop("first_refresh_flops_per_step")
        out.update(refresh_flops_max=self.refresh_max, refresh_flops_mean=self.refresh_mean,
                   max_state_bytes=max(self.state_bytes_per_rank), rotation_flops_max=max(self.rotation_flops_per_step))
        out.pop("rotation_flops_per_step")
        out.pop("replica_owners")
        out["state_bytes_per_rank"] = _summary(self.state_bytes_per_rank)
        out["owned_matrices_per_rank"] = _summary(self.owned_matrices_per_rank)
        out["our_bytes_sent_per_rank"] = _summary(self.our_bytes_sent_per_rank)
        return out


def _summary(values: list[int]) -> Any:
    return values if len(values) <= 8 else {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}


def make_plan(groups: Sequence[Sequence[ParamSpec]], optimizer: str, options: dict[str, Any], world: int,
              stage: int, ranks_per_node: Optional[int] = None, group_size: Optional[int] = None,
              ownership: str = "local", cost_model: str = "flops", offload: str = "none", param_bytes: int = 2) -> Plan:
    """The plan of one configuration; ``group_size`` = hierarchical ``ownership_group_size``;
    ``offload``: ``offload_optimizer.device`` ("cpu": state and DeepSpeed's partitions in host
    memory; "nvme": our state and DeepSpeed's fp32 masters in files, host memory holding a step
    call's working set); ``param_bytes``: bytes per model parameter (2: bf16/fp16 training, 4: fp32)."""
    cls = get_optimizer_class(optimizer)
    opts = cls.resolve_options(dict(options))
    update_freq = int(opts.get("update_freq", 1))
    stagger = bool(opts.get("stagger_refresh", False))
    ahead_steps = int(opts.get("refresh_ahead_steps", 1)) if opts.get("refresh_from") == "previous" else 0
    ranks_per_node = ranks_per_node or world
    group_size = group_size or world
    if world % group_size:
        raise ValueError(f"ownership_group_size must divide the world size {world}, got {group_size}")
    pieces = holdings(groups, world, stage)
    all_params = [p for g in groups for p in g]
    mats = [p for p in all_params if p.is_matrix]
    infos = [MatrixInfo.of(p.name, *p.rows_cols, cls, opts) for p in mats]
    held = None if ownership == "balanced" or world == 1 else held_counts({p.name: pieces[p.name] for p in mats}, world)
    owners = plan_replica_owners(infos, world, group_size, cost_model, held)

    # memory: owned matrix states + AdamW moments of the elementwise pieces held
    state = [0] * world
    owned = [0] * world
    rotation = [0.0] * world
    costs: list[list[float]] = [[] for _ in range(world)]
    for p, info in zip(mats, infos):
        elems = cls.state_elements(info.rows, info.cols, opts)
        for r in owners[p.name]:
            state[r] += FP32 * elems
            owned[r] += 1
            rotation[r] += cls.step_flops(info.rows, info.cols, opts)
            costs[r].append(cls.refresh_flops(info.rows, info.cols, opts))
    for p in all_params:
        if not p.is_matrix:
            for r, _, n in pieces[p.name]:
                state[r] += FP32 * 2 * n

    # refresh load over one window: step 1 + k, k = 0..T-1 (phases as the optimizer assigns them),
    # and over the first window, where phase p gets its first basis at step 1 + p mod W
    first_window = first_refresh_window(opts)
    window = [[0.0] * update_freq for _ in range(world)]
    first = [[0.0] * first_window for _ in range(world)]
    for r in range(world):
        if stagger:
            states: list[dict[str, Any]] = [{} for _ in costs[r]]
            PhasePlanner().assign(states, costs[r], update_freq)
            for st, c in zip(states, costs[r]):
                window[r][st["refresh_phase"]] += c
                first[r][st["refresh_phase"] % first_window] += c
        else:
            window[r][0] = sum(costs[r])
            first[r][0] = sum(costs[r])

    ours, inter, sent = our_bytes(mats, pieces, owners, world, group_size, ranks_per_node,
                                  sizes_travel=not cls.step_size_is_lr(opts))
    host: list[int] = []
    nvme: list[int] = []
    if offload == "cpu":
        per_rank = [s + offloaded_partition_bytes(groups, world, stage, param_bytes) for s in state]
        host = [sum(per_rank[n:n + ranks_per_node]) for n in range(0, world, ranks_per_node)]
    elif offload == "nvme":  # our state's files (two per entry: StateStore) and DeepSpeed's swapped fp32 masters
        masters = FP32 * rank_partition_numel(groups, world, 3)
        nvme = [sum(2 * s + masters for s in state[n:n + ranks_per_node]) for n in range(0, world, ranks_per_node)]
    return Plan(world=world, ranks_per_node=ranks_per_node, group_size=group_size, stage=stage, optimizer=cls.NAME,
                update_freq=update_freq, stagger=stagger, ahead_steps=ahead_steps, params=sum(p.numel for p in all_params), matrices=len(mats),
                state_bytes_per_rank=state, owned_matrices_per_rank=owned, our_bytes_per_step=ours,
                our_bytes_per_step_inter_node=inter, our_bytes_sent_per_rank=sent, deepspeed_bytes_per_step=deepspeed_bytes(groups, world, stage),
                refresh_flops_per_step=window, rotation_flops_per_step=rotation, first_window=first_window,
                first_refresh_flops_per_step=first, replica_owners=owners, offload=offload, host_bytes_per_node=host,
                nvme_bytes_per_node=nvme)


def our_bytes(mats: Sequence[ParamSpec], pieces: dict[str, list[tuple[int, int, int]]], owners: dict[str, list[int]],
              world: int, group_size: int, ranks_per_node: int, sizes_travel: bool = False) -> tuple[int, int, list[int]]:
    """Bytes our step sends, summed over ranks (as ``DistributedStructuredOptimizer.comm_bytes``):
    every piece of a matrix to each of its owners that does not hold it whole, then each owner's
    update slices to the other holders in its replica group, plus one step size per matrix
    where they travel (``sizes_travel``: the family's step sizes are not just the lr).
    Returns (all, between ranks on different nodes, sent by each rank)."""
    total = inter = 0
    sent = [0] * world
    for p in mats:
        held: dict[int, int] = {}
        for r, _, n in pieces[p.name]:
            held[r] = held.get(r, 0) + n
        for owner in owners[p.name]:
            node = owner // ranks_per_node
            base = owner - owner % group_size
            for r, n in held.items():
                if r == owner:
                    continue
                crosses = r // ranks_per_node != node
                if held.get(owner, 0) < p.numel:  # gather: r's pieces to the owner
                    total += FP32 * n
                    inter += FP32 * n if crosses else 0
                    sent[r] += FP32 * n
                if base <= r < base + group_size:  # return: r's slices (and the step size)
                    size = FP32 * (n + (1 if sizes_travel else 0))
                    total += size
                    inter += size if crosses else 0
                    sent[owner] += size
    return total, inter, sent


def offloaded_partition_bytes(groups: Sequence[Sequence[ParamSpec]], world: int, stage: int, param_bytes: int = 2) -> int:
    """Host bytes per rank DeepSpeed 0.19 keeps for ZeRO-Offload of the optimizer besides our
    state: the fp32 master partition and its fp32 gradient, plus at ZeRO-1/2 a pinned copy of
    the partition in the model's dtype (``param_bytes``) that it sends back to the GPU (stage 1/2:
    padded to 2 x world per group; stage 3: ceil(numel / world) per parameter)."""
    return (FP32 + FP32 + (0 if stage == 3 else param_bytes)) * rank_partition_numel(groups, world, stage)


def rank_partition_numel(groups: Sequence[Sequence[ParamSpec]], world: int, stage: int) -> int:
    """Elements of one rank's fp32 partitions over all groups (stage 1/2: padded per group;
    stage 3: per parameter), DeepSpeed 0.19's layout."""
    if stage == 3:
        return sum(zero3_partition_numel(p, world) for params in groups for p in params)
    return sum(zero12_partition_numel(params, world) for params in groups)


def deepspeed_bytes(groups: Sequence[Sequence[ParamSpec]], world: int, stage: int) -> int:
    """DeepSpeed's own bytes per step, summed over ranks (model, checked against ``bench dist``):
    stage 0 all-reduces gradients; 1/2 reduce gradient buckets and all-gather updated partitions;
    3 all-gathers parameters for forward and backward and reduce-scatters gradients (measured: the
    same bytes as 1/2 at these sizes; prefetch and persistence thresholds change it at scale)."""
    if world == 1:
        return 0
    n = FP32 * world * sum(zero12_partition_numel(params, world) for params in groups)  # the padded groups
    return (1 if stage == 0 else 2) * world * n


def projection(plan: Plan, tokens_per_step: int, device_flops: float, mfu: float, matmul_flops: float,
               decomp_flops: float, intra_bw: float, inter_bw: float) -> dict[str, float]:
    """Seconds per step, first order. AdamW's step: model FLOPs 6 N tokens / (world x FLOP/s x MFU).
    Ours adds, on the slowest rank, its rotations at ``matmul_flops`` (fp32 matmuls), its refresh
    work at ``decomp_flops`` (fp32 eigh/SVD run far below peak) and its bytes over the link each
    message uses. "mean" amortizes refreshes over the window; "worst step" is the run's
    heaviest step (synchronous: every matrix at once; staggered: the first window's heaviest
    step, 1/W of all first bases, or a later window's slot, whichever is larger). With refresh-ahead
    only the part of a refresh longer than its lead (k steps) is counted (an upper bound on hiding: the
    side stream competes with the model for the device)."""
    adamw = 6.0 * plan.params * tokens_per_step / (plan.world * device_flops * mfu)
    rotations = max(plan.rotation_flops_per_step) / matmul_flops
    mean_refresh = max(sum(r) / plan.update_freq for r in plan.refresh_flops_per_step) / decomp_flops
    worst_refresh = plan.refresh_max / decomp_flops
    if plan.ahead_steps:  # started k steps early on a side stream: only what outlasts k steps shows
        hidden = plan.ahead_steps * adamw
        mean_refresh, worst_refresh = max(0.0, mean_refresh - hidden), max(0.0, worst_refresh - hidden)
    per_rank_inter = plan.our_bytes_per_step_inter_node / plan.world
    per_rank_intra = (plan.our_bytes_per_step - plan.our_bytes_per_step_inter_node) / plan.world
    comm = per_rank_intra / intra_bw + per_rank_inter / inter_bw
    return {"adamw_step_s": adamw, "rotation_s": rotations, "refresh_mean_s": mean_refresh,
            "refresh_worst_step_s": worst_refresh, "our_comm_s": comm,
            "overhead_mean": (rotations + mean_refresh + comm) / adamw,
            "overhead_worst_step": (rotations + worst_refresh + comm) / adamw}
