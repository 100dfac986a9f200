"""The CPU shim megatron-core needs in our tests (tests only; never imported by the package).

megatron-core 0.16.1 assumes a CUDA device in a few places that have nothing to do
with the optimizer under test: ``torch.cuda.current_device()`` for buffers,
``device='cuda'`` literals for loss-scale/norm scalars, ``torch.cuda.synchronize()``
before checkpoint writes, and a CUDA RNG tracker forked around attention. On a
CPU-only torch build each of those raises. ``install()`` points them at the CPU:

- ``torch.cuda.current_device`` returns ``"cpu"``; ``torch.cuda.synchronize`` does nothing;
- a TorchFunctionMode rewrites ``device="cuda"`` in tensor factories and ``Tensor.cuda()`` to CPU, and
  reports CPU tensors' ``Tensor.type()`` as ``torch.cuda.*`` (megatron's Float16 wrapper checks those names);
- the model-parallel RNG tracker keeps CPU generator states (same seeds as megatron's).

On a GPU machine none of this is installed (``install()`` returns without changing anything).
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _is_cuda(device) -> bool:
    return device is not None and str(device).startswith("cuda")


class CudaToCpu(TorchFunctionMode):
    """Send every tensor that megatron asks to create on CUDA to the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's Float16 wrapper accepts only 'torch.cuda.*Tensor' type names
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def install(seed: int = 1234) -> None:
    """Make megatron-core run on a CPU-only torch (no-op where CUDA exists); seed its RNG tracker.

    Call after ``initialize_model_parallel`` to seed now, or before it (a script that seeds with
    ``model_parallel_cuda_manual_seed`` itself): the first call installs without seeding
    when model parallelism is not initialized yet.
    """
    global _INSTALLED
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
        return
    if not _INSTALLED:
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda *a, **k: None
        CudaToCpu().__enter__()  # stays active for the life of the process
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel import random as mrandom

        # scripts seed megatron with model_parallel_cuda_manual_seed: give them the CPU tracker
        tensor_parallel.model_parallel_cuda_manual_seed = mrandom.model_parallel_cuda_manual_seed = \
            lambda seed, *a, **k: _seed_cpu_tracker(seed)
        _INSTALLED = True
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        _seed_cpu_tracker(seed)


def _seed_cpu_tracker(seed: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRngTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):  # noqa: D401 - same contract as megatron's, CPU generator state
            self._is_initialized = True
            gen = torch.Generator()
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    tracker = CpuRngTracker()
    tp_rank = ps.get_tensor_model_parallel_rank()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * tp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
