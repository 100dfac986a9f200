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


def run_ranks(world: int, cases: list, tmp: Path, timeout: int = 600, attempts: int = 2, worker: Path = WORKER) -> dict:
    """Run the cases on ``world`` real ranks; returns rank 0's results.

    A rank that crashes after finishing its work (C++ teardown of gloo at exit) is tolerated;
    a failure to rendezvous (a port taken between choosing and binding it) is retried once.
    Any other failure raises with every rank's log tail.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "spec.json"
    out = tmp / "result.pt"
    spec.write_text(json.dumps({"cases": cases, "out": str(out)}))
    for attempt in range(attempts):
        codes, logs = _launch(world, spec, timeout, worker)
        if all(c == 0 for c in codes) or (out.exists() and all("WORKER-DONE" in log for log in logs)):
            return torch.load(out, weights_only=False)
        rendezvous = any(("EADDRINUSE" in log or "Address already in use" in log) for log in logs)
        if not rendezvous or attempt == attempts - 1:
            raise RuntimeError("a rank failed:\n" + "\n----\n".join(log[-4000:] for log in logs))
    raise AssertionError("unreachable")


def _launch(world: int, spec: Path, timeout: int, worker: Path) -> tuple[list, list]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        procs.append(subprocess.Popen([sys.executable, str(worker), str(spec)], env=env,
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
    return [p.returncode for p in procs], logs
