"""How the distributed layer places and exchanges work: the ``"ds_structopt"`` block of a
config, as one typed, frozen value validated once."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping, Optional, get_args

from .ownership import COST_MODELS

BLOCK = "ds_structopt"
CostModel = Literal["flops", "memory", "numel"]
Ownership = Literal["local", "balanced"]
CommDtype = Literal["fp32", "bf16"]
OffloadCompute = Literal["device", "host"]
OffloadAdam = Literal["deepspeed", "torch"]
assert get_args(CostModel) == COST_MODELS


# options a DeepSpeed config sets beside DeepSpeed's own keys for the same thing
_SET_ELSEWHERE = {"offload_compute": "zero_optimization.offload_optimizer.compute"}


@dataclass(frozen=True)
class DistributedOptions:
    """``cost_model``: what ownership balances (the family's flops, state memory, or elements);
    ``ownership``: "local" keeps a matrix with the rank holding most of it (under a 1.1x load
    cap, or the balanced plan's maximum where that is higher), "balanced" packs for the lowest
    maximum load (better of LPT and a MULTIFIT-style search); ``ownership_group_size``: ranks per owner group (a node), None
    for one group; ``collective_timeout_s``: the process group's timeout (a hung rank fails the
    job after this long); ``comm_dtype``: the dtype of the gradient pieces and update slices our
    step sends: "fp32" (default: the same updates as one process, to round-off) or "bf16" (half
    the bytes; gradients and updates rounded to bf16 on the wire, applied alike on every rank);
    ``offload_stream_mib``: under ``offload_optimizer``, the MiB of owned state moved to the GPU
    (and read from NVMe) per chunk while the previous chunk computes (``state_stream.py``): about
    three chunks are in GPU memory at once; ``offload_compute``: where an owner's math runs under
    ``offload_optimizer`` (cpu or nvme): "device" (the state streamed to the GPU) or "host" (on the CPU,
    beside the state, as DeepSpeed's CPU Adam does; only gradients and updates cross PCIe). Set
    it as ``zero_optimization.offload_optimizer.compute`` in a DeepSpeed config; ``offload_adam``:
    under ``offload_optimizer``, what steps the parameters not preconditioned (norms, biases,
    embeddings) in host memory: "deepspeed" (DeepSpeed's vectorized ``cpu_adam`` kernel, as
    DeepSpeed steps AdamW under offload; 3-5x our foreach AdamW on the host, equal to it to
    round-off) or "torch" (our foreach AdamW: bit-identical to the run without offload)."""

    cost_model: CostModel = "flops"
    ownership: Ownership = "local"
    ownership_group_size: Optional[int] = None
    collective_timeout_s: float = 600
    comm_dtype: CommDtype = "fp32"
    offload_stream_mib: float = 256
    offload_compute: OffloadCompute = "device"
    offload_adam: OffloadAdam = "deepspeed"

    def __post_init__(self) -> None:
        if self.cost_model not in COST_MODELS:
            raise ValueError(f"{BLOCK}.cost_model must be one of {list(COST_MODELS)}, got {self.cost_model!r}")
        if self.ownership not in get_args(Ownership):
            raise ValueError(f"{BLOCK}.ownership must be one of {list(get_args(Ownership))}, got {self.ownership!r}")
        size = self.ownership_group_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{BLOCK}.ownership_group_size must be a positive integer (ranks per node) or null, "
                             f"got {size!r}")
        if self.comm_dtype not in get_args(CommDtype):
            raise ValueError(f"{BLOCK}.comm_dtype must be one of {list(get_args(CommDtype))}, got {self.comm_dtype!r}")
        mib = self.offload_stream_mib
        if isinstance(mib, bool) or not isinstance(mib, (int, float)) or not 0 < mib < 1e7:
            raise ValueError(f"{BLOCK}.offload_stream_mib must be a number of MiB > 0, got {mib!r}")
        if self.offload_compute not in get_args(OffloadCompute):
            raise ValueError(f"zero_optimization.offload_optimizer.compute must be 'device' or 'host', "
                             f"got {self.offload_compute!r}")
        if self.offload_adam not in get_args(OffloadAdam):
            raise ValueError(f"{BLOCK}.offload_adam must be one of {list(get_args(OffloadAdam))}, "
                             f"got {self.offload_adam!r}")
        timeout = self.collective_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e7:
            raise ValueError(f"{BLOCK}.collective_timeout_s must be a number of seconds > 0, got {timeout!r}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_block(cls, block: Any) -> "DistributedOptions":
        """The block as a user wrote it (JSON object); unknown keys refused with a close match."""
        if not isinstance(block, Mapping):
            raise ValueError(f"'{BLOCK}' must be an object, got {block!r}")
        for key in block:
            if key in _SET_ELSEWHERE:
                raise ValueError(f"{BLOCK}.{key}: set it as {_SET_ELSEWHERE[key]} instead")
            if key not in cls.keys():
                close = difflib.get_close_matches(key, [k for k in cls.keys() if k not in _SET_ELSEWHERE], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"{BLOCK}: unknown option {key!r}{hint}")
        return cls(**block)
