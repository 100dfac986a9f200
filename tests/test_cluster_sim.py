"""The GPU/NCCL path on a CPU: our real distributed step as ranks of a 64-GPU world.

Each simulated rank is this process as rank r of a "fake" process group, with LLaMA-7B
shaped bf16 parameters as fake CUDA tensors (no memory, no values) laid out as DeepSpeed
ZeRO-1/2, ZeRO-3, DDP or FSDP2 lay them out (ds_structopt/sim/world.py), and every
torch.distributed call checked (ds_structopt/sim/collectives.py): each tensor handed to a
collective or a message is on the rank's own GPU and fp32 (NCCL would crash on a CPU
tensor), the ranks simulated make the same collectives in the same order on every
group they share, their point-to-point messages pair up, and no group is first used
by point-to-point messages (NCCL's lazy communicator creation would hang). Owned state
ends up fp32 on the rank's GPU. Values are not simulated: data-dependent reads answer
"finite, non-zero, converged" (ds_structopt/sim/collectives.py: HostSyncs).

Boundary: DeepSpeed's engine does not run here (its reductions, overflow check and
checkpoint writer); the layout classes stand where its ZeRO optimizer calls ours, with
DeepSpeed's own ``link_hp_params`` and ``_create_fp16_sub_groups``. Real GPUs:
scripts/gpu_check.sh.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import pytest
import torch

import ds_structopt as dso
from ds_structopt import checkpoint
from ds_structopt.distributed.optimizer import DistributedStructuredOptimizer
from ds_structopt.sim.collectives import mismatches
from ds_structopt.sim.world import (
    FSDP2,
    Replicated,
    Zero3,
    Zero12,
    first_use_problems,
    holders_oracle,
    llama_param_groups,
    rank_device,
    simulated_rank,
    state_problems,
)

WORLD = 64
RANKS = (0, 1, 2, 31, 32, 63)
OPTIONS = {
    "AdaDiag++": {"lr": 1e-3, "update_freq": 2},
    "AdaDiag": {"lr": 1e-3, "update_freq": 2},
    "AdaDiag++factored": {"lr": 1e-3, "update_freq": 2, "factored": True, "relative_step": True},
    "ASGO": {"lr": 1e-3},
    "ASGO-eigh": {"lr": 1e-3, "root": "eigh", "update_freq": 2},
    "DASGO": {"lr": 1e-3},
}


def build(kind: str, rank: int, layers: int):
    """This rank's parameter groups and layout (inside the simulated rank)."""
    device = rank_device(rank)
    if kind == "zero3":
        groups = llama_param_groups("7b", layers, device=device, shape_of=lambda s: (0,))
        return groups, Zero3(groups, WORLD, rank, device, sub_group_size=int(4e7))
    if kind == "zero3-offload":  # offload_optimizer: fp32 partitions (and our state) in host memory
        groups = llama_param_groups("7b", layers, device=device, shape_of=lambda s: (0,))
        return groups, Zero3(groups, WORLD, rank, device, sub_group_size=int(4e7), master_device=torch.device("cpu"))
    groups = llama_param_groups("7b", layers, device=device)
    if kind == "zero2":
        return groups, Zero12(groups, WORLD, rank, device)
    if kind == "zero2-offload":
        return groups, Zero12(groups, WORLD, rank, torch.device("cpu"))
    if kind == "fsdp2":
        return groups, FSDP2(groups, WORLD, rank, device)
    return groups, Replicated(groups, WORLD, rank)


def simulate(kind: str, optimizer: str = "AdaDiag++", layers: int = 4, steps: int = 3, ranks=RANKS,
             options: Optional[dict] = None, resume_at: Optional[int] = None, tmp: Optional[Path] = None,
             **dist_options) -> dict[int, dict]:
    """Run ``steps`` optimizer steps on each simulated rank; returns each rank's trace and findings.

    ``resume_at=k``: after step k the rank's state is written through our checkpoint code
    (tensors as meta tensors: shapes without memory), and a new optimizer over a new layout
    loads it from disk with ``ds_structopt.checkpoint.load`` and takes the remaining steps."""
    out = {}
    opts = {**OPTIONS[optimizer], **(options or {})}
    cls = dso.get_optimizer_class(optimizer.split("-")[0].replace("factored", ""))
    for rank in ranks:
        answer = {}
        with simulated_rank(rank, WORLD, oracle=lambda obj, r: answer["fn"](obj, r)) as sim:
            def start():
                groups, layout = build(kind, rank, layers)
                answer["fn"] = holders_oracle(layout)
                opt = DistributedStructuredOptimizer(groups, cls, opts, **dist_options)
                if hasattr(layout, "attach"):
                    layout.attach(opt)
                return layout, opt

            layout, opt = start()
            home = torch.device("cpu") if kind.endswith("-offload") else rank_device(rank)
            problems = []
            for step in range(1, steps + 1):
                layout.fill_grads()
                layout.step(opt)
                if step == resume_at:
                    folder = save_as_meta(opt, tmp / f"rank{rank}")
                    problems += state_problems(opt, home)
                    layout, opt = start()
                    checkpoint.load(opt, folder)
            out[rank] = {"calls": sim.checker.calls, "problems": sim.checker.problems + sim.cuda.problems,
                         "syncs": sim.syncs.count, "streams": len(sim.cuda.created), "cuda": sim.cuda,
                         "state": problems + state_problems(opt, home), "owned": len(opt.matrix_state),
                         "first_use": first_use_problems(sim.checker.calls), "skipped": opt.skipped_steps,
                         "refreshes": opt.metrics()["refreshes"]}
    return out


def save_as_meta(opt: DistributedStructuredOptimizer, folder: Path) -> str:
    """This rank's ``checkpoint.local_state`` on disk for every rank of the world (the others'
    files are copies: ``load`` wants one file per saving rank), tensors as meta tensors."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    state = checkpoint.local_state(opt)
    with unset_fake_temporarily():
        meta = _to_meta(state)
        os.makedirs(folder / checkpoint.SUBDIR, exist_ok=True)
        (folder / checkpoint.SUBDIR / "meta.json").write_text(
            json.dumps({"version": checkpoint.FORMAT_VERSION, "world_size": WORLD, "optimizer": opt.math.NAME}))
        for r in range(WORLD):  # meta tensors have no bytes: the tensors-only torch format (read as formats 1-2)
            torch.save(meta, folder / checkpoint.SUBDIR / f"rank{r:05d}.pt")
    return str(folder)


def _to_meta(value):
    from ds_structopt.checkpoint.state_io import map_tensors

    return map_tensors(lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), value)


def assert_clean(runs: dict[int, dict], messages: bool = True) -> None:
    for rank, run in runs.items():
        assert not run["problems"], f"rank {rank}: " + "\n".join(run["problems"][:3])
        assert not run["state"], f"rank {rank}: state off the GPU or not fp32: {run['state'][:5]}"
        assert not run["first_use"], f"rank {rank}: {run['first_use'][:3]}"
        assert run["skipped"] == 0
    assert not mismatches({r: run["calls"] for r, run in runs.items()}), mismatches({r: run["calls"] for r, run in runs.items()})[:3]
    if messages:  # the test exercised the message path, and owners exist among the simulated ranks
        assert any(c.kind == "send" for run in runs.values() for c in run["calls"])
    assert sum(run["owned"] for run in runs.values()) > 0


@pytest.mark.parametrize("kind", ["zero2-offload", "zero3-offload"])
@pytest.mark.parametrize("optimizer", ["AdaDiag++", "ASGO", "DASGO"])
def test_zero_offload_messages_and_math_on_the_gpu_state_in_host_memory(kind, optimizer, tmp_path):
    """ZeRO-Offload: DeepSpeed's fp32 partitions on the CPU. Every message is still on the rank's
    GPU (NCCL), the owners' math runs there, and the state stays fp32 in host memory (streamed
    for the math), through a checkpoint resume too."""
    runs = simulate(kind, optimizer, ranks=(0, 1, 63), steps=4, resume_at=2, tmp=tmp_path)
    assert_clean(runs)


@pytest.mark.parametrize("kind", ["zero2", "zero3", "ddp", "fsdp2"])
def test_adadiagpp_7b_shapes_world_64(kind):
    """The flagship at every layout; ZeRO-1 lays out the optimizer's partitions as ZeRO-2 does."""
    assert_clean(simulate(kind, layers=32 if kind == "zero2" else 4))


@pytest.mark.parametrize("optimizer", ["AdaDiag", "AdaDiag++factored", "ASGO", "ASGO-eigh", "DASGO"])
@pytest.mark.parametrize("kind", ["zero3", "fsdp2"])
def test_every_family(kind, optimizer):
    assert_clean(simulate(kind, optimizer, layers=2, ranks=(0, 1, 63)))


@pytest.mark.parametrize("optimizer", ["AdaDiag++", "AdaDiag++factored"])
@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_node_replica_groups(kind, optimizer):
    """ownership_group_size=8: each node's ranks own every matrix once; its subgroups are built by
    a collective before the first message. With relative_step the weight RMS reduction is made by
    every rank, whichever group's owner holds a matrix whole."""
    runs = simulate(kind, optimizer, layers=2, ranks=(0, 1, 7, 8, 63), ownership_group_size=8)
    assert_clean(runs)
    node_groups = {c.group for run in runs.values() for c in run["calls"] if len(c.group) == 8}
    assert node_groups, "no message went over a node's subgroup"


class CudaEngine:
    """Stands where DeepSpeed's engine is (its forward cannot run on fake CUDA): a loss on the
    engine's GPU, and a record of where every input it was handed lives."""

    def __init__(self, device: torch.device, rank: int) -> None:
        self.device, self.global_rank = device, rank
        self.input_devices: list[torch.device] = []

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        from types import SimpleNamespace

        self.input_devices += [input_ids.device, labels.device]
        return SimpleNamespace(loss=torch.zeros((), device=self.device))

    def backward(self, loss) -> None:
        pass

    def step(self) -> None:
        pass

    def eval(self) -> None:
        pass

    def train(self) -> None:
        pass

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        import os

        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "model_states.pt"), "w") as f:
            f.write("x")


def test_entry_point_boundary_on_gpu(tmp_path):
    """The entry point's own collectives and inputs around the engine: the training step's batches,
    the eval sums, the health counters and the checkpoint agreement all on the rank's GPU."""
    from ds_structopt import train
    from ds_structopt.training import checkpoints

    rows = torch.randint(0, 256, (8, 17))  # the packed data set lives on the CPU
    def others(obj, r):  # the other ranks' file records (they write none here) and verdicts
        return obj if r == 0 else ({} if isinstance(obj, dict) else None)

    # float64: the health vector carries RSS in KiB exactly (NCCL reduces doubles)
    with simulated_rank(0, 8, oracle=others, dtypes=(torch.float32, torch.float64)) as sim:
        engine = CudaEngine(rank_device(0), 0)
        losses = train.train_step(engine, rows, micro=2, accum=2)
        loss = train.evaluate(engine, rows, micro=4)
        health = train._health(None, engine.device)
        path = checkpoints.save(engine, str(tmp_path), 10, {"step": 10}, keep_last=2)
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # generator states are real bytes (loaded from disk)
            restored = checkpoints.restore_rank_state(path, 0, engine.device)  # this rank's, CUDA's too
    assert losses.dim() == 0 and isinstance(loss, float) and {"decomp_failures", "identity_fallbacks"} <= set(health)
    assert restored and not sim.cuda.problems, sim.cuda.problems
    assert path is not None and (tmp_path / "latest").read_text() == "step00000010"
    assert engine.input_devices and all(d == rank_device(0) for d in engine.input_devices), engine.input_devices
    assert not sim.checker.problems, sim.checker.problems[0]
    assert sum(c.kind == "all_reduce" for c in sim.checker.calls) == 4  # eval, health, two save agreements


@pytest.mark.parametrize("kind", ["zero2", "zero3", "fsdp2"])
def test_refresh_ahead_and_resume_mid_run(kind, tmp_path):
    """Staggered refreshes computed one step ahead on the side stream, a checkpoint written in
    the middle with decompositions still pending, and a new optimizer that loads it from disk
    and goes on: one dedicated side stream per optimizer, the worker thread on the rank's GPU,
    tensors crossing streams recorded on the stream that uses them, restored state (nested
    pending results too) on the rank's GPU. ``balanced`` ownership at ZeRO-2 gives owners that
    hold no piece of what they own."""
    options = {"stagger_refresh": True, "first_refresh_window": 2, "refresh_from": "previous", "update_freq": 3}
    extra = {"ownership": "balanced"} if kind == "zero2" else {}
    runs = simulate(kind, layers=2, steps=6, ranks=(0, 1, 63), options=options, resume_at=3, tmp=tmp_path, **extra)
    assert_clean(runs)
    for rank, run in runs.items():
        cuda = run["cuda"]
        if run["owned"]:
            assert run["refreshes"] > 0
            assert 1 <= run["streams"] <= 2, run["streams"]  # one per optimizer (one before, one after the resume)
            assert cuda.recorded and cuda.side_streams_used(), "nothing was recorded on the side stream"
            main = cuda.current_stream(rank_device(rank))
            assert any(s is main for _, s in cuda.recorded), "results taken from the side stream not recorded on main"
            assert any(getattr(w, "stream", None) is not None and w.stream.name.startswith("side") for w in main.waits), \
                "the main stream never waited for the side stream's event"
            workers = {t for t, _ in cuda.set_device_calls} - {cuda.main_thread}
            assert workers, "the worker thread never set its device"
            assert all(d == rank_device(rank) for _, d in cuda.set_device_calls)


def test_megatron_owner_sharded_parameter_sync():
    """Megatron's layer-wise path: after the step every rank all-gathers every owner's updated
    parameters (bf16 and fp32 buffers, padded to one size) over the data-parallel group, on the
    rank's GPU. Boundary: ``OwnerShardedOptimizer.sync_params`` is called on a stand-in holding
    only what it reads (megatron's chained optimizers need megatron's CUDA runtime)."""
    from types import SimpleNamespace

    from ds_structopt.integrations.megatron_core.owner_sharded import OwnerShardedOptimizer

    runs = {}
    for rank in (0, 1, 63):
        with simulated_rank(rank, WORLD, dtypes=(torch.bfloat16, torch.float32)) as sim:
            params = [p for g in llama_param_groups("7b", 2, device=rank_device(rank)) for p in g["params"]]
            for p in params[::5]:
                p.data = p.data.float()  # some fp32 parameters (megatron keeps e.g. router weights fp32)
            by_owner = [params[i::WORLD] for i in range(WORLD)]
            OwnerShardedOptimizer.sync_params(SimpleNamespace(params_by_owner=by_owner, dp_group=None))
            runs[rank] = {"calls": sim.checker.calls, "problems": sim.checker.problems}
    for rank, run in runs.items():
        assert not run["problems"], run["problems"][0]
        assert [c.kind for c in run["calls"]] == ["all_gather", "all_gather"], run["calls"]
    assert not mismatches({r: run["calls"] for r, run in runs.items()})


def test_relative_step_with_replica_groups_where_only_one_owner_holds_the_matrix():
    """4 ranks in 2 groups of 2, ZeRO-2 over one 4x4 matrix and a 48-element vector: group 0's
    owner holds the matrix whole, group 1's does not. All four ranks must make the same
    collectives (a weight-RMS reduction decided per group made only group 1 reduce: a hang)."""
    traces = {}
    for rank in range(4):
        answer = {}
        with simulated_rank(rank, 4, oracle=lambda obj, r: answer["fn"](obj, r)) as sim:
            device = rank_device(rank)
            w = torch.nn.Parameter(torch.zeros(4, 4, device=device), requires_grad=False)
            v = torch.nn.Parameter(torch.zeros(48, device=device), requires_grad=False)
            w.sim_shape, v.sim_shape = (4, 4), (48,)
            groups = [{"params": [w, v], "param_names": ["model.layers.0.mlp.w", "model.layers.0.norm.weight"]}]
            layout = Zero12(groups, 4, rank, device)
            answer["fn"] = holders_oracle(layout)
            opt = DistributedStructuredOptimizer(groups, dso.AdaDiagPP, {"lr": 1e-3, "factored": True,
                                                                         "relative_step": True}, ownership_group_size=2)
            layout.attach(opt)
            layout.fill_grads()
            layout.step(opt)
            assert not sim.checker.problems
            traces[rank] = sim.checker.calls
    assert not mismatches(traces), mismatches(traces)
