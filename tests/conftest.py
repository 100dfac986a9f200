import os
import shutil
import sys
import tempfile

import pytest
import torch

from ds_structopt.integrations.offload_ops import BUILDS, path_with_env_bin, provide

sys.path.insert(0, os.path.dirname(__file__))

# Every process a test starts runs the venv's tools (deepspeed, torchrun, and the ninja torch
# builds ops with: the one the set-up built the prebuilt ops with), as in an activated venv.
os.environ["PATH"] = path_with_env_bin()

# Every rank a test starts inherits this: JIT builds (if any) go to a fresh folder, so a lock left in
# ~/.cache/torch_extensions by a job killed mid-compile elsewhere cannot stall the suite.
_EXT_OURS = "TORCH_EXTENSIONS_DIR" not in os.environ
os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="ds_structopt_test_ext_"))
_EXT_DIR = os.environ["TORCH_EXTENSIONS_DIR"]
if _EXT_OURS:  # the offload tests' DeepSpeed ops (async_io, cpu_adam), built by the set-up (scripts/test.sh), not here
    provide(_EXT_DIR)


def _op_libraries() -> dict[str, float]:
    """Each op folder in the extensions folder -> its library's modification time (0: none yet)."""
    if not os.path.isdir(_EXT_DIR):
        return {}
    return {op: (os.path.getmtime(so) if os.path.isfile(so := os.path.join(_EXT_DIR, op, f"{op}.so")) else 0.0)
            for op in os.listdir(_EXT_DIR)}


_EXT_BEFORE = _op_libraries()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any test path made DeepSpeed JIT-compile an op: minutes of g++ per fresh CI
    machine, and a killed compile leaves a lock that hangs every later DeepSpeed start. A rebuilt
    op counts too: a stale prebuilt copy (DeepSpeed or torch reinstalled since it was built) is
    recompiled by ninja in every session, minutes each."""
    after = _op_libraries()
    compiled = sorted(op for op in after if after[op] != _EXT_BEFORE.get(op))  # new, or rebuilt in place
    prebuilt = {op for ops in BUILDS.values() for op in ops}
    if set(compiled) - prebuilt:
        print(f"\nerror: DeepSpeed JIT-compiled {sorted(set(compiled) - prebuilt)} into {_EXT_DIR}; a code path starts "
              "DeepSpeed's comm backend without ds_structopt.integrations.deepspeed_ops.skip_unused_jit_ops()")
        session.exitstatus = 1
    elif compiled:
        print(f"\nerror: DeepSpeed compiled {compiled} in {_EXT_DIR}: no up-to-date prebuilt copy (missing, older "
              "than DeepSpeed's or torch's files after a reinstall, or built by another ninja); `python -m ds_structopt.integrations.offload_ops` "
              "(scripts/test.sh runs it) builds them once per machine and venv")
        session.exitstatus = 1
    elif _EXT_OURS:
        shutil.rmtree(_EXT_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# Test tiers, mirroring the package (README "Tests"): select one with ``pytest -m unit|dist|system``.
TIERS = {
    # the math and pure functions, one process (optim/, data/, planning's ownership, configs, lint)
    "unit": ("test_behavior", "test_identities", "test_linalg", "test_ownership", "test_refresh", "test_grouping",
             "test_precision", "test_data", "test_config_fuzz", "test_lint", "test_trajectories", "test_pieces"),
    # distributed/ and integrations/ on real (gloo) or fake process groups, several ranks per test
    "dist": ("test_zero_parity", "test_zero_checkpoint", "test_zero_configs", "test_zero_refresh",
             "test_torch_parallel", "test_cluster_sim", "test_step_decision", "test_megatron", "test_resume_world",
             "test_resume_memory", "test_checkpoint_safety", "test_checkpoint_format", "test_hf_trainer",
             "test_plan", "test_scale_sim", "test_update_counts", "test_offload"),
    # launchers, the entry point, SLURM, containers, faults, soak, prepared data, benchmarks
    "system": ("test_launch", "test_train", "test_slurm", "test_containers", "test_soak", "test_faults",
               "test_preemption", "test_prepared_data", "test_bench", "test_bench_launched", "test_bench_regime",
               "test_convergence", "test_demo", "test_resume_policy"),
}
_TIER_OF = {module: tier for tier, modules in TIERS.items() for module in modules}


def pytest_collection_modifyitems(config, items):
    """Every test gets its tier's marker (a test file in no tier is an error: put it in one).
    Tests gated on a CUDA GPU get the ``gpu`` marker (``pytest -m gpu``: scripts/gpu_check.sh runs
    them). ``soak`` tests (minutes long) run in CI (CI=true) or with DS_STRUCTOPT_SOAK=1; skipped otherwise."""
    for item in items:
        module = item.path.stem
        if module not in _TIER_OF:
            raise pytest.UsageError(f"{item.path}: not in a test tier; add '{module}' to TIERS in tests/conftest.py")
        item.add_marker(getattr(pytest.mark, _TIER_OF[module]))
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
