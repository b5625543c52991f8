"""The router's PD orchestration: pair a prefill with a decode and walk a request through them.

``PDBackend.generate`` is what the OpenAI frontend iterates for each choice:

1. Reserve: pick a decode (most free KV blocks, fewest running; power of two choices) and ask it
   to lease blocks for the prompt. ``Busy`` everywhere: retry until ``reserve_timeout_s``, then
   ``BackendUnavailable`` (503 + Retry-After).
2. Prefill: pick a prefill (fewest pending prefill tokens) and the transfer protocol for the
   pair (the prefill's first choice that the decode offers; ``ipc`` only on one host); the
   prefill writes the KV into the leased blocks and answers ``Prefilled(first token)``.
   A prefill that dies or fails retryably is replaced by another, same lease.
3. Decode: the first token is yielded at once (TTFT), then ``Decode`` starts the decode; its
   ``Tokens`` messages are demultiplexed to the request. A decode that dies mid-stream is
   replaced: prompt + tokens so far are re-prefilled onto another decode (bounded retries).

Whatever ends the iteration early (client gone, stop string, error) aborts the request on every
instance that holds it. A lease is released only once its prefill is done writing (or dead), so
no block is ever freed while bytes may still land in it.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from actors.frontend.server import BackendUnavailable, RequestRejected
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


@dataclass
class InstanceLost:
    identity: bytes
    reason: str


@dataclass
class ReqState:
    req_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    prefill: bytes | None = None
    decode: bytes | None = None
    phase: str = "reserve"  # reserve | prefill | decode | done


@dataclass
class InstanceLoad:
    """What the router dispatched to an instance since it last reported."""

    pending_prefill_tokens: int = 0
    active: int = 0
    reserved_blocks: int = 0


class PDBackend:
    def __init__(self, bus, reserve_timeout_s: float = 30.0, request_timeout_s: float = 600.0, max_retries: int = 2):
        self.bus = bus  # RouterBus
        self.reserve_timeout_s = reserve_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.reqs: dict[str, ReqState] = {}
        self.reserve_waiters: dict[str, tuple[asyncio.Future, bytes]] = {}
        self.orphans: dict[str, tuple[bytes, bytes]] = {}  # req -> (prefill, decode) to release after prefill ends
        self.inflight: dict[bytes, InstanceLoad] = {}
        self.counters = {"reschedules": 0, "failures": 0, "busy": 0, "transfer_bytes": 0, "transfer_seconds": 0.0}

    # ----------------------------------------------------------------- choice
    def _alive(self, role: str) -> list[Peer]:
        return [p for p in self.bus.peers.values() if p.alive and p.hello.role == role]

    def ready(self) -> bool:
        return bool(self._alive("prefill")) and bool(self._alive("decode"))

    def _load(self, ident: bytes) -> InstanceLoad:
        return self.inflight.setdefault(ident, InstanceLoad())

    def pick_decode(self, exclude: set[bytes]) -> Peer | None:
        cands = [p for p in self._alive("decode") if p.identity not in exclude]
        if len(cands) > 2:
            cands = random.sample(cands, 2)

        def score(p: Peer):
            mine = self._load(p.identity)
            return (p.load.free_blocks - mine.reserved_blocks, -(p.load.running + mine.active))

        return max(cands, key=score, default=None)

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

    # ----------------------------------------------------------------- bus events
    def on_reserve_answer(self, ident: bytes, req_id: str, block_ids: list[int] | None, reason: str) -> None:
        waiter = self.reserve_waiters.get(req_id)
        if waiter is not None and waiter[1] == ident and not waiter[0].done():
            self.reserve_waiters.pop(req_id)
            waiter[0].set_result((block_ids, reason))
        elif block_ids is not None:
            # the waiter gave up on this decode (timeout / client gone): give the lease back
            self._send(ident, Release(req_id=req_id))

    def on_prefill_end(self, ident: bytes, msg: Prefilled | Failed) -> None:
        if isinstance(msg, Prefilled):
            self.counters["transfer_bytes"] += msg.transfer_bytes
            self.counters["transfer_seconds"] += msg.transfer_s
        orphan = self.orphans.pop(msg.req_id, None)
        if orphan is not None:
            self._send(orphan[1], Release(req_id=msg.req_id))
            return
        st = self.reqs.get(msg.req_id)
        if st is not None:
            st.queue.put_nowait(msg)

    def on_decode_failed(self, ident: bytes, msg: Failed) -> None:
        st = self.reqs.get(msg.req_id)
        if st is not None:
            st.queue.put_nowait(msg)

    def on_tokens(self, ident: bytes, items: list[TokenOut]) -> None:
        for item in items:
            st = self.reqs.get(item.req_id)
            if st is not None and st.decode == ident:
                st.queue.put_nowait(item)
            elif item.finish_reason is None:
                self._send(ident, Abort(req_id=item.req_id, reason="request gone"))

    def on_instance_lost(self, peer: Peer, reason: str) -> None:
        for st in self.reqs.values():
            if peer.identity in (st.prefill, st.decode):
                st.queue.put_nowait(InstanceLost(peer.identity, f"{peer.name} lost: {reason}"))
        for req_id, (p, d) in list(self.orphans.items()):
            if p == peer.identity:
                self.orphans.pop(req_id)
                self._send(d, Release(req_id=req_id))
            elif d == peer.identity:
                self.orphans.pop(req_id)
        self.inflight.pop(peer.identity, None)

    def _send(self, ident: bytes | None, msg) -> bool:
        if ident is None:
            return False
        try:
            self.bus.send(ident, msg)
            return True
        except BusError as exc:
            log.warning("send %s to %s failed: %s", type(msg).__name__, self.bus.peer_name(ident), exc)
            return False

    # ----------------------------------------------------------------- the walk
    async def _reserve(self, st: ReqState, num_tokens: int, exclude: set[bytes]) -> tuple[Peer, list[int]]:
        deadline = time.monotonic() + self.reserve_timeout_s
        busy_seen = set()
        delay = 0.01
        while True:
            decode = self.pick_decode(exclude | busy_seen)
            if decode is None and busy_seen:
                busy_seen.clear()  # everyone was busy: wait a bit and ask again
                self.counters["busy"] += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackendUnavailable(
                        f"no decode instance has room for {num_tokens} tokens (waited {self.reserve_timeout_s:g}s)",
                        retry_after=max(1, int(self.reserve_timeout_s / 10)),
                    )
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.5)
                continue
            if decode is None:
                if time.monotonic() > deadline:
                    raise BackendUnavailable("no decode instance is registered", retry_after=5)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            fut = asyncio.get_running_loop().create_future()
            self.reserve_waiters[st.req_id] = (fut, decode.identity)
            st.decode = decode.identity
            if not self._send(decode.identity, Reserve(req_id=st.req_id, num_tokens=num_tokens)):
                self.reserve_waiters.pop(st.req_id, None)
                busy_seen.add(decode.identity)
                continue
            try:
                block_ids, reason = await asyncio.wait_for(fut, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except TimeoutError:
                self.reserve_waiters.pop(st.req_id, None)
                busy_seen.add(decode.identity)
                continue
            if block_ids is None:
                busy_seen.add(decode.identity)
                continue
            self._load(decode.identity).reserved_blocks += len(block_ids)
            return decode, block_ids

    async def generate(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams):
        st = ReqState(req_id)
        self.reqs[req_id] = st
        outputs: list[int] = []
        retries = 0
        dead_decodes: set[bytes] = set()
        finished = False
        try:
            while True:
                tokens = prompt_ids + outputs
                st.phase = "reserve"
                decode, block_ids = await self._reserve(st, len(tokens) + 1, dead_decodes)
                st.phase = "prefill"
                first = await self._prefill(st, decode, block_ids, tokens, len(outputs), sampling)
                self._load(decode.identity).reserved_blocks -= len(block_ids)
                if first is None:  # decode lost during prefill
                    retries += 1
                    dead_decodes.add(decode.identity)
                    if retries > self.max_retries:
                        raise BackendUnavailable("decode instances keep failing", retry_after=5)
                    continue
                outputs.extend(first.token_ids)
                yield first
                st.phase = "decode"
                self._load(decode.identity).active += 1
                try:
                    self._send(decode.identity, Decode(req_id, prompt_ids, list(outputs), sampling))
                    while True:
                        try:
                            ev = await asyncio.wait_for(st.queue.get(), timeout=self.request_timeout_s)
                        except TimeoutError:
                            raise BackendUnavailable(f"decode silent for {self.request_timeout_s:.0f}s") from None
                        if isinstance(ev, TokenOut):
                            outputs.extend(ev.token_ids)
                            if ev.finish_reason is not None:
                                finished = True
                                st.phase = "done"
                            yield ev
                            if finished:
                                return
                            continue
                        if isinstance(ev, (InstanceLost, Failed)):
                            why = ev.reason if isinstance(ev, InstanceLost) else ev.error
                            if isinstance(ev, Failed) and not ev.retryable:
                                st.phase = "done"
                                finished = True
                                yield TokenOut(req_id, [], finish_reason="error", error=why)
                                return
                            retries += 1
                            self.counters["reschedules"] += 1
                            dead_decodes.add(decode.identity)
                            log.warning("req %s: decode failed (%s); re-prefilling %d tokens elsewhere", req_id, why, len(prompt_ids) + len(outputs))
                            if retries > self.max_retries:
                                st.phase = "done"
                                finished = True
                                self.counters["failures"] += 1
                                yield TokenOut(req_id, [], finish_reason="error", error=f"decode failed: {why}")
                                return
                            break
                finally:
                    self._load(decode.identity).active -= 1
        finally:
            self.reqs.pop(req_id, None)
            if not finished:
                self._cleanup(st)

    async def _prefill(
        self, st: ReqState, decode: Peer, block_ids: list[int], tokens: list[int], num_outputs: int, sampling
    ) -> TokenOut | None:
        """Prefill ``tokens`` into ``block_ids`` of ``decode``; None if the decode is lost meanwhile."""
        tried: set[bytes] = set()
        failures: dict[bytes, int] = {}
        while True:
            prefill = self.pick_prefill(tried)
            if prefill is None:
                self._send(decode.identity, Release(req_id=st.req_id))
                st.decode = None
                raise BackendUnavailable("no prefill instance available", retry_after=5)
            choice = self.choose_protocol(prefill, decode)
            if choice is None:
                tried.add(prefill.identity)
                continue
            proto, endpoint = choice
            st.prefill = prefill.identity
            load = self._load(prefill.identity)
            load.pending_prefill_tokens += len(tokens)
            sent = self._send(
                prefill.identity,
                Prefill(
                    req_id=st.req_id,
                    prompt_token_ids=tokens,
                    sampling=sampling,
                    dest=Destination(decode.hello.instance_id, proto, endpoint, block_ids, decode.hello.kv),
                    num_output_tokens=num_outputs,
                ),
            )
            try:
                if not sent:
                    tried.add(prefill.identity)
                    continue
                ev = await asyncio.wait_for(st.queue.get(), timeout=self.request_timeout_s)
            finally:
                load.pending_prefill_tokens -= len(tokens)
            if isinstance(ev, Prefilled):
                st.prefill = None
                return ev.first
            if isinstance(ev, InstanceLost) and ev.identity == decode.identity:
                # the decode died: the prefill may still be writing; release nothing (its blocks are gone)
                if st.prefill is not None:
                    self._send(st.prefill, Abort(req_id=st.req_id, reason="decode lost"))
                st.prefill = None
                st.decode = None
                return None
            if isinstance(ev, Failed) and not ev.retryable:
                self.counters["failures"] += 1
                raise RequestRejected(ev.error)
            why = ev.reason if isinstance(ev, InstanceLost) else getattr(ev, "error", "?")
            self.counters["reschedules"] += 1
            log.warning("req %s: prefill on %s failed (%s); re-dispatching", st.req_id, prefill.name, why)
            failures[prefill.identity] = failures.get(prefill.identity, 0) + 1
            # a live prefill gets a second try (a transfer can fail once on a stale connection)
            if isinstance(ev, InstanceLost) or failures[prefill.identity] >= 2:
                tried.add(prefill.identity)
            st.prefill = None

    def _cleanup(self, st: ReqState) -> None:
        """The request ended early: free whatever any instance holds for it."""
        waiter = self.reserve_waiters.pop(st.req_id, None)
        if waiter is not None:
            waiter[0].cancel()
        if st.phase == "prefill" and st.prefill is not None and st.decode is not None:
            self.orphans[st.req_id] = (st.prefill, st.decode)
            self._send(st.prefill, Abort(req_id=st.req_id, reason="request ended"))
        elif st.phase in ("reserve", "prefill") and st.decode is not None:
            self._send(st.decode, Release(req_id=st.req_id))
        elif st.phase == "decode" and st.decode is not None:
            self._send(st.decode, Abort(req_id=st.req_id, reason="request ended"))
        st.phase = "done"

    def stats(self) -> dict:
        return dict(self.counters, requests=len(self.reqs))



