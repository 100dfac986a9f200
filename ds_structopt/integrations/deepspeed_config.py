"""Reading a DeepSpeed JSON that names one of our optimizers, and checking it before anything starts.

A user's JSON keeps DeepSpeed's shape: ``"optimizer": {"type": "AdaDiag++",
"params": {...}}``. We take that block out (DeepSpeed only knows its own
optimizer names), validate it against the optimizer's options, check the
ZeRO settings we support, set ``zero_allow_untested_optimizer`` and return the
config DeepSpeed gets. Errors are one line naming the key and value.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from ..distributed.options import BLOCK, DistributedOptions
from ..optim.base import StructuredOptimizer
from ..optim.validation import UnknownOptionError

OUR_BLOCK = BLOCK
# DeepSpeed's own optimizer names (deepspeed/runtime/config.py), lower-case.
_DEEPSPEED_NAMES = ("adagrad", "adam", "adamw", "lamb", "onebitadam", "onebitlamb", "zerooneadam", "lion",
                    "muadam", "muadamw", "musgd", "muon", "cpu_adam", "fusedadam")


class ConfigError(ValueError):
    """A configuration problem, found before any process group or training starts."""


@dataclass
class StructOptConfig:
    ds_config: dict[str, Any]                     # what DeepSpeed receives
    optimizer_cls: Optional[type[StructuredOptimizer]]
    optimizer_type: Optional[str]
    options: dict[str, Any] = field(default_factory=dict)        # validated optimizer params
    dist_options: DistributedOptions = field(default_factory=DistributedOptions)  # the "ds_structopt" block


def load_config(config: Union[str, os.PathLike, Mapping[str, Any]]) -> dict[str, Any]:
    """A deep copy of the config dict, or the parsed JSON file."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = os.fspath(config)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object, got {type(data).__name__}")
    return data


def parse_config(config: Union[str, os.PathLike, Mapping[str, Any]]) -> StructOptConfig:
    """Split a user's DeepSpeed config into DeepSpeed's part and ours, validating ours."""
    from ..optim.registry import OPTIMIZERS

    cfg = load_config(config)
    dist_options = _take_offload_compute(cfg, _dist_options(cfg.pop(OUR_BLOCK, {})))
    block = cfg.get("optimizer")
    if block is None:
        return StructOptConfig(cfg, None, None, {}, dist_options)
    if not isinstance(block, Mapping):
        raise ConfigError(f"'optimizer' must be an object with 'type' and 'params', got {block!r}")
    unknown_keys = set(block) - {"type", "params"}
    if unknown_keys:
        raise ConfigError(f"optimizer: unknown key {sorted(unknown_keys)[0]!r} (expected 'type' and 'params')")
    if "type" not in block:
        raise ConfigError(f"optimizer.type is missing: name one of {sorted(OPTIMIZERS)} (or DeepSpeed's own)")
    opt_type = block["type"]
    if not isinstance(opt_type, str):
        raise ConfigError(f"optimizer.type must be a string naming an optimizer, got {opt_type!r}; "
                          f"ds_structopt provides {sorted(OPTIMIZERS)}")
    if opt_type not in OPTIMIZERS:
        if opt_type.lower() in _DEEPSPEED_NAMES or _is_torch_optimizer(opt_type):
            return StructOptConfig(cfg, None, opt_type, {}, dist_options)  # DeepSpeed's own: leave it alone
        close = difflib.get_close_matches(str(opt_type), list(OPTIMIZERS), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"optimizer.type: unknown optimizer {opt_type!r}{hint}; ds_structopt provides {sorted(OPTIMIZERS)}")
    params = block.get("params", {})
    if not isinstance(params, Mapping):
        raise ConfigError(f"optimizer.params must be an object, got {params!r}")
    cls = OPTIMIZERS[opt_type]
    try:
        cls.resolve_options(dict(params))
    except UnknownOptionError as exc:  # may be a fine key for another type: name the type too
        raise ConfigError(f"optimizer.params: unknown option {exc.option!r} for optimizer.type {opt_type!r}"
                          f"{exc.hint}") from None
    except ValueError as exc:
        raise ConfigError(f"optimizer.params: {exc}") from None
    _check_zero(cfg)
    _check_parallelism(cfg)
    if (cfg.get("zero_optimization") or {}).get("stage", 0) == 3 and params.get("relative_step"):
        raise ConfigError("optimizer.params.relative_step=true needs whole weights and is not supported with "
                          "zero_optimization.stage=3")
    del cfg["optimizer"]
    cfg["zero_allow_untested_optimizer"] = True
    if offload_device(cfg.get("zero_optimization") or {}) != "none":
        cfg["zero_force_ds_cpu_optimizer"] = False  # our optimizer steps the offloaded partitions itself
    options = dict(params)
    if isinstance(options.get("betas"), list):
        options["betas"] = tuple(options["betas"])
    return StructOptConfig(cfg, cls, opt_type, options, dist_options)


def _take_offload_compute(cfg: dict[str, Any], dist_options: DistributedOptions) -> DistributedOptions:
    """``offload_optimizer.compute`` ("device" or "host") is ours: DeepSpeed's config model
    refuses keys it does not know, so it is taken out here, whatever the optimizer block (its
    value is checked by ``DistributedOptions``; the rest of the block by ``_check_offload`` for
    our optimizers, by DeepSpeed for its own)."""
    zero = cfg.get("zero_optimization")
    if not isinstance(zero, dict):
        return dist_options
    if isinstance(zero.get("offload_param"), Mapping) and "compute" in zero["offload_param"]:
        raise ConfigError("zero_optimization.offload_param.compute: only offload_optimizer has a compute option")
    off = zero.get("offload_optimizer")
    if not isinstance(off, dict) or "compute" not in off:
        return dist_options
    if off.get("device", "none") in (None, "none"):
        raise ConfigError(f"zero_optimization.offload_optimizer.compute={off['compute']!r} needs device 'cpu' or 'nvme'")
    try:
        return dataclasses.replace(dist_options, offload_compute=off.pop("compute"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _dist_options(block: Any) -> DistributedOptions:
    try:
        return DistributedOptions.from_block(block)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_zero(cfg: Mapping[str, Any]) -> None:
    zero = cfg.get("zero_optimization", {}) or {}
    if not isinstance(zero, Mapping):
        raise ConfigError(f"zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for key in ("offload_optimizer", "offload_param"):
        _check_offload(key, zero.get(key), stage)


OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def offload_device(zero: Mapping[str, Any], key: str = "offload_optimizer") -> str:
    """``zero_optimization.<key>.device`` ("none" when absent)."""
    off = zero.get(key)
    device = off.get("device", "none") if isinstance(off, Mapping) else off
    return "none" if device is None else str(device)


def _check_offload(key: str, off: Any, stage: int) -> None:
    """ZeRO-Offload of DeepSpeed's partitions (and so of our state, which lives with them):
    ``offload_optimizer`` to the CPU at stages 1-3 or to NVMe at stage 3 (ZeRO-Infinity: our
    state in files of its own, ``distributed/state_store.py``), ``offload_param`` at stage 3."""
    if off is None:
        return
    if not isinstance(off, Mapping):
        raise ConfigError(f"zero_optimization.{key} must be an object like {{\"device\": \"cpu\"}}, got {off!r}")
    device = off.get("device", "none")  # ("compute", ours, was taken out by _take_offload_compute)
    if device in (None, "none"):
        return
    where = f"zero_optimization.{key}.device"
    if device not in OFFLOAD_DEVICES:
        raise ConfigError(f"{where} must be one of {list(OFFLOAD_DEVICES)}, got {device!r}")
    if device == "nvme":
        if stage != 3:
            raise ConfigError(f"{where}='nvme' needs zero_optimization.stage=3 (ZeRO-Infinity), got {stage!r}")
        if not off.get("nvme_path"):
            raise ConfigError(f"zero_optimization.{key}.nvme_path is required with device 'nvme' (a directory on "
                              "the NVMe drive)")
    if key == "offload_optimizer" and stage not in (1, 2, 3):
        raise ConfigError(f"{where}={device!r} needs zero_optimization.stage 1, 2 or 3, got {stage!r}")
    if key == "offload_param" and stage != 3:
        raise ConfigError(f"{where}={device!r} needs zero_optimization.stage=3, got {stage!r}")
    ratio = off.get("ratio", 1.0)
    if key == "offload_optimizer" and ratio != 1.0:
        raise ConfigError(f"zero_optimization.{key}.ratio={ratio!r}: partial offload needs DeepSpeedCPUAdam; "
                          "ds_structopt optimizers offload everything (ratio 1.0)")


def _check_parallelism(cfg: Mapping[str, Any]) -> None:
    """Our owners and messages span DeepSpeed's data-parallel group, which we take to be the whole
    world; layouts that split it further (sequence parallelism, hpZ's secondary partitions, MiCS
    shards) would send our messages to the wrong ranks, so they are refused up front."""
    zero = cfg.get("zero_optimization", {}) or {}
    checks = (("sequence_parallel_size", cfg.get("sequence_parallel_size"), (None, 1)),
              ("zero_optimization.zero_hpz_partition_size", zero.get("zero_hpz_partition_size"), (None, 1)),
              ("zero_optimization.mics_shard_size", zero.get("mics_shard_size"), (None, -1, 0)))
    for key, value, allowed in checks:
        if value not in allowed or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not supported with ds_structopt optimizers (their owners span "
                              "the whole data-parallel world); remove it")


def _is_torch_optimizer(name: str) -> bool:
    import torch.optim

    return isinstance(getattr(torch.optim, name, None), type)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m ds_structopt.integrations.deepspeed_config CONFIG.json``: check a config, exit 2 on error."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ds_structopt.integrations.deepspeed_config CONFIG.json", file=sys.stderr)
        return 2
    try:
        parsed = parse_config(args[0])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = parsed.optimizer_type or "no optimizer block"
    print(f"ok: {args[0]} ({what}; ZeRO stage {parsed.ds_config.get('zero_optimization', {}).get('stage', 0)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
