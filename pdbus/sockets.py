"""One socket factory holding every option, so no socket is made any other way.

ROUTER sockets have ``ROUTER_MANDATORY`` on (a send to an unknown or vanished peer raises
instead of dropping silently), every socket has bounded high-water marks and linger, and all
sends are non-blocking: a full queue surfaces as ``BusFull`` to the caller.
"""

from __future__ import annotations

import errno
import socket

import zmq
import zmq.asyncio

DEFAULT_HWM = 20_000
DEFAULT_LINGER_MS = 200
MAX_MSG_BYTES = 256 << 20


class BusError(RuntimeError):
    pass


class BusFull(BusError):
    """The peer's send queue is at its high-water mark."""


class PeerUnreachable(BusError):
    """ROUTER_MANDATORY: the identity is not (or no longer) connected."""


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    identity: bytes | None = None,
    hwm: int = DEFAULT_HWM,
    linger_ms: int = DEFAULT_LINGER_MS,
    curve_server_secret: bytes | None = None,
    curve_client: tuple[bytes, bytes, bytes] | None = None,
) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer with the same identity takes over
    if kind == zmq.DEALER:
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: sends fail fast when down
    if curve_server_secret is not None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve_server_secret)
    if curve_client is not None:
        server_public, public, secret = curve_client
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    return sock


def tcp_endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def bind(sock: zmq.Socket, host: str, port: int = 0) -> int:
    """Bind to ``host:port`` (0 = pick a free port) and return the port."""
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    if port == 0:
        return sock.bind_to_random_port(tcp_endpoint(host, 0).rsplit(":", 1)[0])
    sock.bind(tcp_endpoint(host, port))
    return port


def port_in_use(host: str, port: int) -> bool:
    """True if ``host:port`` is taken; other bind failures (no such address) raise OSError."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def send_nowait(sock: zmq.Socket, frames: list, identity: bytes | None = None) -> None:
    """Send without blocking; raise BusFull / PeerUnreachable instead of queueing forever."""
    if identity is not None:
        frames = [identity, *frames]
    try:
        result = sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        if result is not None and hasattr(result, "result"):
            # zmq.asyncio: a NOBLOCK send resolves at once (no send ever waits here)
            if not result.done():
                raise BusError("asyncio send did not resolve immediately")
            result.result()
    except zmq.Again:
        raise BusFull("send queue full (peer slow or gone)") from None
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH:
            raise PeerUnreachable("peer not connected") from None
        raise BusError(str(exc)) from None
