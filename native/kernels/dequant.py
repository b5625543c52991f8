"""Weight-only int8 / int4 weights (wlinear's formats) dequantized to bf16: ``w = q * s``.

Large-M products (prefill) can dequantize a weight once and run it at the bf16 rate instead of
converting inside every K step of every M tile; the result equals the torch reference's
``dequantize_int8`` / ``dequantize_int4`` (native/model/quant.py): fp32 ``q * s`` rounded to bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import on_kernel_device, require

_BITS = {torch.int8: 8, torch.uint8: 4}


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, R, KW, BITS: tl.constexpr,
                    BR: tl.constexpr, BKW: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    offs = tl.program_id(1) * BKW + tl.arange(0, BKW)
    rmask = rows < R
    m = rmask[:, None] & (offs[None, :] < KW)
    p = tl.load(w_ptr + rows.to(tl.int64)[:, None] * KW + offs[None, :], mask=m, other=0)
    s = tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if BITS == 4:
        lo = ((p & 0xF).to(tl.int8) - 8).to(tl.float32)
        hi = ((p >> 4).to(tl.int8) - 8).to(tl.float32)
        v = tl.reshape(tl.join(lo, hi), (BR, 2 * BKW))
        cols = tl.program_id(1) * 2 * BKW + tl.arange(0, 2 * BKW)
        om = rmask[:, None] & (cols[None, :] < 2 * KW)
        K = 2 * KW
    else:
        v = p.to(tl.float32)
        cols = offs
        om = m
        K = KW
    out = (v * s[:, None]).to(tl.bfloat16)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], out, mask=om)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[..., N, K]`` bf16 from an int8 ``[..., N, K]`` or packed-int4 uint8 ``[..., N, K/2]``
    weight and its ``[..., N]`` scales (contiguous)."""
    bits = _BITS.get(qweight.dtype)
    require(bits is not None, f"qweight must be int8 or uint8 (int4), got {qweight.dtype}")
    require(on_kernel_device(qweight), "qweight must be a CUDA tensor")
    require(qweight.is_contiguous() and scales.is_contiguous(), "qweight and scales must be contiguous")
    require(tuple(scales.shape) == tuple(qweight.shape[:-1]),
            f"scales must be {list(qweight.shape[:-1])}, got {list(scales.shape)}")
    kw = qweight.shape[-1]
    k = 2 * kw if bits == 4 else kw
    shape = (*qweight.shape[:-1], k)
    out = torch.empty(shape, dtype=torch.bfloat16, device=qweight.device)
    R = scales.numel()
    if R == 0 or kw == 0:
        return out
    BR, BKW = 16, 128 if bits == 4 else 256
    _dequant_kernel[(triton.cdiv(R, BR), triton.cdiv(kw, BKW))](
        qweight, scales, out, R, kw, BITS=bits, BR=BR, BKW=BKW, num_warps=4,
    )
    return out
