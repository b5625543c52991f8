"""The one interface every KV transfer backend implements.

A backend is built around the local ``KVCache``. A *receiver* (decode side) exposes its pool:
``endpoint()`` returns a small msgpack-able dict that peers need to reach it. A *sender*
(prefill side) opens a peer once from that dict, then writes lists of blocks layer by layer as
the prefill produces them; ``commit(req_id)`` returns a ``TransferHandle`` that completes when
every write of that request has landed in the peer's memory (and fails with ``TransferError``
otherwise). Writes of one request are ordered; different requests are independent.

Head slices: ``src_heads``/``dst_heads`` are ``(start, stop)`` ranges of the *local* head axis
of each side's cache, so prefill and decode may use different TP sizes.
"""

from __future__ import annotations

import abc
import collections
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import msgspec
import torch

from native.kv_cache import KVCache
from pdbus import envs
from pdbus.messages import KVLayout

# Up to this many runs of consecutive blocks are copied slice by slice (no temporary); longer
# block lists use one gather and one scatter.
_MAX_SLICE_RUNS = 4


class TransferError(RuntimeError):
    """A transfer failed or timed out; the request fails, the blocks are freed by the caller."""


@dataclass
class WriteOp:
    layer: int
    src_blocks: list[int]
    dst_blocks: list[int]
    src_heads: tuple[int, int] | None = None  # None: all local heads
    dst_heads: tuple[int, int] | None = None


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

    def add_done_callback(self, fn) -> None:
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
        if not self._event.wait(timeout):
            raise TransferError(f"transfer of {self.req_id} timed out after {timeout}s")
        if self.error is not None:
            raise TransferError(self.error)


class TransferEngine(abc.ABC):
    """Base class; one subclass per protocol (``ipc``, ``tcp``, ``rdma``)."""

    name: str = ""

    def __init__(self, cache: KVCache, host: str = "127.0.0.1"):
        self.cache = cache
        self.host = host

    # ----- receiver side
    @abc.abstractmethod
    def endpoint(self) -> dict:
        """What a peer needs to write into ``self.cache`` (msgpack-able)."""

    # ----- sender side
    @abc.abstractmethod
    def open_peer(self, peer_id: str, endpoint: dict) -> None:
        """Connect to / map a peer's pool. Idempotent; cheap when already open."""

    @abc.abstractmethod
    def write(self, req_id: str, peer_id: str, op: WriteOp) -> None:
        """Queue one layer's block copy from the local cache into the peer's. Non-blocking."""

    @abc.abstractmethod
    def commit(self, req_id: str, peer_id: str) -> TransferHandle:
        """All writes of ``req_id`` have been queued; the handle completes when they landed."""

    def abort(self, req_id: str) -> None:  # noqa: B027 - optional for synchronous backends
        """Forget queued writes of ``req_id``; its handle fails."""

    def close_peer(self, peer_id: str) -> None:  # noqa: B027
        """Drop a peer (it died); its pending handles fail."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop threads, close sockets, unmap memory."""


# --------------------------------------------------------------------------- shared helpers


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


def layout_to_dict(layout: KVLayout) -> dict:
    return msgspec.structs.asdict(layout)


def peer_layout(peer_id: str, endpoint: dict) -> KVLayout:
    """The KV layout a peer published in its endpoint dict."""
    try:
        return msgspec.convert(endpoint["layout"], KVLayout)
    except (KeyError, TypeError, msgspec.ValidationError) as e:
        raise TransferError(f"peer {peer_id}: endpoint has no valid KV layout ({e})") from None


def check_compatible(local: KVLayout, peer: KVLayout, peer_id: str) -> None:
    """Refuse a peer whose blocks cannot hold ours byte for byte (head counts may differ)."""
    wrong = [
        f"{name} {mine} here vs {theirs} there"
        for name, mine, theirs in (
            ("dtype", local.dtype, peer.dtype),
            ("block_size", local.block_size, peer.block_size),
            ("head_dim", local.head_dim, peer.head_dim),
            ("num_layers", local.num_layers, peer.num_layers),
        )
        if mine != theirs
    ]
    if local.total_kv_heads and peer.total_kv_heads and local.total_kv_heads != peer.total_kv_heads:
        wrong.append(f"total_kv_heads {local.total_kv_heads} here vs {peer.total_kv_heads} there")
    if wrong:
        raise TransferError(f"peer {peer_id}: incompatible KV layout: " + "; ".join(wrong))


@dataclass(frozen=True)
class ResolvedOp:
    """A validated WriteOp: head ranges filled in, block ids checked against both pools."""

    layer: int
    src_blocks: list[int]
    dst_blocks: list[int]
    src_heads: tuple[int, int]
    dst_heads: tuple[int, int]

    @property
    def num_heads(self) -> int:
        return self.src_heads[1] - self.src_heads[0]


def resolve_op(op: WriteOp, local: KVLayout, peer: KVLayout, peer_id: str) -> ResolvedOp:
    def heads(rng: tuple[int, int] | None, total: int, side: str) -> tuple[int, int]:
        start, stop = (0, total) if rng is None else (int(rng[0]), int(rng[1]))
        if not 0 <= start < stop <= total:
            raise TransferError(f"write to {peer_id}: {side} heads {rng} outside [0, {total})")
        return start, stop

    src_heads = heads(op.src_heads, local.num_kv_heads, "src")
    dst_heads = heads(op.dst_heads, peer.num_kv_heads, "dst")
    if src_heads[1] - src_heads[0] != dst_heads[1] - dst_heads[0]:
        raise TransferError(f"write to {peer_id}: src heads {src_heads} and dst heads {dst_heads} differ in count")
    if not 0 <= op.layer < local.num_layers:
        raise TransferError(f"write to {peer_id}: layer {op.layer} outside [0, {local.num_layers})")
    src_blocks, dst_blocks = [int(b) for b in op.src_blocks], [int(b) for b in op.dst_blocks]
    if len(src_blocks) != len(dst_blocks):
        raise TransferError(
            f"write to {peer_id}: {len(src_blocks)} src blocks but {len(dst_blocks)} dst blocks"
        )
    for blocks, limit, side in ((src_blocks, local.num_blocks, "src"), (dst_blocks, peer.num_blocks, "dst")):
        if blocks and not (0 <= min(blocks) and max(blocks) < limit):
            raise TransferError(f"write to {peer_id}: {side} block id outside [0, {limit})")
    return ResolvedOp(op.layer, src_blocks, dst_blocks, src_heads, dst_heads)


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) runs where both block lists advance by one together."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            s0, d0, n = runs[-1]
            runs[-1] = (s0, d0, n + 1)
        else:
            runs.append((s, d, 1))
    return runs


def region_spans(
    layout: KVLayout, elem_size: int, layer: int, kind: int, blocks, heads: tuple[int, int]
) -> list[tuple[int, int]]:
    """Byte (offset, length) spans of a cache buffer holding ``heads`` of ``blocks`` of one
    layer's K (kind 0) or V (kind 1). A block's head range is contiguous; consecutive whole
    blocks merge into one span."""
    head_bytes = layout.block_size * layout.head_dim * elem_size
    block_bytes = layout.num_kv_heads * head_bytes
    h0, h1 = heads
    length = (h1 - h0) * head_bytes
    base = (layer * 2 + kind) * layout.num_blocks * block_bytes + h0 * head_bytes
    whole = h1 - h0 == layout.num_kv_heads
    spans: list[tuple[int, int]] = []
    for b in blocks:
        start = base + int(b) * block_bytes
        if whole and spans and spans[-1][0] + spans[-1][1] == start:
            spans[-1] = (spans[-1][0], spans[-1][1] + length)
        else:
            spans.append((start, length))
    return spans


def block_index(op: ResolvedOp, src_device: torch.device, dst_device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``op``'s source and destination block ids as index tensors on each side's device."""
    idx = torch.tensor([op.src_blocks, op.dst_blocks], dtype=torch.long)
    if src_device.type == "cuda":  # a pinned, asynchronous upload: a pageable one would wait for the stream
        idx = idx.pin_memory()
    return idx[0].to(src_device, non_blocking=True), idx[1].to(dst_device, non_blocking=True)


def copy_blocks(
    src: torch.Tensor, dst: torch.Tensor, op: ResolvedOp, index: tuple[torch.Tensor, torch.Tensor] | None = None
) -> int:
    """Copy K and V of ``op``'s blocks from one cache buffer into another; returns bytes.

    A few runs of consecutive blocks are copied as slices; otherwise one gather and one
    scatter (K and V together), with ``index`` from ``block_index`` when the caller reuses it.
    """
    (s0, s1), (d0, d1) = op.src_heads, op.dst_heads
    src_layer = src[op.layer][:, :, s0:s1]  # [2, blocks, heads, block_size, head_dim]
    dst_layer = dst[op.layer][:, :, d0:d1]
    runs = block_runs(op.src_blocks, op.dst_blocks)
    if len(runs) <= _MAX_SLICE_RUNS:
        for s, d, n in runs:
            dst_layer[:, d : d + n].copy_(src_layer[:, s : s + n])
    else:
        src_idx, dst_idx = index if index is not None else block_index(op, src.device, dst.device)
        gathered = src_layer.index_select(1, src_idx)
        if gathered.device != dst.device:  # another GPU of this host: one peer copy, then scatter
            gathered = gathered.to(dst.device, non_blocking=True)
        dst_layer.index_copy_(1, dst_idx, gathered)
    per_block = 2 * (s1 - s0) * src.shape[4] * src.shape[5] * src.element_size()
    return per_block * len(op.src_blocks)


@dataclass(eq=False)
class PendingTransfer:
    """Sender-side state of one request towards one peer."""

    req_id: str
    peer_id: str
    handle: TransferHandle
    nbytes: int = 0
    started: float = field(default_factory=time.perf_counter)


class RequestTable:
    """Pending transfers keyed by (request, peer), plus a bounded memory of aborted requests.

    An aborted id stays refused for a while so that a write arriving after the abort (the
    engine loop may still be finishing the step) never lands in blocks that were freed.
    """

    def __init__(self, protocol: str, remember_aborted: int = 4096):
        self.protocol = protocol
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], PendingTransfer] = {}
        self._aborted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remember = remember_aborted

    def get(self, req_id: str, peer_id: str) -> PendingTransfer:
        """The live entry, created on first use; an aborted request gets an already failed one."""
        with self._lock:
            entry = self._entries.get((req_id, peer_id))
            if entry is None:
                entry = PendingTransfer(req_id, peer_id, TransferHandle(req_id))
                if req_id in self._aborted:
                    entry.handle.set_failed(f"{self.protocol} transfer of {req_id} was aborted")
                else:
                    self._entries[(req_id, peer_id)] = entry
            return entry

    def finish(self, entry: PendingTransfer, error: str | None = None) -> None:
        with self._lock:
            if self._entries.get((entry.req_id, entry.peer_id)) is entry:
                del self._entries[(entry.req_id, entry.peer_id)]
        if error is None:
            entry.handle.set_done(entry.nbytes, time.perf_counter() - entry.started)
        else:
            entry.handle.set_failed(error)

    def abort(self, req_id: str) -> list[PendingTransfer]:
        with self._lock:
            self._aborted[req_id] = None
            while len(self._aborted) > self._remember:
                self._aborted.popitem(last=False)
            gone = [e for key, e in self._entries.items() if key[0] == req_id]
        for entry in gone:
            self.finish(entry, f"{self.protocol} transfer of {req_id} was aborted")
        return gone

    def fail_peer(self, peer_id: str, error: str) -> list[PendingTransfer]:
        with self._lock:
            gone = [e for key, e in self._entries.items() if key[1] == peer_id]
        for entry in gone:
            self.finish(entry, error)
        return gone

    def fail_all(self, error: str) -> None:
        with self._lock:
            gone = list(self._entries.values())
        for entry in gone:
            self.finish(entry, error)

    def __len__(self) -> int:
        return len(self._entries)


class SerialCopyEngine(TransferEngine):
    """Base of backends whose copy is one blocking call (shm memcpy, Mooncake batch write).

    ``write`` validates and queues; one worker thread runs the copies in order, so the caller
    never blocks on bytes and the writes of a request stay ordered. ``commit`` queues a marker
    that completes the handle once every earlier write of the request ran. Subclasses provide
    ``_attach`` (map/connect a peer), ``_copy`` (one layer, returns bytes) and ``_detach``.
    """

    def __init__(self, cache: KVCache, host: str = "127.0.0.1"):
        super().__init__(cache, host)
        self._layout = cache.layout()
        self._requests = RequestTable(self.name)
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()
        # One item per queued layer write or commit: bounded by in-flight requests x layers.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._busy = threading.Lock()  # held by the worker while it copies
        self._closed = False

    # ----- subclass hooks
    @abc.abstractmethod
    def _attach(self, peer_id: str, endpoint: dict, layout: KVLayout) -> object: ...

    @abc.abstractmethod
    def _copy(self, peer: object, op: ResolvedOp) -> int: ...

    @abc.abstractmethod
    def _detach(self, peer: object) -> None: ...

    # ----- sender side
    def open_peer(self, peer_id: str, endpoint: dict) -> None:
        self._check_open()
        with self._lock:
            current = self._peers.get(peer_id)
            if current is not None and current.endpoint == endpoint:
                return
        layout = peer_layout(peer_id, endpoint)
        check_compatible(self._layout, layout, peer_id)
        if current is not None:  # the peer restarted with a new endpoint
            self.close_peer(peer_id)
        obj = self._attach(peer_id, endpoint, layout)
        with self._lock:
            self._peers[peer_id] = _Peer(peer_id, dict(endpoint), layout, obj)

    def write(self, req_id: str, peer_id: str, op: WriteOp) -> None:
        self._check_open()
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransferError(f"{self.name}: peer {peer_id} is not open (call open_peer first)")
        resolved = resolve_op(op, self._layout, peer.layout, peer_id)
        entry = self._requests.get(req_id, peer_id)
        if not entry.handle.done():
            self._put(("write", entry, peer, resolved))

    def commit(self, req_id: str, peer_id: str) -> TransferHandle:
        self._check_open()
        entry = self._requests.get(req_id, peer_id)
        if not entry.handle.done():
            self._put(("commit", entry, None, None))
        return entry.handle

    def abort(self, req_id: str) -> None:
        """Fail the request; when this returns, no byte of it is being or will be copied."""
        if self._requests.abort(req_id):
            with self._busy:
                pass  # a copy of it that was running has finished; later ones are skipped

    def close_peer(self, peer_id: str) -> None:
        with self._lock:
            peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        peer.closed = True
        self._requests.fail_peer(peer_id, f"{self.name}: peer {peer_id} was closed")
        if self._worker is not None and not self._closed:
            self._put(("detach", None, peer, None))  # after any copy already queued into it
        else:
            self._detach(peer.obj)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers, self._peers = list(self._peers.values()), {}
        self._requests.fail_all(f"{self.name} transfer engine closed")  # the worker skips the rest
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        for peer in peers:
            peer.closed = True
            self._detach(peer.obj)

    # ----- internals
    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"{self.name} transfer engine is closed")

    def _put(self, item: tuple) -> None:
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name=f"pdbus-{self.name}-copy", daemon=True)
                self._worker.start()
        self._queue.put(item)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, entry, peer, op = item
            if kind == "detach":
                self._detach(peer.obj)
                continue
            if entry.handle.done():
                continue  # aborted or failed: drop what is left of it
            if kind == "commit":
                self._requests.finish(entry)
                continue
            if peer.closed:
                self._requests.finish(entry, f"{self.name}: peer {peer.peer_id} was closed")
                continue
            with self._busy:
                if entry.handle.done():
                    continue  # aborted while queued
                try:
                    entry.nbytes += self._copy(peer.obj, op)
                except Exception as e:  # the request fails, the engine lives on
                    self._requests.finish(
                        entry, f"{self.name} transfer of {entry.req_id} to {peer.peer_id} failed: {e}"
                    )


@dataclass(eq=False)
class _Peer:
    peer_id: str
    endpoint: dict
    layout: KVLayout
    obj: object
    closed: bool = False


def create_transfer_engine(name: str, cache: KVCache, host: str = "127.0.0.1", **kwargs) -> TransferEngine:
    """Lazy factory: importing a backend pulls its dependencies only when it is chosen."""
    if name == "ipc":
        if cache.device.type == "cuda":
            from native.transfer.cuda_ipc import CudaIpcTransfer

            return CudaIpcTransfer(cache, host, **kwargs)
        from native.transfer.shm import ShmTransfer

        return ShmTransfer(cache, host, **kwargs)
    if name == "tcp":
        from native.transfer.tcp import TcpTransfer

        return TcpTransfer(cache, host, **kwargs)
    if name == "rdma":
        from native.transfer.mooncake import MooncakeTransfer

        return MooncakeTransfer(cache, host, **kwargs)
    raise ValueError(f"unknown KV transfer protocol {name!r} (known: ipc, tcp, rdma)")


KNOWN_PROTOCOLS = ("ipc", "tcp", "rdma")
