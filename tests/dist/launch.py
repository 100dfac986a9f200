"""Start N real ranks of tests/dist/worker.py (torchrun-style environment, gloo on CPU)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, cases: list, tmp: Path, timeout: int = 600) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "spec.json"
    out = tmp / "result.pt"
    spec.write_text(json.dumps({"cases": cases, "out": str(out)}))
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            out_text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out_text)
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError("a rank failed:\n" + "\n----\n".join(log[-4000:] for log in logs))
    return torch.load(out, weights_only=False)
