"""The router's instance choice and decode-side reuse through the router (no process, milliseconds).

* ``PrefixIndex`` and ``Routing`` (actors/router/cache_index.py) with real peers and loads set by
  hand: the longest indexed prefix wins until its instance is too far above the least loaded
  (both of SGLang's thresholds), no match goes to the least loaded, ``power_of_two`` and
  ``round_robin`` do what they are named, an instance lost or saying Hello again is forgotten.
* ``PDBackend`` against the fake bus of tests/test_router_pd.py: the decode's ``cached_blocks``
  reach the prefill on every path (``DestReady``, a new destination after a Busy, a re-dispatched
  ``Prefill``), the bytes not sent are counted, a second turn goes to the decode and the prefill
  that hold the conversation, and nothing is left behind.
* The router's ``/metrics`` totals: decisions, KV bytes sent and saved, per-instance prefix cache.
"""

from __future__ import annotations

import argparse
import asyncio

import pytest
from test_router_pd import KV, Client, FakeBus, assert_clean, cluster, prefer_decodes, run

from actors.router.cache_index import PrefixIndex, Routing, block_bytes, chain
from pdbus.config import ConfigError, RouterConfig, add_router_args, router_config_from_args
from pdbus.messages import (
    Decode,
    DestReady,
    Failed,
    KVLayout,
    Load,
    Prefill,
    Prefilled,
    Reserve,
    TokenOut,
)

BS = KV.block_size
CONV = [(13 * j) % 90 + 3 for j in range(5 * BS + 3)]  # a conversation's tokens: 5 full blocks


def _load(peer, running: int = 0) -> None:
    peer.load = Load(free_blocks=100, total_blocks=100, running=running)


# --------------------------------------------------------------------------- the index


def test_the_index_holds_each_instances_longest_recorded_prefix():
    bus = FakeBus()
    d0, d1 = bus.add("decode", "d0"), bus.add("decode", "d1")
    index = PrefixIndex()
    index.record(d0, CONV[: 3 * BS + 2])
    index.record(d1, CONV[:BS])
    assert index.match(d0, CONV, {}) == 3 and index.match(d1, CONV, {}) == 1
    assert index.match(d0, CONV[: BS] + [1] * (2 * BS), {}) == 1, "a chain: the block after a different one differs"
    assert index.match(d0, [1] * (4 * BS), {}) == 0 and index.match(d0, CONV[: BS - 1], {}) == 0
    assert chain(CONV, BS) == chain(CONV, BS) and chain(CONV, BS)[:2] != chain(CONV, 2 * BS)[:2]
    index.forget(d0.identity)
    assert index.match(d0, CONV, {}) == 0 and index.size(d0.identity) == 0


def test_the_index_is_an_lru_bounded_by_the_instances_cache():
    bus = FakeBus()
    small = bus.add("decode", "small")
    small.hello.kv = KVLayout(num_layers=2, num_blocks=4, num_kv_heads=2, block_size=BS, head_dim=32, dtype="float32")
    index = PrefixIndex()
    index.record(small, CONV[: 2 * BS])
    other = [7] * (3 * BS)
    index.record(small, other)  # 3 more blocks than fit next to the first 2: the oldest goes
    assert index.size(small.identity) == 4
    assert index.match(small, other, {}) == 3 and index.match(small, CONV, {}) == 0
    index.record(small, CONV[: 2 * BS])  # used again: the most recent
    assert index.match(small, CONV, {}) == 2 and index.size(small.identity) == 4
    assert PrefixIndex(max_blocks=2).max_blocks == 2


# --------------------------------------------------------------------------- the policies


def test_cache_aware_takes_the_longest_match_within_the_balance_thresholds():
    bus, backend, _, (d0, d1) = cluster(decodes=2)
    routing = backend.routing  # the default: cache_aware, thresholds 16 requests and 1.5x
    routing.record(d1, CONV)
    routing.record(d0, CONV[:BS])
    assert backend.pick_decode(set(), CONV) is d1
    _load(d1, running=16)  # 16 above d0: not more than the absolute threshold
    assert backend.pick_decode(set(), CONV) is d1
    _load(d1, running=17)
    assert backend.pick_decode(set(), CONV) is d0  # too far above the least loaded
    _load(d0, running=40)
    _load(d1, running=59)  # 19 above, but less than 1.5x: still the match
    assert backend.pick_decode(set(), CONV) is d1
    assert backend.pick_decode({d1.identity}, CONV) is d0  # excluded (said Busy): the next best
    assert routing.decisions == {("decode", "cache_hit"): 4, ("decode", "load_balance"): 1}


def test_cache_aware_without_a_match_takes_the_least_loaded_then_the_smaller_index():
    bus, backend, (p0, p1), (d0, d1) = cluster(prefills=2, decodes=2)
    routing = backend.routing
    routing.record(d0, CONV)
    fresh = [5] * (2 * BS)
    assert backend.pick_decode(set(), fresh) is d1  # equal loads: d1 has room for new prefixes
    _load(d1, running=2)
    assert backend.pick_decode(set(), fresh) is d0
    backend._load(p0.identity).prefills = 1
    assert backend.pick_prefill(set(), fresh) is p1  # a prefill's load: the prefills in flight there
    assert backend.pick_decode(set(), None) is d0 and backend.pick_decode(set(), [1, 2]) is d0  # no full block
    assert routing.decisions[("decode", "no_match")] == 4 and routing.decisions[("prefill", "no_match")] == 1


def test_cache_aware_sends_a_prompt_to_the_prefill_that_reaches_its_first_token_soonest():
    """A prefill by the tokens it would compute first: the prompt's uncached part plus what the
    router has in flight there. A prefix both hold (a shared system prompt) goes to the emptier
    queue; a conversation's longer history wins over a short queue, not over a long one."""
    bus, backend, (p0, p1), _ = cluster(prefills=2)
    routing = backend.routing
    system = CONV[: 2 * BS]
    routing.record(p0, system)
    routing.record(p1, system)
    backend._load(p0.identity).pending_prefill_tokens = 3 * BS
    assert backend.pick_prefill(set(), CONV) is p1  # both hold the system prompt: the emptier one
    routing.record(p0, CONV)  # p0 computed this conversation's history (5 blocks)
    backend._load(p0.identity).pending_prefill_tokens = 2 * BS
    assert backend.pick_prefill(set(), CONV) is p0  # 3 uncached blocks less to compute beats 2 queued
    backend._load(p0.identity).pending_prefill_tokens = 4 * BS
    assert backend.pick_prefill(set(), CONV) is p1  # ...but not 4 queued
    assert routing.decisions == {("prefill", "cache_hit"): 2, ("prefill", "load_balance"): 1}


def test_power_of_two_and_round_robin_do_as_named():
    _, backend, _, (d0, d1, d2) = cluster(decodes=3, routing=Routing("round_robin"))
    picks = [backend.pick_decode(set(), CONV).name for _ in range(4)]
    assert picks == ["d0", "d1", "d2", "d0"]
    backend.routing.record(d1, CONV)
    assert backend.routing.index.size(d1.identity) == 0, "only cache_aware keeps an index"
    _, backend, _, (d0, d1) = cluster(decodes=2, routing=Routing("power_of_two"))
    d0.load = Load(free_blocks=10, total_blocks=100)
    assert {backend.pick_decode(set(), CONV).name for _ in range(5)} == {"d1"}  # most free blocks
    backend._load(d1.identity).reserved_blocks = 95  # what the router reserved counts against it
    assert backend.pick_decode(set(), CONV) is d0
    assert backend.routing.decisions == {("decode", "power_of_two"): 6}
    with pytest.raises(ValueError):
        Routing("least_loaded")
    with pytest.raises(ConfigError, match="router-policy"):
        RouterConfig(router_policy="random").validate(check_port=False)
    with pytest.raises(ConfigError, match="balance-rel-threshold"):
        RouterConfig(balance_rel_threshold=0.5).validate(check_port=False)
    parser = argparse.ArgumentParser()
    add_router_args(parser)
    cfg = router_config_from_args(parser.parse_args(["--router-policy", "round_robin", "--balance-abs-threshold", "4"]), check_port=False)
    assert (cfg.router_policy, cfg.balance_abs_threshold, cfg.balance_rel_threshold) == ("round_robin", 4.0, 1.5)


# --------------------------------------------------------------------------- through PDBackend


async def _granted(bus, backend, p, d, blocks, cached: int, req: str = "r1") -> DestReady:
    """``d`` answers the latest Reserve with ``blocks``, ``cached`` of them from its prefix cache;
    the DestReady that the router forwards to ``p``."""
    await bus.next(Reserve, d, len(bus.of(Reserve, d)) or 1)
    dests = len(bus.of(DestReady, p))
    backend.on_reserve_answer(d.identity, req, list(blocks), "", cached)
    return await bus.next(DestReady, p, dests + 1)


async def _finish(bus, backend, c, p, d, nbytes: int = 0, tokens=(9, 10)):
    backend.on_prefill_end(p.identity, Prefilled(req_id=c.req_id, first=TokenOut(c.req_id, [tokens[0]]), transfer_bytes=nbytes))
    await bus.next(Decode, d, len(bus.of(Decode, d)) + 1)
    backend.on_tokens(d.identity, [TokenOut(c.req_id, list(tokens[1:]), finish_reason="length")])
    await c.done()
    assert c.error is None


class _Client(Client):
    def __init__(self, backend, req_id: str = "r1", prompt=CONV):
        super().__init__(backend, req_id, prompt, via="submit")
        self.req_id = req_id


def test_the_decodes_cached_blocks_reach_the_prefill_and_the_bytes_not_sent_are_counted():
    async def main():
        bus, backend, (p,), (d,) = cluster()
        c = _Client(backend)
        dest = await _granted(bus, backend, p, d, blocks=(3, 4, 5, 6, 7, 8), cached=4)
        assert dest.block_ids == [3, 4, 5, 6, 7, 8] and dest.cached_blocks == 4 and dest.dest is None
        await _finish(bus, backend, c, p, d, nbytes=2 * block_bytes(KV))
        assert backend.counters["transfer_bytes"] == 2 * block_bytes(KV)
        assert backend.counters["transfer_bytes_saved"] == 4 * block_bytes(KV) == 4 * 2 * 2 * 2 * BS * 32 * 4
        assert_clean(backend)

    run(main())


def test_another_decode_after_a_busy_one_sends_its_own_cached_count_with_the_destination():
    async def main():
        bus, backend, (p,), (d0, d1) = cluster(decodes=2)
        prefer_decodes(backend, d0, d1)
        c = _Client(backend)
        await bus.next(Reserve, d0)
        backend.on_reserve_answer(d0.identity, "r1", None, "full")
        dest = await _granted(bus, backend, p, d1, blocks=(1, 2, 3, 4, 5, 6), cached=2)
        assert dest.dest.instance_id == "d1" and dest.cached_blocks == 2
        await _finish(bus, backend, c, p, d1)
        assert backend.counters["transfer_bytes_saved"] == 2 * block_bytes(KV)
        assert_clean(backend)

    run(main())


def test_a_redispatched_prefill_gets_the_lease_with_its_cached_count():
    async def main():
        bus, backend, (p0, p1), (d,) = cluster(prefills=2)
        backend.pick_prefill = lambda exclude, tokens=None: next(p for p in (p0, p1) if p.identity not in exclude)
        c = _Client(backend)
        await _granted(bus, backend, p0, d, blocks=(7, 8, 9, 10, 11, 12), cached=3)
        p0.alive = False
        backend.on_instance_lost(p0, "silent")
        again = await bus.next(Prefill, p1)
        assert again.dest.block_ids == [7, 8, 9, 10, 11, 12] and again.dest.cached_blocks == 3
        await _finish(bus, backend, c, p1, d)
        assert_clean(backend)

    run(main())


def test_a_decode_lost_after_a_cached_lease_starts_over_with_the_next_ones_count():
    async def main():
        bus, backend, (p,), (d0, d1) = cluster(decodes=2)
        prefer_decodes(backend, d0, d1)
        c = _Client(backend)
        await _granted(bus, backend, p, d0, blocks=(1, 2, 3, 4, 5, 6), cached=5)
        d0.alive = False
        backend.on_instance_lost(d0, "silent")
        dest = await _granted(bus, backend, p, d1, blocks=(8, 9, 10, 11, 12, 13), cached=0)
        assert dest.cached_blocks == 0
        prefill = bus.of(Prefill, p)[-1]
        assert prefill.dest.instance_id == "d1" and prefill.dest.cached_blocks == 0
        backend.on_prefill_end(p.identity, Failed(req_id="r1", error="aborted: decode lost"))  # the aborted dispatch's answer
        await _finish(bus, backend, c, p, d1)
        assert backend.counters["transfer_bytes_saved"] == 0  # the lost decode's blocks saved nothing
        assert backend.routing.index.size(d0.identity) == 0, "a lost instance is forgotten"
        assert_clean(backend)

    run(main())


def test_a_second_turn_goes_to_the_decode_and_the_prefill_holding_the_conversation():
    async def main():
        bus, backend, (p0, p1), (d0, d1) = cluster(prefills=2, decodes=2)
        first = CONV[: 3 * BS + 5]
        c = _Client(backend, "t1", first)
        await bus.next(Reserve)
        d = next(bus.peers[i] for i, m in bus.sent if isinstance(m, Reserve))  # whichever: nothing is cached yet
        p = next(bus.peers[i] for i, m in bus.sent if isinstance(m, Prefill))
        await _granted(bus, backend, p, d, blocks=range(5), cached=0, req="t1")
        answer = list(range(40, 40 + BS))
        await _finish(bus, backend, c, p, d, tokens=answer)
        other_d, other_p = (d1 if d is d0 else d0), (p1 if p is p0 else p0)
        _load(d, running=3)  # busier than the other decode, within the thresholds
        second = first + answer + [3, 4, 5]
        c2 = _Client(backend, "t2", second)
        reserve = await bus.next(Reserve, d, 2)
        assert reserve.prompt_token_ids == second and not bus.of(Reserve, other_d)
        assert bus.of(Prefill, p)[-1].req_id == "t2" and not bus.of(Prefill, other_p)
        cached = (len(first) + len(answer) - 1) // BS
        assert (await _granted(bus, backend, p, d, blocks=range(10, 17), cached=cached, req="t2")).cached_blocks == cached
        await _finish(bus, backend, c2, p, d)
        decisions = backend.routing.decisions
        assert decisions[("decode", "cache_hit")] == 1 and decisions[("prefill", "cache_hit")] == 1
        assert_clean(backend)

    run(main())


def test_a_mixed_instance_holding_the_prompt_is_chosen_and_counted():
    async def main():
        bus = FakeBus()
        m0, m1 = bus.add("mixed", "m0"), bus.add("mixed", "m1")
        from actors.router.pd import PDBackend

        assert m0.load.running == m1.load.running  # equal loads: only the index tells them apart
        backend = PDBackend(bus, reserve_timeout_s=1.0, request_timeout_s=5.0)
        backend.routing.record(m1, CONV)
        c = _Client(backend)
        await bus.next(Prefill, m1)
        answer = list(range(40, 40 + BS))
        backend.on_tokens(m1.identity, [TokenOut("r1", answer, finish_reason="stop")])
        await c.done()
        assert backend.routing.decisions == {("mixed", "cache_hit"): 1}
        # its prompt and answer are indexed now: the next turn's prefix
        assert backend.routing.index.match(m1, CONV + answer + [1], {}) == (len(CONV) + BS) // BS
        assert_clean(backend)

    run(main())


# --------------------------------------------------------------------------- the router's /metrics


def test_the_routers_metrics_show_decisions_bytes_and_each_instances_prefix_cache():
    from actors.router.server import RouterServer
    from pdbus.actor import Peer

    async def main():
        server = RouterServer(RouterConfig())
        try:
            fake = FakeBus()
            for role, name, queries, hits in (("prefill", "p0", 100, 64), ("decode", "d0", 80, 48)):
                peer = fake.add(role, name)
                load = Load(prefix_cache_queries=queries, prefix_cache_hits=hits, prefix_cache_blocks_reused=hits // BS)
                peer = Peer(peer.identity, peer.hello, load=load)
                server.bus.peers[peer.identity] = peer
            d0 = server.bus.peers[b"d0"]
            server.pd.routing.pick("decode", [d0], CONV)
            server.pd.counters.update(transfer_bytes=1000, transfer_bytes_saved=4096)
            body, _ = server.frontend.metrics.render(server.stats(), server.totals())
            text = body.decode()
            assert 'pdbus:router_decisions_total{policy="cache_aware",reason="no_match",role="decode"} 1.0' in text
            assert "pdbus:kv_transfer_bytes_total 1000.0" in text and "pdbus:kv_transfer_bytes_saved_total 4096.0" in text
            assert 'pdbus:prefix_cache_hits_total{instance="d0",role="decode"} 48.0' in text
            assert 'pdbus:prefix_cache_queries_total{instance="p0",role="prefill"} 100.0' in text
            assert f'pdbus:prefix_cache_blocks_reused_total{{instance="p0",role="prefill"}} {64 // BS:.1f}' in text
            server.pd.routing.record(d0, CONV)
            server.instance_joined(d0)  # says Hello again: what it caches is unknown now
            assert server.pd.routing.index.size(d0.identity) == 0
        finally:
            await server.bus.close()

    asyncio.run(main())
