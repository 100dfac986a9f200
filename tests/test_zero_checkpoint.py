"""engine.save_checkpoint / load_checkpoint with our name-keyed state: round trip at every stage
and resharding (2 -> 1, 2 -> 4, 1 -> 2) continue the uninterrupted trajectory."""
import pytest
from dist.launch import run_ranks
from test_zero_parity import OPTIMIZERS

STEPS, SPLIT, BATCH = 10, 5, 64


def case(name, opt, stage, **extra):
    return {"name": name, "optimizer": opt, "params": OPTIMIZERS[opt], "stage": stage, "steps": STEPS,
            "global_batch": BATCH, **extra}


def max_rel(a, b):
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["AdaDiag++", "ASGO"])
def test_round_trip_and_resharding(tmp_path, opt):
    ck = {s: str(tmp_path / f"ck-z{s}") for s in (0, 1, 2, 3)}
    first = run_ranks(2, [case(f"full-z{s}", opt, s) for s in (0, 1, 2, 3)]
                      + [case(f"save-z{s}", opt, s, steps=SPLIT, save_after=SPLIT, save_dir=ck[s]) for s in (0, 1, 2, 3)],
                      tmp_path / "a")
    errors = {}
    resumed = run_ranks(2, [case(f"load-z{s}", opt, s, start_step=SPLIT, load_dir=ck[s]) for s in (0, 1, 2, 3)], tmp_path / "b")
    for s in (0, 1, 2, 3):
        errors[f"2->2 z{s}"] = max_rel(resumed[f"load-z{s}"]["params"], first[f"full-z{s}"]["params"])
    for world in (1, 4):
        out = run_ranks(world, [case(f"load-z{s}", opt, s, start_step=SPLIT, load_dir=ck[s]) for s in (2, 3)],
                        tmp_path / f"w{world}")
        for s in (2, 3):
            errors[f"2->{world} z{s}"] = max_rel(out[f"load-z{s}"]["params"], first[f"full-z{s}"]["params"])
    single = str(tmp_path / "ck-single")
    run_ranks(1, [case("save", opt, 2, steps=SPLIT, save_after=SPLIT, save_dir=single)], tmp_path / "c")
    out = run_ranks(2, [case("load", opt, 2, start_step=SPLIT, load_dir=single)], tmp_path / "d")
    errors["1->2 z2"] = max_rel(out["load"]["params"], first["full-z2"]["params"])
    print(f"\n{opt} resume vs uninterrupted (max relative error):", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(errors[f"2->2 z{s}"] == 0 for s in (0, 1, 2, 3)), errors  # same world size: bit-identical
    assert all(v < 1e-5 for v in errors.values()), errors  # other world sizes: other reduction orders



@pytest.mark.slow
def test_shipped_configs_resume_bit_identical(tmp_path):
    """Every shipped config has an LR scheduler (warmup + cosine): a round trip at the same world
    size continues the uninterrupted run bit for bit, LR included (the first resumed step used the
    scheduler's initial LR when the param groups' LR was not restored)."""
    from pathlib import Path

    configs = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs").glob("ds_*_zero2.json")
                     if "tiny" not in p.name)
    assert len(configs) == 5
    cases = []
    for path in configs:
        name = Path(path).stem
        cases += [{"name": f"full-{name}", "config_path": path, "steps": STEPS},
                  {"name": f"save-{name}", "config_path": path, "steps": SPLIT, "save_after": SPLIT,
                   "save_dir": str(tmp_path / name)}]
    first = run_ranks(2, cases, tmp_path / "a")
    resumed = run_ranks(2, [{"name": f"load-{Path(p).stem}", "config_path": p, "steps": STEPS, "start_step": SPLIT,
                             "load_dir": str(tmp_path / Path(p).stem)} for p in configs], tmp_path / "b")
    for path in configs:
        name = Path(path).stem
        a, b = first[f"full-{name}"]["params"], resumed[f"load-{name}"]["params"]
        different = [n for n in a if not a[n].equal(b[n])]
        assert not different, (name, different, max_rel(b, a))
