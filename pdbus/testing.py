"""Test-only helpers that spawned test processes import (production code never imports this)."""

from __future__ import annotations

import os
import sys


def exit_rank_process() -> None:
    """End a spawned test rank (torch.multiprocessing): meet the other ranks, leave the process
    group and exit without interpreter teardown, where gloo threads still referenced from Python
    objects can abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
