"""Checkpoint files are read without running code: tensors-only state loads with weights_only=True,
and a file carrying an executable pickle payload is refused with one line (the payload never runs)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ds_structopt.checkpoint.safe_load import UnsafeCheckpointError, safe_load


class Payload:
    """Unpickling this runs a shell command (what a poisoned checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tensors_only_file_loads(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"state": {"exp_avg": torch.ones(3)}, "step": 4, "names": ["a"]}, path)
    assert safe_load(path)["step"] == 4


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"state": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint_safety import Payload
    import ds_structopt
    from ds_structopt import checkpoint
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=0, world_size=1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    opt = ds_structopt.distributed_optimizer(model, "AdaDiag++", lr=1e-2, update_freq=2)
    model(torch.randn(5, 8)).square().mean().backward()
    opt.step()
    out = sys.argv[1]
    checkpoint.save(opt, out)
    ours = os.path.join(out, "ds_structopt", "rank00000.tensors")
    assert open(ours, "rb").read(8) == b"DSSOTNS1"     # our own state: a JSON header and raw tensors
    checkpoint.load(opt, out)                          # and it loads back
    os.remove(ours)                                    # replaced by a pickle (the older torch.save format)
    rank_file = os.path.join(out, "ds_structopt", "rank00000.pt")
    torch.save({"version": 2, "matrix_state": Payload(out + "/pwned")}, rank_file)
    try:
        checkpoint.load(opt, out)
    except checkpoint.UnsafeCheckpointError as exc:
        print("REFUSED", exc)
    dist.destroy_process_group()
""")


def test_our_checkpoint_loader_refuses_a_poisoned_rank_file(tmp_path):
    from dist.launch import free_port

    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(Path(__file__).parent), str(free_port())],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED")]
    assert refused and "rank00000.pt" in refused[0], proc.stdout
    assert not (tmp_path / "pwned").exists()


NONFINITE = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import ds_structopt
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    opt = ds_structopt.distributed_optimizer(model, "AdaDiag++", lr=1e-2, update_freq=2)
    for _ in range(3):
        opt.zero_grad(); model(torch.randn(5, 8)).square().mean().backward(); opt.step()
    snapshot = lambda: ({k: {n: v.clone() for n, v in st.items() if torch.is_tensor(v)} for k, st in
                         list(opt.matrix_state.items()) + list(opt.elem_state.items())},
                        [p.detach().clone() for p in model.parameters()])
    before = snapshot()
    opt.zero_grad(); model(torch.randn(5, 8)).square().mean().backward()
    model[1].bias.grad[0] = float("nan")              # one non-finite value anywhere
    opt.step()
    after = snapshot()
    same = all(torch.equal(before[0][k][n], after[0][k][n]) for k in before[0] for n in before[0][k]) and \\
        all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    print("SKIPPED", opt.skipped_steps, "UNCHANGED", same, "STATES", len(before[0]))
    dist.destroy_process_group()
""")


def test_nonfinite_gradient_skips_the_whole_step_leaving_state_and_weights(tmp_path):
    from dist.launch import free_port

    proc = subprocess.run([sys.executable, "-c", NONFINITE, str(free_port())], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SKIPPED"))
    skipped, unchanged, states = line.split()[1], line.split()[3], int(line.split()[5])
    assert skipped == "1" and unchanged == "True" and states > 0, line


ENGINE = textwrap.dedent("""
    import glob, json, os, sys, torch
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint_safety import Payload
    import ds_structopt
    from ds_structopt.checkpoint import UnsafeCheckpointError
    from ds_structopt.checkpoint.safe_load import safe_load
    from ds_structopt.checkpoint.tensor_file import is_tensor_file
    out, stage = sys.argv[1], int(sys.argv[3])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    config = {"train_batch_size": 2, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdaDiag++", "params": {"lr": 1e-2, "update_freq": 2}}}
    engine, *_ = ds_structopt.initialize(model=model, config=config)
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 8)).square().mean()); engine.step()
    engine.save_checkpoint(out, tag="t")
    files = sorted(os.path.relpath(p, out) for p in glob.glob(out + "/t/**", recursive=True) if os.path.isfile(p))
    print("FILES", json.dumps(files))
    for f in files:                                    # every file: a tensor file, JSON, or tensors-only pickle
        path = os.path.join(out, f)
        if not (is_tensor_file(path) or f.endswith(".json")):
            safe_load(path)
    from ds_structopt.checkpoint import consolidated  # fp32 weights by name, at any stage (no zero_to_fp32 files)
    import deepspeed
    weights = consolidated(out + "/t")
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        same = all(torch.equal(weights[n], p.detach().float()) for n, p in model.named_parameters())
    print("CONSOLIDATED", same and set(weights) == {n for n, _ in model.named_parameters()})
    states = [f for f in files if f.endswith("model_states.pt")][0]
    engine.load_checkpoint(out, tag="t")               # loads back
    torch.save({"module": Payload(out + "/pwned")}, os.path.join(out, states))
    try:
        engine.load_checkpoint(out, tag="t")
    except UnsafeCheckpointError as exc:
        print("REFUSED", exc)
""")


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_files_load_weights_only_and_a_payload_never_runs(tmp_path, stage):
    """DeepSpeed's own model-states file goes through our checkpoint engine (``weights_only``): a
    pickle payload planted in it is refused with one line and never runs. No file of the checkpoint
    needs a full unpickler, and DeepSpeed's fp32 optimizer partitions are not written (ours hold
    the masters and every state by name: ``consolidated`` gives the model's fp32 weights from them)."""
    from dist.launch import free_port

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", ENGINE, str(tmp_path), str(Path(__file__).parent), str(stage)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("FILES"))[6:])
    assert not [f for f in files if "optim_states" in f], files
    assert "CONSOLIDATED True" in proc.stdout, proc.stdout[-2000:]
    assert any(f.endswith(".tensors") for f in files), files
    refused = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED")]
    assert refused and "model_states.pt" in refused[0] and "\n" not in refused[0], proc.stdout[-2000:]
    assert not (tmp_path / "pwned").exists()
