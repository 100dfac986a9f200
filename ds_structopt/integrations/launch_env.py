"""Rank variables for processes started by plain ``srun`` (the deepspeed launcher's slurm mode).

Such processes carry ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID``
but not torch's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, and DeepSpeed only
discovers ranks through MPI (or AzureML/SageMaker). Mapping them here lets the
same entry point run under every launcher. Only srun job steps are adopted
(``SLURM_STEP_ID`` set): the batch script itself also sees ``SLURM_PROCID=0``
and the allocation's task count, and must not wait for ranks that never come.
"""
from __future__ import annotations

import os
from typing import MutableMapping, Optional


class LaunchEnvError(RuntimeError):
    """The process was started by srun but the rendezvous address is unknown."""


def adopt_slurm_env(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK from an srun step when no launcher set them; True if it did."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return False
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if world > 1:
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(key):
                raise LaunchEnvError(f"{key} is not set: ranks started by srun need the rendezvous address "
                                     "(launch/slurm/deepspeed.sbatch exports MASTER_ADDR and MASTER_PORT)")
    else:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(world)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    return True
