"""One simulated GPU rank of a large world: fake process group, fake CUDA tensors, checked collectives.

:func:`simulated_rank` makes this process rank ``r`` of ``world`` (the "fake" backend)
with a FakeTensorMode, a :class:`~sim.collectives.HostSyncs` and a
:class:`~sim.collectives.CollectiveChecker` active. Ranks are simulated one after
another in the same process; their traces are compared afterwards.

Layouts are DeepSpeed's own, not re-derived by our code under test:

- ZeRO-1/2 (:class:`Zero12`): each param group flattened in order, padded to a multiple of
  2 x world (``nccl_start_alignment_factor``), cut into equal partitions; every model
  parameter gets its ``_hp_mapping`` from DeepSpeed's ``link_hp_params``; ``step()`` is
  called once per group with ``param_groups`` narrowed to that group, as
  ``DeepSpeedZeroOptimizer._optimizer_step`` does.
- ZeRO-3 (:class:`Zero3`): every parameter split into ceil(numel / world) pieces,
  sub-groups formed by DeepSpeed's own ``_create_fp16_sub_groups``; ``step()`` once per
  sub-group with that group's ``params`` set to the sub-group's fp32 partition and
  every other group empty, as ``DeepSpeedZeroOptimizer_Stage3._optimizer_step`` does.
- DDP / ZeRO-0 (:class:`Replicated`): whole parameters and gradients on every rank.

The boundary: DeepSpeed's engine itself (its reductions, its overflow check) does not
run here; these classes stand where its ZeRO optimizer calls ours.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from .clock import TorchTime
from .collectives import CollectiveChecker, HostSyncs
from .cuda_runtime import SerialWorker, SimCudaRuntime
from .fake_cuda import DispatchingMethods
from .memory import LiveBytes


def rank_device(rank: int, gpus_per_node: int = 8) -> torch.device:
    """Each rank's own GPU, as launchers assign them (LOCAL_RANK)."""
    return torch.device("cuda", rank % gpus_per_node)


@dataclass
class Rank:
    checker: CollectiveChecker
    syncs: HostSyncs
    cuda: SimCudaRuntime
    memory: LiveBytes
    torch_time: TorchTime


@dataclass
class FakeGpu:
    syncs: HostSyncs
    cuda: SimCudaRuntime
    memory: LiveBytes
    torch_time: TorchTime


@contextlib.contextmanager
def fake_gpu(device: torch.device, extra_modes: tuple = (), torch_time: Optional[TorchTime] = None
             ) -> Iterator[FakeGpu]:
    """This process as one GPU ``device`` with fake tensors: every host read counted and
    answered, live bytes tracked, refresh-ahead workers run inline (no process group).
    ``extra_modes`` are entered after the timing mode ``torch_time`` (made here if None)."""
    syncs, memory, torch_time = HostSyncs(), LiveBytes(), torch_time or TorchTime()
    fake, methods = FakeTensorMode(allow_non_fake_inputs=True), DispatchingMethods()
    cuda = SimCudaRuntime([fake, methods, syncs.reads, syncs, memory])
    from unittest import mock

    from ds_structopt.optim import refresh

    with contextlib.ExitStack() as stack:
        for mode in (fake, methods, syncs.reads, syncs, memory, torch_time, *extra_modes, cuda,
                     mock.patch.object(refresh, "ThreadPoolExecutor", SerialWorker)):
            stack.enter_context(mode)
        cuda.set_device(device)  # what the launcher's LOCAL_RANK and the engine do
        yield FakeGpu(syncs, cuda, memory, torch_time)


@contextlib.contextmanager
def simulated_rank(rank: int, world: int, oracle: Any = None,
                   dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> Iterator[Rank]:
    """This process as rank ``rank`` of ``world`` GPUs (see the module docstring)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    checker = CollectiveChecker(rank_device(rank), dtypes=dtypes, oracle=oracle)
    checker.clock = TorchTime()  # set before the checker is entered: time inside torch.distributed is not ours
    try:
        with fake_gpu(rank_device(rank), extra_modes=(checker,), torch_time=checker.clock) as gpu:
            yield Rank(checker, gpu.syncs, gpu.cuda, gpu.memory, gpu.torch_time)
    finally:
        dist.destroy_process_group()


def llama_param_groups(model: str = "7b", layers: Optional[int] = None, dtype: torch.dtype = torch.bfloat16,
                       device: Optional[torch.device] = None, shape_of=None) -> list[dict[str, Any]]:
    """``ds_structopt.param_groups`` of a LLaMA config (real names, groups and order) with each
    parameter replaced by a zero tensor on ``device`` (call inside the FakeTensorMode).
    ``shape_of(shape)`` gives the tensor's own shape (ZeRO-3: ``(0,)``)."""
    groups = []
    for g, shapes in _llama_skeleton(model, layers):
        params = []
        for shape in shapes:
            t = torch.nn.Parameter(torch.zeros(shape_of(shape) if shape_of else shape, dtype=dtype, device=device),
                                   requires_grad=False)  # autograd metadata needs a real CUDA build
            t.sim_shape = shape
            params.append(t)
        groups.append({**g, "params": params})
    return groups


@functools.lru_cache(maxsize=4)
def _llama_skeleton(model: str, layers: Optional[int]) -> list[tuple[dict[str, Any], list[tuple[int, ...]]]]:
    """(group options and names, parameter shapes) of ``ds_structopt.param_groups`` of a LLaMA
    config, built once on the meta device (a 70B model takes seconds to build)."""
    from transformers import LlamaForCausalLM

    import ds_structopt as dso
    from ds_structopt.training.models import model_config

    cfg = model_config(model, 32000, 256)
    if layers is not None:
        cfg.num_hidden_layers = layers
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)
    return [({k: v for k, v in g.items() if k != "params"}, [tuple(p.shape) for p in g["params"]])
            for g in dso.param_groups(net)]


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


class Replicated:
    """DDP / ZeRO-0: every rank holds every parameter whole (fp32 here: the master copies)."""

    def __init__(self, groups: list[dict[str, Any]], world: int, rank: int) -> None:
        self.groups, self.world, self.rank = groups, world, rank

    def holdings(self, rank: int) -> dict[str, list[tuple[int, int]]]:
        return {n: [(0, _numel(p.sim_shape))] for g in self.groups for n, p in zip(g["param_names"], g["params"])}

    def fill_grads(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p)

    def step(self, opt: Any) -> None:
        opt.step()


class Zero12:
    """DeepSpeed ZeRO-1/2's flat fp32 partitions around our optimizer (see module docstring)."""

    def __init__(self, groups: list[dict[str, Any]], world: int, rank: int, device: torch.device) -> None:
        from deepspeed.utils import link_hp_params

        self.groups, self.world, self.rank = groups, world, rank
        self.offsets: list[list[int]] = []
        self.partition_size: list[int] = []
        self.flats: list[torch.Tensor] = []
        self.averaged_gradients: dict[int, Any] = {}
        for i, g in enumerate(groups):
            sizes = [p.numel() for p in g["params"]]
            total = sum(sizes)
            total += (-total) % (2 * world)
            size = total // world
            offsets, at = [], 0
            for n in sizes:
                offsets.append(at)
                at += n
            self.offsets.append(offsets)
            self.partition_size.append(size)
            flat = torch.zeros(size, dtype=torch.float32, device=device)
            link_hp_params(lp_param_list=g["params"], flat_hp_partition=flat, gradient_dict=self.averaged_gradients,
                           offload_gradient_dict={}, use_offload=False, param_group_index=i,
                           partition_start=rank * size, partition_size=size, dp_group=dist.group.WORLD)
            self.flats.append(flat)
        self.single_partition_of_fp32_groups = self.flats  # DeepSpeed's name for them

    def attach(self, opt: Any) -> None:
        """What DeepSpeed does after building the client optimizer (groups hold the flat
        partitions), then what ``attach_engine`` does to DeepSpeed's ZeRO optimizer."""
        from ds_structopt.integrations.deepspeed import bracket_zero_steps

        for group, flat in zip(opt.param_groups, self.flats):
            group["params"] = [flat]
        self._ours = opt
        bracket_zero_steps(self, opt)

    def holdings(self, rank: int) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for g, offsets, size in zip(self.groups, self.offsets, self.partition_size):
            lo, hi = rank * size, (rank + 1) * size
            for name, p, off in zip(g["param_names"], g["params"], offsets):
                a, b = max(lo, off), min(hi, off + p.numel())
                out[name] = [(a - off, b - a)] if a < b else []
        return out

    def fill_grads(self) -> None:
        # DeepSpeed keeps each group's reduced gradient partition until that group's turn
        self.averaged_gradients = {i: [torch.zeros_like(flat)] for i, flat in enumerate(self.flats)}

    def step(self, *_: Any) -> None:
        """``DeepSpeedZeroOptimizer.step``'s loop: group i's gradient goes onto its flat partition
        just before its ``step()`` call, with ``param_groups`` narrowed to that group."""
        opt = self._ours
        original = opt.param_groups
        for i, flat in enumerate(self.flats):
            flat.grad = torch.cat(self.averaged_gradients[i])
            self.averaged_gradients[i] = None
            opt.param_groups = [original[i]]
            opt.step()
            opt.param_groups = original
            flat.grad = None


class Zero3:
    """DeepSpeed ZeRO-3's per-parameter partitions and sub-groups around our optimizer."""

    def __init__(self, groups: list[dict[str, Any]], world: int, rank: int, device: torch.device,
                 sub_group_size: int, master_device: Optional[torch.device] = None) -> None:
        """``master_device``: where the fp32 partitions live (the CPU: ``offload_optimizer``)."""
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        self.groups, self.world, self.rank = groups, world, rank
        self.sub_group_size = sub_group_size
        self.dp_process_group = None
        for g in groups:
            for p in g["params"]:
                numel = _numel(p.sim_shape)
                p.ds_shape, p.ds_numel = torch.Size(p.sim_shape), numel
                p.partition_numel = (lambda n=numel: -(-n // world))
                p.ds_tensor = torch.zeros(-(-numel // world), dtype=p.dtype, device=device)
        self.fp16_groups: list[list[torch.Tensor]] = []
        self.sub_group_to_group_id: list[int] = []
        for gi, g in enumerate(groups):
            for sub in DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups(self, g["params"]):
                self.fp16_groups.append(sub)
                self.sub_group_to_group_id.append(gi)
        self.fp16_partitioned_groups_flat_numel = [sum(p.partition_numel() for p in sub) for sub in self.fp16_groups]
        self.fp32_partitioned_groups_flat = [torch.zeros(n, dtype=torch.float32, device=master_device or device)
                                             for n in self.fp16_partitioned_groups_flat_numel]
        self.averaged_gradients: dict[int, Any] = {}

    def attach(self, opt: Any) -> None:
        from ds_structopt.integrations.deepspeed import bracket_zero_steps, zero3_layouts

        opt.flat_layouts = zero3_layouts(self)
        opt.flat_tensors = {id(t): t for t in self.fp32_partitioned_groups_flat}
        for group in opt.param_groups:
            group["params"] = []
        self._ours = opt
        bracket_zero_steps(self, opt)

    def holdings(self, rank: int) -> dict[str, list[tuple[int, int]]]:
        out = {}
        for g in self.groups:
            for name, p in zip(g["param_names"], g["params"]):
                chunk = p.partition_numel()
                start = rank * chunk
                n = max(0, min(chunk, p.ds_numel - start))
                out[name] = [(start, n)] if n > 0 else []
        return out

    def fill_grads(self) -> None:
        # DeepSpeed keeps each sub-group's reduced gradient partition until that sub-group's turn
        self.averaged_gradients = {i: [torch.zeros_like(flat)] for i, flat in enumerate(self.fp32_partitioned_groups_flat)}

    def step(self, *_: Any) -> None:
        """``DeepSpeedZeroOptimizer_Stage3.step``'s loop (replaced by ``bracket_zero_steps`` in attach)."""
        opt = self._ours
        for sub_id, flat in enumerate(self.fp32_partitioned_groups_flat):
            flat.grad = torch.cat(self.averaged_gradients[sub_id])  # _prepare_fp32_grad_for_sub_group
            self.averaged_gradients[sub_id] = None
            gid = self.sub_group_to_group_id[sub_id]
            opt.param_groups[gid]["params"] = [flat]
            opt.step()
            opt.param_groups[gid]["params"] = []
            flat.grad = None


def holders_oracle(layout: Any) -> Any:
    """Answers our optimizer's layout exchange (``all_gather_object`` of name -> [(start, numel)])
    for every rank from DeepSpeed's layout, after checking this rank's own table against it."""
    tables: dict[int, dict[str, list[tuple[int, int]]]] = {}

    def table(rank: int) -> dict[str, list[tuple[int, int]]]:
        if rank not in tables:
            tables[rank] = layout.holdings(rank)
        return tables[rank]

    def answer(obj: Any, rank: int) -> Any:
        if isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values()):
            mine = {k: [tuple(x) for x in v] for k, v in obj.items()}
            expected = {k: table(layout.rank)[k] for k in obj}
            assert mine == expected, "our recovered layout differs from DeepSpeed's"
            return {k: table(rank)[k] for k in obj}
        if isinstance(obj, dict) and all(isinstance(v, int) for v in obj.values()):  # elements held per matrix
            return {k: sum(n for _, n in table(rank)[k]) for k in obj}
        raise AssertionError(f"no simulated answer for all_gather_object of {type(obj).__name__}")

    return answer


class FSDP2:
    """FSDP2 ``fully_shard``: every parameter a DTensor sharded on dim 0 over the world mesh
    (torch.chunk sizes), its gradient a DTensor of the same placement."""

    def __init__(self, groups: list[dict[str, Any]], world: int, rank: int, device: torch.device) -> None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        self.groups, self.world, self.rank = groups, world, rank
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # the mesh's rank table is real data
            mesh = DeviceMesh("cuda", torch.arange(world))
        self._dtensor = lambda local, shape: DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                                shape=torch.Size(shape),
                                                                stride=torch.empty(shape, device="meta").stride())
        for g in groups:
            sharded = []
            for p in g["params"]:
                rows = p.sim_shape[0]
                local = torch.zeros((self._rows(rows, rank),) + tuple(p.sim_shape[1:]), dtype=p.dtype, device=device)
                d = torch.nn.Parameter(self._dtensor(local, p.sim_shape), requires_grad=False)
                d.sim_shape = p.sim_shape
                sharded.append(d)
            g["params"] = sharded

    def _rows(self, rows: int, rank: int) -> int:
        chunk = -(-rows // self.world)
        return max(0, min(chunk, rows - rank * chunk))

    def holdings(self, rank: int) -> dict[str, list[tuple[int, int]]]:
        out = {}
        for g in self.groups:
            for name, p in zip(g["param_names"], g["params"]):
                rows, row = p.sim_shape[0], _numel(p.sim_shape[1:])
                n = self._rows(rows, rank) * row
                out[name] = [(rank * -(-rows // self.world) * row, n)] if n else []
        return out

    def fill_grads(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = self._dtensor(torch.zeros_like(p.to_local()), p.sim_shape)

    def step(self, opt: Any) -> None:
        opt.step()


def first_use_problems(calls: list) -> list[str]:
    """NCCL builds a group's communicator at its first use, with every member: a group first used
    by point-to-point messages (which only some members send) hangs."""
    seen, problems = set(), []
    for c in calls:
        if c.group in seen:
            continue
        seen.add(c.group)
        if c.kind in ("send", "recv"):
            problems.append(f"group {list(c.group)[:8]}... is first used by a {c.kind} (peer {c.peer})")
    return problems


def state_problems(opt: Any, device: torch.device) -> list[str]:
    """Every tensor of every owned matrix's state (nested too) fp32 and on ``device`` (the rank's
    GPU; host memory under ZeRO-Offload)."""
    problems = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.device != device or value.dtype != torch.float32:
                problems.append(f"{name}: {value.dtype} on {value.device}")
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(f"{name}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{name}[{i}]", v)

    for name, st in list(opt.matrix_state.items()) + list(opt.elem_state.items()):
        visit(name, st)
    return problems
