"""The ``tcp`` backend's wire format and plumbing: message headers, a gather-list send, the
cache as one flat byte view, and the selector thread both sides run on.

Wire format (big-endian):
  header  magic "PDKV", type, kind (0 K / 1 V), layer, len(req id), dst head start, dst head
          stop, number of blocks, payload bytes   -> then req id (utf-8), block ids (<u4 each)
  ACK     magic, type, status (0 ok), len(req id), len(error), bytes received -> req id, error
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable

import torch

from native.kv_cache import KVCache
from native.transfer.base import TransferError
from native.transfer.blocks import region_spans

log = logging.getLogger(__name__)

MAGIC = b"PDKV"
HDR = struct.Struct("!4sBBHHHHIQ")
ACK = struct.Struct("!4sBBHHQ")
WRITE, COMMIT, ABORT, ACK_TYPE = 1, 2, 3, 16
IOV = 256  # buffers per sendmsg / recvmsg_into call (IOV_MAX is 1024 on Linux)
SCRATCH = 1 << 20  # where the payload of a refused write is read and dropped
LINGER_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets, unsent bytes dropped
MAX_REQ_ID = 1024  # bytes
READS_PER_EVENT = 64


class FlatCache:
    """The cache as one flat byte view, cut into the regions a message carries."""

    def __init__(self, cache: KVCache):
        if cache.device.type != "cpu" or not cache.buffer.is_contiguous():
            raise TransferError("the tcp backend sends from and receives into contiguous CPU caches")
        self.mem = memoryview(cache.buffer.view(torch.uint8).reshape(-1).numpy())
        self.layout = cache.layout()
        self.elem_size = cache.buffer.element_size()
        self.head_bytes = cache.block_size * cache.head_dim * self.elem_size

    def regions(self, layer: int, kind: int, blocks, heads: tuple[int, int]) -> list[memoryview]:
        spans = region_spans(self.layout, self.elem_size, layer, kind, blocks, heads)
        return [self.mem[off : off + n] for off, n in spans]

    def release(self) -> None:
        try:
            self.mem.release()
        except BufferError:
            pass  # a region view is still referenced somewhere; it dies with it
        self.mem = None  # type: ignore[assignment]


def send_all(sock: socket.socket, buffers: list) -> int:
    """sendmsg until every byte of ``buffers`` went out; returns the byte count."""
    views = [memoryview(b).cast("B") for b in buffers]
    total = sum(v.nbytes for v in views)
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i : i + IOV])
        while sent:
            n = views[i].nbytes
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0
        while i < len(views) and views[i].nbytes == 0:
            i += 1
    return total


# --------------------------------------------------------------------------- the I/O thread


class IoLoop:
    """One selector thread: the listener, incoming connections, and ACKs of outgoing ones."""

    def __init__(self, name: str):
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def call(self, fn: Callable[[], None] | None) -> None:
        """Run ``fn`` on the loop thread (None stops the loop)."""
        self._calls.put(fn)
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake with pending wake-ups, or stopping

    def stop(self) -> None:
        if self.thread.is_alive():
            self.call(None)
            self.thread.join()

    def _on_wake(self, _mask: int) -> None:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            if fn is None:
                self._stopping = True
                return
            fn()

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self.sel.select():
                    try:
                        key.data(mask)
                    except Exception:  # a bug in one handler must not kill the transport
                        log.exception("tcp transfer: error in the I/O loop")
        finally:
            for key in list(self.sel.get_map().values()):
                if key.fileobj not in (self._wake_r,):
                    key.fileobj.close()
            self.sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def add(self, sock: socket.socket, events: int, handler: Callable[[int], None]) -> None:
        self.sel.register(sock, events, handler)

    def drop(self, sock: socket.socket) -> None:
        """Unregister and close (on the loop thread)."""
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
