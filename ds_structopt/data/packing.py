"""Packing documents into fixed-length training sequences, with a held-out split by document."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .tokenizer import Tokenizer, token_dtype


@dataclass
class PackedData:
    """Rows of ``seq_len + 1`` tokens (inputs are ``[:, :-1]``, labels ``[:, 1:]``)."""

    train: torch.Tensor
    eval: torch.Tensor
    vocab_size: int

    @property
    def seq_len(self) -> int:
        return self.train.shape[1] - 1


def pack(docs: Iterable[str], tokenizer: Tokenizer, seq_len: int, eval_every: int = 20,
         max_tokens: Optional[int] = None) -> PackedData:
    """Tokenize, join documents with EOS, cut into windows of seq_len + 1 (stride seq_len).

    Every ``eval_every``-th document (1-based: documents eval_every, 2*eval_every, ...) goes to
    the held-out split, so train and eval never share a document.
    """
    if seq_len < 1 or eval_every < 2:
        raise ValueError(f"seq_len must be >= 1 and eval_every >= 2, got {seq_len}, {eval_every}")
    streams: dict[str, list[int]] = {"train": [], "eval": []}
    for i, doc in enumerate(docs, 1):
        split = "eval" if i % eval_every == 0 else "train"
        streams[split].extend(tokenizer.encode(doc))
        streams[split].append(tokenizer.eos_id)
        if max_tokens is not None and len(streams["train"]) >= max_tokens:
            break
    dtype = token_dtype(tokenizer.vocab_size)
    rows = {k: _windows(torch.tensor(v, dtype=torch.long), seq_len).to(dtype) for k, v in streams.items()}
    if len(rows["train"]) == 0:
        raise ValueError(f"not enough text for one training sequence of {seq_len + 1} tokens")
    return PackedData(rows["train"], rows["eval"], tokenizer.vocab_size)


def _windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    count = max(0, (len(tokens) - 1) // seq_len)
    if count == 0:
        return torch.empty(0, seq_len + 1, dtype=tokens.dtype)
    return tokens[: count * seq_len + 1].unfold(0, seq_len + 1, seq_len).contiguous()
