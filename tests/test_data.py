"""Data pipeline: sources (text, directory, jsonl, parquet, embedded), tokenizers, packing, sampler."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ds_structopt.data.packing import pack
from ds_structopt.data.sampler import ShardedBatchSampler
from ds_structopt.data.sources import embedded_documents, iter_documents
from ds_structopt.data.tokenizer import ByteTokenizer, load_tokenizer


def test_sources_text_dir_jsonl_parquet(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.txt").write_text("first")
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "j1"}) + "\n\n" + json.dumps({"text": "j2", "id": 3}) + "\n")
    pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), tmp_path / "y.parquet")
    docs = list(iter_documents([tmp_path / "d", tmp_path / "x.jsonl", tmp_path / "y.parquet"]))
    assert docs == ["first", "second", "j1", "j2", "p1", "p2"]


@pytest.mark.parametrize("content,message", [("{not json}\n", "x.jsonl:1: not valid JSON"),
                                             (json.dumps({"body": "no text"}) + "\n", "string 'text' field")])
def test_bad_jsonl_is_named(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        list(iter_documents(tmp_path / "x.jsonl"))
    with pytest.raises(FileNotFoundError, match="data path not found"):
        list(iter_documents(tmp_path / "missing.txt"))


def test_embedded_corpus_is_deterministic_and_large():
    docs = list(embedded_documents())
    assert docs == list(iter_documents("embedded"))
    assert sum(len(d) for d in docs) > 500_000  # pydoc topics + stdlib docstrings


def test_byte_tokenizer_and_local_tokenizer_file(tmp_path):
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and tok.decode(tok.encode("héllo")) == "héllo"
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.WordLevel(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(["the cat sat", "the dog sat"], trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    local = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert local.eos_id == hf.token_to_id("</s>") and local.encode("the cat") == hf.encode("the cat").ids
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_packing_windows_and_disjoint_split():
    docs = [f"document number {i} " * 5 for i in range(40)]
    data = pack(docs, ByteTokenizer(), seq_len=16, eval_every=10)
    assert data.train.shape[1] == 17 and data.eval.shape[1] == 17 and len(data.eval) > 0
    # consecutive windows overlap by exactly one token (labels continue the inputs)
    assert torch.equal(data.train[0, -1], data.train[1, 0])
    train_text = ByteTokenizer().decode(data.train[:, :-1].flatten().tolist())
    assert "document number 9 " not in train_text and "document number 8 " in train_text


def test_sampler_shards_cover_the_global_batch_and_resume_exactly():
    rows, batch = 50, 8
    samplers = [ShardedBatchSampler(rows, batch, world_size=2, rank=r, seed=3) for r in range(2)]
    single = ShardedBatchSampler(rows, batch, seed=3)
    for _ in range(15):  # crosses epoch boundaries (6 batches per epoch)
        merged = torch.cat([s.next_indices() for s in samplers])
        assert torch.equal(merged, single.next_indices())
    state = samplers[0].state_dict()
    expected = [samplers[0].next_indices() for _ in range(5)]
    resumed = ShardedBatchSampler(rows, batch, world_size=2, rank=0, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_indices()) for a in expected)
    with pytest.raises(ValueError, match="seed=3"):
        ShardedBatchSampler(rows, batch, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of the world size"):
        ShardedBatchSampler(rows, 7, world_size=2)
