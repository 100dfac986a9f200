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
import math
import struct
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
    def takes(params: Sequence[Tensor], grads: Sequence[Tensor],
              states: Sequence[MutableMapping[str, Any]] = ()) -> bool:
        """Whether every tensor is what the kernel reads and writes in place: contiguous fp32 in
        host memory (the op would step a contiguous copy of anything else and drop it)."""
        moments = (st[k] for st in states for k in ("exp_avg", "exp_avg_sq") if k in st)
        return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                   for t in itertools.chain(params, grads, moments))

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[MutableMapping[str, Any]],
             *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        """``optim.adamw.adamw_step``'s update, tensor by tensor, with bias correction and
        decoupled (AdamW) weight decay (:func:`kernel_hyperparameters`)."""
        for p, g, st in zip(params, grads, states):
            init_adamw_state(st, p)
            st["step"] += 1
            k_lr, k_eps, k_wd = kernel_hyperparameters(st["step"], lr=lr, betas=betas, eps=eps,
                                                       weight_decay=weight_decay)
            self.op.adam_update(self.id, st["step"], k_lr, betas[0], betas[1], k_eps, k_wd, False,
                                p, g, st["exp_avg"], st["exp_avg_sq"])
        self.tensors_stepped += len(params)


def kernel_hyperparameters(step: int, *, lr: float, betas: tuple[float, float], eps: float,
                           weight_decay: float) -> tuple[float, float, float]:
    """The kernel's (lr, eps, weight decay) with bias correction off that give AdamW's bias-corrected
    step ``p -= lr * (m / c1) / (sqrt(v / c2) + eps)``, ``c = 1 - beta**step``.

    The kernel's own bias correction raises float32 betas to the step in float32, and ``1 - beta2**t``
    then loses five digits to cancellation (1e-5 relative in the update at beta2 0.999); it also
    advances those powers incrementally per kernel instance, so a resumed run rounds otherwise than
    an uninterrupted one. Here the corrections are computed in double from the step alone and folded
    in: ``m / (sqrt(v) / s2 + eps) = s2 * m / (sqrt(v) + eps * s2)`` with ``s2 = sqrt(c2)``, so the
    kernel gets ``lr * s2 / c1`` and ``eps * s2``, and the weight decay that keeps ``lr * wd``. The
    betas are the float32 values the kernel's moments use, so the corrections match them."""
    beta1, beta2 = (_float32(b) for b in betas)
    s2 = math.sqrt(1.0 - beta2**step)
    k_lr = lr * s2 / (1.0 - beta1**step)
    return k_lr, eps * s2, (lr * weight_decay / k_lr) if k_lr else 0.0


def _float32(x: float) -> float:
    """``x`` rounded to float32, as the kernel holds it (no tensor: this runs per tensor per step)."""
    return struct.unpack("f", struct.pack("f", x))[0]


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
