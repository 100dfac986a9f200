"""The elementwise parameters' AdamW under ZeRO-Offload, on DeepSpeed's CPU Adam kernel.

With ``offload_optimizer`` the fp32 partitions are in host memory, and DeepSpeed steps AdamW
there with its vectorized ``cpu_adam`` op (DeepSpeedCPUAdam). Our optimizer steps the
parameters it does not precondition (norms, biases, embeddings) with AdamW too, so under
offload they take the same kernel. Its math is ours (``optim/adamw.py``: decoupled weight
decay, bias-corrected moments in fp32), evaluated in another order and vector width: equal to
round-off, not bit for bit. The op comes prebuilt from ``offload_ops``, or DeepSpeed builds it
on first use as it does for its own CPU Adam.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Any, MutableMapping, Optional, Sequence

import torch
from torch import Tensor

from ..optim.adamw import init_adamw_state

_ids = itertools.count(1 << 20)  # kernel instances apart from DeepSpeedCPUAdam's own (0, 1, ...)


class HostAdam:
    """AdamW on host fp32 tensors through DeepSpeed's ``cpu_adam`` op (one kernel instance)."""

    def __init__(self, op: Any) -> None:
        self.op, self.id = op, next(_ids)
        self.tensors_stepped = 0  # metrics: what went through the kernel
        self.op.create_adam(self.id, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False)  # values come with each update

    def __del__(self) -> None:
        try:
            self.op.destroy_adam(self.id)
        except Exception:  # interpreter shutdown: the op may be gone first
            pass

    @staticmethod
    def takes(params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
        """Whether every tensor is what the kernel reads: contiguous fp32 in host memory."""
        return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                   for t in itertools.chain(params, grads))

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[MutableMapping[str, Any]],
             *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        """``optim.adamw.adamw_step``'s update, tensor by tensor, with bias correction and
        decoupled (AdamW) weight decay."""
        for p, g, st in zip(params, grads, states):
            init_adamw_state(st, p)
            st["step"] += 1
            self.op.adam_update(self.id, st["step"], lr, betas[0], betas[1], eps, weight_decay, True,
                                p, g, st["exp_avg"], st["exp_avg_sq"])
        self.tensors_stepped += len(params)


def load_host_adam() -> Optional[HostAdam]:
    """The kernel, or None with a warning saying why (the step then uses ``optim.adamw``: the same
    update, slower on the host)."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        return HostAdam(CPUAdamBuilder().load(verbose=False))
    except Exception as exc:  # no compiler, an unsupported CPU: our foreach AdamW does the same update
        warnings.warn(f"ds_structopt: DeepSpeed's cpu_adam op is unavailable ({type(exc).__name__}: {exc}); the "
                      "elementwise parameters' AdamW runs as torch foreach ops in host memory", RuntimeWarning)
        return None
