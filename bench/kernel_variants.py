"""Variants of the weight-only GEMMs, side by side on one GPU (ERNIE-4.5-21B-A3B shapes, one layer).

For each product of a step — the routed experts' up (gate+up, SwiGLU) and down projections, and
the dense linears (qkv, o, shared gate/up, shared down, layer 0's dense MLP) — at decode rows
(1, 16, 64) and prefill rows (2,048, 4,096) it times:

* ``base``  the tile as the model ran it before gemv.py (weight the right operand, converted in the K loop)
* ``swap``  the transposed tile (``SWAP``: the dequantized weight the left operand, wgmma from registers)
* ``gemv``  (dense, decode rows, int8 and int4 weights) the split-K kernel of native/kernels/gemv.py,
  its default config and a sweep of tiles x splits; the best per shape goes to ``gemv_configs.json``
* ``deq``   dequantize the weight once (``native.kernels.dequant``) and run the bf16 product
* ``bf16``  the same product on bf16 weights (the line to beat for prefill)

Each variant is checked against an fp32 torch reference of the same weights first (relative
error < 1e-2) and timed with CUDA events (medians). The dense decode rows rotate over enough
copies of the weight (>= 256 MB in all) that none is read from the L2 (50 MB), in a CUDA graph of
one call per copy, as the 28 layers of a step do. It also reports, from the Triton cache, which
MMA each compiled kernel uses (v3 = Hopper wgmma, v2 = mma.sync). Output: a table on stdout,
``$OUT/variants.json``, ``$OUT/gemv_configs.json``.

    python3 bench/kernel_variants.py [--rows 1,16,64,2048,4096] [--dense-bits 8,4] [--jobs 12]
"""

# ruff: noqa: B023 - every closure here is called (checked and timed) before its loop moves on
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

# gpu_bench: bench/ is sys.path[0] when this runs as a script
from gpu_bench import DENSE_I, E, make_experts, make_lin, time_eager, time_graph

from native import kernels as KN
from native.kernels.dequant import dequantize
from native.kernels.wlinear import default_config as tile_config
from native.kernels.wlinear import m_bucket

HID, NH, KVH, HD = 2560, 20, 4, 128
TOPK, MI, SHARED_I = 6, 1536, 3072

RESULTS: dict = {"rows": [], "errors": [], "mma": []}


def graph_ms(fn, reps=10, iters=20):
    """Median ms of one call, from a CUDA graph of ``reps`` calls (launch overhead as in a step)."""
    return time_graph(lambda: [fn() for _ in range(reps)], iters=iters, divide=reps)


def qweights(shape, bits):
    """gpu_bench's random weights: ``[N, K]`` (make_lin) or ``[E, N, K]`` (make_experts)."""
    return make_lin(*shape, bits) if len(shape) == 2 else make_experts(*shape[1:], bits)


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def record(kind, name, rows, variant, ms, err, nbytes, flops, cfg=None):
    r = {"kind": kind, "name": name, "rows": rows, "variant": variant, "ms": ms, "err": err,
         "GBps": nbytes / ms / 1e6 if ms else None, "TFLOPs": flops / ms / 1e9 if ms else None, "cfg": cfg}
    RESULTS["rows"].append(r)
    print(f"{kind:5s} {name:14s} M={rows:<5d} {variant:26s} {ms * 1000:9.1f} us  err {err:.1e}  "
          f"{r['GBps']:7.0f} GB/s  {r['TFLOPs']:6.1f} TF/s", flush=True)


def try_variant(kind, name, rows, variant, fn, ref, nbytes, flops, cfg=None, graph=True, ncopy=1):
    """Check ``fn`` against ``ref``, time it and record a row; ``ncopy``: fn makes that many calls
    (one per weight copy), and the time is per call."""
    try:
        y = fn()
        err = rel_err(y, ref)
        if not err < 1e-2:
            raise RuntimeError(f"wrong result: rel err {err:.3g}")
        if ncopy > 1:
            ms = time_graph(fn, iters=10, divide=ncopy)
        else:
            ms = graph_ms(fn) if graph else time_eager(fn)
        record(kind, name, rows, variant, ms, err, nbytes, flops, cfg)
        return ms
    except Exception as e:  # noqa: BLE001 - a variant that fails to compile is a row of the report
        RESULTS["errors"].append(f"{kind} {name} M{rows} {variant}: {e!r}"[:600])
        print(f"{kind:5s} {name:14s} M={rows:<5d} {variant:26s} FAILED {e!r}"[:300], flush=True)
        return None


SWAP_DECODE = [
    {"SWAP": 1, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"SWAP": 1, "BN": 64, "BK": 256, "num_warps": 4, "num_stages": 3},
    {"SWAP": 1, "BN": 128, "BK": 128, "num_warps": 4, "num_stages": 3},
]
SWAP_PREFILL = [
    {"SWAP": 1, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 4},
    {"SWAP": 1, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
    {"SWAP": 1, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 3},
    {"SWAP": 1, "BN": 256, "BK": 64, "num_warps": 8, "num_stages": 3},
]


DENSE = [("qkv", (NH + 2 * KVH) * HD, HID, None), ("o_proj", HID, NH * HD, None),
         ("shared_gu", 2 * SHARED_I, HID, "swiglu"), ("shared_down", HID, SHARED_I, None),
         ("l0_gu", 2 * DENSE_I, HID, "swiglu"), ("l0_down", HID, DENSE_I, None)]


def dense_cases(rows_list):
    for name, N, Kd, act in DENSE[:4]:
        wq, s = qweights((N, Kd), 8)
        wd = dequantize(wq, s)
        for M in rows_list:
            x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
            y = x.float() @ wd.float().T
            if act:
                g, u = y.chunk(2, dim=-1)
                y = F.silu(g) * u
            ref = y
            nb = wq.numel() + M * Kd * 2
            fl = 2 * M * N * Kd
            big = M >= 1024

            def torch_lin(w=wd, x=x, act=act):
                z = F.linear(x, w)
                if act:
                    g, u = z.chunk(2, dim=-1)
                    z = F.silu(g) * u
                return z

            try_variant("dense", name, M, "base", lambda: KN.wlinear(x, wq, s, 8, act=act), ref, nb, fl, graph=not big)
            for cfg in (SWAP_PREFILL if big else SWAP_DECODE):
                c = dict(cfg, BM=128 if big else 16)
                try_variant("dense", name, M, f"swap BN{c['BN']} BK{c['BK']} w{c['num_warps']}s{c['num_stages']}",
                            lambda c=c: KN.wlinear(x, wq, s, 8, act=act, config=c), ref, nb, fl, c, graph=not big)
            if big:
                try_variant("dense", name, M, "deq+cublas", lambda: torch_lin(dequantize(wq, s)), ref, nb, fl,
                            graph=False)
            try_variant("dense", name, M, "bf16 cublas", torch_lin, ref, wd.numel() * 2 + M * Kd * 2, fl, graph=not big)


def gemv_candidates(M, bits):
    """The sweep of gemv.py's configs at one row bucket: tiles x splits (int4 tiles twice as long
    in K, the same weight bytes per step, below 64 rows: there the activation tile fills the
    shared memory first)."""
    kx = 2 if bits == 4 and M < 64 else 1
    tiles = []
    if M == 1:
        tiles += [{"MODE": 0, "BN": bn, "BK": bk * kx, "num_warps": 4, "num_stages": 2}
                  for bn, bk in ((16, 256), (16, 512), (32, 256))]
        tiles += [{"MODE": 1, "BN": 32, "BK": 256 * kx, "num_warps": 4, "num_stages": 3}]
    else:
        tiles += [{"MODE": 1, "BN": bn, "BK": bk * kx, "num_warps": 4, "num_stages": 3}
                  for bn, bk in ((16, 256), (32, 256), (64, 128))]
        tiles += [{"MODE": 2, "BN": 64, "BK": 128 * kx, "num_warps": 4, "num_stages": 3}]
    splits = (1, 2, 4) if M >= 64 else (1, 2, 4, 8)
    return [dict(t, SPLIT=sp) for t in tiles for sp in splits]


def _compile_one(task):
    """(spawned worker) Run one config once so that Triton compiles it into the shared cache."""
    bits, N, Kd, M, act, cfg = task
    try:
        wq, s = make_lin(N, Kd, bits)
        KN.wlinear(torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16), wq, s, bits, act=act, config=cfg)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - reported, and the timing pass reports it again
        return f"{cfg}: {e!r}"[:300]


def precompile(tasks, jobs):
    """Compile the sweep's kernels in ``jobs`` processes (Triton compiles one kernel at a time in a
    process): one task per distinct specialization."""
    seen, todo = set(), []
    for bits, N, Kd, M, act, cfg in tasks:
        c = cfg or {}
        key = (bits, act, max(16, M) if c.get("MODE", 1) else 1, tuple(sorted((k, v) for k, v in c.items() if k != "SPLIT")),
               min(c.get("SPLIT", 1), 2), Kd % c.get("BK", 1) == 0)
        if key not in seen:
            seen.add(key)
            todo.append((bits, N, Kd, M, act, cfg))
    if jobs <= 1 or not todo:
        return
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(jobs) as pool:
        errs = [e for e in pool.map(_compile_one, todo, chunksize=1) if e]
    print(f"precompiled {len(todo)} kernels in {jobs} processes, {len(errs)} failed", flush=True)


def dense_decode_cases(rows_list, bits_list, jobs, out_dir):
    """Dense products at decode rows, every weight copy read from HBM: the tile of before
    (``base``), one transposed tile, gemv.py (default, then the sweep) and cuBLAS on bf16."""
    tasks = [(bits, N, Kd, M, act, cfg) for bits in bits_list for name, N, Kd, act in DENSE for M in rows_list
             for cfg in gemv_candidates(M, bits) if bits == 8 or not name.startswith("l0")]
    precompile(tasks, jobs)
    best_rows = []
    for name, N, Kd, act in DENSE:
        for bits in bits_list:
            if bits == 4 and name.startswith("l0"):  # no mode has int4 dense weights; the layer-0 shapes are int8's
                continue
            wq, s = qweights((N, Kd), bits)
            wbytes = wq.numel() * wq.element_size()
            ncopy = max(2, min(32, -(-(256 << 20) // wbytes)))
            ws = [qweights((N, Kd), bits) for _ in range(ncopy - 1)] + [(wq, s)]  # the checked copy last
            wd = dequantize(wq, s)
            wds = [dequantize(*w) for w in ws] if bits == 8 else None
            n_out = N // 2 if act else N
            for M in rows_list:
                x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
                y = x.float() @ wd.float().T
                if act:
                    g, u = y.chunk(2, dim=-1)
                    y = F.silu(g) * u
                nb = wbytes + M * Kd * 2 + M * n_out * 2
                fl = 2 * M * N * Kd
                out = torch.empty(M, n_out, device="cuda", dtype=torch.bfloat16)

                def run_all(cfg):
                    def fn():
                        for w, sc in ws:
                            KN.wlinear(x, w, sc, bits, act=act, out=out, config=cfg)
                        return out
                    return fn

                def timed(variant, cfg, ref=y, nbytes=nb):
                    fn = run_all(cfg)
                    return try_variant(f"int{bits}", name, M, variant, fn, ref, nbytes, fl, cfg, ncopy=len(ws))

                base = tile_config(M, n_out, Kd, bits, bool(act))
                timed("base", base)
                timed("swap BN64 BK256 w4s3", {"SWAP": 1, "BM": 16, "BN": 64, "BK": 256, "num_warps": 4,
                                               "num_stages": 3})
                timed("gemv default", None)
                best = None
                for cfg in gemv_candidates(M, bits):
                    tag = f"gemv m{cfg['MODE']} BN{cfg['BN']} BK{cfg['BK']} w{cfg['num_warps']}s{cfg['num_stages']} " \
                          f"split{cfg['SPLIT']}"
                    ms = timed(tag, cfg)
                    if ms is not None and (best is None or ms < best[0]):
                        best = (ms, cfg)
                if best:
                    best_rows.append({"key": [m_bucket(M), N, Kd, bits, bool(act)], "cfg": best[1],
                                      "us": best[0] * 1000, "GBps": nb / best[0] / 1e6, "name": name})
                    print(f"best int{bits} {name} M={M}: {best[0] * 1000:.1f} us {best[1]}", flush=True)
                    with open(os.path.join(out_dir, "gemv_configs.json"), "w") as f:  # as it goes: a cut run keeps it
                        json.dump(best_rows, f, indent=1)
                if wds is not None:
                    def cublas():
                        for w in wds:
                            z = F.linear(x, w)
                            if act:
                                g, u = z.chunk(2, dim=-1)
                                z = F.silu(g) * u
                        return z
                    try_variant(f"int{bits}", name, M, "bf16 cublas", cublas, y, wd.numel() * 2 + M * Kd * 2, fl,
                                ncopy=len(ws))
            ws = wds = None
            torch.cuda.empty_cache()
    RESULTS["gemv_best"] = best_rows


def moe_cases(rows_list, bits_list):
    gate = torch.randn(E, HID, device="cuda", dtype=torch.float32) * 0.05
    bias = torch.rand(E, device="cuda", dtype=torch.float32) * 0.01
    for bits in bits_list:
        w13, s13 = qweights((E, 2 * MI, HID), bits)
        w2, s2 = qweights((E, HID, MI), bits)
        w13d, w2d = dequantize(w13, s13), dequantize(w2, s2)
        for T in rows_list:
            x = torch.randn(T, HID, device="cuda", dtype=torch.bfloat16)
            tw, ids = KN.moe_route(x, gate, TOPK, bias)
            bm = KN.moe_block_m(T * TOPK, E)
            srt, eids, npad = KN.moe_align(ids, E, bm)
            h1 = torch.randn(T * TOPK, MI, device="cuda", dtype=torch.bfloat16)
            # fp32 reference per pair
            pairs_e = ids.view(-1).long()
            tok = torch.arange(T * TOPK, device="cuda") // TOPK
            touched = E * (1 - (1 - TOPK / E) ** T)
            big = T >= 1024
            for which in ("up", "down"):
                if which == "up":
                    ref = torch.empty(T * TOPK, MI, device="cuda")
                    for e in pairs_e.unique().tolist():
                        sel = (pairs_e == e).nonzero().view(-1)
                        z = x[tok[sel]].float() @ w13d[e].float().T
                        g, u = z.chunk(2, dim=-1)
                        ref[sel] = F.silu(g) * u
                    wq, sc, wd = w13, s13, w13d

                    def run(w, s, cfg):
                        return KN.moe_gemm(x, w, s, srt, eids, npad, TOPK, bm, swiglu=True, config=cfg)
                    N, Kd, a_rows = 2 * MI, HID, T
                else:
                    ref = torch.empty(T * TOPK, HID, device="cuda")
                    for e in pairs_e.unique().tolist():
                        sel = (pairs_e == e).nonzero().view(-1)
                        ref[sel] = (h1[sel].float() @ w2d[e].float().T) * tw.view(-1)[sel].float()[:, None]
                    wq, sc, wd = w2, s2, w2d

                    def run(w, s, cfg):
                        return KN.moe_gemm(h1, w, s, srt, eids, npad, TOPK, bm, swiglu=False,
                                           topk_weights=tw.view(-1), a_by_pair=True, config=cfg)
                    N, Kd, a_rows = HID, MI, T * TOPK
                nb = wq.numel() * wq.element_size() * touched / E + a_rows * Kd * 2
                fl = 2 * T * TOPK * N * Kd
                tag = f"moe{bits}"
                try_variant(tag, which, T, "base", lambda: run(wq, sc, None), ref, nb, fl, graph=not big)
                for cfg in (SWAP_PREFILL if big else SWAP_DECODE):
                    try_variant(tag, which, T, f"swap BN{cfg['BN']} BK{cfg['BK']} w{cfg['num_warps']}s{cfg['num_stages']}",
                                lambda c=cfg: run(wq, sc, c), ref, nb, fl, cfg, graph=not big)
                if big:
                    try_variant(tag, which, T, "deq+bf16 kernel", lambda: run(dequantize(wq, sc), None, None),
                                ref, nb, fl, graph=False)
                    try_variant(tag, which, T, "dequantize alone", lambda: dequantize(wq, sc), wd, nb, 0,
                                graph=False)
                try_variant(tag, which, T, "bf16 kernel", lambda: run(wd, None, None), ref,
                            wd.numel() * 2 * touched / E + a_rows * Kd * 2, fl, graph=not big)
        del w13, w2, w13d, w2d
        torch.cuda.empty_cache()


def mma_report(cache_dir):
    """Kernel name, constants and MMA version of every compiled kernel in the Triton cache."""
    for tt in sorted(glob.glob(os.path.join(cache_dir, "*", "*.ttgir"))):
        text = open(tt).read()
        ver = "v3" if "warp_group_dot" in text else ("v2" if "nvidia_mma" in text else "-")
        if ver == "-":
            continue
        name = os.path.basename(tt)[: -len(".ttgir")]
        consts = ""
        for js in glob.glob(os.path.join(os.path.dirname(tt), "*.json")):
            try:
                meta = json.load(open(js))
            except Exception:  # noqa: BLE001
                continue
            if isinstance(meta, dict) and "num_warps" in meta:
                c = meta.get("constants") or {}
                consts = f"warps {meta.get('num_warps')} stages {meta.get('num_stages')} " + " ".join(
                    f"{k}={v}" for k, v in (c.items() if isinstance(c, dict) else []) if k in
                    ("BITS", "SWAP", "BM", "BN", "BK", "SWIGLU", "CVT"))
        RESULTS["mma"].append((name, ver, consts))
        print(f"mma {ver} {name} {consts}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16,64,2048,4096")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--dense-bits", default="8,4", help="weight bits of the dense decode rows")
    ap.add_argument("--jobs", type=int, default=12, help="processes compiling the gemv sweep ahead")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = [int(r) for r in args.rows.split(",")]
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, torch {torch.__version__}", flush=True)
    n = 1 << 30
    buf = torch.empty(n // 2, device="cuda", dtype=torch.bfloat16).normal_()
    t = time_eager(buf.sum, iters=10)
    RESULTS["hbm_read_GBps"] = buf.numel() * 2 / t / 1e6
    print(f"HBM read {RESULTS['hbm_read_GBps']:.0f} GB/s", flush=True)
    del buf
    try:
        if not args.skip_moe:
            moe_cases(rows, [int(b) for b in args.bits.split(",")])
    except Exception:
        RESULTS["errors"].append(traceback.format_exc()[-1500:])
        traceback.print_exc()
    if not args.skip_dense:
        try:
            dense_decode_cases([r for r in rows if r <= 64], [int(b) for b in args.dense_bits.split(",")],
                               args.jobs, args.out)
        except Exception:
            RESULTS["errors"].append(traceback.format_exc()[-1500:])
            traceback.print_exc()
        try:
            dense_cases([r for r in rows if r > 64])
        except Exception:
            RESULTS["errors"].append(traceback.format_exc()[-1500:])
            traceback.print_exc()
    cache = os.environ.get("TRITON_CACHE_DIR")
    if cache:
        mma_report(cache)
    with open(os.path.join(args.out, "variants.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    print(f"{len(RESULTS['errors'])} errors", flush=True)
    for e in RESULTS["errors"][:8]:
        print("  ", e[:400])


if __name__ == "__main__":
    sys.exit(main())
