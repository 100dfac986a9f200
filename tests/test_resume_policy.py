"""What may change between a checkpoint and --resume (ds_structopt/training/run_config.py): the rule
table field by field (fast, no processes), and once through the entry point under the deepspeed
launcher: a changed optimizer.params.weight_decay is refused in one line before anything is loaded,
a longer --steps is allowed with a warning and runs on."""
import copy
import json

import pytest

from ds_structopt.train import CONFIG_DIR, parse_args
from ds_structopt.training import checkpoints, run_config
from ds_structopt.training.run_config import ALLOW, REFUSE, RULES, SCHEDULE, ResumeMismatch, check, compare, describe

BASE_CONFIG = json.loads((CONFIG_DIR / "ds_tiny_adadiagpp_zero2.json").read_text())
MODEL = json.loads((CONFIG_DIR / "models" / "tiny.json").read_text())


def run(*argv, config=None, world=2, rows=1000, model=None):
    cfg = copy.deepcopy(BASE_CONFIG) if config is None else config
    return describe(parse_args(list(argv)), cfg, world, train_rows=rows, model_config=model or MODEL)


def edited(**changes):
    """The tiny config with dotted-path edits (value None: delete the key)."""
    cfg = copy.deepcopy(BASE_CONFIG)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return cfg


def refusal(saved, now):
    with pytest.raises(ResumeMismatch) as info:
        check(saved, now, step=10, folder="ckpt/step00000010")
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot resume from ckpt/step00000010: ")
    return message


def test_every_described_field_has_a_rule():
    assert set(run()) == set(RULES)
    assert {rule for rule, _ in RULES.values()} == {REFUSE, SCHEDULE, ALLOW}


def test_an_unchanged_run_passes_silently():
    assert check(run(), run(), step=10) == []
    assert compare(json.loads(json.dumps(run())), run()).refused == []  # as it reads back from run.json


REFUSED = [
    # (field named in the message, old value shown, new value shown, the changed run)
    ("model", '"tiny"', '"60m"', lambda: run("--model", "60m")),
    ("model_config.hidden_size", "128", "256", lambda: run(model={**MODEL, "hidden_size": 256})),
    ("optimizer.type", '"AdaDiag++"', '"AdaDiag"', lambda: run(config=edited(optimizer__type="AdaDiag"))),
    ("optimizer.params.weight_decay", "0.0", "0.1", lambda: run(config=edited(optimizer__params__weight_decay=0.1))),
    ("optimizer.params.lr", "0.003", "0.001", lambda: run(config=edited(optimizer__params__lr=1e-3))),
    ("optimizer.params.betas", "[0.9, 0.999]", "[0.9, 0.95]",
     lambda: run(config=edited(optimizer__params__betas=[0.9, 0.95]))),
    ("optimizer.params.update_freq", "20", "unset (default 200)", lambda: run(config=edited(optimizer__params__update_freq=None))),
    ("optimizer.params.eps", "unset (default 1e-08)", "1e-06", lambda: run(config=edited(optimizer__params__eps=1e-6))),
    ("scheduler", "unset", '{"type": "WarmupLR"}', lambda: run(config=edited(scheduler={"type": "WarmupLR"}))),
    ("zero_stage", "2", "3", lambda: run(config=edited(zero_optimization__stage=3))),
    ("precision", '"fp32"', '"bf16"', lambda: run(config=edited(bf16={"enabled": True}))),
    ("precision", '"fp32"', '"fp16"', lambda: run(config=edited(fp16={"enabled": True}))),
    ("train_batch_size", "16", "32", lambda: run(config=edited(train_batch_size=32))),
    ("seq_len", "128", "256", lambda: run("--seq-len", "256")),
    ("data", '["embedded"]', '["corpus.jsonl"]', lambda: run("--data", "corpus.jsonl")),
    ("tokenizer", "unset", '"tok.json"', lambda: run("--tokenizer", "tok.json")),
    ("train_rows", "1000", "999", lambda: run(rows=999)),
    ("seed", "0", "1", lambda: run("--seed", "1")),
]


@pytest.mark.parametrize("name,old,new,changed", REFUSED, ids=[f"{c[0]}->{c[2]}" for c in REFUSED])
def test_refused_change_is_one_line_naming_field_and_both_values(name, old, new, changed):
    message = refusal(run(), changed())
    assert f": {name} is {old} in the checkpoint, {new} in this run: " in message, message
    field = max((k for k in RULES if name == k or name.startswith(k + ".")), key=len)
    assert RULES[field][0] == REFUSE


def test_scheduler_params_are_named_by_path():
    sched = {"type": "WarmupCosineLR", "params": {"total_num_steps": 30, "warmup_num_steps": 5}}
    later = copy.deepcopy(sched)
    later["params"]["total_num_steps"] = 60
    message = refusal(run(config=edited(scheduler=sched)), run(config=edited(scheduler=later)))
    assert ": scheduler.params.total_num_steps is 30 in the checkpoint, 60 in this run: " in message


def test_first_refused_field_is_reported_and_the_others_named():
    message = refusal(run(), run("--seed", "3", "--seq-len", "64", config=edited(optimizer__params__weight_decay=0.1)))
    assert message.count(" in the checkpoint, ") == 1
    assert ": optimizer.params.weight_decay is 0.0" in message
    assert message.endswith("(also changed: seq_len, seed)")


def test_an_option_written_out_at_its_default_is_no_change():
    assert check(run(), run(config=edited(optimizer__params__eps=1e-8))) == []       # AdaDiag++'s default
    assert check(run(config=edited(optimizer__params__weight_decay=None)), run()) == []  # 0.0 is the default
    assert check(run(config=edited(optimizer__params__betas=(0.9, 0.999))), run()) == []  # tuple vs JSON list


def test_world_size_may_change_with_the_same_global_batch():
    # the tiny config fixes the global batch (16): DeepSpeed derives the accumulation at each world size
    assert check(run(world=2), run(world=4)) == []
    # a config that fixes micro batch and accumulation instead: the split may change, the product may not
    fixed = edited(train_batch_size=None, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    halved = edited(train_batch_size=None, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=4)
    assert run(config=fixed, world=2)["train_batch_size"] == 16
    assert check(run(config=fixed, world=2), run(config=halved, world=1)) == []
    message = refusal(run(config=fixed, world=2), run(config=fixed, world=1))
    assert ": train_batch_size is 16 in the checkpoint, 8 in this run: the global batch" in message


@pytest.mark.parametrize("argv", [["--eval-every", "7"], ["--save-every", "3"], ["--log-every", "1"],
                                  ["--keep-last", "5"], ["--output-dir", "elsewhere"], ["--eval-rows", "32"],
                                  ["--deepspeed_config", "/tmp/copy.json"]])
def test_bookkeeping_may_change_silently(argv):
    assert check(run(), run(*argv)) == []


def test_longer_steps_are_allowed_with_one_warning_line():
    warnings = check(run("--steps", "10"), run("--steps", "20"), step=10)
    assert len(warnings) == 1 and "\n" not in warnings[0] and warnings[0].startswith("warning: ")
    # --warmup 0.1 (a fraction) moves with --steps: 1 -> 2 warmup steps
    assert "steps 10 -> 20, warmup_steps 1 -> 2" in warnings[0]
    assert "stretched from step 10 on; the LR jumps from 0.1 to 0.628 x the base LR" in warnings[0]


@pytest.mark.parametrize("argv", [["--warmup", "5"], ["--min-lr-ratio", "0.0"]])
def test_other_schedule_arguments_warn_too(argv):
    (warning,) = check(run(), run(*argv), step=100)
    assert "schedule is stretched from step 100 on" in warning


def test_steps_change_is_silent_under_the_configs_own_scheduler():
    sched = edited(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 5}})
    assert check(run("--steps", "10", config=sched), run("--steps", "20", config=sched), step=10) == []


def test_checkpoint_without_run_json_resumes_with_a_warning(tmp_path):
    assert checkpoints.read_run(str(tmp_path)) is None
    (warning,) = check(checkpoints.read_run(str(tmp_path)), run(), folder=str(tmp_path))
    assert warning.startswith(f"warning: {tmp_path} has no run.json") and "could not be checked" in warning


def test_fields_unknown_to_either_side_are_not_judged():
    older = {k: v for k, v in run("--seed", "5").items() if k != "seed"}  # a release before "seed" was saved
    assert check(older, run()) == []
    newer = dict(run(), some_future_field=1)
    assert check(newer, run()) == []


def test_check_resume_reads_the_checkpoints_run_json(tmp_path):
    (tmp_path / checkpoints.RUN).write_text(json.dumps(run()))
    logged = []
    run_config.check_resume(str(tmp_path), run("--steps", "400"), rank=0, step=50, log=logged.append)
    assert len(logged) == 1 and "steps 300 -> 400" in logged[0]
    with pytest.raises(ResumeMismatch, match="seed is 0 in the checkpoint, 1 in this run"):
        run_config.check_resume(str(tmp_path), run("--seed", "1"), rank=0, step=50, log=logged.append)


# --- through the entry point -------------------------------------------------------------------


@pytest.mark.slow
def test_entry_point_refuses_a_changed_weight_decay_and_allows_longer_steps(tmp_path):
    from test_faults import run as launch

    out = tmp_path / "run"
    args = ("--eval-every", "100", "--save-every", "5", "--log-every", "5")
    code, log, _ = launch(out, *args, steps=10)
    assert code == 0, log[-3000:]
    ckpt = out / "checkpoints" / "step00000010"
    saved = json.loads((ckpt / "run.json").read_text())
    assert saved["optimizer.params"]["weight_decay"] == 0.0 and saved["steps"] == 10 and saved["world_size"] == 2
    assert "run.json" in json.loads((ckpt / "manifest.json").read_text())["files"]  # hashed with the rest

    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["optimizer"]["params"]["weight_decay"] = 0.1
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    code, log, _ = launch(out, *args, "--resume", steps=10, config=tmp_path / "ds.json")
    lines = [line for line in log.splitlines() if "optimizer.params.weight_decay" in line]
    assert code != 0 and lines, log[-3000:]
    assert "error: cannot resume from " in lines[0] and "is 0.0 in the checkpoint, 0.1 in this run" in lines[0]
    assert "resumed from" not in log
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000010"

    code, log, _ = launch(out, *args, "--resume", steps=20)
    assert code == 0, log[-3000:]
    warnings = [line for line in log.splitlines() if "warning: resuming with steps 10 -> 20" in line]
    assert len(warnings) == 1, log[-3000:]  # rank 0 only
    assert "resumed from" in log and "at step 10" in log
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000020"
    assert json.loads((out / "checkpoints" / "step00000020" / "run.json").read_text())["steps"] == 20
