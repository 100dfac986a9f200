"""The training corpus from ``--data``: a prepared directory (memory-mapped) or raw sources
(tokenized and packed in memory at start; fine for small corpora)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from . import megatron_indexed, prepared
from .packing import PackedData, pack
from .sources import iter_documents, source_files
from .tokenizer import load_tokenizer


def load_corpus(sources: Sequence[str], tokenizer_path: Optional[str], seq_len: int) -> PackedData:
    """Rows of ``seq_len + 1`` tokens: from ``sources[0]`` when it is a prepared dataset
    (``ds-structopt prepare-data``, or Megatron's ``<prefix>.bin/.idx``; the tokenizer must be the
    one it was made with), otherwise every source tokenized now. A prepared dataset mixed with
    other sources is refused."""
    sources = [str(s) for s in sources]
    tokenizer = load_tokenizer(tokenizer_path)
    ready = [s for s in sources if prepared.is_prepared(s) or megatron_indexed.is_indexed(s)]
    if ready and len(sources) > 1:
        raise ValueError(f"--data {ready[0]} is a prepared dataset: give it alone (prepare the other sources into it)")
    if ready and prepared.is_prepared(ready[0]):
        return prepared.load(ready[0], seq_len, tokenizer, tokenizer_path)
    if ready:
        return megatron_indexed.load(ready[0], seq_len, tokenizer)
    size = raw_bytes(sources)
    if size > PREPARE_ABOVE_BYTES and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: --data holds {size / 2**20:.0f} MiB of raw text, tokenized again by every rank at every start "
              f"(memory ~36 bytes per token): above {PREPARE_ABOVE_BYTES // 2**20} MiB, prepare it once with "
              "'ds-structopt prepare-data --data ... --out DIR' and train with --data DIR", flush=True)
    return pack(iter_documents(sources), tokenizer, seq_len)


# Above this much raw text, tokenizing at every start costs minutes and GBs per rank (Python lists)
PREPARE_ABOVE_BYTES = 256 * 2**20


def raw_bytes(sources: Sequence[str]) -> int:
    """Bytes of the files behind ``sources`` (directories walked; built-in corpora count 0)."""
    return sum(f.stat().st_size for s in sources if Path(s).exists() for f in source_files(Path(s)))
