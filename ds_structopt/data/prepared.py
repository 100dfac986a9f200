"""Prepared token data: tokenize once to disk, memory-map at every start (issue 16, first part).

``prepare`` writes what ``packing.pack`` builds in memory, as files: per split (``train``,
``eval``: every ``eval_every``-th document held out, as ``pack`` does) the token stream with an
EOS after each document (``<split>.bin``, uint16 or uint32 by vocabulary size), the end offset
of every document (``<split>.docs.npy``), and ``manifest.json`` (tokenizer and its hash,
counts, sha256 of every file). ``load`` maps the streams with ``np.memmap`` (ranks on a node
share the page cache) and exposes the same rows as ``pack`` (windows of seq_len + 1, stride
seq_len) without materializing them: start-up time and resident memory do not grow with the
corpus. Files are written under a temporary name and renamed when complete; ``progress.json``
records the work so far every few seconds, so a killed preparation goes on where it stopped.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..checkpoint.state_io import sha256_file
from .packing import PackedData
from .sources import source_files
from .tokenizer import Tokenizer, token_dtype

FORMAT = "ds_structopt-tokens"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
SPLITS = ("train", "eval")


class PreparedDataError(ValueError):
    """A prepared dataset that cannot be used as it is (one line, naming the file)."""


def is_prepared(path: Union[str, os.PathLike]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def tokenizer_id(tokenizer: Tokenizer, path: Optional[str]) -> dict[str, Any]:
    """What identifies the tokenizer a dataset was made with: bytes, or the sha256 of its file(s)."""
    if path in (None, "", "bytes"):
        return {"kind": "bytes", "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "sha256": None}
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return {"kind": "file", "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "sha256": digest.hexdigest()}


def disk_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer_path: Optional[str]) -> None:
    global _worker_tokenizer
    from .tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode(tokenizer: Tokenizer, doc: str) -> np.ndarray:
    """A document's tokens and its EOS, in the on-disk dtype."""
    return np.asarray(tokenizer.encode(doc) + [tokenizer.eos_id], dtype=disk_dtype(tokenizer.vocab_size))


def _encode_batch(batch: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None
    return [_encode(_worker_tokenizer, doc) for doc in batch]


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded(docs: Iterable[str], tokenizer: Tokenizer, tokenizer_path: Optional[str], workers: int) -> Iterator[np.ndarray]:
    """Each document's tokens + EOS, in document order, from ``workers`` processes (batches of 64
    documents, results taken in submission order: the output does not depend on the number of
    workers)."""
    if workers <= 1:
        for doc in docs:
            yield _encode(tokenizer, doc)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    # a worker that dies raises BrokenProcessPool here (a Pool would restart it forever); at most
    # 4 batches per worker in flight, so memory stays bounded whatever the corpus size
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(tokenizer_path,)) as pool:
        pending: deque = deque()
        for batch in _batches(docs, 64):
            pending.append(pool.submit(_encode_batch, batch))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def describe_inputs(sources: Optional[Sequence[str]], tokenizer: Tokenizer, tokenizer_path: Optional[str],
                    eval_every: int) -> dict[str, Any]:
    """What a preparation is made from, cheaply (paths, sizes and mtimes of the source files, not
    their bytes): an unfinished preparation resumes only when this is unchanged."""
    files: list[list[Any]] = []
    for src in sources or []:
        p = Path(src)
        if not p.exists():
            files.append([str(src), sys.version.split()[0]])  # built-in corpora: fixed per Python
            continue
        for f in source_files(p):
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return {"files": files, "tokenizer": tokenizer_id(tokenizer, tokenizer_path), "eval_every": eval_every}


def resume_point(out_dir: Union[str, os.PathLike]) -> tuple[int, int]:
    """Documents and tokens an unfinished preparation in ``out_dir`` has recorded ((0, 0): none)."""
    path = Path(out_dir) / PROGRESS
    if not path.is_file() or (Path(out_dir) / MANIFEST).is_file():
        return 0, 0
    saved = json.loads(path.read_text())
    return saved["documents"], sum(saved["tokens"].values())


def _ends_to_npy(raw: Path, npy: Path, count: int) -> None:
    """The int64 document ends appended to ``raw`` during preparation, as a .npy file (copied in
    chunks: memory does not grow with the number of documents)."""
    tmp = npy.with_name(npy.name + ".tmp")
    if count == 0:
        with open(tmp, "wb") as f:
            np.save(f, np.zeros(0, dtype=np.int64))
    else:
        src = np.memmap(raw, dtype=np.int64, mode="r", shape=(count,))
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(count,))
        for a in range(0, count, 1 << 22):
            dst[a:a + (1 << 22)] = src[a:a + (1 << 22)]
        dst.flush()
        del dst, src
    os.replace(tmp, npy)


class _Resumable:
    """The open output of a preparation and its checkpoint (``progress.json``: documents done and
    the byte length of every partial file). A killed preparation restarts from its last
    checkpoint: files cut back to the recorded lengths, the documents already written skipped."""

    def __init__(self, out: Path, inputs: dict[str, Any], itemsize: int):
        self.out, self.inputs, self.itemsize = out, inputs, itemsize
        self.documents = 0
        self.tokens = {s: 0 for s in SPLITS}
        self.ends = {s: 0 for s in SPLITS}
        saved = self._saved()
        if saved is not None:
            self.documents, self.tokens, self.ends = saved["documents"], saved["tokens"], saved["ends"]
        self.bins, self.docs = {}, {}
        for s in SPLITS:
            self.bins[s] = self._open(out / f"{s}.bin.tmp", self.tokens[s] * itemsize, saved is not None)
            self.docs[s] = self._open(out / f"{s}.docs.tmp", self.ends[s] * 8, saved is not None)

    def _saved(self) -> Optional[dict[str, Any]]:
        path = self.out / PROGRESS
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("inputs") != self.inputs:
            raise PreparedDataError(f"{path}: an unfinished preparation of other inputs (sources, tokenizer or "
                                    "--eval-every differ): rerun it with its own inputs, or delete the folder")
        return saved

    @staticmethod
    def _open(path: Path, length: int, resuming: bool):
        if not resuming:
            return open(path, "wb")
        if not path.is_file() or path.stat().st_size < length:
            raise PreparedDataError(f"{path}: shorter than its last checkpoint says ({length} bytes); delete the folder "
                                    "and prepare again")
        os.truncate(path, length)
        return open(path, "ab")

    def write(self, split: str, ids: np.ndarray) -> None:
        """One document; the counters move only once both files took it (a checkpoint after a failed
        write records the state before it, and the partial bytes are cut on resume)."""
        end = self.tokens[split] + len(ids)
        self.bins[split].write(ids.tobytes())
        self.docs[split].write(np.int64(end).tobytes())
        self.tokens[split], self.ends[split], self.documents = end, self.ends[split] + 1, self.documents + 1

    def checkpoint(self) -> None:
        """Make everything written so far durable, then record it (the record never runs ahead of the data)."""
        for h in (*self.bins.values(), *self.docs.values()):
            h.flush()
            os.fsync(h.fileno())
        tmp = self.out / f"{PROGRESS}.tmp"
        tmp.write_text(json.dumps({"inputs": self.inputs, "documents": self.documents, "tokens": self.tokens,
                                   "ends": self.ends}))
        os.replace(tmp, self.out / PROGRESS)

    def close(self) -> None:
        for h in (*self.bins.values(), *self.docs.values()):
            h.close()


def prepare(docs: Iterable[str], tokenizer: Tokenizer, out_dir: Union[str, os.PathLike],
            tokenizer_path: Optional[str] = None, eval_every: int = 20,
            sources: Optional[list[str]] = None,
            progress: Optional[Callable[[int, int], None]] = None, workers: int = 1,
            checkpoint_every_s: float = 30.0) -> dict[str, Any]:
    """Tokenize ``docs`` into ``out_dir`` (see the module docstring); returns the manifest.
    ``progress(documents, tokens)`` is called after every document (it decides when to print).
    ``workers`` > 1 tokenizes in that many processes (each loads ``tokenizer_path``); the bytes
    written are the same for any number. Every ``checkpoint_every_s`` seconds the work so far is
    recorded: run again with the same inputs after a kill and it goes on from there (same bytes
    as an uninterrupted run). A folder that already holds these inputs' dataset is returned as it
    is; one that holds another dataset is refused, never overwritten."""
    if eval_every < 2:
        raise ValueError(f"eval_every must be >= 2, got {eval_every}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = disk_dtype(tokenizer.vocab_size)
    inputs = describe_inputs(sources, tokenizer, tokenizer_path, eval_every)
    if (out / MANIFEST).is_file():
        done = json.loads((out / MANIFEST).read_text())
        if done.get("inputs") == inputs:
            return done
        raise PreparedDataError(f"{out / MANIFEST}: --out already holds a prepared dataset of other inputs; "
                                "choose another folder or delete it")
    state = _Resumable(out, inputs, dtype.itemsize)
    skipped = state.documents
    last = time.monotonic()
    try:
        todo = itertools.islice(docs, skipped, None)
        for i, ids in enumerate(_encoded(todo, tokenizer, tokenizer_path, workers), skipped + 1):
            state.write("eval" if i % eval_every == 0 else "train", ids)
            if progress is not None:
                progress(i, state.tokens["train"] + state.tokens["eval"])
            if time.monotonic() - last >= checkpoint_every_s:
                state.checkpoint()
                last = time.monotonic()
    except BaseException:
        try:
            state.checkpoint()  # an error or Ctrl-C keeps what was done (a kill keeps the last checkpoint)
        finally:
            state.close()
        raise
    state.close()
    files: dict[str, Any] = {}
    for s in SPLITS:
        os.replace(out / f"{s}.bin.tmp", out / f"{s}.bin")
        _ends_to_npy(out / f"{s}.docs.tmp", out / f"{s}.docs.npy", state.ends[s])
        files[s] = {"tokens": state.tokens[s], "documents": state.ends[s], "bin": f"{s}.bin", "docs": f"{s}.docs.npy",
                    "sha256": {f"{s}.bin": sha256_file(out / f"{s}.bin"),
                               f"{s}.docs.npy": sha256_file(out / f"{s}.docs.npy")}}
    manifest = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "eval_every": eval_every,
                "tokenizer": inputs["tokenizer"], "splits": files, "sources": sources or [], "inputs": inputs}
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    for s in SPLITS:
        (out / f"{s}.docs.tmp").unlink()
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest


class TokenRows:
    """The rows of one split, ``(count, seq_len + 1)``, read from the memory-mapped stream on
    demand: ``rows[i]``, ``rows[index_tensor]``, ``rows[a:b]`` give tensors of the in-memory
    dtype (``token_dtype``), ``len(rows)`` and ``rows.shape`` as a tensor's."""

    def __init__(self, tokens: np.ndarray, seq_len: int, dtype: torch.dtype):
        self.tokens, self.seq_len, self.dtype = tokens, seq_len, dtype
        self.count = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.count, self.seq_len + 1))

    def _rows(self, index: np.ndarray) -> torch.Tensor:
        if len(index) and (index.min() < 0 or index.max() >= self.count):
            raise IndexError(f"row index out of range for {self.count} rows")
        offsets = index[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]
        return torch.from_numpy(self.tokens[offsets].astype(np.int64)).to(self.dtype)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, slice):
            return self._rows(np.arange(self.count)[key])
        if isinstance(key, torch.Tensor):
            return self._rows(key.reshape(-1).numpy().astype(np.int64)).reshape(*key.shape, self.seq_len + 1)
        if isinstance(key, int):
            return self._rows(np.asarray([key % self.count if key < 0 else key]))[0]
        return self._rows(np.asarray(key, dtype=np.int64))


def load(path: Union[str, os.PathLike], seq_len: int, tokenizer: Optional[Tokenizer] = None,
         tokenizer_path: Optional[str] = None, verify: bool = False) -> PackedData:
    """The prepared dataset at ``path`` as ``PackedData`` whose splits are ``TokenRows`` over
    memory maps. Refused in one line naming the file: another format or version, a tokenizer other
    than the one it was made with (when ``tokenizer`` is given), a file whose size does not match
    the manifest (truncated), or with ``verify`` a sha256 mismatch."""
    root = Path(path)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PreparedDataError(f"{root / MANIFEST}: not a readable manifest ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise PreparedDataError(f"{root / MANIFEST}: format {manifest.get('format')!r} version "
                                f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    made_with = manifest["tokenizer"]
    if tokenizer is not None:
        mine = tokenizer_id(tokenizer, tokenizer_path)
        if (mine["kind"], mine["vocab_size"], mine["eos_id"], mine["sha256"]) != \
                (made_with["kind"], made_with["vocab_size"], made_with["eos_id"], made_with["sha256"]):
            raise PreparedDataError(f"{root / MANIFEST}: prepared with another tokenizer ({made_with['kind']}, vocabulary "
                                    f"{made_with['vocab_size']}) than --tokenizer {tokenizer_path or 'bytes'} "
                                    f"({mine['kind']}, vocabulary {mine['vocab_size']}): prepare it again or pass that one")
    dtype = np.dtype(manifest["dtype"])
    splits = {}
    for s in SPLITS:
        entry = manifest["splits"][s]
        bin_path = root / entry["bin"]
        expected = entry["tokens"] * dtype.itemsize
        actual = bin_path.stat().st_size if bin_path.exists() else None
        if actual != expected:
            raise PreparedDataError(f"{bin_path}: {'missing' if actual is None else f'{actual} bytes'}, the manifest "
                                    f"says {expected} ({entry['tokens']} tokens): truncated or replaced; prepare it again")
        if verify:
            for name, digest in entry["sha256"].items():
                if sha256_file(root / name) != digest:
                    raise PreparedDataError(f"{root / name}: sha256 does not match the manifest: corrupted; prepare it again")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(entry["tokens"],)) if entry["tokens"] else \
            np.zeros(0, dtype=dtype)
        splits[s] = TokenRows(tokens, seq_len, token_dtype(made_with["vocab_size"]))
    if len(splits["train"]) == 0:
        raise PreparedDataError(f"{root}: not enough tokens for one training sequence of {seq_len + 1} tokens")
    return PackedData(splits["train"], splits["eval"], made_with["vocab_size"])
