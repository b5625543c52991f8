"""What a rank server needs at start: the device, the KV budget, CPU tuning, fault injection."""

from __future__ import annotations

import time

import torch

from pdbus.config import ServeConfig


def pick_device(cfg: ServeConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def kv_blocks_for_budget(
    cfg: ServeConfig,
    model_cfg,
    kv_heads: int,
    dtype: torch.dtype,
    device: torch.device,
    reserve_bytes: int = 0,
    sharing: int = 1,
) -> int:
    """KV blocks for this rank; ``sharing`` ranks of one group sizing their caches on one GPU at
    once (weights all loaded) split what is left after every rank's activation reserve."""
    from pdbus.native.kv_cache import bytes_per_token

    needed = (cfg.max_model_len + cfg.block_size - 1) // cfg.block_size + 1
    if cfg.num_gpu_blocks_override:
        if cfg.num_gpu_blocks_override < needed:
            raise RuntimeError(
                f"--num-gpu-blocks-override {cfg.num_gpu_blocks_override} is fewer than the {needed} blocks one "
                f"--max-model-len {cfg.max_model_len} sequence needs"
            )
        return cfg.num_gpu_blocks_override
    per_block = bytes_per_token(model_cfg.num_hidden_layers, kv_heads, model_cfg.head_dim, dtype)
    per_block *= cfg.block_size
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # activations (profiled) of every rank on this GPU, then this rank's share
        budget = (free - (1 - cfg.gpu_memory_utilization) * total - sharing * reserve_bytes) / sharing
    else:
        budget = cfg.kv_cache_memory_gb * (1 << 30)
    blocks = int(budget // per_block)
    if blocks < needed:
        raise RuntimeError(
            f"KV cache budget holds {blocks} blocks, one max-length sequence needs {needed}: "
            "raise --kv-cache-memory-gb / --gpu-memory-utilization or lower --max-model-len"
        )
    return blocks


class FaultSlowRunner:
    """Fault injection (tests): every step takes ``delay`` longer."""

    def __init__(self, runner, delay: float):
        self.inner, self.delay, self.kv_cache = runner, delay, runner.kv_cache

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
        from pdbus.native.transfer.base import TransferHandle

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
