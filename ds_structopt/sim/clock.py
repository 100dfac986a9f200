"""Time spent inside torch calls on a simulated rank, so the rest can be called ours.

Fake tensors make the math free but not the dispatch: every op still passes through the
fake mode and the simulation's own modes, in Python. :class:`TorchTime`, the outermost
torch function mode, adds up the wall time of every torch call the code under test makes
(nested calls are inside it) and counts them. Wall time minus that is the Python our code
runs per step; the count is what a GPU would launch (each op a few microseconds of host
time on a real device).
"""
from __future__ import annotations

import time
from typing import Any

from torch.overrides import TorchFunctionMode


class TorchTime(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        start = time.perf_counter()
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.seconds += time.perf_counter() - start
