"""Issue 19's guard: per optimizer step, how many matrices got the structured update and how many
parameters went to AdamW, in every supported DeepSpeed mode (2 real gloo ranks), with gradient
accumulation counting one update per optimizer step; and rank 0's start-up line."""
from __future__ import annotations

import pytest
import torch
from counting import assert_structured_every_step
from dist.launch import run_ranks

import ds_structopt as dso
from ds_structopt.distributed.optimizer import DistributedStructuredOptimizer
from ds_structopt.optim.registry import get_optimizer_class

BLOCK_MATRICES, BLOCK_VECTORS = 24, 28  # the worker's "blocks" model: 4 x (6 matrices; 6 biases + 1 norm)
STEPS = 3


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def test_single_process_counts_one_structured_update_per_step_whatever_the_micro_batches():
    model = _mlp()
    opt = dso.build("AdaDiag++", dso.param_groups(model), lr=1e-2)
    for _ in range(STEPS):
        for _ in range(4):  # gradient accumulation: backward four times, step once
            model(torch.randn(5, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    stats = opt.stats()
    assert (stats["eligible_matrices"], stats["elementwise_params"]) == (2, 2)
    assert (stats["optimizer_steps"], stats["structured_updates"], stats["elementwise_updates"]) == (STEPS, 2, 2)
    assert stats["structured_updates_total"] == 2 * STEPS


def test_rank0_prints_one_start_up_line_with_the_split(capsys):
    DistributedStructuredOptimizer(dso.param_groups(_mlp()), get_optimizer_class("ASGO"), {"lr": 1e-2})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ds_structopt:")]
    assert lines == ["ds_structopt: ASGO preconditions 2 matrices (0.weight, 2.weight); AdamW steps 2 parameters "
                     "(0.bias, 2.bias) [1 rank(s), one owner per matrix]"], lines


def test_start_up_line_warns_when_nothing_is_preconditioned(capsys):
    bias_only = [{"params": [torch.nn.Parameter(torch.zeros(4))], "param_names": ["b"]}]
    DistributedStructuredOptimizer(bias_only, get_optimizer_class("AdaDiag++"), {})
    assert "WARNING: no parameter gets the structured update" in capsys.readouterr().out


CASES = {  # name -> what differs from a 2-rank fp32 run of the blocks model
    "zero0": {"stage": 0}, "zero1": {"stage": 1}, "zero2": {"stage": 2}, "zero3": {"stage": 3},
    "zero3-zero.Init": {"stage": 3, "zero_init": True},
    "zero0-bf16": {"stage": 0, "bf16": True}, "zero2-bf16": {"stage": 2, "bf16": True},
    "zero3-bf16": {"stage": 3, "bf16": True},
    "zero1-BF16_Optimizer": {"stage": 1, "bf16": True, "extra_config": {"data_types": {"grad_accum_dtype": "fp32"}}},
    "zero2-accum4": {"stage": 2, "grad_accum": 4}, "zero3-accum4": {"stage": 3, "grad_accum": 4},
    "zero0-accum4-bf16": {"stage": 0, "grad_accum": 4, "bf16": True},
}


@pytest.mark.slow
def test_every_deepspeed_mode_updates_every_matrix_structurally_once_per_step(tmp_path):
    cases = [{"name": name, "optimizer": "AdaDiag++", "params": {"lr": 3e-3, "update_freq": 2}, "steps": STEPS,
              "global_batch": 64, "model": "blocks", **extra} for name, extra in CASES.items()]
    results = run_ranks(2, cases, tmp_path)
    for case in cases:
        r = results[case["name"]]
        assert_structured_every_step(r["metrics"], BLOCK_MATRICES, STEPS, BLOCK_VECTORS, case["name"])
    assert results["zero1-BF16_Optimizer"]["wrapper"] == "BF16_Optimizer"
