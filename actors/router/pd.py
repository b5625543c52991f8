"""The router's PD orchestration: pair a prefill with a decode and walk a request through them.

``PDBackend.generate`` is what the OpenAI frontend iterates for each choice. A request is a
:class:`Flow` whose phase moves RESERVE -> PREFILL -> DECODE -> DONE (a decode lost mid-stream
sends it back to RESERVE with prompt + tokens so far):

1. RESERVE: pick a decode (most free KV blocks, fewest running; power of two choices) and ask it
   to lease blocks for the prompt. ``Busy`` everywhere: retry while a decode that could take the
   request is alive, until ``reserve_timeout_s`` (503 + Retry-After); no decode alive: 503 at once.
2. PREFILL: pick a prefill (fewest pending prefill tokens) and the transfer protocol for the
   pair (the prefill's first choice that the decode offers; ``ipc`` only on one host); the
   prefill writes the KV into the leased blocks and answers ``Prefilled(first token)``. A prefill
   that dies or fails retryably is replaced by another, same lease.
3. DECODE: the first token is yielded at once (TTFT), then ``Decode`` starts the decode; its
   ``Tokens`` messages are demultiplexed to the request. A decode that dies mid-stream is
   replaced: prompt + tokens so far are re-prefilled onto another decode (bounded retries).

A mixed instance (``pdbus serve`` in the mixed role: prefill and decode in one engine) is driven
by :meth:`PDBackend.generate_mixed`: one ``Prefill`` without destination, answered by ``Tokens``
(the first token, then every later step's) from the same engine; the flow holds that instance as
its decode from the start. :meth:`PDBackend.submit` chooses the path: a mixed instance when no
prefill + decode pair is alive, or when one is less loaded than the best decode.

The flow records what it holds, not only where it is: the decode lease and the blocks charged to
that decode's estimate, the prefill that may still be writing into the lease and the prompt
tokens charged to it, the decode running the sequence. Every way out — finished, client gone,
prefill refuses, prefill or decode lost, transfer failed, timeout, retries exhausted, no
capacity — goes through :meth:`PDBackend._close`, which gives back exactly what is still held:
it tells every instance that holds the request to drop it, releases the lease (only once its
prefill is done writing or dead: until then the lease waits in ``orphans``, so no block is freed
while bytes may still land in it) and puts the router's load estimates back.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from dataclasses import dataclass, field

from actors.frontend.server import BackendUnavailable, RequestRejected, RequestTimedOut
from pdbus.actor import Peer
from pdbus.log import get_logger
from pdbus.messages import (
    Abort,
    Decode,
    Destination,
    Endpoint,
    Failed,
    Prefill,
    Prefilled,
    Release,
    Reserve,
    SamplingParams,
    TokenOut,
    TransferProtocol,
)
from pdbus.sockets import BusError

log = get_logger("router.pd")


class Phase(enum.Enum):
    RESERVE = "reserve"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


class Exit(enum.Enum):
    """How a request left the router (``PDBackend.exits`` counts them)."""

    FINISHED = "finished"
    CLIENT_GONE = "client_gone"
    PREFILL_REFUSED = "prefill_refused"
    DECODE_FAILED = "decode_failed"  # the decode refused the request for good
    RETRIES_EXHAUSTED = "retries_exhausted"
    INSTANCE_LOST = "instance_lost"  # the mixed instance running the request died
    NO_CAPACITY = "no_capacity"
    TIMEOUT = "timeout"


@dataclass
class InstanceLost:
    identity: bytes
    reason: str


@dataclass
class InstanceLoad:
    """What the router dispatched to an instance since it last reported."""

    pending_prefill_tokens: int = 0
    active: int = 0
    reserved_blocks: int = 0

    def idle(self) -> bool:
        return not (self.pending_prefill_tokens or self.active or self.reserved_blocks)


@dataclass
class Flow:
    """One request inside the router, and what it holds on the instances."""

    req_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    phase: Phase = Phase.RESERVE
    decode: bytes | None = None  # holds a lease for the request (runs it once ``decoding``)
    lease_blocks: int = 0  # blocks charged to the decode's estimate until Decode or release
    decoding: bool = False  # Decode sent: the decode runs the sequence (abort, not release)
    prefill: bytes | None = None  # may still be writing into the lease
    prefill_tokens: int = 0  # charged to the prefill's pending estimate
    prefill_over: bool = False  # its answer (or its loss) arrived: it writes no more, even if unread
    exit: Exit | None = None


@dataclass
class Orphan:
    """A lease whose request ended while its prefill may still write into it."""

    prefill: bytes
    decode: bytes
    since: float = field(default_factory=time.monotonic)


class _Ended(Exception):
    """A request's end other than finishing, with the HTTP answer it maps to."""

    def __init__(self, how: Exit, message: str, retry_after: int = 5):
        super().__init__(message)
        self.how, self.message, self.retry_after = how, message, retry_after

    def as_http(self) -> Exception:
        if self.how in (Exit.PREFILL_REFUSED, Exit.DECODE_FAILED):
            return RequestRejected(self.message)
        if self.how is Exit.TIMEOUT:
            return RequestTimedOut(self.message)
        return BackendUnavailable(self.message, retry_after=self.retry_after)


async def wait_bounded(aw, timeout: float):
    """``await aw`` for at most ``timeout`` seconds (``asyncio.TimeoutError`` after). Unlike
    ``asyncio.wait_for`` before Python 3.12, a cancellation that races with ``aw`` completing is
    never swallowed: a client that goes away is always seen."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    finally:
        if not task.done():
            task.cancel()
    if not done:
        raise TimeoutError
    return task.result()


class PDBackend:
    def __init__(
        self,
        bus,
        reserve_timeout_s: float = 30.0,
        request_timeout_s: float = 600.0,
        max_retries: int = 2,
        lease_s: float = 30.0,
    ):
        self.bus = bus  # RouterBus (or a fake with .peers, .send, .peer_name)
        self.reserve_timeout_s = reserve_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.lease_s = lease_s
        self.reqs: dict[str, Flow] = {}
        self.reserve_waiters: dict[str, tuple[asyncio.Future, bytes]] = {}
        self.orphans: dict[str, Orphan] = {}
        self.inflight: dict[bytes, InstanceLoad] = {}
        self.counters = {"reschedules": 0, "failures": 0, "busy": 0, "transfer_bytes": 0, "transfer_seconds": 0.0}
        self.exits = {e: 0 for e in Exit}

    # ----------------------------------------------------------------- choice
    def _alive(self, role: str) -> list[Peer]:
        return [p for p in self.bus.peers.values() if p.alive and p.hello.role == role]

    def ready(self) -> bool:
        return (bool(self._alive("prefill")) and bool(self._alive("decode"))) or bool(self._alive("mixed"))

    def _load(self, ident: bytes) -> InstanceLoad:
        return self.inflight.setdefault(ident, InstanceLoad())

    def _uncharge(self, ident: bytes | None, **amounts: int) -> None:
        """Take back what was charged to an instance (nothing once it is gone: its entry went with it)."""
        load = self.inflight.get(ident)
        if load is not None:
            for name, n in amounts.items():
                setattr(load, name, getattr(load, name) - n)

    def pick_decode(self, exclude: set[bytes]) -> Peer | None:
        cands = [p for p in self._alive("decode") if p.identity not in exclude]
        if len(cands) > 2:
            cands = random.sample(cands, 2)

        def score(p: Peer):
            mine = self._load(p.identity)
            return (p.load.free_blocks - mine.reserved_blocks, -(p.load.running + mine.active))

        return max(cands, key=score, default=None)

    def pick_mixed(self) -> Peer | None:
        """The mixed instance for the next request (power of two choices on running + waiting,
        its own heartbeat's and what the router dispatched since), or None for the PD path: no
        mixed instance, or a prefill + decode pair whose best decode is less loaded."""
        cands = self._alive("mixed")
        if len(cands) > 2:
            cands = random.sample(cands, 2)

        def busy(p: Peer) -> int:
            return p.load.running + p.load.waiting + self._load(p.identity).active

        best = min(cands, key=busy, default=None)
        if best is None or not (self._alive("prefill") and self._alive("decode")):
            return best
        decode = self.pick_decode(set())
        return best if decode is None or busy(best) <= busy(decode) else None

    async def submit(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams):
        """The request's stream: on a mixed instance or through a prefill + decode pair, chosen
        when the stream starts (after the requests before it were charged to their instances)."""
        mixed = self.pick_mixed()
        if mixed is not None:
            gen = self.generate_mixed(req_id, prompt_ids, sampling, mixed)
        else:
            gen = self.generate(req_id, prompt_ids, sampling)
        try:
            async for item in gen:
                yield item
        finally:
            await gen.aclose()

    def pick_prefill(self, exclude: set[bytes]) -> Peer | None:
        cands = [p for p in self._alive("prefill") if p.identity not in exclude]
        if len(cands) > 2:
            cands = random.sample(cands, 2)
        return min(cands, key=lambda p: self._load(p.identity).pending_prefill_tokens, default=None)

    @staticmethod
    def choose_protocol(prefill: Peer, decode: Peer) -> tuple[TransferProtocol, Endpoint] | None:
        """The first of the prefill's protocols that the decode offers and that applies."""
        for proto, mine in prefill.hello.transfer.items():
            ep = decode.hello.transfer.get(proto)
            if ep is None:
                continue
            if proto == TransferProtocol.IPC and ep.host_id != mine.host_id:
                continue  # ipc needs one host
            return proto, ep
        return None

    # ----------------------------------------------------------------- what a flow holds
    def _hold_lease(self, flow: Flow, decode: bytes, blocks: int) -> None:
        flow.decode, flow.lease_blocks, flow.decoding = decode, blocks, False
        self._load(decode).reserved_blocks += blocks

    def _drop_lease_charge(self, flow: Flow) -> None:
        if flow.lease_blocks:
            self._uncharge(flow.decode, reserved_blocks=flow.lease_blocks)
        flow.lease_blocks = 0

    def _start_prefill(self, flow: Flow, prefill: bytes, tokens: int) -> None:
        flow.prefill, flow.prefill_tokens, flow.prefill_over = prefill, tokens, False
        self._load(prefill).pending_prefill_tokens += tokens

    def _prefill_ended(self, flow: Flow) -> None:
        """The prefill answered (or died): it writes no more into the lease."""
        if flow.prefill is not None:
            self._uncharge(flow.prefill, pending_prefill_tokens=flow.prefill_tokens)
        flow.prefill, flow.prefill_tokens = None, 0

    def _start_decode(self, flow: Flow) -> None:
        self._drop_lease_charge(flow)  # the decode's own heartbeat counts the blocks from now on
        flow.decoding = True
        self._load(flow.decode).active += 1

    def _decode_ended(self, flow: Flow) -> None:
        """The decode holds nothing more for the request (it finished, dropped it, or died)."""
        self._drop_lease_charge(flow)
        if flow.decoding:
            self._uncharge(flow.decode, active=1)
        flow.decode, flow.decoding = None, False

    def _close(self, flow: Flow, how: Exit) -> None:
        """The one way out: give back everything the flow still holds, exactly once."""
        if flow.phase is Phase.DONE:
            return
        waiter = self.reserve_waiters.pop(flow.req_id, None)
        if waiter is not None:
            waiter[0].cancel()  # a lease granted later is released by on_reserve_answer
        if flow.decode is not None:
            if flow.decoding:
                self._send(flow.decode, Abort(req_id=flow.req_id, reason=how.value))
            elif flow.prefill is not None and not flow.prefill_over:
                # the prefill may still write into the lease: release it once the prefill is done
                self.orphans[flow.req_id] = Orphan(flow.prefill, flow.decode)
                asyncio.get_running_loop().call_later(self.lease_s + 0.01, self._expire_orphans)
            else:
                self._send(flow.decode, Release(req_id=flow.req_id))
        if flow.prefill is not None and not flow.prefill_over:
            self._send(flow.prefill, Abort(req_id=flow.req_id, reason=how.value))
        self._prefill_ended(flow)
        self._decode_ended(flow)
        flow.phase, flow.exit = Phase.DONE, how
        self.exits[how] += 1
        if self.reqs.get(flow.req_id) is flow:
            del self.reqs[flow.req_id]
        self._expire_orphans()

    def _expire_orphans(self) -> None:
        """An orphan whose prefill never answered: the decode's lease has expired on its own."""
        if not self.orphans:
            return
        cutoff = time.monotonic() - self.lease_s
        for req_id in [r for r, o in self.orphans.items() if o.since <= cutoff]:
            del self.orphans[req_id]

    # ----------------------------------------------------------------- bus events
    def on_reserve_answer(self, ident: bytes, req_id: str, block_ids: list[int] | None, reason: str) -> None:
        waiter = self.reserve_waiters.get(req_id)
        if waiter is not None and waiter[1] == ident and not waiter[0].done():
            del self.reserve_waiters[req_id]
            waiter[0].set_result((block_ids, reason))
        elif block_ids is not None:
            # the waiter gave up on this decode (timeout / client gone): give the lease back
            self._send(ident, Release(req_id=req_id))

    def on_prefill_end(self, ident: bytes, msg: Prefilled | Failed) -> None:
        if isinstance(msg, Prefilled):
            self.counters["transfer_bytes"] += msg.transfer_bytes
            self.counters["transfer_seconds"] += msg.transfer_s
        orphan = self.orphans.get(msg.req_id)
        if orphan is not None and orphan.prefill == ident:
            del self.orphans[msg.req_id]
            self._send(orphan.decode, Release(req_id=msg.req_id))
            return
        flow = self.reqs.get(msg.req_id)
        if flow is not None and flow.prefill == ident:
            flow.prefill_over = True
            flow.queue.put_nowait(msg)

    def on_decode_failed(self, ident: bytes, msg: Failed) -> None:
        flow = self.reqs.get(msg.req_id)
        if flow is not None and flow.decode == ident:
            flow.queue.put_nowait(msg)

    def on_tokens(self, ident: bytes, items: list[TokenOut]) -> None:
        for item in items:
            flow = self.reqs.get(item.req_id)
            if flow is not None and flow.decode == ident and flow.decoding:
                flow.queue.put_nowait(item)
            elif item.finish_reason is None:
                self._send(ident, Abort(req_id=item.req_id, reason="request gone"))

    def on_instance_lost(self, peer: Peer, reason: str) -> None:
        for flow in self.reqs.values():
            if peer.identity in (flow.prefill, flow.decode):
                flow.prefill_over = flow.prefill_over or flow.prefill == peer.identity
                flow.queue.put_nowait(InstanceLost(peer.identity, f"{peer.name} lost: {reason}"))
            waiter = self.reserve_waiters.get(flow.req_id)
            if waiter is not None and waiter[1] == peer.identity and not waiter[0].done():
                del self.reserve_waiters[flow.req_id]
                waiter[0].set_result((None, f"{peer.name} lost"))
        for req_id, orphan in list(self.orphans.items()):
            if orphan.prefill == peer.identity:  # the writer is gone: the lease can go
                del self.orphans[req_id]
                self._send(orphan.decode, Release(req_id=req_id))
            elif orphan.decode == peer.identity:  # the blocks are gone with their owner
                del self.orphans[req_id]
        self.inflight.pop(peer.identity, None)

    def _send(self, ident: bytes | None, msg) -> bool:
        if ident is None:
            return False
        try:
            self.bus.send(ident, msg)
            return True
        except BusError as exc:
            log.warning("req %s: send %s to %s failed: %s", getattr(msg, "req_id", "-"), type(msg).__name__, self.bus.peer_name(ident), exc)
            return False

    # ----------------------------------------------------------------- the walk
    async def generate(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams):
        flow = Flow(req_id)
        self.reqs[req_id] = flow
        outputs: list[int] = []
        retries = 0
        lost_decodes: set[bytes] = set()
        try:
            while True:
                flow.phase = Phase.RESERVE
                tokens = prompt_ids + outputs
                decode, block_ids = await self._reserve(flow, len(tokens) + 1, lost_decodes, rescheduled=retries > 0)
                flow.phase = Phase.PREFILL
                first = await self._prefill(flow, decode, block_ids, tokens, len(outputs), sampling)
                if first is None:  # the decode was lost during the prefill
                    retries += 1
                    lost_decodes.add(decode.identity)
                    if retries > self.max_retries:
                        raise _Ended(Exit.RETRIES_EXHAUSTED, "decode instances keep failing")
                    continue
                outputs.extend(first.token_ids)
                flow.phase = Phase.DECODE
                yield first
                self._start_decode(flow)
                ev = None
                if not self._send(decode.identity, Decode(req_id, prompt_ids, list(outputs), sampling)):
                    ev = InstanceLost(decode.identity, f"{decode.name} unreachable")
                while ev is None:
                    ev = await self._next(flow, f"decode on {decode.name}")
                    if isinstance(ev, TokenOut):
                        outputs.extend(ev.token_ids)
                        if ev.finish_reason is not None:
                            self._decode_ended(flow)  # the decode freed the sequence itself
                            self._close(flow, Exit.FINISHED)
                            yield ev
                            return
                        yield ev
                        ev = None
                    elif isinstance(ev, Failed) and not ev.retryable:
                        self._decode_ended(flow)  # the decode dropped it
                        raise _Ended(Exit.DECODE_FAILED, ev.error)
                    elif isinstance(ev, InstanceLost) and ev.identity != decode.identity:
                        ev = None  # the prefill that is done with this request died: not ours
                    elif not isinstance(ev, (InstanceLost, Failed)):
                        ev = None  # a late answer of that prefill
                why = ev.reason if isinstance(ev, InstanceLost) else ev.error
                self._decode_ended(flow)  # lost (its blocks died with it) or it dropped the sequence
                retries += 1
                self.counters["reschedules"] += 1
                lost_decodes.add(decode.identity)
                if retries > self.max_retries:
                    raise _Ended(Exit.RETRIES_EXHAUSTED, f"decode failed: {why}")
                log.warning("req %s: decode failed (%s); re-prefilling %d tokens elsewhere", req_id, why, len(prompt_ids) + len(outputs))
        except _Ended as end:
            self.counters["failures"] += 1
            self._close(flow, end.how)
            log.info("req %s: %s: %s", req_id, end.how.value, end.message)
            if outputs:  # the client already has tokens: end its stream with an error event
                yield TokenOut(req_id, [], finish_reason="error", error=end.message)
                return
            raise end.as_http() from None
        finally:
            self._close(flow, Exit.CLIENT_GONE)  # a no-op unless the client left mid-way

    async def generate_mixed(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams, inst: Peer):
        """Run the request on mixed instance ``inst``: ``Prefill`` without destination, then its
        ``Tokens``. Exits: finished; the instance refuses (400, or an error event after tokens);
        it is lost or silent past the request timeout (503 / 504, or an error event after tokens);
        the client goes (``Abort`` to the instance). All through ``_close``."""
        flow = Flow(req_id)
        self.reqs[req_id] = flow
        outputs = 0
        try:
            flow.phase = Phase.PREFILL
            flow.decode = inst.identity  # it runs the sequence from the first token on
            self._start_decode(flow)
            if not self._send(inst.identity, Prefill(req_id=req_id, prompt_token_ids=prompt_ids, sampling=sampling)):
                self._decode_ended(flow)  # nothing reached it
                raise _Ended(Exit.INSTANCE_LOST, f"{inst.name} unreachable", retry_after=1)
            while True:
                ev = await self._next(flow, f"mixed instance {inst.name}")
                if isinstance(ev, TokenOut):
                    outputs += len(ev.token_ids)
                    flow.phase = Phase.DECODE
                    if ev.finish_reason is not None:
                        self._decode_ended(flow)  # the instance freed the sequence itself
                        self._close(flow, Exit.FINISHED)
                        yield ev
                        return
                    yield ev
                elif isinstance(ev, Failed):
                    self._decode_ended(flow)  # it dropped the request
                    raise _Ended(Exit.PREFILL_REFUSED if not outputs else Exit.DECODE_FAILED, ev.error)
                elif isinstance(ev, InstanceLost) and ev.identity == inst.identity:
                    self._decode_ended(flow)  # its sequences died with it
                    raise _Ended(Exit.INSTANCE_LOST, ev.reason, retry_after=1)
        except _Ended as end:
            self.counters["failures"] += 1
            self._close(flow, end.how)
            log.info("req %s: %s: %s", req_id, end.how.value, end.message)
            if outputs:  # the client already has tokens: end its stream with an error event
                yield TokenOut(req_id, [], finish_reason="error", error=end.message)
                return
            raise end.as_http() from None
        finally:
            self._close(flow, Exit.CLIENT_GONE)  # a no-op unless the client left mid-way

    async def _next(self, flow: Flow, what: str):
        try:
            return await wait_bounded(flow.queue.get(), self.request_timeout_s)
        except TimeoutError:
            raise _Ended(Exit.TIMEOUT, f"{what} silent for {self.request_timeout_s:g}s") from None

    async def _reserve(self, flow: Flow, num_tokens: int, lost: set[bytes], rescheduled: bool) -> tuple[Peer, list[int]]:
        deadline = time.monotonic() + self.reserve_timeout_s
        busy_seen: set[bytes] = set()
        delay = 0.01
        while True:
            if not any(p.identity not in lost for p in self._alive("decode")):
                what = "no other decode instance is alive" if rescheduled else "no decode instance is alive"
                raise _Ended(Exit.NO_CAPACITY, what, retry_after=5)
            decode = self.pick_decode(lost | busy_seen)
            if decode is None:  # every live decode said Busy: wait a bit and ask again
                busy_seen.clear()
                self.counters["busy"] += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Ended(
                        Exit.NO_CAPACITY,
                        f"no decode instance has room for {num_tokens} tokens (waited {self.reserve_timeout_s:g}s)",
                        retry_after=max(1, int(self.reserve_timeout_s / 10)),
                    )
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.5)
                continue
            fut = asyncio.get_running_loop().create_future()
            self.reserve_waiters[flow.req_id] = (fut, decode.identity)
            if not self._send(decode.identity, Reserve(req_id=flow.req_id, num_tokens=num_tokens, lease_s=self.lease_s)):
                self.reserve_waiters.pop(flow.req_id, None)
                busy_seen.add(decode.identity)
                continue
            try:
                block_ids, _reason = await wait_bounded(fut, max(0.1, min(5.0, deadline - time.monotonic())))
            except TimeoutError:
                self.reserve_waiters.pop(flow.req_id, None)  # a late grant is released on arrival
                busy_seen.add(decode.identity)
                continue
            if block_ids is None:
                busy_seen.add(decode.identity)
                continue
            self._hold_lease(flow, decode.identity, len(block_ids))
            return decode, block_ids

    async def _prefill(
        self, flow: Flow, decode: Peer, block_ids: list[int], tokens: list[int], num_outputs: int, sampling
    ) -> TokenOut | None:
        """Prefill ``tokens`` into ``block_ids`` of ``decode``; None if the decode is lost meanwhile."""
        tried: set[bytes] = set()
        failures: dict[bytes, int] = {}
        while True:
            prefill = self.pick_prefill(tried)
            if prefill is None:
                what = "no prefill instance is alive" if not tried else "no prefill instance could take the request"
                raise _Ended(Exit.NO_CAPACITY, what, retry_after=5)
            choice = self.choose_protocol(prefill, decode)
            if choice is None:
                tried.add(prefill.identity)
                continue
            proto, endpoint = choice
            self._start_prefill(flow, prefill.identity, len(tokens))
            sent = self._send(
                prefill.identity,
                Prefill(
                    req_id=flow.req_id,
                    prompt_token_ids=tokens,
                    sampling=sampling,
                    dest=Destination(decode.hello.instance_id, proto, endpoint, block_ids, decode.hello.kv),
                    num_output_tokens=num_outputs,
                ),
            )
            if not sent:
                self._prefill_ended(flow)  # nothing reached it
                tried.add(prefill.identity)
                continue
            ev = await self._next(flow, f"prefill on {prefill.name}")
            while isinstance(ev, InstanceLost) and ev.identity not in (prefill.identity, decode.identity):
                ev = await self._next(flow, f"prefill on {prefill.name}")  # about an earlier attempt
            if isinstance(ev, InstanceLost) and ev.identity == decode.identity:
                # the decode died: its blocks are gone; stop the prefill writing into them
                self._send(prefill.identity, Abort(req_id=flow.req_id, reason="decode lost"))
                self._prefill_ended(flow)
                self._decode_ended(flow)
                return None
            self._prefill_ended(flow)  # it answered or died: it writes no more
            if isinstance(ev, Prefilled):
                return ev.first
            if isinstance(ev, Failed) and not ev.retryable:
                raise _Ended(Exit.PREFILL_REFUSED, ev.error)
            why = ev.reason if isinstance(ev, InstanceLost) else getattr(ev, "error", "?")
            self.counters["reschedules"] += 1
            log.warning("req %s: prefill on %s failed (%s); re-dispatching", flow.req_id, prefill.name, why)
            failures[prefill.identity] = failures.get(prefill.identity, 0) + 1
            # a live prefill gets a second try (a transfer can fail once on a stale connection)
            if isinstance(ev, InstanceLost) or failures[prefill.identity] >= 2:
                tried.add(prefill.identity)

    def stats(self) -> dict:
        out = dict(self.counters, requests=len(self.reqs), orphans=len(self.orphans))
        out.update({f"exit_{e.value}": n for e, n in self.exits.items()})
        return out
