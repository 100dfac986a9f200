"""Peak memory of one rank's optimizer step: its state plus what the step allocates on top.

The state alone (``Plan.state_bytes_per_rank``) understates what a rank must fit: an owner
assembles full gradients, computes full updates, and messages travel. This module
projects the step's high-water mark from three parts, each taken from the code that runs:

- the family's math (``matrix_updates``) run on fake tensors (shapes only, no memory, no
  time) for the matrices the rank owns, split and ordered as the distributed step splits
  them (what it holds whole first, then what it gathers), over a first, plain and refresh
  step, under a live-bytes counter: its temporaries, outputs and new state;
- the step's own buffers from the exchange plan the rank would build
  (``distributed.exchange.ExchangePlan``): assembled gradients, message copies, return
  buffers;
- DeepSpeed's copy of each partition's gradient before our ``step()`` call
  (``torch.cat`` of its reduced gradient list) and AdamW's temporaries on the elementwise
  pieces.

The phases of one ``step()`` call are added as they overlap in
``DistributedStructuredOptimizer._step_matrices``; the peak is the largest over calls,
phases and steps. ``bench scale`` checks it against the simulated step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..distributed.exchange import ExchangePlan
from .model_shapes import ParamSpec
from .zero_layout import StepCall, step_calls

FP32 = 4


@dataclass
class StepPeaks:
    """Bytes, for one rank: the peak of each projected step (state included) and the state."""

    per_step: dict[int, int]  # step number (1 = the first) -> peak bytes
    state: int

    @property
    def peak(self) -> int:
        return max(self.per_step.values())


def rank_step_peaks(groups: Sequence[Sequence[ParamSpec]], cls: Any, options: dict[str, Any], world: int, stage: int,
                    rank: int, replica_owners: dict[str, list[int]], group_size: int, state_bytes: int,
                    steps: Sequence[int] = (1, 2), sub_group_size: int = int(1e9), offload: str = "none") -> StepPeaks:
    """Projected peak bytes of ``rank``'s steps ``steps`` (1: the first, with the first bases and
    state allocation; a refresh step is due at 1 + k update_freq) under ``stage``.
    ``options``: the optimizer's options as a user gives them; ``offload``: the partitions' device
    (offloaded, a holder's gradient is in host memory: its updates land in a GPU buffer)."""
    calls = step_calls(groups, world, stage, rank, sub_group_size)
    holders = _holders(calls)
    index, base = rank // group_size, rank - rank % group_size
    owner = {name: owners[index] for name, owners in replica_owners.items()}
    plans = []
    for call in calls:
        mats = [p for p in call.params if p.is_matrix and holders.get(p.name)]
        plans.append(ExchangePlan.build(rank, [p.name for p in mats], [p.numel for p in mats], holders, owner,
                                        replica_owners, range(base, base + group_size)) if mats else None)
    opts = cls.resolve_options(dict(options))
    math = _math_profile(cls, options, calls, plans, max(steps))
    per_step = {}
    for s in steps:
        grown, worst = 0, 0  # state created earlier in this step (its first), the step's high-water mark
        for call, plan, prof in zip(calls, plans, math[s - 1]):
            elems = sum(call.mine(p) for p in call.params if not p.is_matrix)
            new_elem_state = 2 * FP32 * elems if s == 1 else 0
            worst = max(worst, grown + FP32 * call.partition, grown + new_elem_state + FP32 * elems)
            grown += new_elem_state
            if plan is not None:
                worst = max(worst, grown + _matrix_phases(call, plan, prof, cls, opts, offload == "none"))
                grown += prof["new_state"]
            grown -= FP32 * call.partition  # DeepSpeed frees the partition's gradient after the call
        per_step[s] = (0 if s == 1 else state_bytes) + worst
    return StepPeaks(per_step, state=state_bytes)


def _holders(calls: list[StepCall]) -> dict[str, list[tuple[int, int, int]]]:
    out: dict[str, list[tuple[int, int, int]]] = {}
    for call in calls:
        out.update(call.holders)
    return out


def _matrix_phases(call: StepCall, plan: ExchangePlan, prof: dict[str, int], cls: Any, opts: dict[str, Any],
                   grads_on_device: bool = True) -> int:
    """The high-water mark over the gather, compute and return phases of one call (bytes)."""
    numel = [p.numel for p in call.matrices]
    wanted = FP32 * sum(numel[i] for i in plan.wanted)
    inbox = FP32 * sum(size for _, size, ranges in plan.gather_recvs if len(ranges) > 1)
    sends = FP32 * sum(sum(call.mine(call.matrices[i]) for i in mats)
                       for _, mats in plan.gather_sends if not call.contiguous([call.matrices[i] for i in mats]))
    # message copies live until the receives are waited on, before the gathered matrices' math;
    # the receive buffers until that math is done
    sizes = not cls.step_size_is_lr(opts)
    back = FP32 * sum(sum(n for _, _, n in ranges) + (len(mats) if sizes else 0)
                      for _, ranges, mats in plan.return_sends if len(ranges) + sizes > 1)
    # a DeepSpeed partition's pieces (one range per matrix) receive their updates in their gradients
    in_place = not sizes and call.partition > 0 and grads_on_device
    received = 0 if in_place else FP32 * sum(size + (len(mats) if sizes else 0) for _, size, mats in plan.return_recvs)
    # the gathered matrices' updates are written into their gradient buffers (scratch), which
    # stay alive through the return phase; those held whole get new ones (in "after")
    return max(wanted + inbox + sends + prof["local_peak"], wanted + inbox + prof["wanted_peak"],
               wanted + prof["after"] + back + received)


def _math_profile(cls: Any, options: dict[str, Any], calls: list[StepCall], plans: list, steps: int
                  ) -> list[list[dict[str, int]]]:
    """Per step, per call: the family's peak bytes over what was alive before it, on the
    matrices held whole, then with those updates alive on the gathered ones; what stays
    after (updates and new state); the new state alone. Shapes only (fake tensors)."""
    import torch

    from ..optim.base import state_bytes
    from ..sim.world import fake_gpu

    device = torch.device("cuda", 0)
    with fake_gpu(device) as gpu:
        math = cls([torch.zeros(1, device=device)], **options)
        group = math.param_groups[0]
        work = []
        for call, plan in zip(calls, plans):
            if plan is None:
                work.append(None)
                continue
            parts = []
            # the math writes into what it gathers (its own buffers) and into what it holds
            # whole where that is a view of DeepSpeed's partition gradient (scratch), not a .grad
            for part, scratch in ((plan.local, call.partition > 0), (plan.wanted, True)):
                shapes = [call.matrices[i].rows_cols for i in part]
                grads = [torch.zeros(s, device=device) for s in shapes]
                weights = [torch.zeros(s, device=device) for s in shapes]
                parts.append((grads, weights, [{} for _ in part], scratch))
            work.append(parts)
        out = []
        for _ in range(steps):
            row = []
            for parts in work:
                if parts is None:
                    row.append({})
                    continue
                start, state0 = gpu.memory.reset_peak(), state_bytes([st for _, _, sts, _ in parts for st in sts])
                kept, peaks = [], []
                for grads, weights, states, scratch in parts:
                    gpu.memory.reset_peak()
                    if grads:
                        kept.append(math.matrix_updates(group, grads, states, weights=weights, scratch=scratch))
                    peaks.append(gpu.memory.peak - start)
                after = gpu.memory.live - start
                row.append({"local_peak": peaks[0], "wanted_peak": peaks[1], "after": after,
                            "new_state": state_bytes([st for _, _, sts, _ in parts for st in sts]) - state0})
                del kept
            out.append(row)
        return out


def sampled_peaks(plan: Any, groups: Sequence[Sequence[ParamSpec]], options: dict[str, Any],
                  ranks: Sequence[int] = ()) -> dict[int, StepPeaks]:
    """Projected step peaks of the ranks likely to peak highest (rank 0, the last, the one
    with the most state, the one with the most owned work; or ``ranks``), over the first
    step and one refresh window. Every rank would take a profile each: sampling keeps
    ``ds-structopt plan`` quick at 1024 ranks."""
    from ..optim.registry import get_optimizer_class

    cls = get_optimizer_class(plan.optimizer)
    world = plan.world
    if not ranks:
        ranks = sorted({0, world - 1, max(range(world), key=lambda r: plan.state_bytes_per_rank[r]),
                        max(range(world), key=lambda r: plan.rotation_flops_per_step[r])})
    steps = range(1, min(plan.update_freq, 10) + 2)
    return {r: rank_step_peaks(groups, cls, options, world, plan.stage, r, plan.replica_owners, plan.group_size,
                               plan.state_bytes_per_rank[r], steps=steps, offload=plan.offload) for r in ranks}
