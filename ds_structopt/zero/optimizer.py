"""The optimizer DeepSpeed drives: our math, with each matrix's state on one owner rank.

DeepSpeed hands its client optimizer either the model's own parameters (no
ZeRO partitioning, fp32) or, at ZeRO-1/2, one flat fp32 partition per param
group whose ``.grad`` is this rank's slice of the reduced, unscaled and clipped
gradient. Each model parameter then carries ``_hp_mapping``: which range of the
parameter lies at which offset of this rank's partition. From that we know,
for every matrix, which ranks hold which pieces.

One ``step()`` call per param group (DeepSpeed calls it that way), once per
optimizer step, after DeepSpeed's reduction, overflow check and clipping:

1. owners receive the full gradient of the matrices they own (``reduce`` of a
   zero-filled bucket into which every rank writes its pieces; skipped when
   the owner already holds the whole matrix);
2. owners compute updates with the single-process math
   (``StructuredOptimizer.matrix_updates``), state kept only there;
3. updates (and per-matrix step sizes; 0 = skipped) go back by ``broadcast``
   from each owner to the ranks holding pieces, and every rank applies
   W <- W (1 - lr wd) - lr U to the pieces in its own partition;
4. elementwise parameters run AdamW on this rank's pieces only.

Owners are planned once, on first use, from where DeepSpeed put the pieces
(``ownership="local"``: the rank holding most of a matrix owns it unless that
breaks a 1.25x load cap), so at ZeRO-1/2 steps 1 and 3 only move the matrices
that partition boundaries cut; ``"balanced"`` is plain LPT over the cost model.

Only reduce and broadcast are used (gloo and NCCL both have them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ..optim.adamw import adamw_step
from ..optim.base import COUNTERS, StructuredOptimizer, grad_flags
from .ownership import MatrixInfo, plan_owners, plan_owners_local


@dataclass
class Piece:
    """A contiguous range of a parameter (flattened) and where it lives on this rank."""

    start: int     # offset in the flattened parameter
    numel: int
    param: Tensor  # this rank's fp32 storage of the range (a 1-D view)
    source: Tensor  # the tensor DeepSpeed puts the gradient on (the param itself or the flat partition)
    offset: int    # where the range starts in ``source``

    def grad(self) -> Optional[Tensor]:
        g = self.source.grad
        return None if g is None else g.view(-1).narrow(0, self.offset, self.numel)


@dataclass
class Entry:
    name: str
    lp: Tensor                 # the model's parameter object (shape, names, _hp_mapping)
    shape: torch.Size
    is_matrix: bool
    pieces: list[Piece] = field(default_factory=list)  # filled per step (views into the partition)


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
    ) -> None:
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
        self._infos = [MatrixInfo(e.name, e.shape[0], _numel(e.shape) // e.shape[0])
                       for es in self.entries for e in es if e.is_matrix]
        self._cost_model, self._update_freq = cost_model, options.get("update_freq", 200)
        if ownership not in ("local", "balanced"):
            raise ValueError(f"ownership must be 'local' or 'balanced', got {ownership!r}")
        self.ownership = ownership
        self._owners: Optional[dict[str, int]] = None
        # ZeRO-3: flat partition (by id) -> [(model param, offset in flat, start in param, numel)],
        # registered by the DeepSpeed integration (stage 3 has no _hp_mapping).
        self.flat_layouts: dict[int, list[tuple[Tensor, int, int, int]]] = {}
        self.flat_tensors: dict[int, Tensor] = {}
        self.matrix_state: dict[str, dict[str, Any]] = {}
        self.elem_state: dict[str, dict[str, Any]] = {}
        self._holders: dict[int, dict[str, list[tuple[int, int, int]]]] = {}  # group -> name -> [(rank, start, numel)]
        self.comm_bytes = 0

    # ----- ownership ------------------------------------------------------
    @property
    def owners(self) -> dict[str, int]:
        """Matrix name -> owner rank. "local" needs DeepSpeed's partitions, so it is planned on first
        use (the first step, or a checkpoint save/load), which every rank reaches together."""
        if self._owners is None:
            if self.ownership == "balanced" or self.world == 1:
                self._owners = plan_owners(self._infos, self.world, self._cost_model, self._update_freq)
            else:
                self._owners = plan_owners_local(self._infos, self._held_counts(), self.world, self._cost_model,
                                                 self._update_freq)
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
            return self._layout_pieces(gi, params[0], entries)
        # One tensor per parameter: the model's own (fp32, no ZeRO) or DeepSpeed's fp32 master
        # copies (FP16_UnfusedOptimizer for bf16/fp16 at stage 0).
        per_param = len(params) == len(entries) and all(p.shape == e.shape for p, e in zip(params, entries))
        for e, own in zip(entries, params if per_param else [None] * len(entries)):
            e.pieces = []
            if per_param:
                e.pieces.append(Piece(0, own.numel(), own.view(-1), own, 0))
                continue
            flat = params[0]
            mapping = getattr(e.lp, "_hp_mapping", None)
            if mapping is None:
                continue
            lp_addr, hp_addr = mapping.lp_fragment_address, mapping.hp_fragment_address
            e.pieces.append(Piece(lp_addr.start, lp_addr.numel, flat.narrow(0, hp_addr.start, hp_addr.numel), flat, hp_addr.start))
        if not per_param and not any(e.pieces for e in entries) and params and params[0].numel() > 0:
            raise RuntimeError(
                f"{self.math.NAME}: cannot map DeepSpeed's flat partition of param group {gi} back to the "
                "model's parameters (no _hp_mapping); this DeepSpeed optimizer wrapper is not supported")
        self._gather_holders(gi, entries)
        return entries

    def entries_with_pieces(self) -> list[Entry]:
        """Every parameter with this rank's pieces attached (for checkpoints; no communication)."""
        if self.flat_layouts:
            by_param = {id(e.lp): e for es in self.entries for e in es}
            return [e for flat_id in self.flat_layouts for e in self._attach_layout(self.flat_tensors[flat_id], by_param)]
        out = []
        for gi, group in enumerate(self.param_groups):
            if group["params"]:
                out.extend(self._pieces(gi, group))
        return out

    def _attach_layout(self, flat: Tensor, by_param: dict[int, Entry]) -> list[Entry]:
        """Attach the pieces of one ZeRO-3 sub-group partition; returns that sub-group's entries."""
        members: list[Entry] = []
        for lp, offset, start, numel in self.flat_layouts[id(flat)]:
            e = by_param[id(lp)]
            e.pieces = [Piece(start, numel, flat.narrow(0, offset, numel), flat, offset)] if numel > 0 else []
            members.append(e)
        return members

    def _layout_pieces(self, gi: int, flat: Tensor, entries: list[Entry]) -> list[Entry]:
        """Pieces of a ZeRO-3 sub-group partition: only this sub-group's entries are returned."""
        members = self._attach_layout(flat, {id(e.lp): e for e in entries})
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
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["params"] or not any(p.grad is not None and bool(p.grad.any()) for p in group["params"]):
                # ZeRO-3 hands us one sub-group at a time (others empty); DeepSpeed's state-init
                # call has zero gradients: nothing to do either way.
                continue
            gi = self._group_index.get(id(group), 0)
            entries = self._pieces(gi, group)
            self._step_elementwise(group, [e for e in entries if not e.is_matrix and e.pieces])
            self._step_matrices(gi, group, [e for e in entries if e.is_matrix])
        return loss

    def _step_elementwise(self, group: dict[str, Any], entries: list[Entry]) -> None:
        params, grads, states = [], [], []
        for e in entries:
            for piece in e.pieces:
                g = piece.grad()
                if g is None:
                    continue
                st = self.elem_state.setdefault(f"{e.name}#{piece.start}", {})
                finite, nonzero = grad_flags([g])[0]
                if not finite:
                    st["nonfinite_skips"] = st.get("nonfinite_skips", 0) + 1
                if not (finite and nonzero):
                    continue
                params.append(piece.param)
                grads.append(g)
                states.append(st)
        if params:
            wd = group["adam_weight_decay"] if group["adam_weight_decay"] is not None else group["weight_decay"]
            adamw_step(params, grads, states, lr=group["lr"], betas=self.math.adam_betas(group),
                       eps=group["adam_eps"], weight_decay=wd)

    def _step_matrices(self, gi: int, group: dict[str, Any], entries: list[Entry]) -> None:
        holders = self._holders[self._current_holders]
        by_name = {e.name: e for e in entries}
        # 1. full gradients at the owners
        full_grads: dict[str, Tensor] = {}
        for owner in range(self.world):
            owned = [e for e in entries if self.owners[e.name] == owner and holders.get(e.name)]
            needs_reduce = [e for e in owned if not _covered(holders[e.name], owner, _numel(e.shape))]
            if owner == self.rank:
                for e in owned:
                    if e not in needs_reduce:
                        full_grads[e.name] = self._assemble_local(group, e)
            if not needs_reduce:
                continue
            sizes = [_numel(e.shape) for e in needs_reduce]
            buf = torch.zeros(sum(sizes), dtype=torch.float32, device=self._device(group))
            offset = 0
            for e, size in zip(needs_reduce, sizes):
                for piece in e.pieces:
                    g = piece.grad()
                    if g is not None:
                        buf.narrow(0, offset + piece.start, piece.numel).copy_(g)
                offset += size
            dist.reduce(buf, dst=self._global_rank(owner), group=self.group)
            self.comm_bytes += buf.numel() * 4
            if owner == self.rank:
                offset = 0
                for e, size in zip(needs_reduce, sizes):
                    full_grads[e.name] = buf.narrow(0, offset, size)
                    offset += size

        # 2. owners compute updates
        updates: dict[str, tuple[Tensor, float]] = {}
        mine = [by_name[n] for n in full_grads]
        if mine:
            grads = [full_grads[e.name].view(e.shape[0], -1) for e in mine]
            flags = grad_flags(grads)
            live = [(e, g) for e, g, (finite, nonzero) in zip(mine, grads, flags) if finite and nonzero]
            for e, (finite, nonzero) in zip(mine, flags):
                if not (finite and nonzero):  # skipped: step size 0 tells the holders to leave it
                    if not finite:
                        st = self.matrix_state.setdefault(e.name, {})
                        st["nonfinite_skips"] = st.get("nonfinite_skips", 0) + 1
                    updates[e.name] = (torch.zeros(_numel(e.shape)), 0.0)
            if live:
                states = [self.matrix_state.setdefault(e.name, {}) for e, _ in live]
                weights = [e.lp for e, _ in live]
                ups, sizes = self.math.matrix_updates(group, [g for _, g in live], states, weights=weights)
                for (e, _), u, lr in zip(live, ups, sizes):
                    updates[e.name] = (u.reshape(-1), lr)

        # 3. updates back to the holders, applied piecewise
        wd = group["weight_decay"]
        for owner in range(self.world):
            owned = [e for e in entries if self.owners[e.name] == owner and holders.get(e.name)]
            shared = [e for e in owned if any(r != owner for r, _, _ in holders[e.name])]
            if shared:
                sizes = [_numel(e.shape) for e in shared]
                buf = torch.zeros(sum(sizes) + len(shared), dtype=torch.float32, device=self._device(group))
                if owner == self.rank:
                    offset = 0
                    for k, (e, size) in enumerate(zip(shared, sizes)):
                        u, lr = updates[e.name]
                        buf.narrow(0, offset, size).copy_(u)
                        buf[sum(sizes) + k] = lr
                        offset += size
                dist.broadcast(buf, src=self._global_rank(owner), group=self.group)
                self.comm_bytes += buf.numel() * 4
                lrs = buf[sum(sizes):].tolist()
                offset = 0
                for e, size, lr in zip(shared, sizes, lrs):
                    self._apply(e, buf.narrow(0, offset, size), lr, wd)
                    offset += size
            if owner == self.rank:
                for e in owned:
                    if e not in shared:
                        u, lr = updates[e.name]
                        self._apply(e, u, lr, wd)

    def _assemble_local(self, group: dict[str, Any], e: Entry) -> Tensor:
        """The full gradient of a matrix whose pieces are all on this rank (missing grad -> zeros: skipped)."""
        if len(e.pieces) == 1 and e.pieces[0].numel == _numel(e.shape):
            g = e.pieces[0].grad()
            if g is not None:
                return g.float()
        full = torch.zeros(_numel(e.shape), dtype=torch.float32, device=self._device(group))
        for piece in e.pieces:
            g = piece.grad()
            if g is not None:
                full.narrow(0, piece.start, piece.numel).copy_(g)
        return full

    @staticmethod
    def _apply(e: Entry, update: Tensor, lr: float, wd: float) -> None:
        if lr == 0.0:
            return
        for piece in e.pieces:
            w = piece.param
            w32 = w if w.dtype == torch.float32 else w.float()
            if wd:
                w32.mul_(1.0 - lr * wd)
            w32.add_(update.narrow(0, piece.start, piece.numel), alpha=-lr)
            if w32 is not w:
                w.copy_(w32)

    def _device(self, group: dict[str, Any]) -> torch.device:
        return group["params"][0].device

    def _global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    # ----- introspection --------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Per-rank counters: state bytes, refreshes, failed decompositions, bytes moved by our step."""
        out = {k: 0 for k in COUNTERS}
        for st in list(self.matrix_state.values()) + list(self.elem_state.values()):
            for k in COUNTERS:
                out[k] += int(st.get(k, 0))
        out["state_bytes"] = self.state_bytes()
        out["owned_matrices"] = len(self.matrix_state)
        out["comm_bytes"] = self.comm_bytes
        return out

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in list(self.matrix_state.values()) + list(self.elem_state.values())
                   for t in st.values() if isinstance(t, Tensor))


def _numel(shape: Iterable[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _covered(holders: list[tuple[int, int, int]], rank: int, numel: int) -> bool:
    """Does ``rank`` hold the whole parameter (pieces adding up to all of it)?"""
    return sum(n for r, _, n in holders if r == rank) >= numel
