"""Tokenizers: bytes by default (no files needed), or a local `tokenizers`/Hugging Face tokenizer."""
from __future__ import annotations

import os
from typing import Optional, Protocol

import torch


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255 plus an end-of-document token 256 (vocabulary 257)."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class LocalTokenizer:
    """A tokenizer from local files only: a `tokenizer.json` (tokenizers) or a Hugging Face tokenizer folder."""

    def __init__(self, path: str):
        if os.path.isfile(path):
            from tokenizers import Tokenizer as HFTokenizer

            self._tok = HFTokenizer.from_file(path)
            self.vocab_size = self._tok.get_vocab_size()
            self._encode = lambda text: self._tok.encode(text).ids
            eos = next((t for t in ("</s>", "<|endoftext|>", "<eos>") if self._tok.token_to_id(t) is not None), None)
            self.eos_id = self._tok.token_to_id(eos) if eos else self.vocab_size - 1
        elif os.path.isdir(path):
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.vocab_size = len(self._tok)
            self._encode = lambda text: self._tok.encode(text, add_special_tokens=False)
            self.eos_id = self._tok.eos_token_id if self._tok.eos_token_id is not None else self.vocab_size - 1
        else:
            raise FileNotFoundError(f"tokenizer not found: {path} (a tokenizer.json file or a tokenizer folder)")

    def encode(self, text: str) -> list[int]:
        return self._encode(text)


def load_tokenizer(path: Optional[str]) -> Tokenizer:
    """``None`` or "bytes" -> ByteTokenizer; otherwise a local tokenizer file/folder (never downloads)."""
    if path in (None, "", "bytes"):
        return ByteTokenizer()
    return LocalTokenizer(path)


def token_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= 32767 else torch.int32
