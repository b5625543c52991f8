"""K and V of a request's blocks, over a range of layers, copied from one paged KV cache into
another in one launch.

``copy_kv_blocks(src, dst, layer, num_layers, src_blocks, dst_blocks, src_heads, dst_heads)``
copies, for every layer of ``[layer, layer + num_layers)``, K and V, and every ``i``, heads
``src_heads`` of block ``src_blocks[i]`` of ``src`` into heads ``dst_heads`` of block
``dst_blocks[i]`` of ``dst``. Both caches are laid out ``[layers, 2, blocks, heads, block_size,
head_dim]`` (native/kv_cache.py), so each (layer, K or V, block) is one contiguous run of
``heads * block_size * head_dim`` elements: a program per run computes its two offsets from the
block ids and the strides, so the host uploads only the block ids and launches once, whatever
the number of layers and blocks (the CUDA ipc backend, native/transfer/cuda_ipc.py). On a GPU
with Triton it is one launch on the current stream that checks no bounds (the caller validated
the ids: native/transfer/blocks.resolve_op); elsewhere ``copy_kv_blocks_torch``, a gather and a
scatter per layer. ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors.
"""

from __future__ import annotations

import torch

from .checks import on_kernel_device, require

try:
    import triton
    import triton.language as tl
except ImportError:  # no kernel: copy_kv_blocks copies with torch
    triton = None

_MAX_TILE = 4096  # elements a program copies per step (8 KiB of bf16)
_MAX_GRID_Y = 65535  # CUDA's limit on the grid's second dimension: programs loop over the rest

launches = 0  # copy_kv_blocks calls so far (tests count a transfer's launches with it)


if triton is not None:

    @triton.jit
    def _copy_kv_blocks_kernel(
        src_ptr, dst_ptr, src_blocks_ptr, dst_blocks_ptr, layer0, num_blocks,
        src_layer_stride, dst_layer_stride, src_kind_stride, dst_kind_stride,
        src_block_stride, dst_block_stride, src_head0, dst_head0, run_len,
        ALIGNED: tl.constexpr, TILE: tl.constexpr,
    ):  # fmt: skip
        run = tl.program_id(0)  # (layer, kind, block) with the block fastest
        i = run % num_blocks
        kind = ((run // num_blocks) % 2).to(tl.int64)
        layer = (layer0 + run // (2 * num_blocks)).to(tl.int64)
        src_block = tl.load(src_blocks_ptr + i)  # int64
        dst_block = tl.load(dst_blocks_ptr + i)
        src_off = layer * src_layer_stride + kind * src_kind_stride + src_block * src_block_stride + src_head0
        dst_off = layer * dst_layer_stride + kind * dst_kind_stride + dst_block * dst_block_stride + dst_head0
        if ALIGNED:  # every stride and head offset is a multiple of 16 elements: vector accesses
            src_off = tl.multiple_of(src_off, 16)
            dst_off = tl.multiple_of(dst_off, 16)
        lanes = tl.arange(0, TILE)
        for start in range(tl.program_id(1) * TILE, run_len, tl.num_programs(1) * TILE):
            offs = start + lanes  # int32 within a run; the run's base is int64
            mask = offs < run_len
            tl.store(dst_ptr + dst_off + offs, tl.load(src_ptr + src_off + offs, mask=mask), mask=mask)


def _check(src, dst, layer, num_layers, src_blocks, dst_blocks, src_heads, dst_heads) -> None:
    for name, t in (("src", src), ("dst", dst)):
        require(isinstance(t, torch.Tensor) and t.dim() == 6 and t.is_contiguous(), f"{name} must be a contiguous 6-D KV cache")
    require(src.dtype == dst.dtype, f"dtypes differ: {src.dtype} and {dst.dtype}")
    require(src.shape[0] == dst.shape[0] and src.shape[4:] == dst.shape[4:], "caches differ in layers, block size or head dim")
    require(0 <= layer and num_layers >= 0 and layer + num_layers <= src.shape[0], f"layers {layer}+{num_layers} outside the cache")
    for name, t in (("src_blocks", src_blocks), ("dst_blocks", dst_blocks)):
        require(isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype == torch.int64, f"{name} must be a 1-D int64 tensor")
    require(src_blocks.shape == dst_blocks.shape, f"{src_blocks.numel()} src blocks but {dst_blocks.numel()} dst blocks")
    (s0, s1), (d0, d1) = src_heads, dst_heads
    require(0 <= s0 < s1 <= src.shape[3] and 0 <= d0 < d1 <= dst.shape[3] and s1 - s0 == d1 - d0, f"bad heads {src_heads} -> {dst_heads}")


def copy_kv_blocks(
    src: torch.Tensor,
    dst: torch.Tensor,
    layer: int,
    num_layers: int,
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
    src_heads: tuple[int, int],
    dst_heads: tuple[int, int],
) -> int:
    """Copy K and V of the blocks over the layers (see the module doc; block ids as int64 tensors
    on the caches' device); returns the bytes copied."""
    global launches
    _check(src, dst, layer, num_layers, src_blocks, dst_blocks, src_heads, dst_heads)
    launches += 1
    (s0, s1), (d0, _) = src_heads, dst_heads
    head_elems = src.shape[4] * src.shape[5]
    run_len = (s1 - s0) * head_elems
    nbytes = 2 * num_layers * src_blocks.numel() * run_len * src.element_size()
    if num_layers == 0 or src_blocks.numel() == 0:
        return 0
    if triton is None or not on_kernel_device(src) or src.device != dst.device:
        copy_kv_blocks_torch(src, dst, layer, num_layers, src_blocks, dst_blocks, src_heads, dst_heads)
        return nbytes
    block_strides = [t.shape[3] * head_elems for t in (src, dst)]
    kind_strides = [t.shape[2] * b for t, b in zip((src, dst), block_strides)]
    tile = min(_MAX_TILE, max(128, triton.next_power_of_2(run_len)))
    strides = (*block_strides, *kind_strides, s0 * head_elems, d0 * head_elems)
    grid = (2 * num_layers * src_blocks.numel(), min(triton.cdiv(run_len, tile), _MAX_GRID_Y))
    _copy_kv_blocks_kernel[grid](
        src, dst, src_blocks, dst_blocks, layer, src_blocks.numel(),
        2 * kind_strides[0], 2 * kind_strides[1], kind_strides[0], kind_strides[1],
        block_strides[0], block_strides[1], s0 * head_elems, d0 * head_elems, run_len,
        ALIGNED=all(x % 16 == 0 for x in (head_elems, *strides)), TILE=tile, num_warps=4,
    )  # fmt: skip
    return nbytes


def copy_kv_blocks_torch(src, dst, layer, num_layers, src_blocks, dst_blocks, src_heads, dst_heads) -> None:
    """``copy_kv_blocks`` in plain torch: per layer, one gather of K and V and one scatter (a
    peer copy between them when the caches sit on different devices)."""
    (s0, s1), (d0, d1) = src_heads, dst_heads
    src_idx, dst_idx = src_blocks.to(src.device), dst_blocks.to(dst.device)
    for i in range(layer, layer + num_layers):
        gathered = src[i][:, :, s0:s1].index_select(1, src_idx)
        dst[i][:, :, d0:d1].index_copy_(1, dst_idx, gathered.to(dst.device, non_blocking=True))
