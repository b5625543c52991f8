"""Decode-side prefix reuse, engine by engine (the real tiny model on the CPU, a real shared-memory
KV transfer): a decode leases the blocks of its own prefix cache that already hold a coming
prompt's KV, says how many (``on_reserved``'s ``cached_blocks``), and the prefill writes only
the blocks after them. A two-turn chat gives the tokens of the same engines without any cache,
the second turn's transfer is the new blocks only, the shared blocks are never written, and
every way a lease ends (claimed and finished, released, aborted, expired, asked twice, refused)
gives their references back.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from test_engine import BLOCK_SIZE, Collector, _layer_kv, greedy, make_engine

from actors.engine.block_manager import BlockManager
from native.kv_cache import KVCache
from pdbus.messages import Destination
from pdbus.procs import wait_until

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BS = BLOCK_SIZE
WAIT_S = 60.0
ANSWER = 2 * BS + 3  # tokens of turn 1's answer


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


class Pair:
    """A prefill engine and a decode engine joined as the router joins them (Reserve with the
    prompt and Prefill at once, then DestReady with the decode's answer, then Decode)."""

    def __init__(self, model, caching: bool, num_blocks: int = 64):
        from native.transfer.shm import ShmTransfer

        cfg = model.cfg
        self.decode_cache = KVCache(cfg.num_hidden_layers, num_blocks, cfg.num_key_value_heads, BS, cfg.head_dim, model.dtype, shared=True)
        self.receiver = ShmTransfer(self.decode_cache)
        prefill_cache = KVCache(cfg.num_hidden_layers, num_blocks, cfg.num_key_value_heads, BS, cfg.head_dim, model.dtype)
        self.sender = ShmTransfer(prefill_cache)
        self.prefill, self.p_events = make_engine(
            model, role="prefill", transfers={"ipc": self.sender}, cache=prefill_cache, enable_prefix_caching=caching
        )
        self.decode, self.d_events = make_engine(
            model, role="decode", cache=self.decode_cache, events=Collector(), enable_prefix_caching=caching
        )
        self.block_bytes = 2 * cfg.num_hidden_layers * self.decode_cache.block_bytes
        self.prefill.start()
        self.decode.start()

    def run(self, req: str, prompt: list[int], sampling) -> tuple[list[int], int, int]:
        """(tokens, the decode's cached blocks, the bytes the prefill sent)."""
        self.decode.reserve(req, len(prompt) + 1, 60.0, prompt, None, sampling)
        dest = Destination(instance_id="decode-0", protocol="ipc", endpoint=self.receiver.endpoint())
        self.prefill.add_prefill(req, prompt, sampling, dest)
        self.d_events.wait(lambda: req in self.d_events.reserved, "the reservation", WAIT_S)
        blocks, cached = self.d_events.reserved[req], self.d_events.cached[req]
        assert blocks is not None
        self.prefill.dest_ready(req, blocks, cached_blocks=cached)
        self.p_events.wait(lambda: req in self.p_events.prefilled or req in self.p_events.failed, "on_prefilled", WAIT_S)
        assert req not in self.p_events.failed, self.p_events.failed
        first, nbytes, _ = self.p_events.prefilled[req]
        shared_before = _layer_kv(self.decode_cache, blocks[:cached], cached * BS)
        self.decode.add_decode(req, first.token_ids[0])
        self.d_events.wait_done([req])
        assert req not in self.d_events.failed, self.d_events.failed
        # the shared blocks are read-only: decoding wrote its tokens' KV into blocks of its own
        for before, after in zip(shared_before, _layer_kv(self.decode_cache, blocks[:cached], cached * BS)):
            assert torch.equal(before, after), "the decode wrote into a block it shares"
        return first.token_ids + self.d_events.tokens[req], cached, nbytes

    def close(self) -> None:
        self.prefill.stop()
        self.decode.stop()
        self.sender.close()
        self.receiver.close()
        self.decode_cache.close()

    def assert_clean(self) -> None:
        for engine in (self.prefill, self.decode):
            bm = engine.blocks
            assert bm.num_free == bm.num_blocks and not bm.leases and bm.ref_counts == [0] * bm.num_blocks


def _chat(rng: random.Random, vocab: int) -> tuple[list[int], list[int]]:
    return [rng.randrange(3, vocab) for _ in range(3 * BS + 3)], [rng.randrange(3, vocab) for _ in range(5)]


def test_a_two_turn_chat_sends_only_the_new_blocks_and_equals_no_cache(model):
    first, new = _chat(random.Random(3), model.cfg.vocab_size)
    sampling = greedy(max_tokens=ANSWER)
    got: dict[bool, list] = {}
    for caching in (False, True):
        pair = Pair(model, caching)
        try:
            answer, cached1, bytes1 = pair.run("turn1", first, sampling)
            second = first + answer + new  # the client sends the history and its new message
            answer2, cached2, bytes2 = pair.run("turn2", second, sampling)
            got[caching] = [answer, answer2]
        finally:
            pair.close()
        pair.assert_clean()
        assert cached1 == 0 and bytes1 == -(-len(first) // BS) * pair.block_bytes  # every block of the prompt
        if not caching:
            assert cached2 == 0 and pair.decode.prefix_cache.hits == 0
            continue
        # every full block of turn 1's sequence whose KV the decode computed or received (all but
        # the answer's last token) is in its cache; turn 2 sends the blocks after them
        assert cached2 == (len(first) + len(answer) - 1) // BS
        written = -(-len(second) // BS) - cached2
        assert bytes2 == written * pair.block_bytes and written <= -(-(len(new) + 1) // BS) + 1
        assert pair.decode.prefix_cache.hits == cached2 * BS
    assert got[True] == got[False]


def test_every_end_of_a_lease_gives_the_cached_blocks_back(model):
    first, _ = _chat(random.Random(4), model.cfg.vocab_size)
    pair = Pair(model, caching=True, num_blocks=32)
    decode, events = pair.decode, pair.d_events
    try:
        pair.run("warm", first, greedy(max_tokens=4))  # the decode now caches the prompt's blocks
        cached_before = decode.blocks.num_cached

        def reserve(req: str, num_tokens: int, lease_s: float = 60.0) -> tuple[list[int] | None, int]:
            decode.reserve(req, num_tokens, lease_s, first, None, greedy())
            events.wait(lambda: req in events.reserved, f"the answer to {req}", WAIT_S)
            return events.reserved.pop(req), events.cached.pop(req)

        def referenced() -> int:
            return sum(1 for n in decode.blocks.ref_counts if n)

        def settled() -> None:  # a round trip through the engine thread: every command before ran
            done = threading.Event()
            decode.submit(done.set)
            assert done.wait(WAIT_S), "the engine's inbox"

        ids, cached = reserve("released", len(first) + 1)
        assert cached == (len(first) - 1) // BS and referenced() == len(ids)
        decode.release("released")
        settled()
        assert referenced() == 0 and decode.blocks.num_cached == cached_before  # still cached, free
        again, cached_again = reserve("twice", len(first) + 1)
        assert reserve("twice", len(first) + 1) == (again, cached_again), "asked twice: the same lease"
        assert referenced() == len(again)  # and no second reference
        decode.abort("twice", "test")
        settled()
        assert referenced() == 0
        assert reserve("too-big", 10_000) == (None, 0)  # Busy: the matched blocks are given back
        assert referenced() == 0
        _, cached = reserve("expires", len(first) + 1, lease_s=0.05)
        assert cached > 0
        wait_until(lambda: not decode.blocks.leases, WAIT_S, "the lease to expire", 0.01)
        settled()
        assert referenced() == 0
    finally:
        pair.close()
    pair.assert_clean()


def test_the_prefill_refuses_a_cached_count_that_would_skip_the_last_block(model):
    pair = Pair(model, caching=True)
    try:
        prompt = list(range(3, 3 + 2 * BS))  # exactly two blocks: at most one may be cached
        dest = Destination(instance_id="decode-0", protocol="ipc", endpoint=pair.receiver.endpoint(), block_ids=[0, 1, 2], cached_blocks=2)
        pair.prefill.add_prefill("bad", prompt, greedy(), dest)
        pair.p_events.wait(lambda: "bad" in pair.p_events.failed, "the refusal", WAIT_S)
        assert "at most 1" in pair.p_events.failed["bad"]
    finally:
        pair.close()
    pair.assert_clean()


def test_a_lease_takes_cached_blocks_first_and_owns_their_references():
    bm = BlockManager(6, BS)
    shared = bm.allocate(2)
    for b, h in zip(shared, (b"a" * 16, b"b" * 16)):
        assert bm.register(b, h)
    bm.free(shared)  # cached, referenced by nobody
    for b in shared:
        bm.touch(b)  # a match (PrefixCache.match_lease)
    ids = bm.reserve("r", 4 * BS, 5.0, now=0.0, cached=shared)
    assert ids[:2] == shared and len(ids) == 4 and bm.leases["r"].num_cached == 2
    bm.release("r")
    assert bm.num_free == 6 and bm.ref_counts == [0] * 6 and bm.num_cached == 2
    for b in shared:
        bm.touch(b)
    assert bm.reserve("big", 10 * BS, 5.0, now=0.0, cached=shared) is None  # refused: given back
    assert bm.ref_counts == [0] * 6 and bm.num_free == 6
