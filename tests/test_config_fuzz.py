"""Config fuzzing: random edits of a DeepSpeed JSON (wrong types, missing/extra keys, out-of-range
values, unknown optimizer types) are either accepted and really usable, or rejected with ONE line
naming the key: an edited key that is really wrong (alone or with another edit), by its dotted path or its
own name as a whole word, not just a block above it (an edit of optimizer.params.betas is not named by
"optimizer ..."); never another exception type, never a traceback from deep inside, never a process group."""
import copy
import itertools
import json
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ds_structopt
from ds_structopt.distributed.options import DistributedOptions
from ds_structopt.integrations.deepspeed_config import OUR_BLOCK, ConfigError, parse_config

BASE = {"train_batch_size": 8, "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdaDiag++", "params": {"lr": 1e-3, "update_freq": 10}},
        OUR_BLOCK: {"ownership": "local"}}
OPTION_NAMES = sorted({k for cls in ds_structopt.OPTIMIZERS.values() for k in cls.DEFAULTS})
KEYS = st.sampled_from(OPTION_NAMES) | st.text(min_size=1, max_size=12)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
TYPES = st.sampled_from(sorted(ds_structopt.OPTIMIZERS) + ["Adam", "AdamW", "SGD", "Shampoo", "adadiag", ""]) | JSON

# (path to edit, value strategy); a value of DELETE removes the key
DELETE = object()
EDITS = st.one_of(
    st.tuples(st.just(("optimizer", "type")), TYPES | st.just(DELETE)),
    st.tuples(KEYS.map(lambda k: ("optimizer", "params", k)), JSON | st.just(DELETE)),
    st.tuples(st.just(("optimizer", "params")), JSON),
    st.tuples(st.just(("optimizer",)), JSON | st.just(DELETE)),
    st.tuples(st.text(min_size=1, max_size=8).map(lambda k: ("optimizer", k)), JSON),
    st.tuples(st.just(("zero_optimization", "stage")), JSON | st.just(DELETE)),
    st.tuples(st.just(("zero_optimization",)), JSON),
    st.tuples(st.sampled_from(["offload_optimizer", "offload_param"]).map(lambda k: ("zero_optimization", k)), JSON),
    st.tuples(st.sampled_from(list(DistributedOptions.keys()) + ["owner"]).map(
        lambda k: (OUR_BLOCK, k)), JSON | st.just(DELETE)),
    st.tuples(st.just((OUR_BLOCK,)), JSON),
)


def apply(config: dict, path: tuple, value) -> dict:
    node = config
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if value is DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = copy.deepcopy(value)  # a later edit inside it must not change the drawn value
    return config


MISSING = object()


def lookup(config: dict, path: tuple):
    """The value at `path`, or MISSING (absent, or under something that is not an object)."""
    node = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return MISSING
        node = node[key]
    return node


def invalid(config: dict) -> bool:
    try:
        parse_config(config)
    except ConfigError:
        return True
    return False


def culprits(edits: list) -> list[tuple]:
    """Paths of the edits the error may legitimately be about: those in a smallest set of edits whose
    values AS THEY END UP in the final config (an edit later overwritten, or replaced along with its
    block, counts as what is left of it) already make the base config invalid. A wrong value alone is
    its own set; a pair that is only wrong together (refresh_ahead_steps vs update_freq,
    relative_step at ZeRO-3) is one set of two."""
    final = copy.deepcopy(BASE)
    for path, value in edits:
        apply(final, path, value)
    paths = list(dict.fromkeys(path for path, _ in edits))
    bad_sets: list[frozenset] = []
    for size in range(1, len(paths) + 1):
        for subset in itertools.combinations(paths, size):
            if any(bad <= set(subset) for bad in bad_sets):
                continue  # not minimal
            config = copy.deepcopy(BASE)
            for path in sorted(subset, key=len):  # a block before the keys inside it
                value = lookup(final, path)
                if value is not MISSING:
                    apply(config, path, value)
                elif isinstance(lookup(config, path[:-1]), dict):
                    lookup(config, path[:-1]).pop(path[-1], None)
            if invalid(config):
                bad_sets.append(frozenset(subset))
    return [path for path in paths if any(path in bad for bad in bad_sets)]


# names the messages print bare (`lr must be ...`, `zero_optimization.stage must be ...`); any other key
# (random text) must appear as its repr, the way the messages quote unknown keys
KNOWN_NAMES = set(OPTION_NAMES) | {"optimizer", "type", "params", "zero_optimization", "stage", "offload_optimizer",
                                   "offload_param", "compute", OUR_BLOCK, *DistributedOptions.keys()}


def names(message: str, path: tuple) -> bool:
    """`message` names the edited key: its full dotted path (possibly followed by a key inside it, as in
    `optimizer.type` for a replaced `optimizer` block), or its last key: quoted as repr() quotes it, or
    bare if it is one of our option names; either as a whole word, not part of a longer name."""
    def whole(word: str) -> bool:
        return re.search(r"(?<![\w.])" + re.escape(word) + r"(?!\w)", message) is not None
    dotted = ".".join(str(k) for k in path)
    key = path[-1]
    return (all(k in KNOWN_NAMES for k in path) and whole(dotted)) or repr(key) in message or (
        key in KNOWN_NAMES and whole(key))


def usable(parsed) -> None:
    """An accepted config must give an optimizer that steps (and our block must be complete)."""
    assert isinstance(parsed.dist_options, DistributedOptions)
    assert set(DistributedOptions.keys()) == {"cost_model", "ownership", "ownership_group_size", "collective_timeout_s",
                                              "comm_dtype", "offload_stream_mib", "offload_compute",
                                              "offload_adam"}
    if parsed.optimizer_cls is None:
        return
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = parsed.optimizer_cls([w], **parsed.options)
    w.grad = torch.randn(6, 4)
    opt.step()
    assert torch.isfinite(w).all() or not all(isinstance(v, (int, float)) for v in [parsed.options.get("lr", 0)])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EDITS, min_size=1, max_size=3))
def test_random_configs_are_valid_or_one_line_errors_naming_the_key(edits):
    config = copy.deepcopy(BASE)
    for path, value in edits:
        apply(config, path, value)
    try:
        parsed = parse_config(config)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message, message
        wrong = culprits(edits)
        assert wrong, (message, edits)  # some edit (or pair) must make the config invalid on its own
        assert any(names(message, path) for path in wrong), (message, wrong, edits)
        return
    usable(parsed)


@pytest.mark.parametrize("bad", [
    {"optimizer": {"type": ["AdaDiag++"]}},
    {"optimizer": {"type": "AdaDiag++", "params": {"lr": "fast"}}},
    {"optimizer": {"type": "AdaDiag++", "params": {"betas": [0.9]}}},
    {"zero_optimization": {"stage": 7}, "optimizer": {"type": "ASGO", "params": {}}},
])
def test_initialize_refuses_before_any_process_group(bad, tmp_path):
    """The training entry point's path: ds_structopt.initialize fails on the config alone."""
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ConfigError) as info:
        ds_structopt.initialize(model=model, config=bad)
    assert "\n" not in str(info.value)
    assert not torch.distributed.is_initialized()


def test_config_checker_cli_exits_2_with_one_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdaDiag++", "params": {"update_freq": 0}}}))
    proc = subprocess.run([sys.executable, "-m", "ds_structopt.integrations.deepspeed_config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "update_freq" in proc.stderr
