"""DeepSpeed's C++ ops that offload uses, built once per machine and environment.

- ``async_io`` (and the ``pin_memory`` op it links against): NVMe offload's reads and writes.
- ``cpu_adam``: DeepSpeed's vectorized CPU AdamW, which steps the elementwise parameters
  (norms, biases, embeddings) in host memory under ZeRO-Offload, as it does for AdamW
  (``host_adam.py``).

DeepSpeed JIT-compiles them the first time offload starts: minutes of g++ (``async_io`` is
built at -O0), and a rank killed mid-compile leaves a lock behind. ``python -m
ds_structopt.integrations.offload_ops`` builds them ahead, into a folder per DeepSpeed and torch
version and virtual environment under ``~/.cache/ds_structopt/ops`` (the test set-up runs it;
tests copy the result into their own extensions folder and never compile). ``async_io`` needs ``libaio-dev``
(``scripts/install_system_deps.sh`` installs it); each op is built on its own, so a machine
without libaio still gets ``cpu_adam``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

# builder class -> the extension folders it leaves (each with <name>.so)
BUILDS = {"AsyncIOBuilder": ("async_io", "pin_memory"), "CPUAdamBuilder": ("cpu_adam",)}


def prebuilt_dir() -> str:
    """Where this machine's build lives, keyed by what makes a build valid: the versions (read
    without importing DeepSpeed, which takes seconds) and the environment's location, because
    torch's build.ninja names DeepSpeed's sources by absolute path. The same versions in a clone
    elsewhere (CI checks out under another root) write a different build.ninja on load, and ninja
    then recompiles every object of the copied build."""
    from importlib.metadata import version

    where = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
    key = f"deepspeed{version('deepspeed')}-torch{version('torch')}-py{sys.version_info.major}{sys.version_info.minor}-{where}"
    return os.path.join(os.path.expanduser("~"), ".cache", "ds_structopt", "ops", key)


def path_with_env_bin(path: str | None = None) -> str:
    """``path`` (default: PATH) with this interpreter's bin folder first, as an activated venv has
    it. DeepSpeed's pip dependency puts a ninja there; torch runs the first ninja on PATH, and a
    build log written by one ninja version is restarted (everything rebuilt) by another, so the
    set-up and every test process must find the same one."""
    path = os.environ.get("PATH", "") if path is None else path
    first = os.path.dirname(sys.executable)
    parts = [p for p in path.split(os.pathsep) if p and p != first]
    return os.pathsep.join([first, *parts])


def build() -> dict[str, str]:
    """Build each op missing or out of date in :func:`prebuilt_dir` (in a child process: the
    extensions folder is read when torch first builds); returns builder -> "built" or the
    compiler's last line."""
    folder = prebuilt_dir()
    os.makedirs(folder, exist_ok=True)
    result = {}
    for builder, ops in BUILDS.items():
        if built(folder, ops):
            result[builder] = "built"
            continue
        code = f"from deepspeed.ops.op_builder import {builder}; {builder}().load(verbose=False)"
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCH_EXTENSIONS_DIR": folder, "PATH": path_with_env_bin()},
                              capture_output=True, text=True)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        result[builder] = "built" if done.returncode == 0 else f"failed: {last}"
    return result


def built(folder: str, ops: tuple[str, ...]) -> bool:
    """Each op's library is there and up to date with what it was built from. A reinstall of
    DeepSpeed or torch at the same versions leaves newer sources and headers: ninja then rebuilds
    the op on load, in every fresh extensions folder it is copied to (minutes per test session)."""
    return all(os.path.isfile(os.path.join(folder, op, f"{op}.so")) and up_to_date(os.path.join(folder, op))
               for op in ops)


def up_to_date(op_dir: str) -> bool:
    """Whether loading the op in ``op_dir`` compiles nothing: ninja's own dry run (``-n``) over the
    build.ninja torch left there (True where there is no ninja or build file to ask)."""
    ninja = _ninja()
    if ninja is None or not os.path.isfile(os.path.join(op_dir, "build.ninja")):
        return True
    done = subprocess.run([ninja, "-C", op_dir, "-n"], capture_output=True, text=True)
    return done.returncode == 0 and "no work to do" in done.stdout


def _ninja() -> str | None:
    """The ninja torch runs in the set-up and the tests: the first on :func:`path_with_env_bin`.
    Another version would not read this one's build log (1.13 restarts a 1.11 log: everything
    rebuilt), so the check asks this one."""
    return shutil.which("ninja", path=path_with_env_bin())


def provide(extensions_dir: str) -> list[str]:
    """Copy the prebuilt ops into ``extensions_dir`` (a fresh TORCH_EXTENSIONS_DIR) so that loading
    them there compiles nothing; returns the ops copied (none where this machine has no up-to-date
    build: copying a stale one would only move its rebuild there). Copies keep the files' times,
    which is what ninja compares."""
    source = prebuilt_dir()
    copied = []
    for ops in BUILDS.values():
        if built(source, ops):
            for op in ops:
                shutil.copytree(os.path.join(source, op), os.path.join(extensions_dir, op), dirs_exist_ok=True)
            copied += ops
    return copied


def main() -> int:
    """Best effort: a missing op makes its tests skip (NVMe) or the host AdamW fall back, saying why."""
    for builder, outcome in build().items():
        print(f"offload_ops: {builder} {outcome} ({prebuilt_dir()})", file=sys.stdout if outcome == "built" else sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
