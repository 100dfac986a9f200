"""The training entry point under the real deepspeed launcher (2 CPU ranks): learns, logs,
checkpoints, and resumes exactly after being killed."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def launch(out, *extra, steps=60):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_structopt.train",
           "--steps", str(steps), "--eval-every", "30", "--save-every", "15", "--log-every", "5",
           "--output-dir", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finished(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def final_weights(out):
    tag = (out / "checkpoints" / "latest").read_text().strip()
    state = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"]


@pytest.mark.slow
def test_train_learns_logs_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    log = finished(launch(out, steps=60))
    result = json.loads((out / "result.json").read_text())
    assert result["final"]["eval_loss"] < result["first_eval_loss"] - 1.0, result
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert rows[-1]["step"] == "60" and float(rows[-1]["tokens_per_s"]) > 0
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert ckpts == ["step00000045", "step00000060"]  # keep_last = 2
    assert (out / "checkpoints" / "step00000060" / "ds_structopt" / "rank00001.tensors").exists()
    assert "tok/s" in log and "ETA" in log
    # the guard against a silent fallback to Adam: every logged step updated every eligible matrix
    # structurally, once per optimizer step
    assert all(int(r["eligible_matrices"]) > 0 and r["structured_updates"] == r["eligible_matrices"] for r in rows), rows
    assert int(rows[-1]["structured_updates_total"]) == 60 * int(rows[-1]["eligible_matrices"])
    assert int(rows[-1]["elementwise_updates"]) > 0
    assert f"structured {rows[-1]['eligible_matrices']}/{rows[-1]['eligible_matrices']} matrices" in log
    startup = [line for line in log.splitlines() if "ds_structopt: AdaDiag++ preconditions" in line]
    assert len(startup) == 1 and f"preconditions {rows[-1]['eligible_matrices']} matrices" in startup[0], startup


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    full = tmp_path / "full"
    finished(launch(full, steps=60))
    cut = tmp_path / "cut"
    proc = launch(cut, steps=60)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole launcher process group, mid-training
    proc.wait()
    stopped_at = (cut / "checkpoints" / "latest").read_text().strip()
    assert stopped_at != "step00000060", "the run finished before it could be killed"
    log = finished(launch(cut, "--resume", steps=60))
    assert "resumed from" in log
    a, b = final_weights(full), final_weights(cut)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_readme_main_command(tmp_path):
    """`bash scripts/main.sh` end to end: 300 steps, 2 ranks via the deepspeed launcher, AdaDiag++ ZeRO-2."""
    out = tmp_path / "main"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "main.sh"), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["final"]["step"] == 300
    assert result["final"]["eval_loss"] < result["first_eval_loss"] - 2.0, result  # 5.6 -> ~2.4 measured
    assert (out / "metrics.csv").exists() and (out / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_stale_jit_lock_does_not_block_start(tmp_path, monkeypatch):
    """A rank killed while DeepSpeed JIT-compiled its shm comm op leaves the build lock behind; every
    later job used to wait on it forever (a CI run hung so). The entry point must not build that op."""
    from torch.utils.cpp_extension import _get_build_directory

    from ds_structopt.integrations.deepspeed_ops import SHM_COMM_OP

    ext_dir = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext_dir))  # inherited by the launched ranks
    build_dir = Path(_get_build_directory(SHM_COMM_OP, verbose=False))
    (build_dir / "lock").write_text("")  # the stale lock, exactly where torch's FileBaton looks
    proc = launch(tmp_path / "run", steps=2)
    try:
        finished(proc, timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not list(ext_dir.rglob("*.so")), "a DeepSpeed op was JIT-compiled"


def killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, *args, steps=30):
    """Train ``args`` uninterrupted into ``tmp_path/full``; again into ``tmp_path/cut`` with rank 1
    killed at step 20, then resumed from the step-15 checkpoint: the final weights must be equal
    bit for bit. Returns the uninterrupted run's folder."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    finished(launch(full, *args, steps=steps))
    monkeypatch.setenv("DS_STRUCTOPT_FAULTS", "kill:rank=1,step=20")
    killed = launch(cut, *args, steps=steps)
    log, _ = killed.communicate(timeout=600)
    assert killed.returncode != 0 and "fault injection is ON" in log
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step00000015"
    monkeypatch.delenv("DS_STRUCTOPT_FAULTS")
    assert "resumed from" in finished(launch(cut, *args, "--resume", steps=steps))
    a, b = final_weights(full), final_weights(cut)
    assert [n for n in a if not torch.equal(a[n], b[n])] == []
    return full


@pytest.mark.slow
def test_resume_is_exact_with_a_scheduler_and_dropout(tmp_path, monkeypatch):
    """The shipped configs' WarmupCosineLR (here total 30, warmup 5) and a model with dropout:
    killed at step 20, resumed from step 15, the final weights equal the uninterrupted run's bit
    for bit (LR from the checkpoint, each rank's random generators restored). Then a new run
    without --resume in that directory is refused in one line instead of rotating it away."""
    cfg = json.loads((ROOT / "configs" / "ds_tiny_adadiagpp_zero2.json").read_text())
    cfg["scheduler"] = {"type": "WarmupCosineLR", "params": {"total_num_steps": 30, "warmup_num_steps": 5}}
    cfg_path = tmp_path / "ds.json"
    cfg_path.write_text(json.dumps(cfg))
    model = json.loads((ROOT / "configs" / "models" / "tiny.json").read_text())
    model["attention_dropout"] = 0.1
    model_path = tmp_path / "tiny_dropout.json"
    model_path.write_text(json.dumps(model))
    args = ("--deepspeed_config", str(cfg_path), "--model", str(model_path))
    full = killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, *args)
    again = launch(full, *args, steps=30)
    log, _ = again.communicate(timeout=600)
    assert again.returncode != 0 and "already holds checkpoints (newest: step00000030); pass --resume" in log
