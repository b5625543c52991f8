"""GPU kernels (native/kernels) against plain-torch fp32 references.

Shapes are ERNIE-4.5-21B-A3B's (H 2560, 20 query / 4 kv heads of 128, 64 experts top-6, expert
width 1536) plus odd token counts and context lengths that are not multiples of the block size.
Outputs are poisoned (NaN) before each run and must come back finite.

Tolerances (bf16 outputs, fp32 accumulation): relative Frobenius error ||out - ref|| / ||ref||
under 1e-2 for single GEMMs, norms, RoPE and attention, 2e-2 for the MoE block (two GEMMs with a
bf16 intermediate); the KV store and the int4/int8 dequantization are exact.

Skipped without a CUDA GPU. ``TRITON_INTERPRET=1`` runs the same tests on the CPU through
Triton's interpreter with small shapes (slow; for debugging kernels without a GPU).
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from native import kernels as K  # noqa: E402

pytestmark = pytest.mark.gpu

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BF = torch.bfloat16
if INTERPRET and DEV == "cpu":
    H, NH, KVH, HD, E, TOPK, INTER = 256, 8, 2, 64, 8, 3, 128
    TOKENS = (1, 3, 17)
    CTX = (1, 63, 65, 130)
else:
    H, NH, KVH, HD, E, TOPK, INTER = 2560, 20, 4, 128, 64, 6, 1536
    TOKENS = (1, 3, 17, 257)
    CTX = (1, 63, 65, 1000, 1025, 4097)
BS = 64
EPS = 1e-5
CVTS = (0, 1) if DEV == "cpu" else (0, 1, 2)  # the PTX path (2) needs a GPU


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    ref = ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison(shape, dtype=BF) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=DEV)
    if dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-(2**30) if dtype != torch.uint8 else 255)
    return t


def poison_allocator(nbytes: int = 1 << 28) -> None:
    """Fill the caching allocator's free memory with NaN so that outputs a kernel forgets to write
    show up (torch.empty reuses these blocks)."""
    if DEV == "cuda":
        t = torch.empty(nbytes // 2, dtype=BF, device=DEV)
        t.fill_(float("nan"))
        del t


def randn(*shape, scale=1.0, dtype=BF) -> torch.Tensor:
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


# ------------------------------------------------------------------- reference quantization


def ref_round(x: torch.Tensor) -> torch.Tensor:
    """C round(): half away from zero."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def ref_quant(w: torch.Tensor, bits: int):
    """Symmetric per-channel quantization (Paddle weight_only_int8/int4): returns the int values
    (int16, unpacked), the bf16 scales and, for int4, the packed uint8 [..., N, K/2]."""
    bound = 127.0 if bits == 8 else 7.0
    w32 = w.float()
    scale = (w32.abs().amax(-1) / bound).to(BF)
    s32 = scale.float()
    s32 = torch.where(s32 == 0, torch.ones_like(s32), s32)
    q = ref_round(w32 / s32.unsqueeze(-1)).clamp(-bound, bound).to(torch.int16)
    if bits == 8:
        return q, scale, q.to(torch.int8)
    u = (q + 8).to(torch.uint8)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()
    return q, scale, packed


def ref_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


def make_weight(n: int, k: int, bits: int, experts: int | None = None, std: float = 0.02):
    """Random weight in the kernel format plus its fp32 dequantized reference."""
    shape = (n, k) if experts is None else (experts, n, k)
    w = randn(*shape, scale=std)
    if bits == 16:
        return w, None, w.float()
    q, s, stored = ref_quant(w, bits)
    return stored, s, ref_dequant(q, s)


# --------------------------------------------------------------------------- norms and rope


@pytest.mark.parametrize("T", TOKENS)
def test_rmsnorm_and_fused_add(T):
    x = randn(T, H)
    r = randn(T, H, scale=3.0)
    w = randn(H, scale=0.5) + 1.0
    out = poison((T, H))
    K.rmsnorm(x, w.to(BF), EPS, out=out)
    y = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)).to(BF)
    ref = (y.float() * w.float()).to(BF)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2

    res = r.clone()
    out2 = poison((T, H))
    K.fused_add_rmsnorm(x, res, w.to(BF), EPS, out=out2)
    h = (x.float() + r.float()).to(BF)
    assert torch.equal(res, h)
    y = (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + EPS)).to(BF)
    ref2 = (y.float() * w.float()).to(BF)
    assert torch.isfinite(out2).all()
    assert rel_err(out2, ref2) < 1e-2
    # the cast order is ERNIE's: at most one bf16 ulp away from the reference anywhere
    assert ((out2.float() - ref2.float()).abs() <= ref2.float().abs() * 2**-7 + 1e-6).all()


@pytest.mark.parametrize("T", TOKENS)
def test_moe_combine_add_rmsnorm(T):
    pairs = randn(T * TOPK, H)
    shared = randn(T, H)
    r = randn(T, H, scale=3.0)
    w = (randn(H, scale=0.5) + 1.0).to(BF)
    res = r.clone()
    out = poison((T, H))
    K.moe_combine_add_rmsnorm(pairs, TOPK, shared, res, w, EPS, out=out)
    moe = (pairs.float().view(T, TOPK, H).sum(1) + shared.float()).to(BF)
    h = (moe.float() + r.float()).to(BF)
    assert ((res.float() - h.float()).abs() <= h.float().abs() * 2**-7 + 1e-6).all()
    y = (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + EPS)).to(BF)
    ref = (y.float() * w.float()).to(BF)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2
    # the same through the public pieces
    res2 = r.clone()
    out2 = K.fused_add_rmsnorm(K.moe_combine(pairs, TOPK, shared), res2, w, EPS)
    assert torch.equal(res2, res) and torch.equal(out2, out)


def ref_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=x.device).float() / hd))
    ang = pos.float()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x32 = x.float()
    x0, x1 = x32[..., 0::2], x32[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return out.to(BF)


@pytest.mark.parametrize("T", TOKENS)
def test_rope_interleaved(T):
    theta = 500000.0
    qkv = randn(T, (NH + 2 * KVH) * HD)
    q = qkv[:, : NH * HD].view(T, NH, HD)  # strided views, as the model produces them
    k = qkv[:, NH * HD : (NH + KVH) * HD].view(T, KVH, HD)
    pos = torch.randint(0, 100000, (T,), device=DEV)
    pos[0] = 0
    rq, rk = ref_rope(q, pos, theta), ref_rope(k, pos, theta)
    v_before = qkv[:, (NH + KVH) * HD :].clone()
    K.rope_interleaved(q, k, pos, theta)
    assert rel_err(q, rq) < 1e-2 and rel_err(k, rk) < 1e-2
    # fp32 angles at positions up to 1e5 carry ~1e5 * 2^-24 rad of error, so elements near zero
    # (cancellation) can differ by more than one bf16 ulp; bound each element by 2^-6 of its
    # head's largest magnitude (measured on H100: the ulp bound failed at ~0.031 on values ~1)
    for out, ref in ((q, rq), (k, rk)):
        o32, r32 = out.float(), ref.float()
        scale = torch.maximum(o32.abs(), r32.abs()).amax(dim=-1, keepdim=True)
        assert ((o32 - r32).abs() <= scale * 2**-6 + 1e-6).all()
    assert torch.equal(qkv[:, (NH + KVH) * HD :], v_before)


def make_cache(num_blocks: int):
    kc = randn(num_blocks, KVH, BS, HD)
    vc = randn(num_blocks, KVH, BS, HD)
    return kc, vc


@pytest.mark.parametrize("T", TOKENS)
def test_store_kv_and_fused_rope_store(T):
    nb = T // BS + 8
    kc, vc = make_cache(nb)
    kc0, vc0 = kc.clone(), vc.clone()
    k, v = randn(T, KVH, HD), randn(T, KVH, HD)
    slots = torch.randperm(nb * BS, device=DEV)[:T]
    if T > 2:
        slots[1] = -1
    K.store_kv(k, v, kc, vc, slots)
    ek, ev = kc0.clone(), vc0.clone()
    for t in range(T):
        s = int(slots[t])
        if s >= 0:
            ek[s // BS, :, s % BS] = k[t]
            ev[s // BS, :, s % BS] = v[t]
    assert torch.equal(kc, ek) and torch.equal(vc, ev)

    # fused: q rotated in place, rotated k only in the cache
    q = randn(T, NH, HD)
    pos = torch.randint(0, 5000, (T,), device=DEV)
    rq, rk = ref_rope(q, pos, 500000.0), ref_rope(k, pos, 500000.0)
    k_before = k.clone()
    kc, vc = kc0.clone(), vc0.clone()
    K.rope_store_kv(q, k, v, pos, 500000.0, kc, vc, slots)
    assert torch.equal(k, k_before)
    assert rel_err(q, rq) < 1e-2
    for t in range(T):
        s = int(slots[t])
        if s >= 0:
            assert rel_err(kc[s // BS, :, s % BS], rk[t]) < 1e-2
            assert torch.equal(vc[s // BS, :, s % BS], v[t])
    mask = torch.ones(nb * BS, dtype=torch.bool, device=DEV)
    mask[slots[slots >= 0]] = False
    assert torch.equal(kc.permute(0, 2, 1, 3).reshape(nb * BS, KVH, HD)[mask],
                       kc0.permute(0, 2, 1, 3).reshape(nb * BS, KVH, HD)[mask])


# -------------------------------------------------------------------------------- attention


def ref_attention(q, kc, vc, table, positions_visible, scale):
    """q [n, NH, HD] for one sequence; positions_visible[i] = last visible position of query i."""
    n_ctx = int(max(positions_visible)) + 1
    blocks = table[: (n_ctx + BS - 1) // BS]
    k = kc[blocks].permute(0, 2, 1, 3).reshape(-1, KVH, HD)[:n_ctx].float()
    v = vc[blocks].permute(0, 2, 1, 3).reshape(-1, KVH, HD)[:n_ctx].float()
    g = NH // KVH
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    kpos = torch.arange(n_ctx, device=q.device)
    vis = torch.tensor(positions_visible, device=q.device)
    s = s.masked_fill(kpos[None, None, :] > vis[None, :, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)


def build_tables(ctx_lens, extra_blocks=2):
    per = [(c + BS - 1) // BS for c in ctx_lens]
    width = max(per) + extra_blocks
    nb = sum(per) + 4
    perm = torch.randperm(nb, device=DEV)
    table = torch.zeros((len(ctx_lens), width), dtype=torch.int64, device=DEV)
    o = 0
    for i, n in enumerate(per):
        table[i, :n] = perm[o : o + n]
        o += n
    return table, nb


@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("parts", [None, 1])
def test_paged_decode_attention(B, parts):
    g = torch.Generator().manual_seed(B)
    ctx = [CTX[int(torch.randint(0, len(CTX), (1,), generator=g))] for _ in range(B)]
    ctx[0] = CTX[-1]
    table, nb = build_tables(ctx)
    kc, vc = make_cache(nb)
    q = randn(B, NH, HD)
    cl = torch.tensor(ctx, dtype=torch.int64, device=DEV)
    scale = HD**-0.5
    out = poison((B, NH, HD))
    K.paged_decode_attention(q, kc, vc, table, cl, scale, out=out, num_partitions=parts)
    assert torch.isfinite(out).all()
    for b in range(B):
        ref = ref_attention(q[b : b + 1], kc, vc, table[b], [ctx[b] - 1], scale)
        assert rel_err(out[b : b + 1], ref) < 1e-2, (b, ctx[b])


def test_paged_decode_attention_hint_too_small():
    """A max_context_len hint below the real context must not drop tokens."""
    ctx = [CTX[-1], CTX[2]]
    table, nb = build_tables(ctx)
    kc, vc = make_cache(nb)
    q = randn(2, NH, HD)
    cl = torch.tensor(ctx, dtype=torch.int64, device=DEV)
    out = K.paged_decode_attention(q, kc, vc, table, cl, HD**-0.5, max_context_len=BS * 2)
    for b in range(2):
        ref = ref_attention(q[b : b + 1], kc, vc, table[b], [ctx[b] - 1], HD**-0.5)
        assert rel_err(out[b : b + 1], ref) < 1e-2


@pytest.mark.parametrize("case", ["single", "chunked", "mixed"])
def test_prefill_attention(case):
    if case == "single":
        seqs = [(0, TOKENS[-1])]  # (already cached, new tokens)
    elif case == "chunked":
        seqs = [(CTX[3] if len(CTX) > 3 else 130, 17)]
    else:
        seqs = [(0, 3), (100, 17), (0, 1), (64, TOKENS[-1]), (5, 65)]
    ctx = [c + n for c, n in seqs]
    table, nb = build_tables(ctx)
    kc, vc = make_cache(nb)  # the cache already holds every position (store_kv ran)
    T = sum(n for _, n in seqs)
    q = randn(T, NH, HD)
    qsl = torch.tensor([0] + list(torch.tensor([n for _, n in seqs]).cumsum(0)), dtype=torch.int64, device=DEV)
    cl = torch.tensor(ctx, dtype=torch.int64, device=DEV)
    out = poison((T, NH, HD))
    K.prefill_attention(q, kc, vc, qsl, cl, table, HD**-0.5, out=out)
    assert torch.isfinite(out).all()
    o = 0
    for b, (c, n) in enumerate(seqs):
        ref = ref_attention(q[o : o + n], kc, vc, table[b], [c + i for i in range(n)], HD**-0.5)
        assert rel_err(out[o : o + n], ref) < 1e-2, (b, c, n)
        o += n


def test_prefill_attention_over_a_tile_list():
    """A fixed grid of tiles read on the device (a prompt-chunk graph's): the sequences' rows
    match the reference, padding tokens in no tile and the unused tiles (-1) leave out alone."""
    from native.kernels.attention import max_prefill_tiles, prefill_tiles

    seqs = [(0, 3), (100, 17), (0, 1), (5, 65)]
    ctx = [c + n for c, n in seqs]
    table, nb = build_tables(ctx)
    kc, vc = make_cache(nb)
    T = sum(n for _, n in seqs)
    Tb, rows, bm = T + 13, 6, 16  # a bucket of Tb tokens for up to 6 sequences
    q = randn(Tb, NH, HD)
    lens = [n for _, n in seqs]
    qsl = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)) + [T] * (rows - len(seqs)), dtype=torch.int64, device=DEV)
    cl = torch.tensor(ctx + [0] * (rows - len(seqs)), dtype=torch.int64, device=DEV)
    wide = torch.zeros((rows, table.shape[1]), dtype=torch.int64, device=DEV)
    wide[: len(seqs)] = table
    n_tiles = max_prefill_tiles(Tb, rows, bm)
    tiles = prefill_tiles(lens, bm)
    assert len(tiles) <= n_tiles
    tiles_t = torch.tensor(tiles + [-1] * (n_tiles - len(tiles)), dtype=torch.int64, device=DEV)
    out = poison((Tb, NH, HD))
    K.prefill_attention(q, kc, vc, qsl, cl, wide, HD**-0.5, out=out, block_m=bm, tiles=tiles_t)
    assert torch.isnan(out[T:]).all()  # padding: in no tile, not written
    o = 0
    for b, (c, n) in enumerate(seqs):
        ref = ref_attention(q[o : o + n], kc, vc, table[b], [c + i for i in range(n)], HD**-0.5)
        assert rel_err(out[o : o + n], ref) < 1e-2, (b, c, n)
        o += n
    with pytest.raises(ValueError, match="block_m"):
        K.prefill_attention(q, kc, vc, qsl, cl, wide, HD**-0.5, tiles=tiles_t)


# ---------------------------------------------------------------------------------- wlinear


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("M", TOKENS + (() if INTERPRET else (1100,)))  # 1,100: dequantized, then cuBLAS
@pytest.mark.parametrize("shape", ["qkv", "o", "swiglu"])
def test_wlinear(bits, M, shape):
    if shape == "qkv":
        N, Kd, act = (NH + 2 * KVH) * HD, H, None
    elif shape == "o":
        N, Kd, act = H, NH * HD, None
    else:
        N, Kd, act = 2 * (2 * INTER), H, "swiglu"  # the shared expert: gate rows, then up rows
    w, s, wref = make_weight(N, Kd, bits)
    x = randn(M, Kd)
    n_out = N // 2 if act else N
    out = poison((M, n_out))
    K.wlinear(x, w, s, bits, act=act, out=out)
    y = x.float() @ wref.T
    if act:
        g, u = y[:, : N // 2], y[:, N // 2 :]
        y = torch.nn.functional.silu(g) * u
    assert torch.isfinite(out).all()
    assert rel_err(out, y) < 1e-2


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_round_trip_exact(bits):
    """The kernel sees exactly the reference quantizer's values: x = identity rows gives
    out[m, n] = bf16(q[n, m] * scale[n])."""
    Kd, N = 256, 64
    w = randn(N, Kd, scale=0.05)
    w[0, 0] = 0.5  # exact ties after scaling appear often enough in random data; force one max
    q, s, stored = ref_quant(w, bits)
    x = torch.eye(Kd, dtype=BF, device=DEV)
    ref = (q.float() * s.float()[:, None]).T.to(BF)
    for cvt in CVTS:  # every dequantization path (see native/kernels/wlinear.py _wq_step)
        for bm in (16, 64):
            for swap in (0, 1):  # the weight as the right operand, and transposed (_wq_tile_t)
                out = poison((Kd, N))
                cfg = {"BM": bm, "BN": 64 if swap else 32, "BK": 128, "num_warps": 4, "num_stages": 3,
                       "CVT": cvt, "SWAP": swap}
                K.wlinear(x, stored, s, bits, out=out, config=cfg)
                assert torch.equal(out, ref), (cvt, bm, swap)
    deq = importlib.import_module("native.kernels.dequant").dequantize
    assert torch.equal(deq(stored, s), ref.T.contiguous())  # fp32 q * s rounded once, as the reference
    if bits == 4:
        assert stored.dtype == torch.uint8 and stored.shape == (N, Kd // 2)
        assert int(q.min()) >= -7 and int(q.max()) <= 7


def test_quant_matches_model_quantizer():
    quant = pytest.importorskip("native.model.quant")
    w = randn(48, 128, scale=0.05)
    q4, s4, p4 = ref_quant(w, 4)
    mq, ms = quant.quantize_int4(w)
    assert torch.equal(mq.to(torch.int16), q4) and torch.equal(ms, s4)
    assert torch.equal(quant.pack_int4(mq), p4)


def test_wlinear_rejects_bad_input():
    w, s, _ = make_weight(64, 128, 8)
    x = randn(4, 128)
    with pytest.raises(ValueError, match="bits"):
        K.wlinear(x, w, s, 3)
    with pytest.raises(ValueError, match="int8"):
        K.wlinear(x, w.view(torch.uint8), s, 8)
    with pytest.raises(ValueError, match="last dim"):
        K.wlinear(randn(4, 96), w, s, 8)
    with pytest.raises(ValueError, match="scales"):
        K.wlinear(x, w, s[:10], 8)
    with pytest.raises(ValueError, match="bfloat16"):
        K.wlinear(x.float(), w, s, 8)


# ------------------------------------------------------------- decode GEMV (split-K, gemv.py)

GEMV_SHAPES = {  # N, K, act: the real qkv, and odd N with a K that is no multiple of the K step
    "qkv": ((NH + 2 * KVH) * HD, H, None),
    "odd": (H // 2 + 17, H // 2 + 40, None),
    "swiglu_odd": (2 * (INTER // 2 + 9), H // 2 + 40, "swiglu"),
}
GEMV_CONFIGS = [  # every way to multiply a tile, one program per tile and split over K
    {"MODE": m, "BN": 16 if m == 0 else (64 if m == 2 else 32), "BK": 128, "SPLIT": sp, "num_warps": 4,
     "num_stages": 2}
    for m in (0, 1, 2) for sp in (1, 3)
]


def gemv_case(bits, N, Kd, M, act):
    """A fresh random weight quantized by the model's quantizer and the fp32 product on the CPU
    of its dequantized values (native/model/quant.py), for x of M rows."""
    quant = importlib.import_module("native.model.quant")
    w = torch.randn(N, Kd) * 0.02
    stored, s = quant.quantize_weight(w.to(BF), bits)
    wref = quant.dequantize_int8(quant.int_weight(stored, bits), s, torch.float32)
    x = torch.randn(M, Kd).to(BF)
    y = x.float() @ wref.T
    if act:
        y = torch.nn.functional.silu(y[:, : N // 2]) * y[:, N // 2 :]
    return x.to(DEV), stored.to(DEV), s.to(DEV), y


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 3, 16, 64])
@pytest.mark.parametrize("shape", list(GEMV_SHAPES))
def test_gemv_matches_cpu_reference(bits, M, shape):
    N, Kd, act = GEMV_SHAPES[shape]
    torch.manual_seed(100 * M + bits)
    x, w, s, ref = gemv_case(bits, N, Kd, M, act)
    n_out = N // 2 if act else N
    cfgs = [None] + ([c for c in GEMV_CONFIGS if c["MODE"] or M == 1] if shape != "qkv" else [])
    for cfg in cfgs:  # None: wlinear's own choice (decode rows take the split-K kernel)
        out = poison((M, n_out))
        K.wlinear(x, w, s, bits, act=act, out=out, config=cfg)
        assert torch.isfinite(out).all(), cfg
        assert rel_err(out.cpu(), ref) < 1e-2, cfg


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act", [None, "swiglu"])
def test_gemv_deterministic_graph_equals_eager(bits, act):
    """Split-K sums its partials in split order: equal bits run to run, in a graph replay as
    eagerly, rows independent of the other rows of the batch, and the tile counters back at 0."""
    gemv = importlib.import_module("native.kernels.gemv")
    N, Kd = (2 * 2 * INTER, H) if act else ((NH + 2 * KVH) * HD, H)
    w, s, _ = make_weight(N, Kd, bits)
    n_out = N // 2 if act else N
    for cfg in (None, {"MODE": 0, "BN": 16, "BK": 256, "SPLIT": 4}, {"MODE": 1, "BN": 32, "BK": 256, "SPLIT": 5}):
        for M in (1, 16) if cfg is None else ((1,) if cfg["MODE"] == 0 else (3, 16)):
            x = randn(M, Kd)
            first = K.wlinear(x, w, s, bits, act=act, config=cfg)
            for _ in range(3):
                assert torch.equal(K.wlinear(x, w, s, bits, act=act, config=cfg), first), (cfg, M)
            if M == 16:  # the first 3 rows alone (same bucket, same config) give the same bits
                assert torch.equal(K.wlinear(x[:3].clone(), w, s, bits, act=act, config=cfg), first[:3]), cfg
            static_x, static_out = x.clone(), poison((M, n_out))
            K.wlinear(static_x, w, s, bits, act=act, out=static_out, config=cfg)  # warm-up outside capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                K.wlinear(static_x, w, s, bits, act=act, out=static_out, config=cfg)
            for _ in range(2):
                x2 = randn(M, Kd)
                static_x.copy_(x2)
                static_out.fill_(float("nan"))
                g.replay()
                assert torch.equal(static_out, K.wlinear(x2, w, s, bits, act=act, config=cfg)), (cfg, M)
            del g
    torch.cuda.synchronize()
    for _, counters in gemv._WORKSPACES.values():
        assert int(counters.abs().sum()) == 0


# -------------------------------------------------------------------------------------- MoE


def ref_route(x, gate_w, bias, k):
    logits = x.float() @ gate_w.float().T
    probs = torch.softmax(logits, -1)
    _, idx = torch.topk(probs + bias.float()[None, :], k, dim=-1)
    w = probs.gather(-1, idx)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return w.to(BF), idx, probs + bias.float()[None, :]


@pytest.mark.parametrize("T", TOKENS)
def test_moe_route(T):
    x = randn(T, H)
    gate_w = torch.randn(E, H, device=DEV) * 0.05
    bias = torch.rand(E, device=DEV) * 0.02
    w, ids = K.moe_route(x, gate_w, TOPK, bias)
    rw, rids, score = ref_route(x, gate_w, bias, TOPK)
    srt = score.sort(-1, descending=True).values
    margin = srt[:, TOPK - 1] - srt[:, TOPK]
    ok = margin > 1e-5  # tokens whose k-th and (k+1)-th scores tie are left out
    assert ok.float().mean() > 0.9
    ids_s, o1 = ids.long().sort(-1)
    rids_s, o2 = rids.sort(-1)
    assert torch.equal(ids_s[ok], rids_s[ok])
    w_s, rw_s = w.float().gather(-1, o1), rw.float().gather(-1, o2)
    assert ((w_s - rw_s).abs()[ok] <= 2**-8).all()
    assert ids.dtype == torch.int32 and w.dtype == BF


@pytest.mark.parametrize("T", [1, 17, 300] if not INTERPRET else [1, 17])
@pytest.mark.parametrize("block_m", [16, 64])
def test_moe_align(T, block_m):
    ids = torch.randint(0, E, (T, TOPK), device=DEV, dtype=torch.int32)
    sorted_ids, eids, npad = K.moe_align(ids, E, block_m)
    n = int(npad)
    counts = torch.bincount(ids.flatten().long(), minlength=E)
    assert n == int(((counts + block_m - 1) // block_m * block_m).sum())
    s = sorted_ids[:n].long()
    real = s[s < T * TOPK]
    assert torch.equal(real.sort().values, torch.arange(T * TOPK, device=DEV))
    flat = ids.flatten().long()
    for b in range(n // block_m):
        tile = s[b * block_m : (b + 1) * block_m]
        tile = tile[tile < T * TOPK]
        assert tile.numel() > 0
        assert (flat[tile] == int(eids[b])).all()


def ref_moe(x, topk_w, topk_ids, w13_ref, w2_ref):
    T = x.shape[0]
    out = torch.zeros(T, H, device=DEV)
    x32 = x.float()
    for t in range(T):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gu = w13_ref[e] @ x32[t]
            h = torch.nn.functional.silu(gu[:INTER]) * gu[INTER:]
            out[t] += topk_w[t, j].float() * (w2_ref[e] @ h)
    return out


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("T", TOKENS)
def test_fused_moe(bits, T):
    torch.manual_seed(1000 * bits + T)
    x = randn(T, H)
    gate_w = torch.randn(E, H, device=DEV) * 0.05
    bias = torch.rand(E, device=DEV) * 0.02
    w13, s13, w13_ref = make_weight(2 * INTER, H, bits, experts=E)
    w2, s2, w2_ref = make_weight(H, INTER, bits, experts=E)
    shared = randn(T, H)
    poison_allocator()
    out = K.fused_moe(x, gate_w, w13, w2, TOPK, bias, s13, s2, shared_out=shared)
    assert out.shape == (T, H) and out.dtype == BF
    assert torch.isfinite(out).all()
    tw, tid = K.moe_route(x, gate_w, TOPK, bias)
    ref = ref_moe(x, tw, tid, w13_ref, w2_ref) + shared.float()
    assert rel_err(out, ref) < 2e-2
    # without the shared expert, and with the other tile height
    bm = 64 if K.moe_block_m(T * TOPK, E) == 16 else 16
    out2 = K.fused_moe(x, gate_w, w13, w2, TOPK, bias, s13, s2, block_m=bm)
    assert rel_err(out2, ref - shared.float()) < 2e-2
    if T > 100:  # the prefill tile height
        out4 = K.fused_moe(x, gate_w, w13, w2, TOPK, bias, s13, s2, block_m=128)
        assert rel_err(out4, ref - shared.float()) < 2e-2
    if bits != 16:  # the other dequantization paths too, with the weight on either side
        for cvt in CVTS:
            for swap in (0, 1):
                cfg = {"BN": 64 if swap else 32, "BK": 128, "num_warps": 4, "num_stages": 3, "CVT": cvt,
                       "SWAP": swap}
                out3 = K.fused_moe(x, gate_w, w13, w2, TOPK, bias, s13, s2, configs=(cfg, cfg))
                assert rel_err(out3, ref - shared.float()) < 2e-2, (cvt, swap)


def test_fused_moe_rejects_bad_input():
    x = randn(2, H)
    gate_w = torch.randn(E, H, device=DEV)
    w13, s13, _ = make_weight(2 * INTER, H, 8, experts=E)
    w2, s2, _ = make_weight(H, INTER, 8, experts=E)
    with pytest.raises(ValueError, match="scales"):
        K.fused_moe(x, gate_w, w13, w2, TOPK, None, None, s2)
    with pytest.raises(ValueError, match="formats differ"):
        K.fused_moe(x, gate_w, w13, w2.view(torch.uint8), TOPK, None, s13, s2)
    with pytest.raises(ValueError, match="top_k"):
        K.fused_moe(x, gate_w, w13, w2, E + 1, None, s13, s2)


def test_decode_partitions_static():
    n, bpp = K.decode_partitions(1, KVH, 16, torch.device(DEV))
    assert n * bpp >= 16 and n > 1
    n64, _ = K.decode_partitions(64, 4, 16, torch.device(DEV))
    assert n64 == 1
    assert math.isfinite(float(n))
