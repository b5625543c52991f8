"""The router's PD orchestration: pair a prefill with a decode and walk a request through them.

``PDBackend.generate`` is what the OpenAI frontend iterates for each choice. A request is a
:class:`Flow` whose phase moves RESERVE -> PREFILL -> DECODE -> DONE (a decode lost mid-stream
sends it back to RESERVE with prompt + tokens so far):

1. RESERVE: pick a decode and a prefill (``Routing``, actors/router/cache_index.py: by default
   the ones whose prefix caches most likely hold the prompt's longest prefix, unless much busier
   than the least loaded) and the transfer protocol for the pair (the prefill's first
   choice that the decode offers; ``ipc`` only on one host), and send both at once: ``Reserve``
   (tokens needed, the prompt and sampling, kept with the lease) to the decode, ``Prefill``
   (prompt, destination without block ids) to the prefill, which starts computing.
   ``Busy`` (or a decode silent for 5 s, or lost): ask another decode that the prefill can
   reach, retrying while one that could take the request is alive, until ``reserve_timeout_s``
   (503 + Retry-After, the prefill aborted); no decode alive: 503 at once.
2. PREFILL: the decode's block ids go to the prefill (``DestReady``, with the whole destination
   when another decode took the request, and how many leading blocks the decode's own prefix
   cache holds already: not written); the prefill needs them only for its last chunk, writes
   the KV into the leased blocks and answers ``Prefilled(first token)``. A prefill that dies or
   fails retryably is replaced by another, same lease (or same pending reservation).
3. DECODE: the first token is yielded at once (TTFT), then ``Decode(token one)`` starts the
   decode; its ``Tokens`` messages are demultiplexed to the request. A decode that dies
   mid-stream is replaced: prompt + tokens so far are re-prefilled onto another decode (bounded
   retries).

A mixed instance (``pdbus serve`` in the mixed role: prefill and decode in one engine) is driven
by :meth:`PDBackend.generate_mixed`: one ``Prefill`` without destination, answered by ``Tokens``
(the first token, then every later step's) from the same engine; the flow holds that instance as
its decode from the start. :meth:`PDBackend.submit` chooses the path: a mixed instance when no
prefill + decode pair is alive, or when one is less loaded than the best decode.

The flow records what it holds, not only where it is: the decode asked for a lease and not yet
answered, the decode lease and the blocks charged to that decode's estimate, the prefill and
whether it knows the block ids (only then may it write into the lease), the prompt tokens
charged to it, the decode running the sequence. Every way out — finished, client gone,
prefill refuses, prefill or decode lost, transfer failed, timeout, retries exhausted, no
capacity — goes through :meth:`PDBackend._close`, which gives back exactly what is still held:
it tells every instance that holds the request to drop it, releases the lease (a pending one too:
the ``Release`` follows the ``Reserve`` on the same pipe; a lease whose prefill has its block ids
only once that prefill is done writing or dead: until then it waits in ``orphans``, so no block
is freed while bytes may still land in it) and puts the router's load estimates back.
"""

from __future__ import annotations

import asyncio
import time

from actors.router.cache_index import Routing, block_bytes
from actors.router.flow import (
    Ended,
    Exit,
    Flow,
    InstanceLoad,
    InstanceLost,
    Orphan,
    Phase,
    ReserveAnswer,
    next_event,
)
from pdbus.actor import Peer
from pdbus.log import get_logger
from pdbus.messages import (
    Abort,
    Decode,
    Destination,
    DestReady,
    Endpoint,
    Failed,
    FinishReason,
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


class PDBackend:
    def __init__(
        self,
        bus,
        reserve_timeout_s: float = 30.0,
        request_timeout_s: float = 600.0,
        max_retries: int = 2,
        lease_s: float = 30.0,
        routing: Routing | None = None,
    ):
        self.bus = bus  # RouterBus (or a fake with .peers, .send, .peer_name)
        self.reserve_timeout_s = reserve_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.lease_s = lease_s
        self.reqs: dict[str, Flow] = {}
        self.orphans: dict[str, Orphan] = {}
        self.inflight: dict[bytes, InstanceLoad] = {}
        self.routing = routing or Routing()  # which instance gets a request (actors/router/cache_index.py)
        self.routing.load_of = self._load
        self.counters = {"reschedules": 0, "failures": 0, "busy": 0, "transfer_bytes": 0, "transfer_seconds": 0.0}
        self.counters["transfer_bytes_saved"] = 0  # not sent: the decode's prefix cache had those blocks
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

    def pick_decode(self, exclude: set[bytes], tokens: list[int] | None = None) -> Peer | None:
        return self.routing.pick("decode", [p for p in self._alive("decode") if p.identity not in exclude], tokens)

    def pick_mixed(self, tokens: list[int] | None = None) -> Peer | None:
        """The mixed instance for the next request (``Routing``), or None for the PD path: no
        mixed instance, or a prefill + decode pair whose chosen decode is less loaded."""
        best, why = self.routing.choose("mixed", self._alive("mixed"), tokens)
        if best is not None and self._alive("prefill") and self._alive("decode"):
            decode, _ = self.routing.choose("decode", self._alive("decode"), tokens)
            if decode is not None and self.routing.load(best) > self.routing.load(decode):
                return None
        if best is not None:
            self.routing.counted("mixed", why)
        return best

    async def submit(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams):
        """The request's stream: on a mixed instance or through a prefill + decode pair, chosen
        when the stream starts (after the requests before it were charged to their instances)."""
        mixed = self.pick_mixed(prompt_ids)
        if mixed is not None:
            gen = self.generate_mixed(req_id, prompt_ids, sampling, mixed)
        else:
            gen = self.generate(req_id, prompt_ids, sampling)
        try:
            async for item in gen:
                yield item
        finally:
            await gen.aclose()

    def pick_prefill(self, exclude: set[bytes], tokens: list[int] | None = None) -> Peer | None:
        return self.routing.pick("prefill", [p for p in self._alive("prefill") if p.identity not in exclude], tokens)

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
        self._load(prefill).prefills += 1

    def _prefill_ended(self, flow: Flow) -> None:
        """The prefill answered (or died): it writes no more into the lease."""
        if flow.prefill is not None:
            self._uncharge(flow.prefill, pending_prefill_tokens=flow.prefill_tokens, prefills=1)
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
        if flow.reserving is not None:
            # after the Reserve on the same pipe: frees the lease if granted, a no-op after Busy
            self._send(flow.reserving, Release(req_id=flow.req_id))
            flow.reserving = None
        if flow.decode is not None:
            if flow.decoding:
                self._send(flow.decode, Abort(req_id=flow.req_id, reason=how.value))
            elif flow.prefill is not None and flow.dest_sent and not flow.prefill_over:
                # the prefill may still write into the lease: release it once the prefill is done
                self.orphans[flow.req_id] = Orphan(flow.prefill, flow.decode, flow.stale.get(flow.prefill, 0))
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
    def on_reserve_answer(self, ident: bytes, req_id: str, block_ids: list[int] | None, reason: str, cached_blocks: int = 0) -> None:
        flow = self.reqs.get(req_id)
        if flow is not None and flow.reserving == ident:
            flow.queue.put_nowait(ReserveAnswer(ident, block_ids, reason, cached_blocks))
        elif block_ids is not None:
            # nobody waits for this lease (the flow gave up on this decode, or ended): give it back
            self._send(ident, Release(req_id=req_id))

    def on_prefill_end(self, ident: bytes, msg: Prefilled | Failed) -> None:
        if isinstance(msg, Prefilled):
            self.counters["transfer_bytes"] += msg.transfer_bytes
            self.counters["transfer_seconds"] += msg.transfer_s
        orphan = self.orphans.get(msg.req_id)
        if orphan is not None and orphan.prefill == ident:
            if orphan.stale:
                orphan.stale -= 1  # the answer of an earlier dispatch: the writer is still at it
                return
            del self.orphans[msg.req_id]
            self._send(orphan.decode, Release(req_id=msg.req_id))
            return
        flow = self.reqs.get(msg.req_id)
        if flow is None:
            return
        if flow.stale.get(ident):
            flow.stale[ident] -= 1
        elif flow.prefill == ident:
            flow.prefill_over = True
            flow.queue.put_nowait(msg)

    def on_decode_failed(self, ident: bytes, msg: Failed) -> None:
        flow = self.reqs.get(msg.req_id)
        if flow is not None and flow.decode == ident and flow.decoding:
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
            flow.stale.pop(peer.identity, None)  # a dead prefill answers nothing more
            if peer.identity in (flow.prefill, flow.decode, flow.reserving):
                flow.prefill_over = flow.prefill_over or flow.prefill == peer.identity
                flow.queue.put_nowait(InstanceLost(peer.identity, f"{peer.name} lost: {reason}"))
        for req_id, orphan in list(self.orphans.items()):
            if orphan.prefill == peer.identity:  # the writer is gone: the lease can go
                del self.orphans[req_id]
                self._send(orphan.decode, Release(req_id=req_id))
            elif orphan.decode == peer.identity:  # the blocks are gone with their owner
                del self.orphans[req_id]
        self.inflight.pop(peer.identity, None)
        self.routing.forget(peer.identity)

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
    def generate(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams):
        """The request's stream through a prefill + decode pair."""
        flow = Flow(req_id)
        return self._run(flow, self._walk_pd(flow, prompt_ids, sampling))

    async def _walk_pd(self, flow: Flow, prompt_ids: list[int], sampling: SamplingParams):
        req_id = flow.req_id
        outputs: list[int] = []
        retries = 0
        lost_decodes: set[bytes] = set()
        while True:
            flow.phase = Phase.RESERVE
            tokens = prompt_ids + outputs
            reserve = Reserve(
                req_id=req_id,
                num_tokens=len(tokens) + 1,
                lease_s=self.lease_s,
                prompt_token_ids=prompt_ids,
                output_token_ids=list(outputs),
                sampling=sampling,
            )
            got = await self._prefill(flow, reserve, tokens, len(outputs), sampling, lost_decodes, retries > 0)
            if got is None:  # the decode was lost while the prefill could write into it
                retries += 1
                if retries > self.max_retries:
                    raise Ended(Exit.RETRIES_EXHAUSTED, "decode instances keep failing")
                continue
            decode, first = got
            outputs.extend(first.token_ids)
            flow.phase = Phase.DECODE
            yield first
            self._start_decode(flow)
            ev = None
            if not self._send(decode.identity, Decode(req_id, first.token_ids[-1])):
                ev = InstanceLost(decode.identity, f"{decode.name} unreachable")
            while ev is None:
                ev = await self._next(flow, f"decode on {decode.name}")
                if isinstance(ev, TokenOut):
                    outputs.extend(ev.token_ids)
                    if ev.finish_reason is not None:
                        self._decode_ended(flow)  # the decode freed the sequence itself
                        self.routing.record(decode, prompt_ids + outputs)  # its cache has the conversation
                        self._close(flow, Exit.FINISHED)
                        yield ev
                        return
                    yield ev
                    ev = None
                elif isinstance(ev, Failed) and not ev.retryable:
                    self._decode_ended(flow)  # the decode dropped it
                    raise Ended(Exit.DECODE_FAILED, ev.error)
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
                raise Ended(Exit.RETRIES_EXHAUSTED, f"decode failed: {why}")
            log.warning("req %s: decode failed (%s); re-prefilling %d tokens elsewhere", req_id, why, len(prompt_ids) + len(outputs))

    def generate_mixed(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams, inst: Peer):
        """Run the request on mixed instance ``inst``: ``Prefill`` without destination, then its
        ``Tokens``. Exits: finished; the instance refuses (400, or an error event after tokens);
        it is lost or silent past the request timeout (503 / 504, or an error event after tokens);
        the client goes (``Abort`` to the instance). All through ``_close``."""
        flow = Flow(req_id)
        return self._run(flow, self._walk_mixed(flow, prompt_ids, sampling, inst))

    async def _walk_mixed(self, flow: Flow, prompt_ids: list[int], sampling: SamplingParams, inst: Peer):
        req_id = flow.req_id
        outputs: list[int] = []
        flow.phase = Phase.PREFILL
        flow.decode = inst.identity  # it runs the sequence from the first token on
        self._start_decode(flow)
        if not self._send(inst.identity, Prefill(req_id=req_id, prompt_token_ids=prompt_ids, sampling=sampling)):
            self._decode_ended(flow)  # nothing reached it
            raise Ended(Exit.INSTANCE_LOST, f"{inst.name} unreachable", retry_after=1)
        self.routing.record(inst, prompt_ids)
        while True:
            ev = await self._next(flow, f"mixed instance {inst.name}")
            if isinstance(ev, TokenOut):
                outputs.extend(ev.token_ids)
                flow.phase = Phase.DECODE
                if ev.finish_reason is not None:
                    self._decode_ended(flow)  # the instance freed the sequence itself
                    self.routing.record(inst, prompt_ids + outputs)
                    self._close(flow, Exit.FINISHED)
                    yield ev
                    return
                yield ev
            elif isinstance(ev, Failed):
                self._decode_ended(flow)  # it dropped the request
                raise Ended(Exit.PREFILL_REFUSED if not outputs else Exit.DECODE_FAILED, ev.error)
            elif isinstance(ev, InstanceLost) and ev.identity == inst.identity:
                self._decode_ended(flow)  # its sequences died with it
                raise Ended(Exit.INSTANCE_LOST, ev.reason, retry_after=1)

    async def _run(self, flow: Flow, walk):
        """The one exit handling of every path: ``walk`` (an async generator of the flow's
        ``TokenOut``) ends in a finish, or in ``Ended`` — then the flow is closed and the client
        gets the HTTP error, or an error event once it has tokens — or the client leaves."""
        self.reqs[flow.req_id] = flow
        sent = False
        try:
            async for item in walk:
                sent = sent or bool(item.token_ids)
                yield item
        except Ended as end:
            self.counters["failures"] += 1
            self._close(flow, end.how)
            log.info("req %s: %s: %s", flow.req_id, end.how.value, end.message)
            if sent:  # the client already has tokens: end its stream with an error event
                yield TokenOut(flow.req_id, [], finish_reason=FinishReason.ERROR, error=end.message)
                return
            raise end.as_http() from None
        finally:
            await walk.aclose()
            self._close(flow, Exit.CLIENT_GONE)  # a no-op unless the client left mid-way


    async def _next(self, flow: Flow, what: str):
        try:
            return await next_event(flow.queue, self.request_timeout_s)
        except TimeoutError:
            raise Ended(Exit.TIMEOUT, f"{what} silent for {self.request_timeout_s:g}s") from None

    def _reserve(self, flow: Flow, reserve: Reserve, lost: set[bytes], skip: set[bytes], rescheduled: bool, prefill: Peer | None) -> Peer | None:
        """Send ``reserve`` to a decode (one that ``prefill`` can write to, when given) outside
        ``lost`` and ``skip``; None when none is left to ask (each said Busy or was unreachable).
        No decode that could take the request alive: the request ends (503)."""
        alive = self._alive("decode")
        usable = [p for p in alive if p.identity not in lost and (prefill is None or self.choose_protocol(prefill, p) is not None)]
        if not usable:
            what = "no other decode instance is alive" if rescheduled else "no decode instance is alive"
            raise Ended(Exit.NO_CAPACITY, what, retry_after=5)
        unusable = {p.identity for p in alive} - {p.identity for p in usable}
        tokens = reserve.prompt_token_ids + reserve.output_token_ids
        while True:
            decode = self.pick_decode(lost | skip | unusable, tokens)
            if decode is None:
                return None
            if self._send(decode.identity, reserve):
                flow.reserving = decode.identity
                return decode
            skip.add(decode.identity)

    def _dispatch_prefill(self, flow: Flow, decode: Peer, tokens: list[int], num_outputs: int, sampling, tried: set[bytes]) -> Peer:
        """Send ``Prefill`` to a prefill outside ``tried`` that can write to ``decode``: with the
        lease's block ids when ``decode`` holds one, else without (``DestReady`` brings them)."""
        while True:
            prefill = self.pick_prefill(tried, tokens)
            if prefill is None:
                what = "no prefill instance is alive" if not tried else "no prefill instance could take the request"
                raise Ended(Exit.NO_CAPACITY, what, retry_after=5)
            block_ids = flow.block_ids if flow.decode == decode.identity else None
            dest = self._destination(prefill, decode, block_ids, flow.cached_blocks if block_ids else 0)
            if dest is None:
                tried.add(prefill.identity)
                continue
            self._start_prefill(flow, prefill.identity, len(tokens))
            msg = Prefill(req_id=flow.req_id, prompt_token_ids=tokens, sampling=sampling, dest=dest, num_output_tokens=num_outputs)
            if self._send(prefill.identity, msg):
                flow.dest_sent = block_ids is not None
                self.routing.record(prefill, tokens)  # its prefix cache registers what it computes
                return prefill
            self._prefill_ended(flow)  # nothing reached it
            tried.add(prefill.identity)

    def _destination(self, prefill: Peer, decode: Peer, block_ids: list[int] | None, cached_blocks: int = 0) -> Destination | None:
        choice = self.choose_protocol(prefill, decode)
        if choice is None:
            return None
        proto, endpoint = choice
        return Destination(decode.hello.instance_id, proto, endpoint, block_ids, decode.hello.kv, cached_blocks)

    async def _prefill(
        self, flow: Flow, reserve: Reserve, tokens: list[int], num_outputs: int, sampling, lost: set[bytes], rescheduled: bool
    ) -> tuple[Peer, TokenOut] | None:
        """Reserve on a decode and prefill ``tokens`` at once; the decode's block ids follow the
        prefill as ``DestReady``. (decode, token one), or None when the decode was lost while the
        prefill could write into its blocks (the caller starts over: a retry). Events are taken
        one at a time from the flow's queue; three clocks bound the waits: the asked decode's
        answer (5 s, then another decode), the pause while every decode is busy (backoff, within
        ``reserve_timeout_s``), the prefill's answer (``request_timeout_s``)."""
        deadline = time.monotonic() + self.reserve_timeout_s
        skip: set[bytes] = set()  # said Busy (forgotten when every decode has) or unreachable
        silent: set[bytes] = set()  # gave up on its answer: not asked again (a late one is ambiguous)
        tried: set[bytes] = set()  # prefills out of the running
        failures: dict[bytes, int] = {}
        delay = 0.01
        retry_at: float | None = None  # every decode busy: ask again then

        def all_busy() -> float:
            nonlocal delay
            skip.clear()
            self.counters["busy"] += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Ended(
                    Exit.NO_CAPACITY,
                    f"no decode instance has room for {reserve.num_tokens} tokens (waited {self.reserve_timeout_s:g}s)",
                    retry_after=max(1, int(self.reserve_timeout_s / 10)),
                )
            wait, delay = min(delay, remaining), min(delay * 2, 0.5)
            return time.monotonic() + wait

        # the decode first: the prefill is chosen to reach it (a decode nobody can reach: wait)
        while (asked := self._reserve(flow, reserve, lost, skip | silent, rescheduled, None)) is None:
            await asyncio.sleep(max(0.0, all_busy() - time.monotonic()))
        asked_at = time.monotonic()
        named = asked  # the decode that the prefill's destination names
        holder: Peer | None = None  # the decode holding the lease (``flow.decode``)
        prefill = self._dispatch_prefill(flow, named, tokens, num_outputs, sampling, tried)
        prefill_since = time.monotonic()

        def ask_next() -> None:
            nonlocal asked, asked_at, retry_at
            asked = self._reserve(flow, reserve, lost, skip | silent, rescheduled, prefill)
            asked_at = time.monotonic()
            retry_at = all_busy() if asked is None else None

        def redispatch(why: str, drop: bool) -> None:
            nonlocal prefill, prefill_since, named
            self.counters["reschedules"] += 1
            log.warning("req %s: prefill on %s failed (%s); re-dispatching", flow.req_id, prefill.name, why)
            failures[prefill.identity] = failures.get(prefill.identity, 0) + 1
            # a live prefill gets a second try (a transfer can fail once on a stale connection)
            if drop or failures[prefill.identity] >= 2:
                tried.add(prefill.identity)
            named = holder or (asked if flow.reserving is not None else None) or named
            prefill = self._dispatch_prefill(flow, named, tokens, num_outputs, sampling, tried)
            prefill_since = time.monotonic()

        while True:
            clocks = [prefill_since + self.request_timeout_s]
            if flow.reserving is not None:
                clocks.append(asked_at + max(0.1, min(5.0, deadline - asked_at)))
            if retry_at is not None:
                clocks.append(retry_at)
            try:
                ev = await next_event(flow.queue, max(0.0, min(clocks) - time.monotonic()))
            except TimeoutError:
                now = time.monotonic()
                if now >= prefill_since + self.request_timeout_s:
                    raise Ended(Exit.TIMEOUT, f"prefill on {prefill.name} silent for {self.request_timeout_s:g}s") from None
                if flow.reserving is not None and now >= clocks[1]:  # the asked decode is silent
                    self._send(flow.reserving, Release(req_id=flow.req_id))  # follows the Reserve
                    silent.add(flow.reserving)
                    flow.reserving = None
                    ask_next()
                elif retry_at is not None and now >= retry_at:
                    ask_next()
                continue
            if isinstance(ev, ReserveAnswer):
                if ev.identity != flow.reserving:
                    continue  # the answer of a decode given up on: released when it came
                flow.reserving = None
                if ev.block_ids is None:  # Busy
                    skip.add(ev.identity)
                    ask_next()
                    continue
                flow.phase = Phase.PREFILL
                holder = asked
                self._hold_lease(flow, holder.identity, len(ev.block_ids))
                flow.block_ids, flow.cached_blocks = ev.block_ids, ev.cached_blocks
                self.routing.record(holder, tokens)  # the KV lands there and is registered
                # the whole destination only when another decode than the one named took it
                dest = None if holder.identity == named.identity else self._destination(prefill, holder, ev.block_ids)
                if self._send(prefill.identity, DestReady(flow.req_id, ev.block_ids, dest, ev.cached_blocks)):
                    flow.dest_sent, named = True, holder
                else:  # the prefill is gone: another one gets the request, block ids included
                    self._prefill_ended(flow)
                    redispatch(f"{prefill.name} unreachable", drop=True)
            elif isinstance(ev, Prefilled):
                if flow.dest_sent and holder is not None:
                    self._prefill_ended(flow)  # it wrote everything and answered
                    self.counters["transfer_bytes_saved"] += flow.cached_blocks * block_bytes(holder.hello.kv)
                    return holder, ev.first
            elif isinstance(ev, Failed):  # from the prefill: a decode's Failed reaches a decoding flow only
                self._prefill_ended(flow)
                if not ev.retryable:
                    raise Ended(Exit.PREFILL_REFUSED, ev.error)
                redispatch(ev.error, drop=False)
            elif isinstance(ev, InstanceLost):
                if ev.identity == prefill.identity:
                    self._prefill_ended(flow)
                    redispatch(ev.reason, drop=True)
                elif ev.identity == flow.reserving:  # asked, never answered: ask another
                    flow.reserving = None
                    lost.add(ev.identity)
                    ask_next()
                elif ev.identity == flow.decode:
                    lost.add(ev.identity)
                    self._decode_ended(flow)  # its blocks are gone with it
                    flow.block_ids, flow.cached_blocks, holder, flow.phase = None, 0, None, Phase.RESERVE
                    if flow.dest_sent:
                        # the prefill may be writing into them: stop it, start over elsewhere
                        flow.dest_sent = False
                        self._send(prefill.identity, Abort(req_id=flow.req_id, reason="decode lost"))
                        flow.stale[prefill.identity] = flow.stale.get(prefill.identity, 0) + 1
                        self._prefill_ended(flow)
                        return None
                    ask_next()  # the prefill never had the blocks: it goes on, another decode answers

    def stats(self) -> dict:
        out = dict(self.counters, requests=len(self.reqs), orphans=len(self.orphans))
        out.update({f"exit_{e.value}": n for e, n in self.exits.items()})
        return out
