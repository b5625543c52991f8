"""Actors on zmq.asyncio: typed dispatch, registration, heartbeats, liveness.

``Actor`` dispatches each decoded message to ``on_<tag>(peer, msg, frames)``. Two socket roles
build on it:

* ``BusServer`` (the router) binds a ROUTER socket. A peer's first message must be ``Hello``;
  the server answers ``Welcome`` or ``Refused``. Every message from a peer resets its liveness;
  a peer silent for ``3 * heartbeat_interval`` is purged (``peer_lost`` hook). A heartbeat from
  a peer it does not know (the router restarted) is answered with ``Unknown`` so the peer says
  ``Hello`` again.
* ``BusMember`` (a rank or a bus client) connects a DEALER with a stable identity, says
  ``Hello`` until welcomed, heartbeats with its load, and re-registers whenever the router goes
  silent or answers ``Unknown``.

Garbage (bad magic, other version, malformed msgpack, unknown type, oversized header) is logged
in one line and dropped; the actor keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from pdbus import wire
from pdbus.log import get_logger
from pdbus.messages import (
    PROTOCOL_VERSION,
    Bye,
    Heartbeat,
    Hello,
    Load,
    Message,
    Refused,
    Unknown,
    Welcome,
)
from pdbus.sockets import BusError, PeerUnreachable, bind, make_socket, send_nowait, tcp_endpoint

DEAD_AFTER_INTERVALS = 3
RECV_BATCH = 256  # messages handled per wake-up of the receive loop before yielding


class Actor:
    """Base: a socket, a receive loop, and dispatch by message tag."""

    name = "actor"

    def __init__(self, ctx: zmq.asyncio.Context | None = None):
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.log = get_logger(self.name)
        self.sock: zmq.asyncio.Socket | None = None
        self.dropped_frames = 0
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    # -- receiving
    def _split(self, frames: list) -> tuple[bytes | None, list]:
        return None, frames

    async def _recv_loop(self) -> None:
        assert self.sock is not None
        # The same socket through the blocking API: what is already queued is drained without
        # a Future per message (2.5x less receive overhead), at most RECV_BATCH at a time so
        # that a flood never starves the other tasks of the event loop.
        ready = zmq.Socket.shadow(self.sock.underlying)
        while not self._closed:
            try:
                frames = await self.sock.recv_multipart(copy=False)
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            except zmq.ZMQError as exc:
                if self._closed:
                    return
                self.log.warning("receive failed: %s", exc)
                continue
            await self._handle(frames)
            for _ in range(RECV_BATCH - 1):
                if self._closed:
                    return
                try:
                    frames = ready.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.ZMQError:  # Again: nothing more queued (other errors resurface above)
                    break
                await self._handle(frames)
            else:
                await asyncio.sleep(0)

    async def _handle(self, frames: list) -> None:
        peer, frames = self._split(frames)
        if not frames:
            self._drop(peer, "empty message")
            return
        try:
            msg = wire.decode(frames[0].buffer)
        except wire.WireError as exc:
            self._drop(peer, str(exc))
            return
        try:
            await self.dispatch(peer, msg, [f.buffer for f in frames[1:]])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one bad message never takes the actor down
            self.log.error(
                "handling %s from %s failed: %s: %s", wire.tag_of(msg), _peer_name(peer), type(exc).__name__, exc
            )

    def _drop(self, peer: bytes | None, reason: str) -> None:
        self.dropped_frames += 1
        self.log.warning("dropped frame from %s: %s", _peer_name(peer), reason)

    async def dispatch(self, peer: bytes | None, msg: Message, frames: list) -> None:
        handler = getattr(self, "on_" + wire.tag_of(msg), None)
        if handler is None:
            self._drop(peer, f"no handler for {wire.tag_of(msg)!r} here")
            return
        result = handler(peer, msg, frames)
        if result is not None and asyncio.iscoroutine(result):
            await result

    # -- lifecycle
    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        return task

    async def close(self, linger_ms: int = 0) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self.sock is not None:
            self.sock.close(linger=linger_ms)
            self.sock = None


def _peer_name(peer: bytes | None) -> str:
    if peer is None:
        return "router"
    try:
        return peer.decode()
    except UnicodeDecodeError:
        return peer.hex()


@dataclass
class Peer:
    identity: bytes
    hello: Hello
    files: dict[str, bytes] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    load: Load = field(default_factory=Load)
    alive: bool = True

    @property
    def name(self) -> str:
        return self.hello.instance_id


class BusServer(Actor):
    """The ROUTER side: registration, liveness, purge. Subclasses add request handling."""

    name = "bus"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        heartbeat_interval: float = 1.0,
        router_id: str = "router",
        ctx: zmq.asyncio.Context | None = None,
        curve_secret_key: bytes | None = None,
    ):
        super().__init__(ctx)
        self.host = host
        self.heartbeat_interval = heartbeat_interval
        self.router_id = router_id
        self.peers: dict[bytes, Peer] = {}
        self.sock = make_socket(self.ctx, zmq.ROUTER, curve_server_secret=curve_secret_key)
        try:
            self.port = bind(self.sock, host, port)
        except zmq.ZMQError:
            self.sock.close(linger=0)
            self.sock = None
            raise

    @property
    def endpoint(self) -> str:
        return tcp_endpoint(self.host, self.port)

    def _split(self, frames: list) -> tuple[bytes | None, list]:
        return frames[0].bytes, frames[1:]

    def start(self) -> None:
        self.spawn(self._recv_loop())
        self.spawn(self._purge_loop())

    def send(self, identity: bytes, msg: Message, *frames) -> None:
        """Send to a registered, live peer now or raise (BusFull, PeerUnreachable).

        A peer declared dead is unreachable here even while its TCP connection lingers (a
        stopped process): nothing is queued for it until it says Hello again.
        """
        if identity not in self.peers:
            raise PeerUnreachable(f"{_peer_name(identity)} is not registered (dead or never said Hello)")
        self._send(identity, msg, *frames)

    def _send(self, identity: bytes, msg: Message, *frames) -> None:
        assert self.sock is not None
        send_nowait(self.sock, [wire.encode(msg), *frames], identity=identity)

    async def dispatch(self, peer: bytes | None, msg: Message, frames: list) -> None:
        assert peer is not None
        known = self.peers.get(peer)
        if isinstance(msg, Hello):
            await self._on_hello(peer, msg, frames)
            return
        if isinstance(msg, Bye):
            if known is not None:
                self.mark_dead(peer, f"said bye ({msg.reason})" if msg.reason else "said bye", clean=True)
            return
        if known is None or not known.alive:
            if isinstance(msg, Heartbeat) or self.needs_registration(msg):
                with contextlib.suppress(BusError):
                    self._send(peer, Unknown())
                return
        else:
            known.last_seen = time.monotonic()
        if isinstance(msg, Heartbeat):
            if known is not None:
                known.load = msg.load
                with contextlib.suppress(BusError):
                    self._send(peer, Heartbeat())
            return
        await super().dispatch(peer, msg, frames)

    def needs_registration(self, msg: Message) -> bool:
        """Messages an unregistered peer may not send (subclasses widen for bus clients)."""
        return True

    async def _on_hello(self, peer: bytes, hello: Hello, frames: list) -> None:
        if hello.protocol != PROTOCOL_VERSION:
            reason = f"protocol {hello.protocol} not supported (router speaks {PROTOCOL_VERSION})"
            self.log.warning("refused %s: %s", hello.instance_id, reason)
            with contextlib.suppress(BusError):
                self._send(peer, Refused(reason=reason))
            return
        try:
            files = wire.unpack_files(frames) if hello.has_tokenizer else {}
            reason = self.accept(peer, hello, files)
        except wire.WireError as exc:
            reason = str(exc)
        if reason:
            self.log.warning("refused %s: %s", hello.instance_id, reason)
            with contextlib.suppress(BusError):
                self._send(peer, Refused(reason=reason))
            return
        was = self.peers.get(peer)
        self.peers[peer] = Peer(identity=peer, hello=hello, files=files, load=hello.load)
        with contextlib.suppress(BusError):
            self._send(
                peer,
                Welcome(protocol=PROTOCOL_VERSION, router_id=self.router_id, heartbeat_interval=self.heartbeat_interval),
            )
        if was is None or not was.alive:
            self.log.info(
                "registered %s role=%s host=%s pid=%d", hello.instance_id, hello.role, hello.host, hello.pid
            )
        self.peer_joined(self.peers[peer])

    def accept(self, peer: bytes, hello: Hello, files: dict[str, bytes]) -> str | None:
        """Return a refusal reason, or None to accept. Subclasses check model/layout."""
        return None

    def peer_joined(self, peer: Peer) -> None:
        """Hook: a peer registered (or re-registered)."""

    def peer_lost(self, peer: Peer, reason: str) -> None:
        """Hook: a peer was declared dead."""

    def mark_dead(self, identity: bytes, reason: str, clean: bool = False) -> None:
        """Forget a peer (``clean``: it said Bye) and call ``peer_lost``."""
        peer = self.peers.pop(identity, None)
        if peer is not None and peer.alive:
            peer.alive = False
            (self.log.info if clean else self.log.warning)("instance %s %s: %s", peer.name, "left" if clean else "lost", reason)
            self.peer_lost(peer, reason)

    async def _purge_loop(self) -> None:
        timeout = DEAD_AFTER_INTERVALS * self.heartbeat_interval
        while True:
            await asyncio.sleep(self.heartbeat_interval / 4)
            now = time.monotonic()
            for ident, peer in list(self.peers.items()):
                if now - peer.last_seen > timeout:
                    self.mark_dead(ident, f"silent for {now - peer.last_seen:.1f}s")


class BusMember(Actor):
    """The DEALER side: Hello until welcomed, heartbeats with load, re-register on silence."""

    name = "member"

    def __init__(
        self,
        router_endpoint: str,
        identity: str,
        hello: Callable[[], Hello],
        files: Callable[[], dict[str, bytes]] | None = None,
        load: Callable[[], Load] | None = None,
        heartbeat_interval: float = 1.0,
        ctx: zmq.asyncio.Context | None = None,
        curve_client: tuple[bytes, bytes, bytes] | None = None,
    ):
        super().__init__(ctx)
        self.router_endpoint = router_endpoint
        self.identity = identity
        self._hello = hello
        self._files = files
        self._load = load or Load
        self.heartbeat_interval = heartbeat_interval
        self.registered = asyncio.Event()
        self.refused: str | None = None
        self._answered = asyncio.Event()  # Welcome or Refused came
        self.last_from_router = 0.0
        self.sock = make_socket(self.ctx, zmq.DEALER, identity=identity.encode(), curve_client=curve_client)
        self.sock.connect(router_endpoint)

    def start(self) -> None:
        self.spawn(self._recv_loop())
        self.spawn(self._heartbeat_loop())

    def send(self, msg: Message, *frames) -> None:
        assert self.sock is not None
        send_nowait(self.sock, [wire.encode(msg), *frames])

    def _say_hello(self) -> bool:
        hello = self._hello()
        files = self._files() if self._files else {}
        if files:
            hello.has_tokenizer = True
        try:
            self.send(hello, *wire.pack_files(files))
            return True
        except BusError as exc:
            self.log.debug("hello not sent: %s", exc)
            return False

    async def dispatch(self, peer: bytes | None, msg: Message, frames: list) -> None:
        self.last_from_router = time.monotonic()
        if isinstance(msg, Welcome):
            if not self.registered.is_set():
                self.log.info("registered with %s as %s", self.router_endpoint, self.identity)
            self.refused = None
            if msg.heartbeat_interval > 0:  # the router's clock decides when this member is dead
                self.heartbeat_interval = msg.heartbeat_interval
            self.registered.set()
            self._answered.set()
            return
        if isinstance(msg, Refused):
            self.refused = msg.reason
            self.registered.clear()
            self._answered.set()
            self.log.error("router refused %s: %s", self.identity, msg.reason)
            self.on_refused(msg.reason)
            return
        if isinstance(msg, Unknown):
            if self.registered.is_set():
                self.log.warning("router does not know %s (restarted?): registering again", self.identity)
            self.registered.clear()
            self._say_hello()
            return
        if isinstance(msg, Heartbeat):
            return
        await super().dispatch(peer, msg, frames)

    def on_refused(self, reason: str) -> None:
        """Hook: registration refused (wrong model, protocol...)."""

    async def _heartbeat_loop(self) -> None:
        retry = 0.01
        while True:
            timeout = DEAD_AFTER_INTERVALS * self.heartbeat_interval
            hello_every = max(self.heartbeat_interval / 2, 0.05)
            if self.refused is not None:
                await asyncio.sleep(self.heartbeat_interval)
                continue
            if not self.registered.is_set():
                if self._say_hello():
                    retry = 0.01
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.registered.wait(), hello_every)
                else:  # not connected yet (IMMEDIATE): try again soon, backing off to hello_every
                    await asyncio.sleep(retry)
                    retry = min(2 * retry, hello_every)
                continue
            if time.monotonic() - self.last_from_router > timeout:
                self.log.warning("router silent for %.1fs: registering again", time.monotonic() - self.last_from_router)
                self.registered.clear()
                self.router_lost()
                continue
            try:
                self.send(Heartbeat(load=self._load()))
            except BusError as exc:
                self.log.debug("heartbeat not sent: %s", exc)
            await asyncio.sleep(self.heartbeat_interval)

    def router_lost(self) -> None:
        """Hook: the router went silent."""

    async def close(self, linger_ms: int = 0) -> None:
        """Say Bye (so the router forgets this member at once, not after 3 silent intervals)."""
        if self.sock is not None and not self._closed and self.registered.is_set():
            try:
                self.send(Bye(reason="closing"))
                linger_ms = max(linger_ms, 100)
            except BusError:
                pass
        await super().close(linger_ms)

    async def wait_registered(self, timeout: float) -> None:
        """Return once welcomed; raise BusError at once if refused, or after ``timeout``."""
        self._answered.clear()
        if self.refused is None and not self.registered.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._answered.wait(), timeout)
        if self.refused is not None:
            raise BusError(f"{self.identity}: refused: {self.refused} (router at {self.router_endpoint})")
        if not self.registered.is_set():
            raise BusError(f"{self.identity}: no Welcome from router at {self.router_endpoint} within {timeout:.0f}s")
