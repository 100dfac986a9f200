"""The training corpus from ``--data``: a prepared directory (memory-mapped) or raw sources
(tokenized and packed in memory at start; fine for small corpora)."""
from __future__ import annotations

from typing import Optional, Sequence

from . import prepared
from .packing import PackedData, pack
from .sources import iter_documents
from .tokenizer import load_tokenizer


def load_corpus(sources: Sequence[str], tokenizer_path: Optional[str], seq_len: int) -> PackedData:
    """Rows of ``seq_len + 1`` tokens: from ``sources[0]`` when it is a prepared dataset
    (``ds-structopt prepare-data``; the tokenizer must be the one it was made with), otherwise
    every source tokenized now. A prepared directory mixed with other sources is refused."""
    sources = [str(s) for s in sources]
    tokenizer = load_tokenizer(tokenizer_path)
    ready = [s for s in sources if prepared.is_prepared(s)]
    if ready and len(sources) > 1:
        raise ValueError(f"--data {ready[0]} is a prepared dataset: give it alone (prepare the other sources into it)")
    if ready:
        return prepared.load(ready[0], seq_len, tokenizer, tokenizer_path)
    return pack(iter_documents(sources), tokenizer, seq_len)
