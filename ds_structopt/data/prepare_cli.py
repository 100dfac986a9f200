"""``ds-structopt prepare-data``: tokenize sources once into a folder that training memory-maps."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Iterable, Iterator, Optional, Sequence

from . import prepared
from .sources import iter_documents
from .tokenizer import load_tokenizer


def _with_progress(docs: Iterable[str], every_s: float = 10.0) -> Iterator[str]:
    """Pass documents through, printing documents, characters and characters/s every ``every_s``."""
    t0 = last = time.perf_counter()
    n = chars = 0
    for doc in docs:
        n += 1
        chars += len(doc)
        yield doc
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            print(f"[prepare-data] {n} documents, {chars / 1e6:.1f}M characters, {chars / (now - t0) / 1e6:.2f}M chars/s",
                  flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ds-structopt prepare-data", description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=None, help="files, directories, .jsonl, .parquet, 'embedded', 'stdlib'")
    p.add_argument("--tokenizer", default=None, help="local tokenizer.json or tokenizer folder (default: bytes)")
    p.add_argument("--out", required=True, help="output folder (then: ds-structopt train --data <folder>)")
    p.add_argument("--eval-every", type=int, default=20, help="every N-th document goes to the held-out split")
    p.add_argument("--verify", action="store_true", help="only check an existing --out folder (sizes and sha256)")
    args = p.parse_args(argv)
    if not args.verify and not args.data:
        p.error("--data is required (the sources to tokenize)")
    try:
        if args.verify:
            prepared.load(args.out, seq_len=1, verify=True)
            print(f"{args.out}: sizes and sha256 match the manifest")
            return 0
        t0 = time.perf_counter()
        manifest = prepared.prepare(_with_progress(iter_documents(args.data)), load_tokenizer(args.tokenizer), args.out,
                                    tokenizer_path=args.tokenizer, eval_every=args.eval_every, sources=list(args.data))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    print(f"{args.out}: {manifest['splits']['train']['tokens']} train + {manifest['splits']['eval']['tokens']} held-out "
          f"tokens ({manifest['dtype']}) from {sum(s['documents'] for s in manifest['splits'].values())} documents in "
          f"{seconds:.1f} s ({tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
