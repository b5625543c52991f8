"""Paged attention over the KV cache ``[num_blocks, kv_heads, block_size, head_dim]`` (bf16).

* ``paged_decode_attention``: one query token per sequence. A program owns one (sequence, kv
  head, context partition) and all ``nh / kvh`` query heads of that kv head, so each K/V page is
  loaded once per group. When batch x kv_heads is too small to fill the GPU the context is split
  into partitions (flash-decoding) whose partial softmax states a second kernel merges.
* ``prefill_attention``: variable-length causal attention for chunked prefill; query token ``i``
  of sequence ``b`` sits at position ``context_lens[b] - query_len_b + i`` and attends to every
  cached position up to its own (its own K/V must already be in the cache: call ``store_kv``
  first).

Softmax runs in fp32 (exp2 with the scale folded in); P is rounded to bf16 before ``P @ V``,
as the eager transformers path does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import INTERPRET, bf16_out, check_int_vec, check_kv_caches, require, require_cuda

_BF16 = torch.bfloat16
# TRITON_INTERPRET=1 runs the kernels on CPU tensors (debugging without a GPU)
_LOG2E = 1.4426950408889634


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if INTERPRET and device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _check_common(q, k_cache, v_cache, block_tables, context_lens, B):
    require_cuda(("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                 ("context_lens", context_lens))
    require(q.dim() == 3, f"q must be 3-D, got shape {tuple(q.shape)}")
    require(q.dtype == _BF16, f"q must be bfloat16, got {q.dtype}")
    require(q.stride(2) == 1, "q must have a contiguous last dim")
    check_kv_caches(k_cache, v_cache)
    nh, hd = q.shape[1], q.shape[2]
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    require(k_cache.shape[3] == hd, f"cache head_dim {k_cache.shape[3]} != q head_dim {hd}")
    require(nh % kvh == 0, f"query heads {nh} not a multiple of kv heads {kvh}")
    require(hd >= 16 and (hd & (hd - 1)) == 0, f"head_dim must be a power of two >= 16, got {hd}")
    require(bs >= 16 and (bs & (bs - 1)) == 0, f"block_size must be a power of two >= 16, got {bs}")
    require(block_tables.dim() == 2 and block_tables.shape[0] == B,
             f"block_tables must be [{B}, max_blocks], got {tuple(block_tables.shape)}")
    require(block_tables.dtype in (torch.int32, torch.int64), f"block_tables must be int32/int64, got {block_tables.dtype}")
    require(block_tables.stride(1) == 1 or block_tables.shape[1] <= 1, "block_tables rows must be contiguous")
    check_int_vec("context_lens", context_lens, B)


# ----------------------------------------------------------------------------------- decode


@triton.jit
def _block_scores(q, kc_ptr, vc_ptr, bt_entry, s_cb, kv_off, qk_scale):
    """The cache block named at ``bt_entry`` (a block-table slot): (``q @ K.T * qk_scale``, V)."""
    blk = tl.load(bt_entry).to(tl.int64)
    k = tl.load(kc_ptr + blk * s_cb + kv_off)
    v = tl.load(vc_ptr + blk * s_cb + kv_off)
    return tl.dot(q, tl.trans(k)) * qk_scale, v


@triton.jit
def _softmax_update(s, v, m_i, l_i, acc):
    """One block's scores ``s`` and values ``v`` into the running (max, sum, accumulator) of an
    online softmax in exp2; P is rounded to bf16 before ``P @ V``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["n_parts", "blocks_per_part"])
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    s_qb, s_qh, s_cb, s_ch, s_cs, s_btb, s_ob, s_oh,
    qk_scale, n_parts, blocks_per_part,
    GROUP: tl.constexpr, GPAD: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr, SPLIT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    n_blocks = (ctx + BS - 1) // BS
    blk_lo = part * blocks_per_part
    blk_hi = tl.minimum(blk_lo + blocks_per_part, n_blocks)
    if part == n_parts - 1:
        blk_hi = n_blocks  # the last partition covers any context beyond the sizing hint

    offs_g = tl.arange(0, GPAD)
    offs_d = tl.arange(0, HD)
    offs_t = tl.arange(0, BS)
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)

    m_i = tl.full([GPAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GPAD], tl.float32)
    acc = tl.zeros([GPAD, HD], tl.float32)
    kv_off = kvh.to(tl.int64) * s_ch + offs_t[:, None] * s_cs + offs_d[None, :]
    for j in range(blk_lo, blk_hi):
        s, v = _block_scores(q, kc_ptr, vc_ptr, bt_ptr + b * s_btb + j, s_cb, kv_off, qk_scale)
        s = tl.where((j * BS + offs_t)[None, :] < ctx, s, float("-inf"))
        m_i, l_i, acc = _softmax_update(s, v, m_i, l_i, acc)

    if SPLIT:
        row = (b * (GROUP * tl.num_programs(1)) + heads) * n_parts + part
        tl.store(m_ptr + row, m_i, mask=gmask)
        tl.store(l_ptr + row, l_i, mask=gmask)
        tl.store(acc_ptr + row[:, None] * HD + offs_d[None, :], acc, mask=gmask[:, None])
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(out_ptr + b * s_ob + heads[:, None] * s_oh + offs_d[None, :], o.to(tl.bfloat16),
                 mask=gmask[:, None])


@triton.jit(do_not_specialize=["n_parts", "blocks_per_part"])
def _decode_reduce_kernel(
    ctx_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, s_ob, s_oh, n_parts, blocks_per_part,
    HD: tl.constexpr, BS: tl.constexpr, PPAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    nh = tl.num_programs(1)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    n_blocks = (ctx + BS - 1) // BS
    used = tl.minimum((n_blocks + blocks_per_part - 1) // blocks_per_part, n_parts)
    offs_p = tl.arange(0, PPAD)
    offs_d = tl.arange(0, HD)
    pmask = offs_p < used
    row = (b * nh + h) * n_parts + offs_p
    m = tl.load(m_ptr + row, mask=pmask, other=float("-inf"))
    lsum = tl.load(l_ptr + row, mask=pmask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(pmask & (m > float("-inf")), tl.exp2(m - m_max), 0.0)
    denom = tl.sum(w * lsum, 0)
    a = tl.load(acc_ptr + row[:, None] * HD + offs_d[None, :], mask=pmask[:, None], other=0.0)
    o = tl.sum(a * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_d, o.to(tl.bfloat16))


def decode_partitions(batch: int, kv_heads: int, max_blocks: int, device: torch.device) -> tuple[int, int]:
    """(num_partitions, blocks_per_partition) so that batch x kv_heads x partitions fills the GPU.
    Depends only on static sizes, so a CUDA graph captured once stays valid."""
    target = _num_sms(device)
    n_parts = max(1, min(max_blocks, -(-target // max(1, batch * kv_heads))))
    bpp = -(-max_blocks // n_parts) if max_blocks > 0 else 1
    n_parts = max(1, -(-max_blocks // bpp)) if max_blocks > 0 else 1
    return n_parts, bpp


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    max_context_len: int | None = None,
    num_partitions: int | None = None,
) -> torch.Tensor:
    """Decode attention: q ``[B, nh, hd]`` (one token per sequence, already rotated, its K/V
    already stored) over ``context_lens[b]`` cached tokens. Returns ``[B, nh, hd]`` bf16.

    ``max_context_len`` (a bound, only a performance hint: longer contexts are still handled)
    sizes the split-K partitions; without it the width of ``block_tables`` is used.
    ``num_partitions`` forces the partition count (1 = no split)."""
    B = q.shape[0] if q.dim() == 3 else -1
    _check_common(q, k_cache, v_cache, block_tables, context_lens, B)
    nh, hd = q.shape[1], q.shape[2]
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    group = nh // kvh
    out = bf16_out(out, q)
    if B == 0:
        return out
    max_blocks = block_tables.shape[1]
    if max_context_len is not None:
        max_blocks = max(1, min(max_blocks, -(-int(max_context_len) // bs)))
    if num_partitions is None:
        n_parts, bpp = decode_partitions(B, kvh, max_blocks, q.device)
    else:
        n_parts = max(1, min(int(num_partitions), max_blocks))
        bpp = -(-max_blocks // n_parts)
        n_parts = -(-max_blocks // bpp)
    qk_scale = float(scale) * _LOG2E
    gpad = max(16, triton.next_power_of_2(group))
    split = n_parts > 1
    if split:
        m_buf = torch.empty((B, nh, n_parts), dtype=torch.float32, device=q.device)
        l_buf = torch.empty_like(m_buf)
        acc_buf = torch.empty((B, nh, n_parts, hd), dtype=torch.float32, device=q.device)
    else:
        m_buf = l_buf = acc_buf = out
    _decode_kernel[(B, kvh, n_parts)](
        q, k_cache, v_cache, block_tables, context_lens, out, m_buf, l_buf, acc_buf,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        qk_scale, n_parts, bpp,
        GROUP=group, GPAD=gpad, HD=hd, BS=bs, SPLIT=split, num_warps=4, num_stages=2,
    )
    if split:
        _decode_reduce_kernel[(B, nh)](
            context_lens, out, m_buf, l_buf, acc_buf, out.stride(0), out.stride(1), n_parts, bpp,
            HD=hd, BS=bs, PPAD=triton.next_power_of_2(n_parts), num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------------- prefill


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, qsl_ptr, out_ptr, tile_ptr,
    s_qt, s_qh, s_cb, s_ch, s_cs, s_btb, s_ot, s_oh,
    qk_scale,
    GROUP: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, TILED: tl.constexpr,
):
    if TILED:  # program i runs tile_ptr[i] = (sequence << TILE_SHIFT) | query tile, or nothing (-1)
        entry = tl.load(tile_ptr + tl.program_id(0))
        if entry < 0:
            return
        b = entry >> 20
        mt = (entry & 0xFFFFF).to(tl.int32)
    else:
        b = tl.program_id(0).to(tl.int64)
        mt = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b).to(tl.int32)
    q_len = tl.load(qsl_ptr + b + 1).to(tl.int32) - q_start
    if mt * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    first_pos = ctx - q_len
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD)
    offs_t = tl.arange(0, BS)
    mvalid = offs_m < q_len
    pos_m = first_pos + offs_m
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=mvalid[:, None], other=0.0)

    kvh = h // GROUP
    last_pos = tl.minimum(first_pos + (mt + 1) * BLOCK_M - 1, ctx - 1)
    n_blk = last_pos // BS + 1
    # blocks fully below the first query of this tile need no causal mask
    n_full = (first_pos + mt * BLOCK_M + 1) // BS

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    kv_off = kvh.to(tl.int64) * s_ch + offs_t[:, None] * s_cs + offs_d[None, :]
    for j in range(0, n_full):
        s, v = _block_scores(q, kc_ptr, vc_ptr, bt_ptr + b * s_btb + j, s_cb, kv_off, qk_scale)
        m_i, l_i, acc = _softmax_update(s, v, m_i, l_i, acc)
    for j in range(n_full, n_blk):
        s, v = _block_scores(q, kc_ptr, vc_ptr, bt_ptr + b * s_btb + j, s_cb, kv_off, qk_scale)
        s = tl.where((j * BS + offs_t)[None, :] <= pos_m[:, None], s, float("-inf"))
        m_i, l_i, acc = _softmax_update(s, v, m_i, l_i, acc)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(out_ptr + rows[:, None] * s_ot + h * s_oh + offs_d[None, :], o.to(tl.bfloat16), mask=mvalid[:, None])


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    block_m: int | None = None,
    tiles: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q ``[T, nh, hd]`` (tokens of B sequences flattened, sequence b owning
    rows ``query_start_loc[b]:query_start_loc[b+1]``) over the paged cache, which must already
    hold this step's K/V. ``context_lens[b]`` counts the cached tokens after this step.
    ``max_query_len`` avoids a device sync when given. Returns ``[T, nh, hd]`` bf16.

    ``tiles`` (int64, from :func:`prefill_tiles`, with ``block_m``): the query tiles to run, one
    program each, read on the device; a CUDA graph of a fixed grid replays any step that has at
    most as many tiles (native.graphs.PrefillGraphs). Rows of ``out`` in no tile are not written."""
    B = context_lens.shape[0] if context_lens.dim() == 1 else -1
    _check_common(q, k_cache, v_cache, block_tables, context_lens, B)
    require(isinstance(query_start_loc, torch.Tensor) and query_start_loc.device == q.device,
             "query_start_loc must be a tensor on q's device")
    check_int_vec("query_start_loc", query_start_loc, B + 1)
    T, nh, hd = q.shape
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    out = bf16_out(out, q)
    if T == 0 or B == 0:
        return out
    if tiles is not None:
        require(block_m is not None, "tiles need the block_m they were cut for")
        check_int_vec("tiles", tiles, tiles.shape[0])
        grid = (tiles.shape[0], 1, nh)
    else:
        if max_query_len is None:
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
        if max_query_len <= 0:
            return out
        if block_m is None:
            block_m = 128 if max_query_len >= 128 else (64 if max_query_len > 16 else 16)
        grid = (B, triton.cdiv(max_query_len, block_m), nh)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, tiles if tiles is not None else query_start_loc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        float(scale) * _LOG2E,
        GROUP=nh // kvh, HD=hd, BS=bs, BLOCK_M=block_m, TILED=tiles is not None,
        num_warps=8 if block_m >= 128 else 4, num_stages=2,
    )
    return out


TILE_SHIFT = 20  # a tile entry is (sequence << TILE_SHIFT) | query tile


def prefill_tiles(query_lens, block_m: int) -> list[int]:
    """The query tiles of sequences of these lengths, for ``prefill_attention(tiles=...)``."""
    return [(b << TILE_SHIFT) | m for b, n in enumerate(query_lens) for m in range(-(-n // block_m))]


def max_prefill_tiles(tokens: int, rows: int, block_m: int) -> int:
    """The most tiles that ``rows`` sequences of ``tokens`` in all can have."""
    return tokens // block_m + rows
