"""The ``tcp`` backend's receiving side (decode): one connection from a sender, a small state
machine fed by readable events on the I/O thread. Each message's payload is received straight
into the destination blocks with ``recvmsg_into`` over memoryviews of the cache (one view per
run of consecutive blocks, or per block when only a head slice is written): no intermediate
buffer. A COMMIT is answered with an ACK once every earlier byte of the request has landed
(TCP keeps order); a write outside the cache is read into scratch and its commit refused."""

from __future__ import annotations

import logging
import selectors
import socket
from collections.abc import Callable

import numpy as np

from native.transfer.tcp_wire import (
    ABORT,
    ACK,
    ACK_TYPE,
    COMMIT,
    HDR,
    IOV,
    MAGIC,
    MAX_REQ_ID,
    READS_PER_EVENT,
    SCRATCH,
    WRITE,
    FlatCache,
    IoLoop,
)

log = logging.getLogger("native.transfer.tcp")


class Incoming:
    """One connection from a sender; ``on_close(self)`` runs once it is gone."""

    def __init__(self, flat: FlatCache, io: IoLoop, sock: socket.socket, addr, on_close: Callable[[Incoming], None]):
        self.io, self.sock, self.addr, self.on_close = io, sock, addr, on_close
        self.flat = flat
        self.layout = flat.layout
        self.requests: dict[str, list] = {}  # req id -> [bytes landed, first error]
        self.out = bytearray()
        self._hdr = bytearray(HDR.size)
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
        for _ in range(READS_PER_EVENT):  # then back to select: other connections get a turn
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
        n = self.sock.recvmsg_into(self.targets[self.ti : self.ti + IOV])[0]
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
            magic, mtype, kind, layer, req_len, h0, h1, nblocks, payload = HDR.unpack(self._hdr)
            if magic != MAGIC or mtype not in (WRITE, COMMIT, ABORT):
                self._close("sent a malformed header: not a pdbus tcp transfer stream", malformed=True)
                return False
            if req_len > MAX_REQ_ID or nblocks > self.layout.num_blocks:
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
        if mtype == WRITE:
            blocks = np.frombuffer(extra, dtype="<u4", offset=req_len, count=nblocks)
            self._start_payload(kind, layer, h0, h1, blocks, payload)
            return True
        if mtype == COMMIT:
            nbytes, error = self.requests.pop(self.req_id, (0, None))
            self._ack(self.req_id, nbytes, error)
        elif mtype == ABORT:
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
                self._scratch = bytearray(SCRATCH)
            scratch = memoryview(self._scratch)
            self.targets = [scratch[: min(SCRATCH, payload - off)] for off in range(0, payload, SCRATCH)]
        else:
            self.targets = self.flat.regions(layer, kind, blocks, (h0, h1))
            state[0] += payload
        self.phase, self.ti = "payload", 0
        if not self.targets:
            self._start_header()

    def _ack(self, req_id: str, nbytes: int, error: str | None) -> None:
        rid, err = req_id.encode(), (error or "").encode()
        self.out += ACK.pack(MAGIC, ACK_TYPE, 1 if error else 0, len(rid), len(err), nbytes) + rid + err
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
        self.on_close(self)
        self.io.drop(self.sock)
