"""Fused MoE for ERNIE-4.5: router, token sort, two grouped GEMMs and the combine.

Router (shared/ERNIE.md section 1, MoE block): fp32 logits ``x.float() @ W_gate.T``, softmax,
top-k on ``probs + e_score_correction_bias`` (selection only), weights gathered from the
unbiased probs, renormalised by ``clamp(sum, 1e-12)`` and rounded to bf16.

Experts: ``w13 [E, 2*I, H]`` (gate rows first, then up) and ``w2 [E, H, I]`` in any of the
formats of ``wlinear`` (bf16; int8 + scales ``[E, N]``; int4 packed along K ``[E, N, K/2]`` uint8
+ scales ``[E, N]``). Tokens are sorted by expert and each expert's list is padded to the tile
height ``BM`` (``moe_align``), so every M tile of the grouped GEMMs reads one expert's weights.
Kernel 1 computes ``silu(x W_gate^T) * (x W_up^T)`` per (token, expert) pair; kernel 2 the down
projection times the routing weight; the combine sums the k pairs of each token in fp32 (plus an
optional shared-expert output) and rounds once to bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import on_kernel_device, require
from .wlinear import TUNED, _wq_tile, _wq_tile_t, check_weight, m_bucket, weight_view

_BF16 = torch.bfloat16
# TRITON_INTERPRET=1 runs the kernels on CPU tensors (debugging without a GPU)
_BITS = {torch.bfloat16: 16, torch.int8: 8, torch.uint8: 4}


# ----------------------------------------------------------------------------------- router


@triton.jit(do_not_specialize=["T"])
def _router_logits_kernel(x_ptr, w_ptr, out_ptr, T, E, K, s_xt, s_we,
                          BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_e = pid_e * BE + tl.arange(0, BE)
    offs_k = tl.arange(0, BK)
    tmask = offs_t < T
    emask = offs_e < E
    acc = tl.zeros([BT, BE, BK], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        kmask = kk < K
        x = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * s_xt + kk[None, :],
                    mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_e[:, None] * s_we + kk[None, :],
                    mask=emask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
    logits = tl.sum(acc, 2)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * E + offs_e[None, :], logits,
             mask=tmask[:, None] & emask[None, :])


@triton.jit(do_not_specialize=["T"])
def _topk_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, T, E,
                 TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr,
                 KP: tl.constexpr):
    pid = tl.program_id(0)
    offs_t = pid * BT + tl.arange(0, BT)
    offs_e = tl.arange(0, EP)
    offs_k = tl.arange(0, KP)
    tmask = offs_t < T
    emask = offs_e < E
    lg = tl.load(logits_ptr + offs_t.to(tl.int64)[:, None] * E + offs_e[None, :],
                 mask=tmask[:, None] & emask[None, :], other=float("-inf"))
    mx = tl.max(lg, 1)
    ex = tl.exp(lg - mx[:, None])
    ex = tl.where(emask[None, :], ex, 0.0)
    probs = ex / tl.sum(ex, 1)[:, None]
    if HAS_BIAS:
        sel = probs + tl.load(bias_ptr + offs_e, mask=emask, other=0.0).to(tl.float32)[None, :]
    else:
        sel = probs
    sel = tl.where(emask[None, :], sel, float("-inf"))
    sel = tl.where(sel != sel, -1e30, sel)  # NaN never wins, never indexes out of range
    sel = tl.where(emask[None, :], sel, float("-inf"))
    wk = tl.zeros([BT, KP], tl.float32)
    ik = tl.zeros([BT, KP], tl.int32)
    for j in tl.static_range(TOPK):
        idx = tl.argmax(sel, 1)
        idx = tl.minimum(tl.maximum(idx, 0), E - 1)
        hit = offs_e[None, :] == idx[:, None]
        wj = tl.sum(tl.where(hit, probs, 0.0), 1)
        wk = tl.where(offs_k[None, :] == j, wj[:, None], wk)
        ik = tl.where(offs_k[None, :] == j, idx[:, None], ik)
        sel = tl.where(hit, float("-inf"), sel)
    denom = tl.maximum(tl.sum(wk, 1), 1e-12)
    wk = wk / denom[:, None]
    kmask = tmask[:, None] & (offs_k[None, :] < TOPK)
    dst = offs_t.to(tl.int64)[:, None] * TOPK + offs_k[None, :]
    tl.store(ids_ptr + dst, ik, mask=kmask)
    tl.store(w_ptr + dst, wk.to(tl.bfloat16), mask=kmask)


def moe_route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    top_k: int,
    e_score_correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ERNIE's router. x ``[T, H]`` bf16, gate_weight ``[E, H]`` (fp32 preferred; any float),
    bias ``[E]`` or ``[1, E]`` fp32. Returns ``(topk_weights bf16 [T, k], topk_ids int32 [T, k])``."""
    require(on_kernel_device(x), "x must be a CUDA tensor")
    require(x.dim() == 2 and x.dtype == _BF16 and x.stride(1) == 1, "x must be bf16 [T, H] with contiguous rows")
    require(isinstance(gate_weight, torch.Tensor) and gate_weight.device == x.device,
             "gate_weight must be a tensor on x's device")
    require(gate_weight.dim() == 2 and gate_weight.shape[1] == x.shape[1],
             f"gate_weight must be [E, {x.shape[1]}], got {tuple(gate_weight.shape)}")
    require(gate_weight.is_floating_point() and gate_weight.stride(1) == 1,
             "gate_weight must be a float tensor with contiguous rows")
    T, H = x.shape
    E = gate_weight.shape[0]
    require(1 <= top_k <= E, f"top_k must be in [1, {E}], got {top_k}")
    if e_score_correction_bias is not None:
        b = e_score_correction_bias
        require(isinstance(b, torch.Tensor) and b.device == x.device, "bias must be a tensor on x's device")
        require(b.numel() == E, f"e_score_correction_bias must have {E} elements, got {b.numel()}")
        b = b.reshape(E)
        require(b.is_contiguous() and b.is_floating_point(), "e_score_correction_bias must be a contiguous float tensor")
    else:
        b = None
    ids = torch.empty((T, top_k), dtype=torch.int32, device=x.device)
    wts = torch.empty((T, top_k), dtype=_BF16, device=x.device)
    if T == 0:
        return wts, ids
    logits = torch.empty((T, E), dtype=torch.float32, device=x.device)
    # enough programs to spread the fp32 gate (E x H x 4 bytes) over the SMs at any T
    if T <= 4:
        BT, BE, BK = 1, 1, 512
    elif T <= 64:
        BT, BE, BK = 4, 4, 128
    else:
        BT, BE, BK = 8, 8, 64
    _router_logits_kernel[(triton.cdiv(T, BT), triton.cdiv(E, BE))](
        x, gate_weight, logits, T, E, H, x.stride(0), gate_weight.stride(0),
        BT=BT, BE=BE, BK=BK, num_warps=4,
    )
    EP = triton.next_power_of_2(E)
    BT2 = max(1, min(16, 2048 // EP))
    _topk_kernel[(triton.cdiv(T, BT2),)](
        logits, b if b is not None else logits, ids, wts, T, E,
        TOPK=top_k, HAS_BIAS=b is not None, BT=BT2, EP=EP, KP=triton.next_power_of_2(top_k), num_warps=4,
    )
    return wts, ids


# ------------------------------------------------------------------------------------ align


@triton.jit(do_not_specialize=["num_pairs"])
def _align_kernel(ids_ptr, sorted_ptr, eids_ptr, npad_ptr, num_pairs, E,
                  BM: tl.constexpr, EP: tl.constexpr, CH: tl.constexpr):
    """One program per expert: count every expert's pairs (histogram), place this expert's
    padded range after the ranges of the experts before it, write its pairs there in order,
    its padding (sentinel ``num_pairs``) and the expert id of each of its M tiles."""
    e = tl.program_id(0)
    offs_c = tl.arange(0, CH)
    offs_e = tl.arange(0, EP)
    counts = tl.zeros([EP], tl.int32)
    for c0 in range(0, num_pairs, CH):
        m = c0 + offs_c < num_pairs
        ids = tl.load(ids_ptr + c0 + offs_c, mask=m, other=0)
        ids = tl.minimum(tl.maximum(ids, 0), E - 1)
        counts += tl.histogram(ids, EP, mask=m)
    padded = (counts + BM - 1) // BM * BM
    starts = tl.cumsum(padded, 0) - padded
    mine = offs_e == e
    my_start = tl.sum(tl.where(mine, starts, 0), 0)
    my_cnt = tl.sum(tl.where(mine, counts, 0), 0)
    my_pad = tl.sum(tl.where(mine, padded, 0), 0)
    if e == 0:
        tl.store(npad_ptr, tl.sum(padded, 0))
    for b0 in range(0, my_pad // BM, CH):
        bb = b0 + offs_c
        tl.store(eids_ptr + my_start // BM + bb, tl.zeros([CH], tl.int32) + e, mask=bb < my_pad // BM)
    offs_bm = tl.arange(0, BM)
    tail = my_cnt + offs_bm
    tl.store(sorted_ptr + my_start + tail, tl.zeros([BM], tl.int32) + num_pairs, mask=tail < my_pad)
    running = my_start
    for c0 in range(0, num_pairs, CH):
        m = c0 + offs_c < num_pairs
        ids = tl.load(ids_ptr + c0 + offs_c, mask=m, other=0)
        ids = tl.minimum(tl.maximum(ids, 0), E - 1)
        hit = ((ids == e) & m).to(tl.int32)
        rank = tl.cumsum(hit, 0) - 1
        tl.store(sorted_ptr + running + rank, (c0 + offs_c).to(tl.int32), mask=hit > 0)
        running += tl.sum(hit, 0)


def align_bounds(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """Static upper bounds (max padded pairs, max M tiles) of ``moe_align``'s output."""
    max_pad = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    max_blocks = triton.cdiv(max_pad, block_m)
    return max_blocks * block_m, max_blocks


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort the ``T*k`` (token, expert) pairs by expert, padding each expert's list to a multiple
    of ``block_m``. Returns ``(sorted_pair_ids int32 [max_pad] (padding = T*k), expert_of_tile
    int32 [max_blocks], num_padded int32 [1])``; pair ``p`` is token ``p // k``, slot ``p % k``.
    Sizes depend only on the shapes, so the call can be captured in a CUDA graph."""
    require(on_kernel_device(topk_ids), "topk_ids must be a CUDA tensor")
    require(topk_ids.dtype == torch.int32 and topk_ids.is_contiguous(), "topk_ids must be contiguous int32")
    require(block_m >= 16 and (block_m & (block_m - 1)) == 0, f"block_m must be a power of two >= 16, got {block_m}")
    num_pairs = topk_ids.numel()
    max_pad, max_blocks = align_bounds(num_pairs, num_experts, block_m)
    dev = topk_ids.device
    sorted_ids = torch.empty((max(max_pad, 1),), dtype=torch.int32, device=dev)
    expert_ids = torch.empty((max(max_blocks, 1),), dtype=torch.int32, device=dev)
    npad = torch.empty((1,), dtype=torch.int32, device=dev)
    _align_kernel[(num_experts,)](
        topk_ids, sorted_ids, expert_ids, npad, num_pairs, num_experts,
        BM=block_m, EP=triton.next_power_of_2(num_experts), CH=256, num_warps=4,
    )
    return sorted_ids, expert_ids, npad


# --------------------------------------------------------------------------- grouped GEMMs


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_gemm_kernel(
    a_ptr, w_ptr, s_ptr, c_ptr, sorted_ptr, eids_ptr, npad_ptr, topw_ptr,
    N_OUT, K, num_pairs, top_k, num_experts,
    s_am, s_we, s_wn, s_se, s_cm,
    BITS: tl.constexpr, SWIGLU: tl.constexpr, MUL_W: tl.constexpr, A_BY_PAIR: tl.constexpr,
    CVT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
    SWAP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    npad = tl.load(npad_ptr)
    if pid_m * BM >= npad:
        return
    e = tl.load(eids_ptr + pid_m).to(tl.int64)
    if e >= num_experts:  # the tiles of pairs routed to experts held elsewhere (EP): skipped
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    pairs = tl.load(sorted_ptr + offs_m)
    pvalid = pairs < num_pairs
    if A_BY_PAIR:
        arow = pairs
    else:
        arow = pairs // top_k
    m_mask = pvalid[:, None]
    offs_n = pid_n * BN + tl.arange(0, BN)
    nvalid = offs_n < N_OUT
    n_mask = nvalid[:, None]
    a_rows = a_ptr + arow.to(tl.int64)[:, None] * s_am
    w_base = w_ptr + e * s_we
    w_rows = w_base + offs_n.to(tl.int64)[:, None] * s_wn
    if SWIGLU:
        u_rows = w_base + (offs_n + N_OUT).to(tl.int64)[:, None] * s_wn
    else:
        u_rows = w_rows
    if SWAP:
        acc_t = _wq_tile_t(a_ptr, arow, pvalid, s_am, w_rows, u_rows, n_mask, s_ptr + e * s_se, offs_n, nvalid,
                           N_OUT, K, BITS, BM, BN, BK, EVEN_K, SWIGLU, CVT)
        if MUL_W:
            tw = tl.load(topw_ptr + pairs, mask=pvalid, other=0.0).to(tl.float32)
            acc_t = acc_t * tw[None, :]
        c = c_ptr + pairs.to(tl.int64)[None, :] * s_cm + offs_n[:, None]
        tl.store(c, acc_t.to(tl.bfloat16), mask=pvalid[None, :] & n_mask)
    else:
        acc = _wq_tile(a_rows, m_mask, w_rows, u_rows, n_mask, s_ptr + e * s_se, offs_n, nvalid, N_OUT, K,
                       BITS, BM, BN, BK, EVEN_K, SWIGLU, CVT)
        if MUL_W:
            tw = tl.load(topw_ptr + pairs, mask=pvalid, other=0.0).to(tl.float32)
            acc = acc * tw[:, None]
        c = c_ptr + pairs.to(tl.int64)[:, None] * s_cm + offs_n[None, :]
        tl.store(c, acc.to(tl.bfloat16), mask=m_mask & nvalid[None, :])


@triton.jit
def _combine_kernel(p_ptr, sh_ptr, out_ptr, H, s_pm, s_sh, s_o,
                    TOPK: tl.constexpr, HAS_SHARED: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BH + tl.arange(0, BH)
    m = offs < H
    acc = tl.zeros([BH], tl.float32)
    for j in tl.static_range(TOPK):
        acc += tl.load(p_ptr + (t * TOPK + j) * s_pm + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(sh_ptr + t * s_sh + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * s_o + offs, acc.to(tl.bfloat16), mask=m)


def moe_block_m(num_pairs: int, num_experts: int) -> int:
    """M tile of the grouped GEMMs: 16 while experts see a handful of tokens each (decode)."""
    per_expert = num_pairs / max(1, num_experts)
    if per_expert <= 16:
        return 16
    if per_expert <= 48:
        return 32
    if per_expert <= 160:
        return 64
    return 128


def default_moe_config(block_m: int, n_out: int, K: int, bits: int, swiglu: bool, num_pairs: int) -> dict:
    """Tiles from the H100 sweeps (bench/gpu_bench.py --tune, 2026-11-25; int4 decode and bf16
    prefill were swept, the other cases are the first guesses that ran in the same bench); int4
    from the H200 sweep of bench/kernel_variants.py (2026-12-02): the transposed tile (``SWAP``,
    the dequantized weight as wgmma's register operand) is 3.7x (up) and 5.5x (down) faster at a
    2K prefill and 1.2-1.6x at 16-64 decode rows; only the up projection of a handful of pairs
    keeps the plain tile."""
    if bits == 4 and not (block_m <= 16 and num_pairs <= 64 and swiglu):
        if block_m <= 16:
            return {"SWAP": 1, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4}
        if swiglu:
            return {"SWAP": 1, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 3}
        return {"SWAP": 1, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 4}
    if block_m <= 16:
        if bits == 4:
            if num_pairs <= 64:
                if swiglu:
                    return {"BN": 32, "BK": 256, "num_warps": 4, "num_stages": 4}
                return {"BN": 64, "BK": 256, "num_warps": 8, "num_stages": 3}
            return {"BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4}
        return {"BN": 32, "BK": 128, "num_warps": 4, "num_stages": 4}
    if block_m <= 32:
        return {"BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4}
    if block_m <= 64:
        return {"BN": 64 if swiglu else 128, "BK": 64, "num_warps": 4, "num_stages": 3}
    return {"BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}


def moe_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor | None,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    npad: torch.Tensor,
    top_k: int,
    block_m: int,
    *,
    swiglu: bool,
    topk_weights: torch.Tensor | None = None,
    a_by_pair: bool = False,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """One grouped GEMM over the sorted pairs; returns ``[T*k, N or N/2]`` bf16 indexed by pair.
    ``a`` is ``[T, K]`` (rows are tokens) or, with ``a_by_pair``, ``[T*k, K]`` (rows are pairs)."""
    bits = _BITS.get(w.dtype)
    require(bits is not None, f"expert weights must be bf16, int8 or uint8 (int4), got {w.dtype}")
    require(a.dim() == 2 and a.dtype == _BF16 and a.stride(1) == 1, "a must be bf16 [rows, K] with contiguous rows")
    K = a.shape[1]
    E = w.shape[0]
    N = check_weight("w", w, scales, bits, None, K, expert_dim=E)
    n_out = N // 2 if swiglu else N
    num_pairs = (a.shape[0] if a_by_pair else a.shape[0] * top_k)
    if out is None:
        out = torch.empty((num_pairs, n_out), dtype=_BF16, device=a.device)
    max_blocks = expert_ids.shape[0]
    if num_pairs == 0:
        return out
    cfg = config or TUNED.get(("moe", m_bucket(num_pairs), N, K, bits, swiglu)) or default_moe_config(
        block_m, n_out, K, bits, swiglu, num_pairs)
    BN, BK = cfg["BN"], cfg["BK"]
    wv, s_wn, cvt = weight_view(w, bits, cfg)
    grid = (max_blocks, triton.cdiv(n_out, BN))
    _moe_gemm_kernel[grid](
        a, wv, scales if scales is not None else w, out, sorted_ids, expert_ids, npad,
        topk_weights if topk_weights is not None else out,
        n_out, K, num_pairs, top_k, E,
        a.stride(0), wv.stride(0), s_wn, scales.stride(0) if scales is not None else 0, out.stride(0),
        BITS=bits, SWIGLU=swiglu, MUL_W=topk_weights is not None, A_BY_PAIR=a_by_pair,
        CVT=cvt, BM=block_m, BN=BN, BK=BK, EVEN_K=(K % BK == 0), SWAP=bool(cfg.get("SWAP", 0)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def moe_combine(pair_out: torch.Tensor, top_k: int, shared: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = bf16(sum_j pair_out[t*k + j] (+ shared[t]))`` with fp32 accumulation."""
    require(pair_out.dim() == 2 and pair_out.dtype == _BF16 and pair_out.stride(1) == 1,
             "pair_out must be bf16 [T*k, H] with contiguous rows")
    require(pair_out.shape[0] % top_k == 0, "pair_out rows must be a multiple of top_k")
    T, H = pair_out.shape[0] // top_k, pair_out.shape[1]
    if shared is not None:
        require(shared.shape == (T, H) and shared.dtype == _BF16 and shared.stride(1) == 1
                 and shared.device == pair_out.device, f"shared must be bf16 [{T}, {H}] on {pair_out.device}")
    if out is None:
        out = torch.empty((T, H), dtype=_BF16, device=pair_out.device)
    if T == 0:
        return out
    BH = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, BH))](
        pair_out, shared if shared is not None else pair_out, out, H,
        pair_out.stride(0), shared.stride(0) if shared is not None else 0, out.stride(0),
        TOPK=top_k, HAS_SHARED=shared is not None, BH=BH, num_warps=4,
    )
    return out


def fused_moe(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    e_score_correction_bias: torch.Tensor | None = None,
    w13_scales: torch.Tensor | None = None,
    w2_scales: torch.Tensor | None = None,
    shared_out: torch.Tensor | None = None,
    block_m: int | None = None,
    configs: tuple[dict | None, dict | None] = (None, None),
    return_pairs: bool = False,
    expert_start: int | None = None,
) -> torch.Tensor:
    """ERNIE MoE block (routed experts; add the shared expert's output via ``shared_out``).

    x ``[T, H]`` bf16; gate_weight ``[E, H]`` fp32; w13 ``[E, 2I, H]`` / w2 ``[E, H, I]`` as bf16,
    int8 (+ scales ``[E, N]``) or uint8 int4-packed along K (``[E, 2I, H/2]`` / ``[E, H, I/2]``,
    + scales). Returns ``[T, H]`` bf16, or with ``return_pairs`` the uncombined ``[T*k, H]``
    (weighted expert outputs, pair ``t*k + j``) for ``moe_combine_add_rmsnorm``.

    Expert parallel: with ``expert_start`` the gate routes over all of the model's experts
    (``gate_weight [E_all, H]``) while w13 / w2 hold only experts ``expert_start ..
    expert_start + E - 1``; pairs routed elsewhere contribute zero (their rows of the pair output
    are zero), so summing every rank's output gives the whole MoE."""
    require(on_kernel_device(x), "x must be a CUDA tensor")
    require(x.dim() == 2 and x.dtype == _BF16 and x.stride(1) == 1, "x must be bf16 [T, H] with contiguous rows")
    T, H = x.shape
    for name, t in (("w13", w13), ("w2", w2)):
        require(isinstance(t, torch.Tensor) and t.device == x.device, f"{name} must be a tensor on {x.device}")
        require(t.dim() == 3, f"{name} must be 3-D [E, N, K], got {tuple(t.shape)}")
    require(w13.dtype == w2.dtype, f"w13 ({w13.dtype}) and w2 ({w2.dtype}) formats differ")
    bits = _BITS.get(w13.dtype)
    require(bits is not None, f"expert weights must be bf16, int8 or uint8 (int4), got {w13.dtype}")
    E = w13.shape[0]
    if expert_start is None:
        require(gate_weight.shape[0] == E, f"gate_weight has {gate_weight.shape[0]} experts, w13 has {E}")
    else:
        require(0 <= expert_start and expert_start + E <= gate_weight.shape[0],
                 f"experts {expert_start}..{expert_start + E - 1} are not among the gate's {gate_weight.shape[0]}")
    two_i = check_weight("w13", w13, w13_scales, bits, None, H, expert_dim=E)
    require(two_i % 2 == 0, f"w13 N must be 2*I, got {two_i}")
    inter = two_i // 2
    check_weight("w2", w2, w2_scales, bits, H, inter, expert_dim=E)
    topk_w, topk_ids = moe_route(x, gate_weight, top_k, e_score_correction_bias)
    num_pairs = T * top_k
    groups, h2 = E, None
    if expert_start is not None:
        # local expert ids; pairs of other ranks' experts go to one extra group, whose tiles the
        # GEMMs skip (e >= E), leaving their rows of the zero-filled output at zero
        rel = topk_ids - expert_start
        topk_ids = torch.where((rel >= 0) & (rel < E), rel, E).to(torch.int32).contiguous()
        groups = E + 1
        h2 = torch.zeros((num_pairs, H), dtype=_BF16, device=x.device)
    if block_m is None:
        block_m = moe_block_m(num_pairs, groups)
    sorted_ids, expert_ids, npad = moe_align(topk_ids, groups, block_m)
    h1 = moe_gemm(x, w13, w13_scales, sorted_ids, expert_ids, npad, top_k, block_m,
                  swiglu=True, config=configs[0])
    h2 = moe_gemm(h1, w2, w2_scales, sorted_ids, expert_ids, npad, top_k, block_m,
                  swiglu=False, topk_weights=topk_w.view(-1), a_by_pair=True, out=h2, config=configs[1])
    if return_pairs:
        require(shared_out is None, "return_pairs leaves the shared expert to the combine: pass shared_out there")
        return h2
    return moe_combine(h2, top_k, shared_out)
