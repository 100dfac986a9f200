"""Megatron's indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``) as training rows, memory-mapped.

Users with data prepared for Megatron-LM (``tools/preprocess_data.py``) train on it with no
conversion: ``--data <prefix>``. The ``.idx`` file is read per its layout (header
``MMIDIDX\\x00\\x00``, version 1, dtype code, sequence and document counts, int32 sequence
lengths, int64 byte pointers, int64 document boundaries as sequence indices); the ``.bin`` file is
mapped, never loaded. The token stream is used as stored (Megatron appends EOD per document when
preprocessed with ``--append-eod``; nothing is added here). Held out: the last 1 in ``eval_every``
documents, so train and eval are each one contiguous range and never share a document. The files
carry no tokenizer: the vocabulary is the ``--tokenizer`` given, which must be the one used.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Union

import numpy as np

from .packing import PackedData
from .prepared import PreparedDataError, TokenRows
from .tokenizer import Tokenizer, token_dtype

HEADER = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def prefix_of(path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".bin", ".idx") else p


def is_indexed(path: Union[str, os.PathLike]) -> bool:
    prefix = prefix_of(path)
    return Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file()


def read_index(prefix: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, sequence byte pointers, document boundaries) of ``<prefix>.idx``."""
    idx = Path(f"{prefix}.idx")
    raw = idx.read_bytes()
    head = len(HEADER) + 8 + 1 + 8 + 8
    if len(raw) < head or raw[: len(HEADER)] != HEADER:
        raise PreparedDataError(f"{idx}: not a Megatron indexed dataset index (header {raw[:len(HEADER)]!r})")
    version, code, sequences, documents = struct.unpack_from("<QBQQ", raw, len(HEADER))
    if version != 1 or code not in DTYPES:
        raise PreparedDataError(f"{idx}: version {version}, dtype code {code}: expected version 1 and a code in "
                                f"{sorted(DTYPES)}")
    need = head + sequences * 4 + sequences * 8 + documents * 8
    if len(raw) < need:
        raise PreparedDataError(f"{idx}: {len(raw)} bytes, its counts need {need}: truncated")
    lengths = np.frombuffer(raw, np.int32, sequences, head)
    pointers = np.frombuffer(raw, np.int64, sequences, head + sequences * 4)
    bounds = np.frombuffer(raw, np.int64, documents, head + sequences * 12)
    return np.dtype(DTYPES[code]), lengths, pointers, bounds


def load(path: Union[str, os.PathLike], seq_len: int, tokenizer: Tokenizer, eval_every: int = 20) -> PackedData:
    """Rows of ``seq_len + 1`` tokens from the indexed dataset at ``path`` (prefix, .bin or .idx)."""
    prefix = prefix_of(path)
    dtype, lengths, pointers, bounds = read_index(prefix)
    total = int(lengths.sum(dtype=np.int64))
    bin_path = Path(f"{prefix}.bin")
    if bin_path.stat().st_size != total * dtype.itemsize:
        raise PreparedDataError(f"{bin_path}: {bin_path.stat().st_size} bytes, {prefix}.idx says "
                                f"{total * dtype.itemsize} ({total} tokens): truncated or replaced")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(total,)) if total else np.zeros(0, dtype)
    docs = len(bounds) - 1  # boundaries start at sequence 0
    held = docs // eval_every if docs >= 2 else 0
    first_eval_seq = int(bounds[docs - held]) if held else len(lengths)
    cut = int(pointers[first_eval_seq]) // dtype.itemsize if first_eval_seq < len(lengths) else total
    rows = token_dtype(tokenizer.vocab_size)
    train, held_out = TokenRows(tokens[:cut], seq_len, rows), TokenRows(tokens[cut:], seq_len, rows)
    if len(train) == 0:
        raise PreparedDataError(f"{bin_path}: not enough tokens for one training sequence of {seq_len + 1} tokens")
    return PackedData(train, held_out, tokenizer.vocab_size)
