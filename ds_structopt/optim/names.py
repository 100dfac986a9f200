"""Name patterns that route parameters to AdamW instead of the structured update."""
from __future__ import annotations

import re
from typing import Iterable

#: Embeddings and LM heads (HF LLaMA/GPT-2 and Megatron names) stay elementwise by default,
#: as in the GaLore/AdaDiag/ASGO experiments.
DEFAULT_ELEMENTWISE_PATTERNS: tuple[str, ...] = ("emb", "lm_head", r"\bwte\b", r"\bwpe\b", "output_layer")
DEFAULT_NO_DECAY_PATTERNS: tuple[str, ...] = ("bias", "norm", r"\bln_")


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when any regular expression in ``patterns`` is found in ``name``."""
    return any(re.search(p, name) for p in patterns)
