"""The regime suite through the training entry point (`bench regime --launcher ...`): the DeepSpeed
config it writes, the launcher command lines, refusals, cache separation, and parity of a launched
2-rank run (real torchrun / deepspeed launchers, ZeRO-2) with the in-process run of the same
settings."""
import json
import sys

import pytest

from ds_structopt.bench import convergence, launched, regime
from ds_structopt.bench.__main__ import main as bench

TINY = convergence.Settings(model="tiny", data=("embedded",), seq_len=32, batch=8, steps=6, eval_every=2,
                            eval_rows=16, update_freq=3, micro_batch=4)


def test_config_splits_the_batch_and_carries_the_contenders_options():
    cfg = launched.ds_config(regime.contender("AdaDiag++ factored"), 2e-3, TINY, launched.Launch(nproc=2))
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (8, 4, 1)
    assert cfg["optimizer"] == {"type": "AdaDiag++", "params": {"lr": 2e-3, "factored": True, "update_freq": 3,
                                                                 "weight_decay": 0.0}}
    assert cfg["gradient_clipping"] == 1.0 and cfg["zero_optimization"] == {"stage": 2}
    one = launched.ds_config(regime.contender("AdamW b2=0.95"), 1e-3, TINY, launched.Launch(nproc=1, zero_stage=3))
    assert one["gradient_accumulation_steps"] == 2 and one["zero_optimization"]["stage"] == 3
    assert one["optimizer"]["type"] == "AdamW" and one["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert one["optimizer"]["params"]["torch_adam"] is True  # CPU: DeepSpeed's fused Adam is a GPU kernel


def test_config_refuses_a_batch_the_ranks_cannot_split():
    with pytest.raises(ValueError, match="batch 8 rows is not a multiple of micro-batch 4 x 4 ranks"):
        launched.ds_config(regime.contender("AdamW"), 1e-3, TINY, launched.Launch(nproc=4))


@pytest.mark.parametrize("name", ["SOAP", "Muon", "Adafactor"])
def test_contenders_without_a_deepspeed_type_are_refused(name):
    with pytest.raises(ValueError, match=f"'{name}' cannot run through the training entry point"):
        launched.check_contender(regime.contender(name))


def test_launcher_commands():
    args = ["--model", "tiny"]
    torchrun = launched.command(launched.Launch("torchrun", nproc=4), args, 1234)
    assert torchrun[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert torchrun[3:8] == ["--nnodes", "1", "--nproc_per_node", "4", "--standalone"]
    assert torchrun[-4:] == ["-m", "ds_structopt.train", "--model", "tiny"]
    ds = launched.command(launched.Launch("deepspeed", nproc=2), args, 1234)
    assert ds[0].endswith("deepspeed") and ds[1:7] == ["--master_port", "1234", "--num_nodes", "1", "--num_gpus", "2"]
    assert ds[7:9] == ["--module", "ds_structopt.train"]
    hosts = launched.Launch("deepspeed", nproc=8, nnodes=2, launcher_args=("--hostfile", "h", "--master_addr", "n0"))
    hosts.check()
    multi = launched.command(hosts, args, 1234)
    assert multi[3:11] == ["--num_nodes", "2", "--num_gpus", "8", "--hostfile", "h", "--master_addr", "n0"]


def test_multi_node_needs_the_deepspeed_runner_and_named_nodes():
    with pytest.raises(ValueError, match="--nnodes 2 with --launcher torchrun"):
        launched.Launch("torchrun", nproc=8, nnodes=2, launcher_args=("--rdzv-endpoint", "n0:1")).check()
    with pytest.raises(ValueError, match="--nnodes 2 needs --launcher-args naming the nodes"):
        launched.Launch("deepspeed", nproc=8, nnodes=2).check()


def test_the_cache_key_is_what_changes_the_numbers():
    a = launched.Launch("deepspeed", nproc=8, nnodes=2, launcher_args=("--hostfile", "job1"))
    b = launched.Launch("deepspeed", nproc=8, nnodes=2, launcher_args=("--hostfile", "job2"))
    assert a.key() == b.key() == {"world": 16, "zero_stage": 2}
    assert launched.Launch("torchrun", nproc=16).key() == a.key()


def test_a_preempted_or_short_run_is_not_taken_as_finished(tmp_path):
    """train.py's result.json and metrics.csv as a preempted run leaves them."""
    import csv

    from ds_structopt.training.logs import FIELDS

    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerow({k: "" for k in FIELDS} | {"step": 2, "seconds": 1.0, "eval_loss": 4.0, "train_loss": 4.1})
    result = {"first_eval_loss": 5.0, "preempted": {"signal": "SIGTERM", "step": 2}}
    (tmp_path / "result.json").write_text(json.dumps(result))
    with pytest.raises(RuntimeError, match="stopped at step 2 of 6 \\(preempted\\)"):
        launched.finished_history(tmp_path, 6)
    (tmp_path / "result.json").write_text(json.dumps(result | {"preempted": None}))
    with pytest.raises(RuntimeError, match="stopped at step 2 of 6"):
        launched.finished_history(tmp_path, 6)
    assert [h["step"] for h in launched.finished_history(tmp_path, 2)] == [0, 2]


def test_cli_refuses_peers_and_bad_launch_settings_in_one_line(capsys, tmp_path):
    assert bench(["regime", "--launcher", "torchrun", "--out", str(tmp_path), "--optimizers", "AdamW", "SOAP"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'SOAP' cannot run through the training entry point" in err
    assert bench(["regime", "--launcher", "torchrun", "--nproc", "0", "--out", str(tmp_path), "--optimizers",
                  "AdamW"]) == 2
    assert "--nproc 0" in capsys.readouterr().err


def test_launched_and_in_process_runs_never_share_a_cache(tmp_path):
    r = regime.regime_from(regime_args(), quick=True)
    assert regime.sweep(r, ["AdamW"], tmp_path, log=lambda m: None)["runs"]  # in-process quick runs (seconds)
    with pytest.raises(ValueError, match=r"other training settings \(launch\)"):
        regime.sweep(r, ["AdamW"], tmp_path, log=lambda m: None, launch=launched.Launch(nproc=2))


def regime_args():
    import argparse

    p = argparse.ArgumentParser()
    regime.add_arguments(p)
    return p.parse_args([])


@pytest.mark.slow
def test_a_launched_run_follows_the_in_process_run(tmp_path):
    """The same (contender, lr, seed, settings) trained through ``ds_structopt.train`` on 2 ranks at
    ZeRO-2 (torchrun for AdamW, the deepspeed launcher for AdaDiag++) and in this process: same
    init, global batches, warmup + cosine schedule, clipping and evals. Measured eval losses
    (6 steps): AdamW identical to 6 decimals (|diff| < 1e-6); AdaDiag++ 8.3e-4 apart at step 2,
    1.0e-4 at step 6. AdaDiag++ is exact too without gradient clipping (checked by hand: 0 at
    every eval), and a single-rank in-process DeepSpeed engine on one fixed batch agrees to 2e-7
    with clipping: the gap is round-off the launched clipped path produces and AdaDiag++'s
    eps = 1e-8 normalization amplifies in this tiny, small-batch model (the ZeRO parity tests pin
    the optimizer itself at 1e-5 with eps well above round-off)."""
    data = convergence.load_data(TINY)
    for name, launcher, tolerance in (("AdamW", "torchrun", 1e-5), ("AdaDiag++", "deepspeed", 2e-3)):
        c = regime.contender(name)
        got = launched.run_one(c, 1e-3, TINY, launched.Launch(launcher, nproc=2), tmp_path / name, params=1,
                               matrix_params=1, options="x")
        ref = convergence.run_one(name, 1e-3, TINY, data, contender=c)
        assert [h["step"] for h in got["history"]] == [h["step"] for h in ref["history"]] == [0, 2, 4, 6]
        gaps = [abs(a["eval_loss"] - b["eval_loss"]) for a, b in zip(got["history"], ref["history"])]
        assert max(gaps) < tolerance, (name, gaps)
        assert not (tmp_path / name / "checkpoints").exists()  # deleted after the run: only the curve is kept
        assert json.loads((tmp_path / name / "ds_config.json").read_text())["optimizer"]["params"]["lr"] == 1e-3


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_regime_suite_on_gpus_in_process_and_through_the_entry_point(tmp_path):
    """What the papers' sizes use, at the quick size: bf16 on CUDA in this process, and a launched
    run on every visible GPU (NCCL, ZeRO-2, bf16) through ``ds_structopt.train``."""
    import math

    import torch

    assert bench(["regime", "--quick", "--device", "cuda", "--bf16", "--out", str(tmp_path / "inproc"),
                  "--optimizers", "AdamW", "AdaDiag++"]) == 0
    raw = json.loads((tmp_path / "inproc" / "convergence_regime.json").read_text())
    assert all(math.isfinite(r["final_eval_loss"]) for r in raw["runs"])
    gpus = torch.cuda.device_count()
    s = convergence.Settings(model="tiny", data=("embedded",), seq_len=32, batch=8 * gpus, steps=6, eval_every=2,
                             eval_rows=16, update_freq=3, micro_batch=4, device="cuda", bf16=True)
    got = launched.run_one(regime.contender("AdaDiag++"), 1e-3, s, launched.Launch("torchrun", nproc=gpus),
                           tmp_path / "launched", params=1, matrix_params=1, options="x")
    assert got["history"][-1]["step"] == 6 and got["final_eval_loss"] < got["history"][0]["eval_loss"]
