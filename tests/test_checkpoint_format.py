"""The committed checkpoint fixtures (tests/data/checkpoint_v<N>/, made by
tests/data/make_checkpoint_fixture.py: a tiny 2-layer MLP, AdaDiag++ with update_freq 2, 3 steps on a
1-rank gloo group) keep the optimizer-state format honest:

- every fixture, of this format and of older ones, loads with the current code into a fresh optimizer
  and gives exactly (torch.equal) the state, masters and weights of the same deterministic run made
  now, and one more step from either is the same step;
- the fixture of the current FORMAT_VERSION has the header structure (keys, nesting, dtypes, shapes;
  not values) that the current writer produces, so a format change without a FORMAT_VERSION bump and
  a new fixture fails here, saying so.

The run happens in a subprocess (the optimizer needs a process group) with the environment the
fixture was made in: one thread, MKL_CBWR=COMPATIBLE and ATEN_CPU_CAPABILITY=default, so CPUs with
other vector units compute the same bits.
"""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ds_structopt.checkpoint import FORMAT_VERSION, SUBDIR, tensor_file

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(DATA))
from make_checkpoint_fixture import deterministic_env, fixture_dir  # noqa: E402

FIXTURES = sorted(DATA.glob("checkpoint_v*"), key=lambda p: int(p.name.removeprefix("checkpoint_v")))
REGENERATE = ".venv/bin/python tests/data/make_checkpoint_fixture.py"

WORKER = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import make_checkpoint_fixture as fx
from ds_structopt import checkpoint
from ds_structopt.checkpoint import tensor_file

def flat(tree, path=""):
    # every leaf by dotted path (tensors materialized; tuples as lists)
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{path}.{k}" if path else str(k)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(flat(v, f"{path}[{i}]"))
        return out
    if isinstance(tree, tensor_file.TensorRef):
        return {path: tree.read()}
    if isinstance(tree, torch.Tensor):
        return {path: tree.detach().cpu().clone()}
    return {path: tree}

def diff(got, want, only=None):
    bad = []
    for path in sorted(set(got) | set(want)):
        if only and not path.startswith(only):
            continue
        if path not in got or path not in want:
            bad.append(f"{path}: only in the {'run now' if path in want else 'loaded state'}")
            continue
        a, b = got[path], want[path]
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                    and a.shape == b.shape and torch.equal(a, b))
            if not same:
                what = f"{type(a).__name__} vs {type(b).__name__}"
                if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                    what = f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
                    if a.shape == b.shape:
                        what += f", max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
                bad.append(f"{path}: tensors differ ({what})")
        elif a != b:
            bad.append(f"{path}: {a!r} != {b!r}")
    return bad

def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

fx.init_group()
now_model, now = fx.trained()
checkpoint.save(now, sys.argv[3])                      # the current writer, for the header test
result = {}
for folder in sys.argv[4:]:
    now_model, now = fx.trained()                      # afresh: the step below moves it on
    model, opt = fx.build(seed=fx.SEED + 1)            # other initial weights: loading must replace them
    checkpoint.load(opt, folder)
    bad = diff(flat(checkpoint.local_state(opt)), flat(checkpoint.local_state(now)))
    bad += [f"weights {b}" for b in diff(weights(model), weights(now_model))]
    own = tensor_file.read(checkpoint.rank_file(folder, 0))
    if isinstance(own, dict) and own.get("version") == checkpoint.FORMAT_VERSION:  # the loader, bit for bit
        loaded = flat(checkpoint.local_state(opt))
        bad += [f"file {b}" for part in ("matrix_state", "elements", "masters")
                for b in diff(loaded, flat(own), only=part)]
    if not bad:                                        # and both continue with the same step
        gen = torch.Generator().manual_seed(123)
        x, y = torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)
        for m, o in ((model, opt), (now_model, now)):
            o.zero_grad()
            (m(x) - y).square().mean().backward()
            o.step()
        bad += [f"after one more step: {b}" for b in diff(weights(model), weights(now_model))]
    result[folder] = bad
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One subprocess: the deterministic run now, saved by the current writer, and every fixture loaded."""
    out = tmp_path_factory.mktemp("format") / "now"
    proc = subprocess.run([sys.executable, "-c", WORKER, str(HERE.parent), str(DATA), str(out),
                           *map(str, FIXTURES)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **deterministic_env(), "PYTHONPATH": str(HERE.parent)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return out, json.loads(line.removeprefix("RESULT "))


def test_a_fixture_exists_for_the_current_format():
    assert fixture_dir(FORMAT_VERSION).is_dir(), (
        f"no checkpoint fixture for FORMAT_VERSION {FORMAT_VERSION}: run {REGENERATE} (keep the older "
        "checkpoint_v* folders: they must still load)")
    files = [p for p in fixture_dir(FORMAT_VERSION).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20_000, "the fixture is meant to be tiny"


@pytest.mark.parametrize("folder", FIXTURES, ids=[p.name for p in FIXTURES])
def test_fixture_loads_to_the_state_of_the_same_run_now(worker, folder):
    _, result = worker
    bad = result[str(folder)]
    made = json.loads((folder / "provenance.json").read_text()) if (folder / "provenance.json").exists() else {}
    import torch

    note = (f" (fixture made with torch {made.get('torch')}, this is torch {torch.__version__}: different bits "
            "may come from torch itself)") if made.get("torch") not in (None, torch.__version__) else ""
    assert not bad, (
        f"{folder.name} loaded with the current code does not give the state of the same run made now{note}: "
        f"{'; '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. If the loader changed, checkpoints written in "
        f"this format no longer resume the same: fix it (or bump FORMAT_VERSION, keep reading the old files). "
        f"If only the optimizer's math changed on purpose, regenerate this fixture with {REGENERATE}.")


def structure(value, tensors):
    """A tensor file's header tree without values: dict keys and nesting, lists and tuples, leaf types,
    and every tensor as its dtype and shape. The param groups' hyperparameters are data (option names
    come and go with the optimizer; load_hyperparams takes whichever are saved): only their count."""
    if isinstance(value, list):
        return [structure(v, tensors) for v in value]
    if not isinstance(value, dict):
        return type(value).__name__
    if "__tensor__" in value:
        spec = tensors[value["__tensor__"]]
        return {"tensor": spec["dtype"], "shape": spec["shape"]}
    if "__dtype__" in value:
        return "dtype"
    if "__tuple__" in value:
        return {"tuple": [structure(v, tensors) for v in value["__tuple__"]]}
    if "__items__" in value:
        return {"items": [[structure(k, tensors), structure(v, tensors)] for k, v in value["__items__"]]}
    return {k: (f"{len(v)} groups" if k == "hyperparams" and isinstance(v, list) else structure(v, tensors))
            for k, v in value["__dict__"].items()}


def header(path):
    raw = path.read_bytes()
    magic = raw[: len(tensor_file.MAGIC)]
    (length,) = struct.unpack("<Q", raw[len(magic): len(magic) + 8])
    head = json.loads(raw[len(magic) + 8: len(magic) + 8 + length])
    return {"magic": magic.decode(), "keys": sorted(head), "tree": structure(head["tree"], head["tensors"])}


def first_difference(a, b, path="header"):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path}.{key} only in the {'fixture' if key in a else 'current writer'}"
            if (found := first_difference(a[key], b[key], f"{path}.{key}")) is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if (found := first_difference(x, y, f"{path}[{i}]")) is not None:
                return found
        return None
    return None if a == b else f"{path}: fixture {a!r}, current writer {b!r}"


def test_current_writer_has_the_fixtures_header_structure(worker):
    now, _ = worker
    folder = fixture_dir(FORMAT_VERSION)
    if not folder.is_dir():
        pytest.fail(f"no fixture for FORMAT_VERSION {FORMAT_VERSION}: run {REGENERATE}")
    names = sorted(p.name for p in (folder / SUBDIR).iterdir())
    assert sorted(p.name for p in (now / SUBDIR).iterdir()) == names
    meta_keys = [sorted(json.loads((d / SUBDIR / "meta.json").read_text())) for d in (folder, now)]
    found = None if meta_keys[0] == meta_keys[1] else f"meta.json keys: fixture {meta_keys[0]}, current {meta_keys[1]}"
    for name in names:
        if found is None and name.endswith(".tensors"):
            found = first_difference(header(folder / SUBDIR / name), header(now / SUBDIR / name), name)
    assert found is None, (
        f"the checkpoint format changed without a FORMAT_VERSION bump ({found}). Bump FORMAT_VERSION in "
        f"ds_structopt/checkpoint/__init__.py (keeping a reader for version {FORMAT_VERSION}), then run "
        f"{REGENERATE} to add tests/data/checkpoint_v{FORMAT_VERSION + 1}; keep checkpoint_v{FORMAT_VERSION}.")
    assert json.loads((folder / SUBDIR / "meta.json").read_text())["version"] == FORMAT_VERSION
