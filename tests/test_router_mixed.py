"""The router's mixed path, exit by exit, against the fake bus of test_router_pd (no process).

A mixed instance gets one ``Prefill`` without destination and answers with ``Tokens`` (the
first token, then every later step's). Each test walks one request (``PDBackend.submit``) to one
exit and checks the answer, the messages sent (an ``Abort`` to the instance wherever it still
holds the request, never a ``Reserve``/``Release``) and that nothing is left behind.
"""

from __future__ import annotations

import asyncio

import pytest
from test_router_pd import PROMPT, SAMPLING, FakeBus, assert_clean, run
from test_router_pd import Client as PDClient

from actors.frontend.server import BackendUnavailable, RequestRejected, RequestTimedOut
from actors.router.pd import Exit, PDBackend
from pdbus.messages import Abort, Failed, Load, Prefill, Release, Reserve, TokenOut
from pdbus.sockets import PeerUnreachable


def Client(backend: PDBackend, req_id: str = "r1"):
    """The fake bus's client, iterating ``submit`` (the router's choice of path)."""
    return PDClient(backend, req_id, via="submit")


def mixed(n: int = 1, prefills: int = 0, decodes: int = 0, **kw):
    bus = FakeBus()
    ms = [bus.add("mixed", f"m{i}") for i in range(n)]
    ps = [bus.add("prefill", f"p{i}") for i in range(prefills)]
    ds = [bus.add("decode", f"d{i}") for i in range(decodes)]
    return bus, PDBackend(bus, **{"reserve_timeout_s": 1.0, "request_timeout_s": 5.0, **kw}), ms, ps, ds


def tokens(c: Client) -> list[int]:
    return [t for i in c.items for t in i.token_ids]


def test_mixed_request_is_one_prefill_without_destination_answered_by_tokens():
    async def main():
        bus, backend, (m,), _, _ = mixed()
        assert backend.ready()
        c = Client(backend)
        prefill = await bus.next(Prefill, m)
        assert prefill.dest is None and prefill.prompt_token_ids == PROMPT and prefill.sampling == SAMPLING
        assert backend.inflight[m.identity].active == 1  # counted while it runs
        backend.on_tokens(m.identity, [TokenOut("r1", [9])])  # the first token: same engine
        backend.on_tokens(m.identity, [TokenOut("r1", [10]), TokenOut("other", [1], finish_reason="stop")])
        backend.on_tokens(m.identity, [TokenOut("r1", [11], finish_reason="length")])
        await c.done()
        assert c.error is None and tokens(c) == [9, 10, 11] and c.items[-1].finish_reason == "length"
        assert not bus.of(Reserve) and not bus.of(Release) and not bus.of(Abort)
        assert backend.exits[Exit.FINISHED] == 1
        assert_clean(backend)

    run(main())


@pytest.mark.parametrize("after_tokens", [False, True], ids=["before-first-token", "mid-stream"])
def test_mixed_client_gone_aborts_on_the_instance(after_tokens):
    async def main():
        bus, backend, (m,), _, _ = mixed()
        c = Client(backend)
        await bus.next(Prefill, m)
        if after_tokens:
            backend.on_tokens(m.identity, [TokenOut("r1", [9])])
            while not c.items:
                await asyncio.sleep(0)
        await c.leave()
        (abort,) = bus.of(Abort, m)
        assert abort.req_id == "r1" and abort.reason == Exit.CLIENT_GONE.value
        assert backend.exits[Exit.CLIENT_GONE] == 1
        assert_clean(backend)
        backend.on_tokens(m.identity, [TokenOut("r1", [12])])  # a step already under way
        assert len(bus.of(Abort, m)) == 2  # answered with another abort, never delivered

    run(main())


def test_mixed_refusal_is_a_400():
    async def main():
        bus, backend, (m,), _, _ = mixed()
        c = Client(backend)
        await bus.next(Prefill, m)
        backend.on_decode_failed(m.identity, Failed(req_id="r1", error="token id 999 outside the vocabulary (100)"))
        await c.done()
        assert isinstance(c.error, RequestRejected) and "vocabulary" in str(c.error)
        assert not bus.of(Abort)  # it dropped the request itself
        assert backend.exits[Exit.PREFILL_REFUSED] == 1
        assert_clean(backend)

    run(main())


def test_mixed_instance_lost_before_the_first_token_is_a_503():
    async def main():
        bus, backend, (m,), _, _ = mixed()
        c = Client(backend)
        await bus.next(Prefill, m)
        m.alive = False
        backend.on_instance_lost(m, "silent for 3 heartbeats")
        await c.done()
        assert isinstance(c.error, BackendUnavailable) and "m0 lost" in str(c.error)
        assert backend.exits[Exit.INSTANCE_LOST] == 1
        assert not backend.ready()
        assert_clean(backend)

    run(main())


def test_mixed_instance_lost_mid_stream_ends_the_stream_with_an_error_event():
    async def main():
        bus, backend, (m,), _, _ = mixed()
        c = Client(backend)
        await bus.next(Prefill, m)
        backend.on_tokens(m.identity, [TokenOut("r1", [9])])
        m.alive = False
        backend.on_instance_lost(m, "connection lost")
        await c.done()
        assert c.error is None and tokens(c) == [9]
        assert c.items[-1].finish_reason == "error" and "m0 lost" in c.items[-1].error
        assert backend.exits[Exit.INSTANCE_LOST] == 1
        assert_clean(backend)

    run(main())


@pytest.mark.parametrize("after_tokens", [False, True], ids=["before-first-token", "mid-stream"])
def test_mixed_instance_silent_is_a_504_and_aborts_it(after_tokens):
    async def main():
        bus, backend, (m,), _, _ = mixed(request_timeout_s=0.2)
        c = Client(backend)
        await bus.next(Prefill, m)
        if after_tokens:
            backend.on_tokens(m.identity, [TokenOut("r1", [9])])
        await c.done()
        if after_tokens:
            assert c.error is None and c.items[-1].finish_reason == "error" and "silent" in c.items[-1].error
        else:
            assert isinstance(c.error, RequestTimedOut) and "silent" in str(c.error)
        assert bus.of(Abort, m)[-1].reason == Exit.TIMEOUT.value
        assert backend.exits[Exit.TIMEOUT] == 1
        assert_clean(backend)

    run(main())


def test_mixed_instance_unreachable_is_a_503():
    async def main():
        bus, backend, (m,), _, _ = mixed()

        def send(ident, msg):  # gone from the socket before the router noticed
            raise PeerUnreachable(f"{ident!r} unreachable")

        bus.send = send
        c = Client(backend)
        await c.done()
        assert isinstance(c.error, BackendUnavailable)
        assert_clean(backend)

    run(main())


def test_router_chooses_mixed_without_a_pair_and_pd_with_an_idle_pair():
    async def main():
        # no pair: the mixed instance, however loaded
        bus, backend, (m,), _, (d,) = mixed(decodes=1)
        m.load = Load(running=50, free_blocks=10, total_blocks=100)
        assert backend.pick_mixed() is m
        # a pair whose decode is idle beats a busy mixed instance; an idle mixed one wins ties
        bus, backend, (m,), (p,), (d,) = mixed(prefills=1, decodes=1)
        m.load = Load(running=5, free_blocks=50, total_blocks=100)
        assert backend.pick_mixed() is None
        c = Client(backend)
        await bus.next(Reserve, d)
        assert not bus.of(Prefill, m)
        await c.leave()
        m.load = Load(free_blocks=100, total_blocks=100)
        assert backend.pick_mixed() is m
        assert_clean(backend)
        # the least loaded of several mixed instances
        bus, backend, (m0, m1), _, _ = mixed(n=2)
        m0.load = Load(running=3)
        assert backend.pick_mixed() is m1

    run(main())


def test_concurrent_mixed_requests_all_finish_and_leave_nothing():
    async def main():
        bus, backend, (m0, m1), _, _ = mixed(n=2)
        clients = [Client(backend, f"r{i}") for i in range(8)]
        for n in range(1, 9):
            await asyncio.wait_for(_until(lambda n=n: len(bus.of(Prefill)) >= n), 2.0)
        by_inst = {p.req_id: i for i, p in bus.sent if isinstance(p, Prefill)}
        assert set(by_inst.values()) == {m0.identity, m1.identity}  # spread by load
        for req_id, ident in by_inst.items():
            backend.on_tokens(ident, [TokenOut(req_id, [1])])
            backend.on_tokens(ident, [TokenOut(req_id, [2], finish_reason="stop")])
        for c in clients:
            await c.done()
            assert c.error is None and tokens(c) == [1, 2]
        assert backend.exits[Exit.FINISHED] == 8
        assert_clean(backend)

    run(main())


async def _until(pred):
    while not pred():
        await asyncio.sleep(0)
