"""The CPU forward of a prompt's last chunk over a cached prefix, kernel against torch's SDPA.

    PYTHONPATH=. python bench/cpu_prefix_attention.py [--cached 1856] [--new 192] [--threads 1]

The built-in model (fp32, the CPU op table of native/cpu/ops.py), one sequence: its first
``--cached`` tokens computed into the KV cache, then ``--new`` tokens computed over them (what a
prefix-cache hit leaves), timed with that chunk on native/cpu's attention kernel and on torch's
SDPA (``KERNEL_MAX_PAIRS`` set either side of it), beside the same ``--new`` tokens computed
alone (a fresh prompt). Medians of ``--reps`` forwards, ms.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from native.cpu import ops as cpu_ops
from native.kv_cache import KVCache
from native.model.loader import load_model
from native.runner import ModelRunner
from pdbus.config import default_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cached", type=int, default=1856)
    ap.add_argument("--new", type=int, default=192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(default_model_dir(), dtype="float32", device="cpu")
    cfg, bs = model.eval().cfg, 64
    total = args.cached + args.new
    cache = KVCache(cfg.num_hidden_layers, -(-total // bs) + 1, cfg.num_key_value_heads, bs, cfg.head_dim, model.dtype)
    runner = ModelRunner(model, cache, "cpu")
    rng = random.Random(0)
    tokens = [rng.randrange(3, 1000) for _ in range(total)]
    table = list(range(-(-total // bs)))

    def forward_ms(start: int, n: int) -> float:
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            runner.execute([tokens[start : start + n]], [start], [table], [0])
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1e3, 2)

    runner.execute([tokens[: args.cached]], [0], [table], [0])  # the cached prefix's KV
    out = {"cached": args.cached, "new": args.new, "threads": args.threads}
    pairs = args.new * total
    for name, limit in (("kernel", pairs), ("sdpa", pairs - 1)):
        before, cpu_ops.KERNEL_MAX_PAIRS = cpu_ops.KERNEL_MAX_PAIRS, limit
        try:
            out[f"over_cache_{name}_ms"] = forward_ms(args.cached, args.new)
        finally:
            cpu_ops.KERNEL_MAX_PAIRS = before
    out["fresh_ms"] = forward_ms(0, args.new)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
