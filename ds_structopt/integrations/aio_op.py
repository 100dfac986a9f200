"""DeepSpeed's async I/O op (libaio), which NVMe offload needs, built once per machine.

DeepSpeed JIT-compiles ``async_io`` (and the ``pin_memory`` op it links against) the first
time NVMe offload starts: minutes of g++ (the op is built at -O0), and a rank killed
mid-compile leaves a lock behind. ``python -m ds_structopt.integrations.aio_op`` builds it
ahead, into a folder per DeepSpeed and torch version under ``~/.cache/ds_structopt/ops``
(the test set-up runs it; tests copy the result into their own extensions folder and never
compile). It needs ``libaio-dev`` (``scripts/install_system_deps.sh`` installs it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

OPS = ("async_io", "pin_memory")


def prebuilt_dir() -> str:
    """Where this machine's build lives, keyed by the versions that make a build valid (read
    without importing DeepSpeed, which takes seconds)."""
    from importlib.metadata import version

    key = f"deepspeed{version('deepspeed')}-torch{version('torch')}-py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(os.path.expanduser("~"), ".cache", "ds_structopt", "ops", key)


def build() -> str:
    """Build the ops into :func:`prebuilt_dir` (in a child process: the extensions folder is
    read when torch first builds); returns that folder. Raises with the compiler's reason."""
    folder = prebuilt_dir()
    if built(folder):
        return folder
    os.makedirs(folder, exist_ok=True)
    code = "from deepspeed.ops.op_builder import AsyncIOBuilder; AsyncIOBuilder().load(verbose=False)"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCH_EXTENSIONS_DIR": folder},
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"building DeepSpeed's async_io op failed: {last}")
    return folder


def built(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, op, f"{op}.so")) for op in OPS)


def provide(extensions_dir: str) -> bool:
    """Copy the prebuilt ops into ``extensions_dir`` (a fresh TORCH_EXTENSIONS_DIR) so that loading
    them there compiles nothing; False when this machine has no build."""
    source = prebuilt_dir()
    if not built(source):
        return False
    for op in OPS:
        shutil.copytree(os.path.join(source, op), os.path.join(extensions_dir, op), dirs_exist_ok=True)
    return True


def main() -> int:
    try:
        print(f"aio_op: DeepSpeed's async_io op built in {build()}")
    except Exception as exc:  # best effort: the NVMe tests skip, saying why
        print(f"aio_op: not built ({exc}); NVMe offload tests will skip", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
