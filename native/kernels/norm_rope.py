"""RMSNorm (with the residual add fused in), interleaved RoPE and the paged-KV store.

ERNIE's cast order (shared/ERNIE.md section 1): the residual add rounds to bf16, the norm is
computed in fp32 and cast to bf16 *before* the multiply by the weight. RoPE rotates interleaved
pairs ``(2i, 2i+1)`` by ``pos * inv_freq[i]`` in fp32, ``inv_freq`` built exactly as transformers
builds it (``1 / theta ** (arange(0, hd, 2) / hd)`` in fp32) so the angles match bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_int_vec, check_kv_caches, require, require_cuda

_BF16 = torch.bfloat16
# TRITON_INTERPRET=1 runs the kernels on CPU tensors (debugging without a GPU)


# ------------------------------------------------------------------------------------ rmsnorm


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    sh_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_sh,
    N,
    eps,
    HAS_RES: tl.constexpr,
    KX: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    if KX == 1:
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    else:  # MoE combine: x = bf16(sum of the KX pair rows of this token (+ shared)) in fp32
        x = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(KX):
            x += tl.load(x_ptr + (row * KX + j) * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHARED:
        x += tl.load(sh_ptr + row * stride_sh + offs, mask=mask, other=0.0).to(tl.float32)
    if KX != 1 or HAS_SHARED:
        x = x.to(tl.bfloat16).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(tl.bfloat16)
        tl.store(res_ptr + row * stride_r + offs, h, mask=mask)
        h32 = h.to(tl.float32)
    else:
        h32 = x
    var = tl.sum(h32 * h32, axis=0) / N
    y = (h32 * tl.rsqrt(var + eps)).to(tl.bfloat16)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = (y.to(tl.float32) * w.to(tl.float32)).to(tl.bfloat16)
    tl.store(out_ptr + row * stride_o + offs, out, mask=mask)


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None) -> None:
    require_cuda(("x", x), ("weight", weight))
    require(x.dim() == 2, f"x must be 2-D [T, H], got shape {tuple(x.shape)}")
    require(x.dtype == _BF16, f"x must be bfloat16, got {x.dtype}")
    require(weight.dtype == _BF16, f"weight must be bfloat16, got {weight.dtype}")
    require(weight.shape == (x.shape[1],), f"weight must be [{x.shape[1]}], got {tuple(weight.shape)}")
    require(weight.stride(0) == 1, "weight must be contiguous")
    require(x.stride(1) == 1, "x rows must be contiguous (stride(1) == 1)")
    if out is not None:
        require_cuda(("out", out), ("x", x))
        require(out.shape == x.shape and out.dtype == _BF16, "out must be a bfloat16 tensor shaped like x")
        require(out.stride(1) == 1, "out rows must be contiguous")


def _launch_rmsnorm(x, residual, weight, out, eps):
    """One program a row: rmsnorm of x (with ``residual`` given: of ``residual += x``)."""
    if out is None:
        out = torch.empty_like(x)
    T, H = x.shape
    if T == 0:
        return out
    BLOCK = triton.next_power_of_2(H)
    has_res = residual is not None
    _rmsnorm_kernel[(T,)](
        x, residual if has_res else x, weight, out, x,
        x.stride(0), residual.stride(0) if has_res else 0, out.stride(0), 0, H, eps,
        HAS_RES=has_res, KX=1, HAS_SHARED=False, BLOCK=BLOCK, num_warps=8 if BLOCK >= 4096 else 4,
    )
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out = bf16(x * rsqrt(mean(x^2) + eps)) * weight`` row-wise; x ``[T, H]`` bf16."""
    _check_norm_args(x, weight, out)
    return _launch_rmsnorm(x, None, weight, out, eps)


def fused_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual += x`` (in place, rounded to bf16), then return ``rmsnorm(residual)``."""
    _check_norm_args(x, weight, out)
    require_cuda(("residual", residual), ("x", x))
    require(residual.shape == x.shape, f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    require(residual.dtype == _BF16, f"residual must be bfloat16, got {residual.dtype}")
    require(residual.stride(1) == 1, "residual rows must be contiguous")
    return _launch_rmsnorm(x, residual, weight, out, eps)


def moe_combine_add_rmsnorm(
    pair_out: torch.Tensor,
    top_k: int,
    shared: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoE combine fused into the next norm: ``moe = bf16(sum_j pair_out[t*k+j] (+ shared[t]))``
    (fp32 sum), ``residual += moe`` (bf16), returns ``rmsnorm(residual)``. ``pair_out`` is
    ``[T*k, H]`` as ``fused_moe(..., return_pairs=True)`` gives it."""
    require_cuda(("pair_out", pair_out), ("residual", residual), ("weight", weight))
    require(pair_out.dim() == 2 and pair_out.dtype == _BF16 and pair_out.stride(1) == 1,
             "pair_out must be bf16 [T*k, H] with contiguous rows")
    require(top_k >= 1 and pair_out.shape[0] == residual.shape[0] * top_k,
             f"pair_out has {pair_out.shape[0]} rows, expected {residual.shape[0]} x top_k={top_k}")
    _check_norm_args(residual, weight, out)
    T, H = residual.shape
    require(pair_out.shape[1] == H, f"pair_out width {pair_out.shape[1]} != {H}")
    if shared is not None:
        require_cuda(("shared", shared), ("residual", residual))
        require(shared.shape == (T, H) and shared.dtype == _BF16 and shared.stride(1) == 1,
                 f"shared must be bf16 [{T}, {H}] with contiguous rows")
    if out is None:
        out = torch.empty_like(residual)
    if T == 0:
        return out
    BLOCK = triton.next_power_of_2(H)
    _rmsnorm_kernel[(T,)](
        pair_out, residual, weight, out, shared if shared is not None else pair_out,
        pair_out.stride(0), residual.stride(0), out.stride(0), shared.stride(0) if shared is not None else 0,
        H, eps, HAS_RES=True, KX=top_k, HAS_SHARED=shared is not None, BLOCK=BLOCK,
        num_warps=8 if BLOCK >= 4096 else 4,
    )
    return out


# --------------------------------------------------------------------------------------- rope

_INV_FREQ: dict[tuple[float, int, torch.device], torch.Tensor] = {}


def rope_inv_freq(theta: float, head_dim: int, device: torch.device) -> torch.Tensor:
    """``inv_freq[i] = 1 / theta ** (2i / hd)`` in fp32, computed the way transformers does."""
    key = (float(theta), int(head_dim), torch.device(device))
    t = _INV_FREQ.get(key)
    if t is None:
        exps = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        t = (1.0 / (float(theta) ** exps)).to(torch.float32).to(device)
        _INV_FREQ[key] = t
    return t


@triton.jit
def _rope_tile(base_ptr, s_tok, s_head, t, n_heads, cosv, sinv, HEADS: tl.constexpr, HD: tl.constexpr,
               DO_ROPE: tl.constexpr):
    """Load a token's [heads, hd] tile (contiguous rows) and rotate its interleaved pairs."""
    offs_h = tl.arange(0, HEADS)
    offs_d = tl.arange(0, HD)
    hmask = (offs_h < n_heads)[:, None]
    x = tl.load(base_ptr + t * s_tok + offs_h[:, None] * s_head + offs_d[None, :], mask=hmask, other=0.0)
    if DO_ROPE:
        x0, x1 = tl.split(tl.reshape(x.to(tl.float32), [HEADS, HD // 2, 2]))
        o0 = x0 * cosv[None, :] - x1 * sinv[None, :]
        o1 = x1 * cosv[None, :] + x0 * sinv[None, :]
        x = tl.reshape(tl.join(o0, o1), [HEADS, HD]).to(tl.bfloat16)
    return x


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, slot_ptr, kc_ptr, vc_ptr,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh,
    s_cb, s_ch, s_cs,
    n_qh, n_kh, block_size,
    QH: tl.constexpr, KH: tl.constexpr, HALF: tl.constexpr,
    DO_ROPE: tl.constexpr, ROPE_K_INPLACE: tl.constexpr, DO_STORE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    HD: tl.constexpr = 2 * HALF
    offs_d = tl.arange(0, HD)
    if DO_ROPE:
        ang = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + tl.arange(0, HALF))
        cosv = tl.cos(ang)
        sinv = tl.sin(ang)
        q = _rope_tile(q_ptr, s_qt, s_qh, t, n_qh, cosv, sinv, QH, HD, True)
        offs_qh = tl.arange(0, QH)
        tl.store(q_ptr + t * s_qt + offs_qh[:, None] * s_qh + offs_d[None, :], q,
                 mask=(offs_qh < n_qh)[:, None])
    else:
        cosv = tl.zeros([HALF], tl.float32)
        sinv = cosv
    k = _rope_tile(k_ptr, s_kt, s_kh, t, n_kh, cosv, sinv, KH, HD, DO_ROPE)
    offs_kh = tl.arange(0, KH)
    km = (offs_kh < n_kh)[:, None]
    if ROPE_K_INPLACE:
        tl.store(k_ptr + t * s_kt + offs_kh[:, None] * s_kh + offs_d[None, :], k, mask=km)
    if DO_STORE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            blk = slot // block_size
            off = slot % block_size
            cbase = blk * s_cb + off * s_cs + offs_kh[:, None] * s_ch + offs_d[None, :]
            tl.store(kc_ptr + cbase, k, mask=km)
            v = tl.load(v_ptr + t * s_vt + offs_kh[:, None] * s_vh + offs_d[None, :], mask=km, other=0.0)
            tl.store(vc_ptr + cbase, v, mask=km)


def _check_heads(name: str, t: torch.Tensor, T: int | None, hd: int | None) -> None:
    require(t.dim() == 3, f"{name} must be 3-D [T, heads, head_dim], got shape {tuple(t.shape)}")
    require(t.dtype == _BF16, f"{name} must be bfloat16, got {t.dtype}")
    require(t.stride(2) == 1, f"{name} must have a contiguous last dim")
    if T is not None:
        require(t.shape[0] == T, f"{name} has {t.shape[0]} tokens, expected {T}")
    if hd is not None:
        require(t.shape[2] == hd, f"{name} head_dim {t.shape[2]} != {hd}")


def _check_cache(k: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    require_cuda(("k_cache", k_cache), ("v_cache", v_cache), ("k", k))
    check_kv_caches(k_cache, v_cache)
    require(k_cache.shape[1] == k.shape[1], f"cache has {k_cache.shape[1]} kv heads, k has {k.shape[1]}")
    require(k_cache.shape[3] == k.shape[2], f"cache head_dim {k_cache.shape[3]} != k head_dim {k.shape[2]}")


def rope_interleaved(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """Rotate q ``[T, nh, hd]`` and k ``[T, kvh, hd]`` (bf16, views allowed) **in place**; returns them."""
    require_cuda(("q", q), ("k", k), ("positions", positions))
    T = q.shape[0]
    _check_heads("q", q, None, None)
    hd = q.shape[2]
    _check_heads("k", k, T, hd)
    require(hd % 2 == 0 and (hd & (hd - 1)) == 0, f"head_dim must be a power of two, got {hd}")
    check_int_vec("positions", positions, T)
    if T == 0:
        return q, k
    inv = rope_inv_freq(theta, hd, q.device)
    _rope_store_kernel[(T,)](
        q, k, k, positions, inv, positions, k, k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), 0, 0,
        0, 0, 0,
        q.shape[1], k.shape[1], 1,
        QH=triton.next_power_of_2(q.shape[1]), KH=triton.next_power_of_2(k.shape[1]), HALF=hd // 2,
        DO_ROPE=True, ROPE_K_INPLACE=True, DO_STORE=False, num_warps=4,
    )
    return q, k


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v ``[T, kvh, hd]`` into the paged caches at ``slot_mapping`` (``-1`` = skip)."""
    require_cuda(("k", k), ("v", v), ("slot_mapping", slot_mapping))
    _check_heads("k", k, None, None)
    T, hd = k.shape[0], k.shape[2]
    _check_heads("v", v, T, hd)
    require(v.shape == k.shape, f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    _check_cache(k, k_cache, v_cache)
    check_int_vec("slot_mapping", slot_mapping, T)
    if T == 0:
        return
    _rope_store_kernel[(T,)](
        k, k, v, slot_mapping, slot_mapping, slot_mapping, k_cache, v_cache,
        0, 0, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        0, k.shape[1], k_cache.shape[2],
        QH=1, KH=triton.next_power_of_2(k.shape[1]), HALF=hd // 2,
        DO_ROPE=False, ROPE_K_INPLACE=False, DO_STORE=True, num_warps=4,
    )


def rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Fused ``rope_interleaved`` + ``store_kv``: q is rotated in place (and returned); the rotated
    k goes only to the cache (k itself is left unrotated), v is copied to the cache."""
    require_cuda(("q", q), ("k", k), ("v", v), ("positions", positions), ("slot_mapping", slot_mapping))
    _check_heads("q", q, None, None)
    T, hd = q.shape[0], q.shape[2]
    require(hd % 2 == 0 and (hd & (hd - 1)) == 0, f"head_dim must be a power of two, got {hd}")
    _check_heads("k", k, T, hd)
    _check_heads("v", v, T, hd)
    require(v.shape == k.shape, f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    _check_cache(k, k_cache, v_cache)
    check_int_vec("positions", positions, T)
    check_int_vec("slot_mapping", slot_mapping, T)
    if T == 0:
        return q
    inv = rope_inv_freq(theta, hd, q.device)
    _rope_store_kernel[(T,)](
        q, k, v, positions, inv, slot_mapping, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        q.shape[1], k.shape[1], k_cache.shape[2],
        QH=triton.next_power_of_2(q.shape[1]), KH=triton.next_power_of_2(k.shape[1]), HALF=hd // 2,
        DO_ROPE=True, ROPE_K_INPLACE=False, DO_STORE=True, num_warps=4,
    )
    return q
