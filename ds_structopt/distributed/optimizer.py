"""The optimizer DeepSpeed drives: our math, with each matrix's state on one owner rank.

DeepSpeed hands its client optimizer either the model's own parameters (no
ZeRO partitioning, fp32) or, at ZeRO-1/2, one flat fp32 partition per param
group whose ``.grad`` is this rank's slice of the reduced, unscaled and clipped
gradient. Each model parameter then carries ``_hp_mapping``: which range of the
parameter lies at which offset of this rank's partition. From that we know,
for every matrix, which ranks hold which pieces.

One ``step()`` call per param group (DeepSpeed calls it that way), once per
optimizer step, after DeepSpeed's reduction, overflow check and clipping:

1. owners receive the pieces of the matrices they own that other ranks hold
   (one point-to-point message per rank pair: only the pieces, so the bytes
   do not grow with the world size; none when the owner holds it whole);
2. owners compute updates with the single-process math
   (``StructuredOptimizer.matrix_updates``), state kept only there; what an
   owner holds whole is computed while its other pieces are in flight;
3. each holder gets back only its slices of the updates (step sizes travel only
   where they are not the group's lr: ``step_size_is_lr``) and applies
   W <- W (1 - lr wd) - lr U to its pieces; a matrix whose whole gradient is all zero
   is skipped everywhere;
4. elementwise parameters run AdamW on this rank's pieces only: every piece of a parameter
   whose whole gradient (all ranks' pieces) is not all zero, as the single-process optimizer
   steps the whole parameter.

Before 1, one small all-reduce decides for every rank together (``_decide``): skip the step
(a non-finite gradient anywhere), or take it, and which parameters (matrices too) have a
non-zero gradient somewhere. Its read-back is the step's one host-device synchronisation;
nothing else in a plain step reads a device value. Who sends what (``exchange.py``) is
planned once per partition layout, and a partition's pieces are views made once.

Owners are planned once, on first use, from where DeepSpeed put the pieces
(``ownership="local"``: the rank holding most of a matrix owns it unless that
breaks a 1.1x load cap), so at ZeRO-1/2 steps 1 and 3 only move the matrices
that partition boundaries cut; ``"balanced"`` packs for the lowest maximum load over the cost model.
With ``ownership_group_size`` every node-sized group of ranks has its own
owners (``replicas.py``) and updates never leave the group.

Messages are ``batch_isend_irecv`` of ``isend``/``irecv`` (gloo and NCCL).
``comm_bytes`` counts the bytes this rank sends.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ..comm import comm_device
from ..optim.adamw import adamw_step
from ..optim.base import StructuredOptimizer, apply_updates, grad_flags, state_bytes, sum_counters
from ..optim.update_counts import UpdateCounts, startup_line
from .exchange import (
    ExchangePlan,
    Links,
    device_vector,
    post_gradients,
    post_updates,
    receive_gradients,
    received_updates,
)
from .options import DistributedOptions
from .ownership import MatrixInfo, plan_replica_owners
from .pieces import (
    Entry,
    GradViews,
    Piece,
    cut,
    dtensor_pieces,
    flat_layout_piece,
    hp_mapping_piece,
    is_dtensor,
    shape_numel,
    whole_piece,
)
from .replicas import ReplicaGroups
from .state_store import StateStore
from .state_stream import StateStream, chunk_indices


class DistributedStructuredOptimizer(Optimizer):
    """ZeRO-aware wrapper: one owner per matrix, DeepSpeed's partitions for the rest."""

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_cls: type[StructuredOptimizer],
        options: dict[str, Any],
        cost_model: str = "flops",
        process_group: Optional[dist.ProcessGroup] = None,
        ownership: str = "local",
        ownership_group_size: Optional[int] = None,
        dist_options: Optional[DistributedOptions] = None,
    ) -> None:
        """``dist_options`` (a config's "ds_structopt" block) when given, else the three keywords."""
        placement = dist_options or DistributedOptions(cost_model=cost_model, ownership=ownership,  # type: ignore[arg-type]
                                                       ownership_group_size=ownership_group_size)
        self.math = optimizer_cls(params, **options)
        self.group = process_group
        self.rank = dist.get_rank(process_group) if dist.is_initialized() else 0
        self.world = dist.get_world_size(process_group) if dist.is_initialized() else 1
        groups = [{k: v for k, v in g.items()} for g in self.math.param_groups]
        super().__init__(groups, self.math.defaults)
        self.entries: list[list[Entry]] = []
        for gi, g in enumerate(self.math.param_groups):
            names = g.get("param_names") or [f"group{gi}.param{j}" for j in range(len(g["params"]))]
            self.entries.append([Entry(n, p, p.ds_shape if hasattr(p, "ds_shape") else p.shape, self.math.is_matrix(p, g))
                                 for n, p in zip(names, g["params"])])
        self._group_index = {id(g): i for i, g in enumerate(self.param_groups)}
        # Every parameter's slot in _decide's flag vector (the same order on every rank), and what
        # the last decision found: its whole gradient not all zero (None: not seen then).
        self._slot = {id(e): k for k, e in enumerate(e for es in self.entries for e in es)}
        self._live: list[Optional[bool]] = []
        self._index: Optional[tuple[Any, Tensor]] = None  # _decide's slot index on the device, per layout
        self._segments: dict[Any, Any] = {}  # _decide's segment lengths per partition layout (device tensors)
        self._entry_by_param = {id(e.lp): e for es in self.entries for e in es}
        self._all_groups = list(self.param_groups)
        self._infos = [MatrixInfo.of(e.name, e.shape[0], shape_numel(e.shape) // e.shape[0], optimizer_cls, g)
                       for es, g in zip(self.entries, self.math.param_groups) for e in es if e.is_matrix]
        self.dist_options = placement
        self.state_stream = StateStream()  # offloaded state through the owners' math (state_stream.py)
        self._cost_model = placement.cost_model
        self._comm_dtype = torch.bfloat16 if placement.comm_dtype == "bf16" else torch.float32
        self.ownership = placement.ownership
        first = next((p for g in self.math.param_groups for p in g["params"]), None)
        self._construction_device = first.device if first is not None else torch.device("cpu")
        self.replicas = ReplicaGroups(self.world, placement.ownership_group_size, self.group, device=self._construction_device)
        self._owners: Optional[dict[str, list[int]]] = None
        self._my_owners: Optional[dict[str, int]] = None
        # ZeRO-3: flat partition (by id) -> [(model param, offset in flat, start in param, numel)],
        # registered by the DeepSpeed integration (stage 3 has no _hp_mapping).
        self.flat_layouts: dict[int, list[tuple[Tensor, int, int, int]]] = {}
        self.flat_tensors: dict[int, Tensor] = {}
        self.matrix_state: dict[str, dict[str, Any]] = {}
        self.elem_state: dict[str, dict[str, Any]] = {}
        # ZeRO-Infinity (offload_optimizer to NVMe): states parked in files between steps, set by
        # the DeepSpeed integration
        self.state_store: Optional[StateStore] = None
        # ZeRO-Offload: DeepSpeed's CPU Adam kernel for the elementwise pieces in host memory
        # (integrations/host_adam.py), set by the DeepSpeed integration
        self.host_adam: Optional[Any] = None
        self._holders: dict[Any, dict[str, list[tuple[int, int, int]]]] = {}  # layout -> name -> [(rank, start, numel)]
        self._plans: dict[Any, ExchangePlan] = {}  # layout -> who sends what to whom (static once owners are set)
        self._piece_cache: dict[Any, Any] = {}  # partition -> its pieces (see _cached_pieces)
        self.comm_bytes = 0
        self.skipped_steps = 0  # whole steps skipped for non-finite gradients (any rank)
        self._bracket: Optional[dict[str, Any]] = None  # set by optimizer_step()
        every = [e for es in self.entries for e in es]
        self._elementwise_slots = [k for k, e in enumerate(every) if not e.is_matrix]
        # structured: what this rank computed as an owner; elementwise: the whole model's (every rank knows it)
        self.counts = UpdateCounts(eligible_matrices=len(self._infos), elementwise_params=len(self._elementwise_slots))
        if self.rank == 0:
            print(startup_line(self.math.NAME, [e.name for e in every if e.is_matrix],
                               [e.name for e in every if not e.is_matrix],
                               f"{self.world} rank(s), one owner per matrix"
                               + (f" per group of {self.replicas.size}" if self.replicas.size < self.world else "")),
                  flush=True)

    # ----- ownership ------------------------------------------------------
    @property
    def owners(self) -> dict[str, int]:
        """Matrix name -> the rank that owns it for this rank's replica group (the whole group
        unless ``ownership_group_size`` is set)."""
        if self._my_owners is None:
            self._my_owners = {name: ranks[self.replicas.index] for name, ranks in self.replica_owners.items()}
        return self._my_owners

    @property
    def replica_owners(self) -> dict[str, list[int]]:
        """Matrix name -> its owner in each replica group. "local" needs DeepSpeed's partitions,
        so it is planned on first use (the first step, or a checkpoint save/load), which every
        rank reaches together."""
        if self._owners is None:
            held = None if self.ownership == "balanced" or self.world == 1 else self._held_counts()
            self._owners = plan_replica_owners(self._infos, self.world, self.replicas.size, self._cost_model, held)
        return self._owners

    def _held_counts(self) -> dict[str, list[int]]:
        """Elements of every matrix in every rank's partition (one all_gather_object)."""
        local = {e.name: sum(p.numel for p in e.pieces) for e in self.entries_with_pieces() if e.is_matrix}
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, local, group=self.group)
        return {info.name: [int(table.get(info.name, 0)) for table in gathered] for info in self._infos}

    # ----- layout ---------------------------------------------------------
    def _pieces(self, gi: int, group: dict[str, Any]) -> list[Entry]:
        """Attach this rank's pieces to the group's entries (full params, or fragments of a flat partition)."""
        entries = self.entries[gi]
        params = group["params"]
        if len(params) == 1 and id(params[0]) in self.flat_layouts:
            return self._layout_pieces(gi, params[0])
        # One tensor per parameter: the model's own (fp32, no ZeRO) or DeepSpeed's fp32 master
        # copies (FP16_UnfusedOptimizer for bf16/fp16 at stage 0).
        per_param = len(params) == len(entries) and all(p.shape == e.shape for p, e in zip(params, entries))
        if per_param:  # FSDP2: this rank's rows of the parameter; else the parameter itself
            for e, own in zip(entries, params):
                e.pieces = dtensor_pieces(own) if is_dtensor(own) else [whole_piece(own)]
        else:  # a ZeRO-1/2 flat partition: views of it, made once while it keeps its storage
            def build() -> list[list[Piece]]:
                return [[p] if (p := hp_mapping_piece(e.lp, params[0])) is not None else [] for e in entries]

            for e, mine in zip(entries, self._cached_pieces(("zero12", gi), params[0], build)):
                e.pieces = mine
        if not per_param and not any(e.pieces for e in entries) and params and params[0].numel() > 0:
            raise RuntimeError(
                f"{self.math.NAME}: cannot map DeepSpeed's flat partition of param group {gi} back to the "
                "model's parameters (no _hp_mapping); this DeepSpeed optimizer wrapper is not supported")
        self._gather_holders(gi, entries)
        return entries

    def entries_with_pieces(self) -> list[Entry]:
        """Every parameter with this rank's pieces attached (for checkpoints; no communication)."""
        if self.flat_layouts:
            return [e for flat_id in self.flat_layouts for e in self._attach_layout(self.flat_tensors[flat_id])]
        out = []
        for gi, group in enumerate(self.param_groups):
            if group["params"]:
                out.extend(self._pieces(gi, group))
        return out

    def _attach_layout(self, flat: Tensor) -> list[Entry]:
        """Attach the pieces of one ZeRO-3 sub-group partition; returns that sub-group's entries.
        The pieces are views of the partition, made once while it keeps its storage."""
        def build() -> tuple[list[Entry], list[list[Piece]]]:
            members, pieces = [], []
            for lp, offset, start, numel in self.flat_layouts[id(flat)]:
                piece = flat_layout_piece(flat, offset, start, numel)
                members.append(self._entry_by_param[id(lp)])
                pieces.append([piece] if piece is not None else [])
            return members, pieces

        members, pieces = self._cached_pieces(("zero3", id(flat)), flat, build)
        for e, mine in zip(members, pieces):
            e.pieces = mine
        return members

    def _cached_pieces(self, key: Any, partition: Tensor, build: Callable[[], Any]) -> Any:
        """``build()``'s pieces of ``partition``, rebuilt only when the partition is another tensor
        or its storage moved (views made earlier would then point at the old memory)."""
        storage = (partition.untyped_storage()._cdata, partition.storage_offset(), tuple(partition.shape))
        cached = self._piece_cache.get(key)
        if cached is None or cached[0] is not partition or cached[1] != storage:
            cached = self._piece_cache[key] = (partition, storage, build())
        return cached[2]

    def _layout_pieces(self, gi: int, flat: Tensor) -> list[Entry]:
        """Pieces of a ZeRO-3 sub-group partition: only this sub-group's entries are returned."""
        members = self._attach_layout(flat)
        self._gather_holders((gi, id(flat)), members)
        return members

    def _gather_holders(self, key: Any, entries: list[Entry]) -> None:
        """Which rank holds which range of every matrix (all ranks exchange their layout once)."""
        self._current_holders = key
        if key not in self._holders:
            local = {e.name: [(p.start, p.numel) for p in e.pieces] for e in entries if e.is_matrix}
            gathered: list[Any] = [None] * self.world
            if self.world > 1:
                dist.all_gather_object(gathered, local, group=self.group)
            else:
                gathered = [local]
            holders: dict[str, list[tuple[int, int, int]]] = {}
            for rank, table in enumerate(gathered):
                for name, ranges in table.items():
                    holders.setdefault(name, []).extend((rank, s, n) for s, n in ranges)
            self._holders[key] = holders

    # ----- the step -------------------------------------------------------
    @contextmanager
    def optimizer_step(self, pending_grads: Optional[Callable[[], list[tuple[Optional[Tensor], list[Tensor]]]]] = None
                       ) -> Iterator[None]:
        """Bracket one optimizer step that the caller splits into several ``step()`` calls.

        DeepSpeed calls ``step()`` once per param group (ZeRO-1/2) or per sub-group (ZeRO-3).
        Inside the bracket the first call makes the step's one decision (skip it for a
        non-finite gradient anywhere, or take it; and which elementwise parameters have a
        gradient that is not all zero) for every later call, so a NaN in the last sub-group
        cannot leave the first ones stepped, and a skip is counted once.
        ``pending_grads`` returns the gradients the caller will hand us in later calls (they
        are not on our partitions yet), so that first decision sees all of them: per partition,
        ``(the fp32 partition it will land on, its tensors laid end to end)``; with the partition
        unknown (None) they count for the step's decision only.
        """
        self._bracket = {"decision": None, "pending": pending_grads}
        try:
            yield
        finally:
            self._bracket = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Presence of a gradient is the same on every rank (ZeRO-3's empty sub-groups, unused
        # parameters); its values are not, so nothing below skips collectives on local values.
        work = [(self._group_index.get(id(group), 0), group) for group in self.param_groups
                if group["params"] and any(p.grad is not None for p in group["params"])]
        decision = self._decide(work)
        if decision != "step":  # "skip": non-finite somewhere; "idle": all zero everywhere (state init)
            return loss
        for gi, group in work:
            entries = self._pieces(gi, group)  # entries are shared by groups with one index: use at once
            views = GradViews([p for e in entries for p in e.pieces])  # this call's gradient views
            self._step_elementwise(group, [e for e in entries if not e.is_matrix and e.pieces], views)
            self._step_matrices(gi, group, [e for e in entries if e.is_matrix], views)
        return loss

    def _decide(self, work: list) -> str:
        """"step", "skip" (a non-finite gradient on any rank) or "idle" (every gradient on every rank
        is zero: DeepSpeed's state-initialising call). Also sets ``_live``: per parameter
        (elementwise ones and matrices), whether its whole gradient (every rank's pieces) is not all zero, the
        single-process optimizer's rule for stepping it (a piece's own gradient may be all zero
        while the parameter's is not: the embedding rows of tokens absent from the batch).

        One small all-reduce per optimizer step, made by every rank of the group, and one host
        read: [non-finite here, non-zero here, per parameter: non-zero here], MAX."""
        bracket = self._bracket
        if bracket is not None and bracket["decision"] is not None:
            return bracket["decision"]
        views: list[Tensor] = []  # gradient tensors looked at one by one (pieces, or parts of pending ones)
        slots: list[int] = []     # each one's parameter slot, -1 for none
        segmented: list[tuple[list[Tensor], list[tuple[int, int, int]]]] = []  # partitions reduced per range
        seen: set[int] = set()    # slots of parameters all of whose pieces are looked at (alike on every rank)
        for gi, group in work:
            entries = self._pieces(gi, group)
            params = group["params"]
            layout = self._pending_layout(params[0]) if len(params) == 1 else None
            grad = params[0].grad if layout is not None else None
            if layout is not None and grad is not None and grad.dtype == torch.float32 and grad.numel() > 0:
                seen.update(layout[0])  # a flat partition: one reduction per range, not a view per piece
                segmented.append(([grad], layout[1]))
                continue
            for e in entries:
                slot = self._slot.get(id(e), -1)
                if slot >= 0:
                    seen.add(slot)
                for piece in e.pieces:
                    g = piece.grad()
                    if g is not None:
                        views.append(g)
                        slots.append(slot)
        if bracket is not None and bracket["pending"] is not None:
            for flat, grads in bracket["pending"]():
                layout = self._pending_layout(flat) if all(g is not None for g in grads) else None
                if layout is not None and max((offset + numel for offset, numel, _ in layout[1]), default=0) > sum(
                        g.numel() for g in grads):
                    layout = None  # the tensors do not cover the partition's pieces: not laid out as we think
                if layout is None:  # unknown partition: its gradients count for the decision only
                    parts = [(g, -1) for g in grads if g is not None and g.numel()]
                elif all(g.dtype == torch.float32 for g in grads):
                    seen.update(layout[0])
                    segmented.append((list(grads), layout[1]))
                    continue
                else:
                    members, ranges = layout
                    seen.update(members)
                    parts = cut(grads, ranges)
                views += [v for v, _ in parts]
                slots += [slot for _, slot in parts]
        n = len(self._slot)
        near = views[0].device if views else (segmented[0][0][0].device if segmented else None)
        device = comm_device(self.group, near) if self.world > 1 else (near or torch.device("cpu"))
        if views or segmented:
            found: list[Tensor] = []
            if views:
                norms = torch._foreach_norm(views, float("inf"))
                if all(t.dtype == norms[0].dtype and t.device == norms[0].device for t in norms):
                    found.append(torch.stack(norms).to(device=device, dtype=torch.float32))  # one copy, not one per view
                else:
                    found.append(torch.stack([m.float().to(device) for m in norms]))
            for tensors, ranges in segmented:
                absmax, segment_slots = self._segment_absmax(tensors, ranges)
                found.append(absmax.to(device))
                slots = slots + segment_slots
            maxes = found[0] if len(found) == 1 else torch.cat(found)
            nonzero = (maxes != 0).float()
            index = self._slot_index(slots, n, device)
            per_param = torch.zeros(n + 1, device=device).scatter_reduce_(0, index, nonzero, "amax")[:n]
            flags = torch.cat([(~torch.isfinite(maxes)).any().float().reshape(1), nonzero.max().reshape(1), per_param])
        else:
            flags = torch.zeros(n + 2, device=device)
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        # read back as "finite everywhere", "non-zero somewhere", each parameter "non-zero somewhere"
        # (flags are exactly 0 or 1): one host read
        finite, live, *per_param_live = torch.cat([flags[:1] == 0, flags[1:] != 0]).tolist()
        self._live = [bool(per_param_live[k]) if k in seen else None for k in range(n)]
        decision = "skip" if not finite else ("step" if live else "idle")
        if decision == "step":
            self.counts.begin_step()
            self.counts.add(elementwise=sum(1 for k in self._elementwise_slots if self._live[k]))
        if decision == "skip":
            self.skipped_steps += 1  # the whole step, on every rank: no state or weight changes
        if bracket is not None:
            bracket["decision"] = decision
        return decision

    def _pending_layout(self, flat: Optional[Tensor]) -> Optional[tuple[list[int], list[tuple[int, int, int]]]]:
        """For a partition whose gradient is still pending: the slots of the parameters
        it has pieces of (on any rank: the same on every rank) and this rank's pieces of them as
        (offset in the partition, numel, slot); None for a partition we do not know."""
        if flat is None:
            return None
        if id(flat) in self.flat_layouts:  # a ZeRO-3 sub-group
            members = [(self._entry_by_param[id(lp)], offset, numel)
                       for lp, offset, _, numel in self.flat_layouts[id(flat)]]
        else:  # a ZeRO-1/2 param group's flat partition: the model's parameters map into it
            gi = next((i for i, g in enumerate(self._all_groups)
                       if len(g["params"]) == 1 and g["params"][0] is flat), None)
            if gi is None or (len(self.entries[gi]) == 1 and self.entries[gi][0].shape == flat.shape):
                return None  # not a flat partition (_pieces takes it for the parameter itself)
            members = []
            for e in self.entries[gi]:
                mapping = getattr(e.lp, "_hp_mapping", None)
                hp = mapping.hp_fragment_address if mapping is not None else None
                members.append((e, hp.start, hp.numel) if hp is not None else (e, 0, 0))
        slots = [(self._slot[id(e)], offset, numel) for e, offset, numel in members]
        return [slot for slot, _, _ in slots], [(offset, numel, slot) for slot, offset, numel in slots if numel > 0]

    def _segment_absmax(self, tensors: list[Tensor], ranges: list[tuple[int, int, int]]) -> tuple[Tensor, list[int]]:
        """``tensors`` laid end to end (a partition's gradient), each range's largest absolute value
        (NaN where it holds one) in one segment max and one segment min per tensor instead of a
        norm per piece; returns (values, their slots: the range's, -1 between ranges). Segment
        lengths are device tensors made once per layout."""
        key = (tuple((t.numel(), t.device) for t in tensors), tuple(ranges))
        cached = self._segments.get(key)
        if cached is None:  # cut() walks the ranges as the views would: keep its lengths and slots
            lengths: list[Optional[Tensor]] = []
            owners: list[int] = []
            pos = 0
            for t in tensors:
                parts = cut([t], [(offset - pos, numel, slot) for offset, numel, slot in ranges])
                lengths.append(torch.tensor([v.numel() for v, _ in parts], dtype=torch.int64, device=t.device)
                               if parts else None)
                owners += [slot for _, slot in parts]
                pos += t.numel()
            cached = self._segments[key] = (lengths, owners)
        out = []
        for t, segment_lengths in zip(tensors, cached[0]):
            if segment_lengths is None:
                continue
            flat = t.reshape(-1)
            high = torch.segment_reduce(flat, "max", lengths=segment_lengths)
            low = torch.segment_reduce(flat, "min", lengths=segment_lengths)
            out.append(torch.maximum(high, low.neg()))  # NaN stays NaN
        if not out:
            return torch.zeros(0, device=tensors[0].device), cached[1]
        return (torch.cat(out) if len(out) > 1 else out[0]), cached[1]

    def _slot_index(self, slots: list[int], n: int, device: torch.device) -> Tensor:
        """The decision's scatter index on the device, built once per layout: the same gradient
        views come every step, so no host-to-device copy after the first."""
        key = (tuple(slots), device)
        if self._index is None or self._index[0] != key:
            self._index = (key, torch.tensor([slot if slot >= 0 else n for slot in slots], device=device))
        return self._index[1]

    def _live_of(self, e: Entry) -> Optional[bool]:
        """Whether the step's decision found ``e``'s whole gradient not all zero (None: not seen)."""
        slot = self._slot.get(id(e))
        return self._live[slot] if slot is not None and slot < len(self._live) else None

    def _step_elementwise(self, group: dict[str, Any], entries: list[Entry], views: GradViews) -> None:
        """AdamW on this rank's pieces of the parameters whose whole gradient is not all zero
        (``_decide``; non-finite ones skipped the whole step), every piece of such a parameter
        stepped, whatever its own gradient: the single-process optimizer's step of the whole."""
        params, grads, states, names = [], [], [], []
        for e in entries:
            live = self._live_of(e)
            if live is False:
                continue
            for piece in e.pieces:
                g = views.of(piece)
                if g is None:
                    continue
                # not seen when the step was decided (a caller bracketing calls without telling us the
                # pending gradients): only this piece's own gradient is known here
                if live is None and not grad_flags([g])[0][1]:
                    continue
                params.append(piece.param)
                grads.append(g)
                names.append(f"{e.name}#{piece.start}")
                states.append(self.elem_state.setdefault(names[-1], {}))
        if params:
            with self._resident(list(zip(names, states))):
                # under ZeRO-Offload the pieces are host fp32 partitions: DeepSpeed's CPU Adam kernel steps them
                host = self.host_adam is not None and self.host_adam.takes(params, grads, states)
                (self.host_adam.step if host else adamw_step)(
                    params, grads, states, lr=group["lr"], betas=self.math.adam_betas(group),
                    eps=group["adam_eps"], weight_decay=self.math.adam_weight_decay(group))

    def _step_matrices(self, gi: int, group: dict[str, Any], entries: list[Entry],
                       views: GradViews) -> None:
        """Gather owned gradients, compute updates, return them (``exchange.py``): an owner's
        math on what it holds whole runs while the other pieces are in flight."""
        holders = self._holders[self._current_holders]
        entries = [e for e in entries if holders.get(e.name)]
        plan = self._plan(entries, holders)
        home = self._device(group)  # the partitions: host memory under ZeRO-Offload
        device = self._work_device(home)  # our messages (and the owners' math, unless on the host)
        on_host = self._math_on_host(home, device)
        math_device = home if on_host else device
        links = Links(self.group, self.replicas.group, self._global_rank)
        # before any message is posted (a collective between posting and waiting would stall them)
        weights = self._weight_rms(plan, entries, device) if group.get("relative_step") else None
        if weights is not None and on_host:
            weights = {i: w.to(home) for i, w in weights.items()}

        # 1. gradient pieces to every owner that lacks them (its replica owner in every group)
        dtype = self._comm_dtype
        incoming, sent = post_gradients(plan, entries, device, links, dtype, views)
        self.comm_bytes += sent
        # 2. owners compute: first what is already here, then what arrives
        local = {i: self._assemble_local(math_device, entries[i], views) for i in plan.local}
        updates = self._owner_updates(group, entries, {i: g for i, (g, _) in local.items()}, weights, home,
                                      scratch=all(copied for _, copied in local.values()))
        del local
        gathered = receive_gradients(incoming)
        if on_host:  # the gathered gradients go to the state (our copies: scratch either way)
            gathered = {i: g.to(home) for i, g in gathered.items()}
            incoming.full.clear()  # their GPU buffers are free now
        updates.update(self._owner_updates(group, entries, gathered, weights, home, scratch=True))
        del gathered
        sent_grads = incoming.sent
        del incoming  # the assembled gradients and their messages: freed before the return phase
        owned = plan.owned
        flat = {i: updates[i][0] for i in owned}
        if dtype != torch.float32:  # owners apply exactly what holders receive (replicas stay equal)
            for u in flat.values():
                u.copy_(u.to(dtype))
        # 3. update slices back to the other holders in this replica group, with the step sizes
        # where holders cannot know them (they stay on the device: one vector, never read)
        sizes: Optional[dict[int, Tensor]] = None
        if self._sizes_travel(group, entries):
            vector = device_vector([updates[i][1] for i in owned], device)
            sizes = dict(zip(owned, (vector if dtype == torch.float32 else vector.to(dtype).float()).unbind()))
        outgoing = flat
        if on_host:  # the slices other holders need go to the GPU for NCCL; ours are applied from the host
            needed = {i for _, ranges, _ in plan.return_sends for i, _, _ in ranges}
            outgoing = {i: u.to(device) if i in needed else u for i, u in flat.items()}
        works, inbox, sent = post_updates(plan, outgoing, sizes, entries, device, links, dtype, sent_grads)
        self.comm_bytes += sent
        for w in works:  # sends read the updates, which the apply scales in place
            w.wait()
        lr = group["lr"]
        pieces = [(piece, flat[i].narrow(0, piece.start, piece.numel), lr if sizes is None else sizes[i])
                  for i in owned if not _skipped(updates[i][1]) for piece in entries[i].pieces]
        pieces += [(piece, chunk, lr if size is None else size)
                   for piece, chunk, size, i in received_updates(inbox, entries, sizes is not None, dtype)
                   if self._live_of(entries[i]) is not False]
        if home != device:  # offloaded partitions: the update slices (and device step sizes) go home first
            pieces = [(piece, chunk.to(home), size if not isinstance(size, Tensor) else size.to(home))
                      for piece, chunk, size in pieces]
        self._apply_pieces(pieces, group["weight_decay"])

    def _sizes_travel(self, group: dict[str, Any], entries: list[Entry]) -> bool:
        """Whether update messages carry step sizes: when the family's sizes are not simply the
        group's lr, or when the step's decision did not see whether some matrix was skipped.
        Alike on every rank (the decision is)."""
        return not self.math.step_size_is_lr(group) or any(self._live_of(e) is None for e in entries)

    def _plan(self, entries: list[Entry], holders: dict[str, list[tuple[int, int, int]]]) -> ExchangePlan:
        """The exchange plan of the current partition layout (built on its first step)."""
        key = self._current_holders
        if key not in self._plans:
            self._plans[key] = ExchangePlan.build(
                self.rank, [e.name for e in entries], [shape_numel(e.shape) for e in entries], holders,
                self.owners, self.replica_owners, self.replicas.members())
        return self._plans[key]

    def _weight_rms(self, plan: ExchangePlan, entries: list[Entry], device: torch.device) -> dict[int, Tensor]:
        """Per owned matrix, a one-element tensor whose RMS is the whole weight's RMS (Adafactor's
        relative step needs it; an owner holds only its pieces under ZeRO/FSDP2).

        A matrix is "shared" when any of its owners (one per replica group) lacks it whole:
        then every rank adds the squares of its pieces (disjoint across ranks) in one
        all-reduce that every rank makes, since the set of shared matrices is the same on
        every rank (a reduction on the owner alone, or per replica group, would hang).
        Other matrices' owners compute it from their own pieces."""
        sums = torch.zeros(len(plan.shared), dtype=torch.float32, device=device)
        for j, i in enumerate(plan.shared):
            for piece in entries[i].pieces:
                sums[j] += piece.param.float().square().sum().to(device)
        if plan.shared and self.world > 1:
            dist.all_reduce(sums, group=self.group)
        total = dict(zip(plan.shared, sums))
        out = {}
        for i in plan.owned:
            e = entries[i]
            squares = total[i] if i in total else sum(p.param.float().square().sum().to(device) for p in e.pieces)
            out[i] = (squares / shape_numel(e.shape)).sqrt().reshape(1)
        return out

    def _owner_updates(self, group: dict[str, Any], entries: list[Entry], full_grads: dict[int, Tensor],
                       weight_rms: Optional[dict[int, Tensor]] = None, home: Optional[torch.device] = None,
                       scratch: bool = False) -> dict[int, tuple[Tensor, Union[float, Tensor]]]:
        """Updates (flat) and step sizes of owned matrices (by entry index) from their full
        gradients; a step size of 0.0 = skipped (its whole gradient is all zero). State kept on
        ``home`` (host memory under ZeRO-Offload), or parked on NVMe, is streamed through the math
        on the gradients' device chunk by chunk (``state_stream.py``).
        ``scratch``: the gradients are our own buffers, so updates are written into them."""
        updates: dict[int, tuple[Tensor, Union[float, Tensor]]] = {}
        mine = list(full_grads)
        if not mine:
            return updates
        grads = [full_grads[i].view(entries[i].shape[0], -1) for i in mine]
        # non-finite gradients skipped the whole step (_decide), which also found the all-zero ones;
        # a matrix it did not see (pending gradients not described to it) is read here
        nonzero = [self._live_of(entries[i]) for i in mine]
        unseen = [k for k, flag in enumerate(nonzero) if flag is None]
        for k, (_, flag) in zip(unseen, grad_flags([grads[k] for k in unseen])):
            nonzero[k] = flag
        live = [(i, g) for i, g, ok in zip(mine, grads, nonzero) if ok]
        for i, ok in zip(mine, nonzero):
            if not ok:  # skipped: step size 0 tells the holders to leave it
                zeros = full_grads[i].zero_() if scratch else torch.zeros(shape_numel(entries[i].shape), device=grads[0].device)
                updates[i] = (zeros, 0.0)
        if not live:
            return updates
        states = [self.matrix_state.setdefault(entries[i].name, {}) for i, _ in live]
        weights = [weight_rms[i] for i, _ in live] if weight_rms is not None else [entries[i].lp for i, _ in live]

        def compute(chunk: list[int]) -> None:
            ups, sizes = self.math.matrix_updates(group, [live[k][1] for k in chunk], [states[k] for k in chunk],
                                                  weights=[weights[k] for k in chunk], scratch=scratch)
            for k, u, lr in zip(chunk, ups, sizes.unbind() if isinstance(sizes, Tensor) else sizes):
                updates[live[k][0]] = (u.reshape(-1), lr)

        device = live[0][1].device
        if self.state_store is None and (home is None or torch.device(home) == device):
            compute(list(range(len(live))))  # the state is where the math runs: one call
        else:  # offloaded: streamed through the math in chunks (the phases first, alike for any split)
            shapes = [tuple(g.shape) for _, g in live]
            self.math.assign_refresh_phases(group, states, shapes)
            limit = int(self.dist_options.offload_stream_mib * 2**20)
            chunks = chunk_indices([4 * self.math.state_elements(m, n, group) for m, n in shapes], limit)
            self.state_stream.run([(entries[i].name, st) for (i, _), st in zip(live, states)], chunks, device, home,
                                  self.state_store, compute)
        self.counts.add(structured=len(live))
        return updates

    def _assemble_local(self, device: torch.device, e: Entry, views: GradViews) -> tuple[Tensor, bool]:
        """The full gradient of a matrix whose pieces are all on this rank, on ``device`` (missing
        grad -> zeros: skipped), and whether we may write into it (our copy, or a DeepSpeed partition's)."""
        if len(e.pieces) == 1 and e.pieces[0].numel == shape_numel(e.shape):
            g = views.of(e.pieces[0])
            if g is not None:
                full = g.to(device=device, dtype=torch.float32)
                return full, full is not g or e.pieces[0].scratch
        full = torch.zeros(shape_numel(e.shape), dtype=torch.float32, device=device)
        for piece in e.pieces:
            g = views.of(piece)
            if g is not None:
                full.narrow(0, piece.start, piece.numel).copy_(g)
        return full, True

    @staticmethod
    def _apply_pieces(pieces: list[tuple[Piece, Tensor, Union[float, Tensor]]], wd: float) -> None:
        """W <- W (1 - lr wd) - lr U on each (piece, its update slice, the matrix's step size: the
        group's lr, or a device tensor): the single-process rule (``apply_updates``; slices are
        scratch, scaled in place)."""
        if not pieces:
            return
        sizes = [lr for _, _, lr in pieces]
        apply_updates([p.param for p, _, _ in pieces], [u for _, u, _ in pieces],
                      torch.stack(sizes) if isinstance(sizes[0], Tensor) else sizes, wd,  # type: ignore[arg-type]
                      fp32_alike=all(p.fp32 for p, _, _ in pieces))  # pieces and slices are 1-D

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """DeepSpeed hands us its saved base-optimizer state when it loads its own partitions
        (``load_optimizer_states=True`` without our checkpoint code attached). Our state is not in
        it (it lives in the ``ds_structopt/`` files): take the groups' hyperparameters, in place;
        torch's version would replace the group dicts and detach DeepSpeed's partitions from our
        layout."""
        self.load_hyperparams(state_dict.get("param_groups", []))

    def hyperparams(self) -> list[dict[str, Any]]:
        """Each param group's current values (lr, betas, ... as a scheduler left them), of every
        group even while DeepSpeed has narrowed ``param_groups`` to one (ZeRO-1/2 step calls)."""
        return [{k: v for k, v in g.items() if k not in _NOT_HYPERPARAMS} for g in self._all_groups]

    def load_hyperparams(self, values: list[dict[str, Any]]) -> None:
        """Set every group's hyperparameters from :meth:`hyperparams` output, in place."""
        if len(values) != len(self._all_groups):
            raise ValueError(f"saved optimizer state has {len(values)} param groups, this optimizer "
                             f"{len(self._all_groups)}")
        for group, saved in zip(self._all_groups, values):
            group.update({k: v for k, v in saved.items() if k not in _NOT_HYPERPARAMS})

    @property
    def compute_device(self) -> torch.device:
        """Where owned state lives and our math runs: with the parameters (or DeepSpeed's
        partitions) we step. An owner may hold no piece of a matrix it owns (ZeRO-1/2), so
        this is never taken from the matrix's own pieces."""
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        for flat in self.flat_tensors.values():  # ZeRO-3 between steps: its groups are empty
            return flat.device
        return self._construction_device

    def _device(self, group: dict[str, Any]) -> torch.device:
        return group["params"][0].device

    def _work_device(self, home: torch.device) -> torch.device:
        """Where our messages (and an owner's math, unless ``offload_compute`` is "host") go: with
        the partitions, unless they are in host memory (ZeRO-Offload) and the group communicates
        on a GPU (NCCL, one rank included): then that GPU, with the state streamed from ``home``
        for the math (``state_stream.py``)."""
        return home if home.type != "cpu" else comm_device(self.group, home)

    def _math_on_host(self, home: torch.device, device: torch.device) -> bool:
        """``offload_optimizer.compute: "host"``: the owners' math runs in host memory beside the
        offloaded state (only gradients and updates cross to and from the GPU)."""
        return self.dist_options.offload_compute == "host" and home.type == "cpu" and device != home

    def _global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    # ----- introspection --------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Per-rank counters: state bytes, refreshes, failed decompositions, bytes moved by our step,
        and what the last optimizer step updated how (``optim/update_counts.py``)."""
        states = list(self.matrix_state.values()) + list(self.elem_state.values())
        out: dict[str, float] = {**sum_counters(states)}
        out["state_bytes"] = self.state_bytes()
        if self.state_store is not None:  # of which parked on NVMe between steps, and the step's I/O so far
            out["nvme_state_bytes"] = StateStore.parked_bytes(states)
            out["nvme_bytes_read"] = self.state_store.bytes_read
            out["nvme_bytes_written"] = self.state_store.bytes_written
        out["host_adam_tensors"] = self.host_adam.tensors_stepped if self.host_adam is not None else 0
        out["offload_chunks"] = self.state_stream.chunks_streamed  # chunks of owned state streamed under offload
        out["owned_matrices"] = len(self.matrix_state)
        out["skipped_steps"] = self.skipped_steps
        out["comm_bytes"] = self.comm_bytes
        out.update(self.counts.metrics())
        out["replica_groups"] = self.replicas.count  # structured_updates summed over ranks / this = the model's
        return out

    def state_bytes(self) -> int:
        """Bytes of our state, wherever it is (memory, or parked on NVMe)."""
        states = list(self.matrix_state.values()) + list(self.elem_state.values())
        return state_bytes(states) + StateStore.parked_bytes(states)

    def _resident(self, named: list[tuple[str, dict[str, Any]]]) -> Any:
        """The states in memory for a step call: read from NVMe and parked after, when there."""
        return self.state_store.resident(named) if self.state_store is not None else nullcontext()

    def park_states(self, names: Optional[list[str]] = None) -> None:
        """States restored from a checkpoint (``names``: matrix or ``name#start`` keys; None: all)
        written to NVMe as a step leaves them, when offloaded there."""
        if self.state_store is None:
            return
        if names is None:
            names = list(self.matrix_state) + list(self.elem_state)
        self.state_store.park([(n, self.matrix_state[n] if n in self.matrix_state else self.elem_state[n])
                               for n in names])


def _skipped(step_size: Union[float, Tensor]) -> bool:
    """A step size of exactly 0.0 on the host: nothing to apply (a device tensor is never read)."""
    return not isinstance(step_size, Tensor) and step_size == 0.0


_NOT_HYPERPARAMS = {"params", "param_names"}  # group keys that are not the optimizer's values


