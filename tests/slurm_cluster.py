"""A real two-node SLURM cluster on this one host, for the launch tests.

munged + slurmctld + two slurmd daemons posing as nodes n1 and n2
(``SlurmdParameters=config_overrides``, one port each), all state, logs and
the slurm.conf under one directory; clients find it through ``SLURM_CONF``.
Recipe measured in shared/DESIGN.md. Needs root and Debian's slurmctld,
slurmd, slurm-client and munge (scripts/install_system_deps.sh).

Manual use:  python tests/slurm_cluster.py /tmp/slurm   (Ctrl-C stops it)
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

NODES = ("n1", "n2")
CPUS_PER_NODE = 2


def missing() -> Optional[str]:
    """Why a cluster cannot start here, or None."""
    for tool in ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"'{tool}' not installed (scripts/install_system_deps.sh installs SLURM+munge as root)"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd runs jobs as their user)"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key missing (the munge package creates it)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sbin(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return cred.returncode == 0 and subprocess.run(
            ["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class LocalSlurm:
    """Start/stop the daemons; ``env`` is what a client (sbatch, scontrol) needs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        ctld, *node_ports = _free_ports(1 + len(NODES))
        host = socket.gethostname()
        r = self.root
        for d in ("state", "spool"):
            (r / d).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=dsso", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld}",
            "AuthType=auth/munge", "SlurmUser=root", "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none", "MailProg=/bin/true", "ReturnToService=2",
            "SlurmdParameters=config_overrides", "KillWait=5", "InactiveLimit=0", "MinJobAge=600",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd-%n.log",
        ]
        for name, port in zip(NODES, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={CPUS_PER_NODE} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=YES")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        if (why := missing()) is not None:
            raise RuntimeError(why)
        if not _munge_works():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged")], check=True, timeout=30)
            if not _munge_works():
                raise RuntimeError("munged started but 'munge -n | unmunge' fails")
        self._write_conf()
        log = open(self.root / "daemons.out", "ab")
        self.procs.append(subprocess.Popen([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)],
                                           stdout=log, stderr=log, env=self.env))
        time.sleep(1.0)
        for name in NODES:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
            self.procs.append(subprocess.Popen([_sbin("slurmd"), "-D", "-N", name, "-f", str(self.conf)],
                                               stdout=log, stderr=log, env=self.env))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if out.returncode == 0 and all(states.get(n) == "idle" for n in NODES):
                return self
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"SLURM daemons did not come up; logs in {self.root}: " + self.log_tail())

    def log_tail(self, chars: int = 1500) -> str:
        text = ""
        for f in sorted(self.root.glob("*.log")) + [self.root / "daemons.out"]:
            if f.exists():
                text += f"--- {f.name}\n" + f.read_text(errors="replace")[-chars:]
        return text

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()

    def sbatch(self, args: list[str], cwd: Path, env: Optional[dict] = None, timeout: float = 900) -> str:
        """Submit with --wait; return the job id (the job's own exit state is read by job_state)."""
        proc = subprocess.run(["sbatch", "--parsable", "--wait", *args], cwd=cwd, capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=timeout)
        job = proc.stdout.strip().split(";")[0]
        if not job.isdigit():
            raise RuntimeError(f"sbatch failed (rc {proc.returncode}): {proc.stderr.strip()}")
        return job

    def job_info(self, job: str) -> dict[str, str]:
        """`scontrol show job` fields (no accounting daemon here, so not sacct)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=self.env)
        return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ds_structopt_slurm")
    root.mkdir(parents=True, exist_ok=True)
    with LocalSlurm(root) as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # nodes: {' '.join(NODES)}; Ctrl-C stops", flush=True)
        try:
            while all(p.poll() is None for p in cluster.procs):
                time.sleep(2)
        except KeyboardInterrupt:
            pass
