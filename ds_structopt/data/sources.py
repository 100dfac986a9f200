"""Where training text comes from: local files, directories, .jsonl, parquet, a Hugging Face
``datasets`` dataset saved to disk, or the built-in corpora.

Every source yields documents (strings) in a deterministic order, so every rank
and every restart sees the same corpus.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

TEXT_FIELD = "text"
EMBEDDED = "embedded"
STDLIB = "stdlib"
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


def iter_documents(paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]], text_field: str = TEXT_FIELD) -> Iterator[str]:
    """Documents from each path: "embedded", "stdlib", a text file, a .jsonl/.json-lines file, a
    .parquet file, a folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict``: its
    "train" split), or a directory (its files, recursively, in sorted order). Empty documents
    are skipped, whatever the format."""
    return (doc for doc in _documents(paths, text_field) if doc)


def _documents(paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]], text_field: str = TEXT_FIELD) -> Iterator[str]:
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
        if hf_saved_dataset(path) is not None:
            yield from _hf_documents(path, text_field)
        elif path.is_dir():
            for child in source_files(path):
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

        source = pq.ParquetFile(path)
        if text_field not in source.schema_arrow.names:
            raise ValueError(f"{path}: parquet file has no '{text_field}' column (columns: {source.schema_arrow.names})")
        for batch in source.iter_batches(columns=[text_field]):  # batch by batch: memory stays flat
            yield from batch.column(0).to_pylist()
    elif _is_text(suffix):
        yield path.read_text(encoding="utf-8", errors="replace")


def source_files(path: Path) -> list[Path]:
    """The files behind a source path: itself, or a directory's files recursively in sorted order."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _is_text(suffix: str) -> bool:
    """Files read whole as one document."""
    return suffix in _TEXT_SUFFIXES or suffix in (".py", ".html", ".csv", ".json")


def hf_saved_dataset(path: Path) -> Optional[Path]:
    """The folder of the ``Dataset`` that ``save_to_disk`` wrote at ``path`` (for a ``DatasetDict``,
    its "train" split), or None when ``path`` is not such a folder."""
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return path
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise ValueError(f"{path}: a saved DatasetDict without a 'train' split (splits: {splits}); "
                             f"pass the split's folder, e.g. {path}/{splits[0] if splits else '<split>'}")
        return path / "train"
    return None


def _hf_arrow_files(path: Path) -> list[Path]:
    folder = hf_saved_dataset(path)
    assert folder is not None
    state = json.loads((folder / "state.json").read_text())
    if state.get("_indices_data_files"):  # older datasets versions could save an indices mapping
        raise ValueError(f"{folder}: saved with an indices mapping; save it again after .flatten_indices()")
    return [folder / f["filename"] for f in state["_data_files"]]


def _hf_documents(path: Path, text_field: str) -> Iterator[str]:
    """The text column of a saved dataset, read from its Arrow stream files batch by batch (memory
    mapped: memory does not grow with the dataset; ``datasets`` itself is not needed)."""
    import pyarrow as pa

    for arrow in _hf_arrow_files(path):
        with pa.memory_map(str(arrow)) as source:
            reader = pa.ipc.open_stream(source)
            if text_field not in reader.schema.names:
                raise ValueError(f"{arrow}: no '{text_field}' column (columns: {reader.schema.names})")
            for batch in reader:
                yield from batch.column(text_field).to_pylist()


def count_documents(paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]], text_field: str = TEXT_FIELD) -> int:
    """How many documents ``iter_documents`` will yield, read cheaply where the format allows
    (row counts from metadata, lines of .jsonl) for a progress ETA; a few formats count rows that
    are then skipped as empty, so it is an upper bound."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    total = 0
    for raw in paths:
        path = Path(raw)
        if str(raw) in (EMBEDDED, STDLIB):
            total += sum(1 for _ in iter_documents([raw]))
        elif hf_saved_dataset(path) is not None:
            import pyarrow as pa

            for arrow in _hf_arrow_files(path):
                with pa.memory_map(str(arrow)) as source:
                    total += sum(batch.num_rows for batch in pa.ipc.open_stream(source))
        else:
            for f in source_files(path):
                suffix = f.suffix.lower()
                if suffix in (".jsonl", ".ndjson"):
                    with open(f, "rb") as fh:
                        total += sum(1 for line in fh if line.strip())
                elif suffix == ".parquet":
                    import pyarrow.parquet as pq

                    total += pq.ParquetFile(f).metadata.num_rows
                elif _is_text(suffix):
                    total += 1
    return total


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
