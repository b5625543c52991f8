"""What every backend keeps on the sending side, and the preambles it shares.

``PeerEngine`` holds the open peers and the pending requests and writes the preambles of
``open_peer`` / ``write`` / ``commit`` / ``close_peer`` / ``close`` once: engine still open,
endpoint of the backend's kind, layouts compatible, one host for ``ipc``, peer looked up,
op validated, aborted requests refused. A backend supplies the hooks: ``_attach`` /
``_detach`` (map or connect a peer and let it go), ``_write`` / ``_commit`` (queue a validated
op, queue the request's completion), ``_aborted`` and ``_shutdown``.
"""

from __future__ import annotations

import abc
import collections
import threading
import time
from dataclasses import dataclass, field

from native.kv_cache import KVCache
from native.transfer.base import TransferEngine, TransferError, TransferHandle, WriteOp, host_id
from native.transfer.blocks import ResolvedOp, check_layers, resolve_op
from pdbus.messages import Endpoint, KVLayout


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


def endpoint_kind(endpoint: object) -> str:
    """The wire tag of an endpoint struct or struct type (``shm``, ``tcp``, ...), else a type name."""
    cls = endpoint if isinstance(endpoint, type) else type(endpoint)
    config = getattr(cls, "__struct_config__", None)
    tag = getattr(config, "tag", None)
    return str(tag) if tag else cls.__name__


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
        return self._fail(lambda key: key[0] == req_id, f"{self.protocol} transfer of {req_id} was aborted")

    def forget(self, req_id: str) -> list[PendingTransfer]:
        """Fail and drop the entries of ``req_id`` (not remembered as aborted)."""
        return self._fail(lambda key: key[0] == req_id, f"{self.protocol} transfer of {req_id} was dropped: the request failed")

    def fail_peer(self, peer_id: str, error: str) -> list[PendingTransfer]:
        return self._fail(lambda key: key[1] == peer_id, error)

    def _fail(self, matches, error: str) -> list[PendingTransfer]:
        with self._lock:
            gone = [e for key, e in self._entries.items() if matches(key)]
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


@dataclass(eq=False)
class Peer:
    """An open peer: its endpoint (and layout), and what the backend attached to it."""

    peer_id: str
    endpoint: Endpoint
    obj: object
    closed: bool = False

    @property
    def layout(self) -> KVLayout:
        return self.endpoint.layout


class PeerEngine(TransferEngine):
    """A backend with a table of open peers and of pending requests (see the module doc)."""

    endpoint_types: tuple[type, ...] = ()  # the endpoint structs this backend writes into
    same_host_only = False  # ``ipc``: the peer's host_id must be this host's
    takes_layer_ranges = False  # ``_write`` gets multi-layer ops whole (else one per layer)

    def __init__(self, cache: KVCache, host: str = "127.0.0.1"):
        super().__init__(cache, host)
        self._layout = cache.layout()
        self._host_id = host_id()
        self._requests = RequestTable(self.name)
        self._peers: dict[str, Peer] = {}
        self._last_resolved: tuple[Peer, tuple, ResolvedOp] | None = None  # see _resolve
        self._lock = threading.RLock()
        self._closed = False

    # ----- hooks
    @abc.abstractmethod
    def _attach(self, peer_id: str, endpoint: Endpoint) -> object:
        """Map / connect a peer whose endpoint passed the checks; raise TransferError if not."""

    @abc.abstractmethod
    def _detach(self, obj: object) -> None:
        """Let go of what ``_attach`` returned (the peer's requests have been failed)."""

    @abc.abstractmethod
    def _write(self, entry: PendingTransfer, peer: Peer, op: ResolvedOp) -> None:
        """Queue (or run) one validated layer copy of a live request (a range of layers where
        the backend ``takes_layer_ranges``)."""

    @abc.abstractmethod
    def _commit(self, entry: PendingTransfer, peer: Peer) -> None:
        """Every write of a live request is queued: finish ``entry`` once they landed."""

    def _aborted(self, entries: list[PendingTransfer]) -> None:  # noqa: B027
        """``entries`` were just failed by an abort (make sure nothing of them lands)."""

    def _shutdown(self, peers: list[Peer]) -> None:
        """``close``: every request has failed; stop what runs and detach the peers."""
        for peer in peers:
            self._detach(peer.obj)

    def _describe(self, peer: Peer) -> str:
        return f"peer {peer.peer_id}"

    # ----- the interface, preambles written once
    def open_peer(self, peer_id: str, endpoint: Endpoint) -> None:
        self._check_open()
        with self._lock:
            current = self._peers.get(peer_id)
        if current is not None and current.endpoint == endpoint:
            return
        if not isinstance(endpoint, self.endpoint_types):
            wanted = " or ".join(endpoint_kind(t) for t in self.endpoint_types)
            raise TransferError(
                f"peer {peer_id}: {self.name} here writes into a {wanted} endpoint, not a {endpoint_kind(endpoint)} one"
            )
        check_compatible(self._layout, endpoint.layout, peer_id)
        if self.same_host_only and endpoint.host_id != self._host_id:
            raise TransferError(f"peer {peer_id}: {self.name} needs both sides on one host ({endpoint.host} is another)")
        if current is not None:  # the peer restarted with a new endpoint
            self.close_peer(peer_id)
        obj = self._attach(peer_id, endpoint)
        with self._lock:
            self._peers[peer_id] = Peer(peer_id, endpoint, obj)

    def write(self, req_id: str, peer_id: str, op: WriteOp) -> None:
        peer = self._peer(peer_id)
        resolved = self._resolve(op, peer)
        entry = self._requests.get(req_id, peer_id)
        if entry.handle.done():
            return
        if self.takes_layer_ranges:
            self._write(entry, peer, resolved)
            return
        for one in resolved.layers():
            self._write(entry, peer, one)

    def commit(self, req_id: str, peer_id: str) -> TransferHandle:
        peer = self._peer(peer_id)
        entry = self._requests.get(req_id, peer_id)
        if not entry.handle.done():
            self._commit(entry, peer)
        return entry.handle

    def abort(self, req_id: str) -> None:
        gone = self._requests.abort(req_id)
        if gone:
            self._aborted(gone)

    def forget(self, req_id: str) -> None:
        gone = self._requests.forget(req_id)
        if gone:
            self._aborted(gone)

    def close_peer(self, peer_id: str) -> None:
        with self._lock:
            peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        peer.closed = True
        self._requests.fail_peer(peer_id, f"{self.name}: {self._describe(peer)} was closed")
        self._drop(peer)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            peer.closed = True
        self._requests.fail_all(f"{self.name} transfer engine closed")
        self._shutdown(peers)

    # ----- internals
    def _resolve(self, op: WriteOp, peer: Peer) -> ResolvedOp:
        """``resolve_op``, whose block and head checks are reused while the blocks and heads repeat
        (every layer of a request writes the same ones): only the layer is checked again."""
        last = self._last_resolved
        if (
            last is not None
            and last[0] is peer
            and last[1] == (op.src_heads, op.dst_heads)
            and last[2].src_blocks == op.src_blocks
            and last[2].dst_blocks == op.dst_blocks
        ):
            r = last[2]
            check_layers(op, self._layout.num_layers, peer.peer_id)
            return ResolvedOp(op.layer, r.src_blocks, r.dst_blocks, r.src_heads, r.dst_heads, op.num_layers)
        resolved = resolve_op(op, self._layout, peer.layout, peer.peer_id)
        self._last_resolved = (peer, (op.src_heads, op.dst_heads), resolved)
        return resolved

    def _drop(self, peer: Peer) -> None:
        """``close_peer``'s last step; a backend with queued work may defer the detach."""
        self._detach(peer.obj)

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"{self.name} transfer engine is closed")

    def _peer(self, peer_id: str) -> Peer:
        self._check_open()
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransferError(f"{self.name}: peer {peer_id} is not open (call open_peer first)")
        return peer
