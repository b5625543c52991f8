"""The one interface every KV transfer backend implements, and the factory that picks one.

A backend is built around the local ``KVCache``. A *receiver* (decode side) exposes its pool:
``endpoint()`` returns the typed endpoint (pdbus.messages: ``ShmEndpoint``, ``CudaIpcEndpoint``,
``TcpEndpoint``, ``RdmaEndpoint``) that peers need to reach it, carrying its ``KVLayout``. A
*sender* (prefill side) opens a peer once from that endpoint, then writes lists of blocks layer
by layer as the prefill produces them; ``commit(req_id)`` returns a ``TransferHandle`` that
completes when every write of that request has landed in the peer's memory (and fails with
``TransferError`` otherwise). Writes of one request are ordered; different requests are
independent.

Head slices: ``src_heads``/``dst_heads`` are ``(start, stop)`` ranges of the *local* head axis
of each side's cache, so prefill and decode may use different TP sizes (transfer/tp_routing.py).

The rest of the package: blocks.py (op validation and block-run arithmetic), peers.py (the
peer and request tables and the ``open_peer``/``write``/``commit`` preambles every backend
shares), serial.py (backends whose copy is one blocking call, run on a worker), one module per backend.
"""

from __future__ import annotations

import abc
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from native.kv_cache import KVCache
from pdbus import envs
from pdbus.messages import Endpoint, TransferProtocol


class TransferError(RuntimeError):
    """A transfer failed or timed out; the request fails, the blocks are freed by the caller."""


@dataclass
class WriteOp:
    layer: int
    src_blocks: list[int]
    dst_blocks: list[int]
    src_heads: tuple[int, int] | None = None  # None: all local heads
    dst_heads: tuple[int, int] | None = None
    num_layers: int = 1  # layers [layer, layer + num_layers), the same blocks and heads in each


@dataclass
class TransferHandle:
    """Completion of one request's writes. ``wait`` raises TransferError on failure."""

    req_id: str
    _event: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    nbytes: int = 0
    seconds: float = 0.0

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _callbacks: list = field(default_factory=list, repr=False)
    # set by a backend that can complete the handle on the waiting thread: ``settle(timeout)``
    # returns once it has, or the timeout ran out (then ``wait`` waits as usual)
    settle: Callable[[float | None], None] | None = field(default=None, repr=False)

    def add_done_callback(self, fn: Callable[[TransferHandle], None]) -> None:
        """Call ``fn(handle)`` once the handle completes or fails: at once (on this thread) if it
        already has, else on the thread that completes it. Callbacks must be quick and thread-safe
        (the engine's only posts to its inbox)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def set_done(self, nbytes: int = 0, seconds: float = 0.0) -> bool:
        """Complete the handle; False (and no change) if it already completed or failed."""
        with self._lock:
            if self._event.is_set():
                return False
            self.nbytes, self.seconds = nbytes, seconds
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)
        return True

    def set_failed(self, error: str) -> bool:
        """Fail the handle; False (and no change) if it already completed or failed."""
        with self._lock:
            if self._event.is_set():
                return False
            self.error = error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)
        return True

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.settle is not None and not self._event.is_set():
            self.settle(timeout)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._event.wait(remaining):
            raise TransferError(f"transfer of {self.req_id} timed out after {timeout}s")
        if self.error is not None:
            raise TransferError(self.error)


class TransferEngine(abc.ABC):
    """Base class; one subclass per protocol (``ipc``, ``tcp``, ``rdma``)."""

    name: str = ""  # a TransferProtocol value

    def __init__(self, cache: KVCache, host: str = "127.0.0.1"):
        self.cache = cache
        self.host = host

    # ----- receiver side
    @abc.abstractmethod
    def endpoint(self) -> Endpoint:
        """What a peer needs to write into ``self.cache``."""

    # ----- sender side
    @abc.abstractmethod
    def open_peer(self, peer_id: str, endpoint: Endpoint) -> None:
        """Connect to / map a peer's pool. Idempotent; cheap when already open."""

    @abc.abstractmethod
    def write(self, req_id: str, peer_id: str, op: WriteOp) -> None:
        """Queue the block copy of one layer (or of ``op.num_layers`` consecutive ones) from the
        local cache into the peer's. Non-blocking."""

    @abc.abstractmethod
    def commit(self, req_id: str, peer_id: str) -> TransferHandle:
        """All writes of ``req_id`` have been queued; the handle completes when they landed."""

    def abort(self, req_id: str) -> None:  # noqa: B027 - optional for synchronous backends
        """Forget queued writes of ``req_id``; its handle fails, and later writes of it are refused."""

    def forget(self, req_id: str) -> None:  # noqa: B027 - optional for synchronous backends
        """The engine failed ``req_id`` (a step that raised after some of its writes): drop what is
        queued of it, as ``abort`` does, but without refusing the id later (a retry may reuse it)."""

    def close_peer(self, peer_id: str) -> None:  # noqa: B027
        """Drop a peer (it died); its pending handles fail."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop threads, close sockets, unmap memory."""


def host_id() -> str:
    """Identifies this machine (boot id): ``ipc`` peers must share it. ``PDBUS_HOST_ID``
    overrides it, so that processes in different network namespaces of one machine count as
    different hosts (cross-node tests and ``./run.sh cross-node demo``)."""
    override = envs.PDBUS_HOST_ID
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def unavailable(name: str, device_type: str) -> str | None:
    """Why protocol ``name`` cannot serve a KV cache on ``device_type`` ("cpu" / "cuda") on this
    host, or None. Cheap (no model, no cache): the rank checks it before its weights load, so a
    protocol that cannot be built is found out at once."""
    protocol = TransferProtocol(name)
    if protocol is TransferProtocol.TCP and device_type != "cpu":
        return "the tcp backend sends from and receives into contiguous CPU caches, and this cache is on the GPU"
    if protocol is TransferProtocol.IPC and device_type == "cuda":
        from native.transfer.cuda_ipc import _cupy

        try:
            _cupy()
        except TransferError as exc:
            return str(exc)
    if protocol is TransferProtocol.RDMA:
        import importlib.util

        from native.transfer.mooncake import choose_protocol

        # found, not imported: Mooncake reads its settings (MC_TRANSFER_TIMEOUT...) at import,
        # which the engine sets just before it imports it
        if importlib.util.find_spec("mooncake") is None:
            return "rdma: Mooncake's TransferEngine is not installed (pip install mooncake-transfer-engine, or -non-cuda)"
        try:
            choose_protocol()
        except TransferError as exc:
            return str(exc)
    return None


def create_transfer_engine(name: str, cache: KVCache, host: str = "127.0.0.1", **kwargs) -> TransferEngine:
    """Lazy factory: importing a backend pulls its dependencies only when it is chosen."""
    try:
        protocol = TransferProtocol(name)
    except ValueError:
        known = ", ".join(p.value for p in TransferProtocol)
        raise ValueError(f"unknown KV transfer protocol {name!r} (known: {known})") from None
    if protocol is TransferProtocol.IPC:
        if cache.device.type == "cuda":
            from native.transfer.cuda_ipc import CudaIpcTransfer

            return CudaIpcTransfer(cache, host, **kwargs)
        from native.transfer.shm import ShmTransfer

        return ShmTransfer(cache, host, **kwargs)
    if protocol is TransferProtocol.TCP:
        from native.transfer.tcp import TcpTransfer

        return TcpTransfer(cache, host, **kwargs)
    from native.transfer.mooncake import MooncakeTransfer

    return MooncakeTransfer(cache, host, **kwargs)
