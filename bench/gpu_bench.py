"""GPU benchmark of the Triton kernels on ERNIE-4.5-21B-A3B shapes (random weights).

One run builds each weight format in turn (wint4, wint8, bf16), optionally sweeps tile configs of
the decode-critical kernels, times a full decode step (embedding -> 28 layers -> final norm ->
lm_head) captured in a CUDA graph at batch 1 / 16 / 64 with a 1K context, counts the kernels one
captured step launches (bench/step_launches.py), breaks the step down per kernel, times a
2,048-token bf16 prefill (eager), and prints a table against the HBM floors of shared/GPU.md.
Full numbers go to ``$OUT/bench.json`` (or ``--out``). ``--gemv-compare`` times every step a
second time with the decode-shaped split-K products (native/kernels/gemv.py) turned off, and
``--gemv-configs`` loads their configs from bench/kernel_variants.py's ``gemv_configs.json``.

    python3 bench/gpu_bench.py [--tune] [--modes wint4,wint8,bf16] [--batches 1,16,64]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from step_launches import step_launches  # bench/ is sys.path[0] when this runs as a script

from native import kernels as KN

KW = importlib.import_module("native.kernels.wlinear")
GV = importlib.import_module("native.kernels.gemv")

# ERNIE-4.5-21B-A3B
LAYERS, HID, NH, KVH, HD = 28, 2560, 20, 4, 128
E, TOPK, MI, SHARED_I, DENSE_I, VOCAB = 64, 6, 1536, 3072, 12288, 103424
THETA, EPS, BS = 500000.0, 1e-5, 64
FLOORS = {  # shared/GPU.md: bytes over ~3.0 TB/s
    ("bf16", 1): 2.25, ("bf16", 64): 15.8, ("wint4", 1): 0.91, ("wint4", 64): 5.2,
}
TARGETS = {("wint4", 1): 1.37, ("wint4", 64): 6.8}
HF_BASELINE = {1: 85.0, 16: 123.6, 64: 250.0}  # transformers, GPU.md

RESULTS: dict = {"decode": {}, "kernels": {}, "sweeps": {}, "prefill": {}, "errors": []}
LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def save(out_dir):
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    with open(os.path.join(out_dir, "bench_log.txt"), "w") as f:
        f.write("\n".join(LOG) + "\n")


# ----------------------------------------------------------------------------------- timing


def time_graph(fn, iters=30, warm=3, divide=1):
    """Median ms of one replay of a CUDA graph of ``fn`` (divided by ``divide``)."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(warm):
        g.replay()
    ts = []
    for _ in range(iters):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    del g
    return statistics.median(ts) / divide


def time_eager(fn, iters=7, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    return statistics.median(ts)


def ceilings():
    n = 1 << 29  # 1 GiB of bf16
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = time_eager(lambda: b.copy_(a), iters=10)
    bw = 2 * a.numel() * 2 / t / 1e6  # GB/s (t in ms)
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t2 = time_eager(lambda: m @ m, iters=10)
    tf = 2 * 8192**3 / t2 / 1e9  # TFLOP/s
    return bw, tf


# ---------------------------------------------------------------------------------- weights


def make_lin(n, k, bits):
    if bits == 16:
        return (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, None)
    if bits == 8:
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        s = (torch.rand(n, device="cuda") * 0.5 + 0.75) * (0.02 / 73)
        return (w, s.to(torch.bfloat16))
    w = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
    s = (torch.rand(n, device="cuda") * 0.5 + 0.75) * (0.02 / 4.6)
    return (w, s.to(torch.bfloat16))


def make_experts(n, k, bits):
    if bits == 16:
        return (torch.randn(E, n, k, device="cuda", dtype=torch.bfloat16) * 0.02, None)
    if bits == 8:
        w = torch.randint(-127, 128, (E, n, k), device="cuda", dtype=torch.int8)
        s = (torch.rand(E, n, device="cuda") * 0.5 + 0.75) * (0.02 / 73)
        return (w, s.to(torch.bfloat16))
    w = torch.randint(0, 256, (E, n, k // 2), device="cuda", dtype=torch.uint8)
    s = (torch.rand(E, n, device="cuda") * 0.5 + 0.75) * (0.02 / 4.6)
    return (w, s.to(torch.bfloat16))


MODE_BITS = {"bf16": (16, 16), "wint8": (8, 8), "wint4": (8, 4)}  # (dense/shared, routed experts)


class Model:
    def __init__(self, mode):
        dense_bits, exp_bits = MODE_BITS[mode]
        self.mode, self.dense_bits, self.exp_bits = mode, dense_bits, exp_bits
        torch.manual_seed(0)
        self.emb = torch.randn(VOCAB, HID, device="cuda", dtype=torch.bfloat16) * 0.02
        self.norm_f = torch.ones(HID, device="cuda", dtype=torch.bfloat16)
        self.layers = []
        for i in range(LAYERS):
            ly = {
                "ln_in": (1 + 0.05 * torch.randn(HID, device="cuda")).to(torch.bfloat16),
                "ln_post": (1 + 0.05 * torch.randn(HID, device="cuda")).to(torch.bfloat16),
                "qkv": make_lin((NH + 2 * KVH) * HD, HID, dense_bits),
                "o": make_lin(HID, NH * HD, dense_bits),
            }
            if i == 0:
                ly["gu"] = make_lin(2 * DENSE_I, HID, dense_bits)
                ly["down"] = make_lin(HID, DENSE_I, dense_bits)
            else:
                ly["gu"] = make_lin(2 * SHARED_I, HID, dense_bits)
                ly["down"] = make_lin(HID, SHARED_I, dense_bits)
                ly["gate"] = torch.randn(E, HID, device="cuda", dtype=torch.float32) * 0.05
                ly["bias"] = torch.rand(E, device="cuda", dtype=torch.float32) * 0.01
                ly["w13"] = make_experts(2 * MI, HID, exp_bits)
                ly["w2"] = make_experts(HID, MI, exp_bits)
            self.layers.append(ly)
        torch.cuda.synchronize()

    def bytes_per_step(self, batch):
        """Bytes a decode step must read (weights touched + lm_head + KV at 1K context)."""
        def nb(t):
            return t.numel() * t.element_size() if t is not None else 0
        tot = nb(self.emb)  # lm_head (tied)
        touched = E * (1 - (1 - TOPK / E) ** batch)
        for i, ly in enumerate(self.layers):
            for key in ("qkv", "o", "gu", "down"):
                tot += nb(ly[key][0]) + nb(ly[key][1])
            if i > 0:
                tot += nb(ly["gate"])
                tot += (nb(ly["w13"][0]) + nb(ly["w13"][1]) + nb(ly["w2"][0]) + nb(ly["w2"][1])) * touched / E
        tot += batch * 1024 * KVH * HD * 2 * 2 * LAYERS
        return tot


# ------------------------------------------------------------------------------------ linears

TORCH_LIN: set = set()  # (m_bucket, N, K, swiglu) routed to cuBLAS (bf16 weights only)


def lin(x, wt, bits, act=None):
    w, s = wt
    key = (KW.m_bucket(x.shape[0]), w.shape[0], x.shape[1], act == "swiglu")
    if bits == 16 and (key in TORCH_LIN or x.shape[0] >= 1024):  # the model's bf16 linears are cuBLAS
        y = F.linear(x, w)
        if act == "swiglu":
            g, u = y.chunk(2, dim=-1)
            return F.silu(g) * u
        return y
    return KN.wlinear(x, w, s, bits, act=act)


# --------------------------------------------------------------------------------- the step


class Decode:
    def __init__(self, model, batch, ctx, kc, vc):
        self.m, self.B, self.ctx = model, batch, ctx
        dev = "cuda"
        nblk = -(-ctx // BS)
        self.ids = torch.randint(0, VOCAB, (batch,), device=dev)
        self.pos = torch.full((batch,), ctx - 1, dtype=torch.int64, device=dev)
        bt = torch.arange(batch * nblk, device=dev, dtype=torch.int64).view(batch, nblk)
        self.bt = bt
        self.cl = torch.full((batch,), ctx, dtype=torch.int64, device=dev)
        self.slots = bt[:, (ctx - 1) // BS] * BS + (ctx - 1) % BS
        self.kc, self.vc = kc, vc
        self.scale = HD**-0.5
        self.fuse_combine = True

    def attn(self, i, x, ly, parts=None):
        B = self.B
        qkv = lin(x, ly["qkv"], self.m.dense_bits)
        q = qkv[:, : NH * HD].view(B, NH, HD)
        k = qkv[:, NH * HD : (NH + KVH) * HD].view(B, KVH, HD)
        v = qkv[:, (NH + KVH) * HD :].view(B, KVH, HD)
        KN.rope_store_kv(q, k, v, self.pos, THETA, self.kc[i], self.vc[i], self.slots)
        a = KN.paged_decode_attention(q, self.kc[i], self.vc[i], self.bt, self.cl, self.scale,
                                      max_context_len=self.ctx, num_partitions=parts)
        return lin(a.view(B, NH * HD), ly["o"], self.m.dense_bits)

    def ffn(self, i, x, ly):
        """Returns what the next norm adds to the residual: ("dense", y) or ("moe", pairs, shared)."""
        m = self.m
        sh = lin(lin(x, ly["gu"], m.dense_bits, "swiglu"), ly["down"], m.dense_bits)
        if i == 0:
            return ("dense", sh)
        if not self.fuse_combine:
            return ("dense", KN.fused_moe(x, ly["gate"], ly["w13"][0], ly["w2"][0], TOPK, ly["bias"],
                                          ly["w13"][1], ly["w2"][1], shared_out=sh))
        pairs = KN.fused_moe(x, ly["gate"], ly["w13"][0], ly["w2"][0], TOPK, ly["bias"],
                             ly["w13"][1], ly["w2"][1], return_pairs=True)
        return ("moe", pairs, sh)

    @staticmethod
    def add_norm(pend, res, w):
        if pend[0] == "dense":
            return KN.fused_add_rmsnorm(pend[1], res, w, EPS)
        return KN.moe_combine_add_rmsnorm(pend[1], TOPK, pend[2], res, w, EPS)

    def step(self):
        m = self.m
        h = F.embedding(self.ids, m.emb)
        res = h.clone()
        x = KN.rmsnorm(h, m.layers[0]["ln_in"], EPS)
        pend = None
        for i, ly in enumerate(m.layers):
            if i > 0:
                x = self.add_norm(pend, res, ly["ln_in"])
            a = self.attn(i, x, ly)
            x = KN.fused_add_rmsnorm(a, res, ly["ln_post"], EPS)
            pend = self.ffn(i, x, ly)
        x = self.add_norm(pend, res, m.norm_f)
        return F.linear(x, m.emb)


def decode_breakdown(dec):
    """Per-op ms per step: each op captured alone over the 27 (or 28) layers' weights."""
    m, B = dec.m, dec.B
    x = torch.randn(B, HID, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(B, HID, device="cuda", dtype=torch.bfloat16)
    L = m.layers
    qkv_x = torch.randn(B, (NH + 2 * KVH) * HD, device="cuda", dtype=torch.bfloat16)
    attn_in = torch.randn(B, NH * HD, device="cuda", dtype=torch.bfloat16)
    sh_in = torch.randn(B, SHARED_I, device="cuda", dtype=torch.bfloat16)
    db = m.dense_bits

    def rope_store():
        for i in range(LAYERS):
            q = qkv_x[:, : NH * HD].view(B, NH, HD)
            k = qkv_x[:, NH * HD : (NH + KVH) * HD].view(B, KVH, HD)
            v = qkv_x[:, (NH + KVH) * HD :].view(B, KVH, HD)
            KN.rope_store_kv(q, k, v, dec.pos, THETA, dec.kc[i], dec.vc[i], dec.slots)

    def attn():
        q = qkv_x[:, : NH * HD].view(B, NH, HD)
        for i in range(LAYERS):
            KN.paged_decode_attention(q, dec.kc[i], dec.vc[i], dec.bt, dec.cl, dec.scale, max_context_len=dec.ctx)

    def route_align():
        for i in range(1, LAYERS):
            w, ids = KN.moe_route(x, L[i]["gate"], TOPK, L[i]["bias"])
            KN.moe_align(ids, E, KN.moe_block_m(B * TOPK, E))

    w_, ids_ = KN.moe_route(x, L[1]["gate"], TOPK, L[1]["bias"])
    bm = KN.moe_block_m(B * TOPK, E)
    srt, eids, npad = KN.moe_align(ids_, E, bm)
    h1 = torch.randn(B * TOPK, MI, device="cuda", dtype=torch.bfloat16)

    def moe_up():
        for i in range(1, LAYERS):
            KN.moe_gemm(x, L[i]["w13"][0], L[i]["w13"][1], srt, eids, npad, TOPK, bm, swiglu=True)

    def moe_down():
        for i in range(1, LAYERS):
            KN.moe_gemm(h1, L[i]["w2"][0], L[i]["w2"][1], srt, eids, npad, TOPK, bm, swiglu=False,
                        topk_weights=w_.view(-1), a_by_pair=True)

    pairs = torch.randn(B * TOPK, HID, device="cuda", dtype=torch.bfloat16)
    ops = {
        "add_rmsnorm": (lambda: [KN.fused_add_rmsnorm(x, res, L[i % LAYERS]["ln_in"], EPS)
                                 for i in range(LAYERS + 1)]),
        "qkv": (lambda: [lin(x, L[i]["qkv"], db) for i in range(LAYERS)]),
        "rope+store_kv": rope_store,
        "decode_attn": attn,
        "o_proj": (lambda: [lin(attn_in, L[i]["o"], db) for i in range(LAYERS)]),
        "router+align": route_align,
        "moe_gate_up": moe_up,
        "moe_down": moe_down,
        "combine+norm": (lambda: [KN.moe_combine_add_rmsnorm(pairs, TOPK, x, res, L[i]["ln_in"], EPS)
                                  for i in range(1, LAYERS)]),
        "shared_gate_up": (lambda: [lin(x, L[i]["gu"], db, "swiglu") for i in range(1, LAYERS)]),
        "shared_down": (lambda: [lin(sh_in, L[i]["down"], db) for i in range(1, LAYERS)]),
        "dense_mlp(l0)": (lambda: lin(lin(x, L[0]["gu"], db, "swiglu"), L[0]["down"], db)),
        "lm_head": (lambda: F.linear(x, m.emb)),
    }
    out = {}
    for name, fn in ops.items():
        try:
            out[name] = time_graph(fn, iters=15)
        except Exception as e:  # keep going: the table says what failed
            out[name] = None
            RESULTS["errors"].append(f"breakdown {m.mode} b{B} {name}: {e!r}")
    return out


# ------------------------------------------------------------------------------------ sweeps

WL_SMALL = [
    {"BM": 16, "BN": 16, "BK": 256, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 16, "BK": 512, "num_warps": 4, "num_stages": 3},
    {"BM": 16, "BN": 32, "BK": 256, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 32, "BK": 128, "num_warps": 4, "num_stages": 5},
    {"BM": 16, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 64, "BK": 256, "num_warps": 8, "num_stages": 3},
]
WL_64 = [
    {"BM": 16, "BN": 32, "BK": 256, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"BM": 32, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"BM": 64, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BN": 32, "BK": 256, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
]
MOE_SMALL = [
    {"BN": 16, "BK": 256, "num_warps": 4, "num_stages": 4},
    {"BN": 32, "BK": 256, "num_warps": 4, "num_stages": 4},
    {"BN": 32, "BK": 128, "num_warps": 4, "num_stages": 5},
    {"BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"BN": 64, "BK": 256, "num_warps": 8, "num_stages": 3},
    {"BN": 32, "BK": 512, "num_warps": 4, "num_stages": 3},
]


def sweep_wlinear(model, M, name, key, act, cands):
    L = model.layers
    if model.dense_bits == 8:
        cands = cands + [dict(c, CVT=0) for c in cands[:3]]
    lys = range(1, LAYERS) if key in ("gu", "down") else range(LAYERS)
    bits = model.dense_bits
    w0 = L[1][key][0]
    N = w0.shape[0]
    Kd = w0.shape[1] * (2 if bits == 4 else 1)
    x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
    ref = KN.wlinear(x, w0, L[1][key][1], bits, act=act)
    res = []
    for cfg in cands:
        try:
            y = KN.wlinear(x, w0, L[1][key][1], bits, act=act, config=cfg)
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            if not err < 1e-2:
                raise RuntimeError(f"wrong result, rel err {err}")
            t = time_graph(lambda c=cfg: [KN.wlinear(x, L[i][key][0], L[i][key][1], bits, act=act, config=c)
                                          for i in lys], iters=10, divide=len(lys))
            res.append((t, cfg))
        except Exception as e:
            RESULTS["errors"].append(f"sweep {name} M{M} {cfg}: {e!r}"[:400])
    if bits == 16:
        def torch_lin(i):
            y = F.linear(x, L[i][key][0])
            if act:
                g, u = y.chunk(2, dim=-1)
                y = F.silu(g) * u
            return y
        try:
            t = time_graph(lambda: [torch_lin(i) for i in lys], iters=10, divide=len(lys))
            res.append((t, "torch"))
        except Exception as e:
            RESULTS["errors"].append(f"sweep {name} torch: {e!r}")
    res.sort(key=lambda r: r[0])
    if not res:
        return None
    best_t, best = res[0]
    wbytes = w0.numel() * w0.element_size()
    k = (KW.m_bucket(M), N, Kd, act == "swiglu")
    if best == "torch":
        TORCH_LIN.add(k)
    else:
        KW.TUNED[("wlinear", KW.m_bucket(M), N, Kd, bits, act == "swiglu")] = best
        TORCH_LIN.discard(k)
    RESULTS["sweeps"][f"{model.mode}/{name}/M{M}"] = [(round(t * 1000, 2), c) for t, c in res]
    log(f"  sweep {model.mode:5s} {name:15s} M={M:<4d} best {best_t * 1000:7.1f} us "
        f"({wbytes / best_t / 1e6:6.0f} GB/s) {best}")
    return best


def sweep_moe(model, T, which, cands):
    L = model.layers
    if model.exp_bits == 4:
        cands = cands + [dict(c, CVT=v) for c in cands[:3] for v in (0, 1)]
    elif model.exp_bits == 8:
        cands = cands + [dict(c, CVT=0) for c in cands[:3]]
    x = torch.randn(T, HID, device="cuda", dtype=torch.bfloat16)
    w_, ids_ = KN.moe_route(x, L[1]["gate"], TOPK, L[1]["bias"])
    bm = KN.moe_block_m(T * TOPK, E)
    srt, eids, npad = KN.moe_align(ids_, E, bm)
    h1 = torch.randn(T * TOPK, MI, device="cuda", dtype=torch.bfloat16)
    bits = model.exp_bits
    if which == "up":
        def run(i, c):
            return KN.moe_gemm(x, L[i]["w13"][0], L[i]["w13"][1], srt, eids, npad, TOPK, bm, swiglu=True, config=c)
        N, Kd = 2 * MI, HID
    else:
        def run(i, c):
            return KN.moe_gemm(h1, L[i]["w2"][0], L[i]["w2"][1], srt, eids, npad, TOPK, bm, swiglu=False,
                               topk_weights=w_.view(-1), a_by_pair=True, config=c)
        N, Kd = HID, MI
    ref = run(1, None).float()
    res = []
    for cfg in cands:
        try:
            y = run(1, cfg).float()
            err = ((y - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                raise RuntimeError(f"wrong result, rel err {err}")
            t = time_graph(lambda c=cfg: [run(i, c) for i in range(1, LAYERS)], iters=10, divide=LAYERS - 1)
            res.append((t, cfg))
        except Exception as e:
            RESULTS["errors"].append(f"sweep moe_{which} T{T} {cfg}: {e!r}"[:400])
    res.sort(key=lambda r: r[0])
    if not res:
        return None
    best_t, best = res[0]
    KW.TUNED[("moe", KW.m_bucket(T * TOPK), N, Kd, bits, which == "up")] = best
    touched = E * (1 - (1 - TOPK / E) ** T)
    w = L[1]["w13" if which == "up" else "w2"][0]
    wbytes = w.numel() * w.element_size() * touched / E
    RESULTS["sweeps"][f"{model.mode}/moe_{which}/T{T}"] = [(round(t * 1000, 2), c) for t, c in res]
    log(f"  sweep {model.mode:5s} moe_{which:12s} T={T:<4d} best {best_t * 1000:7.1f} us "
        f"(~{wbytes / best_t / 1e6:6.0f} GB/s) {best}")
    return best


def run_sweeps(model, batches):
    for M in batches:
        cands = WL_SMALL if M <= 16 else WL_64
        sweep_wlinear(model, M, "qkv", "qkv", None, cands)
        sweep_wlinear(model, M, "o_proj", "o", None, cands)
        sweep_wlinear(model, M, "shared_gate_up", "gu", "swiglu", cands)
        sweep_wlinear(model, M, "shared_down", "down", None, cands)
        sweep_moe(model, M, "up", MOE_SMALL)
        sweep_moe(model, M, "down", MOE_SMALL)


# ---------------------------------------------------------------------------------- prefill


def prefill_bench(model, kc, vc, T=2048, tune=True):
    dev = "cuda"
    nblk = -(-T // BS)
    ids = torch.randint(0, VOCAB, (T,), device=dev)
    pos = torch.arange(T, device=dev)
    bt = torch.arange(nblk, device=dev, dtype=torch.int64).view(1, nblk)
    slots = torch.arange(T, device=dev, dtype=torch.int64)
    qsl = torch.tensor([0, T], device=dev, dtype=torch.int64)
    cl = torch.tensor([T], device=dev, dtype=torch.int64)
    L = model.layers
    db = model.dense_bits
    acc: dict[str, list] = {}

    def mark(name, ev0):
        ev1 = torch.cuda.Event(enable_timing=True)
        ev1.record()
        acc.setdefault(name, []).append((ev0, ev1))
        return ev1

    def step(timed=False):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        h = F.embedding(ids, model.emb)
        res = h.clone()
        x = KN.rmsnorm(h, L[0]["ln_in"], EPS)
        f = None
        for i, ly in enumerate(L):
            if i > 0:
                x = KN.fused_add_rmsnorm(f, res, ly["ln_in"], EPS)
            if timed:
                ev = mark("norms", ev)
            qkv = lin(x, ly["qkv"], db)
            if timed:
                ev = mark("qkv", ev)
            q = qkv[:, : NH * HD].view(T, NH, HD)
            k = qkv[:, NH * HD : (NH + KVH) * HD].view(T, KVH, HD)
            v = qkv[:, (NH + KVH) * HD :].view(T, KVH, HD)
            KN.rope_store_kv(q, k, v, pos, THETA, kc[i], vc[i], slots)
            if timed:
                ev = mark("rope+store_kv", ev)
            a = KN.prefill_attention(q, kc[i], vc[i], qsl, cl, bt, HD**-0.5, max_query_len=T)
            if timed:
                ev = mark("prefill_attn", ev)
            o = lin(a.view(T, NH * HD), ly["o"], db)
            if timed:
                ev = mark("o_proj", ev)
            x = KN.fused_add_rmsnorm(o, res, ly["ln_post"], EPS)
            if timed:
                ev = mark("norms", ev)
            sh = lin(lin(x, ly["gu"], db, "swiglu"), ly["down"], db)
            if timed:
                ev = mark("dense_mlp(l0)" if i == 0 else "shared_expert", ev)
            if i == 0:
                f = sh
            else:
                f = KN.fused_moe(x, ly["gate"], ly["w13"][0], ly["w2"][0], TOPK, ly["bias"],
                                 ly["w13"][1], ly["w2"][1], shared_out=sh)
                if timed:
                    ev = mark("moe", ev)
        x = KN.fused_add_rmsnorm(f[-1:], res[-1:].contiguous(), model.norm_f, EPS)
        logits = F.linear(x, model.emb)
        if timed:
            mark("final+lm_head(last)", ev)
        return logits

    # sweep the few prefill-critical choices
    for key, act, name in (("gu", "swiglu", "shared_gate_up"), ("qkv", None, "qkv"), ("down", None, "shared_down")):
        if db == 16 and tune:
            sweep_wlinear(model, T, name, key, act, [
                {"BM": 128, "BN": 64, "BK": 64, "num_warps": 8, "num_stages": 3},
                {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
            ])
    for which in ("up", "down") if tune else ():
        sweep_moe(model, T, which, [
            {"BN": 64, "BK": 64, "num_warps": 8, "num_stages": 3},
            {"BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
            {"BN": 128, "BK": 64, "num_warps": 4, "num_stages": 4},
            {"BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
        ])
    t = time_eager(step, iters=5, warm=2)
    acc.clear()
    step(timed=True)
    torch.cuda.synchronize()
    parts = {k: sum(a.elapsed_time(b) for a, b in v) for k, v in acc.items()}
    return t, parts


def prefill_flops(T: int) -> float:
    """Matmul FLOPs of a T-token prefill: the active weights (attention, the first layer's dense
    MLP, shared and top-k routed experts, lm_head of the last row) and causal attention."""
    attn_w = HID * (NH + 2 * KVH) * HD + NH * HD * HID
    per_moe = 3 * HID * SHARED_I + TOPK * 3 * HID * MI + HID * E
    macs = T * (LAYERS * attn_w + 3 * HID * DENSE_I + (LAYERS - 1) * per_moe) + HID * VOCAB
    macs += LAYERS * NH * HD * T * T  # QK^T and PV over the causal half (2 * T^2 / 2)
    return 2 * macs


def decode_extras(dec, rec, args):
    """Launch counts of the step and, with --gemv-compare, the step without the split-K products."""
    if not args.no_launches:
        rec["launches"] = step_launches(dec.step)
        log(f"   launches per step: {rec['launches']['graph_nodes']} (graph nodes), "
            f"{rec['launches']['profiled_kernels']:.0f} kernels profiled")
    if args.gemv_compare and dec.m.dense_bits != 16:
        KW.GEMV_MAX_M = 0
        try:
            rec["ms_no_gemv"] = time_graph(dec.step, iters=30)
            if not args.no_launches and dec.B == 1:  # one kernel per product on either path
                rec["launches_no_gemv"] = step_launches(dec.step)
        finally:
            KW.GEMV_MAX_M = GV.MAX_ROWS
        log(f"   without the split-K products: {rec['ms_no_gemv']:.3f} ms/step")


# -------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--modes", default="wint4,wint8,bf16")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--prefill", default="2048,4096,8192", help="prefill lengths, every mode ('' for none)")
    ap.add_argument("--tune", action="store_true", help="sweep tile configs before timing")
    ap.add_argument("--tune-modes", default="wint4", help="modes whose decode kernels are swept")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--no-launches", action="store_true", help="skip counting the kernels of a step")
    ap.add_argument("--gemv-compare", action="store_true",
                    help="time each step also with the split-K decode products off (the old tile)")
    ap.add_argument("--gemv-configs", default="", help="gemv_configs.json of bench/kernel_variants.py")
    ap.add_argument("--profile", action="store_true", help="torch.profiler kernel table of wint4 b1/b64 steps")
    ap.add_argument("--ncu", action="store_true",
                    help="one eager wint4 b1 step between cudaProfilerStart/Stop (run under ncu "
                         "--profile-from-start off)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_default_dtype(torch.bfloat16)
    if args.ncu:
        nblk = -(-args.ctx // BS)
        kv = torch.randn(LAYERS, 2, nblk + 8, KVH, BS, HD, device="cuda", dtype=torch.bfloat16)
        dec = Decode(Model("wint4"), 1, args.ctx, [kv[i, 0] for i in range(LAYERS)], [kv[i, 1] for i in range(LAYERS)])
        dec.step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        dec.step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        return
    props = torch.cuda.get_device_properties(0)
    import triton

    if args.gemv_configs:
        for row in json.load(open(args.gemv_configs)):
            GV.TUNED[tuple(row["key"])] = row["cfg"]
        log(f"gemv configs: {len(GV.TUNED)} from {args.gemv_configs}")

    RESULTS["env"] = {
        "device": props.name, "sms": props.multi_processor_count, "date": datetime.datetime.now().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__, "args": vars(args),
    }
    log(f"# {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}, "
        f"{RESULTS['env']['date']}")
    bw, tf = ceilings()
    RESULTS["ceilings"] = {"copy_GBps": bw, "bf16_TFLOPs": tf}
    log(f"ceilings: device copy {bw:.0f} GB/s (read+write), bf16 matmul {tf:.0f} TFLOP/s")
    batches = [int(b) for b in args.batches.split(",")]
    nblk = -(-args.ctx // BS)
    nblocks = max(batches) * nblk + 8
    kv = torch.randn(LAYERS, 2, nblocks, KVH, BS, HD, device="cuda", dtype=torch.bfloat16)
    kc = [kv[i, 0] for i in range(LAYERS)]
    vc = [kv[i, 1] for i in range(LAYERS)]

    for mode in args.modes.split(","):
        t0 = time.time()
        try:
            model = Model(mode)
        except Exception as e:
            RESULTS["errors"].append(f"build {mode}: {e!r}")
            log(f"build {mode} failed: {e!r}")
            continue
        log(f"## {mode}: built in {time.time() - t0:.1f}s")
        if args.tune and mode in args.tune_modes.split(","):
            try:
                run_sweeps(model, [b for b in batches if b in (1, 64)])
            except Exception:
                RESULTS["errors"].append(f"sweeps {mode}: {traceback.format_exc()[-800:]}")
        for B in batches:
            try:
                dec = Decode(model, B, args.ctx, kc, vc)
                t = time_graph(dec.step, iters=30)
                floor_ms = model.bytes_per_step(B) / (bw * 1e6) if bw else float("nan")
                RESULTS["decode"][f"{mode}/b{B}"] = {"ms": t, "floor_ms_own_bytes": floor_ms,
                                                     "tok_s": B / t * 1000}
                log(f"decode {mode:5s} b{B:<3d} {t:8.3f} ms/step  ({B / t * 1000:8.0f} tok/s)  "
                    f"own byte floor {floor_ms:.2f} ms")
                decode_extras(dec, RESULTS["decode"][f"{mode}/b{B}"], args)
                if mode == "wint4" and B in (1, 64):
                    dec.fuse_combine = False
                    t_nf = time_graph(dec.step, iters=20)
                    dec.fuse_combine = True
                    RESULTS["decode"][f"{mode}/b{B}"]["ms_unfused_combine"] = t_nf
                    log(f"   (combine not fused into the norm: {t_nf:.3f} ms)")
                if not args.no_breakdown and B in (1, 64):
                    bd = decode_breakdown(dec)
                    RESULTS["kernels"][f"{mode}/b{B}"] = bd
                    tot = sum(v for v in bd.values() if v)
                    log("   per step: " + ", ".join(f"{k} {v:.3f}" for k, v in bd.items() if v is not None)
                        + f"  | sum {tot:.3f} ms")
                if args.profile and mode == "wint4" and B in (1, 64):
                    profile_step(dec, args.out, f"{mode}_b{B}")
            except Exception:
                RESULTS["errors"].append(f"decode {mode} b{B}: {traceback.format_exc()[-1500:]}")
                log(f"decode {mode} b{B} FAILED: {traceback.format_exc()[-600:]}")
            save(args.out)
        for T in [int(t) for t in args.prefill.split(",") if t]:
            try:
                t, parts = prefill_bench(model, kc, vc, T, tune=args.tune and mode == "bf16")
                RESULTS["prefill"][f"{mode}/{T}"] = {"ms": t, "tokens": T, "parts_ms": parts}
                log(f"prefill {mode} {T} tokens: {t:.2f} ms  | " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
            except Exception:
                RESULTS["errors"].append(f"prefill {mode} {T}: {traceback.format_exc()[-1500:]}")
                log(f"prefill {mode} {T} FAILED: {traceback.format_exc()[-600:]}")
            save(args.out)
        del model
        torch.cuda.empty_cache()
        RESULTS["tuned"] = {str(k): v for k, v in KW.TUNED.items()}
        RESULTS["torch_lin"] = [str(k) for k in TORCH_LIN]
        save(args.out)

    # summary table
    log("")
    log("| card | mode | batch | ms/step | tok/s | floor (GPU.md) | ratio | target | met | transformers ms |"
        " old dense tile ms | own byte floor ms | kernels/step |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in RESULTS["decode"].items():
        mode, b = key.split("/")
        B = int(b[1:])
        fl = FLOORS.get((mode, B))
        tg = TARGETS.get((mode, B))
        ratio = f"{r['ms'] / fl:.2f}x" if fl else f"({r['ms'] / r['floor_ms_own_bytes']:.2f}x own)"
        met = "" if tg is None else ("yes" if r["ms"] <= tg else "NO")
        nodes = (r.get("launches") or {}).get("graph_nodes") or {}
        old_n = ((r.get("launches_no_gemv") or {}).get("graph_nodes") or {}).get("kernel")
        kern = f"{nodes.get('kernel', '-')}" + (f" (old {old_n})" if old_n else "")
        old_ms = f"{r['ms_no_gemv']:.3f}" if "ms_no_gemv" in r else "-"
        log(f"| {props.name} | {mode} | {B} | {r['ms']:.3f} | {r['tok_s']:.0f} | {fl if fl else '-'} | {ratio} | "
            f"{tg if tg else '-'} | {met} | {HF_BASELINE.get(B, '-')} | {old_ms} | {r['floor_ms_own_bytes']:.2f} | "
            f"{kern} |")
    if RESULTS["prefill"]:
        log("")
        log("| card | prefill | tokens | ms | tok/s | compute floor ms (bf16 TFLOP/s of this run) | ratio | / bf16 |")
        log("|---|---|---|---|---|---|---|---|")
        for key, r in RESULTS["prefill"].items():
            mode, T = key.split("/")
            T = int(T)
            floor = prefill_flops(T) / (tf * 1e9) if tf else float("nan")
            bf = RESULTS["prefill"].get(f"bf16/{T}")
            vs_bf = f"{r['ms'] / bf['ms']:.2f}x" if bf else "-"
            log(f"| {props.name} | {mode} | {T} | {r['ms']:.2f} | {T / r['ms'] * 1000:.0f} | {floor:.2f} | "
                f"{r['ms'] / floor:.2f}x | {vs_bf} |")
    if RESULTS["errors"]:
        log(f"{len(RESULTS['errors'])} errors (see bench.json); first: {RESULTS['errors'][0][:300]}")
    save(args.out)


def profile_step(dec, out_dir, tag):
    from torch.profiler import ProfilerActivity, profile

    g = torch.cuda.CUDAGraph()
    dec.step()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        dec.step()
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
    agg: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            a = agg.setdefault(ev.name[:60], [0, 0.0])
            a[0] += 1
            a[1] += getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0) or 0
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])
    RESULTS.setdefault("profile", {})[tag] = [(k, v[0] / 5, v[1] / 5 / 1000) for k, v in rows[:25]]
    log(f"   profile {tag}: " + "; ".join(f"{k} x{v[0] // 5} {v[1] / 5 / 1000:.3f}ms" for k, v in rows[:12]))
    del g


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
