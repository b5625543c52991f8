"""The paged KV cache of one rank.

All layers live in one contiguous buffer ``[num_layers, 2, num_blocks, kv_heads, block_size,
head_dim]`` so that a transfer engine registers (or shares) a single region: ``k[l]`` and
``v[l]`` are views of it. One block's head range is contiguous, so a peer with another TP size
copies head slices. On the CPU the buffer may live in POSIX shared memory (``shared=True``) so
that a prefill process on the same host writes straight into it (the ``ipc`` backend).
"""

from __future__ import annotations

import os
import secrets
from multiprocessing import shared_memory

import torch

from pdbus.messages import KVLayout

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        num_kv_heads: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        shared: bool = False,
        total_kv_heads: int | None = None,
        head_start: int = 0,
    ):
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.total_kv_heads = total_kv_heads or num_kv_heads
        self.head_start = head_start
        self.shape = (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim)
        self._shm: shared_memory.SharedMemory | None = None
        numel = 1
        for s in self.shape:
            numel *= s
        if shared:
            if self.device.type != "cpu":
                raise ValueError("shared=True is for CPU caches; GPU caches use CUDA IPC")
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            name = f"pdbus-kv-{os.getpid()}-{secrets.token_hex(4)}"
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=max(nbytes, 1))
            self.buffer = torch.frombuffer(self._shm.buf, dtype=dtype, count=numel).view(self.shape)
            self.buffer.zero_()
        else:
            self.buffer = torch.zeros(self.shape, dtype=dtype, device=self.device)
        self.k = [self.buffer[i, 0] for i in range(num_layers)]
        self.v = [self.buffer[i, 1] for i in range(num_layers)]

    @property
    def shm_name(self) -> str | None:
        return self._shm.name if self._shm is not None else None

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V)."""
        return self.num_kv_heads * self.block_size * self.head_dim * self.buffer.element_size()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def layout(self) -> KVLayout:
        return KVLayout(
            num_layers=self.num_layers,
            num_blocks=self.num_blocks,
            num_kv_heads=self.num_kv_heads,
            block_size=self.block_size,
            head_dim=self.head_dim,
            dtype=dtype_name(self.dtype),
            total_kv_heads=self.total_kv_heads,
            head_start=self.head_start,
        )

    def close(self) -> None:
        self.k = []
        self.v = []
        self.buffer = None  # type: ignore[assignment]
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:
                pass  # a live view still references it; the unlink below still frees the name
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
            self._shm = None


def kv_blocks_for_budget(
    cfg,  # the sizing fields of pdbus.config.ServeConfig
    model_cfg,
    kv_heads: int,
    dtype: torch.dtype,
    device: torch.device,
    reserve_bytes: int = 0,
    sharing: int = 1,
) -> int:
    """KV blocks for this rank; ``sharing`` ranks of one group sizing their caches on one GPU at
    once (weights all loaded) split what is left after every rank's activation reserve."""
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
        budget = gpu_kv_budget(free, total, torch.cuda.memory_reserved(device), cfg.gpu_memory_utilization, sharing, reserve_bytes)
        # more blocks than max_num_seqs sequences of max_model_len can hold are never used: a small
        # model on a large card takes what it can use, not the card
        blocks = min(int(budget // per_block), cfg.max_num_seqs * (needed - 1) + 1)
    else:
        blocks = int(cfg.kv_cache_memory_gb * (1 << 30) // per_block)
    if blocks < needed:
        raise RuntimeError(
            f"KV cache budget holds {blocks} blocks, one max-length sequence needs {needed}: "
            "raise --kv-cache-memory-gb / --gpu-memory-utilization or lower --max-model-len"
        )
    return blocks


def gpu_kv_budget(free: int, total: int, own: int, utilization: float, sharing: int = 1, reserve: int = 0) -> float:
    """Bytes of KV cache for one rank on a GPU. ``--gpu-memory-utilization`` is this instance's
    share of the card — ``sharing`` ranks of one instance on the GPU split it — less what this
    rank already holds (``own``: its weights) and its profiled activation ``reserve``; and never
    more than is free now (other instances on the card hold the rest), 1% of the card kept for
    their CUDA contexts. So a prefill and a decode on one GPU each take their share."""
    share = utilization * total / sharing - own - reserve
    room = (free - 0.01 * total) / sharing - reserve
    return max(0.0, min(share, room))
