"""``ds-structopt plan`` against reality: its per-rank state memory and our step's bytes must equal
what real DeepSpeed ranks measure (``bench dist``) at 2 and 4 ranks, every ZeRO stage, flat and
hierarchical ownership; each family's state-size model must match its real state."""
import json
import subprocess
import sys

import pytest
import torch

import ds_structopt as dso
from ds_structopt.bench.dist import BASELINE, OURS, llama_kwargs, run_config
from ds_structopt.optim.base import COUNTERS
from ds_structopt.planning import make_plan, model_params

QUICK = {"hidden": 64, "layers": 2, "batch": 8, "seq_len": 32, "steps": 2, "warmup": 1, "update_freq": 2}


@pytest.mark.parametrize("name, options", [(name, {}) for name in dso.OPTIMIZERS] + [
    ("AdaDiag", {"basis": "ema"}), ("AdaDiag++", {"factored": True}),
    ("AdaDiag++", {"factored": True, "betas": (0.0, 0.999)}), ("AdaDiag++", {"max_precond_dim": 40}),
    ("ASGO", {"root": "eigh"}),
])
def test_state_size_model_matches_real_state(name, options):
    shapes = [(24, 56), (56, 24), (32, 32), (80, 16)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = dso.build(name, params, lr=1e-3, **options)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    group = opt.param_groups[0]
    for p, (m, n) in zip(params, shapes):
        real = sum(t.numel() for k, t in opt.state[p].items() if isinstance(t, torch.Tensor) and k not in COUNTERS)
        assert type(opt).state_elements(m, n, group) == real, (name, options, (m, n))


def _plan_for(cfg, opt_name, world, stage, group_size=None):
    options = dict(OURS[opt_name]["params"], update_freq=cfg["update_freq"])
    groups = model_params(llama_kwargs(cfg), OURS[opt_name]["type"], options)
    return make_plan(groups, OURS[opt_name]["type"], options, world, stage, group_size=group_size)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_plan_equals_measured_memory_and_bytes(world):
    cases = [(stage, None) for stage in (1, 2, 3)] + ([(0, 2), (2, 2)] if world == 4 else [])
    report = {}
    for stage, group_size in cases:
        cfg = dict(QUICK, ranks=world, stage=stage, optimizers=["AdaDiag++", "ASGO"])
        if group_size:
            cfg["ds_structopt"] = {"ownership_group_size": group_size}
        measured = run_config(cfg, timeout=600)["results"]
        for opt_name in ("AdaDiag++", "ASGO"):
            plan = _plan_for(cfg, opt_name, world, stage, group_size)
            got = measured[opt_name]
            key = f"{world} ranks ZeRO-{stage}{' groups of %d' % group_size if group_size else ''} {opt_name}"
            assert got["state_bytes_per_rank"] == plan.state_bytes_per_rank, key
            assert got["our_comm_bytes_per_step"] == plan.our_bytes_per_step, key
            deepspeed = got["comm_bytes_per_step"] - got["our_comm_bytes_per_step"]
            report[key] = (plan.our_bytes_per_step, deepspeed / plan.deepspeed_bytes_per_step)
        base = measured[BASELINE]["comm_bytes_per_step"] / plan.deepspeed_bytes_per_step
        report[f"{world} ranks ZeRO-{stage} DeepSpeed AdamW"] = (0, base)
    print("\nplan vs measured (our bytes/step, DeepSpeed bytes measured/model):", json.dumps(report, indent=1))
    for key, (_, ratio) in report.items():  # DeepSpeed's own traffic is a model: within 5 %
        assert 0.95 < ratio < 1.05, (key, ratio)


def test_plan_cli_prints_a_table_and_rejects_bad_input(tmp_path):
    out = tmp_path / "plan.json"
    run = subprocess.run([sys.executable, "-m", "ds_structopt.cli", "plan", "--model", "7b", "--world", "8", "64",
                          "--options", '{"update_freq": 100, "stagger_refresh": true}', "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "| 7b | 64 |" in run.stdout
    plans = json.loads(out.read_text())
    assert [p["world"] for p in plans] == [8, 64]
    assert plans[1]["max_state_bytes"] < plans[0]["max_state_bytes"]
    bad = subprocess.run([sys.executable, "-m", "ds_structopt.cli", "plan", "--model", "7b", "--options", '{"lr": -1}'],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "lr" in bad.stderr, bad.stderr


def test_stagger_flattens_the_planned_refresh_load():
    groups = model_params("130m", "AdaDiag++", {})
    flat = make_plan(groups, "AdaDiag++", {"update_freq": 10}, 4, 2)
    staggered = make_plan(groups, "AdaDiag++", {"update_freq": 10, "stagger_refresh": True, "first_refresh_window": 10},
                          4, 2)  # first bases spread over the whole window too (the default window is below)
    assert flat.refresh_max / flat.refresh_mean == pytest.approx(10)
    assert staggered.refresh_max / staggered.refresh_mean < 1.5


def test_planned_worst_step_includes_the_first_window():
    """Staggered phases spread later refreshes over all T steps, but the first bases only over
    first_refresh_window steps: that window holds the run's heaviest refresh step."""
    groups = model_params("130m", "AdaDiag++", {})
    options = {"update_freq": 200, "stagger_refresh": True}
    default = make_plan(groups, "AdaDiag++", options, 4, 2)
    assert default.first_window == 8
    assert default.refresh_max == max(max(r) for r in default.first_refresh_flops_per_step)
    whole = make_plan(groups, "AdaDiag++", {**options, "first_refresh_window": 200}, 4, 2)
    synchronous = make_plan(groups, "AdaDiag++", {"update_freq": 200}, 4, 2)
    assert synchronous.first_window == 1 and synchronous.refresh_max / synchronous.refresh_mean == pytest.approx(200)
    # 8 steps share the first bases (no step below the largest single decomposition), later
    # windows spread over 200
    assert whole.refresh_max < default.refresh_max < synchronous.refresh_max / 3
