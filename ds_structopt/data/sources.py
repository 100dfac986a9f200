"""Where training text comes from: local files, directories, .jsonl, parquet, or the built-in corpora.

Every source yields documents (strings) in a deterministic order, so every rank
and every restart sees the same corpus.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Union

TEXT_FIELD = "text"
EMBEDDED = "embedded"
STDLIB = "stdlib"
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


def iter_documents(paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]], text_field: str = TEXT_FIELD) -> Iterator[str]:
    """Documents from each path: "embedded", "stdlib", a text file, a .jsonl/.json-lines file, a
    .parquet file, or a directory (its files, recursively, in sorted order)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for raw in paths:
        if str(raw) == EMBEDDED:
            yield from embedded_documents()
            continue
        if str(raw) == STDLIB:
            yield from stdlib_documents()
            continue
        path = Path(raw)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                yield from _file_documents(child, text_field)
        elif path.is_file():
            yield from _file_documents(path, text_field)
        else:
            raise FileNotFoundError(f"data path not found: {path}")


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string '{text_field}' field")
                yield record[text_field]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ValueError(f"{path}: parquet file has no '{text_field}' column (columns: {table.column_names})")
        for value in table.column(text_field).to_pylist():
            if value:
                yield value
    elif suffix in _TEXT_SUFFIXES or suffix in (".py", ".html", ".csv", ".json"):
        yield path.read_text(encoding="utf-8", errors="replace")


# Standard-library modules whose docstrings join pydoc's topics in the embedded corpus (fixed list,
# so the corpus is the same on every machine with the same Python).
_DOC_MODULES = ("collections", "itertools", "functools", "pathlib", "json", "re", "string", "textwrap", "argparse",
                "logging", "unittest", "typing", "dataclasses", "datetime", "statistics", "fractions", "decimal",
                "heapq", "bisect", "contextlib", "shutil", "tempfile", "csv", "sqlite3", "email", "http.client")


def embedded_documents() -> Iterator[str]:
    """Python's own documentation: every pydoc topic, then docstrings of a fixed set of stdlib modules."""
    import importlib
    import inspect
    import warnings

    from pydoc_data import topics

    for key in sorted(topics.topics):
        yield topics.topics[key]
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(vars(module)):
            with warnings.catch_warnings():  # e.g. typing.re's deprecation on access
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = getattr(module, attr)
            if not attr.startswith("_") and getattr(obj, "__module__", None) == module.__name__:
                docs.append(inspect.getdoc(obj) or "")
        text = "\n\n".join(d for d in docs if d)
        if text:
            yield text


def stdlib_documents() -> Iterator[str]:
    """The Python standard library's own source files (~11 MB for CPython 3.11, tests and IDLE
    left out), sorted by path: a corpus large enough that a benchmark of a few million tokens
    does not repeat an epoch, on any machine with the same Python and no download."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if not skip.intersection(path.relative_to(root).parts):
            yield path.read_text(encoding="utf-8", errors="replace")
