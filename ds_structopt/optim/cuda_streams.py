"""One CUDA stream of ours per device, created once and kept (refresh-ahead, offload copies)."""
from __future__ import annotations

from typing import Any

import torch

# CUDA's least stream priority (lower numbers are higher priorities, 0 is the least and the default).
LOWEST_STREAM_PRIORITY = 0


class StreamPerDevice(dict):
    """device -> our stream on it. Every ``torch.cuda.Stream()`` is the next stream of PyTorch's
    round-robin pool, the pool NCCL's and DeepSpeed's side streams come from: one per use would
    cycle through all of them, so our work would now and then queue in front of their
    all-gather. One draw per device keeps ours apart from theirs. Priority 0 is CUDA's least (the
    default streams' too, so nothing lower exists): NCCL's kernels overtake ours only if its
    streams are high priority (``ProcessGroupNCCL.Options.is_high_priority_stream``)."""

    def for_device(self, device: Any) -> Any:
        """Our stream on ``device`` (``"cuda"`` without an index: the current device), made once."""
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        stream = super().get(device)
        if stream is None:
            stream = self[device] = torch.cuda.Stream(device=device, priority=LOWEST_STREAM_PRIORITY)
        return stream
