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


def planned_node_bytes(opt: str, stage: int, offload: str = "cpu") -> int:
    """``ds-structopt plan``'s host (cpu) or NVMe (nvme: the wide model) bytes of the one 2-rank
    node, for the worker's model (fp32)."""
    from dist.worker import build_model, build_wide_model

    import ds_structopt as dso
    from ds_structopt.planning.model_shapes import ParamSpec
    from ds_structopt.planning.planner import make_plan

    family = dso.get_optimizer_class(opt)
    math = family(dso.param_groups((build_model if offload == "cpu" else build_wide_model)(0)), **OPTIMIZERS[opt])
    groups = [[ParamSpec(n, tuple(p.shape), math.is_matrix(p, g)) for n, p in zip(g["param_names"], g["params"])]
              for g in math.param_groups]
    plan = make_plan(groups, opt, OPTIMIZERS[opt], 2, stage, ranks_per_node=2, offload=offload, param_bytes=4)
    return (plan.host_bytes_per_node or plan.nvme_bytes_per_node)[0]


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
        assert planned_node_bytes(opt, s) == measured, (s, planned_node_bytes(opt, s), measured)
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


# ----- ZeRO-Infinity: offload_optimizer to NVMe (stage 3) ------------------------------------
def aio_handle():
    """DeepSpeed's async I/O handle (libaio), or a skip saying what is missing."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        return AsyncIOBuilder().load(verbose=False).aio_handle(1048576, 8, False, True, 1)
    except Exception as exc:  # no libaio-dev, no compiler: the op cannot be built here
        pytest.skip(f"DeepSpeed's async_io op is unavailable ({type(exc).__name__}: {exc}); "
                    "scripts/install_system_deps.sh installs libaio-dev")


def nvme(c: dict, folder) -> dict:
    c["extra_config"]["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": str(folder),
                                                                   "pin_memory": True}
    return c


def folder_bytes(folder) -> tuple[int, int]:
    import os

    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    return len(files), sum(os.path.getsize(f) for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["AdaDiag++", "DASGO"])
def test_nvme_offload_matches_no_offload_and_checkpoints_reshard(tmp_path, opt):
    """2 ranks, ZeRO-3, a 557k-parameter model (each rank's partition over DeepSpeed's 1 MiB
    swapping threshold, so DeepSpeed's own partitions go to NVMe too), 10 steps: parameters as
    without offload, our whole state parked in files between steps, checkpoints that resume
    bit-identically and hold what a checkpoint without offload holds."""
    aio_handle()
    wide = dict(model="wide")
    ck, ck_none = str(tmp_path / "ck"), str(tmp_path / "ck-none")
    cases = [case("none", opt, 3, False, **wide), nvme(case("nvme", opt, 3, False, **wide), tmp_path / "nvme"),
             nvme(case("save", opt, 3, False, steps=SPLIT, save_after=SPLIT, save_dir=ck, **wide), tmp_path / "nvme-s"),
             case("save-none", opt, 3, False, steps=SPLIT, save_after=SPLIT, save_dir=ck_none, **wide)]
    first = run_ranks(2, cases, tmp_path / "a")
    errors = {"nvme vs none": max_rel(first["nvme"]["params"], first["none"]["params"])}
    assert_structured_every_step(first["nvme"]["metrics"], MATRICES, STEPS, MATRICES, "nvme")
    ours, theirs = 0, 0
    for r, m in enumerate(first["nvme"]["metrics"]):  # between steps every byte of our state is in its files
        assert m["state_bytes"] > 0 and m["nvme_state_bytes"] == m["state_bytes"], (r, m)
        assert m["state_bytes"] == first["none"]["metrics"][r]["state_bytes"], r
        count, size = folder_bytes(tmp_path / "nvme" / "ds_structopt" / f"rank{r}")
        assert count > 0 and m["state_bytes"] <= size < m["state_bytes"] + count * 1024, (r, count, size)
        count, masters = folder_bytes(tmp_path / "nvme" / "zero_stage_3" / "optimizer" / f"rank{r}")
        assert count > 0  # DeepSpeed's own partitions went to NVMe too
        ours, theirs = ours + m["state_bytes"], theirs + masters
    # the planner's NVMe GiB/node: our state to the byte; DeepSpeed's files are its fp32 masters as
    # its swapper sizes them (measured 0.3 % under the partition's bytes here)
    assert abs(planned_node_bytes(opt, 3, "nvme") - ours - theirs) <= 0.01 * theirs, (planned_node_bytes(opt, 3, "nvme"), ours, theirs)
    resumed = run_ranks(2, [nvme(case("load", opt, 3, False, start_step=SPLIT, load_dir=ck, **wide), tmp_path / "nvme-l")],
                        tmp_path / "b")
    errors["resume 2->2 nvme"] = max_rel(resumed["load"]["params"], first["nvme"]["params"])
    single = run_ranks(1, [case(f"load-{k}", opt, 3, False, start_step=SPLIT, load_dir=d, **wide)
                           for k, d in (("nvme", ck), ("none", ck_none))], tmp_path / "c")
    # the same 2->1 resume from the NVMe run's checkpoint and from a run without offload
    errors["resume 2->1, nvme ckpt vs none ckpt"] = max_rel(single["load-nvme"]["params"], single["load-none"]["params"])
    print(f"\n{opt} NVMe offload (max relative error):", {k: f"{v:.1e}" for k, v in errors.items()})
    assert errors["nvme vs none"] <= 1e-6, errors
    assert errors["resume 2->2 nvme"] == 0, errors  # same world: bit-identical
    assert errors["resume 2->1, nvme ckpt vs none ckpt"] == 0, errors  # the checkpoints hold the same state


def test_state_store_round_trips_any_size_and_dtype(tmp_path):
    """Sizes that are not a multiple of O_DIRECT's block (whose tail libaio would drop), fp32, bf16
    and int64; 0-d counters stay in memory; a tensor still in its read buffer is written from it."""
    import torch

    from ds_structopt.distributed.state_store import Parked, StateStore

    store = StateStore(str(tmp_path / "s"), aio_handle())
    gen = torch.Generator().manual_seed(0)
    st = {"exp_avg": torch.randn(37, 5, generator=gen), "col": torch.randn(1000, generator=gen).bfloat16(),
          "idx": torch.arange(7), "count": torch.tensor(3.0), "step": 4}
    want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
    store.park([("layer.0#12", st)])
    assert all(isinstance(st[k], Parked) for k in ("exp_avg", "col", "idx"))
    assert isinstance(st["count"], torch.Tensor) and st["step"] == 4
    assert StateStore.parked_bytes([st]) == 37 * 5 * 4 + 1000 * 2 + 7 * 8
    with store.resident([("layer.0#12", st)]):
        assert all(torch.equal(st[k], want[k]) and st[k].dtype == want[k].dtype for k in ("exp_avg", "col", "idx"))
        st["exp_avg"].mul_(2)  # in place: written back from its read buffer
        st["idx"] = st["idx"] + 1  # replaced: written through a padded copy
    assert torch.equal(st["exp_avg"].materialize(), want["exp_avg"] * 2)
    assert torch.equal(st["idx"].materialize(), want["idx"] + 1)
    assert torch.equal(st["col"].materialize(), want["col"])


def test_state_store_failed_step_keeps_the_last_good_state(tmp_path):
    """The math raising mid-step writes nothing and puts every state back as it was."""
    import torch

    from ds_structopt.distributed.state_store import StateStore

    store = StateStore(str(tmp_path / "s"), aio_handle())
    st = {"exp_avg": torch.ones(300), "step": 1}
    store.park([("w", st)])
    written = store.bytes_written
    with pytest.raises(ZeroDivisionError):
        with store.resident([("w", st)]):
            st["exp_avg"].add_(5)
            st["step"] = 2
            st["new"] = torch.zeros(3)
            raise ZeroDivisionError
    assert st["step"] == 1 and "new" not in st and store.bytes_written == written
    assert torch.equal(st["exp_avg"].materialize(), torch.ones(300))
