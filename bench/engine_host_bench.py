"""Host work of one engine step: 64 decoding sequences of 8K context, a runner that computes nothing.

Times ``Engine.step()`` (schedule, build each row's tokens, positions and block tables, sample,
check finished) with a null runner that returns zero logits, so what is left is the engine's own
Python per step. Run from the repository root::

    PYTHONPATH=. python bench/engine_host_bench.py [--seqs 64] [--context 8192] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from actors.engine.engine import Engine, EngineEvents, EngineLimits, Reservation
from pdbus.messages import SamplingParams

try:
    from native.runner import Runner
except ImportError:  # before the runner protocol existed (to measure the old engine)
    Runner = object

VOCAB = 1024


class NullCache:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size


class NullRunner(Runner):
    """Takes a step's inputs like ModelRunner and returns zero logits for the sampled rows."""

    def __init__(self, cache: NullCache):
        self.kv_cache = cache

    def execute(self, token_chunks, start_positions, block_tables, sample_rows, layer_done=None):
        return torch.zeros((len(sample_rows), VOCAB))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=64)
    args = ap.parse_args()
    from native.sampler import Sampler

    torch.set_num_threads(1)

    max_len = args.context + args.steps + 8
    blocks_per_seq = -(-max_len // args.block_size)
    cache = NullCache(args.seqs * blocks_per_seq + 1, args.block_size)
    limits = EngineLimits(max_num_seqs=args.seqs, max_num_batched_tokens=args.seqs, max_model_len=max_len + 1)
    engine = Engine(NullRunner(cache), Sampler(seed=0), EngineEvents(), limits, {VOCAB + 1}, role="decode")
    sampling = SamplingParams(max_tokens=args.steps + 10, temperature=0.0, ignore_eos=True)
    for i in range(args.seqs):  # what a decode instance holds after 64 prefills of 8K tokens
        req = f"r{i}"
        engine._reserve(req, max_len, 3600.0, Reservation([(i * 7 + j) % VOCAB for j in range(args.context - 1)], sampling))
        engine._add_decode(req, 1)
    assert len(engine.scheduler.running) == args.seqs
    for _ in range(10):  # warm-up
        engine.step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    times.sort()
    print(
        f"engine step host work, {args.seqs} seqs x {args.context} context: "
        f"median {statistics.median(times) * 1e3:.3f} ms, p10 {times[len(times) // 10] * 1e3:.3f} ms, "
        f"p90 {times[len(times) * 9 // 10] * 1e3:.3f} ms over {args.steps} steps"
    )


if __name__ == "__main__":
    main()
