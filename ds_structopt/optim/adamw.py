"""Multi-tensor AdamW for the parameters that are not preconditioned as matrices.

Norms, biases, embeddings and the LM head of a LLaMA model go through here,
inside the same optimizer object as the matrices. Moments are fp32 whatever the
parameter dtype; a bf16 parameter is updated in fp32 and rounded once.
"""
from __future__ import annotations

import math
from typing import Any, MutableMapping, Sequence

import torch
from torch import Tensor


def init_adamw_state(state: MutableMapping[str, Any], param: Tensor) -> None:
    if "step" in state:
        return
    state["step"] = 0
    state["exp_avg"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    state["exp_avg_sq"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)


def adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[MutableMapping[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step over many tensors with ``torch._foreach_*`` kernels (torch's operation order)."""
    beta1, beta2 = betas
    for p, st in zip(params, states):
        init_adamw_state(st, p)
        st["step"] += 1
    grads32 = [g.float() for g in grads]
    exp_avgs = [st["exp_avg"] for st in states]
    exp_avg_sqs = [st["exp_avg_sq"] for st in states]
    weights32 = [p if p.dtype == torch.float32 else p.float() for p in params]

    if weight_decay != 0:
        torch._foreach_mul_(weights32, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads32, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads32, grads32, 1.0 - beta2)

    steps = [st["step"] for st in states]
    step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
    bias2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(weights32, exp_avgs, denom, step_sizes)

    for p, w in zip(params, weights32):
        if w is not p:
            p.copy_(w)
