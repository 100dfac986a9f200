"""The GPU/NCCL path on a CPU: our real distributed step as ranks of a 64-GPU world.

Each simulated rank is this process as rank r of a "fake" process group, with LLaMA-7B
shaped bf16 parameters as fake CUDA tensors (no memory, no values) laid out as DeepSpeed
ZeRO-1/2, ZeRO-3, DDP or FSDP2 lay them out (tests/sim/world.py), and every
torch.distributed call checked (tests/sim/collectives.py): each tensor handed to a
collective or a message is on the rank's own GPU and fp32 (NCCL would crash on a CPU
tensor), the ranks simulated make the same collectives in the same order on every
group they share, their point-to-point messages pair up, and no group is first used
by point-to-point messages (NCCL's lazy communicator creation would hang). Owned state
ends up fp32 on the rank's GPU. Values are not simulated: data-dependent reads answer
"finite, non-zero, converged" (tests/sim/collectives.py: HostSyncs).

Boundary: DeepSpeed's engine does not run here (its reductions, overflow check and
checkpoint writer); the layout classes stand where its ZeRO optimizer calls ours, with
DeepSpeed's own ``link_hp_params`` and ``_create_fp16_sub_groups``. Real GPUs:
scripts/gpu_check.sh.
"""
from __future__ import annotations

import pytest
import torch

import ds_structopt as dso
from ds_structopt.zero.optimizer import DistributedStructuredOptimizer
from sim.collectives import mismatches
from sim.world import (FSDP2, Replicated, Zero3, Zero12, first_use_problems, holders_oracle, llama_param_groups,
                       rank_device, simulated_rank, state_problems)

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
    groups = llama_param_groups("7b", layers, device=device)
    if kind == "zero2":
        return groups, Zero12(groups, WORLD, rank, device)
    if kind == "fsdp2":
        return groups, FSDP2(groups, WORLD, rank, device)
    return groups, Replicated(groups, WORLD, rank)


def simulate(kind: str, optimizer: str = "AdaDiag++", layers: int = 4, steps: int = 3, ranks=RANKS,
             **dist_options) -> dict[int, dict]:
    """Run ``steps`` optimizer steps on each simulated rank; returns each rank's trace and findings."""
    out = {}
    for rank in ranks:
        answer = {}
        with simulated_rank(rank, WORLD, oracle=lambda obj, r: answer["fn"](obj, r)) as (checker, syncs):
            groups, layout = build(kind, rank, layers)
            answer["fn"] = holders_oracle(layout)
            opt = DistributedStructuredOptimizer(
                groups, dso.get_optimizer_class(optimizer.split("-")[0].replace("factored", "")),
                OPTIONS[optimizer], **dist_options)
            if hasattr(layout, "attach"):
                layout.attach(opt)
            for _ in range(steps):
                layout.fill_grads()
                layout.step(opt)
            out[rank] = {"calls": checker.calls, "problems": checker.problems, "syncs": syncs.count,
                         "state": state_problems(opt, rank_device(rank)), "owned": len(opt.matrix_state),
                         "first_use": first_use_problems(checker.calls), "skipped": opt.skipped_steps}
    return out


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


@pytest.mark.parametrize("kind", ["zero2", "zero3", "ddp", "fsdp2"])
def test_adadiagpp_7b_shapes_world_64(kind):
    """The flagship at every layout; ZeRO-1 lays out the optimizer's partitions as ZeRO-2 does."""
    assert_clean(simulate(kind, layers=32 if kind == "zero2" else 4))


@pytest.mark.parametrize("optimizer", ["AdaDiag", "AdaDiag++factored", "ASGO", "ASGO-eigh", "DASGO"])
@pytest.mark.parametrize("kind", ["zero3", "fsdp2"])
def test_every_family(kind, optimizer):
    assert_clean(simulate(kind, optimizer, layers=2, ranks=(0, 1, 63)))


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_node_replica_groups(kind):
    """ownership_group_size=8: each node's ranks own every matrix once; its subgroups are built by
    a collective before the first message."""
    runs = simulate(kind, layers=2, ranks=(0, 1, 7, 8, 63), ownership_group_size=8)
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
    with simulated_rank(0, 8) as (checker, _):
        engine = CudaEngine(rank_device(0), 0)
        losses = train.train_step(engine, rows, micro=2, accum=2)
        loss = train.evaluate(engine, rows, micro=4)
        health = train._health(None, engine.device)
        path = checkpoints.save(engine, str(tmp_path), 10, {"step": 10}, keep_last=2)
    assert len(losses) == 2 and isinstance(loss, float) and health["decomp_failures"] == 1  # nominal reads answer 1
    assert path is not None and (tmp_path / "latest").read_text() == "step00000010"
    assert engine.input_devices and all(d == rank_device(0) for d in engine.input_devices), engine.input_devices
    assert not checker.problems, checker.problems[0]
    assert sum(c.kind == "all_reduce" for c in checker.calls) == 4  # eval, health, two save agreements
