"""Uploads from the host that do not wait for the GPU.

A copy from pageable host memory to the device is a blocking copy: the host waits until it has
run, and it runs behind every kernel queued before it on the stream. So one ``torch.tensor(values,
device="cuda")`` in the middle of a step stalls the host until the GPU has drained: with
asynchronous scheduling that is the whole step in flight. These helpers stage through pinned
memory and copy without waiting; on the CPU they are plain tensors.
"""

from __future__ import annotations

import torch


def upload(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` (a list or a CPU tensor) on ``device``, without a host wait on a GPU."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
