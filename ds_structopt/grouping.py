"""Name-based parameter grouping: which parameters get the structured update.

As in the GaLore/AdaDiag/ASGO experiments, 2-D weights of attention and MLP
blocks are preconditioned as matrices; embeddings, the LM head and every 1-D
parameter (norms, biases) go to AdamW. Norms and biases also get no weight
decay by default, the usual LLaMA recipe.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import nn

from .optim.names import DEFAULT_ELEMENTWISE_PATTERNS, DEFAULT_NO_DECAY_PATTERNS
from .optim.names import matches as _matches


def param_groups(
    model: nn.Module,
    *,
    elementwise_patterns: Iterable[str] = DEFAULT_ELEMENTWISE_PATTERNS,
    no_decay_patterns: Iterable[str] = DEFAULT_NO_DECAY_PATTERNS,
    weight_decay: Optional[float] = None,
    structured_options: Optional[dict[str, Any]] = None,
    elementwise_options: Optional[dict[str, Any]] = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into param groups for our optimizers.

    Returns up to three groups, each with ``param_names``:
    ``structured`` (2-D+ weights not matched by ``elementwise_patterns``),
    ``elementwise`` (AdamW, with weight decay) and ``elementwise_no_decay``
    (AdamW, names matched by ``no_decay_patterns`` and all 1-D params,
    ``weight_decay=0``). ``weight_decay`` (if given) goes into the decayed
    groups; ``*_options`` add per-group hyper-parameters. Patterns are regular
    expressions searched in the parameter's qualified name. Tied parameters
    appear once.
    """
    elementwise_patterns, no_decay_patterns = tuple(elementwise_patterns), tuple(no_decay_patterns)
    buckets: dict[str, tuple[list[str], list[nn.Parameter]]] = {
        "structured": ([], []),
        "elementwise": ([], []),
        "elementwise_no_decay": ([], []),
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ds_shape = getattr(p, "ds_shape", None)  # ZeRO-3 partitioned params are (0,) locally
        ndim = len(ds_shape) if ds_shape is not None else p.dim()
        if ndim >= 2 and not _matches(name, elementwise_patterns):
            key = "structured"
        elif ndim < 2 or _matches(name, no_decay_patterns):
            key = "elementwise_no_decay"
        else:
            key = "elementwise"
        buckets[key][0].append(name)
        buckets[key][1].append(p)

    groups: list[dict[str, Any]] = []
    for key, (names, params) in buckets.items():
        if not params:
            continue
        group: dict[str, Any] = {"params": params, "param_names": names, "name": key, "structured": key == "structured"}
        if key == "elementwise_no_decay":
            group["weight_decay"] = 0.0
            group["adam_weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        extra = structured_options if key == "structured" else elementwise_options
        group.update(extra or {})
        groups.append(group)
    return groups
