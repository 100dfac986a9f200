"""What may change between a checkpoint and ``--resume``.

Each checkpoint of the entry point stores a description of its run (``run.json``: a plain dict
made by :func:`describe` from the command line, the DeepSpeed JSON as written and the world
size). At resume the new run's description is compared with it, field by field, by the one
rule table :data:`RULES`, before anything of the checkpoint is loaded:

- ``refuse``: the change cannot take effect, or would silently mix two runs. Optimizer type and
  params: the checkpoint restores the param groups' hyperparameters (as torch's
  ``load_state_dict`` does), so its values would silently win over the new JSON (Megatron
  likewise refuses a changed scheduler unless told to override). The DeepSpeed ``scheduler``
  block: DeepSpeed restores the scheduler's state, params included. The global batch, data,
  tokenizer, sequence length and seed: the saved sampler position means other rows under them.
  Model: the weights do not fit another one. ZeRO stage and bf16/fp16: DeepSpeed's files and our
  masters are laid out for them (a changed stage otherwise fails deep inside DeepSpeed).
- ``schedule``: ``--steps``, ``--warmup``, ``--min-lr-ratio`` shape the entry point's own
  warmup+cosine LR, which is recomputed every step: allowed, with a one-line warning that the
  LR jumps at the resume step (silently allowed when the config has its own scheduler).
- ``allow``: world size (our optimizer state reshards by name, the sampler shards the same
  global batches; the micro batch and gradient accumulation may change with it as long as the
  global batch does not), logging, eval, saving, rotation and the output folder.

Anything not described (gradient clipping, logging, ZeRO bucket sizes, the ``ds_structopt``
ownership block) takes effect from the resume step on and is not checked. The first refused
field is reported in one line naming the field, the checkpoint's value and the new one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from .schedule import warmup_steps

REFUSE, SCHEDULE, ALLOW = "refuse", "schedule", "allow"

# field -> (rule, why). Order matters: the first refused field is the one reported.
RULES: dict[str, tuple[str, str]] = {
    "model": (REFUSE, "the checkpoint's weights belong to that model"),
    "model_config": (REFUSE, "the checkpoint's weights belong to that architecture"),
    "optimizer.type": (REFUSE, "the saved optimizer state belongs to that optimizer"),
    "optimizer.params": (REFUSE, "the checkpoint restores the param groups' hyperparameters, so its value "
                                 "would silently win"),
    "scheduler": (REFUSE, "DeepSpeed restores the scheduler's saved state, so its values would silently win"),
    "zero_stage": (REFUSE, "the checkpoint's files are laid out for that ZeRO stage"),
    "precision": (REFUSE, "the checkpoint's weights and loss scaling are those of that mode"),
    "train_batch_size": (REFUSE, "the global batch (micro batch x gradient accumulation x world size) fixes the "
                                 "data order: the saved sampler position would mean other rows"),
    "seq_len": (REFUSE, "the saved sampler position would mean other rows"),
    "data": (REFUSE, "the saved sampler position would mean other rows"),
    "tokenizer": (REFUSE, "the saved sampler position would mean other rows, and the embeddings other tokens"),
    "train_rows": (REFUSE, "the data changed under the same names: the saved sampler position would mean "
                           "other rows"),
    "seed": (REFUSE, "the data order is drawn from it: the saved sampler position would mean other rows"),
    "steps": (SCHEDULE, "shapes the entry point's warmup+cosine LR"),
    "warmup_steps": (SCHEDULE, "shapes the entry point's warmup+cosine LR"),
    "min_lr_ratio": (SCHEDULE, "shapes the entry point's warmup+cosine LR"),
    "world_size": (ALLOW, "our optimizer state reshards by name; the sampler shards the same global batches"),
    "train_micro_batch_size_per_gpu": (ALLOW, "only how the same global batch is split"),
    "gradient_accumulation_steps": (ALLOW, "only how the same global batch is split"),
    "eval_every": (ALLOW, "reporting only"),
    "eval_rows": (ALLOW, "reporting only"),
    "save_every": (ALLOW, "checkpointing only"),
    "keep_last": (ALLOW, "checkpointing only"),
    "log_every": (ALLOW, "reporting only"),
    "output_dir": (ALLOW, "where the run lives (a moved folder resumes)"),
}


class ResumeMismatch(ValueError):
    """The new run's settings differ from the checkpoint's where they must not (one line)."""


@dataclass
class Verdict:
    refused: list[str] = field(default_factory=list)   # one line each, in RULES order
    warnings: list[str] = field(default_factory=list)  # at most one line


def describe(args: Any, ds_config: Mapping[str, Any], world_size: int, *, global_batch: Optional[int] = None,
             train_rows: Optional[int] = None, model_config: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The run as a plain JSON-able dict, one key per field of :data:`RULES`.

    ``args``: the entry point's parsed arguments; ``ds_config``: the DeepSpeed JSON as written
    (with our ``optimizer`` block); ``global_batch``: the engine's resolved ``train_batch_size``
    (else derived from the config as DeepSpeed does); ``train_rows``: packed training rows (a
    cheap fingerprint of data, tokenizer and sequence length); ``model_config``: the model JSON."""
    opt = ds_config.get("optimizer") or {}
    zero = ds_config.get("zero_optimization") or {}
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accum = ds_config.get("gradient_accumulation_steps")
    if global_batch is None:
        global_batch = ds_config.get("train_batch_size")
        if global_batch is None and micro is not None:
            global_batch = int(micro) * int(accum or 1) * world_size
    steps = int(args.steps)
    warmup = float(args.warmup)
    run = {
        "model": args.model,
        "model_config": dict(model_config) if model_config is not None else None,
        "optimizer.type": opt.get("type"),
        "optimizer.params": dict(opt.get("params") or {}),
        "scheduler": ds_config.get("scheduler"),
        "zero_stage": int(zero.get("stage", 0)),
        "precision": _precision(ds_config),
        "train_batch_size": global_batch,
        "seq_len": int(args.seq_len),
        "data": list(args.data),
        "tokenizer": args.tokenizer,
        "train_rows": train_rows,
        "seed": int(args.seed),
        "steps": steps,
        # as the entry point resolves it: a fraction of --steps moves with --steps
        "warmup_steps": warmup_steps(warmup, steps),
        "min_lr_ratio": float(args.min_lr_ratio),
        "world_size": int(world_size),
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "eval_every": args.eval_every,
        "eval_rows": args.eval_rows,
        "save_every": args.save_every,
        "keep_last": args.keep_last,
        "log_every": args.log_every,
        "output_dir": args.output_dir,
    }
    return _plain(run)


def compare(saved: Mapping[str, Any], now: Mapping[str, Any], step: Optional[int] = None) -> Verdict:
    """Judge ``now`` against the checkpoint's ``saved`` description by :data:`RULES`. Fields
    missing on either side (a description from another release) are not judged. ``step``: the
    checkpoint's step, for the LR figures of the schedule warning."""
    verdict = Verdict()
    now = _plain(now)
    schedule: list[str] = []
    for name, (rule, why) in RULES.items():
        if name not in saved or name not in now:
            continue
        for path, old, new in _diffs(name, saved[name], now[name], now.get("optimizer.type")):
            if rule == REFUSE:
                verdict.refused.append(f"{path} is {_show(old)} in the checkpoint, {_show(new)} in this run: {why}; "
                                       "keep the checkpoint's value or start a new run in another --output-dir")
            elif rule == SCHEDULE:
                schedule.append(f"{path} {_show(old)} -> {_show(new)}")
    if schedule and now.get("scheduler") is None:
        at = f"step {step}" if step is not None else "the resume step"
        lr = ""
        if step is not None and all(k in saved and k in now for k in ("steps", "warmup_steps", "min_lr_ratio")):
            from .schedule import warmup_cosine

            old = warmup_cosine(step, saved["steps"], saved["warmup_steps"], saved["min_lr_ratio"])
            new = warmup_cosine(step, now["steps"], now["warmup_steps"], now["min_lr_ratio"])
            lr = f"; the LR jumps from {old:.3g} to {new:.3g} x the base LR"
        verdict.warnings.append(f"warning: resuming with {', '.join(schedule)}: the entry point's warmup+cosine LR "
                                f"schedule is stretched from {at} on{lr}")
    return verdict


def check(saved: Optional[Mapping[str, Any]], now: Mapping[str, Any], step: Optional[int] = None,
          folder: str = "the checkpoint") -> list[str]:
    """Raise :class:`ResumeMismatch` (one line: the first refused field, then the names of any
    others) or return the warning lines. ``saved`` None: a checkpoint from before run.json."""
    if saved is None:
        return [f"warning: {folder} has no run.json (written by an older ds_structopt): this run's settings "
                "could not be checked against the checkpoint's"]
    verdict = compare(saved, now, step)
    if verdict.refused:
        more = [line.split(" is ", 1)[0] for line in verdict.refused[1:]]
        also = f" (also changed: {', '.join(more)})" if more else ""
        raise ResumeMismatch(f"cannot resume from {folder}: {verdict.refused[0]}{also}")
    return verdict.warnings


def check_resume(folder: str, now: Mapping[str, Any], rank: int = 0, step: Optional[int] = None,
                 log: Callable[[str], Any] = print) -> None:
    """:func:`check` on every rank with rank 0's reading of ``folder/run.json`` (collective when a
    process group is up, so all ranks refuse together); warnings are logged on rank 0."""
    import torch.distributed as dist

    from .checkpoints import read_run

    box = [read_run(folder) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    for line in check(box[0], now, step, folder):
        if rank == 0:
            log(line)


def _precision(cfg: Mapping[str, Any]) -> str:
    for mode, keys in (("bf16", ("bf16", "bfloat16")), ("fp16", ("fp16",))):
        if any(isinstance(cfg.get(k), Mapping) and cfg[k].get("enabled") is True for k in keys):
            return mode
    return "fp32"


def _plain(value: Any) -> Any:
    """As it reads back from JSON (tuples become lists), so a description compares with a saved one."""
    return json.loads(json.dumps(value))


def _diffs(path: str, old: Any, new: Any, opt_type: Optional[str]) -> list[tuple[str, Any, Any]]:
    """Differences as (dotted path, old, new), descending into objects; an option missing on one
    side of ``optimizer.params`` counts as the optimizer's default."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            missing = object()
            a, b = old.get(key, missing), new.get(key, missing)
            if path == "optimizer.params":
                a = _default(opt_type, key) if a is missing else a
                b = _default(opt_type, key) if b is missing else b
            out += _diffs(f"{path}.{key}", None if a is missing else a, None if b is missing else b, opt_type)
        return out
    a, b = (v.value if isinstance(v, _Default) else v for v in (old, new))
    return [] if a == b and type(a) is type(b) or _same_number(a, b) else [(path, old, new)]


@dataclass(frozen=True)
class _Default:
    """An option left out of ``optimizer.params``: its default stands in for it."""
    value: Any


def _same_number(a: Any, b: Any) -> bool:
    return (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
            and not isinstance(b, bool) and a == b)


def _default(opt_type: Optional[str], key: str) -> Any:
    """The default of option ``key`` of our optimizer ``opt_type`` (None: not ours, nothing known)."""
    from ..optim.registry import OPTIMIZERS

    cls = OPTIMIZERS.get(opt_type) if isinstance(opt_type, str) else None
    try:
        return _Default(_plain(cls.resolve_options({}).get(key))) if cls is not None else None
    except (ValueError, TypeError):
        return None


def _show(value: Any) -> str:
    if isinstance(value, _Default):
        return f"unset (default {json.dumps(value.value)})"
    return "unset" if value is None else json.dumps(value)


