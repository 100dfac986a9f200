"""Time spent inside torch calls on a simulated rank, so the rest can be called ours.

Fake tensors make the math free but not the dispatch: every op still passes through the
fake mode and the simulation's own modes, in Python. :class:`TorchTime`, the outermost
torch function mode, adds up the wall time of every torch call the code under test makes
(nested calls are inside it) and counts them; torch.distributed calls (the fake backend's
and the collective checker's Python) are billed to it too (:meth:`TorchTime.excluded`). Wall time minus that is the Python our code
runs per step; the count is what a GPU would launch (each op a few microseconds of host
time on a real device).
"""
from __future__ import annotations

import time
from typing import Any, Callable

from torch.overrides import TorchFunctionMode


class TorchTime(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self.calls = 0
        self.bias = 0.0  # seconds per call this mode adds outside its timed part (see calibrate)
        self._paused = 0

    def calibrate(self, calls: int = 20000) -> float:
        """Measure the mode's own cost per call (its Python around the timed part, which would
        otherwise be billed to the code under test) on a trivial torch call; sets ``bias``."""
        import torch

        t = torch.empty(0)
        seconds, count = self.seconds, self.calls
        start = time.perf_counter()
        for _ in range(calls):
            t.dim()
        wall = time.perf_counter() - start
        inside = self.seconds - seconds
        self.seconds, self.calls = seconds, count
        # the bare loop without the mode costs ~0.05 us per call; everything else is the mode's
        self.bias = max(0.0, (wall - inside) / calls)
        return self.bias

    def excluded(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (a torch.distributed function) timed as torch's, not the caller's; the torch
        calls it makes inside are not counted again."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._paused:
                return fn(*args, **kwargs)
            self._paused += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
                self._paused -= 1
        return timed

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self._paused:
            return func(*args, **(kwargs or {}))
        self.calls += 1
        start = time.perf_counter()
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.seconds += time.perf_counter() - start
