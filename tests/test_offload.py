"""ZeRO-Offload (``offload_optimizer: {"device": "cpu"}`` at stages 1-3, ``offload_param`` at 3) with
our optimizers, on 2 real gloo ranks and DeepSpeed's CPU accelerator: DeepSpeed keeps its fp32
partitions (and so our state, which lives with them) in host memory and calls our step on them.
Against the same run without offload: parameters after 10 steps, every matrix's structured
update counted, and checkpoints that resume and reshard."""
from __future__ import annotations

import pytest
from counting import assert_structured_every_step
from dist.launch import run_ranks
from test_zero_parity import OPTIMIZERS

STEPS, SPLIT, BATCH = 10, 5, 64
MATRICES = 4  # the worker's default model: 4 square Linear layers


def zero(stage: int, offload: bool, params: bool = False) -> dict:
    block: dict = {"stage": stage}
    if offload:
        block["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if params:
        block["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"zero_optimization": block}


def case(name: str, opt: str, stage: int, offload: bool, params: bool = False, **extra) -> dict:
    return {"name": name, "optimizer": opt, "params": OPTIMIZERS[opt], "stage": stage, "steps": STEPS,
            "global_batch": BATCH, "extra_config": zero(stage, offload, params), **extra}


def planned_host_bytes(opt: str, stage: int) -> int:
    """``ds-structopt plan``'s host bytes of the one 2-rank node, for the worker's model (fp32)."""
    from dist.worker import build_model

    import ds_structopt as dso
    from ds_structopt.planning.model_shapes import ParamSpec
    from ds_structopt.planning.planner import make_plan

    family = dso.get_optimizer_class(opt)
    math = family(dso.param_groups(build_model(0)), **OPTIMIZERS[opt])
    groups = [[ParamSpec(n, tuple(p.shape), math.is_matrix(p, g)) for n, p in zip(g["param_names"], g["params"])]
              for g in math.param_groups]
    plan = make_plan(groups, opt, OPTIMIZERS[opt], 2, stage, ranks_per_node=2, offload="cpu", param_bytes=4)
    return plan.host_bytes_per_node[0]


def max_rel(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["AdaDiag++", "DASGO"])
def test_offload_matches_no_offload_and_checkpoints_reshard(tmp_path, opt):
    ck = {s: str(tmp_path / f"ck-z{s}") for s in (1, 2, 3)}
    cases = [case(f"none-z{s}", opt, s, False) for s in (1, 2, 3)]
    cases += [case(f"cpu-z{s}", opt, s, True, host_bytes=True) for s in (1, 2, 3)]
    cases += [case("cpu-z3-params", opt, 3, True, params=True)]
    cases += [case(f"save-z{s}", opt, s, True, steps=SPLIT, save_after=SPLIT, save_dir=ck[s]) for s in (1, 2, 3)]
    first = run_ranks(2, cases, tmp_path / "a")
    errors = {}
    for s in (1, 2, 3):
        errors[f"cpu z{s}"] = max_rel(first[f"cpu-z{s}"]["params"], first[f"none-z{s}"]["params"])
        assert_structured_every_step(first[f"cpu-z{s}"]["metrics"], MATRICES, STEPS, MATRICES, f"cpu z{s}")  # 4 biases
    errors["cpu+params z3"] = max_rel(first["cpu-z3-params"]["params"], first["none-z3"]["params"])
    for s in (1, 2, 3):  # the planner's host memory with offload: our state + DeepSpeed's host partitions, to the byte
        run = first[f"cpu-z{s}"]
        measured = sum(m["state_bytes"] for m in run["metrics"]) + sum(run["deepspeed_host_bytes"])
        assert planned_host_bytes(opt, s) == measured, (s, planned_host_bytes(opt, s), measured)
    resumed = run_ranks(2, [case(f"load-z{s}", opt, s, True, start_step=SPLIT, load_dir=ck[s]) for s in (1, 2, 3)],
                        tmp_path / "b")
    for s in (1, 2, 3):
        errors[f"resume 2->2 z{s}"] = max_rel(resumed[f"load-z{s}"]["params"], first[f"cpu-z{s}"]["params"])
    single = run_ranks(1, [case(f"load-z{s}", opt, s, False, start_step=SPLIT, load_dir=ck[s]) for s in (2, 3)],
                       tmp_path / "c")
    for s in (2, 3):  # saved with offload on 2 ranks, resumed without it on 1
        errors[f"resume 2->1 no offload z{s}"] = max_rel(single[f"load-z{s}"]["params"], first[f"cpu-z{s}"]["params"])
    print(f"\n{opt} offload vs none / resumed vs uninterrupted (max relative error):",
          {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(v <= 1e-6 for k, v in errors.items() if not k.startswith("resume 2->1")), errors
    assert all(errors[f"resume 2->2 z{s}"] == 0 for s in (1, 2, 3)), errors  # same world: bit-identical
    assert all(v < 1e-5 for v in errors.values()), errors  # another world size: another reduction order
