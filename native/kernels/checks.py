"""Argument checks shared by the kernel host functions (written once; each raises ValueError with
one line naming the argument). Tensors must be on a CUDA device, or anywhere under
``TRITON_INTERPRET=1`` (the interpreter runs the kernels on CPU tensors)."""

from __future__ import annotations

import torch

from pdbus import envs

INTERPRET = envs.TRITON_INTERPRET  # read once: the kernels are compiled (or interpreted) once
BF16 = torch.bfloat16
INDEX_DTYPES = (torch.int32, torch.int64)


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def on_kernel_device(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_cuda or INTERPRET)


def require_cuda(*named: tuple[str, torch.Tensor]) -> None:
    """Every ``(name, tensor)`` is a tensor on a CUDA device, all on the first one's device."""
    dev = None
    for name, t in named:
        require(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor")
        require(on_kernel_device(t), f"{name} must be on a CUDA device, got {t.device}")
        if dev is None:
            dev = t.device
        require(t.device == dev, f"{name} is on {t.device}, expected {dev}")


def check_kv_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """One layer's paged K and V caches: ``[num_blocks, kv_heads, block_size, head_dim]`` bf16,
    same shape and strides, contiguous last dim."""
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        require(c.dim() == 4, f"{name} must be [num_blocks, kv_heads, block_size, head_dim], got {tuple(c.shape)}")
        require(c.dtype == BF16, f"{name} must be bfloat16, got {c.dtype}")
        require(c.stride(3) == 1, f"{name} must have a contiguous last dim")
    require(k_cache.shape == v_cache.shape, "k_cache and v_cache shapes differ")
    require(k_cache.stride() == v_cache.stride(), "k_cache and v_cache strides differ")


def check_int_vec(name: str, t: torch.Tensor, n: int) -> None:
    """A contiguous int32 / int64 vector of ``n`` entries."""
    require(t.dim() == 1 and t.shape[0] == n, f"{name} must be 1-D of length {n}, got {tuple(t.shape)}")
    require(t.dtype in INDEX_DTYPES, f"{name} must be int32/int64, got {t.dtype}")
    require(t.stride(0) == 1 or n <= 1, f"{name} must be contiguous")


def bf16_out(out: torch.Tensor | None, like: torch.Tensor, name: str = "like q") -> torch.Tensor:
    """``out`` checked to be a bf16 tensor shaped like ``like`` (contiguous last dim), or a new one."""
    if out is None:
        return torch.empty(like.shape, dtype=BF16, device=like.device)
    require(out.shape == like.shape and out.dtype == BF16 and out.device == like.device and out.stride(-1) == 1,
            f"out must be a bfloat16 tensor shaped {name} with a contiguous last dim")
    return out
