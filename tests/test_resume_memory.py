"""Host memory at resume: each rank reads only its share of the checkpoint.

4 real ranks (gloo) save AdaDiag++ state for 16 matrices of 1024 x 1024 (64 MiB of owned
state per rank, 512 MiB of files in all: the replicated fp32 masters are in every file); new processes then restore it at 4 ranks (each
reads its own file) and at 2 ranks (each reads the ranges it needs from the files of the
matrices it now owns). A rank's peak RSS during ``ds_structopt.checkpoint.load`` may grow by
the state it ends up holding plus a small constant (fp32 masters are read straight into the
parameters; on a GPU one piece is staged on the host), never by the checkpoint: reading every
rank's file in full (what ``load`` did before) needs ~6x that.
This is our part of a resume; DeepSpeed's own module file (ZeRO-1/2: weights every rank holds
anyway) is not measured here.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dist.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
CONSTANT_MIB = 8  # interpreter and allocator noise (measured: 0.2 MiB)

SCRIPT = textwrap.dedent("""
    import gc, json, os, re, sys, time, torch, torch.distributed as dist
    import ds_structopt
    from ds_structopt import checkpoint
    from ds_structopt.checkpoint.state_io import map_tensors

    def status(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    mode, folder = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(16)], torch.nn.LayerNorm(1024))
    opt = ds_structopt.distributed_optimizer(model, "AdaDiag++", lr=1e-3, update_freq=1)
    if mode == "save":
        model(torch.randn(4, 1024)).square().mean().backward()
        opt.step()
        checkpoint.save(opt, folder)
        dist.barrier()
    else:
        opt.entries_with_pieces(), opt.owners, opt.compute_device  # layout and owners: built before any load
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        before, start = status("VmRSS"), time.perf_counter()
        checkpoint.load(opt, folder)
        seconds = time.perf_counter() - start
        peak = status("VmHWM")
        tensors = []
        map_tensors(tensors.append, [opt.matrix_state, opt.elem_state])
        held = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())
        largest = max(p.numel() * 4 for p in model.parameters())
        print("RESULT", json.dumps({"rank": dist.get_rank(), "growth": peak - before, "held": held,
                                    "largest_param": largest, "seconds": seconds,
                                    "matrices": len(opt.matrix_state)}), flush=True)
        dist.barrier()
    dist.destroy_process_group()
""")


def launch(world: int, mode: str, folder: Path) -> list[dict]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, mode, str(folder)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(o[-3000:] for o in outs)
    return [json.loads(line[7:]) for o in outs for line in o.splitlines() if line.startswith("RESULT ")]


@pytest.mark.slow
def test_peak_rss_at_resume_is_the_ranks_own_share(tmp_path):
    folder = tmp_path / "ckpt"
    launch(4, "save", folder)
    files = sorted((folder / "ds_structopt").glob("rank*.tensors"))
    total = sum(f.stat().st_size for f in files)
    report = {}
    for world in (4, 2):
        for r in launch(world, "load", folder):
            bound = r["held"] + CONSTANT_MIB * 2**20
            report[f"4->{world} rank {r['rank']}"] = (f"peak +{r['growth'] / 2**20:.0f} MiB, holds {r['held'] / 2**20:.0f} "
                                                     f"MiB, {r['seconds']:.2f} s")
            assert r["matrices"] > 0
            assert r["growth"] <= bound, (world, r, bound)
            assert bound < total / 3  # the bound is far below reading the whole checkpoint
    print(f"\nresume memory (checkpoint {total / 2**20:.0f} MiB in {len(files)} files):", report)
