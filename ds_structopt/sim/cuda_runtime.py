"""torch.cuda's stream, event and device calls for fake CUDA tensors on a CPU build, recorded.

A CPU build of torch raises on ``torch.cuda.Stream()``, ``Event()``, ``set_device`` and
``Tensor.record_stream``. :class:`SimCudaRuntime` stands in for them while a simulated
rank runs and records what a GPU would care about:

- streams created (one dedicated side stream per optimizer, not one per use);
- each thread's current device (a worker thread that never calls ``set_device`` works on
  GPU 0, and ``problems`` says so when it enters a stream of another GPU);
- ``record_stream`` calls (which tensor was recorded on which stream), and a tensor recorded
  on a stream of another GPU.

A thread other than the simulating one that enters a stream gets the simulation's torch
modes (fake tensors, host reads, guarded methods) for as long as it stays in the stream.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

_ids = itertools.count()


@dataclass(eq=False)
class SimStream:
    device: torch.device
    priority: int = 0
    name: str = ""
    waits: list = field(default_factory=list)

    def wait_event(self, event: "SimEvent") -> None:
        self.waits.append(event)

    def wait_stream(self, other: "SimStream") -> None:
        self.waits.append(other)

    def synchronize(self) -> None:
        pass

    @property
    def cuda_stream(self) -> str:
        return self.name


class SimEvent:
    def __init__(self, *_: Any, **__: Any) -> None:
        self.stream: Optional[SimStream] = None

    def record(self, stream: Optional[SimStream] = None) -> None:
        self.stream = stream

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class SimCudaRuntime:
    def __init__(self, main_modes: list) -> None:
        self.main_thread = threading.get_ident()
        self.modes = main_modes
        self.created: list[SimStream] = []
        self.set_device_calls: list[tuple[int, torch.device]] = []
        # (the tensor's device and shape, the stream): no reference, so memory tracking sees it freed
        self.recorded: list[tuple[tuple[torch.device, tuple[int, ...]], SimStream]] = []
        self.problems: list[str] = []
        self._defaults: dict[torch.device, SimStream] = {}
        self._tls = threading.local()
        self._saved: dict[tuple[Any, str], Any] = {}

    # ----- the API ----------------------------------------------------------
    def _device(self) -> torch.device:
        return getattr(self._tls, "device", torch.device("cuda", 0))

    def _default(self, device: torch.device) -> SimStream:
        if device not in self._defaults:
            self._defaults[device] = SimStream(device, 0, f"default:{device}")
        return self._defaults[device]

    def _stream_class(self) -> type:
        """``torch.cuda.Stream`` stays a class (libraries annotate with it)."""
        runtime = self

        class Stream(SimStream):
            def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
                dev = runtime._device() if device is None else torch.device(device)
                super().__init__(dev, priority, f"side{next(_ids)}")
                runtime.created.append(self)

        return Stream

    def current_stream(self, device: Any = None) -> SimStream:
        dev = self._device() if device is None else torch.device(device)
        inside = getattr(self._tls, "stream", None)
        return inside if inside is not None and inside.device == dev else self._default(dev)

    def set_device(self, device: Any) -> None:
        dev = torch.device(device)
        self._tls.device = dev
        self.set_device_calls.append((threading.get_ident(), dev))

    def current_device(self) -> int:
        return self._device().index or 0

    @contextlib.contextmanager
    def stream(self, stream: SimStream) -> Iterator[None]:
        if stream.device != self._device():
            self.problems.append(f"thread {threading.current_thread().name} works on a stream of {stream.device} "
                                 f"while its current device is {self._device()} (no set_device in this thread)")
        previous = getattr(self._tls, "stream", None)
        self._tls.stream = stream
        with contextlib.ExitStack() as modes:
            if threading.get_ident() != self.main_thread:
                for mode in self.modes:
                    modes.enter_context(mode)
            try:
                yield
            finally:
                self._tls.stream = previous

    def record_stream(self, tensor: torch.Tensor, stream: SimStream) -> None:
        if tensor.device != stream.device:
            self.problems.append(f"record_stream of a tensor on {tensor.device} on a stream of {stream.device}")
        self.recorded.append(((tensor.device, tuple(tensor.shape)), stream))

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        """A CUDA generator's state is a CPU byte tensor (Philox seed and offset)."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return torch.zeros(16, dtype=torch.uint8)

    def set_rng_state(self, state: torch.Tensor, device: Any = "cuda") -> None:
        if state.device.type != "cpu" or state.dtype != torch.uint8:
            self.problems.append(f"set_rng_state got a {state.dtype} tensor on {state.device}")

    # ----- installing -------------------------------------------------------
    def __enter__(self) -> "SimCudaRuntime":
        runtime = self
        patches = {(torch.cuda, "Stream"): self._stream_class(), (torch.cuda, "Event"): SimEvent,
                   (torch.cuda, "current_stream"): self.current_stream, (torch.cuda, "stream"): self.stream,
                   (torch.cuda, "set_device"): self.set_device, (torch.cuda, "current_device"): self.current_device,
                   (torch.cuda, "get_rng_state"): self.get_rng_state, (torch.cuda, "set_rng_state"): self.set_rng_state,
                   (torch.Tensor, "record_stream"): lambda t, s: runtime.record_stream(t, s)}
        for (owner, name), fn in patches.items():
            self._saved[(owner, name)] = getattr(owner, name)
            setattr(owner, name, fn)
        return self

    def __exit__(self, *exc: Any) -> None:
        for (owner, name), fn in self._saved.items():
            setattr(owner, name, fn)
        self._saved.clear()

    def side_streams_used(self) -> set[str]:
        return {s.name for _, s in self.recorded if not s.name.startswith("default")}


class SerialWorker:
    """A one-thread executor that finishes each job before ``submit`` returns.

    The refresh-ahead worker keeps its own thread (so its thread-local device and stream are
    its own, as on a GPU), but a FakeTensorMode is not safe for two threads at once: jobs run
    one at a time, while the simulating thread waits."""

    def __init__(self, max_workers: int = 1, thread_name_prefix: str = "") -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name_prefix or "sim-worker")

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        future = self._pool.submit(fn, *args, **kwargs)
        future.exception()  # wait; the caller sees a failure through future.result()
        return future

    def shutdown(self, wait: bool = True, **_: Any) -> None:
        self._pool.shutdown(wait=wait)
