"""Decode steps with expert parallelism on the GPU kernel path: CUDA graphs vs eager, EP vs none.

ERNIE-4.5-21B-A3B layer shapes (hidden 2560, 20/4 heads, 64 experts top-6 + 2 shared, vocab
103424), random weights, ``--layers`` layers (dense layer 0, MoE after), wint4 by default. Each
rank process times whole decode steps through ModelRunner — host-side inputs, the forward, the
logits — at batch 1 / 16 / 64 with a 1K context, every EP step planned with the other ranks
(``EPCoordinator.plan``, one gloo all-reduce) as the engine does:

* ``none``: no EP, the model whole on the GPU;
* ``ep``: EP over ``--ranks`` ranks (one GPU each, NCCL): pad to the agreed bucket, all-gather,
  this rank's experts, reduce-scatter. With ``--ranks 1`` (one GPU) the group has one rank, so the
  figure is the dispatch path's own overhead over ``none``;

each with the decode CUDA graphs (the collectives captured in them) and eager.

    python3 bench/parallel_bench.py [--ranks 1] [--layers 4] [--quant wint4] [--batches 1,16,64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time

import torch
import torch.multiprocessing as mp

CFG = dict(
    model_type="ernie4_5_moe", vocab_size=103424, hidden_size=2560, intermediate_size=12288,
    num_attention_heads=20, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    torch_dtype="bfloat16", moe_num_experts=64, moe_k=6, moe_intermediate_size=1536, moe_num_shared_experts=2,
    moe_layer_start_index=1, moe_layer_interval=1, moe_norm_min=1e-12,
)
BLOCK, CTX = 16, 1024


def _build(layers: int, quant: str, device: torch.device, parallel=None):
    from native.model.config import ErnieConfig
    from native.model.ernie import ErnieForCausalLM
    from native.model.quant import quantize_model

    cfg = ErnieConfig.from_dict(dict(CFG, num_hidden_layers=layers, moe_layer_end_index=layers - 1))
    torch.manual_seed(0)
    with torch.device(device):
        model = ErnieForCausalLM(cfg, dtype=torch.bfloat16, parallel=parallel)
    return quantize_model(model, quant).eval(), cfg


def _time_steps(runner, ep, batch: int, iters: int) -> float:
    """Median ms of one decode step of ``batch`` rows at context CTX."""
    per = CTX // BLOCK + 1
    tables = [list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(batch)]
    ts = []
    for it in range(iters + 3):
        if ep is not None:
            ep.plan(batch, decode_only=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.execute([[5 + i] for i in range(batch)], [CTX] * batch, tables, list(range(batch)))
        torch.cuda.synchronize()
        if it >= 3:
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _rank(rank: int, args, port: int, out: str) -> None:
    from native.graphs import DecodeGraphs
    from native.kv_cache import KVCache
    from native.parallel.ep import EPCoordinator
    from native.runner import ModelRunner

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    batches = [int(b) for b in args.batches.split(",")]
    rows = {}
    for mode in ("none", "ep"):
        if mode == "none" and rank:
            continue  # one rank is enough for the model without EP
        ep = None
        if mode == "ep":
            ep = EPCoordinator(rank, args.ranks, f"127.0.0.1:{port}", device)
        model, cfg = _build(args.layers, args.quant, device, ep.context() if ep is not None else None)
        if ep is not None:
            ep.attach(model)
        blocks = max(batches) * (CTX // BLOCK + 1) + 1
        cache = KVCache(cfg.num_hidden_layers, blocks, cfg.num_key_value_heads, BLOCK, cfg.head_dim, torch.bfloat16, device=device)
        graphs = DecodeGraphs(model, cache, max_batch=max(batches), max_model_len=CTX + 64)
        for kind, g in (("graph", graphs), ("eager", None)):
            if ep is not None:
                ep.kv_cache, ep.graphs = cache, g
            runner = ModelRunner(model, cache, device, graphs=g)
            with torch.inference_mode():
                for b in batches:
                    rows[f"{mode} {kind} b{b}"] = _time_steps(runner, ep, b, args.iters)
        del model, cache, graphs, runner
        torch.cuda.empty_cache()
    torch.save(rows, f"{out}.{rank}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quant", default="wint4")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args()
    if torch.cuda.device_count() < args.ranks:
        raise SystemExit(f"--ranks {args.ranks} needs {args.ranks} GPUs, {torch.cuda.device_count()} here")
    from pdbus.procs import free_port

    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, "parallel_rank")
    mp.spawn(_rank, args=(args, free_port(), tmp), nprocs=args.ranks, join=True)
    per_rank = [torch.load(f"{tmp}.{r}") for r in range(args.ranks)]
    card = torch.cuda.get_device_name(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {card}, {datetime.date.today()}, commit {commit or '?'}, {args.layers} layers, {args.quant}, EP{args.ranks}, context {CTX}")
    print("| step | " + " | ".join(f"b{b}" for b in args.batches.split(",")) + " |")
    print("|---|" + "---|" * len(args.batches.split(",")))
    for mode in ("none", "ep"):
        for kind in ("graph", "eager"):
            key = f"{mode} {kind}"
            cells = [f"{per_rank[0][f'{key} b{b}']:.2f}" for b in args.batches.split(",")]
            label = "no EP" if mode == "none" else f"EP{args.ranks} (rank 0)"
            print(f"| {label}, {kind} (ms) | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "parallel_bench.json"), "w") as f:
        json.dump({"card": card, "commit": commit, "args": vars(args), "ranks": per_rank}, f, indent=1)


if __name__ == "__main__":
    main()
