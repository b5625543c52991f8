"""Backends whose copy is one blocking call that should not run on the engine thread (Mooncake's
batch write)."""

from __future__ import annotations

import abc
import queue
import threading

from native.kv_cache import KVCache
from native.transfer.blocks import ResolvedOp
from native.transfer.peers import Peer, PeerEngine, PendingTransfer


class SerialCopyEngine(PeerEngine):
    """``write`` queues the validated op; one worker thread runs the copies in order, so the
    caller never blocks on bytes and the writes of a request stay ordered. ``commit`` queues a
    marker that completes the handle once every earlier write of the request ran. Subclasses
    provide ``_attach`` (map/connect a peer), ``_copy`` (one layer, returns bytes) and ``_detach``.
    """

    def __init__(self, cache: KVCache, host: str = "127.0.0.1"):
        super().__init__(cache, host)
        # One item per queued layer write or commit: bounded by in-flight requests x layers.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._busy = threading.Lock()  # held by the worker while it copies

    @abc.abstractmethod
    def _copy(self, obj: object, op: ResolvedOp) -> int:
        """Copy one layer into the peer ``_attach`` returned; returns the bytes copied."""

    # ----- PeerEngine hooks
    def _write(self, entry: PendingTransfer, peer: Peer, op: ResolvedOp) -> None:
        self._put(("write", entry, peer, op))

    def _commit(self, entry: PendingTransfer, peer: Peer) -> None:
        self._put(("commit", entry, peer, None))

    def _aborted(self, entries: list[PendingTransfer]) -> None:
        """When abort returns, no byte of the request is being or will be copied."""
        with self._busy:
            pass  # a copy of it that was running has finished; later ones are skipped

    def _drop(self, peer: Peer) -> None:
        if self._worker is not None and not self._closed:
            self._put(("detach", None, peer, None))  # after any copy already queued into it
        else:
            self._detach(peer.obj)

    def _shutdown(self, peers: list[Peer]) -> None:
        if self._worker is not None:  # the requests have failed: the worker skips the rest
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        super()._shutdown(peers)

    # ----- the copy worker
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
