"""Prepared token data (`ds-structopt prepare-data`, data/prepared.py): the same rows as the
in-memory pipeline, deterministic bytes, one-line refusals naming the file, and training from a
prepared folder."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_structopt.cli import main as cli
from ds_structopt.data import prepared
from ds_structopt.data.corpus import load_corpus
from ds_structopt.data.packing import pack
from ds_structopt.data.sources import iter_documents
from ds_structopt.data.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    assert cli(["prepare-data", "--data", "embedded", "--out", str(out), "--workers", "2"]) == 0
    return out


@pytest.mark.parametrize("seq_len", [1, 32, 128, 1000])
def test_prepared_rows_equal_the_in_memory_rows(folder, seq_len):
    ref = pack(iter_documents(["embedded"]), ByteTokenizer(), seq_len)
    got = load_corpus([str(folder)], None, seq_len)
    assert got.vocab_size == ref.vocab_size and got.seq_len == ref.seq_len == seq_len
    for split in ("train", "eval"):
        mine, theirs = getattr(got, split), getattr(ref, split)
        assert len(mine) == len(theirs) and mine.shape == theirs.shape
        assert torch.equal(mine[:], theirs) and mine[:].dtype == theirs.dtype
    picks = torch.tensor([[0, 5], [len(ref.train) - 1, 3]])
    assert torch.equal(got.train[picks], ref.train[picks])  # the sampler's index tensors
    assert torch.equal(got.train[7], ref.train[7]) and torch.equal(got.train[-1], ref.train[-1])
    assert torch.equal(got.train[: 9], ref.train[: 9])


def test_the_same_inputs_give_the_same_bytes_with_any_number_of_workers(folder, tmp_path):
    """``folder`` was made with 2 tokenizer processes (the CLI's default here), this one with 1."""
    assert cli(["prepare-data", "--data", "embedded", "--out", str(tmp_path), "--workers", "1"]) == 0
    for name in ("train.bin", "eval.bin", "train.docs.npy", "eval.docs.npy", "manifest.json"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["kind"] == "bytes"
    docs = sum(1 for _ in iter_documents(["embedded"]))
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["eval"]["documents"] == docs


def test_a_truncated_or_corrupted_file_and_another_tokenizer_are_refused_naming_the_file(folder, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = (bad / "train.bin").read_bytes()
    (bad / "train.bin").write_bytes(data[:-2])
    with pytest.raises(prepared.PreparedDataError, match=r"train\.bin: \d+ bytes, the manifest says \d+ .*truncated"):
        load_corpus([str(bad)], None, 32)
    (bad / "train.bin").write_bytes(data[:-2] + b"\x07\x00")  # right size, wrong token
    load_corpus([str(bad)], None, 32)  # sizes are checked at every start; checksums on demand
    assert cli(["prepare-data", "--out", str(bad), "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.bin: sha256 does not match the manifest" in err and "\n" not in err
    tok = tmp_path / "tokenizer.json"
    _write_tokenizer(tok)
    with pytest.raises(prepared.PreparedDataError, match="prepared with another tokenizer"):
        load_corpus([str(folder)], str(tok), 32)
    with pytest.raises(ValueError, match="is a prepared dataset: give it alone"):
        load_corpus([str(folder), "embedded"], None, 32)


def _write_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"</s>": 0, "[UNK]": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.mark.slow
def test_training_from_a_prepared_folder_equals_training_from_the_raw_source(folder, tmp_path):
    """The entry point on 1 rank, 6 steps: same losses from the prepared folder as from 'embedded'."""
    losses = {}
    for name, data in (("raw", "embedded"), ("prepared", str(folder))):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                               "-m", "ds_structopt.train", "--data", data, "--steps", "6", "--eval-every", "3",
                               "--log-every", "1", "--save-every", "6", "--output-dir", str(out), "--seq-len", "64",
                               "--deepspeed_config", str(ROOT / "configs" / "ds_tiny_adadiagpp_zero2.json")],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        losses[name] = (out / "metrics.csv").read_text().splitlines()[1:]
    strip = [[",".join(f for i, f in enumerate(r.split(",")) if i not in (4, 5, 11, 12, 13, 14)) for r in rows]
             for rows in losses.values()]  # drop seconds, tokens/s, RSS, fds: the rest must be equal
    assert strip[0] == strip[1]


@pytest.mark.slow
def test_a_run_killed_while_training_from_a_prepared_folder_resumes_bit_identical(folder, tmp_path, monkeypatch):
    """2 ranks under the deepspeed launcher read the memory-mapped folder; rank 1 killed at step 20,
    resumed from the step-15 checkpoint: the final weights equal the uninterrupted run's exactly."""
    from test_train import killed_and_resumed_equals_uninterrupted

    killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, "--data", str(folder))


def test_large_raw_sources_get_a_warning_to_prepare_them(tmp_path, capsys, monkeypatch):
    from ds_structopt.data import corpus

    text = tmp_path / "corpus.txt"
    text.write_text("hello world. " * 2000)
    monkeypatch.setattr(corpus, "PREPARE_ABOVE_BYTES", 10_000)
    load_corpus([str(text)], None, 16)
    out = capsys.readouterr().out
    assert "warning: --data holds" in out and "ds-structopt prepare-data" in out
    monkeypatch.setattr(corpus, "PREPARE_ABOVE_BYTES", 100_000)
    load_corpus([str(text)], None, 16)
    assert "warning" not in capsys.readouterr().out


def test_preparation_prints_tokens_per_second_and_an_eta(capsys, monkeypatch):
    from ds_structopt.data import prepare_cli
    from ds_structopt.data.prepare_cli import Progress

    clock = iter([100.0, 110.0])  # start, first report
    monkeypatch.setattr(prepare_cli.time, "perf_counter", lambda: next(clock))
    tick = Progress(total_documents=50, start_documents=10, start_tokens=1_000_000, every_s=0.0)
    tick(30, 3_000_000)  # 20 documents and 2M tokens in 10 s: 20 documents left take 10 s
    assert capsys.readouterr().out == "[prepare-data] 30/50 documents, 3.0M tokens, 0.20M tokens/s, ETA 0:00:10\n"
    monkeypatch.undo()
    quiet = Progress(every_s=3600.0)
    quiet(3, 2_000_000)
    assert capsys.readouterr().out == ""


def _bpe_tokenizer(path, vocab_size=2000):
    """A byte-level BPE trained here on the embedded corpus (a real fast tokenizer, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(iter_documents(["embedded"]), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "</s>"], show_progress=False))
    tok.save(str(path))
    return path


def _prepare_cmd(out, *extra):
    return [sys.executable, "-m", "ds_structopt.cli", "prepare-data", "--out", str(out), *extra]


@pytest.mark.slow
def test_a_killed_preparation_resumes_to_the_same_bytes(tmp_path):
    """stdlib sources with a BPE tokenizer in 2 processes (~5 s), killed with SIGKILL after its
    first checkpoints, then started again with the same arguments: the folder's bytes equal an
    uninterrupted run's. Other inputs into the unfinished or the finished folder are refused in one
    line naming the file; the same inputs into the finished folder change nothing."""
    import os
    import signal
    import time

    tok = _bpe_tokenizer(tmp_path / "tokenizer.json")
    args = ("--data", "stdlib", "--tokenizer", str(tok), "--workers", "2", "--checkpoint-every", "0.3")
    whole = tmp_path / "whole"
    subprocess.run(_prepare_cmd(whole, *args), check=True, capture_output=True, timeout=600, cwd=ROOT)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_prepare_cmd(cut, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and prepared.resume_point(cut)[0] < 100:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its tokenizer processes
    proc.wait()
    assert not (cut / "manifest.json").exists(), "finished before it could be killed"
    recorded = prepared.resume_point(cut)[0]
    assert recorded >= 100
    other = subprocess.run(_prepare_cmd(cut, *args, "--eval-every", "10"), capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    assert other.returncode == 2
    assert other.stderr.strip().endswith("progress.json: an unfinished preparation of other inputs (sources, "
                                         "tokenizer or --eval-every differ): rerun it with its own inputs, or "
                                         "delete the folder")
    again = subprocess.run(_prepare_cmd(cut, *args), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming at document {recorded} of " in again.stdout
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in whole.iterdir())
    for name in ("train.bin", "eval.bin", "train.docs.npy", "eval.docs.npy", "manifest.json"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
    same = subprocess.run(_prepare_cmd(cut, *args), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert same.returncode == 0 and "already prepared from these inputs; nothing to do" in same.stdout
    other = subprocess.run(_prepare_cmd(cut, *args, "--eval-every", "10"), capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    assert other.returncode == 2 and other.stderr.strip().endswith(
        "manifest.json: --out already holds a prepared dataset of other inputs; choose another folder or delete it")
    assert (cut / "train.bin").read_bytes() == (whole / "train.bin").read_bytes()


def test_a_saved_hugging_face_dataset_is_a_source(tmp_path):
    """Folders written by ``datasets``' own save_to_disk (a Dataset in several Arrow shards, and a
    DatasetDict: its train split) give the same documents as the dataset's text column, empty ones
    skipped as for parquet, and prepare to the same rows as the same texts in a .jsonl file."""
    datasets = pytest.importorskip("datasets")
    texts = [d for d in iter_documents(["embedded"])] + ["", "last one"]
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    ds.save_to_disk(str(tmp_path / "ds"), max_shard_size="100KB")
    assert len(list((tmp_path / "ds").glob("*.arrow"))) > 1
    datasets.DatasetDict({"validation": ds.select([0]), "train": ds}).save_to_disk(str(tmp_path / "dd"))
    want = [t for t in texts if t]
    assert list(iter_documents([tmp_path / "ds"])) == want
    assert list(iter_documents([tmp_path / "dd"])) == want
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for src in ("ds", "jsonl"):
        assert cli(["prepare-data", "--data", str(jsonl if src == "jsonl" else tmp_path / "ds"),
                    "--out", str(tmp_path / f"prep-{src}"), "--workers", "1"]) == 0
    for name in ("train.bin", "eval.bin", "train.docs.npy", "eval.docs.npy"):
        assert (tmp_path / "prep-ds" / name).read_bytes() == (tmp_path / "prep-jsonl" / name).read_bytes(), name
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "novalid"))
    with pytest.raises(ValueError, match=r"novalid: a saved DatasetDict without a 'train' split \(splits: "
                                         r"\['validation'\]\); pass the split's folder"):
        list(iter_documents([tmp_path / "novalid"]))


def test_megatron_indexed_dataset_written_by_megatron_core_reads_back_the_same_tokens(tmp_path):
    """Files from megatron-core's own IndexedDatasetBuilder (several sequences per document) read
    through ``--data <prefix>``: the token stream equals megatron-core's own reader's, train and
    held-out split by document (the last 1 in 20), rows as the in-memory windows of those streams;
    a truncated .bin is refused naming it."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from ds_structopt.data.packing import _windows

    prefix = str(tmp_path / "corpus_text_document")
    gen = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(60):
        for _ in range(int(gen.integers(1, 4))):
            builder.add_item(torch.from_numpy(gen.integers(0, 257, int(gen.integers(5, 90))).astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    theirs = IndexedDataset(prefix)
    stream = np.concatenate([np.asarray(theirs[i]) for i in range(len(theirs))]).astype(np.int64)
    docs = theirs.document_indices
    cut = sum(len(theirs[i]) for i in range(docs[57]))  # 60 documents: the last 3 held out
    for path in (prefix, prefix + ".bin"):
        got = load_corpus([path], None, 32)
        assert torch.equal(got.train[:].long(), _windows(torch.from_numpy(stream[:cut]), 32))
        assert torch.equal(got.eval[:].long(), _windows(torch.from_numpy(stream[cut:]), 32))
    data = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(data[:-4])
    with pytest.raises(prepared.PreparedDataError, match=r"corpus_text_document\.bin: \d+ bytes, .*truncated"):
        load_corpus([prefix], None, 32)


START = """
import resource, sys
from ds_structopt.data.corpus import load_corpus
from ds_structopt.data.sampler import ShardedBatchSampler
data = load_corpus([sys.argv[1]], None, 256)
rows = data.train[ShardedBatchSampler(len(data.train), 512, 8, 3, seed=0).next_indices()]
assert rows.shape == (64, 257)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_start_up_memory_does_not_grow_with_the_prepared_corpus(tmp_path):
    """10M vs 100M prepared tokens: a rank's peak RSS after loading and taking its first batch
    differs by < 64 MB (measured: 229 vs 232 MB; the same 10M tokens as raw text: 472 MB)."""
    import random

    def docs(n_tokens):
        rnd, made = random.Random(0), 0
        words = ["alpha", "beta", "gamma", "delta", "optimizer", "matrix", "rotation", "basis"]
        while made < n_tokens:
            doc = " ".join(rnd.choice(words) for _ in range(1400))
            made += len(doc) + 1
            yield doc

    peaks = {}
    for size in (10_000_000, 100_000_000):
        out = tmp_path / str(size)
        manifest = prepared.prepare(docs(size), ByteTokenizer(), out)
        assert manifest["splits"]["train"]["tokens"] + manifest["splits"]["eval"]["tokens"] >= size
        proc = subprocess.run([sys.executable, "-c", START, str(out)], capture_output=True, text=True, timeout=300,
                              cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[size] = int(proc.stdout.split()[-1]) / 1024
    assert abs(peaks[100_000_000] - peaks[10_000_000]) < 64, peaks
