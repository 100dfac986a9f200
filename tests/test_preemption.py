"""Preemption on real processes (2 CPU ranks, tiny LLaMA): real signals sent mid-run to the
deepspeed launcher, to the ranks themselves (as SLURM's ``--signal`` does), to one rank only, and
to the sbatch scripts' jobs on the local SLURM cluster. Every rank must stop at the same step with
a complete checkpoint there, exit 0, and ``--resume`` (the SLURM jobs: requeued, resumed by
themselves) must end with the same weights as an uninterrupted run (bitwise)."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from dist.launch import free_port
from slurm_cluster import LocalSlurm, missing
from test_faults import assert_same_weights
from test_train import DEEPSPEED, ROOT

STEPS = 16
ARGS = ("--steps", str(STEPS), "--eval-every", str(STEPS), "--save-every", "8", "--log-every", "2")
LINE = re.compile(r"preempted by (SIG\w+) at step (\d+): checkpoint saved to (\S+); rerun with --resume")

pytestmark = pytest.mark.slow


class Job:
    """A training run started in its own session; its output is collected line by line."""

    def __init__(self, out, *extra, launcher="deepspeed", script=None):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "ds_structopt.train"]
        elif script is not None:  # deepspeed launcher starting our own script on every rank
            cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--no_python", str(script)]
        else:
            cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_structopt.train"]
        cmd += [*ARGS, "--output-dir", str(out), *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, prefix, timeout=300):
        deadline = time.time() + timeout
        while not any(line.startswith(prefix) for line in self.lines):
            assert time.time() < deadline and self.proc.poll() is None, f"no {prefix!r} line:\n{self.log[-3000:]}"
            time.sleep(0.05)

    def ranks(self):
        """The rank processes (python -m ds_structopt.train), rank 0 first."""
        found = {}
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            cmd = p.cmdline()
            if "-m" in cmd and cmd[cmd.index("-m") + 1:][:1] == ["ds_structopt.train"]:
                found[int(p.environ()["RANK"])] = p
        assert sorted(found) == [0, 1], found
        return [found[0], found[1]]

    def finish(self, timeout=300):
        """Exit code of the launcher, once it and every process it started are gone."""
        try:
            self.proc.wait(timeout)
            self._reader.join(timeout)  # EOF: every rank closed its end too
            assert not self._reader.is_alive(), "a rank outlived its launcher:\n" + self.log[-3000:]
            return self.proc.returncode
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_to_end(out, *extra, launcher="deepspeed"):
    job = Job(out, *extra, launcher=launcher)
    code = job.finish()
    assert code == 0, job.log[-3000:]
    return job.log


def check_preempted(out, log, sig):
    """The one line on rank 0, the checkpoint at that step (published, complete), result.json."""
    found = LINE.findall(log)
    assert len(found) == 1, log[-3000:]
    name, step, path = found[0]
    step = int(step)
    assert name == sig and 0 < step < STEPS, found
    tag = f"step{step:08d}"
    assert path == str(out / "checkpoints" / tag)
    assert (out / "checkpoints" / "latest").read_text().strip() == tag
    from ds_structopt.training.checkpoints import verify

    verify(path)  # every file present and matching its manifest
    for rank in (0, 1):  # each rank's own share (optimizer state, random generators)
        assert list((out / "checkpoints" / tag / "ds_structopt").glob(f"rank{rank:05d}.*")), rank
        assert (out / "checkpoints" / tag / "rng" / f"rank{rank:05d}.pt").exists(), rank
    result = json.loads((out / "result.json").read_text())
    assert result["preempted"] == {"signal": sig, "step": step, "checkpoint": path}, result
    return step


def resume_matches_baseline(baseline, out, step):
    log = run_to_end(out, "--resume")
    assert f"resumed from {out}/checkpoints/step{step:08d} at step {step}" in log, log[-3000:]
    assert json.loads((out / "result.json").read_text())["preempted"] is None
    assert_same_weights(baseline, out)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("preemption") / "baseline"
    run_to_end(out)
    assert json.loads((out / "result.json").read_text())["preempted"] is None
    return out


RANK_WRAPPER = """#!{python}
# Stands between the deepspeed launcher and one rank, only to report the rank's exit status,
# which the launcher never does once it is itself terminated. It ignores the signals itself
# (the rank installs its own handlers).
import os, signal, subprocess, sys
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, signal.SIG_IGN)
code = subprocess.call([sys.executable, "-u", "-m", "ds_structopt.train", *sys.argv[1:]])
print(f"rank {{os.environ['RANK']}} exit status {{code}}", flush=True)
sys.exit(code)
"""


def test_sigterm_to_the_deepspeed_launcher(baseline, tmp_path):
    """SIGTERM to the deepspeed launcher's process group, as a terminal, `timeout`, systemd or
    SLURM (which signals every process of a job step) deliver it. The `deepspeed` command itself
    dies of it (runner.py installs no handler in single-node mode: exit -15); its child
    deepspeed.launcher.launch SIGTERMs the ranks one by one, gives each 30 s, then exits 1 whatever
    they did (launch.py sigkill_handler). So no launcher reports the ranks' success: a wrapper
    between launcher and rank reports each rank's own exit status."""
    wrapper = tmp_path / "rank.py"
    wrapper.write_text(RANK_WRAPPER.format(python=sys.executable))
    wrapper.chmod(0o755)
    out = tmp_path / "run"
    job = Job(out, script=wrapper)
    job.wait_for("step 4/")
    os.killpg(job.proc.pid, signal.SIGTERM)
    code = job.finish()
    assert code == -signal.SIGTERM, (code, job.log[-3000:])
    assert "rank 0 exit status 0" in job.log and "rank 1 exit status 0" in job.log, job.log[-3000:]
    step = check_preempted(out, job.log, "SIGTERM")
    resume_matches_baseline(baseline, out, step)


def test_sigusr1_to_the_ranks(tmp_path):
    """SIGUSR1 to both rank processes and not to the launcher, as `#SBATCH --signal=USR1@300`
    (without B:) does for tasks started by srun: the deepspeed launcher sees both exit 0 and exits 0.
    (Resuming from such a checkpoint: the SIGTERM test above and the SLURM test below.)"""
    out = tmp_path / "run"
    job = Job(out)
    job.wait_for("step 4/")
    for rank in job.ranks():
        rank.send_signal(signal.SIGUSR1)
    code = job.finish()
    assert code == 0, job.log[-3000:]
    assert job.log.count("exits successfully") == 2
    check_preempted(out, job.log, "SIGUSR1")


def test_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGUSR1 to rank 1 alone (torchrun this time): rank 0, never signalled, reports the
    preemption and both ranks write their share of the same checkpoint, then exit 0 (so does
    torchrun). Without the agreement, rank 1 would enter the collective save alone and hang."""
    out = tmp_path / "run"
    job = Job(out, launcher="torchrun")
    job.wait_for("step 4/")
    job.ranks()[1].send_signal(signal.SIGUSR1)
    code = job.finish()
    assert code == 0, job.log[-3000:]
    check_preempted(out, job.log, "SIGUSR1")


@pytest.mark.parametrize("script,sbatch_args", [
    ("launch/slurm/torchrun.sbatch", ["-N1"]),
    ("launch/slurm/deepspeed.sbatch", ["-N1", "--ntasks-per-node=2"]),
], ids=["srun+torchrun", "deepspeed-slurm"])
def test_slurm_signal_requeues_the_job_and_it_resumes(baseline, tmp_path, script, sbatch_args):
    """The sbatch scripts on the local SLURM cluster (1 node, 2 ranks). `scancel --signal=USR1`
    reaches every process of the job's steps and not the batch shell, as `#SBATCH --signal=USR1@300`
    does ahead of the time limit: the ranks (srun tasks, or torchrun's workers; torchrun itself
    ignores USR1) save and exit 0, the script requeues the job (same id), the restart adds
    --resume and ends with the uninterrupted run's weights."""
    if (why := missing()) is not None:
        pytest.skip(f"local SLURM cluster unavailable: {why}")
    cluster = LocalSlurm(tmp_path / "slurm")
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"SLURM daemons could not start here: {exc}")
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = {**cluster.env, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
           "PYTHONPATH": str(ROOT), "NPROC_PER_NODE": "2"}
    job = None

    def slurm(*cmd):
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60).stdout

    seen = []

    def state():
        info = cluster.job_info(job)
        now = info.get("JobState"), info.get("Restarts")
        if not seen or seen[-1] != now:
            seen.append(now)
        return now

    def until(ok, what, timeout=300):
        deadline = time.time() + timeout
        while not ok():
            text = log.read_text(errors="replace") if log.exists() else ""
            assert time.time() < deadline, f"{what}: {seen}\n{text[-3000:]}\n{cluster.log_tail()}"
            time.sleep(0.5)

    try:
        job = slurm("sbatch", "--parsable", *sbatch_args, "-o", str(log), script, *ARGS,
                    "--output-dir", str(out)).strip().split(";")[0]
        assert job.isdigit(), job
        until(lambda: log.exists() and "\nstep 4/" in log.read_text(errors="replace"), "no step 4")
        slurm("scancel", "--signal=USR1", job)
        # A requeued job may start ~2 min later (BeginTime). Let it start sooner, once the first run
        # is gone from the node and a few seconds later: slurmd revokes the first run's credential
        # with a 1 s timestamp, and a new one issued within that second is refused ("Job credential
        # revoked", the job FAILED; seen once).
        until(lambda: state() == ("PENDING", "1") and "idle" in slurm("sinfo", "-h", "-N", "-n", "n1", "-o", "%t"),
              "not requeued", 120)
        time.sleep(5)
        slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
        until(lambda: state()[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), "did not end", 400)
        text = log.read_text(errors="replace")
        assert state() == ("COMPLETED", "1") and cluster.job_info(job)["ExitCode"] == "0:0", \
            f"{seen} {cluster.job_info(job)}\n{text[-3000:]}\n{cluster.log_tail()}"
    finally:
        if job is not None and state()[0] in ("PENDING", "RUNNING"):
            slurm("scancel", job)
        cluster.stop()
    step = int(LINE.findall(text)[0][1])
    tag = f"step{step:08d}"
    assert f"dsso: preempted at {tag}; requeueing job {job}" in text, text[-3000:]
    assert f"dsso: restart 1 of job {job}: adding --resume" in text
    assert f"resumed from {out}/checkpoints/{tag} at step {step}" in text
    result = json.loads((out / "result.json").read_text())
    assert result["preempted"] is None and result["final"]["step"] == STEPS
    assert_same_weights(baseline, out)
