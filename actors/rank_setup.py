"""What a rank server needs at start: the device, the KV budget, CPU tuning, fault injection."""

from __future__ import annotations

import time

import torch

from native.runner import Runner
from pdbus.config import ServeConfig


def pick_device(cfg: ServeConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


class FaultSlowRunner(Runner):
    """Fault injection (tests): every step takes ``delay`` longer."""

    def __init__(self, runner: Runner, delay: float):
        self.inner, self.delay, self.kv_cache = runner, delay, runner.kv_cache
        self.idle_wait_s = runner.idle_wait_s

    def plan(self, num_tokens: int, decode_only: bool) -> bool:
        return self.inner.plan(num_tokens, decode_only)

    def idle_step(self) -> None:
        self.inner.idle_step()

    @property
    def busy(self) -> bool:
        return self.inner.busy

    def execute(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner.execute(*args, **kwargs)


class FaultTransfer:
    """Fault injection (tests): every commit fails, or never completes ("hang")."""

    def __init__(self, engine, mode: str):
        self.inner, self.mode = engine, mode

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def commit(self, req_id: str, peer_id: str):
        from native.transfer.base import TransferHandle

        handle = TransferHandle(req_id)
        self.inner.abort(req_id)
        if self.mode == "fail":
            handle.set_failed("injected transfer failure (PDBUS_FAULT_TRANSFER=fail)")
        return handle


def tune_cpu_runtime() -> None:
    """Denormals flushed (paged attention over stale cache rows is 5x slower otherwise) and glibc
    kept from mmap-ing each step's large temporaries (halves the CPU decode step)."""
    torch.set_flush_denormal(True)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def as_set(value) -> set[int]:
    return set(value) if isinstance(value, (list, tuple)) else {int(value)}


def generation_eos_ids(model_dir: str) -> set[int]:
    """Stop ids from generation_config.json (ERNIE lists </s> and <|end_of_sentence|> there)."""
    import json
    import os

    try:
        with open(os.path.join(model_dir, "generation_config.json"), encoding="utf-8") as fh:
            value = json.load(fh).get("eos_token_id")
    except (OSError, ValueError):
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value or [] if isinstance(v, int)}
