"""Static checks, run with the suite (and so by CI): ruff over the package and tests, mypy over
the public API (the package root and what it re-exports; settings in pyproject.toml)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PUBLIC_API = ["ds_structopt/__init__.py", "ds_structopt/optim/__init__.py", "ds_structopt/optim/registry.py",
              "ds_structopt/optim/base.py", "ds_structopt/grouping.py", "ds_structopt/integrations/deepspeed.py",
              "ds_structopt/integrations/torch_parallel.py", "ds_structopt/distributed/ownership.py"]


def test_ruff_finds_nothing():
    proc = subprocess.run([str(BIN / "ruff"), "check", "ds_structopt", "tests"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_mypy_passes_on_the_public_api():
    proc = subprocess.run([str(BIN / "mypy"), "--no-incremental", *PUBLIC_API], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
