"""``tcp``: the project's own KV transport, for hosts without RDMA.

Receiver (decode): a listening socket on ``(host, port)`` served by one I/O thread (selectors);
each accepted connection is a ``tcp_receiver.Incoming`` that receives payloads straight into
the destination blocks and ACKs each COMMIT once every earlier byte has landed.

Sender (prefill): one persistent connection per peer and one sender thread per peer draining
that peer's queue; each layer goes out as two messages (K, V) whose payload is a gather list of
memoryviews of the local cache (``sendmsg``: no copy in Python). ACKs come back on the same
connection and are read by the I/O thread, which completes the handles (their callbacks run
there). A connection that breaks (peer died, reset, send timeout) fails every pending handle of
that peer with an error naming it; the next write reconnects. The wire format is in tcp_wire.py.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
from dataclasses import dataclass, field

import numpy as np

from native.kv_cache import KVCache
from native.transfer.base import TransferError
from native.transfer.blocks import ResolvedOp
from native.transfer.peers import Peer, PeerEngine, PendingTransfer
from native.transfer.tcp_receiver import Incoming
from native.transfer.tcp_wire import (
    ABORT,
    ACK,
    ACK_TYPE,
    COMMIT,
    HDR,
    LINGER_ABORT,
    MAGIC,
    WRITE,
    FlatCache,
    IoLoop,
    send_all,
)
from pdbus.messages import TcpEndpoint, TransferProtocol

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Link:
    """The connection to one peer and the thread that feeds it."""

    peer_id: str
    address: tuple[str, int]
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


class TcpTransfer(PeerEngine):
    name = TransferProtocol.TCP.value
    endpoint_types = (TcpEndpoint,)

    def __init__(
        self,
        cache: KVCache,
        host: str = "127.0.0.1",
        port: int = 0,
        io_timeout: float = 30.0,
        connect_timeout: float = 5.0,
    ):
        super().__init__(cache, host)
        self._flat = FlatCache(cache)
        self._port = port
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self._incoming: set[Incoming] = set()
        self._listener: socket.socket | None = None
        self._io_loop: IoLoop | None = None

    @property
    def _io(self) -> IoLoop:
        with self._lock:
            if self._io_loop is None:
                self._io_loop = IoLoop("pdbus-tcp-io")
            return self._io_loop

    # ----- receiver side
    def endpoint(self) -> TcpEndpoint:
        self._check_open()
        with self._lock:
            if self._listener is None:
                self._listener = self._listen()
        port = self._listener.getsockname()[1]
        return TcpEndpoint(self.host, self._host_id, port, self._layout)

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
            incoming = Incoming(self._flat, io, conn, addr, self._incoming.discard)
            self._incoming.add(incoming)
            io.add(conn, selectors.EVENT_READ, incoming.on_event)

    # ----- PeerEngine hooks (sender side)
    def _attach(self, peer_id: str, endpoint: TcpEndpoint) -> _Link:
        link = _Link(peer_id, (endpoint.host, endpoint.port))
        self._connect(link)  # fail early if the peer cannot be reached at all
        link.thread = threading.Thread(target=self._send_loop, args=(link,), name=f"pdbus-tcp-send-{peer_id}", daemon=True)
        link.thread.start()
        return link

    def _detach(self, link: _Link) -> None:
        self._stop_link(link, f"tcp: {link.name} was closed")

    def _describe(self, peer: Peer) -> str:
        return peer.obj.name

    def _write(self, entry: PendingTransfer, peer: Peer, op: ResolvedOp) -> None:
        peer.obj.queue.put(("write", entry, op))

    def _commit(self, entry: PendingTransfer, peer: Peer) -> None:
        peer.obj.queue.put(("commit", entry, None))

    def _aborted(self, entries: list[PendingTransfer]) -> None:
        for entry in entries:
            peer = self._peers.get(entry.peer_id)
            if peer is not None:
                peer.obj.queue.put(("abort", entry, None))  # the receiver drops what it holds

    def _shutdown(self, peers: list[Peer]) -> None:
        for peer in peers:
            self._stop_link(peer.obj, "tcp transfer engine closed")
        if self._io_loop is not None:
            self._io_loop.stop()  # closes the listener, incoming connections and the selector
            self._io_loop = None
        self._listener = None
        self._incoming.clear()
        self._flat.release()

    # ----- internals
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
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
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
                        send_all(sock, [self._header(ABORT, entry.req_id)])
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
                    send_all(sock, [self._header(COMMIT, entry.req_id)])
            except OSError as e:
                what = "timed out" if isinstance(e, TimeoutError) else f"failed: {e}"
                self._break(link, sock, f"tcp: sending {entry.req_id} to {link.name} {what}")

    @staticmethod
    def _header(mtype: int, req_id: str) -> bytes:
        rid = req_id.encode()
        return HDR.pack(MAGIC, mtype, 0, 0, len(rid), 0, 0, 0, 0) + rid

    def _send_layer(self, sock: socket.socket, req_id: str, op: ResolvedOp) -> int:
        rid = req_id.encode()
        ids = np.asarray(op.dst_blocks, dtype="<u4").tobytes()
        (h0, h1), nblocks = op.dst_heads, len(op.dst_blocks)
        payload = nblocks * op.num_heads * self._flat.head_bytes
        sent = 0
        for kind in (0, 1):
            header = HDR.pack(MAGIC, WRITE, kind, op.layer, len(rid), h0, h1, nblocks, payload) + rid + ids
            regions = self._flat.regions(op.layer, kind, op.src_blocks, op.src_heads)
            send_all(sock, [header, *regions])
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
        while len(buf) >= ACK.size:
            magic, mtype, status, req_len, err_len, nbytes = ACK.unpack_from(buf)
            if magic != MAGIC or mtype != ACK_TYPE:
                self._break(link, sock, f"tcp: {link.name} sent a malformed ack")
                return
            end = ACK.size + req_len + err_len
            if len(buf) < end:
                return
            req_id = bytes(buf[ACK.size : ACK.size + req_len]).decode()
            error = bytes(buf[ACK.size + req_len : end]).decode()
            del buf[:end]
            with link.lock:
                entry = link.awaiting.pop(req_id, None)
            if entry is None:
                continue  # aborted meanwhile
            if status == 0:
                self._requests.finish(entry)
            else:
                self._requests.finish(entry, f"tcp: {link.name} refused {req_id}: {error}")
