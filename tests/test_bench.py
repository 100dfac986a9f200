"""`ds-structopt bench` suites at --quick size: results files exist, hold every optimizer, numbers finite.

No timing assertions: the numbers are recorded, not judged, here (docs/benchmarks.md reads them).
"""
import json
import math
import subprocess
import sys

import pytest
import torch

from ds_structopt.bench import optimizers as contenders
from ds_structopt.bench.__main__ import main as bench


def _finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_convergence_quick(tmp_path):
    assert bench(["convergence", "--quick", "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "convergence.json").read_text())
    best = raw["summary"]["best"]
    assert set(best) == set(contenders.CONTENDERS)  # every optimizer, peers (SOAP, Muon) included
    trials = [sum(r["optimizer"] == n for r in raw["runs"]) for n in best]
    assert len(set(trials)) == 1, trials  # the same number of lr trials for each
    for name, row in best.items():
        assert _finite(row["final_eval_loss"], row["state_bytes_per_param"]), (name, row)
    assert best["AdamW"]["steps_ratio"] == pytest.approx(1.0)
    for png in ("convergence_loss_vs_steps.png", "convergence_loss_vs_time.png"):
        assert (tmp_path / png).stat().st_size > 5000
    assert "| AdaDiag++ |" in (tmp_path / "convergence.md").read_text()


def test_step_quick(tmp_path):
    assert bench(["step", "--quick", "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "step.json").read_text())
    (run,) = raw["runs"]
    assert set(run["results"]) == set(contenders.CONTENDERS)
    assert run["fwd_bwd_s"] > 0
    for name, r in run["results"].items():
        assert _finite(r["plain_s"], r["refresh_s"], r["whole_window_ratio"], r["state_bytes_per_param"],
                       r["peak_extra_bytes"]), (name, r)
    assert run["results"]["AdaDiag++"]["has_refresh"] and not run["results"]["Muon"]["has_refresh"]
    assert (tmp_path / "step_tiny.png").exists()


@pytest.mark.slow
def test_dist_quick(tmp_path):
    assert bench(["dist", "--quick", "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "dist.json").read_text())
    assert [(r["ranks"], r["stage"]) for r in raw["runs"]] == [(2, 1), (2, 2), (2, 3)]
    for run in raw["runs"]:
        assert set(run["results"]) == {"AdamW (DeepSpeed)", "AdaDiag++", "AdaDiag++ factored"}
        for name, r in run["results"].items():
            assert len(r["state_bytes_per_rank"]) == 2 and all(b > 0 for b in r["state_bytes_per_rank"])
            assert _finite(r["step_s"], r["comm_bytes_per_step"], r["comm_ratio"]) and r["comm_bytes_per_step"] > 0
    assert (tmp_path / "dist_comm_ratio.png").exists()


@pytest.mark.slow
def test_refresh_quick(tmp_path):
    assert bench(["refresh", "--quick", "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "refresh.json").read_text())
    runs = {r["variant"]: r for r in raw["runs"]}
    assert list(runs) == ["no refresh", "synchronous", "staggered", "staggered + ahead"]
    for name, r in runs.items():
        assert _finite(r["median_s"], r["max_s"], r["max_over_median"], r["final_loss"]), (name, r)
        assert len(r["step_times"]) == raw["settings"]["warmup"] + raw["settings"]["windows"] * raw["settings"]["update_freq"]
    # unstaggered variants refresh every matrix at step 1, staggered ones spread the first bases over the
    # first window (first_refresh_window); refresh-ahead keeps the staggered schedule exactly
    assert runs["synchronous"]["refreshes"] > runs["no refresh"]["refreshes"] > 0
    assert runs["staggered + ahead"]["refreshes"] == runs["staggered"]["refreshes"] > runs["no refresh"]["refreshes"]
    assert "share of refresh time hidden" in (tmp_path / "refresh.md").read_text()
    assert (tmp_path / "refresh_step_times.png").exists()


def test_scale_quick(tmp_path):
    """The simulated large-world step (ds-structopt bench scale --quick): every row meets the
    host-sync target and its bytes and state equal the planner's."""
    assert bench(["scale", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "scale.json").read_text())
    assert {(r["ranks"], r["stage"]) for r in rows} == {(8, 2), (8, 3), (64, 2), (64, 3)}
    for r in rows:
        assert r["problems"] == [] and r["host_syncs_per_step"] <= 2, r
        assert r["bytes_per_step"] == r["planner_bytes_per_step"] and r["state_bytes"] == r["planner_state_bytes"], r
        assert _finite(r["python_ms_per_step"], r["peak_bytes"], r["load_max_over_mean"]), r
    assert (tmp_path / "scale_python_ms.png").exists() and "| 64 | 7b | 3 |" in (tmp_path / "scale.md").read_text()


def test_unknown_optimizer_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ds_structopt.bench", "convergence", "--quick", "--out", str(tmp_path),
                           "--optimizers", "AdamW", "Lion"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown optimizer(s) ['Lion']") and "\n" not in proc.stderr.strip()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_step_1b_bf16_on_gpu(tmp_path):
    assert bench(["step", "--models", "1b", "--whole-step-models", "1b", "--device", "cuda", "--dtype", "bfloat16",
                  "--batch", "8", "--micro-batch", "8", "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "step.json").read_text())["runs"][0]
    assert run["model"] == "1b" and all(_finite(r["plain_s"]) for r in run["results"].values())
