"""Record and check every torch.distributed call one simulated GPU rank makes.

Run inside a "fake" process group (one process = rank r of a world of N) and a
FakeTensorMode (``device="cuda"`` tensors without a GPU). The fake backend accepts
anything, NCCL does not: :class:`CollectiveChecker` asserts that each tensor handed to
a collective or a point-to-point call lives on this rank's CUDA device with an
expected dtype, and records the sequence (kind, group, peer, size, dtype) so that
the sequences of several simulated ranks can be compared (:func:`mismatches`).

Object collectives cannot run on fake tensors; they are answered by an *oracle*
that knows what every rank of the simulated world holds (``answer(obj, rank)``
returns rank ``rank``'s object given this rank's), as a real group would deliver.

:class:`HostSyncs` answers the data-dependent reads that fake tensors refuse
(``aten._local_scalar_dense``: ``.item()``, ``.tolist()``, ``bool()``) with the
nominal value (True, 1.0, 1: finite, non-zero, converged) and counts them.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "all_to_all_single", "reduce", "barrier")
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


@dataclass(frozen=True)
class Call:
    kind: str                  # "all_reduce", ..., "send", "recv", "object:all_gather_object"
    group: tuple[int, ...]     # global ranks of the group
    peer: Optional[int]        # global rank of the other side (point-to-point)
    numel: int
    dtype: str
    tag: int = 0


class CoalescedWork:
    """What ``batch_isend_irecv`` returns on NCCL: one work for the whole batch (NCCL coalesces
    it; the fake backend returns one per op), which keeps the batch's tensors alive until it is
    waited on, as ProcessGroupNCCL does (a message copy is GPU memory until then; the fake
    backend drops it at once, which would understate the step's peak). Waiting is the
    communication library's time (``wait``, billed to the clock when one is given)."""

    def __init__(self, works: list, tensors: list[torch.Tensor], clock: Any = None) -> None:
        self._works, self._tensors = works, tensors
        if clock is not None:
            self.wait = clock.excluded(self.wait)  # type: ignore[method-assign]

    def wait(self, *args: Any) -> bool:
        for w in self._works:
            w.wait(*args)
        self._works, self._tensors = [], []
        return True

    def is_completed(self) -> bool:
        return not self._works


class CollectiveChecker:
    """Patches torch.distributed for the duration of a ``with`` block (see module docstring)."""

    def __init__(self, device: torch.device, dtypes: tuple[torch.dtype, ...] = (torch.float32,),
                 oracle: Optional[Callable[[Any, int], Any]] = None) -> None:
        self.device = torch.device(device)
        self.dtypes = dtypes
        self.oracle = oracle
        self.calls: list[Call] = []
        self.problems: list[str] = []
        self._saved: dict[str, Any] = {}
        self.clock: Any = None  # a sim.clock.TorchTime: time inside torch.distributed is billed to it

    # ----- recording ------------------------------------------------------
    def _ranks(self, group: Any) -> tuple[int, ...]:
        return tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))

    def _check(self, kind: str, tensor: torch.Tensor) -> None:
        if tensor.device != self.device or tensor.dtype not in self.dtypes:
            where = "".join(traceback.format_stack(limit=8)[:-3])
            self.problems.append(f"{kind}: tensor on {tensor.device} ({tensor.dtype}); NCCL needs {self.device} "
                                 f"with one of {self.dtypes}\n{where}")

    def _record(self, kind: str, group: Any, tensors: list[torch.Tensor], peer: Optional[int] = None,
                tag: int = 0) -> None:
        for t in tensors:
            self._check(kind, t)
        numel = sum(t.numel() for t in tensors)
        dtype = str(tensors[0].dtype) if tensors else "-"
        self.calls.append(Call(kind, self._ranks(group), peer, numel, dtype, tag))

    # ----- patches --------------------------------------------------------
    def _wrap_collective(self, name: str, original: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            for a in args:
                if isinstance(a, (list, tuple)):
                    tensors.extend(t for t in a if isinstance(t, torch.Tensor))
            self._record(name, kwargs.get("group"), tensors)
            return original(*args, **kwargs)
        return call

    def _batch_isend_irecv(self, ops: list) -> Any:
        for op in ops:
            kind = "send" if op.op in (dist.isend, dist.send) else "recv"
            self._record(kind, op.group, [op.tensor], peer=op.peer, tag=op.tag)
        works = self._saved["batch_isend_irecv"](ops)
        return [CoalescedWork(works, [op.tensor for op in ops], self.clock)] if works else []

    def _wrap_p2p(self, kind: str, original: Callable) -> Callable:
        def call(tensor: torch.Tensor, peer: Optional[int] = None, group: Any = None, tag: int = 0, **kw: Any) -> Any:
            self._record(kind, group, [tensor], peer=peer, tag=tag)
            return original(tensor, peer, group, tag, **kw)
        return call

    def _all_gather_object(self, out: list, obj: Any, group: Any = None) -> None:
        ranks = self._ranks(group)
        self.calls.append(Call("object:all_gather_object", ranks, None, len(out), "object"))
        if self.oracle is None:
            raise AssertionError("all_gather_object called but the simulation has no oracle for it")
        for i, r in enumerate(ranks):
            out[i] = self.oracle(obj, r)

    def _broadcast_object_list(self, objs: list, src: int = 0, group: Any = None, **_: Any) -> None:
        self.calls.append(Call("object:broadcast_object_list", self._ranks(group), src, len(objs), "object"))

    def __enter__(self) -> "CollectiveChecker":
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap_collective(name, self._saved[name]))
        # isend/irecv stay unpatched: P2POp checks its op against them (batch_isend_irecv records those)
        for name, kind in (("send", "send"), ("recv", "recv")):
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap_p2p(kind, self._saved[name]))
        self._saved["batch_isend_irecv"] = dist.batch_isend_irecv
        dist.batch_isend_irecv = self._batch_isend_irecv
        self._saved["all_gather_object"] = dist.all_gather_object
        dist.all_gather_object = self._all_gather_object
        self._saved["broadcast_object_list"] = dist.broadcast_object_list
        dist.broadcast_object_list = self._broadcast_object_list
        self._saved["get_backend"] = dist.get_backend
        dist.get_backend = lambda group=None: "nccl"  # the fake group stands for NCCL (comm.comm_device asks)
        if self.clock is not None:  # the communication library's host time is not the caller's
            for name in [n for n in self._saved if n != "get_backend"]:
                setattr(dist, name, self.clock.excluded(getattr(dist, name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()


def mismatches(traces: dict[int, list[Call]]) -> list[str]:
    """Hangs among the simulated ranks: differing collective sequences on a shared group, and
    sends without the matching receive (same order, size, dtype, tag) on a simulated peer."""
    problems: list[str] = []
    groups = {c.group for calls in traces.values() for c in calls if c.kind not in ("send", "recv")}
    for group in sorted(groups):
        members = [r for r in traces if r in group]
        seqs = {r: [(c.kind, c.numel, c.dtype) for c in traces[r] if c.group == group and c.kind not in ("send", "recv")]
                for r in members}
        first = members[0]
        for r in members[1:]:
            if seqs[r] != seqs[first]:
                problems.append(f"group {_short(group)}: rank {first} makes {len(seqs[first])} collectives, rank {r} "
                                f"{len(seqs[r])}; first difference at {_first_difference(seqs[first], seqs[r])}")
    for a in traces:
        for b in traces:
            if a == b:
                continue
            sends = [(c.numel, c.dtype, c.tag) for c in traces[a] if c.kind == "send" and c.peer == b]
            recvs = [(c.numel, c.dtype, c.tag) for c in traces[b] if c.kind == "recv" and c.peer == a]
            if sends != recvs:
                problems.append(f"rank {a} sends {sends} to rank {b}, which receives {recvs} from it")
    return problems


def _first_difference(x: list, y: list) -> str:
    for i, (u, v) in enumerate(zip(x, y)):
        if u != v:
            return f"call {i}: {u} vs {v}"
    return f"call {min(len(x), len(y))}: one rank stops there"


def _short(group: tuple[int, ...]) -> str:
    return f"[{group[0]}..{group[-1]}] ({len(group)} ranks)" if len(group) > 4 else str(list(group))


class HostSyncs(TorchDispatchMode):
    """Counts host-device synchronisations a real GPU would make, and answers the reads that fake
    tensors refuse (``aten._local_scalar_dense``) with the nominal value (True, 1.0, 1: finite,
    non-zero, converged). Enter it inside the FakeTensorMode (it sees ops first), together with
    its :attr:`reads` function mode.

    One sync is one of: a Python read of a CUDA tensor's value (``.item()``, ``.tolist()``,
    ``bool()``, ``int()``, ``float()``: one each, however many elements; the fake tensor reads
    them one by one, and those are not counted again), a data-dependent read inside an op, a
    blocking copy from the GPU to the host, or a blocking copy from host memory to the GPU
    (``torch.tensor(list, device="cuda")``). ``sites`` counts them by the first line of
    ds_structopt outside this package that asked."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.sites: dict[str, int] = {}
        self.reads = _PythonReads(self)
        self._inside = 0  # > 0 while a counted Python-level read runs

    def record(self) -> None:
        self.count += 1
        site = _caller()
        self.sites[site] = self.sites.get(site, 0) + 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            if not self._inside:
                self.record()
            dtype = args[0].dtype
            if dtype == torch.bool:
                return True
            return 1.0 if dtype.is_floating_point else 1
        if not self._inside and func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst_device = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device", src.device)
            crosses = {torch.device(dst_device).type, src.device.type} == {"cpu", "cuda"}
            if crosses and not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2]):
                self.record()
        return func(*args, **kwargs)


class _PythonReads(TorchFunctionMode):
    """The Python-level reads of :class:`HostSyncs` (one sync per call, whatever its size)."""

    READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy")

    def __init__(self, syncs: HostSyncs) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in self.READS and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cuda":
            return self.one_read(func, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))

    def one_read(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.syncs._inside:
            self.syncs.record()
        self.syncs._inside += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.syncs._inside -= 1

    def __enter__(self) -> "_PythonReads":
        # FakeTensor.tolist is Python (unbind, then item per element): make the call one read
        from torch._subclasses.fake_tensor import FakeTensor

        self._tolist = FakeTensor.__dict__.get("tolist")
        if self._tolist is not None:
            original = self._tolist
            FakeTensor.tolist = lambda t: self.one_read(original, t) if t.device.type == "cuda" else original(t)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        if self._tolist is not None:
            FakeTensor.tolist = self._tolist
        super().__exit__(*exc)


def _caller() -> str:
    """file:line of the innermost ds_structopt frame outside ds_structopt/sim."""
    for frame in reversed(traceback.extract_stack(limit=40)):
        path = frame.filename.replace("\\", "/")
        if "/ds_structopt/" in path and "/ds_structopt/sim/" not in path:
            return f"{path.split('/ds_structopt/')[-1]}:{frame.lineno} {frame.name}"
    return "?"
