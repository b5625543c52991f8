"""Asynchronous scheduling (actors/engine/overlap.py) on the CPU with the real tiny model: a
decode step launched before the last one's tokens are read back gives the same tokens, finish
reasons and freed blocks as stepping one at a time — greedy and seeded draws, stop ids, EOS,
``max_tokens``, requests arriving mid-decode, aborts while a step is in flight — and rows that
need their history (penalties, logprobs) fall back to stepping in turn.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_engine import BLOCK_SIZE, Collector, make_engine

from actors.engine.overlap import PENDING
from native.kv_cache import KVCache
from native.runner import ModelRunner
from pdbus.messages import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def _prompts(model, n: int, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, model.cfg.vocab_size) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def _run(model, requests, *, async_scheduling: bool, late: int = 0, **kw) -> tuple[Collector, object]:
    """Run ``requests`` ([(prompt, sampling)]); the last ``late`` are added once the others have
    tokens (they join a running decode). Checks that every block is free at the end."""
    engine, events = make_engine(model, async_scheduling=async_scheduling, **kw)
    ids = [f"r{i}" for i in range(len(requests))]
    first = len(requests) - late
    for req_id, (prompt, sampling) in zip(ids[:first], requests[:first]):
        engine.add_request(req_id, prompt, sampling)
    engine.start()
    try:
        if late:
            events.wait(lambda: all(len(events.tokens.get(r, [])) >= 3 for r in ids[:first]), "early tokens")
            for req_id, (prompt, sampling) in zip(ids[first:], requests[first:]):
                engine.add_request(req_id, prompt, sampling)
        events.wait_done(ids)
    finally:
        engine.stop()
    assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    assert not engine.seqs and not engine.scheduler.has_work() and engine._inflight is None
    return events, engine


def _sampling(i: int, stop: list[int]) -> SamplingParams:
    kinds = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=11 + i, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=stop),
        SamplingParams(max_tokens=7, temperature=1.0, top_k=5, seed=5, min_tokens=3, ignore_eos=True),
    ]
    return kinds[i % len(kinds)]


def _stop_ids(model, prompts) -> list[int]:
    """Tokens that greedy decoding of these prompts produces, so that stop ids actually stop."""
    events, _ = _run(model, [(p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)) for p in prompts],
                     async_scheduling=False)  # fmt: skip
    return sorted({toks[3] for toks in events.tokens.values()})


def test_running_ahead_gives_the_tokens_of_stepping_in_turn(model):
    prompts = _prompts(model, 10)
    stop = _stop_ids(model, prompts)
    requests = [(p, _sampling(i, stop)) for i, p in enumerate(prompts)]
    ref, ref_engine = _run(model, requests, async_scheduling=False)
    got, engine = _run(model, requests, async_scheduling=True)
    assert got.tokens == ref.tokens and got.finish == ref.finish
    assert "stop" in got.finish.values() and "length" in got.finish.values()
    assert PENDING not in {t for toks in got.tokens.values() for t in toks}
    assert ref_engine.steps_ahead == 0 and engine.steps_ahead > 0.5 * engine.steps, (engine.steps_ahead, engine.steps)


def test_requests_joining_a_decode_that_runs_ahead(model):
    prompts = _prompts(model, 8, seed=5)
    requests = [(p, _sampling(i, [])) for i, p in enumerate(prompts)]
    ref, _ = _run(model, requests, async_scheduling=False, late=3)
    got, engine = _run(model, requests, async_scheduling=True, late=3)
    assert got.tokens == ref.tokens and got.finish == ref.finish
    assert engine.steps_ahead > 0


def test_eos_mid_flight_and_a_small_cache(model):
    """A row stopped by EOS while the next step holds it: its extra row is dropped and its blocks
    come back only after that step; a cache with few spare blocks makes steps fall back (no room
    for a block per row) and preempt, never meeting a placeholder."""
    prompts = _prompts(model, 6, seed=9)
    eos = set(_stop_ids(model, prompts))
    requests = [(p, SamplingParams(max_tokens=24, temperature=0.0)) for p in prompts]
    kw = dict(eos=eos, num_blocks=14, max_model_len=64)
    ref, _ = _run(model, requests, async_scheduling=False, **kw)
    got, engine = _run(model, requests, async_scheduling=True, **kw)
    assert got.tokens == ref.tokens and got.finish == ref.finish
    assert "stop" in got.finish.values()


def test_rows_that_need_their_history_step_in_turn(model):
    prompts = _prompts(model, 4, seed=2)
    requests = [(p, SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.5, ignore_eos=True)) for p in prompts]
    requests += [(prompts[0], SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True))]
    ref, _ = _run(model, requests, async_scheduling=False)
    got, engine = _run(model, requests, async_scheduling=True)
    assert got.tokens == ref.tokens and got.logprobs == ref.logprobs
    assert engine.steps_ahead == 0


def test_abort_while_a_step_is_in_flight(model):
    prompts = _prompts(model, 4, seed=4)
    sampling = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine, events = make_engine(model, async_scheduling=True)
    aborted = []

    def abort_r1(items):  # on the engine thread, between reading a step back and the next launch
        if not aborted and len(events.tokens.get("r1", [])) >= 2:
            aborted.append(True)
            engine._abort("r1", "client gone")

    events.hook = abort_r1
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, sampling)
    engine.start()
    try:
        events.wait_done(["r0", "r2", "r3"])
    finally:
        engine.stop()
    ref, _ = _run(model, [(p, sampling) for p in prompts], async_scheduling=False)
    assert aborted and len(events.tokens["r1"]) < 40 and "r1" not in events.finish
    for r in ("r0", "r2", "r3"):
        assert events.tokens[r] == ref.tokens[r]
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.seqs


def test_a_runner_without_device_tokens_never_runs_ahead(model):
    class HostOnly(ModelRunner):
        supports_device_tokens = False

    engine, _ = make_engine(model, async_scheduling=True, runner=HostOnly(model, _cache(model), "cpu"))
    assert engine.async_scheduling is False


def _cache(model):
    cfg = model.cfg
    return KVCache(cfg.num_hidden_layers, 64, cfg.num_key_value_heads, BLOCK_SIZE, cfg.head_dim, model.dtype)


# --------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gpu_graph_steps_run_ahead_with_the_tokens_of_stepping_in_turn(tmp_path):
    """The decode CUDA graphs with the staged inputs and rows read on the device: the engine on
    the GPU gives the same tokens running ahead as stepping in turn."""
    from test_gpu_model import BLOCK, load, save_gpu_model

    from native.graphs import DecodeGraphs

    model = load(save_gpu_model("moe_shared_hd64", str(tmp_path), seed=7))
    cfg = model.cfg

    def runner() -> ModelRunner:
        cache = KVCache(cfg.num_hidden_layers, 256, cfg.num_key_value_heads, BLOCK, cfg.head_dim, torch.bfloat16, device="cuda")
        return ModelRunner(model, cache, "cuda", graphs=DecodeGraphs(model, cache, max_batch=16, max_model_len=512))

    prompts = _prompts(model, 12, seed=8)
    stop = sorted({p[-1] for p in prompts})[:3]
    requests = [(p, _sampling(i, stop)) for i, p in enumerate(prompts)]
    ref, _ = _run(model, requests, async_scheduling=False, late=4, runner=runner(), max_model_len=512)
    ahead = runner()
    got, engine = _run(model, requests, async_scheduling=True, late=4, runner=ahead, max_model_len=512)
    assert got.tokens == ref.tokens and got.finish == ref.finish
    assert engine.steps_ahead > 0 and ahead.graphs.replays > 0
