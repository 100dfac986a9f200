import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Every rank a test starts inherits this: JIT builds (if any) go to a fresh folder, so a lock left in
# ~/.cache/torch_extensions by a job killed mid-compile elsewhere cannot stall the suite.
_EXT_OURS = "TORCH_EXTENSIONS_DIR" not in os.environ
os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="ds_structopt_test_ext_"))
_EXT_DIR = os.environ["TORCH_EXTENSIONS_DIR"]
_EXT_BEFORE = set(os.listdir(_EXT_DIR)) if os.path.isdir(_EXT_DIR) else set()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any test path made DeepSpeed JIT-compile an op: minutes of g++ per fresh CI
    machine, and a killed compile leaves a lock that hangs every later DeepSpeed start."""
    built = sorted(set(os.listdir(_EXT_DIR)) - _EXT_BEFORE) if os.path.isdir(_EXT_DIR) else []
    if built:
        print(f"\nerror: DeepSpeed JIT-compiled {built} into {_EXT_DIR}; a code path starts DeepSpeed's comm "
              "backend without ds_structopt.integrations.deepspeed_ops.skip_unused_jit_ops()")
        session.exitstatus = 1
    elif _EXT_OURS:
        os.rmdir(_EXT_DIR)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests gated on a CUDA GPU get the ``gpu`` marker (``pytest -m gpu``: scripts/gpu_check.sh runs
    them). ``soak`` tests (minutes long) run in CI (CI=true) or with DS_STRUCTOPT_SOAK=1; skipped otherwise."""
    for item in items:
        reasons = [str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")]
        if any("CUDA" in r or "GPU" in r for r in reasons):
            item.add_marker(pytest.mark.gpu)
    if os.environ.get("CI") == "true" or os.environ.get("DS_STRUCTOPT_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak test: set DS_STRUCTOPT_SOAK=1 (CI runs it)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
