"""Issue 18's targets on the simulated step (``ds-structopt bench scale``'s own code):
host syncs per plain step, bytes against the planner, balance against what placement can do.

Each case runs our real ``DistributedStructuredOptimizer`` as a rank of a 64- or 256-rank
world with fake CUDA tensors (``ds_structopt.sim``); see the bench module for what is counted.
"""
from __future__ import annotations

import json

import pytest

from ds_structopt.bench import scale

VARIANTS = list(scale.VARIANTS)


@pytest.mark.parametrize("optimizer", VARIANTS)
@pytest.mark.parametrize("stage", [2, 3])
def test_plain_step_makes_one_host_sync_whatever_the_number_of_matrices(optimizer, stage):
    """At most 2 (the target); 1 measured: the step's decision. The same with 2 and 8 layers
    (14 and 56 matrices), and on an owner and a non-owner."""
    for layers in (2, 8):
        for rank in (0, 63):
            row = scale.simulate(scale.Config(64, "7b", stage, "flat", optimizer, layers=layers), rank)
            assert row["problems"] == [], row["problems"]
            assert row["host_syncs_per_step"] <= 2, (layers, rank, row["host_sync_sites"])
            assert row["host_syncs_per_step"] == 1, (layers, rank, row["host_sync_sites"])


def test_torch_calls_per_plain_step_do_not_grow_with_the_messages():
    """At ZeRO-3 an owner receives a piece of its matrix from every rank and sends every rank its
    slice back; the views those messages land in and leave from are one split per matrix, and a
    rank's gradient views one split per partition, so the calls a GPU would launch stay flat
    while the messages grow 10x (was 389 -> 840 calls for 26 -> 268 messages, 8 -> 256 ranks)."""
    rows = {world: scale.simulate(scale.Config(world, "7b", 3, "flat", "AdaDiag++", layers=2), 0) for world in (8, 256)}
    assert rows[256]["messages_per_step"] >= 10 * rows[8]["messages_per_step"]
    assert rows[256]["torch_calls_per_step"] <= rows[8]["torch_calls_per_step"], \
        {w: r["torch_calls_per_step"] for w, r in rows.items()}


@pytest.mark.parametrize("ownership", ["flat", "node"])
@pytest.mark.parametrize("stage", [2, 3])
def test_bytes_sent_equal_the_planners(stage, ownership):
    for optimizer in ("AdaDiag++", "DASGO"):
        for rank in (0, 9):
            row = scale.simulate(scale.Config(64, "7b", stage, ownership, optimizer, layers=4), rank)
            assert row["bytes_per_step"] == row["planner_bytes_per_step"], (optimizer, rank)
            assert row["state_bytes"] == row["planner_state_bytes"], (optimizer, rank)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("optimizer", ["AdaDiag++", "AdaDiag++ factored", "ASGO", "DASGO"])
def test_owner_transients_stay_under_one_and_a_half_states(optimizer, stage):
    """The heaviest owner of a 64-rank world at 7B shapes: what a plain step allocates on top of
    what was alive is at most 1.5x its optimizer state (updates written into the owner's own
    gradient buffers, messages landing in place, ASGO's Newton-Schulz iterates in the gathered
    gradient's memory). The heaviest ASGO owner holds an MLP matrix (4096 x 11008: two of the
    root's four d x d buffers fit in its gradient); an owner of a square one stays at 2.0x
    (one fits; docs/benchmarks.md)."""
    cfg = scale.Config(64, "7b", stage, "flat", optimizer, layers=8)
    first = scale.simulate(cfg, 0)
    heaviest = max(range(64), key=lambda r: (first["_loads"][r], -r))
    row = scale.simulate(cfg, heaviest)
    assert row["state_bytes"] > 0
    assert row["transient_bytes_plain"] <= 1.5 * row["state_bytes"], (row["transient_bytes_plain"], row["state_bytes"])


def test_quick_sweep_is_resumable(tmp_path, capsys):
    todo = scale.configs((8,), ("7b",), (2,), ("flat",), ("AdaDiag++",), layers=2)
    rows = scale.run(todo, str(tmp_path))
    assert {r["rank"] for r in rows} >= {0, 7}
    again = scale.run(todo, str(tmp_path))
    assert "cached" in capsys.readouterr().out
    assert again == json.loads((tmp_path / "scale.json").read_text())
    assert (tmp_path / "scale.md").read_text().count("| 8 | 7b |") == 1


@pytest.mark.parametrize("optimizer", VARIANTS)
@pytest.mark.parametrize("stage,ownership,world", [(2, "flat", 8), (3, "flat", 8), (3, "flat", 64), (2, "node", 64)])
def test_planner_step_peak_within_0_1_percent_of_the_simulated_step(optimizer, stage, ownership, world):
    """``planning.step_memory`` against the simulated step, every step (first, plain, refresh),
    on rank 0 (embeddings), the last rank and the most loaded owner."""
    cfg = scale.Config(world, "7b", stage, ownership, optimizer, layers=2)
    first = scale.simulate(cfg, 0)
    for rank in scale.sampled_ranks(world, first.pop("_loads")):
        row = first if rank == 0 else scale.simulate(cfg, rank)
        for step, (planned, simulated) in enumerate(zip(row["planner_peak_bytes_by_step"], row["peak_bytes_by_step"]), 1):
            assert abs(planned - simulated) <= 0.001 * simulated, (rank, step, planned, simulated)  # issue: 5 %


def test_simulated_p2p_messages_stay_alive_until_waited_on():
    """NCCL keeps a posted message's tensor until its work is waited on; the planner's peak
    counts message copies that long, so the simulation must too."""
    import gc

    import torch
    import torch.distributed as dist

    from ds_structopt.sim.world import simulated_rank

    with simulated_rank(0, 2) as sim:
        msg = torch.zeros(1 << 20, device="cuda")
        before = sim.memory.live
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, msg, 1)])
        del msg
        gc.collect()
        assert sim.memory.live == before
        for w in works:
            w.wait()
        gc.collect()
        assert sim.memory.live == before - 4 * (1 << 20)
