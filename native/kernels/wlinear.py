"""Weight-only quantized linear layers: ``y = x @ dequant(W).T`` with bf16 activations.

Weight formats (shared/ERNIE.md section 5; symmetric, per output channel, zero point 0):

* ``bits=16``: ``W`` bf16 ``[N, K]``, ``scales`` None.
* ``bits=8``:  ``W`` int8 ``[N, K]`` in [-127, 127], ``scales`` bf16 ``[N]``; ``w = q * s``.
* ``bits=4``:  ``W`` uint8 ``[N, K/2]``, two values per byte along K: the even k in the low
  nibble, each stored as ``q + 8`` with q in [-7, 7]; ``scales`` bf16 ``[N]``; ``w = (nib - 8) * s``.

The weights are dequantized inside the K loop and multiplied on the tensor cores with fp32
accumulation; the per-channel scale is applied once, in the epilogue. ``act="swiglu"`` fuses
``silu(gate) * up`` where the first N/2 rows of W are the gate and the last N/2 the up projection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import INTERPRET, on_kernel_device, require
from .dequant import dequantize

_BF16 = torch.bfloat16
# TRITON_INTERPRET=1 runs the kernels on CPU tensors (debugging without a GPU)
_WDTYPE = {16: torch.bfloat16, 8: torch.int8, 4: torch.uint8}

# (kind, m_bucket, N, K, bits, swiglu) -> config dict; filled by tuning (bench/gpu_bench.py).
TUNED: dict[tuple, dict] = {}
# Dequantization path per weight bits (see _wq_step), from the H100 sweeps: the PTX path (2)
# made the int4 MoE GEMMs 1.3-2x faster than plain casts (0); for int8 the plain cast was ~5%
# faster. The PTX path does not run under TRITON_INTERPRET.
DEFAULT_CVT = {4: 0 if INTERPRET else 2, 8: 0}


def m_bucket(m: int) -> int:
    for b in (1, 16, 32, 64, 128, 256, 512):
        if m <= b:
            return b
    return 1024


# int4 -> bf16 without integer-to-float conversions: for each byte, ``nib | 0x4300`` is the bf16
# number 128 + nib; one fma.bf16x2 takes 136 off two values at once (exact: the results are
# the integers -8..7). Four bytes in, (low nibbles, high nibbles) out, two bf16 per register.
_I4_ASM = tl.constexpr("""
{
.reg .b32 t, u, one, off;
mov.b32 one, 0x3F803F80;
mov.b32 off, 0xC308C308;
prmt.b32 t, $4, $4, 0x3120;
lop3.b32 u, t, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 $0, u, one, off;
shr.u32 u, t, 8;
lop3.b32 u, u, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 $1, u, one, off;
shr.u32 u, t, 4;
lop3.b32 u, u, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 $2, u, one, off;
shr.u32 u, t, 12;
lop3.b32 u, u, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 $3, u, one, off;
}
""")

# int8 -> bf16: byte ^ 0x80 placed under the fp32 exponent of 2^23 is 2^23 + x + 128 exactly;
# subtract, then pack two floats per cvt.
_I8_ASM = tl.constexpr("""
{
.reg .b32 r, m, f0, f1, f2, f3;
xor.b32 r, $2, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 f0, r, m, 0x7650;
prmt.b32 f1, r, m, 0x7651;
prmt.b32 f2, r, m, 0x7652;
prmt.b32 f3, r, m, 0x7653;
sub.f32 f0, f0, 0f4B000080;
sub.f32 f1, f1, 0f4B000080;
sub.f32 f2, f2, 0f4B000080;
sub.f32 f3, f3, 0f4B000080;
cvt.rn.bf16x2.f32 $0, f1, f0;
cvt.rn.bf16x2.f32 $1, f3, f2;
}
""")


@triton.jit
def _i4_unpack(p, CVT: tl.constexpr):
    """uint8 tile -> (low nibbles - 8, high nibbles - 8) as bf16 tiles of the same shape."""
    if CVT == 2:
        lo, hi = tl.inline_asm_elementwise(_I4_ASM, "=r,=r,=r,=r,r", [p], dtype=(tl.bfloat16, tl.bfloat16),
                                           is_pure=True, pack=4)
    else:
        lo = ((p & 0xF).to(tl.int8) - 8).to(tl.bfloat16)
        hi = ((p >> 4).to(tl.int8) - 8).to(tl.bfloat16)
    return lo, hi


@triton.jit
def _i8_to_bf16(w, CVT: tl.constexpr):
    if CVT == 2:
        out = tl.inline_asm_elementwise(_I8_ASM, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        out = w.to(tl.bfloat16)
    return out


@triton.jit
def _wq_step(acc, acc_u, asum, a_rows, a_mask, w_rows, u_rows, w_mask, k0, K,
             BITS: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, SWIGLU: tl.constexpr,
             CVT: tl.constexpr):
    """One K step: acc (+ acc_u, the up rows, with SWIGLU) += A[:, k0:k0+BK] @ W[:, k0:k0+BK].T,
    without the per-channel scale. a_rows [BM, 1] / w_rows, u_rows [BN, 1] are row pointers,
    a_mask / w_mask row masks.

    Dequantization (CVT): 0 = Triton's integer-to-float casts (a quarter of the ALU rate; they
    bound the small-batch kernels); 1 (int4) = W read as int16 words of four nibbles and
    ``nib | 0x4300`` bit-cast to bf16 (= 128 + nib), the caller subtracting ``136 * sum_k a``
    (kept in asum) at the end; 2 = PTX bit tricks, two values per instruction (_I4_ASM,
    _I8_ASM)."""
    if BITS == 4:
        if CVT == 1:
            offs = k0 // 4 + tl.arange(0, BK // 4)
            if EVEN_K:
                am = a_mask
                wm = w_mask
            else:
                kin = offs[None, :] < K // 4
                am = a_mask & kin
                wm = w_mask & kin
            p = tl.load(w_rows + offs[None, :], mask=wm, other=0)
            if SWIGLU:
                pu = tl.load(u_rows + offs[None, :], mask=wm, other=0)
            for s in tl.static_range(4):
                a_s = tl.load(a_rows + 4 * offs[None, :] + s, mask=am, other=0.0)
                asum += tl.sum(a_s.to(tl.float32), 1)
                wb = (((p >> (4 * s)) & 0xF) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                acc = tl.dot(a_s, tl.trans(wb), acc)
                if SWIGLU:
                    ub = (((pu >> (4 * s)) & 0xF) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                    acc_u = tl.dot(a_s, tl.trans(ub), acc_u)
        else:
            offs = k0 // 2 + tl.arange(0, BK // 2)
            if EVEN_K:
                am = a_mask
                wm = w_mask
            else:
                kin = offs[None, :] < K // 2
                am = a_mask & kin
                wm = w_mask & kin
            a_e = tl.load(a_rows + 2 * offs[None, :], mask=am, other=0.0)
            a_o = tl.load(a_rows + 2 * offs[None, :] + 1, mask=am, other=0.0)
            p = tl.load(w_rows + offs[None, :], mask=wm, other=0x88)
            lo, hi = _i4_unpack(p, CVT)
            acc = tl.dot(a_e, tl.trans(lo), acc)
            acc = tl.dot(a_o, tl.trans(hi), acc)
            if SWIGLU:
                pu = tl.load(u_rows + offs[None, :], mask=wm, other=0x88)
                lo_u, hi_u = _i4_unpack(pu, CVT)
                acc_u = tl.dot(a_e, tl.trans(lo_u), acc_u)
                acc_u = tl.dot(a_o, tl.trans(hi_u), acc_u)
    else:
        offs = k0 + tl.arange(0, BK)
        if EVEN_K:
            am = a_mask
            wm = w_mask
        else:
            kin = offs[None, :] < K
            am = a_mask & kin
            wm = w_mask & kin
        a = tl.load(a_rows + offs[None, :], mask=am, other=0.0)
        w = tl.load(w_rows + offs[None, :], mask=wm, other=0)
        if BITS == 8:
            wb = _i8_to_bf16(w, CVT)
        else:
            wb = w
        acc = tl.dot(a, tl.trans(wb), acc)
        if SWIGLU:
            u = tl.load(u_rows + offs[None, :], mask=wm, other=0)
            if BITS == 8:
                ub = _i8_to_bf16(u, CVT)
            else:
                ub = u
            acc_u = tl.dot(a, tl.trans(ub), acc_u)
    return acc, acc_u, asum


@triton.jit
def _wq_tile(a_rows, m_mask, w_rows, u_rows, n_mask, s_rows, offs_n, nvalid, N_OUT, K,
             BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             EVEN_K: tl.constexpr, SWIGLU: tl.constexpr, CVT: tl.constexpr):
    """The fp32 ``[BM, BN]`` tile of ``A @ W.T`` over all of K (``_wq_step`` by ``_wq_step``),
    scaled per channel by ``s_rows[offs_n]`` (the up rows by ``s_rows[N_OUT + offs_n]``) and,
    with SWIGLU, ``silu(gate) * up``."""
    acc = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    asum = tl.zeros([BM], tl.float32)
    for k0 in range(0, K, BK):
        acc, acc_u, asum = _wq_step(acc, acc_u, asum, a_rows, m_mask, w_rows, u_rows, n_mask, k0, K,
                                    BITS, BK, EVEN_K, SWIGLU, CVT)
    if BITS == 4 and CVT == 1:
        acc = acc - 136.0 * asum[:, None]
        if SWIGLU:
            acc_u = acc_u - 136.0 * asum[:, None]
    if BITS != 16:
        acc = acc * tl.load(s_rows + offs_n, mask=nvalid, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        if BITS != 16:
            acc_u = acc_u * tl.load(s_rows + N_OUT + offs_n, mask=nvalid, other=0.0).to(tl.float32)[None, :]
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    return acc


@triton.jit
def _wq_step_t(acc, acc_u, a_cols, am, w_rows, u_rows, n_mask, k0, K,
               BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, SWIGLU: tl.constexpr,
               CVT: tl.constexpr):
    """One K step of the transposed tile (``_wq_tile_t``): ``acc [BN, BM] += dequant(W)[:, k0:k0+BK]
    @ A[:, k0:k0+BK].T`` (``a_cols [1, BM]`` column pointers, ``am`` their mask), unscaled."""
    offs_k = k0 + tl.arange(0, BK)
    if EVEN_K:
        a_m = am
    else:
        a_m = am & (offs_k[:, None] < K)
    a_t = tl.load(a_cols + offs_k[:, None], mask=a_m, other=0.0)
    if BITS == 4:
        offs_h = k0 // 2 + tl.arange(0, BK // 2)
        if EVEN_K:
            wm = n_mask
        else:
            wm = n_mask & (offs_h[None, :] < K // 2)
        p = tl.load(w_rows + offs_h[None, :], mask=wm, other=0x88)
        lo, hi = _i4_unpack(p, CVT)
        wb = tl.reshape(tl.join(lo, hi), (BN, BK))
        acc = tl.dot(wb, a_t, acc)
        if SWIGLU:
            pu = tl.load(u_rows + offs_h[None, :], mask=wm, other=0x88)
            lo_u, hi_u = _i4_unpack(pu, CVT)
            acc_u = tl.dot(tl.reshape(tl.join(lo_u, hi_u), (BN, BK)), a_t, acc_u)
    else:
        if EVEN_K:
            wm = n_mask
        else:
            wm = n_mask & (offs_k[None, :] < K)
        w = tl.load(w_rows + offs_k[None, :], mask=wm, other=0)
        if BITS == 8:
            wb = _i8_to_bf16(w, CVT)
        else:
            wb = w
        acc = tl.dot(wb, a_t, acc)
        if SWIGLU:
            u = tl.load(u_rows + offs_k[None, :], mask=wm, other=0)
            if BITS == 8:
                ub = _i8_to_bf16(u, CVT)
            else:
                ub = u
            acc_u = tl.dot(ub, a_t, acc_u)
    return acc, acc_u


@triton.jit
def _wq_tile_t(a_ptr, arow, m_valid, s_am, w_rows, u_rows, n_mask, s_rows, offs_n, nvalid, N_OUT, K,
               BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               EVEN_K: tl.constexpr, SWIGLU: tl.constexpr, CVT: tl.constexpr):
    """The same product transposed, ``[BN, BM] = dequant(W) @ A.T``: the dequantized weight tile
    is the left operand, which Hopper's wgmma takes from registers, and the activations
    (``a_ptr + arow * s_am``, ``arow`` ``[BM]`` row indices, ``m_valid`` their mask) the right,
    from shared memory. With the weight on the right (``_wq_tile``) a converted tile must go
    through shared memory first, or the product falls back to mma.sync."""
    acc = tl.zeros([BN, BM], tl.float32)
    acc_u = tl.zeros([BN, BM], tl.float32)
    a_cols = a_ptr + arow.to(tl.int64)[None, :] * s_am
    am = m_valid[None, :]
    for k0 in range(0, K, BK):
        acc, acc_u = _wq_step_t(acc, acc_u, a_cols, am, w_rows, u_rows, n_mask, k0, K,
                                BITS, BN, BK, EVEN_K, SWIGLU, CVT)
    if BITS != 16:
        acc = acc * tl.load(s_rows + offs_n, mask=nvalid, other=0.0).to(tl.float32)[:, None]
    if SWIGLU:
        if BITS != 16:
            acc_u = acc_u * tl.load(s_rows + N_OUT + offs_n, mask=nvalid, other=0.0).to(tl.float32)[:, None]
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    return acc


@triton.jit(do_not_specialize=["M"])
def _wlinear_kernel(
    a_ptr, w_ptr, s_ptr, c_ptr,
    M, N_OUT, K, s_am, s_wn, s_cm,
    BITS: tl.constexpr, SWIGLU: tl.constexpr, CVT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, SWAP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = (offs_m < M)[:, None]
    n_mask = (offs_n < N_OUT)[:, None]
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * s_am
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn
    if SWIGLU:
        u_rows = w_ptr + (offs_n + N_OUT).to(tl.int64)[:, None] * s_wn
    else:
        u_rows = w_rows
    nvalid = offs_n < N_OUT
    if SWAP:
        acc_t = _wq_tile_t(a_ptr, offs_m, offs_m < M, s_am, w_rows, u_rows, n_mask, s_ptr, offs_n, nvalid,
                           N_OUT, K, BITS, BM, BN, BK, EVEN_K, SWIGLU, CVT)
        c = c_ptr + offs_m.to(tl.int64)[None, :] * s_cm + offs_n[:, None]
        tl.store(c, acc_t.to(tl.bfloat16), mask=(offs_m < M)[None, :] & n_mask)
    else:
        acc = _wq_tile(a_rows, m_mask, w_rows, u_rows, n_mask, s_ptr, offs_n, nvalid, N_OUT, K,
                       BITS, BM, BN, BK, EVEN_K, SWIGLU, CVT)
        c = c_ptr + offs_m.to(tl.int64)[:, None] * s_cm + offs_n[None, :]
        tl.store(c, acc.to(tl.bfloat16), mask=m_mask & nvalid[None, :])


def weight_view(w: torch.Tensor, bits: int, cfg: dict) -> tuple[torch.Tensor, int, int]:
    """(weight tensor as the kernel reads it, its row stride in those elements, CVT mode).
    CVT 1 reads int4 weights as int16 words, which needs even byte strides."""
    cvt = int(cfg.get("CVT", DEFAULT_CVT[bits])) if bits != 16 else 0
    if bits == 8 and cvt == 1:
        cvt = 0
    if cvt == 1 and cfg.get("SWAP"):  # the transposed tile reads bytes
        cvt = 0 if INTERPRET else 2
    if cvt == 1:
        if w.shape[-1] % 2 == 0 and w.stride(-2) % 2 == 0 and w.storage_offset() % 2 == 0 \
                and (w.dim() == 2 or w.stride(0) % 2 == 0):
            v = w.view(torch.int16)
            return v, v.stride(-2), 1
        cvt = 0
    return w, w.stride(-2), cvt


def default_config(M: int, N_out: int, K: int, bits: int, swiglu: bool) -> dict:
    """Tiles from the H100 sweeps (bench/gpu_bench.py --tune, 2026-11-25): GEMV-shaped (thin N
    tiles, long K steps) up to M=64, square tiles for large M."""
    if M <= 64:
        return {"BM": 16, "BN": 32, "BK": 256, "num_warps": 4, "num_stages": 4}
    if M <= 256:
        return {"BM": 64, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3}
    return {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}


def check_weight(name: str, w: torch.Tensor, scales: torch.Tensor | None, bits: int,
                 N: int | None, K: int, expert_dim: int | None = None) -> int:
    """Validate a (possibly batched over experts) weight; returns N."""
    require(bits in _WDTYPE, f"bits must be 16, 8 or 4, got {bits}")
    require(on_kernel_device(w), f"{name} must be a CUDA tensor")
    lead = 0 if expert_dim is None else 1
    require(w.dim() == 2 + lead, f"{name} must be {'[E, N, K]' if lead else '[N, K]'}-shaped, got {tuple(w.shape)}")
    require(w.dtype == _WDTYPE[bits], f"{name} must be {_WDTYPE[bits]} for bits={bits}, got {w.dtype}")
    if lead:
        require(w.shape[0] == expert_dim, f"{name} has {w.shape[0]} experts, expected {expert_dim}")
    kw = K // 2 if bits == 4 else K
    if bits == 4:
        require(K % 2 == 0, f"K must be even for int4 weights, got {K}")
    require(w.shape[-1] == kw, f"{name} last dim is {w.shape[-1]}, expected {kw} (K={K}, bits={bits})")
    require(w.stride(-1) == 1, f"{name} must have a contiguous last dim")
    n = w.shape[-2]
    if N is not None:
        require(n == N, f"{name} has N={n}, expected {N}")
    if bits == 16:
        require(scales is None, f"{name}: scales must be None for bf16 weights")
    else:
        require(isinstance(scales, torch.Tensor) and scales.device == w.device,
                 f"{name}: scales must be a tensor on {w.device}")
        want = (expert_dim, n) if lead else (n,)
        require(tuple(scales.shape) == want, f"{name}: scales must be {list(want)}, got {list(scales.shape)}")
        require(scales.dtype in (torch.bfloat16, torch.float16, torch.float32),
                 f"{name}: scales must be a float tensor, got {scales.dtype}")
        require(scales.stride(-1) == 1, f"{name}: scales must have a contiguous last dim")
    return n


# From this many rows (prefill) a quantized weight is dequantized once and multiplied by cuBLAS:
# on the H200 (bench/kernel_variants.py, 2026-12-02) the int8 qkv product of 4,096 rows took 260 us
# in the kernel and 174 us dequantized (cuBLAS alone on bf16 weights: 124 us).
DEQUANT_MIN_M = 1024


def _dequantized_product(x, qweight, scales, swiglu: bool, out: torch.Tensor) -> torch.Tensor:
    y = torch.nn.functional.linear(x, dequantize(qweight, scales))
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    out.copy_(y)
    return out


def wlinear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor | None,
    bits: int,
    act: str | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x [M, K]`` bf16 times a weight-only quantized ``[N, K]`` matrix (see the module doc);
    returns ``[M, N]`` bf16, or ``[M, N/2]`` with ``act="swiglu"``.

    Quantized products of up to ``GEMV_MAX_M`` rows run the split-K kernel of gemv.py (with a
    ``config`` only if it has a ``SPLIT``: gemv's configs); from ``DEQUANT_MIN_M`` rows the weight
    is dequantized once for cuBLAS; everything else runs ``_wlinear_kernel``."""
    require(on_kernel_device(x), "x must be a CUDA tensor")
    require(x.dim() == 2, f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    require(x.dtype == _BF16, f"x must be bfloat16, got {x.dtype}")
    require(x.stride(1) == 1, "x must have a contiguous last dim")
    require(act in (None, "swiglu"), f"act must be None or 'swiglu', got {act!r}")
    M, K = x.shape
    N = check_weight("qweight", qweight, scales, bits, None, K)
    require(qweight.device == x.device, f"qweight is on {qweight.device}, x on {x.device}")
    swiglu = act == "swiglu"
    if swiglu:
        require(N % 2 == 0, f"swiglu needs an even N, got {N}")
    n_out = N // 2 if swiglu else N
    if out is None:
        out = torch.empty((M, n_out), dtype=_BF16, device=x.device)
    else:
        require(out.shape == (M, n_out) and out.dtype == _BF16 and out.device == x.device,
                 f"out must be bf16 [{M}, {n_out}] on {x.device}")
        require(out.stride(1) == 1, "out must have a contiguous last dim")
    if M == 0:
        return out
    if bits != 16 and config is None and M >= DEQUANT_MIN_M:
        return _dequantized_product(x, qweight, scales, swiglu, out)
    if bits != 16 and M <= GEMV_MAX_M and (config is None or "SPLIT" in config):
        return _gemv(x, qweight, scales, bits, swiglu, out, config)
    cfg = config or TUNED.get(("wlinear", m_bucket(M), N, K, bits, swiglu)) or default_config(M, n_out, K, bits, swiglu)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    w, s_wn, cvt = weight_view(qweight, bits, cfg)
    grid = (triton.cdiv(M, BM), triton.cdiv(n_out, BN))
    _wlinear_kernel[grid](
        x, w, scales if scales is not None else qweight, out,
        M, n_out, K, x.stride(0), s_wn, out.stride(0),
        BITS=bits, SWIGLU=swiglu, CVT=cvt, BM=BM, BN=BN, BK=BK, EVEN_K=(K % BK == 0),
        SWAP=bool(cfg.get("SWAP", 0)), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# The decode-shaped products (gemv.py reuses this module's tile steps, so it is imported last).
from .gemv import MAX_ROWS as GEMV_MAX_M  # noqa: E402
from .gemv import gemv as _gemv  # noqa: E402
