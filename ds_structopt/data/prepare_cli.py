"""``ds-structopt prepare-data``: tokenize sources once into a folder that training memory-maps."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from . import prepared
from .sources import count_documents, iter_documents
from .tokenizer import load_tokenizer


class Progress:
    """A line every ``every_s`` seconds: documents of the total, tokens, tokens/s and ETA (rates
    from this run: a resumed run does not count the documents it skipped as its own work)."""

    def __init__(self, total_documents: int = 0, start_documents: int = 0, start_tokens: int = 0,
                 every_s: float = 10.0):
        self.total, self.start_docs, self.start_tokens = total_documents, start_documents, start_tokens
        self.every_s, self.t0 = every_s, time.perf_counter()
        self.last = self.t0

    def __call__(self, documents: int, tokens: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.t0
        docs_per_s = (documents - self.start_docs) / elapsed
        of = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and docs_per_s > 0:
            eta = f", ETA {_duration(max(0.0, (self.total - documents) / docs_per_s))}"
        print(f"[prepare-data] {documents}{of} documents, {tokens / 1e6:.1f}M tokens, "
              f"{(tokens - self.start_tokens) / elapsed / 1e6:.2f}M tokens/s{eta}", flush=True)


def _duration(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ds-structopt prepare-data", description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=None, help="files, directories, .jsonl, .parquet, 'embedded', 'stdlib'")
    p.add_argument("--tokenizer", default=None, help="local tokenizer.json or tokenizer folder (default: bytes)")
    p.add_argument("--out", required=True, help="output folder (then: ds-structopt train --data <folder>)")
    p.add_argument("--eval-every", type=int, default=20, help="every N-th document goes to the held-out split")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokenizer processes (the output is the same for any number)")
    p.add_argument("--checkpoint-every", type=float, default=30.0, metavar="SECONDS",
                   help="record progress this often; a killed run, started again with the same arguments, goes on "
                        "from its last record")
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
        already = prepared.is_prepared(args.out)
        total = 0 if already else count_documents(args.data)
        start_docs, start_tokens = prepared.resume_point(args.out)
        if start_docs:
            print(f"[prepare-data] resuming at document {start_docs} of {total} (its last checkpoint)", flush=True)
        manifest = prepared.prepare(iter_documents(args.data), load_tokenizer(args.tokenizer), args.out,
                                    tokenizer_path=args.tokenizer, eval_every=args.eval_every, sources=list(args.data),
                                    progress=Progress(total, start_docs, start_tokens), workers=args.workers,
                                    checkpoint_every_s=args.checkpoint_every)
        if already:
            print(f"{args.out}: already prepared from these inputs; nothing to do")
            return 0
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
