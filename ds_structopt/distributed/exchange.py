"""The exchange of one step: gradient pieces to owners, update slices back to holders.

Who holds which range of every matrix (DeepSpeed's partitions) and who owns it are fixed
after the first step, so who sends what to whom is derived once, per partition layout, as
an :class:`ExchangePlan` (per-peer lists; building it walks each matrix's holder ranges
once, never ranks x matrices). A step then only fills buffers and posts them:

1. :func:`post_gradients` / :func:`receive_gradients`: every rank sends, in one message
   per owner, its pieces of the matrices that owner lacks; the owner assembles full
   gradients (what it holds whole needs no message and is computed meanwhile);
2. :func:`post_updates` / :func:`received_updates`: every owner sends each holder in its
   replica group the holder's slices of the updates in one message, followed by one step
   size per matrix only where holders cannot know them (``relative_step``).

Messages are ``batch_isend_irecv`` of ``isend``/``irecv`` (gloo and NCCL); receivers size
their buffers from the plan, so no sizes travel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .pieces import Entry, GradViews, Piece, local, shape_numel, split_ranges

Ranges = list[tuple[int, int, int]]  # (rank, start, numel) of one matrix, flattened

TAG_GATHER, TAG_RETURN = 7301, 7302  # distinct tags: a rank pair may exchange both in one step


@dataclass
class Links:
    """Where messages go: the optimizer's process group, this rank's replica group, and the
    map from a rank in the optimizer's group to the global rank ``P2POp`` wants."""

    group: Optional[dist.ProcessGroup]
    replica_group: Optional[dist.ProcessGroup]
    to_global: Callable[[int], int]


@dataclass
class ExchangePlan:
    """The messages of one partition layout (one per peer and matrix), as indices into its matrix entries."""

    local: list[int] = field(default_factory=list)   # owned here, every piece here
    wanted: list[int] = field(default_factory=list)  # owned here, pieces elsewhere
    gather_sends: list[tuple[int, list[int]]] = field(default_factory=list)         # (owner, entries)
    gather_recvs: list[tuple[int, int, Ranges]] = field(default_factory=list)       # (src, size, [(entry, start, n)])
    return_sends: list[tuple[int, Ranges, list[int]]] = field(default_factory=list)  # (holder, ranges, entries)
    return_recvs: list[tuple[int, int, list[int]]] = field(default_factory=list)    # (owner, slices' size, entries)
    shared: list[int] = field(default_factory=list)  # some replica owner lacks it whole (weight RMS)
    gather_sent: int = 0  # elements this rank sends in gradient messages
    return_sent: int = 0  # elements of update slices this rank sends (step sizes not included)
    return_sent_mats: int = 0  # matrices in those messages (one step size each, where sizes travel)
    gaps: set[int] = field(default_factory=set)      # holders' ranges do not cover it all (zero-fill)
    landing: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # wanted -> its holders' (start, numel)
    returning: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # owned -> the (start, numel) sent back

    @property
    def owned(self) -> list[int]:
        """Every matrix this rank owns: first those it holds whole."""
        return self.local + self.wanted

    @classmethod
    def build(cls, rank: int, names: list[str], numels: list[int], holders: dict[str, Ranges],
              owner: dict[str, int], replica_owners: dict[str, list[int]], members: range) -> "ExchangePlan":
        """``names``/``numels``: the layout's matrices with holders, in the order every rank uses;
        ``owner``: this rank's replica group's owner of each; ``members``: that group's ranks."""
        plan = cls()
        sends: dict[int, list[int]] = {}
        recvs: dict[int, Ranges] = {}
        back: dict[int, Ranges] = {}
        back_from: dict[int, list[tuple[int, int]]] = {}  # owner -> [(entry, elements we hold)]
        for i, (name, numel) in enumerate(zip(names, numels)):
            held: dict[int, int] = {}
            for r, _, n in holders[name]:
                held[r] = held.get(r, 0) + n
            whole = {r for r, n in held.items() if n >= numel}
            if sum(held.values()) < numel:
                plan.gaps.add(i)
            if any(o not in whole for o in replica_owners[name]):
                plan.shared.append(i)
            if rank in held:
                for o in dict.fromkeys(replica_owners[name]):
                    if o != rank and o not in whole:
                        sends.setdefault(o, []).append(i)
                        plan.gather_sent += held[rank]
            mine = owner[name]
            if mine == rank:
                if rank in whole:
                    plan.local.append(i)
                else:
                    plan.wanted.append(i)
                    plan.landing[i] = [(start, n) for _, start, n in holders[name]]
                    for r, start, n in holders[name]:
                        if r != rank:
                            recvs.setdefault(r, []).append((i, start, n))
                for r, start, n in holders[name]:
                    if r != rank and r in members:
                        back.setdefault(r, []).append((i, start, n))
            elif rank in held:
                back_from.setdefault(mine, []).append((i, held[rank]))
        # one message per (peer, matrix): each lands straight in its place and leaves as a view
        # of its partition or update (no packing copies, which at ZeRO-3 cost a partition's size)
        plan.gather_sends = [(dst, [i]) for dst, mats in sorted(sends.items()) for i in mats]
        plan.gather_recvs = [(src, sum(n for _, _, n in rs), rs) for src, ranges in sorted(recvs.items())
                             for rs in _by_entry(ranges)]
        plan.return_sends = [(dst, rs, [rs[0][0]]) for dst in sorted(back) for rs in _by_entry(back[dst])]
        plan.return_sent = sum(n for _, ranges, _ in plan.return_sends for _, _, n in ranges)
        plan.return_sent_mats = len(plan.return_sends)
        for _, ranges, _ in plan.return_sends:
            for i, start, n in ranges:
                plan.returning.setdefault(i, []).append((start, n))
        plan.return_recvs = [(src, n, [i]) for src in sorted(back_from) for i, n in back_from[src]]
        return plan


def _by_entry(ranges: Ranges) -> list[Ranges]:
    """``ranges`` (in entry order) split into one list per entry."""
    out: list[Ranges] = []
    for r in ranges:
        if out and out[-1][0][0] == r[0]:
            out[-1].append(r)
        else:
            out.append([r])
    return out


@dataclass
class Incoming:
    """Gradient messages in flight to this owner, and the buffers they land in."""

    works: list
    full: dict[int, Tensor]             # entry index -> its full flat gradient (being assembled)
    inbox: list[tuple[Ranges, Tensor]]  # per source whose message needs placing: its ranges, its message
    sent: dict[int, Optional[Tensor]]   # id(piece) -> the gradient we sent of it (the return phase reuses it)


def post_gradients(plan: ExchangePlan, entries: list[Entry], device: torch.device, links: Links,
                   dtype: torch.dtype = torch.float32,
                   views: Optional[GradViews] = None) -> tuple[Incoming, int]:
    """Post this step's gradient messages (sends of our pieces, receives of what we own) and
    copy our own pieces of wanted matrices into their buffers; returns (in flight, bytes sent).
    ``views``: this step's gradient views of our pieces, made here if not given.

    No copies where none are needed (fp32 messages): a message whose pieces lie end to end
    in one partition is sent as a view of it, and a message carrying one range is received
    straight into the owner's gradient buffer (views of it made by one split per matrix)."""
    if views is None:
        views = GradViews([p for e in entries for p in e.pieces])
    full = {}
    for i in plan.wanted:  # only where the holders leave a gap is the buffer zeroed
        make = torch.zeros if i in plan.gaps else torch.empty
        full[i] = make(shape_numel(entries[i].shape), dtype=torch.float32, device=device)
    ops = []
    grads: dict[int, Optional[Tensor]] = {}  # each piece's gradient (in dtype), looked up once per step
    as_sent: dict[int, bool] = {}  # per source tensor: its gradient already in (dtype, device)

    def grad_of(piece: Piece) -> Optional[Tensor]:
        if id(piece) not in grads:
            g = views.of(piece)
            if g is not None and id(piece.source) not in as_sent:
                as_sent[id(piece.source)] = g.dtype == dtype and g.device == device
            if g is not None and not as_sent[id(piece.source)]:
                g = g.to(device, dtype)  # a host partition's under ZeRO-Offload: moved to the messages' device
            grads[id(piece)] = g
        return grads[id(piece)]

    for dst, mats in plan.gather_sends:
        pieces = [p for i in mats for p in entries[i].pieces]
        msg = _message(pieces, [grad_of(p) for p in pieces], device, dtype)
        ops.append(dist.P2POp(dist.isend, msg, links.to_global(dst), links.group, TAG_GATHER))
    sent = plan.gather_sent * dtype.itemsize
    in_place = dtype == torch.float32
    into = {i: split_ranges(full[i], plan.landing[i]) for i in plan.wanted} if in_place else {}
    inbox = []
    for src, size, ranges in plan.gather_recvs:
        if len(ranges) == 1 and in_place:
            i, start, n = ranges[0]
            buf = into[i][(start, n)]
        else:
            buf = torch.empty(size, dtype=dtype, device=device)
            inbox.append((ranges, buf))
        ops.append(dist.P2POp(dist.irecv, buf, links.to_global(src), links.group, TAG_GATHER))
    works = dist.batch_isend_irecv(ops) if ops else []
    for i in plan.wanted:  # this rank's own pieces
        for piece in entries[i].pieces:
            g = views.of(piece)
            key = (piece.start, piece.numel)
            target = into[i][key] if i in into and key in into[i] else full[i].narrow(0, piece.start, piece.numel)
            target.copy_(g) if g is not None else target.zero_()
    return Incoming(works, full, inbox, grads), sent


def _message(pieces: list[Piece], grads: list[Optional[Tensor]], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The gradients (``grads``, in ``dtype``) of ``pieces`` end to end: a view when they already
    are (one piece, or neighbours in one fp32 partition), else one copy."""
    if len(grads) == 1 and grads[0] is not None:
        return grads[0]
    if dtype == torch.float32 and all(g is not None for g in grads) and pieces[0].source.device == device and all(
            b.source is a.source and b.offset == a.offset + a.numel for a, b in zip(pieces, pieces[1:])):
        return local(pieces[0].source.grad).reshape(-1).narrow(0, pieces[0].offset, sum(p.numel for p in pieces))
    return torch.cat([g if g is not None else torch.zeros(p.numel, dtype=dtype, device=device)
                      for p, g in zip(pieces, grads)])


def receive_gradients(incoming: Incoming) -> dict[int, Tensor]:
    """Wait for the gradient messages and place each range: entry index -> full flat gradient."""
    for w in incoming.works:
        w.wait()
    for ranges, buf in incoming.inbox:
        offset = 0
        for i, start, n in ranges:
            incoming.full[i].narrow(0, start, n).copy_(buf.narrow(0, offset, n))
            offset += n
    return incoming.full


def post_updates(plan: ExchangePlan, updates: dict[int, Tensor], sizes: Optional[dict[int, Tensor]],
                 entries: list[Entry], device: torch.device, links: Links, dtype: torch.dtype = torch.float32,
                 sent_grads: Optional[dict[int, Optional[Tensor]]] = None
                 ) -> tuple[list, list[tuple[list[int], Tensor]], int]:
    """Send each holder its slices of our updates (``updates``: entry index -> flat update),
    followed, when ``sizes`` is given, by one step size per matrix (a one-element device
    tensor; 0 = skipped); post the receives of ours. A message of one slice is a view of the
    update (callers must not change updates until the works are done); one that is exactly
    our piece's update lands in that piece's gradient where the gradient is scratch (already
    sent: the gather phase's works are done). Returns (works, [(entries, message)] to
    receive, bytes sent). ``sent_grads``: the gather phase's gradient views (``Incoming.sent``)."""
    ops = []
    slices = {i: split_ranges(updates[i], cuts) for i, cuts in plan.returning.items()}  # one split per matrix
    for dst, ranges, mats in plan.return_sends:
        parts = [slices[i][(start, n)] for i, start, n in ranges]
        if sizes is not None:
            parts.append(torch.stack([sizes[i] for i in mats]))
        if len(parts) > 1:
            msg = torch.cat([p.to(dtype) for p in parts])
        else:  # updates are fp32
            msg = parts[0] if dtype == torch.float32 else parts[0].to(dtype)
        ops.append(dist.P2POp(dist.isend, msg, links.to_global(dst), links.replica_group, TAG_RETURN))
    sent = (plan.return_sent + (plan.return_sent_mats if sizes is not None else 0)) * dtype.itemsize
    inbox = []
    for src, size, mats in plan.return_recvs:
        buf = _update_in_place(entries, mats, size, device, sent_grads or {}) \
            if sizes is None and dtype == torch.float32 else None
        if buf is None:
            buf = torch.empty(size + (len(mats) if sizes is not None else 0), dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, buf, links.to_global(src), links.replica_group, TAG_RETURN))
        inbox.append((mats, buf))
    return (dist.batch_isend_irecv(ops) if ops else []), inbox, sent


def _update_in_place(entries: list[Entry], mats: list[int], size: int, device: torch.device,
                     sent_grads: dict[int, Optional[Tensor]]) -> Optional[Tensor]:
    """The gradient of our one scratch piece of ``mats`` (one matrix) when the update message
    (``size`` fp32 elements) can be received straight into it; else None."""
    pieces = entries[mats[0]].pieces if len(mats) == 1 else []
    if len(pieces) != 1 or not pieces[0].scratch or pieces[0].numel != size:
        return None
    if id(pieces[0]) in sent_grads:  # sent in fp32 from ``device`` (post_gradients made it so)
        return sent_grads[id(pieces[0])]
    g = pieces[0].grad()
    return g if g is not None and g.dtype == torch.float32 and g.device == device else None


def received_updates(inbox: list[tuple[list[int], Tensor]], entries: list[Entry], with_sizes: bool,
                     dtype: torch.dtype = torch.float32) -> Iterator[tuple[Piece, Tensor, Optional[Tensor], int]]:
    """Once the messages are in: (our piece, its update slice in fp32, the matrix's step size
    as a device tensor or None when messages carry none, the matrix's entry index) for every
    piece received. Nothing is read to the host. ``dtype``: the messages' (``post_updates``')."""
    for mats, buf in inbox:
        buf = buf if dtype == torch.float32 else buf.float()
        if not with_sizes and len(mats) == 1 and len(entries[mats[0]].pieces) == 1:
            yield entries[mats[0]].pieces[0], buf, None, mats[0]  # the message is that piece's slice
            continue
        sizes = buf.narrow(0, buf.numel() - len(mats), len(mats)).unbind() if with_sizes else None
        offset = 0
        for k, i in enumerate(mats):
            for piece in entries[i].pieces:
                yield piece, buf.narrow(0, offset, piece.numel), (sizes[k] if sizes is not None else None), i
                offset += piece.numel


def device_vector(values: list[Union[float, Tensor]], device: torch.device) -> Tensor:
    """Step sizes (floats, or one-element device tensors) as one fp32 vector on ``device``,
    without a host-to-device copy: one fill for the most common float, then one small op per
    value that differs (a skipped matrix's 0, a relative step's tensor)."""
    floats = [v for v in values if not isinstance(v, Tensor)]
    common = max(set(floats), key=floats.count) if floats else 0.0
    out = torch.full((len(values),), common, dtype=torch.float32, device=device)
    for k, v in enumerate(values):
        if isinstance(v, Tensor):
            out[k].copy_(v.reshape(()))
        elif v != common:
            out[k].fill_(v)
    return out

