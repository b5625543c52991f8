"""Automatic prefix caching: the block manager's hash chain and cached-free LRU pool (pure
Python), and the engine with the real tiny model (CPU): outputs token-exact with the cache on
and off — greedy and seeded, a later request sharing a prefix, prompts sharing one at once, a
cache small enough to evict and preempt, asynchronous scheduling, a PD prefill whose prompt
starts with cached blocks — with fewer prompt tokens computed, and every block free after.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
from test_engine import BLOCK_SIZE, Collector, _layer_kv, greedy, make_engine

from actors.engine.block_manager import BlockManager, NoFreeBlocks, block_hash, root_hash
from actors.engine.prefix_cache import PrefixCache
from actors.engine.sequence import Sequence
from native.kv_cache import KVCache
from pdbus.messages import Destination, SamplingParams

# --------------------------------------------------------------------------- the block manager

BS = 4


def _chain(bm: BlockManager, tokens: list[int]) -> list[bytes]:
    out, parent = [], bm.root
    for i in range(0, len(tokens) - len(tokens) % BS, BS):
        parent = block_hash(parent, tokens[i : i + BS])
        out.append(parent)
    return out


def test_hash_chain_names_the_prefix_and_the_extra_key():
    a = BlockManager(8, BS, cache_key="model-a|bf16")
    tokens = list(range(3, 15))
    assert _chain(a, tokens) == _chain(a, tokens)
    other_tail = _chain(a, tokens[:8] + [99, 5, 6, 7])
    assert other_tail[:2] == _chain(a, tokens)[:2] and other_tail[2] != _chain(a, tokens)[2]
    # a block equal to another but after a different prefix hashes differently (a chain)
    assert _chain(a, [1, 2, 3, 4, 9, 9, 9, 9])[1] != _chain(a, [5, 6, 7, 8, 9, 9, 9, 9])[1]
    b = BlockManager(8, BS, cache_key="model-a|float32")
    assert not set(_chain(a, tokens)) & set(_chain(b, tokens))
    assert root_hash("k") == root_hash(b"k") and len(block_hash(root_hash("k"), [1, 2])) == 16


def test_hashes_are_stable_across_processes():
    code = "from actors.engine.block_manager import block_hash, root_hash; print(block_hash(root_hash('x'), [1, 2, 70000]).hex())"
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout.strip() == block_hash(root_hash("x"), [1, 2, 70000]).hex()


def _register(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Allocate a block per full block of ``tokens`` and register each under its hash."""
    hashes = _chain(bm, tokens)
    ids = bm.allocate(len(hashes))
    for b, h in zip(ids, hashes):
        assert bm.register(b, h)
    return ids


def test_a_freed_cached_block_is_free_reused_on_a_hit_and_evicted_only_when_needed():
    bm = BlockManager(6, BS)
    ids = _register(bm, list(range(8)))  # two cached blocks
    h0, h1 = _chain(bm, list(range(8)))
    bm.free(ids)
    assert bm.num_free == 6 and bm.num_cached == 2  # capacity is not lost to the cache
    assert bm.cached(h0) == ids[0] and bm.cached(h1) == ids[1]
    bm.touch(ids[0])  # a hit takes it out of the free pool
    assert bm.ref_counts[ids[0]] == 1 and bm.num_free == 5
    others = bm.allocate(4)  # the plain free list first: nothing evicted
    assert not set(others) & set(ids) and bm.num_cached == 2 and bm.num_evicted == 0
    assert bm.allocate(1) == [ids[1]]  # now the cached-free one goes, its hash with it
    assert bm.cached(h1) is None and bm.num_evicted == 1 and bm.num_cached == 1
    with pytest.raises(NoFreeBlocks):  # the referenced cached block is never evicted
        bm.allocate(1)
    assert bm.cached(h0) == ids[0]
    bm.free([ids[0], ids[1], *others])
    assert bm.num_free == 6 and bm.ref_counts == [0] * 6
    with pytest.raises(ValueError, match="double free"):
        bm.free([ids[0]])
    assert bm.num_free == 6


def test_eviction_is_least_recently_freed_first_tail_blocks_first():
    bm = BlockManager(4, BS)
    seq_a = _register(bm, list(range(8)))  # 2 blocks
    seq_b = _register(bm, list(range(100, 108)))  # 2 blocks
    bm.free(seq_a)
    bm.free(seq_b)
    # a sequence's blocks go tail first, so its tail is evicted before its head; then b's
    got = [bm.allocate(1)[0] for _ in range(3)]
    assert got == [seq_a[1], seq_a[0], seq_b[1]]
    assert bm.cached(_chain(bm, list(range(100, 108)))[0]) == seq_b[0]
    bm.free(got)
    assert bm.num_free == 4 and bm.num_cached == 1
    # a hit and a free make a block recent again: the plain blocks go before it
    bm.touch(seq_b[0])
    bm.free([seq_b[0]])
    assert seq_b[0] not in bm.allocate(3)
    bm.free(got)
    assert bm.num_free == 4


def test_register_rules_and_caching_off():
    bm = BlockManager(4, BS)
    h = _chain(bm, [1, 2, 3, 4])[0]
    a, b = bm.allocate(2)
    assert bm.register(a, h)
    assert not bm.register(b, h)  # computed twice at once: the first stays cached, b stays plain
    assert not bm.register(a, h)
    bm.free([a, b])
    with pytest.raises(ValueError, match="free"):
        bm.register(b, h)
    with pytest.raises(ValueError, match="not cached"):
        bm.touch(b)
    off = BlockManager(4, BS, enable_caching=False)
    (c,) = off.allocate(1)
    assert not off.register(c, h) and off.cached(h) is None
    off.free([c])


def test_match_holds_back_the_last_token_and_registers_only_known_tokens():
    bm = BlockManager(8, BS)
    cache = PrefixCache(bm)
    sp = SamplingParams()
    first = Sequence("a", list(range(3, 11)), sp)  # exactly two blocks
    assert cache.match(first) == 0
    bm.ensure(first.block_table, 8)
    first.num_computed_tokens = 8
    cache.register(first)
    assert bm.num_cached == 2
    again = Sequence("b", list(range(3, 11)), sp)
    assert cache.match(again) == BS  # the whole prompt is cached: its last block is computed again
    assert again.block_table == first.block_table[:1] and bm.ref_counts[first.block_table[0]] == 2
    cache.unmatch(again)
    assert bm.ref_counts[first.block_table[0]] == 1 and again.num_computed_tokens == 0
    # a placeholder (a token still on the device) keeps its block out of the cache
    pending = Sequence("c", [50, 51, 52, 53, 54, 55, 56, -1], sp)
    bm.ensure(pending.block_table, 8)
    pending.num_computed_tokens = 8
    cache.register(pending)
    assert bm.num_cached == 3 and pending.num_registered_blocks == 1
    pending.token_ids[-1] = 57
    cache.register(pending)
    assert bm.num_cached == 4 and pending.num_registered_blocks == 2
    bm.free(first.block_table)
    bm.free(pending.block_table)
    assert bm.num_free == 8


# --------------------------------------------------------------------------- the engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHARED = 4 * BLOCK_SIZE  # tokens of the shared prefix
WAIT_S = 60.0


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def _tokens(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


@pytest.fixture(scope="module")
def family(model) -> list[list[int]]:
    """Prompts sharing a 4-block prefix, with tails of different lengths (one exactly on a block
    boundary, one that is the prefix alone, one that repeats another prompt)."""
    rng = random.Random(17)
    vocab = model.cfg.vocab_size
    shared = _tokens(rng, vocab, SHARED)
    out = [shared + _tokens(rng, vocab, n) for n in (5, 1, BLOCK_SIZE, 2 * BLOCK_SIZE + 3, 0)]
    return out + [list(out[0])]


SEEDED = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=4321, ignore_eos=True)


def _sampling(i: int) -> SamplingParams:
    return greedy() if i % 2 == 0 else SamplingParams(**{**_asdict(SEEDED), "seed": 4321 + i})


def _asdict(sp: SamplingParams) -> dict:
    import msgspec

    return msgspec.structs.asdict(sp)


def run_waves(model, waves, *, caching: bool, **kw):
    """Each wave ([(prompt, sampling)]) is submitted once the one before has finished, into one
    engine. Returns (tokens by request id, engine); checks that every block is free at the end."""
    engine, events = make_engine(model, enable_prefix_caching=caching, **kw)
    engine.start()
    try:
        for w, wave in enumerate(waves):
            ids = [f"w{w}r{i}" for i in range(len(wave))]
            for req_id, (prompt, sampling) in zip(ids, wave):
                engine.add_request(req_id, prompt, sampling)
            events.wait(lambda ids=ids: all(r in events.finish or r in events.failed for r in ids), f"wave {w}", WAIT_S)
    finally:
        engine.stop()
    assert not events.failed, events.failed
    assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    assert sorted(engine.blocks.ref_counts) == [0] * engine.blocks.num_blocks
    assert not engine.seqs and not engine.scheduler.has_work() and engine._inflight is None
    return events.tokens, engine


def test_a_later_request_sharing_a_prefix_computes_only_the_rest(model, family):
    waves = [[(family[0], greedy()), (family[0], SEEDED)], [(family[3], greedy()), (family[3], SEEDED)], [(family[5], greedy())]]
    off, off_engine = run_waves(model, waves, caching=False)
    on, engine = run_waves(model, waves, caching=True)
    assert on == off
    pc = engine.prefix_cache
    # wave 0 (one step) finds nothing; wave 1 the shared prefix twice; wave 2, the first prompt
    # again, its 4 full blocks (its 5-token tail fills no block)
    assert pc.hits == 3 * SHARED and pc.blocks_reused == pc.hits // BLOCK_SIZE
    assert pc.queries == sum(len(p) for wave in waves for p, _ in wave)
    assert engine.prompt_tokens_computed == off_engine.prompt_tokens_computed - pc.hits
    assert off_engine.prefix_cache.hits == 0 and off_engine.blocks.num_cached == 0
    assert engine.blocks.num_cached > 0  # kept after quiescence, and counted free


def test_a_prompt_all_in_the_cache_still_computes_its_last_block(model, family):
    prompt = family[4]  # the shared prefix alone: exactly 4 blocks
    waves = [[(prompt, greedy())], [(prompt, greedy())], [(prompt[:-1], greedy())]]
    off, _ = run_waves(model, waves, caching=False)
    on, engine = run_waves(model, waves, caching=True)
    assert on == off
    # 3 of its 4 blocks each time: its last token is computed, so its last block is
    assert engine.prefix_cache.hits == 2 * 3 * BLOCK_SIZE


def test_prompts_sharing_a_prefix_at_once_and_again(model, family):
    wave = [(p, _sampling(i)) for i, p in enumerate(family)]
    off, _ = run_waves(model, [wave, wave], caching=False)
    on, engine = run_waves(model, [wave, wave], caching=True)
    assert on == off
    # the first wave runs in one step (nothing to find); the second finds every full block it may
    assert engine.prefix_cache.hits == sum((len(p) - 1) // BLOCK_SIZE * BLOCK_SIZE for p in family)


def test_chunked_prefill_over_cached_blocks(model, family):
    waves = [[(family[0], greedy())], [(p, _sampling(i)) for i, p in enumerate(family)]]
    off, _ = run_waves(model, waves, caching=False, max_num_batched_tokens=6)
    on, engine = run_waves(model, waves, caching=True, max_num_batched_tokens=6)
    assert on == off and engine.prefix_cache.hits > 0


def test_a_small_cache_evicts_and_preempts_with_the_same_tokens(model, family):
    wave = [(p, _sampling(i)) for i, p in enumerate(family)]
    waves = [wave[:2], wave, wave[::-1]]
    ref, _ = run_waves(model, waves, caching=False)  # 64 blocks: no preemption
    on, engine = run_waves(model, waves, caching=True, num_blocks=12, max_model_len=96)
    assert on == ref
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.num_evicted > 0
    assert engine.prefix_cache.hits > 0


def test_asynchronous_scheduling_with_the_cache(model, family):
    wave = [(p, SamplingParams(max_tokens=3 * BLOCK_SIZE, temperature=0.0, ignore_eos=True)) for p in family]
    waves = [wave[:1], wave]
    off, _ = run_waves(model, waves, caching=False)
    on, engine = run_waves(model, waves, caching=True, async_scheduling=True)
    assert on == off
    assert engine.steps_ahead > 0 and engine.prefix_cache.hits > 0
    # the prompts hold 7 distinct full blocks: the others cached hold tokens drawn while running
    # ahead, registered once read back
    assert engine.blocks.num_cached > 7


def test_pd_prefill_with_a_cached_prefix_on_both_sides(model, family):
    """The prefill's second prompt starts with blocks cached from its first: it computes only the
    rest, yet the decode holds the KV of every block — the shared prefix from its own cache (it
    registered the first prompt's blocks that landed, and leases them again), the rest written by
    the prefill — and decodes what a mixed run does."""
    from native.transfer.shm import ShmTransfer

    cfg = model.cfg
    prompts = [family[0], family[3]]
    mixed, _ = run_waves(model, [[(p, greedy())] for p in prompts], caching=False)
    mixed_kv: dict[int, list] = {}

    def kv_of(engine, i):
        def hook(items):
            seq = engine.seqs.get(f"m{i}")
            if seq is not None and i not in mixed_kv:
                mixed_kv[i] = _layer_kv(engine.runner.kv_cache, seq.block_table, len(prompts[i]))

        return hook

    for i, p in enumerate(prompts):  # the reference KV, computed without any cache
        ref_engine, ref_events = make_engine(model, enable_prefix_caching=False)
        ref_events.hook = kv_of(ref_engine, i)
        ref_engine.add_request(f"m{i}", p, greedy(max_tokens=2))
        ref_engine.start()
        try:
            ref_events.wait_done([f"m{i}"])
        finally:
            ref_engine.stop()

    decode_cache = KVCache(cfg.num_hidden_layers, 32, cfg.num_key_value_heads, BLOCK_SIZE, cfg.head_dim, model.dtype, shared=True)
    receiver = ShmTransfer(decode_cache)
    prefill_cache = KVCache(cfg.num_hidden_layers, 32, cfg.num_key_value_heads, BLOCK_SIZE, cfg.head_dim, model.dtype)
    sender = ShmTransfer(prefill_cache)
    prefill, p_events = make_engine(model, role="prefill", transfers={"ipc": sender}, cache=prefill_cache)
    decode, d_events = make_engine(model, role="decode", cache=decode_cache, events=Collector())
    prefill.start()
    decode.start()
    landed = []
    try:
        for i, prompt in enumerate(prompts):
            req = f"pd{i}"
            decode.reserve(req, len(prompt) + 10, 60.0, prompt, None, greedy())
            d_events.wait(lambda req=req: req in d_events.reserved, "the reservation")
            dest_blocks = d_events.reserved[req]
            cached = d_events.cached[req]
            assert cached == (0 if i == 0 else SHARED // BLOCK_SIZE), "the shared prefix is cached on the decode"
            dest = Destination(
                instance_id="decode-0", protocol="ipc", endpoint=receiver.endpoint(), block_ids=dest_blocks, cached_blocks=cached
            )
            prefill.add_prefill(req, prompt, greedy(), dest)
            p_events.wait(lambda req=req: req in p_events.prefilled or req in p_events.failed, "on_prefilled")
            assert req not in p_events.failed, p_events.failed
            written = prefill.blocks.blocks_for(len(prompt)) - cached
            assert p_events.prefilled[req][1] == 2 * cfg.num_hidden_layers * written * decode_cache.block_bytes
            got_kv = _layer_kv(decode_cache, dest_blocks, len(prompt))
            landed.append(got_kv)
            # the prefix of the second came from the first's cached blocks: the same bytes
            for layer, (got, want) in enumerate(zip(got_kv, landed[0])):
                assert torch.equal(got[:, :, :SHARED], want[:, :, :SHARED]), f"prompt {i} layer {layer}: prefix KV"
            # and all of it is the KV a run without the cache computes (a prompt computed in
            # steps of other sizes rounds differently in the last bits)
            for layer, (got, want) in enumerate(zip(got_kv, mixed_kv[i])):
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"prompt {i} layer {layer}: the decode's KV differs"
            first = p_events.prefilled[req][0].token_ids[0]
            decode.add_decode(req, first)
            d_events.wait_done([req])
            assert [first] + d_events.tokens[req] == mixed[f"w{i}r0"]
        assert prefill.prefix_cache.hits == SHARED  # the second prompt's shared prefix
        assert decode.blocks.num_cached >= len(prompts[0]) // BLOCK_SIZE  # what landed, registered
    finally:
        prefill.stop()
        decode.stop()
        sender.close()
        receiver.close()
        decode_cache.close()
    for engine in (prefill, decode):
        assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.blocks.leases


# --------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gpu_prefix_cache_with_graphs_and_running_ahead(tmp_path):
    """The kernel path (bf16, prefill attention over cached blocks, decode CUDA graphs, steps run
    ahead): prompts sharing a prefix give the tokens of the engine without the cache."""
    from test_gpu_model import BLOCK, load, save_gpu_model

    from native.graphs import DecodeGraphs
    from native.runner import ModelRunner

    model = load(save_gpu_model("moe_shared_hd64", str(tmp_path), seed=7))
    cfg = model.cfg

    def runner() -> ModelRunner:
        cache = KVCache(cfg.num_hidden_layers, 256, cfg.num_key_value_heads, BLOCK, cfg.head_dim, torch.bfloat16, device="cuda")
        return ModelRunner(model, cache, "cuda", graphs=DecodeGraphs(model, cache, max_batch=16, max_model_len=512))

    rng = random.Random(5)
    shared = _tokens(rng, cfg.vocab_size, 4 * BLOCK)
    prompts = [shared + _tokens(rng, cfg.vocab_size, n) for n in (3, 1, BLOCK, 2 * BLOCK + 5, 0)]
    plain = SamplingParams(max_tokens=2 * BLOCK, temperature=0.0, ignore_eos=True)
    wave = [(p, plain if i % 2 == 0 else SamplingParams(**{**_asdict(SEEDED), "seed": i})) for i, p in enumerate(prompts)]
    waves = [wave[:1], wave, wave]
    off, _ = run_waves(model, waves, caching=False, runner=runner(), max_model_len=512)
    ahead = runner()
    on, engine = run_waves(model, waves, caching=True, async_scheduling=True, runner=ahead, max_model_len=512)
    assert on == off
    assert engine.prefix_cache.hits > 0 and engine.steps_ahead > 0 and ahead.graphs.replays > 0
