"""The router's request state machine, exit by exit, against a fake bus (no process, milliseconds).

Each test walks one request (``PDBackend.generate``) to one of its exits by answering as the
instances would, then checks what a user and an operator would see: the answer or error, the
messages the router sent (every lease released, every instance that held the request told to
drop it) and that nothing is left behind — no request entry, no orphan, no reserve waiter, and the
router's per-instance load estimates back at zero.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.frontend.server import BackendUnavailable, RequestRejected, RequestTimedOut
from actors.router.pd import Exit, PDBackend
from pdbus.actor import Peer
from pdbus.messages import (
    Abort,
    Decode,
    DestReady,
    Failed,
    Hello,
    KVLayout,
    Load,
    Prefill,
    Prefilled,
    Release,
    Reserve,
    SamplingParams,
    TokenOut,
)
from pdbus.sockets import PeerUnreachable

KV = KVLayout(num_layers=2, num_blocks=100, num_kv_heads=2, block_size=16, head_dim=32, dtype="float32")
SAMPLING = SamplingParams(max_tokens=8, temperature=0.0)
PROMPT = [5, 6, 7]
WAIT_S = 2.0  # bound on any one wait for the router's next message


class FakeBus:
    """The RouterBus's face towards PDBackend: registered peers and a record of what was sent."""

    def __init__(self):
        self.peers: dict[bytes, Peer] = {}
        self.sent: list[tuple[bytes, object]] = []
        self._changed = asyncio.Event()

    def add(self, role: str, name: str, free_blocks: int = 100) -> Peer:
        hello = Hello(
            protocol=1, instance_id=name, role=role, host="127.0.0.1", http_port=0, model="m", config_hash="c",
            kv=KV, transfer={"tcp": {"host": "127.0.0.1", "port": 1}},
        )
        peer = Peer(name.encode(), hello, load=Load(free_blocks=free_blocks, total_blocks=100))
        self.peers[peer.identity] = peer
        return peer

    def send(self, ident: bytes, msg) -> None:
        peer = self.peers.get(ident)
        if peer is None or not peer.alive:
            raise PeerUnreachable(f"{ident!r} unreachable")
        self.sent.append((ident, msg))
        self._changed.set()

    def peer_name(self, ident: bytes) -> str:
        return ident.decode()

    def of(self, kind, to: Peer | None = None) -> list:
        return [m for i, m in self.sent if isinstance(m, kind) and (to is None or i == to.identity)]

    async def next(self, kind, to: Peer | None = None, count: int = 1):
        """The ``count``-th message of ``kind`` (to ``to``), waiting for it with a bound."""
        deadline = time.monotonic() + WAIT_S
        while len(self.of(kind, to)) < count:
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                sent = [(i.decode(), type(m).__name__) for i, m in self.sent]
                raise AssertionError(f"no {kind.__name__} #{count} to {to and to.name} within {WAIT_S}s; sent: {sent}")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        return self.of(kind, to)[count - 1]


class Client:
    """Iterates ``generate`` in a task the way the frontend does, collecting what it yields
    (``via="submit"``: the router's choice between the PD walk and a mixed instance)."""

    def __init__(self, backend: PDBackend, req_id: str = "r1", prompt=PROMPT, via: str = "generate"):
        self.items: list[TokenOut] = []
        self.error: BaseException | None = None
        self.gen = getattr(backend, via)(req_id, list(prompt), SAMPLING)
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self):
        try:
            async for item in self.gen:
                self.items.append(item)
                if item.finish_reason is not None:
                    break
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            self.error = exc
        finally:
            await self.gen.aclose()

    async def done(self):
        await asyncio.wait_for(self.task, WAIT_S)
        return self

    async def leave(self):
        """The client goes away (HTTP disconnect): the frontend's task is cancelled."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def assert_clean(backend: PDBackend, orphans: int = 0):
    assert not backend.reqs, f"request entries left: {list(backend.reqs)}"
    assert len(backend.orphans) == orphans, backend.orphans
    busy = {k.decode(): v for k, v in backend.inflight.items() if not v.idle()}
    assert not busy, f"load estimates not put back: {busy}"


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 10))


def cluster(prefills: int = 1, decodes: int = 1, **kw):
    bus = FakeBus()
    ps = [bus.add("prefill", f"p{i}") for i in range(prefills)]
    ds = [bus.add("decode", f"d{i}") for i in range(decodes)]
    return bus, PDBackend(bus, **{"reserve_timeout_s": 1.0, "request_timeout_s": 5.0, **kw}), ps, ds


async def reserved(bus, backend, p, d, blocks=(1,)):
    """The latest Reserve to ``d`` and the Prefill to ``p`` sent with it; ``d`` grants ``blocks``;
    the DestReady that the router forwards to ``p``."""
    reserve = await bus.next(Reserve, d, len(bus.of(Reserve, d)) or 1)
    prefill = bus.of(Prefill, p)[-1]  # sent together with the Reserve
    assert prefill.req_id == reserve.req_id
    dests = len(bus.of(DestReady, p))
    backend.on_reserve_answer(d.identity, reserve.req_id, list(blocks), "")
    return reserve, prefill, await bus.next(DestReady, p, dests + 1)


async def to_decode(bus, backend, p, d, blocks=(1,), first=9):
    """Walk the request to the decode phase on ``d``: Reserved, Prefilled, and the Decode message."""
    reserve, prefill, _ = await reserved(bus, backend, p, d, blocks)
    backend.on_prefill_end(p.identity, Prefilled(req_id=prefill.req_id, first=TokenOut(prefill.req_id, [first])))
    return reserve, prefill, await bus.next(Decode, d, len(bus.of(Decode, d)) + 1)


async def finish(bus, backend, c, p, d):
    """The prefill answers token one, the decode finishes with one more: the request ends clean."""
    backend.on_prefill_end(p.identity, Prefilled(req_id="r1", first=TokenOut("r1", [9])))
    await bus.next(Decode, d)
    backend.on_tokens(d.identity, [TokenOut("r1", [10], finish_reason="stop")])
    await c.done()
    assert c.error is None
    assert_clean(backend)


def prefer_decodes(backend, *decodes):
    """The router picks the first live decode of ``decodes`` not excluded (a fixed order, not random)."""
    backend.pick_decode = lambda exclude, tokens=None: next((d for d in decodes if d.identity not in exclude and d.alive), None)


def test_finished_request_sends_no_release_and_leaves_nothing():
    async def main():
        bus, backend, (p,), (d,) = cluster()
        c = Client(backend)
        reserve, prefill, dest = await reserved(bus, backend, p, d, blocks=(3, 4))
        assert reserve.num_tokens == len(PROMPT) + 1
        assert reserve.prompt_token_ids == PROMPT and reserve.sampling == SAMPLING and not reserve.output_token_ids
        assert prefill.prompt_token_ids == PROMPT and prefill.dest.instance_id == "d0" and prefill.dest.block_ids is None
        assert dest.block_ids == [3, 4] and dest.dest is None, "the Prefill named this decode already"
        backend.on_prefill_end(p.identity, Prefilled(req_id="r1", first=TokenOut("r1", [9])))
        decode = await bus.next(Decode, d)
        assert decode.first_token_id == 9
        backend.on_tokens(d.identity, [TokenOut("r1", [10]), TokenOut("r1", [11], finish_reason="stop")])
        await c.done()
        assert [t for i in c.items for t in i.token_ids] == [9, 10, 11] and c.items[-1].finish_reason == "stop"
        assert not bus.of(Release) and not bus.of(Abort)
        assert backend.exits[Exit.FINISHED] == 1
        assert_clean(backend)

    run(main())


def test_load_estimates_count_while_the_request_runs():
    async def main():
        bus, backend, (p,), (d,) = cluster()
        c = Client(backend)
        await bus.next(Reserve, d)
        assert backend.inflight[p.identity].pending_prefill_tokens == len(PROMPT), "the prefill starts at once"
        assert not backend.inflight[d.identity].reserved_blocks
        await reserved(bus, backend, p, d, blocks=(1, 2))
        assert backend.inflight[d.identity].reserved_blocks == 2
        assert backend.inflight[p.identity].pending_prefill_tokens == len(PROMPT)
        backend.on_prefill_end(p.identity, Prefilled(req_id="r1", first=TokenOut("r1", [9])))
        await bus.next(Decode, d)
        assert backend.inflight[d.identity].active == 1 and backend.inflight[d.identity].reserved_blocks == 0
        assert backend.inflight[p.identity].pending_prefill_tokens == 0
        await c.leave()
        assert_clean(backend)

    run(main())


def test_client_gone_before_the_decode_answers_releases_behind_the_reserve_and_aborts_the_prefill():
    async def main():
        bus, backend, (p,), (d,) = cluster()
        c = Client(backend)
        reserve = await bus.next(Reserve, d)
        await c.leave()
        assert_clean(backend)
        # the Release follows the Reserve on the same pipe: the lease goes as soon as it is made
        assert [type(m) for i, m in bus.sent if i == d.identity] == [Reserve, Release]
        assert bus.of(Abort, p)[-1].req_id == "r1" and not bus.of(DestReady)
        backend.on_reserve_answer(d.identity, reserve.req_id, [1], "")  # granted after the client left
        assert bus.of(Release, d)[-1].req_id == "r1" and not bus.of(DestReady)

    run(main())


def test_client_gone_during_prefill_releases_the_lease_once_the_prefill_stops_writing():
    async def main():
        bus, backend, (p,), (d,) = cluster()
        c = Client(backend)
        await reserved(bus, backend, p, d)
        await c.leave()
        assert bus.of(Abort, p)[-1].req_id == "r1"
        assert not bus.of(Release, d), "released while the prefill may still write into the blocks"
        assert_clean(backend, orphans=1)
        backend.on_prefill_end(p.identity, Failed(req_id="r1", error="aborted", retryable=False))
        assert bus.of(Release, d)[-1].req_id == "r1"
        assert_clean(backend)

    run(main())


def test_client_gone_between_first_token_and_decode_releases_the_lease():
    async def main():
        bus, backend, (p,), (d,) = cluster()
        backend_items = []
        gen = backend.generate("r1", PROMPT, SAMPLING)
        task = asyncio.get_running_loop().create_task(gen.__anext__())
        await reserved(bus, backend, p, d)
        backend.on_prefill_end(p.identity, Prefilled(req_id="r1", first=TokenOut("r1", [9])))
        backend_items.append(await asyncio.wait_for(task, WAIT_S))
        await gen.aclose()  # the client read the first token and left
        assert backend_items[0].token_ids == [9]
        assert not bus.of(Decode) and bus.of(Release, d)[-1].req_id == "r1"
        assert_clean(backend)

    run(main())


def test_client_gone_during_decode_aborts_on_the_decode():
    async def main():
        bus, backend, (p,), (d,) = cluster()
        c = Client(backend)
        await to_decode(bus, backend, p, d)
        backend.on_tokens(d.identity, [TokenOut("r1", [10])])
        await c.leave()
        assert bus.of(Abort, d)[-1].req_id == "r1" and not bus.of(Release)
        assert backend.exits[Exit.CLIENT_GONE] == 1
        assert_clean(backend)
        backend.on_tokens(d.identity, [TokenOut("r1", [11])])  # a step already under way
        assert len(bus.of(Abort, d)) == 2, "tokens of a gone request are answered with Abort"

    run(main())


def test_prefill_refusal_is_a_400_and_releases_the_lease_at_once():
    async def main():
        bus, backend, (p,), (d,) = cluster()
        c = Client(backend)
        await reserved(bus, backend, p, d, blocks=(1, 2))
        backend.on_prefill_end(p.identity, Failed(req_id="r1", error="token id 999999 is outside the vocabulary", retryable=False))
        await c.done()
        assert isinstance(c.error, RequestRejected) and "vocabulary" in str(c.error)
        assert bus.of(Release, d)[-1].req_id == "r1", "the decode's lease must not wait for its expiry"
        assert not bus.of(Abort, p), "the prefill already dropped it"
        assert_clean(backend)

    run(main())


def test_prefill_lost_redispatches_with_the_same_lease():
    async def main():
        bus, backend, (p0, p1), (d,) = cluster(prefills=2)
        backend.pick_prefill = lambda exclude, tokens=None: next(p for p in (p0, p1) if p.identity not in exclude)
        c = Client(backend)
        await reserved(bus, backend, p0, d, blocks=(7,))
        p0.alive = False
        backend.on_instance_lost(p0, "silent")
        again = await bus.next(Prefill, p1)
        assert again.dest.block_ids == [7] and len(bus.of(Reserve)) == 1, "the block ids come with the Prefill"
        backend.on_prefill_end(p1.identity, Prefilled(req_id="r1", first=TokenOut("r1", [9])))
        await bus.next(Decode, d)
        backend.on_tokens(d.identity, [TokenOut("r1", [10], finish_reason="length")])
        await c.done()
        assert c.error is None and [t for i in c.items for t in i.token_ids] == [9, 10]
        assert_clean(backend)

    run(main())


def test_only_prefill_lost_is_a_503_and_releases_the_lease():
    async def main():
        bus, backend, (p,), (d,) = cluster()
        c = Client(backend)
        await reserved(bus, backend, p, d, blocks=(7,))
        p.alive = False
        backend.on_instance_lost(p, "silent")
        await c.done()
        assert isinstance(c.error, BackendUnavailable) and c.error.retry_after >= 1
        assert bus.of(Release, d)[-1].req_id == "r1"
        assert_clean(backend)

    run(main())


def test_transfer_failure_retries_the_prefill_then_moves_on():
    async def main():
        bus, backend, (p0, p1), (d,) = cluster(prefills=2)
        backend.pick_prefill = lambda exclude, tokens=None: next(p for p in (p0, p1) if p.identity not in exclude)
        c = Client(backend)
        await reserved(bus, backend, p0, d, blocks=(7,))
        for n in (1, 2):  # a live prefill gets a second try, then another prefill takes it
            await bus.next(Prefill, p0, n)
            backend.on_prefill_end(p0.identity, Failed(req_id="r1", error="KV transfer failed: reset", retryable=True))
        assert (await bus.next(Prefill, p1)).dest.block_ids == [7]
        backend.on_prefill_end(p1.identity, Prefilled(req_id="r1", first=TokenOut("r1", [9])))
        await bus.next(Decode, d)
        backend.on_tokens(d.identity, [TokenOut("r1", [10], finish_reason="stop")])
        await c.done()
        assert c.error is None and backend.counters["reschedules"] == 2
        assert_clean(backend)

    run(main())


def test_decode_lost_during_prefill_stops_the_prefill_and_reserves_elsewhere():
    async def main():
        bus, backend, (p,), (d0, d1) = cluster(decodes=2)
        prefer_decodes(backend, d0, d1)
        c = Client(backend)
        await reserved(bus, backend, p, d0)
        d0.alive = False
        backend.on_instance_lost(d0, "silent")
        assert (await bus.next(Abort, p)).req_id == "r1", "the prefill had the block ids: it must stop writing"
        _, prefill, dest = await reserved(bus, backend, p, d1, blocks=(2,))
        assert prefill.dest.instance_id == "d1" and dest.block_ids == [2] and dest.dest is None
        # the aborted dispatch's own answer comes first: it is not the new dispatch's refusal
        backend.on_prefill_end(p.identity, Failed(req_id="r1", error="aborted: decode lost", retryable=False))
        await finish(bus, backend, c, p, d1)

    run(main())


def test_decode_lost_mid_stream_reprefills_prompt_and_outputs_elsewhere():
    async def main():
        bus, backend, (p,), (d0, d1) = cluster(decodes=2)
        prefer_decodes(backend, d0, d1)
        c = Client(backend)
        await to_decode(bus, backend, p, d0)
        backend.on_tokens(d0.identity, [TokenOut("r1", [10])])
        d0.alive = False
        backend.on_instance_lost(d0, "silent")
        reserve, prefill, _ = await reserved(bus, backend, p, d1, blocks=(5,))
        assert reserve.num_tokens == len(PROMPT) + 2 + 1
        assert reserve.prompt_token_ids == PROMPT and reserve.output_token_ids == [9, 10]
        assert prefill.prompt_token_ids == PROMPT + [9, 10] and prefill.num_output_tokens == 2
        backend.on_prefill_end(p.identity, Prefilled(req_id="r1", first=TokenOut("r1", [11])))
        decode = await bus.next(Decode, d1)
        assert decode.first_token_id == 11
        backend.on_tokens(d1.identity, [TokenOut("r1", [12], finish_reason="stop")])
        await c.done()
        assert [t for i in c.items for t in i.token_ids] == [9, 10, 11, 12]
        assert_clean(backend)

    run(main())


def test_only_decode_lost_mid_stream_ends_the_stream_with_an_error_at_once():
    async def main():
        bus, backend, (p,), (d,) = cluster(reserve_timeout_s=30.0)
        c = Client(backend)
        await to_decode(bus, backend, p, d)
        d.alive = False
        t0 = time.monotonic()
        backend.on_instance_lost(d, "silent")
        await c.done()
        assert time.monotonic() - t0 < 1.0, "must not wait the reserve timeout for a decode that does not exist"
        assert c.items[-1].finish_reason == "error" and "no other decode" in c.items[-1].error
        assert not bus.of(Release) and not bus.of(Abort)
        assert_clean(backend)

    run(main())


def test_decode_refusing_mid_stream_ends_the_stream_with_its_error():
    async def main():
        bus, backend, (p,), (d,) = cluster()
        c = Client(backend)
        await to_decode(bus, backend, p, d)
        backend.on_decode_failed(d.identity, Failed(req_id="r1", error="sequence exceeds the cache", retryable=False))
        await c.done()
        assert c.items[-1].finish_reason == "error" and "exceeds" in c.items[-1].error
        assert not bus.of(Abort), "the decode already dropped it"
        assert_clean(backend)

    run(main())


def test_retries_exhausted_ends_with_an_error():
    async def main():
        bus, backend, (p,), (d0, d1, d2) = cluster(decodes=3, max_retries=1)
        prefer_decodes(backend, d0, d1, d2)
        c = Client(backend)
        await to_decode(bus, backend, p, d0)
        d0.alive = False
        backend.on_instance_lost(d0, "silent")
        await to_decode(bus, backend, p, d1)  # the one retry
        d1.alive = False
        backend.on_instance_lost(d1, "silent")
        await c.done()
        assert c.items[-1].finish_reason == "error" and "decode failed" in c.items[-1].error
        assert not bus.of(Reserve, d2), "no retry past --max-retries"
        assert backend.exits[Exit.RETRIES_EXHAUSTED] == 1
        assert_clean(backend)

    run(main())


def test_silent_prefill_is_a_504_and_the_lease_goes_when_the_prefill_does():
    async def main():
        bus, backend, (p,), (d,) = cluster(request_timeout_s=0.2)
        c = Client(backend)
        await reserved(bus, backend, p, d)
        await c.done()
        assert isinstance(c.error, RequestTimedOut) and "silent" in str(c.error)
        assert bus.of(Abort, p)[-1].req_id == "r1"
        assert_clean(backend, orphans=1)
        p.alive = False
        backend.on_instance_lost(p, "silent")
        assert bus.of(Release, d)[-1].req_id == "r1"
        assert_clean(backend)

    run(main())


def test_silent_decode_mid_stream_ends_with_an_error_and_aborts_it():
    async def main():
        bus, backend, (p,), (d,) = cluster(request_timeout_s=0.2)
        c = Client(backend)
        await to_decode(bus, backend, p, d)
        await c.done()
        assert c.items[-1].finish_reason == "error" and "silent" in c.items[-1].error
        assert bus.of(Abort, d)[-1].req_id == "r1"
        assert_clean(backend)

    run(main())


def test_no_decode_alive_is_a_503_at_once():
    async def main():
        bus, backend, _, _ = cluster(decodes=0, reserve_timeout_s=30.0)
        t0 = time.monotonic()
        c = await Client(backend).done()
        assert isinstance(c.error, BackendUnavailable) and time.monotonic() - t0 < 1.0
        assert_clean(backend)

    run(main())


def test_every_decode_busy_until_the_reserve_timeout_is_a_503_with_retry_after():
    async def main():
        bus, backend, (p,), (d,) = cluster(reserve_timeout_s=0.3)
        c = Client(backend)
        answered = 0

        async def busy_decode():  # the decode answers every Reserve with Busy
            nonlocal answered
            while True:
                reserve = await bus.next(Reserve, d, answered + 1)
                answered += 1
                backend.on_reserve_answer(d.identity, reserve.req_id, None, "no free blocks")

        decode = asyncio.get_running_loop().create_task(busy_decode())
        await c.done()
        decode.cancel()
        assert isinstance(c.error, BackendUnavailable) and "no decode instance has room" in str(c.error)
        assert answered >= 2
        assert bus.of(Abort, p)[-1].req_id == "r1" and not bus.of(DestReady), "the prefill started at once: stopped"
        assert_clean(backend)

    run(main())


@pytest.mark.parametrize("prompts", [1, 8])
def test_concurrent_requests_all_finish_and_leave_nothing(prompts):
    async def main():
        bus, backend, (p,), (d,) = cluster()
        clients = [Client(backend, f"r{i}") for i in range(prompts)]
        for i in range(prompts):
            reserve = next(m for m in await _all(bus, Reserve, prompts) if m.req_id == f"r{i}")
            backend.on_reserve_answer(d.identity, reserve.req_id, [i], "")
        for i in range(prompts):
            prefill = next(m for m in await _all(bus, DestReady, prompts) if m.req_id == f"r{i}")
            backend.on_prefill_end(p.identity, Prefilled(req_id=prefill.req_id, first=TokenOut(prefill.req_id, [1])))
        await _all(bus, Decode, prompts)
        backend.on_tokens(d.identity, [TokenOut(f"r{i}", [2], finish_reason="stop") for i in range(prompts)])
        for c in clients:
            await c.done()
            assert c.error is None
        assert_clean(backend)

    run(main())


async def _all(bus: FakeBus, kind, count: int) -> list:
    await bus.next(kind, count=count)
    return bus.of(kind)


# --------------------------------------------------------------------------- Reserve and Prefill sent together: the races


def test_prefill_refused_before_the_decode_answers_releases_the_lease_behind_the_reserve():
    async def main():
        bus, backend, (p,), (d,) = cluster()
        c = Client(backend)
        reserve = await bus.next(Reserve, d)
        backend.on_prefill_end(p.identity, Failed(req_id="r1", error="token id 999999 is outside the vocabulary", retryable=False))
        await c.done()
        assert isinstance(c.error, RequestRejected)
        assert [type(m) for i, m in bus.sent if i == d.identity] == [Reserve, Release], "the lease goes as soon as it is made"
        assert_clean(backend)
        backend.on_reserve_answer(d.identity, reserve.req_id, [1], "")  # the destination comes after the failure
        assert not bus.of(DestReady) and bus.of(Release, d)[-1].req_id == "r1"
        assert_clean(backend)

    run(main())


def test_busy_decode_hands_the_destination_to_another_decode():
    async def main():
        bus, backend, (p,), (d0, d1) = cluster(decodes=2)
        prefer_decodes(backend, d0, d1)
        c = Client(backend)
        reserve = await bus.next(Reserve, d0)
        assert bus.of(Prefill, p)[-1].dest.instance_id == "d0"
        backend.on_reserve_answer(d0.identity, reserve.req_id, None, "no free blocks")
        reserve = await bus.next(Reserve, d1)
        backend.on_reserve_answer(d1.identity, reserve.req_id, [4, 5], "")
        dest = await bus.next(DestReady, p)
        assert dest.block_ids == [4, 5] and dest.dest.instance_id == "d1" and dest.dest.block_ids == [4, 5]
        assert len(bus.of(Prefill)) == 1 and not bus.of(Abort), "the prefill goes on: only its destination moved"
        backend.on_prefill_end(p.identity, Prefilled(req_id="r1", first=TokenOut("r1", [9])))
        await bus.next(Decode, d1)
        backend.on_tokens(d1.identity, [TokenOut("r1", [10], finish_reason="stop")])
        await c.done()
        assert c.error is None and not bus.of(Release)
        assert_clean(backend)

    run(main())


def test_decode_lost_before_it_answers_hands_the_destination_to_another_decode():
    async def main():
        bus, backend, (p,), (d0, d1) = cluster(decodes=2)
        prefer_decodes(backend, d0, d1)
        c = Client(backend)
        await bus.next(Reserve, d0)
        d0.alive = False
        backend.on_instance_lost(d0, "silent")
        _, _, dest = await reserved(bus, backend, p, d1, blocks=(3,))
        assert dest.dest.instance_id == "d1" and not bus.of(Abort), "the prefill never had d0's blocks: it goes on"
        await finish(bus, backend, c, p, d1)

    run(main())


def test_only_decode_lost_before_it_answers_aborts_the_prefill_with_a_503():
    async def main():
        bus, backend, (p,), (d,) = cluster(reserve_timeout_s=30.0)
        c = Client(backend)
        await bus.next(Reserve, d)
        d.alive = False
        backend.on_instance_lost(d, "silent")
        await c.done()
        assert isinstance(c.error, BackendUnavailable) and "no decode" in str(c.error)
        assert bus.of(Abort, p)[-1].req_id == "r1" and not bus.of(DestReady)
        assert backend.exits[Exit.NO_CAPACITY] == 1
        assert_clean(backend)

    run(main())


def test_silent_decode_is_given_up_and_its_late_lease_released():
    async def main():
        bus, backend, (p,), (d0, d1) = cluster(decodes=2, reserve_timeout_s=0.3)
        prefer_decodes(backend, d0, d1)
        c = Client(backend)
        reserve = await bus.next(Reserve, d0)
        await bus.next(Reserve, d1)  # d0 never answered: given up
        assert [type(m) for i, m in bus.sent if i == d0.identity] == [Reserve, Release]
        backend.on_reserve_answer(d0.identity, reserve.req_id, [1], "")  # d0's answer, too late
        assert len(bus.of(Release, d0)) == 2 and not bus.of(DestReady)
        backend.on_reserve_answer(d1.identity, reserve.req_id, [2], "")
        dest = await bus.next(DestReady, p)
        assert dest.dest.instance_id == "d1" and dest.block_ids == [2]
        await finish(bus, backend, c, p, d1)

    run(main())


def test_prefill_lost_before_the_destination_redispatches_without_block_ids():
    async def main():
        bus, backend, (p0, p1), (d,) = cluster(prefills=2)
        backend.pick_prefill = lambda exclude, tokens=None: next(p for p in (p0, p1) if p.identity not in exclude)
        c = Client(backend)
        reserve = await bus.next(Reserve, d)
        p0.alive = False
        backend.on_instance_lost(p0, "silent")
        again = await bus.next(Prefill, p1)
        assert again.dest.instance_id == "d0" and again.dest.block_ids is None
        backend.on_reserve_answer(d.identity, reserve.req_id, [6], "")
        dest = await bus.next(DestReady, p1)
        assert dest.block_ids == [6] and dest.dest is None and not bus.of(DestReady, p0)
        backend.on_prefill_end(p1.identity, Prefilled(req_id="r1", first=TokenOut("r1", [9])))
        await bus.next(Decode, d)
        backend.on_tokens(d.identity, [TokenOut("r1", [10], finish_reason="stop")])
        await c.done()
        assert c.error is None and len(bus.of(Reserve)) == 1
        assert_clean(backend)

    run(main())


def test_prefill_unreachable_when_the_destination_comes_redispatches_with_the_block_ids():
    async def main():
        bus, backend, (p0, p1), (d,) = cluster(prefills=2)
        backend.pick_prefill = lambda exclude, tokens=None: next(p for p in (p0, p1) if p.identity not in exclude and p.alive)
        c = Client(backend)
        reserve = await bus.next(Reserve, d)
        p0.alive = False  # gone, not yet noticed: the DestReady cannot be sent
        backend.on_reserve_answer(d.identity, reserve.req_id, [6], "")
        again = await bus.next(Prefill, p1)
        assert again.dest.block_ids == [6]
        await finish(bus, backend, c, p1, d)

    run(main())


def test_client_gone_after_a_decode_was_lost_mid_prefill_waits_for_the_right_answer():
    async def main():
        # d0 lost while p wrote into it (abort, one stale answer due), then the client leaves
        # while p writes into d1's lease: the lease must outlive the stale answer
        bus, backend, (p,), (d0, d1) = cluster(decodes=2)
        prefer_decodes(backend, d0, d1)
        c = Client(backend)
        await reserved(bus, backend, p, d0)
        d0.alive = False
        backend.on_instance_lost(d0, "silent")
        await reserved(bus, backend, p, d1, blocks=(2,))
        await c.leave()
        assert_clean(backend, orphans=1)
        backend.on_prefill_end(p.identity, Failed(req_id="r1", error="aborted: decode lost", retryable=False))
        assert not bus.of(Release, d1), "released on the answer of the earlier dispatch"
        backend.on_prefill_end(p.identity, Failed(req_id="r1", error="aborted: client_gone", retryable=False))
        assert bus.of(Release, d1)[-1].req_id == "r1"
        assert_clean(backend)

    run(main())


@pytest.mark.parametrize("answer", ["prefilled", "failed", "lost"])
def test_client_gone_with_the_prefills_answer_unread_releases_the_lease_at_once(answer):
    """The prefill's answer (or its loss) is already queued when the client goes: the prefill
    writes no more, so the lease goes now — not after an answer that already came (found by the
    soak harness)."""

    async def main():
        bus, backend, (p,), (d,) = cluster()
        c = Client(backend)
        await reserved(bus, backend, p, d)
        if answer == "prefilled":
            backend.on_prefill_end(p.identity, Prefilled(req_id="r1", first=TokenOut("r1", [9])))
        elif answer == "failed":
            backend.on_prefill_end(p.identity, Failed(req_id="r1", error="KV transfer failed", retryable=True))
        else:
            p.alive = False
            backend.on_instance_lost(p, "silent")
        await c.leave()  # in the same loop turn: the answer is queued, unread
        assert bus.of(Release, d)[-1].req_id == "r1"
        assert not bus.of(Abort, p), "the prefill is done with it"
        assert_clean(backend)

    run(main())


def test_an_orphan_whose_prefill_never_answers_expires_on_its_own():
    async def main():
        bus, backend, (p,), (d,) = cluster(lease_s=0.2)
        c = Client(backend)
        await reserved(bus, backend, p, d)
        await c.leave()
        assert_clean(backend, orphans=1)
        deadline = time.monotonic() + 2.0  # the lease (0.2 s) past: the decode's own expiry freed the blocks
        while backend.orphans and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert_clean(backend)

    run(main())
