"""Keep DeepSpeed from JIT-compiling a C++ op that training never calls.

On a CPU node DeepSpeed's comm backend compiles its shared-memory all-reduce
(``deepspeed_shm_comm``, used only by ``inference_all_reduce``) the first time a
process group is made: about a minute of g++ per fresh node or container, and a
rank killed while compiling leaves ``~/.cache/torch_extensions/.../lock`` behind,
after which every later job on that node waits on the lock forever (seen: a CI
run that never got past its first DeepSpeed test). Marking the op incompatible
before the backend is built skips both. ``DS_STRUCTOPT_BUILD_SHM_COMM=1`` keeps
DeepSpeed's default.
"""
from __future__ import annotations

import os

SHM_COMM_OP = "deepspeed_shm_comm"
KEEP_ENV = "DS_STRUCTOPT_BUILD_SHM_COMM"


def skip_unused_jit_ops() -> bool:
    """Mark the shm comm op as not buildable for this process; True if it was marked.

    Must run before DeepSpeed makes its comm backend (``deepspeed.init_distributed`` or the
    first ``deepspeed.initialize``); later it changes nothing."""
    if os.environ.get(KEEP_ENV) == "1":
        return False
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # DeepSpeed keeps this one dict; its builders read it
    compatible[SHM_COMM_OP] = False
    return True
