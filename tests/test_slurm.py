"""SLURM for real: two slurmd daemons posing as nodes n1/n2 on this host, jobs submitted with sbatch -N2.

Each launch/slurm/*.sbatch script trains the tiny LLaMA on 4 ranks (2 per node) and must finish
COMPLETED, with ranks on both nodes and a checkpoint written by every rank. The torchrun job
follows README's two-step recipe: the corpus prepared once by a one-node job, then trained from
that folder; the deepspeed job tokenizes the raw corpus itself, and both must give the same losses. Skipped, with the reason,
only where the daemons cannot start (not root, packages missing).
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from slurm_cluster import NODES, LocalSlurm, missing

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
RESULTS: dict[str, dict] = {}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why is not None:
        pytest.skip(f"local SLURM cluster unavailable: {why}")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"SLURM daemons could not start here: {exc}")
    yield slurm
    slurm.stop()


@pytest.fixture(scope="module")
def prepared_corpus(cluster, tmp_path_factory):
    """README's first step: `sbatch -N1 --wrap "ds-structopt prepare-data ..."`, a real one-node job."""
    out = tmp_path_factory.mktemp("prepared") / "embedded"
    log = out.parent / "prepare.out"
    job = cluster.sbatch(["-N1", "-o", str(log), "--wrap",
                          f"ds-structopt prepare-data --data embedded --out {out} --workers 2"], cwd=ROOT, env=_job_env())
    info = cluster.job_info(job)
    assert info.get("JobState") == "COMPLETED", f"{info}\n{log.read_text(errors='replace') if log.exists() else ''}"
    assert (out / "manifest.json").is_file()
    return out


def _job_env() -> dict[str, str]:
    """The job inherits the submitter's environment (sbatch --export=ALL): this venv's tools first."""
    return {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(ROOT)}


def _submit(cluster, tmp_path, script, sbatch_args, env=None, train_args=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    job = cluster.sbatch([*sbatch_args, "-o", str(log), script, "--steps", str(STEPS), "--eval-every", str(STEPS),
                          "--save-every", str(STEPS), "--output-dir", str(out), *train_args], cwd=ROOT,
                         env={**_job_env(), **(env or {})})
    info = cluster.job_info(job)
    return info, out, log.read_text(errors="replace") if log.exists() else ""


@pytest.mark.parametrize("script,sbatch_args,env,prepared", [
    ("launch/slurm/torchrun.sbatch", ["-N2"], {"NPROC_PER_NODE": "2"}, True),
    ("launch/slurm/deepspeed.sbatch", ["-N2", "--ntasks-per-node=2"], {}, False),
], ids=["prepared+srun+torchrun", "raw+deepspeed-slurm"])
def test_sbatch_two_nodes_four_ranks(cluster, request, tmp_path, script, sbatch_args, env, prepared):
    data = ["--data", str(request.getfixturevalue("prepared_corpus"))] if prepared else []
    info, out, log = _submit(cluster, tmp_path / "try1", script, sbatch_args, env, data)
    if info.get("JobState") != "COMPLETED":
        # Seen once in ~10 runs (a rank aborted during start-up, cause not yet known): keep the
        # whole log for a post-mortem, say so, and submit once more; a second failure fails the test.
        Path("/tmp/dsso-slurm-failed.log").write_text(f"{info}\n{log}\n{cluster.log_tail()}")
        warnings.warn(f"{script}: first job {info.get('JobState')} {info.get('ExitCode')}, resubmitting; "
                      "log in /tmp/dsso-slurm-failed.log")
        info, out, log = _submit(cluster, tmp_path / "try2", script, sbatch_args, env, data)
    detail = f"{info}\n{log[-8000:]}\n{cluster.log_tail()}"
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", detail
    assert info.get("NumNodes") == "2", detail
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 4
    assert sorted(result["placement"]) == sorted([n for n in NODES for _ in range(2)])  # 2 ranks on each node
    assert result["final"]["step"] == STEPS and result["final"]["eval_loss"] < result["first_eval_loss"]
    ckpt = out / "checkpoints" / f"step{STEPS:08d}"
    assert sorted(p.name for p in (ckpt / "ds_structopt").glob("rank*.tensors")) == [f"rank{r:05d}.tensors" for r in range(4)]
    RESULTS[script] = result


def test_both_slurm_launchers_train_the_same(cluster):
    """Same config, seed and global batch on 4 ranks, one from the prepared folder and one from the
    raw corpus: neither the launcher nor the data path may change the numbers."""
    if len(RESULTS) < 2:
        pytest.skip("needs both sbatch jobs above to have run")
    a, b = (r["final"] for r in RESULTS.values())
    assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)


def test_torchrun_sbatch_without_gpus_or_nproc_fails_clearly(cluster, tmp_path):
    env = {k: "" for k in ("NPROC_PER_NODE",)}
    info, _, log = _submit(cluster, tmp_path, "launch/slurm/torchrun.sbatch", ["-N2"], env)
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "2:0", info
    assert "error: no GPUs in this allocation and NPROC_PER_NODE is not set" in log


@pytest.mark.parametrize("script", ["launch/slurm/torchrun.sbatch", "launch/slurm/deepspeed.sbatch"])
def test_sbatch_script_outside_slurm_fails_clearly(script):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: environment variable SLURM_JOB_ID is not set " \
                                  "(submit this script with sbatch (or run it inside salloc))"
