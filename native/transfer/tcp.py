"""``tcp``: the project's own KV transport, for hosts without RDMA.

Receiver (decode): a listening socket on ``(host, port)`` served by one I/O thread (selectors).
Each incoming message starts with a fixed header (``_HDR``) followed by the request id and the
destination block ids; the payload is then received straight into the destination blocks with
``recvmsg_into`` over memoryviews of the cache (one view per run of consecutive blocks, or per
block when only a head slice of it is written): no intermediate buffer. A COMMIT message is
answered with an ACK once every earlier byte of the request has landed (TCP keeps order).

Sender (prefill): one persistent connection per peer and one sender thread per peer draining
that peer's queue; each layer goes out as two messages (K, V) whose payload is a gather list of
memoryviews of the local cache (``sendmsg``: no copy in Python). ACKs come back on the same
connection and are read by the I/O thread, which completes the handles. A connection that
breaks (peer died, reset, send timeout) fails every pending handle of that peer with an error
naming it; the next write reconnects.

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
from dataclasses import dataclass, field

import numpy as np
import torch

from native.kv_cache import KVCache
from native.transfer.base import (
    PendingTransfer,
    RequestTable,
    ResolvedOp,
    TransferEngine,
    TransferError,
    TransferHandle,
    WriteOp,
    check_compatible,
    host_id,
    layout_to_dict,
    peer_layout,
    region_spans,
    resolve_op,
)
from pdbus.messages import KVLayout

log = logging.getLogger(__name__)

_MAGIC = b"PDKV"
_HDR = struct.Struct("!4sBBHHHHIQ")
_ACK = struct.Struct("!4sBBHHQ")
_WRITE, _COMMIT, _ABORT, _ACK_TYPE = 1, 2, 3, 16
_IOV = 256  # buffers per sendmsg / recvmsg_into call (IOV_MAX is 1024 on Linux)
_SCRATCH = 1 << 20  # where the payload of a refused write is read and dropped
_LINGER_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets, unsent bytes dropped
_MAX_REQ_ID = 1024  # bytes
_READS_PER_EVENT = 64


class _FlatCache:
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


def _send_all(sock: socket.socket, buffers: list) -> int:
    """sendmsg until every byte of ``buffers`` went out; returns the byte count."""
    views = [memoryview(b).cast("B") for b in buffers]
    total = sum(v.nbytes for v in views)
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i : i + _IOV])
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


class _IoLoop:
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


# --------------------------------------------------------------------------- receiver side


class _Incoming:
    """One connection from a sender: a small state machine fed by readable events."""

    def __init__(self, engine: TcpTransfer, io: _IoLoop, sock: socket.socket, addr):
        self.engine, self.io, self.sock, self.addr = engine, io, sock, addr
        self.flat = engine._flat
        self.layout = engine._layout
        self.requests: dict[str, list] = {}  # req id -> [bytes landed, first error]
        self.out = bytearray()
        self._hdr = bytearray(_HDR.size)
        self._scratch: bytearray | None = None
        self._start_header()

    # phases: "hdr" (fixed header), "extra" (req id + block ids), "payload" (into the cache)
    def _start_header(self) -> None:
        self.phase, self.buf, self.pos = "hdr", memoryview(self._hdr), 0

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ:
            self._read()

    def _read(self) -> None:
        for _ in range(_READS_PER_EVENT):  # then back to select: other connections get a turn
            try:
                if self.phase == "payload":
                    n = self._recv_payload()
                else:
                    n = self.sock.recv_into(self.buf[self.pos :])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._close(f"read failed: {e}")
                return
            if n == 0:
                self._close("closed by the sender")
                return
            if self.phase != "payload":
                self.pos += n
                if self.pos == len(self.buf):
                    if not self._on_part():
                        return
            elif self.ti == len(self.targets):
                self._start_header()

    def _recv_payload(self) -> int:
        n = self.sock.recvmsg_into(self.targets[self.ti : self.ti + _IOV])[0]
        got = n
        while got:
            first = self.targets[self.ti]
            if got >= first.nbytes:
                got -= first.nbytes
                self.ti += 1
            else:
                self.targets[self.ti] = first[got:]
                got = 0
        return n

    def _on_part(self) -> bool:
        """A header or its extra part is complete; returns False when the connection closed."""
        if self.phase == "hdr":
            magic, mtype, kind, layer, req_len, h0, h1, nblocks, payload = _HDR.unpack(self._hdr)
            if magic != _MAGIC or mtype not in (_WRITE, _COMMIT, _ABORT):
                self._close("sent a malformed header: not a pdbus tcp transfer stream", malformed=True)
                return False
            if req_len > _MAX_REQ_ID or nblocks > self.layout.num_blocks:
                self._close(f"sent a header with {nblocks} blocks and a {req_len}-byte request id", malformed=True)
                return False
            self.msg = (mtype, kind, layer, h0, h1, nblocks, payload)
            self.phase, self.buf, self.pos = "extra", memoryview(bytearray(req_len + 4 * nblocks)), 0
            if len(self.buf) == 0:
                return self._on_part()
            return True
        mtype, kind, layer, h0, h1, nblocks, payload = self.msg
        extra = bytes(self.buf)
        req_len = len(extra) - 4 * nblocks
        self.req_id = extra[:req_len].decode()
        if mtype == _WRITE:
            blocks = np.frombuffer(extra, dtype="<u4", offset=req_len, count=nblocks)
            self._start_payload(kind, layer, h0, h1, blocks, payload)
            return True
        if mtype == _COMMIT:
            nbytes, error = self.requests.pop(self.req_id, (0, None))
            self._ack(self.req_id, nbytes, error)
        elif mtype == _ABORT:
            self.requests.pop(self.req_id, None)
        self._start_header()
        return True

    def _start_payload(self, kind, layer, h0, h1, blocks, payload) -> None:
        state = self.requests.setdefault(self.req_id, [0, None])
        lay = self.layout
        error = None
        if kind > 1 or layer >= lay.num_layers:
            error = f"layer {layer} / kind {kind} outside this cache"
        elif not 0 <= h0 < h1 <= lay.num_kv_heads:
            error = f"heads [{h0}, {h1}) outside this cache's {lay.num_kv_heads}"
        elif len(blocks) and int(blocks.max()) >= lay.num_blocks:
            error = f"block {int(blocks.max())} outside this cache's {lay.num_blocks}"
        elif payload != len(blocks) * (h1 - h0) * self.flat.head_bytes:
            error = f"payload of {payload} bytes does not match {len(blocks)} blocks x {h1 - h0} heads"
        if error is not None:
            state[1] = state[1] or error
            if self._scratch is None:
                self._scratch = bytearray(_SCRATCH)
            scratch = memoryview(self._scratch)
            self.targets = [scratch[: min(_SCRATCH, payload - off)] for off in range(0, payload, _SCRATCH)]
        else:
            self.targets = self.flat.regions(layer, kind, blocks, (h0, h1))
            state[0] += payload
        self.phase, self.ti = "payload", 0
        if not self.targets:
            self._start_header()

    def _ack(self, req_id: str, nbytes: int, error: str | None) -> None:
        rid, err = req_id.encode(), (error or "").encode()
        self.out += _ACK.pack(_MAGIC, _ACK_TYPE, 1 if error else 0, len(rid), len(err), nbytes) + rid + err
        self._flush()

    def _flush(self) -> None:
        try:
            while self.out:
                n = self.sock.send(self.out)
                del self.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._close(f"ack failed: {e}")
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        try:
            self.io.sel.modify(self.sock, events, self.on_event)
        except (KeyError, ValueError):
            pass

    def _close(self, why: str, malformed: bool = False) -> None:
        if malformed:
            log.warning("tcp transfer: dropping the connection from %s: it %s", self.addr, why)
        elif self.requests:
            log.info("tcp transfer: connection from %s %s with %d partial requests", self.addr, why, len(self.requests))
        self.requests.clear()
        self.engine._incoming.discard(self)
        self.io.drop(self.sock)


# --------------------------------------------------------------------------- sender side


@dataclass(eq=False)
class _Link:
    """The connection to one peer and the thread that feeds it."""

    peer_id: str
    address: tuple[str, int]
    endpoint: dict
    layout: KVLayout
    queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sock: socket.socket | None = None
    awaiting: dict[str, PendingTransfer] = field(default_factory=dict)  # commit sent, no ACK yet
    ack_buf: bytearray = field(default_factory=bytearray)
    thread: threading.Thread | None = None
    closed: bool = False

    @property
    def name(self) -> str:
        return f"peer {self.peer_id} ({self.address[0]}:{self.address[1]})"


class TcpTransfer(TransferEngine):
    name = "tcp"

    def __init__(
        self,
        cache: KVCache,
        host: str = "127.0.0.1",
        port: int = 0,
        io_timeout: float = 30.0,
        connect_timeout: float = 5.0,
    ):
        super().__init__(cache, host)
        self._flat = _FlatCache(cache)
        self._layout = cache.layout()
        self._port = port
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self._requests = RequestTable(self.name)
        self._links: dict[str, _Link] = {}
        self._incoming: set[_Incoming] = set()
        self._listener: socket.socket | None = None
        self._io_loop: _IoLoop | None = None
        self._lock = threading.RLock()
        self._closed = False

    @property
    def _io(self) -> _IoLoop:
        with self._lock:
            if self._io_loop is None:
                self._io_loop = _IoLoop("pdbus-tcp-io")
            return self._io_loop

    # ----- receiver side
    def endpoint(self) -> dict:
        self._check_open()
        with self._lock:
            if self._listener is None:
                self._listener = self._listen()
        host, port = self._listener.getsockname()[:2]
        return {
            "protocol": "tcp",
            "host": self.host,
            "port": port,
            "host_id": host_id(),
            "layout": layout_to_dict(self._layout),
        }

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise TransferError(f"tcp transfer: cannot listen on {self.host}:{self._port}: {e}") from None
        io = self._io
        io.call(lambda: io.add(sock, selectors.EVENT_READ, self._on_accept))
        return sock

    def _on_accept(self, _mask: int) -> None:
        while True:
            try:
                conn, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("tcp transfer: accept failed: %s", e)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            io = self._io_loop
            incoming = _Incoming(self, io, conn, addr)
            self._incoming.add(incoming)
            io.add(conn, selectors.EVENT_READ, incoming.on_event)

    # ----- sender side
    def open_peer(self, peer_id: str, endpoint: dict) -> None:
        self._check_open()
        with self._lock:
            current = self._links.get(peer_id)
        if current is not None and current.endpoint == endpoint:
            return
        layout = peer_layout(peer_id, endpoint)
        check_compatible(self._layout, layout, peer_id)
        try:
            address = (str(endpoint["host"]), int(endpoint["port"]))
        except (KeyError, TypeError, ValueError):
            raise TransferError(f"peer {peer_id}: tcp endpoint needs host and port") from None
        if current is not None:
            self.close_peer(peer_id)
        link = _Link(peer_id, address, dict(endpoint), layout)
        self._connect(link)  # fail early if the peer cannot be reached at all
        link.thread = threading.Thread(target=self._send_loop, args=(link,), name=f"pdbus-tcp-send-{peer_id}", daemon=True)
        with self._lock:
            self._links[peer_id] = link
        link.thread.start()

    def write(self, req_id: str, peer_id: str, op: WriteOp) -> None:
        link = self._link(peer_id)
        resolved = resolve_op(op, self._layout, link.layout, peer_id)
        entry = self._requests.get(req_id, peer_id)
        if not entry.handle.done():
            link.queue.put(("write", entry, resolved))

    def commit(self, req_id: str, peer_id: str) -> TransferHandle:
        link = self._link(peer_id)
        entry = self._requests.get(req_id, peer_id)
        if not entry.handle.done():
            link.queue.put(("commit", entry, None))
        return entry.handle

    def abort(self, req_id: str) -> None:
        for entry in self._requests.abort(req_id):
            link = self._links.get(entry.peer_id)
            if link is not None:
                link.queue.put(("abort", entry, None))  # the receiver drops what it holds

    def close_peer(self, peer_id: str) -> None:
        with self._lock:
            link = self._links.pop(peer_id, None)
        if link is not None:
            self._stop_link(link, f"tcp: {link.name} was closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links, self._links = list(self._links.values()), {}
        for link in links:
            self._stop_link(link, "tcp transfer engine closed")
        self._requests.fail_all("tcp transfer engine closed")
        if self._io_loop is not None:
            self._io_loop.stop()  # closes the listener, incoming connections and the selector
            self._io_loop = None
        self._listener = None
        self._incoming.clear()
        self._flat.release()

    # ----- internals
    def _check_open(self) -> None:
        if self._closed:
            raise TransferError("tcp transfer engine is closed")

    def _link(self, peer_id: str) -> _Link:
        self._check_open()
        link = self._links.get(peer_id)
        if link is None:
            raise TransferError(f"tcp: peer {peer_id} is not open (call open_peer first)")
        return link

    def _connect(self, link: _Link) -> socket.socket:
        try:
            sock = socket.create_connection(link.address, timeout=self.connect_timeout)
        except OSError as e:
            raise TransferError(f"tcp: cannot connect to {link.name}: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.io_timeout)
        with link.lock:
            link.sock, link.ack_buf = sock, bytearray()
        io = self._io
        io.call(lambda: io.add(sock, selectors.EVENT_READ, lambda _m: self._on_ack(link, sock)))
        return sock

    def _stop_link(self, link: _Link, reason: str) -> None:
        link.closed = True
        link.queue.put(None)
        self._break(link, link.sock, reason)
        if link.thread is not None and link.thread is not threading.current_thread():
            link.thread.join(self.io_timeout + 1)

    def _break(self, link: _Link, sock: socket.socket | None, reason: str) -> None:
        """The connection is gone: fail everything pending towards this peer (once)."""
        with link.lock:
            if sock is not None and link.sock is sock:
                link.sock = None
                link.awaiting.clear()
            elif sock is not None:
                return  # that connection was already dealt with
            self._requests.fail_peer(link.peer_id, reason)
        if sock is not None:
            try:
                # abortive close: the kernel drops what is still queued (bytes of failed
                # requests) instead of delivering it once the link is back, maybe after the
                # decode has given those blocks to another request
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
                sock.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked in sendmsg
            except OSError:
                pass
            if self._io_loop is not None:
                io = self._io_loop
                io.call(lambda: io.drop(sock))
            else:
                sock.close()

    def _send_loop(self, link: _Link) -> None:
        while (item := link.queue.get()) is not None:
            kind, entry, op = item
            if kind == "abort":
                sock = link.sock
                if sock is not None:
                    try:
                        _send_all(sock, [self._header(_ABORT, entry.req_id)])
                    except OSError as e:
                        self._break(link, sock, f"tcp: sending to {link.name} failed: {e}")
                continue
            if entry.handle.done() or link.closed:
                continue
            sock = link.sock
            if sock is None:
                try:
                    sock = self._connect(link)
                except TransferError as e:
                    self._requests.finish(entry, str(e))
                    continue
            try:
                if kind == "write":
                    entry.nbytes += self._send_layer(sock, entry.req_id, op)
                else:
                    with link.lock:
                        link.awaiting[entry.req_id] = entry
                    _send_all(sock, [self._header(_COMMIT, entry.req_id)])
            except OSError as e:
                what = "timed out" if isinstance(e, TimeoutError) else f"failed: {e}"
                self._break(link, sock, f"tcp: sending {entry.req_id} to {link.name} {what}")

    @staticmethod
    def _header(mtype: int, req_id: str) -> bytes:
        rid = req_id.encode()
        return _HDR.pack(_MAGIC, mtype, 0, 0, len(rid), 0, 0, 0, 0) + rid

    def _send_layer(self, sock: socket.socket, req_id: str, op: ResolvedOp) -> int:
        rid = req_id.encode()
        ids = np.asarray(op.dst_blocks, dtype="<u4").tobytes()
        (h0, h1), nblocks = op.dst_heads, len(op.dst_blocks)
        payload = nblocks * op.num_heads * self._flat.head_bytes
        sent = 0
        for kind in (0, 1):
            header = _HDR.pack(_MAGIC, _WRITE, kind, op.layer, len(rid), h0, h1, nblocks, payload) + rid + ids
            regions = self._flat.regions(op.layer, kind, op.src_blocks, op.src_heads)
            _send_all(sock, [header, *regions])
            sent += payload
        return sent

    def _on_ack(self, link: _Link, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._break(link, sock, f"tcp: connection to {link.name} failed: {e}")
            return
        if not data:
            self._break(link, sock, f"tcp: {link.name} closed the connection")
            return
        buf = link.ack_buf
        buf += data
        while len(buf) >= _ACK.size:
            magic, mtype, status, req_len, err_len, nbytes = _ACK.unpack_from(buf)
            if magic != _MAGIC or mtype != _ACK_TYPE:
                self._break(link, sock, f"tcp: {link.name} sent a malformed ack")
                return
            end = _ACK.size + req_len + err_len
            if len(buf) < end:
                return
            req_id = bytes(buf[_ACK.size : _ACK.size + req_len]).decode()
            error = bytes(buf[_ACK.size + req_len : end]).decode()
            del buf[:end]
            with link.lock:
                entry = link.awaiting.pop(req_id, None)
            if entry is None:
                continue  # aborted meanwhile
            if status == 0:
                self._requests.finish(entry)
            else:
                self._requests.finish(entry, f"tcp: {link.name} refused {req_id}: {error}")
