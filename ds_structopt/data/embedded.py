"""The embedded default corpus: Python's own documentation, byte-level tokens.

``pydoc_data.topics`` (~0.46 MB of English reference text) ships with every
CPython, so the main job and the tests train on real text with no download.
Bytes are the tokens (vocabulary 256), so no tokenizer file is needed either.
"""
from __future__ import annotations

import torch

BYTE_VOCAB = 256


def embedded_text() -> str:
    """All pydoc topics, in a fixed (sorted) order."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def byte_tokens(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def train_eval_split(tokens: torch.Tensor, eval_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out the tail of the corpus for evaluation."""
    cut = int(len(tokens) * (1.0 - eval_fraction))
    return tokens[:cut], tokens[cut:]


def random_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len + 1`` tokens (inputs and shifted targets)."""
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


def eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int) -> list[torch.Tensor]:
    """Fixed, non-overlapping evaluation windows (the same for every optimizer)."""
    n = min(max_batches * batch_size, (len(tokens) - 1) // seq_len)
    windows = [tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]
    windows = [w for w in windows if len(w) == seq_len + 1]
    return [torch.stack(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
