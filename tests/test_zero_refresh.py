"""Issue-6 features on real DeepSpeed ranks: hierarchical ownership and refresh-ahead keep parity
with the single-process optimizer; staggered + ahead runs are deterministic and resume mid-window
onto the uninterrupted trajectory."""
import pytest
import torch
from dist.launch import run_ranks
from test_zero_parity import BATCH, OPTIMIZERS, STEPS, reference

AHEAD = {"AdaDiag++": dict(OPTIMIZERS["AdaDiag++"], refresh_from="previous"),
         "ASGO": dict(OPTIMIZERS["ASGO"], refresh_from="previous")}
STAGGERED = {"AdaDiag++": dict(OPTIMIZERS["AdaDiag++"], update_freq=4, stagger_refresh=True, refresh_from="previous"),
             "ASGO": dict(OPTIMIZERS["ASGO"], update_freq=4, stagger_refresh=True, refresh_from="previous")}


def case(name, opt, params, stage, model="blocks", **extra):
    return {"name": name, "optimizer": opt, "params": params, "stage": stage, "steps": STEPS, "global_batch": BATCH,
            "model": model, **extra}


def max_rel(got, ref):
    return max(((got[n] - r).norm() / r.norm()).item() for n, r in ref.items())


@pytest.mark.slow
def test_hierarchical_ownership_matches_single_process_and_owns_each_matrix_once_per_group(tmp_path):
    block = {"ds_structopt": {"ownership_group_size": 2}}
    cases = [case(f"{opt}-z{s}", opt, OPTIMIZERS[opt], s, model="mlp", extra_config=block)
             for opt in ("AdaDiag++", "ASGO") for s in (0, 2, 3)]
    results = run_ranks(4, cases, tmp_path)
    errors = {}
    for c in cases:
        errors[c["name"]] = max_rel(results[c["name"]]["params"], reference(c["optimizer"], c["params"], world=4))
        owned = [m["owned_matrices"] for m in results[c["name"]]["metrics"]]
        assert sum(owned) == 2 * 4 and sum(owned[:2]) == 4 and sum(owned[2:]) == 4, (c["name"], owned)
    print("\nhierarchical (4 ranks, groups of 2) vs single process:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(v < 1e-5 for v in errors.values()), errors


@pytest.mark.slow
def test_refresh_ahead_matches_single_process(tmp_path):
    cases = [case(f"{opt}-z{s}", opt, AHEAD[opt], s, model="mlp") for opt in AHEAD for s in (1, 3)]
    results = run_ranks(2, cases, tmp_path)
    errors = {c["name"]: max_rel(results[c["name"]]["params"], reference(c["optimizer"], c["params"])) for c in cases}
    print("\nrefresh_from=previous, 2 ranks vs single process:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(v < 1e-5 for v in errors.values()), errors
    for c in cases:  # it really refreshed: step 1 synchronously, then from the worker
        assert sum(m["refreshes"] for m in results[c["name"]]["metrics"]) > 0


@pytest.mark.slow
def test_staggered_ahead_is_deterministic_and_resumes_mid_window(tmp_path):
    """T = 4, save after step 6 (mid-window, with decompositions in flight), resume at 2 ranks."""
    split = 6
    first = run_ranks(2, [case(f"{opt}-z{s}-{k}", opt, STAGGERED[opt], s) for opt in STAGGERED for s in (2, 3) for k in "ab"]
                      + [case(f"{opt}-z{s}-save", opt, STAGGERED[opt], s, steps=split, save_after=split,
                              save_dir=str(tmp_path / f"ck-{opt}-{s}")) for opt in STAGGERED for s in (2, 3)],
                      tmp_path / "a")
    resumed = run_ranks(2, [case(f"{opt}-z{s}-load", opt, STAGGERED[opt], s, start_step=split,
                                 load_dir=str(tmp_path / f"ck-{opt}-{s}")) for opt in STAGGERED for s in (2, 3)],
                        tmp_path / "b")
    for opt in STAGGERED:
        for s in (2, 3):
            a, b = first[f"{opt}-z{s}-a"]["params"], first[f"{opt}-z{s}-b"]["params"]
            assert all(torch.equal(a[n], b[n]) for n in a), f"{opt} z{s}: two runs differ"
            got = resumed[f"{opt}-z{s}-load"]["params"]
            assert all(torch.equal(got[n], a[n]) for n in a), (f"{opt} z{s} resume", max_rel(got, a))
