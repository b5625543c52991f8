"""Decode-shaped weight-only products (M <= 64 rows, int8 / int4 weights): memory-bound split-K.

``wlinear`` sends quantized products of up to ``MAX_ROWS`` rows here. At decode a product reads
the weight once and does little else, so what counts is keeping the HBM busy: the grid is
``(N / BN) x SPLIT`` programs, each over its ``N`` tile and a ``K / SPLIT`` slice, which fills all
the SMs even where ``N / BN`` alone (48 programs at N 3072, BN 64) would not. The weight is read
in 16-byte vectors along K; the per-channel scale and SwiGLU are applied once, after the sum.

Three ways to multiply a tile (config ``MODE``):

* 0: CUDA cores, one row (M = 1): ``acc[BN, BK] += w * x`` in fp32, summed along K at the end;
* 1: tensor cores, the converted weight the right operand (``_dot_step``);
* 2: tensor cores, transposed (``_wq_step_t``: the weight the left operand, from registers).

With ``SPLIT > 1`` each program writes its fp32 partial tile to a workspace and takes a ticket
from the tile's counter; the program that takes the last ticket sums the partials in split order
(0, 1, ...), so the result does not depend on which program finished last: it is bit-identical
run to run, and between eager calls and graph replays. It then resets the counter to 0 for the
next call. Workspace and counters are allocated once per (device, shape, split, tile) and kept:
no allocation or host sync per call, so the product can be captured in a CUDA graph. Calls of one
shape must not run concurrently on two streams of one device (the model runs on one stream).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import INTERPRET
from .wlinear import _i4_unpack, _i8_to_bf16, _wq_step_t, m_bucket

MAX_ROWS = 64
# (m_bucket, N, K, bits, swiglu) -> config, looked up in this order: TUNED (set at run time, e.g.
# by gpu_bench --gemv-configs), CONFIGS (the H200 sweep of bench/kernel_variants.py), then
# default_config.
TUNED: dict[tuple, dict] = {}


def _cfg(mode: int, bn: int, bk: int, split: int, stages: int) -> dict:
    return {"MODE": mode, "BN": bn, "BK": bk, "SPLIT": split, "num_warps": 4, "num_stages": stages}


# The fastest of bench/kernel_variants.py's sweep per ERNIE-4.5-21B-A3B product (H200, 2026-12-02,
# bench/results/kernels-h200-2026-12-02b/gemv_configs.json; each weight read from HBM).
CONFIGS: dict[tuple, dict] = {
    (1, 3584, 2560, 8, False): _cfg(0, 16, 512, 1, 2),  # qkv 7.4 us
    (16, 3584, 2560, 8, False): _cfg(1, 32, 256, 2, 3),  # qkv 7.9 us
    (64, 3584, 2560, 8, False): _cfg(1, 32, 256, 1, 3),  # qkv 11.8 us
    (1, 2560, 2560, 8, False): _cfg(0, 16, 512, 4, 2),  # o_proj 6.6 us
    (16, 2560, 2560, 8, False): _cfg(1, 32, 256, 4, 3),  # o_proj 7.0 us
    (64, 2560, 2560, 8, False): _cfg(1, 32, 256, 1, 3),  # o_proj 11.5 us
    (1, 6144, 2560, 8, True): _cfg(0, 16, 256, 2, 2),  # shared_gu 9.9 us
    (16, 6144, 2560, 8, True): _cfg(1, 32, 256, 1, 3),  # shared_gu 11.3 us
    (64, 6144, 2560, 8, True): _cfg(1, 32, 256, 1, 3),  # shared_gu 17.7 us
    (1, 2560, 3072, 8, False): _cfg(0, 16, 512, 4, 2),  # shared_down 7.1 us
    (16, 2560, 3072, 8, False): _cfg(1, 32, 256, 4, 3),  # shared_down 7.6 us
    (64, 2560, 3072, 8, False): _cfg(1, 32, 256, 1, 3),  # shared_down 13.4 us
    (1, 24576, 2560, 8, True): _cfg(1, 32, 256, 1, 3),  # l0_gu 22.6 us
    (16, 24576, 2560, 8, True): _cfg(1, 32, 256, 1, 3),  # l0_gu 23.0 us
    (64, 24576, 2560, 8, True): _cfg(1, 64, 128, 1, 3),  # l0_gu 45.0 us
    (1, 2560, 12288, 8, False): _cfg(1, 32, 256, 8, 3),  # l0_down 14.1 us
    (16, 2560, 12288, 8, False): _cfg(1, 32, 256, 8, 3),  # l0_down 14.9 us
    (64, 2560, 12288, 8, False): _cfg(2, 64, 128, 4, 3),  # l0_down 34.6 us
    (1, 3584, 2560, 4, False): _cfg(0, 16, 512, 2, 2),  # qkv 7.5 us
    (16, 3584, 2560, 4, False): _cfg(1, 32, 512, 1, 3),  # qkv 7.7 us
    (64, 3584, 2560, 4, False): _cfg(1, 64, 128, 4, 3),  # qkv 13.1 us
    (1, 2560, 2560, 4, False): _cfg(0, 16, 512, 4, 2),  # o_proj 6.7 us
    (16, 2560, 2560, 4, False): _cfg(1, 64, 256, 4, 3),  # o_proj 7.4 us
    (64, 2560, 2560, 4, False): _cfg(1, 64, 128, 2, 3),  # o_proj 13.1 us
    (1, 6144, 2560, 4, True): _cfg(0, 16, 512, 2, 2),  # shared_gu 8.9 us
    (16, 6144, 2560, 4, True): _cfg(1, 32, 512, 1, 3),  # shared_gu 11.3 us
    (64, 6144, 2560, 4, True): _cfg(1, 64, 128, 4, 3),  # shared_gu 20.7 us
    (1, 2560, 3072, 4, False): _cfg(0, 16, 512, 4, 2),  # shared_down 7.1 us
    (16, 2560, 3072, 4, False): _cfg(1, 64, 256, 8, 3),  # shared_down 7.9 us
    (64, 2560, 3072, 4, False): _cfg(1, 64, 128, 2, 3),  # shared_down 14.6 us
}

# int8 -> fp32, four per 32-bit word: byte ^ 0x80 placed under the fp32 exponent of 2^23 is
# 2^23 + x + 128 exactly; one subtraction leaves x.
_I8F32_ASM = tl.constexpr("""
{
.reg .b32 r, m;
xor.b32 r, $4, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 $0, r, m, 0x7650;
prmt.b32 $1, r, m, 0x7651;
prmt.b32 $2, r, m, 0x7652;
prmt.b32 $3, r, m, 0x7653;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}
""")


@triton.jit
def _i8_f32(w, CVT: tl.constexpr):
    if CVT == 2:
        out = tl.inline_asm_elementwise(_I8F32_ASM, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    else:
        out = w.to(tl.float32)
    return out


@triton.jit
def _i4_f32(p, CVT: tl.constexpr):
    """uint8 tile -> (low nibble - 8, high nibble - 8) as fp32; CVT 2: ``nib | 0x4B000000`` is the
    fp32 number 2^23 + nib, minus 2^23 + 8."""
    if CVT == 2:
        q = p.to(tl.int32)
        lo = ((q & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        hi = ((q >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    else:
        lo = ((p & 0xF).to(tl.int8) - 8).to(tl.float32)
        hi = ((p >> 4).to(tl.int8) - 8).to(tl.float32)
    return lo, hi


@triton.jit
def _fma_step(acc, acc_u, a_ptr, w_rows, u_rows, n_mask, k0, K,
              BITS: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, SWIGLU: tl.constexpr,
              CVT: tl.constexpr):
    """One K step of one row on the CUDA cores: ``acc [BN, BK or BK/2] += w * x`` (fp32)."""
    if BITS == 4:
        offs = k0 // 2 + tl.arange(0, BK // 2)
        offs_k = k0 + tl.arange(0, BK)
        if EVEN_K:
            x = tl.load(a_ptr + offs_k).to(tl.float32)
            wm = n_mask
        else:
            x = tl.load(a_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            wm = n_mask & (offs < K // 2)[None, :]
        xe, xo = tl.split(tl.reshape(x, (BK // 2, 2)))  # contiguous loads, then even / odd k
        lo, hi = _i4_f32(tl.load(w_rows + offs[None, :], mask=wm, other=0x88), CVT)
        acc += lo * xe[None, :] + hi * xo[None, :]
        if SWIGLU:
            lo_u, hi_u = _i4_f32(tl.load(u_rows + offs[None, :], mask=wm, other=0x88), CVT)
            acc_u += lo_u * xe[None, :] + hi_u * xo[None, :]
    else:
        offs = k0 + tl.arange(0, BK)
        if EVEN_K:
            x = tl.load(a_ptr + offs).to(tl.float32)
            wm = n_mask
        else:
            kin = offs < K
            x = tl.load(a_ptr + offs, mask=kin, other=0.0).to(tl.float32)
            wm = n_mask & kin[None, :]
        acc += _i8_f32(tl.load(w_rows + offs[None, :], mask=wm, other=0), CVT) * x[None, :]
        if SWIGLU:
            acc_u += _i8_f32(tl.load(u_rows + offs[None, :], mask=wm, other=0), CVT) * x[None, :]
    return acc, acc_u


@triton.jit
def _dot_step(acc, acc_u, a_rows, am, w_rows, u_rows, n_mask, k0, K,
              BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
              SWIGLU: tl.constexpr, CVT: tl.constexpr):
    """One K step on the tensor cores, the converted weight the right operand: ``acc [BM, BN] +=
    A[:, k0:k0+BK] @ dequant(W)[:, k0:k0+BK].T`` (int4: both nibbles of a byte side by side
    again, so that A is read contiguously and multiplied once)."""
    offs_k = k0 + tl.arange(0, BK)
    if EVEN_K:
        a = tl.load(a_rows + offs_k[None, :], mask=am, other=0.0)
    else:
        a = tl.load(a_rows + offs_k[None, :], mask=am & (offs_k[None, :] < K), other=0.0)
    if BITS == 4:
        offs = k0 // 2 + tl.arange(0, BK // 2)
        wm = n_mask if EVEN_K else n_mask & (offs[None, :] < K // 2)
        lo, hi = _i4_unpack(tl.load(w_rows + offs[None, :], mask=wm, other=0x88), CVT)
        acc = tl.dot(a, tl.trans(tl.reshape(tl.join(lo, hi), (BN, BK))), acc)
        if SWIGLU:
            lo_u, hi_u = _i4_unpack(tl.load(u_rows + offs[None, :], mask=wm, other=0x88), CVT)
            acc_u = tl.dot(a, tl.trans(tl.reshape(tl.join(lo_u, hi_u), (BN, BK))), acc_u)
    else:
        wm = n_mask if EVEN_K else n_mask & (offs_k[None, :] < K)
        acc = tl.dot(a, tl.trans(_i8_to_bf16(tl.load(w_rows + offs_k[None, :], mask=wm, other=0), CVT)), acc)
        if SWIGLU:
            ub = _i8_to_bf16(tl.load(u_rows + offs_k[None, :], mask=wm, other=0), CVT)
            acc_u = tl.dot(a, tl.trans(ub), acc_u)
    return acc, acc_u


@triton.jit
def _finish(acc, acc_u, s_ptr, offs_n, nvalid, N_OUT, SWIGLU: tl.constexpr):
    """Per-channel scale, then ``silu(gate) * up`` (the same arithmetic as wlinear's tiles)."""
    acc = acc * tl.load(s_ptr + offs_n, mask=nvalid, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        acc_u = acc_u * tl.load(s_ptr + N_OUT + offs_n, mask=nvalid, other=0.0).to(tl.float32)[None, :]
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    return acc


@triton.jit(do_not_specialize=["M", "SPLIT"])
def _gemv_kernel(
    a_ptr, w_ptr, s_ptr, c_ptr, ws_ptr, cnt_ptr,
    M, N_OUT, K, s_am, s_wn, s_cm, SPLIT,
    BITS: tl.constexpr, SWIGLU: tl.constexpr, CVT: tl.constexpr, MODE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC_K: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    nvalid = offs_n < N_OUT
    mvalid = offs_m < M
    n_mask = nvalid[:, None]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn
    if SWIGLU:
        u_rows = w_ptr + (offs_n + N_OUT).to(tl.int64)[:, None] * s_wn
    else:
        u_rows = w_rows
    per = tl.cdiv(tl.cdiv(K, BK), SPLIT) * BK  # whole BK steps per split
    k_lo = pid_s * per
    k_hi = tl.minimum(K, k_lo + per)
    if MODE == 0:
        acc2 = tl.zeros([BN, ACC_K], tl.float32)  # ACC_K: BK, or BK / 2 bytes of int4
        acc2_u = tl.zeros([BN, ACC_K], tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            acc2, acc2_u = _fma_step(acc2, acc2_u, a_ptr, w_rows, u_rows, n_mask, k0, K,
                                     BITS, BK, EVEN_K, SWIGLU, CVT)
        acc = tl.sum(acc2, 1)[None, :]
        acc_u = tl.sum(acc2_u, 1)[None, :]
    elif MODE == 1:
        acc = tl.zeros([BM, BN], tl.float32)
        acc_u = tl.zeros([BM, BN], tl.float32)
        a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * s_am
        for k0 in range(k_lo, k_hi, BK):
            acc, acc_u = _dot_step(acc, acc_u, a_rows, mvalid[:, None], w_rows, u_rows, n_mask, k0, K,
                                   BITS, BN, BK, EVEN_K, SWIGLU, CVT)
    else:
        acc_t = tl.zeros([BN, BM], tl.float32)
        acc_ut = tl.zeros([BN, BM], tl.float32)
        a_cols = a_ptr + offs_m.to(tl.int64)[None, :] * s_am
        for k0 in range(k_lo, k_hi, BK):
            acc_t, acc_ut = _wq_step_t(acc_t, acc_ut, a_cols, mvalid[None, :], w_rows, u_rows, n_mask, k0, K,
                                       BITS, BN, BK, EVEN_K, SWIGLU, CVT)
        acc = tl.trans(acc_t)
        acc_u = tl.trans(acc_ut)
    omask = mvalid[:, None] & nvalid[None, :]
    c = c_ptr + offs_m.to(tl.int64)[:, None] * s_cm + offs_n[None, :]
    if SPLIT_K:
        N2 = 2 * N_OUT if SWIGLU else N_OUT
        part = ws_ptr + offs_m[:, None] * N2 + offs_n[None, :]
        tl.store(part + pid_s * M * N2, acc, mask=omask)
        if SWIGLU:
            tl.store(part + pid_s * M * N2 + N_OUT, acc_u, mask=omask)
        tl.debug_barrier()  # every thread's partial is stored before the ticket releases them
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:
            tot = tl.zeros([BM, BN], tl.float32)
            tot_u = tl.zeros([BM, BN], tl.float32)
            for s in range(0, SPLIT):
                tot += tl.load(part + s * M * N2, mask=omask, other=0.0, cache_modifier=".cg")
                if SWIGLU:
                    tot_u += tl.load(part + s * M * N2 + N_OUT, mask=omask, other=0.0, cache_modifier=".cg")
            y = _finish(tot, tot_u, s_ptr, offs_n, nvalid, N_OUT, SWIGLU)
            tl.store(c, y.to(tl.bfloat16), mask=omask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        y = _finish(acc, acc_u, s_ptr, offs_n, nvalid, N_OUT, SWIGLU)
        tl.store(c, y.to(tl.bfloat16), mask=omask)


def default_config(M: int, N_out: int, K: int, bits: int, swiglu: bool) -> dict:
    """A config for shapes the sweep did not cover, shaped after its winners: one row on the CUDA
    cores with 512-long K steps, split so that the grid has about 640 programs; up to 16 rows the
    weight as the right tensor-core operand, split to about 320 programs; above, int8 unsplit
    (the partials of 64 rows cost more than the extra programs gain) and int4 in wider tiles."""
    if M == 1:
        cfg, target = _cfg(0, 16, 512, 1, 2), 640
    elif M <= 16:
        cfg, target = _cfg(1, 32, 256, 1, 3), 320
    elif bits == 8:
        return _cfg(1, 32, 256, 1, 3)
    else:
        cfg, target = _cfg(1, 64, 128, 1, 3), 160
    cfg["SPLIT"] = max(1, min(8, target // triton.cdiv(N_out, cfg["BN"])))
    return cfg


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, split: int, n2: int, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partials ``[split, MAX_ROWS, n2]`` and int32 tile counters (zero between calls), made
    once per key and kept: a CUDA graph keeps the addresses it was captured with."""
    key = (device, split, n2, n_tiles)
    got = _WORKSPACES.get(key)
    if got is None:
        got = (torch.empty(split * MAX_ROWS * n2, dtype=torch.float32, device=device),
               torch.zeros(n_tiles, dtype=torch.int32, device=device))
        _WORKSPACES[key] = got
    return got


def gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, swiglu: bool,
         out: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``out [M, N_out] = x @ dequant(qweight).T`` (SwiGLU-fused with ``swiglu``); the arguments
    as wlinear checked them, ``1 <= M <= MAX_ROWS``, bits 8 or 4."""
    M, K = x.shape
    N = qweight.shape[0]
    n_out = N // 2 if swiglu else N
    key = (m_bucket(M), N, K, bits, swiglu)
    cfg = config or TUNED.get(key) or CONFIGS.get(key) or default_config(M, n_out, K, bits, swiglu)
    mode = int(cfg.get("MODE", 1))
    if mode == 0 and M > 1:  # the CUDA-core tile holds one row
        cfg = default_config(M, n_out, K, bits, swiglu)
        mode = 1
    BN, BK = cfg["BN"], cfg["BK"]
    BM = 1 if mode == 0 else max(16, triton.next_power_of_2(M))
    cvt = 0 if INTERPRET else int(cfg.get("CVT", 2))
    if cvt == 1:  # wlinear's int16-word int4 path (an asum correction); not used here
        cvt = 2
    chunks = triton.cdiv(K, BK)
    split = max(1, min(int(cfg.get("SPLIT", 1)), chunks))
    split = triton.cdiv(chunks, triton.cdiv(chunks, split))  # no empty splits
    n_tiles = triton.cdiv(n_out, BN)
    if split > 1:
        ws, cnt = workspace(x.device, split, N if swiglu else n_out, n_tiles)
    else:
        ws, cnt = out, out  # not read
    _gemv_kernel[(n_tiles, split)](
        x, qweight, scales, out, ws, cnt,
        M, n_out, K, x.stride(0), qweight.stride(0), out.stride(0), split,
        BITS=bits, SWIGLU=swiglu, CVT=cvt, MODE=mode, BM=BM, BN=BN, BK=BK,
        ACC_K=BK // 2 if bits == 4 else BK, EVEN_K=(K % BK == 0),
        SPLIT_K=split > 1, num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return out
