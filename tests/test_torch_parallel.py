"""Plain PyTorch data parallelism (no DeepSpeed): DDP and FSDP2 ``fully_shard`` with our ownership
partitioning, on 2 real gloo ranks, against the single-process optimizer on the same global batch."""
from pathlib import Path

import pytest
from counting import assert_structured_every_step
from dist.launch import run_ranks
from test_zero_parity import BATCH, OPTIMIZERS, STEPS, reference

WORKER = Path(__file__).parent / "dist" / "torch_worker.py"


@pytest.mark.slow
def test_ddp_and_fsdp2_match_single_process(tmp_path):
    cases = [{"name": f"{opt}-{wrap}", "optimizer": opt, "params": OPTIMIZERS[opt], "wrap": wrap, "steps": STEPS,
              "global_batch": BATCH} for opt in ("AdaDiag++", "ASGO", "DASGO") for wrap in ("ddp", "fsdp2")]
    results = run_ranks(2, cases, tmp_path, worker=WORKER)
    errors = {}
    for c in cases:
        ref = reference(c["optimizer"], c["params"])
        got = results[c["name"]]["params"]
        errors[c["name"]] = max(((got[n] - r).norm() / r.norm()).item() for n, r in ref.items())
        owned = [m["owned_matrices"] for m in results[c["name"]]["metrics"]]
        assert sum(owned) == 4 and all(o > 0 for o in owned), (c["name"], owned)  # 4 matrices, split over ranks
        assert_structured_every_step(results[c["name"]]["metrics"], 4, STEPS, 4, c["name"])  # 4 weights; 4 biases
    print("\nplain PyTorch, 2 ranks vs single process:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(v < 1e-5 for v in errors.values()), errors
    for opt in ("AdaDiag++", "ASGO"):  # FSDP2 really shards: each rank keeps AdamW state for half the biases
        ddp, fsdp = (results[f"{opt}-{w}"]["metrics"] for w in ("ddp", "fsdp2"))
        assert sum(m["state_bytes"] for m in fsdp) < sum(m["state_bytes"] for m in ddp)
        assert all(m["comm_bytes"] > 0 for m in fsdp)


@pytest.mark.slow
def test_fsdp2_and_ddp_resume_from_our_checkpoint(tmp_path):
    """Save after 5 of 10 steps, resume in new processes: the same parameters as uninterrupted (bitwise)."""
    def case(name, wrap, **extra):
        return {"name": name, "optimizer": "AdaDiag++", "params": dict(OPTIMIZERS["AdaDiag++"], stagger_refresh=True,
                                                                         refresh_from="previous"),
                "wrap": wrap, "steps": STEPS, "global_batch": BATCH, **extra}
    first = run_ranks(2, [case(f"full-{w}", w) for w in ("ddp", "fsdp2")]
                      + [case(f"save-{w}", w, steps=5, save_after=5, save_dir=str(tmp_path / f"ck-{w}"))
                         for w in ("ddp", "fsdp2")], tmp_path / "a", worker=WORKER)
    resumed = run_ranks(2, [case(f"load-{w}", w, start_step=5, load_dir=str(tmp_path / f"ck-{w}"))
                            for w in ("ddp", "fsdp2")], tmp_path / "b", worker=WORKER)
    for w in ("ddp", "fsdp2"):
        a, b = first[f"full-{w}"]["params"], resumed[f"load-{w}"]["params"]
        assert all(a[n].equal(b[n]) for n in a), w


@pytest.mark.slow
def test_fsdp2_relative_step_matches_single_process(tmp_path):
    """Adafactor's relative step needs each whole weight's RMS; under FSDP2 no rank holds a whole
    weight, so every rank contributes its shard's squares to one all-reduce (a reduction on the
    owner alone would hang)."""
    params = {"lr": 5e-3, "update_freq": 3, "factored": True, "factored_eps": 1e-12, "relative_step": True}
    cases = [{"name": f"rel-{wrap}", "optimizer": "AdaDiag++", "params": params, "wrap": wrap, "steps": STEPS,
              "global_batch": BATCH} for wrap in ("ddp", "fsdp2")]
    results = run_ranks(2, cases, tmp_path, worker=WORKER, timeout=300)
    ref = reference("AdaDiag++", params)
    for c in cases:
        got = results[c["name"]]["params"]
        err = max(((got[n] - r).norm() / r.norm()).item() for n, r in ref.items())
        assert err < 1e-5, (c["name"], err)
