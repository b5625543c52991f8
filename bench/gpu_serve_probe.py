"""The device-side work of bench/gpu_serve.py, each part in a process of its own (so that the
orchestrator never holds GPU memory while the servers run):

    python bench/gpu_serve_probe.py build --out DIR --layers 28 [--tiny] [--device cuda]
    python bench/gpu_serve_probe.py probe --model DIR --mode wint4 --steps 16x1152,64x1152 \
        [--hbm] [--hf 1x1024,16x1024] --json OUT.json

``build``: a random ERNIE-4.5-21B-A3B-shaped checkpoint (``--tiny``: a small MoE of the same
structure) made with transformers on ``--device`` in bf16 and written with ``save_pretrained``;
reused when ``DIR`` already holds one of the same config (``gpu_serve_checkpoint.json``).

``probe``, on the checkpoint as the servers load it (``native.model.loader.load_model``):
* ``--hbm``: HBM read bandwidth, a ``sum`` over 4 GiB of bf16 (``gpu_bench.time_eager``, medians);
* ``--steps BxCTX,...``: the model step alone — ``ModelRunner.execute`` of B decode rows at context
  CTX, replaying the decode CUDA graphs the server captures (same block size, max model length and
  batch buckets), plus the greedy token read back to the host: median wall ms of 20 steps after 3.
  With each, the step's byte floor: weight bytes read (routed experts scaled by the expected share
  of distinct experts B random top-k rows touch, ``E·(1-(1-k/E)^B)``, as gpu_bench.py counts them;
  the tied embedding once, as the lm_head) plus K/V bytes at CTX, over the measured bandwidth;
* ``--prefills NEWxCACHED,...``: one prompt's chunk of NEW tokens over CACHED cached ones (what a
  prefill instance runs), eager and, up to ``--prefill-graph-tokens``, replayed from the
  prompt-chunk graphs: wall ms with the first token read back, the kernels launched and their
  summed device time;
* ``--hf BxLEN,...``: transformers ``generate`` (greedy, ``--hf-tokens`` new tokens) at batch B
  over LEN-token prompts, on a model of the checkpoint's config built on the device with random
  weights (``from_pretrained`` onto a GPU needs accelerate); decode ms per step from a streamer.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

# ERNIE-4.5-21B-A3B (shared/ERNIE.md, bench/parallel_bench.py CFG): the layer count is the knob
FULL = dict(
    hidden_size=2560, intermediate_size=12288, num_attention_heads=20, num_key_value_heads=4, head_dim=128,
    vocab_size=103424, moe_num_experts=64, moe_k=6, moe_intermediate_size=1536, moe_num_shared_experts=2,
    moe_layer_start_index=1, moe_layer_interval=1, tie_word_embeddings=True, max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)  # fmt: skip
# the same structure (dense layer 0, MoE after, shared expert, GQA), CPU-sized
TINY = dict(
    FULL, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    vocab_size=512, moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
    max_position_embeddings=8192,
)  # fmt: skip
STAMP = "gpu_serve_checkpoint.json"
HBM_BYTES = 4 << 30


def log(*a) -> None:
    print(f"[probe {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the checkpoint


def checkpoint_config(layers: int, tiny: bool) -> dict:
    return dict(TINY if tiny else FULL, num_hidden_layers=layers, moe_layer_end_index=layers - 1)


def build_checkpoint(out: Path, layers: int, tiny: bool, device: str, seed: int = 0) -> Path:
    """``out`` holding the checkpoint; built (bf16, on ``device``) unless already there."""
    want = {"config": checkpoint_config(layers, tiny), "dtype": "bfloat16", "seed": seed}
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        log(f"reusing {out}")
        return out
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    t0 = time.monotonic()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 where it lives: never fp32 first
    with torch.device(device):
        model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**want["config"])).eval()
    torch.set_default_dtype(torch.float32)
    t1 = time.monotonic()
    model.save_pretrained(str(partial))
    (partial / STAMP).write_text(json.dumps(want))
    partial.rename(out)  # an interrupted build is never taken for a finished one
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
    log(f"built {out} ({size:.1f} GB): init {t1 - t0:.1f}s, save {time.monotonic() - t1:.1f}s")
    return out


# --------------------------------------------------------------------------- ceilings and floors


def hbm_read_gbps() -> float:
    """GB/s of a ``sum`` over 4 GiB of random bf16 (median of 10, CUDA events)."""
    from gpu_bench import time_eager

    a = torch.empty(HBM_BYTES // 2, device="cuda", dtype=torch.bfloat16).normal_()
    return HBM_BYTES / time_eager(a.sum, iters=10) / 1e6


def weight_bytes(model, batch: int) -> float:
    """Bytes of weights a decode step of ``batch`` rows reads: every linear, norm and router, the
    tied embedding once (as the lm_head), and of the routed experts the expected share touched."""
    from native.model.layers import ExpertsBase

    cfg = model.cfg
    touched = 1 - (1 - cfg.moe_k / cfg.moe_num_experts) ** batch
    expert_tensors = {
        id(t) for m in model.modules() if isinstance(m, ExpertsBase) for t in (*m.parameters(), *m.buffers())
    }
    embed = model.model.embed_tokens.weight
    total = 0.0
    for t in (*model.parameters(), *model.buffers()):
        nbytes = t.numel() * t.element_size()
        if t is embed and model.lm_head is not None:
            continue  # untied: the lookup reads B rows, the lm_head is counted on its own
        total += nbytes * touched if id(t) in expert_tensors else nbytes
    return total


def kv_bytes(model, batch: int, ctx: int, dtype: torch.dtype) -> int:
    from native.kv_cache import bytes_per_token

    cfg = model.cfg
    return batch * ctx * bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype)


# --------------------------------------------------------------------------- the model step alone


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``16x1152,64x1152`` -> [(16, 1152), (64, 1152)]."""
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        a, _, b = part.partition("x")
        out.append((int(a), int(b)))
    return out


def time_steps(runner, batch: int, ctx: int, block: int, device: torch.device, iters: int = 20) -> float:
    """Median wall ms of ``runner.execute`` of ``batch`` decode rows at context ``ctx`` (the token
    at position ctx-1), greedy token ids read back to the host (3 steps of warm-up first)."""
    per_seq = -(-ctx // block)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
    rows = list(range(batch))
    ts = []
    for it in range(iters + 3):
        sync(device)
        t0 = time.perf_counter()
        logits = runner.execute([[5 + i] for i in rows], [ctx - 1] * batch, tables, rows)
        logits.argmax(-1).tolist()
        if it >= 3:
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def count_kernels(model, cache, device: torch.device, batch: int, ctx: int, block: int) -> int | None:
    """GPU kernels one eager decode step of ``batch`` rows launches (what its CUDA graph replays),
    logits included; copies and memsets not counted. None without CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    from native.runner import ModelRunner

    eager = ModelRunner(model, cache, device)
    per_seq = -(-ctx // block)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
    rows = list(range(batch))
    eager.execute([[5 + i] for i in rows], [ctx - 1] * batch, tables, rows)  # warm-up: compiled kernels
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eager.execute([[5 + i] for i in rows], [ctx - 1] * batch, tables, rows)
        sync(device)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for n in names if not n.startswith(("Memcpy", "Memset")))


def time_prefill(runner, new: int, cached: int, block: int, device: torch.device, iters: int = 10) -> dict:
    """One prompt's chunk of ``new`` tokens over ``cached`` tokens already in the cache (eager, or a
    replayed graph when the runner has prompt-chunk graphs): median wall ms of ``runner.execute`` with the first token read back, and, from
    one profiled run, the kernels it launched and the sum of their device times (wall far above
    that sum: the step is bound by launches and host work, not by the GPU)."""
    from torch.profiler import ProfilerActivity, profile

    table = list(range(1, 1 + -(-(cached + new) // block)))
    tokens = [5 + (i % 997) for i in range(new)]

    def run():
        runner.execute([tokens], [cached], [table], [0]).argmax(-1).tolist()

    ts = []
    for it in range(iters + 2):
        sync(device)
        t0 = time.perf_counter()
        run()
        if it >= 2:
            ts.append((time.perf_counter() - t0) * 1e3)
    out = {"wall_ms": statistics.median(ts)}
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["kernels"] = sum(1 for e in kernels if not e.name.startswith(("Memcpy", "Memset")))
        out["device_ms"] = sum(e.device_time for e in kernels) / 1e3
    return out


def probe_steps(args, points: list[tuple[int, int]], bandwidth: float | None) -> dict:
    from native.kv_cache import KVCache
    from native.model.loader import load_model, resolve_dtype
    from native.runner import ModelRunner

    device = torch.device(args.device)
    t0 = time.monotonic()
    model, cfg = load_model(args.model, dtype=args.dtype, quantization=args.mode, device=device)
    model.eval()
    dtype = resolve_dtype(args.dtype, cfg)
    log(f"loaded {args.model} ({args.mode}) in {time.monotonic() - t0:.1f}s")
    prefills = parse_pairs(args.prefills)
    blocks = max([b * -(-ctx // args.block_size) for b, ctx in points]
                 + [-(-(n + c) // args.block_size) for n, c in prefills]) + 1  # fmt: skip
    cache = KVCache(cfg.num_hidden_layers, blocks, cfg.num_key_value_heads, args.block_size, cfg.head_dim, dtype, device=device)
    cache.buffer.normal_()  # never time attention over zeros
    graphs = prefill_graphs = None
    if device.type == "cuda":
        from native.graphs import DecodeGraphs, PrefillGraphs

        pool = torch.cuda.graph_pool_handle()
        if prefills and args.prefill_graph_tokens:
            prefill_graphs = PrefillGraphs(model, cache, max_rows=args.max_num_seqs, max_model_len=args.max_model_len,
                                           max_tokens=args.prefill_graph_tokens, pool=pool)  # fmt: skip
            log(f"prompt-chunk graphs for {prefill_graphs.buckets} tokens" if prefill_graphs.enabled else "prompt-chunk graphs disabled")
        graphs = DecodeGraphs(model, cache, max_batch=args.max_num_seqs, max_model_len=args.max_model_len, pool=pool)
        log(f"decode graphs for batch sizes {graphs.buckets}" if graphs.enabled else "decode graphs disabled")
    runner = ModelRunner(model, cache, device, graphs=graphs, prefill_graphs=prefill_graphs)
    out = {}
    with torch.inference_mode():
        for batch, ctx in points:
            ms = time_steps(runner, batch, ctx, args.block_size, device)
            wbytes, kbytes = weight_bytes(model, batch), kv_bytes(model, batch, ctx, dtype)
            floor = (wbytes + kbytes) / (bandwidth * 1e6) if bandwidth else None
            kernels = count_kernels(model, cache, device, batch, ctx, args.block_size)
            out[f"{batch}x{ctx}"] = {
                "step_ms": ms, "weight_bytes": wbytes, "kv_bytes": kbytes, "floor_ms": floor,
                "graphs": bool(graphs and graphs.enabled and batch <= graphs.max_bucket), "kernels": kernels,
            }  # fmt: skip
            log(f"step b{batch} ctx{ctx}: {ms:.3f} ms" + (f", byte floor {floor:.3f} ms" if floor else "")
                + (f", {kernels} kernels" if kernels is not None else ""))  # fmt: skip
        for new, cached in prefills:
            for how in ("eager", "graph"):
                if how == "graph" and not (prefill_graphs and prefill_graphs.fits(new, 1, 1, False)):
                    continue
                runner.prefill_graphs = prefill_graphs if how == "graph" else None
                r = out[f"prefill {new}+{cached} {how}"] = time_prefill(runner, new, cached, args.block_size, device)
                log(f"prefill {new} new over {cached} cached, {how}: {r['wall_ms']:.2f} ms wall"
                    + (f", {r['kernels']} kernels, {r['device_ms']:.2f} ms on the device" if "kernels" in r else ""))  # fmt: skip
            runner.prefill_graphs = prefill_graphs
    cache.close()
    del runner, graphs, cache, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- transformers


def hf_generate(args, points: list[tuple[int, int]]) -> dict:
    """transformers ``generate`` at each (batch, prompt length), on a model of the checkpoint's
    config built on the device (random weights, the serving dtype)."""
    from transformers import AutoConfig, Ernie4_5_MoeForCausalLM

    from native.model.config import ErnieConfig
    from native.model.loader import resolve_dtype

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, ErnieConfig.from_model_dir(args.model))
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Ernie4_5_MoeForCausalLM(AutoConfig.from_pretrained(args.model)).eval()
    torch.set_default_dtype(torch.float32)
    out = {}
    gen = torch.Generator().manual_seed(0)
    for batch, length in points:
        ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen).to(device)
        step_ms = hf_step_ms(model, ids, args.hf_tokens)
        out[f"{batch}x{length}"] = {"step_ms": step_ms, "tok_s": batch / step_ms * 1e3, "tokens": args.hf_tokens}
        log(f"transformers b{batch} prompt {length}: {step_ms:.2f} ms/step")
    return out


def hf_step_ms(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Median ms of a decode step of greedy ``generate`` (after a 2-token warm-up), timed by a
    streamer's ``put`` (called once with the prompt, then once per new token)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            sync(ids.device)
            self.times.append(time.perf_counter())

        def end(self):
            self.times.append(time.perf_counter())

    clock = Clock()
    for n, streamer in ((2, None), (new_tokens, clock)):
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, streamer=streamer)  # fmt: skip
    steps = [b - a for a, b in zip(clock.times[1:-1], clock.times[2:-1])]
    return statistics.median(steps) * 1e3


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--layers", type=int, required=True)
    b.add_argument("--tiny", action="store_true")
    b.add_argument("--device", default="cuda")
    q = sub.add_parser("probe")
    q.add_argument("--model", required=True)
    q.add_argument("--mode", default="bf16")
    q.add_argument("--dtype", default="auto")
    q.add_argument("--device", default="cuda")
    q.add_argument("--block-size", type=int, default=64)
    q.add_argument("--max-model-len", type=int, default=8192)
    q.add_argument("--max-num-seqs", type=int, default=64)
    q.add_argument("--steps", default="", help="BxCTX,... decode steps to time")
    q.add_argument("--prefills", default="", help="NEWxCACHED,... one prompt's chunks to time, eager and replayed")
    q.add_argument("--prefill-graph-tokens", type=int, default=1024, help="largest prompt-chunk graph (0: eager only)")
    q.add_argument("--hbm", action="store_true", help="measure HBM read bandwidth (CUDA)")
    q.add_argument("--hf", default="", help="BxLEN,... transformers generate points")
    q.add_argument("--hf-tokens", type=int, default=16)
    q.add_argument("--json", required=True, type=Path)
    args = p.parse_args(argv)
    if args.cmd == "build":
        print(build_checkpoint(args.out, args.layers, args.tiny, args.device))
        return
    torch.set_num_threads(int(os.environ.get("PDBUS_TORCH_THREADS", "4")))
    res: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    if args.hbm:
        res["hbm_gbps"] = hbm_read_gbps()
        torch.cuda.empty_cache()
        log(f"HBM read {res['hbm_gbps']:.0f} GB/s")
    if args.steps or args.prefills:
        res["steps"] = probe_steps(args, parse_pairs(args.steps), res.get("hbm_gbps"))
    if args.hf:
        res["hf"] = hf_generate(args, parse_pairs(args.hf))
    args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
