"""KV transfer backends on CPU: shm ``ipc``, ``tcp``, and Mooncake over its own TCP (``rdma``).

Real sockets on loopback and random ports, real shared memory, receivers in spawned processes
where a process boundary matters (correctness across processes, a receiver killed mid-way).
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing as mp
import os
import signal
import socket
import threading
import time

import msgspec
import pytest
import torch

from native.kv_cache import KVCache
from native.transfer.base import TransferError, WriteOp, create_transfer_engine

pytestmark = pytest.mark.timeout(120)

HAVE_MOONCAKE = importlib.util.find_spec("mooncake") is not None
mooncake_reason = "mooncake-transfer-engine is not installed"

LAYERS, HEADS, BLOCK, HEAD_DIM = 3, 4, 8, 16
PROTOCOLS = [
    "ipc",
    "tcp",
    pytest.param("rdma", marks=pytest.mark.skipif(not HAVE_MOONCAKE, reason=mooncake_reason)),
]
# (src blocks, dst blocks): out of order, with gaps, and one run of consecutive ids
SRC_BLOCKS = [1, 3, 5, 7, 8, 9, 0]
DST_BLOCKS = [0, 2, 4, 6, 10, 11, 13]


def make_cache(num_blocks: int, seed: int | None = None, shared: bool = False, **kw) -> KVCache:
    args = dict(num_layers=LAYERS, num_kv_heads=HEADS, block_size=BLOCK, head_dim=HEAD_DIM, dtype=torch.bfloat16)
    args.update(kw)
    cache = KVCache(num_blocks=num_blocks, shared=shared, **args)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        cache.buffer.copy_(torch.randn(cache.shape, generator=gen))
    return cache


def engine(protocol: str, cache: KVCache, **kwargs):
    if protocol == "rdma":
        kwargs["use_tcp"] = True
    return create_transfer_engine(protocol, cache, "127.0.0.1", **kwargs)


@contextlib.contextmanager
def local_pair(protocol: str, num_blocks: int, seed: int, src_blocks: int | None = None, tx_kw=None, **dst_kw):
    """(dst, src, rx, tx) in this process: a receiving cache (shared for ``ipc``; ``dst_kw`` to
    make_cache) and engine, a seeded sending cache and engine (``tx_kw`` to
    create_transfer_engine); all four closed after, senders first."""
    dst = make_cache(num_blocks, shared=protocol == "ipc", **dst_kw)
    src = make_cache(src_blocks or num_blocks, seed=seed)
    rx, tx = engine(protocol, dst), engine(protocol, src, **(tx_kw or {}))
    try:
        yield dst, src, rx, tx
    finally:
        tx.close()
        rx.close()
        src.close()
        dst.close()


def write_layers(tx, req_id, peer, src, dst, src_heads=None, dst_heads=None):
    for layer in range(LAYERS):
        tx.write(req_id, peer, WriteOp(layer, src, dst, src_heads, dst_heads))
    return tx.commit(req_id, peer)


def expected(dst_before: torch.Tensor, src: torch.Tensor, pairs, src_heads=(0, HEADS), dst_heads=(0, HEADS)):
    """What the receiving buffer must hold after copying ``pairs`` of blocks."""
    out = dst_before.clone()
    (s0, s1), (d0, d1) = src_heads, dst_heads
    for s, d in pairs:
        out[:, :, d, d0:d1] = src[:, :, s, s0:s1]
    return out


# --------------------------------------------------------------------------- receiver process


def _receiver_main(protocol: str, num_blocks: int, conn, env: dict) -> None:
    os.environ.update(env)
    cache = make_cache(num_blocks, shared=protocol == "ipc")
    rx = engine(protocol, cache)
    conn.send(rx.endpoint())
    while True:
        cmd = conn.recv()
        if cmd == "dump":
            conn.send_bytes(cache.buffer.view(torch.uint8).numpy().tobytes())
        else:
            break
    rx.close()
    cache.close()
    conn.send("closed")


class Receiver:
    """A receiving engine in a spawned process; ``buffer()`` reads its cache back."""

    def __init__(self, protocol: str, num_blocks: int = 16):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        env = {"PDBUS_MOONCAKE_TCP": "1"} if protocol == "rdma" else {}
        self.proc = ctx.Process(target=_receiver_main, args=(protocol, num_blocks, child, env), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(60):
            raise TimeoutError("receiver did not start")
        self.endpoint = self.conn.recv()
        self.num_blocks = num_blocks

    def buffer(self) -> torch.Tensor:
        self.conn.send("dump")
        assert self.conn.poll(30)
        raw = bytearray(self.conn.recv_bytes())
        shape = (LAYERS, 2, self.num_blocks, HEADS, BLOCK, HEAD_DIM)
        return torch.frombuffer(raw, dtype=torch.bfloat16).view(shape).clone()

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send("stop")
                self.conn.poll(30)
            except (BrokenPipeError, OSError):
                pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.conn.close()


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_blocks_and_head_slices_land_across_processes(protocol):
    rx = Receiver(protocol)
    src = make_cache(12, seed=1)
    tx = engine(protocol, src)
    try:
        tx.open_peer("decode0", rx.endpoint)
        tx.open_peer("decode0", rx.endpoint)  # idempotent
        # heads 2..4 of ours into heads 0..2 of theirs (prefill TP1 -> decode TP2 style)
        h1 = write_layers(tx, "r1", "decode0", SRC_BLOCKS, DST_BLOCKS, (2, 4), (0, 2))
        # all heads, a contiguous run and a scattered pair
        h2 = write_layers(tx, "r2", "decode0", [2, 3, 4, 10], [3, 7, 8, 15])
        h1.wait(30)
        h2.wait(30)
        assert h1.nbytes == LAYERS * 2 * len(SRC_BLOCKS) * 2 * BLOCK * HEAD_DIM * 2
        got = rx.buffer()
        zeros = torch.zeros_like(got)
        want = expected(zeros, src.buffer, zip(SRC_BLOCKS, DST_BLOCKS), (2, 4), (0, 2))
        want = expected(want, src.buffer, zip([2, 3, 4, 10], [3, 7, 8, 15]))
        assert torch.equal(got, want)  # written bytes equal, every other byte untouched
    finally:
        tx.close()
        src.close()
        rx.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_many_interleaved_requests(protocol):
    with local_pair(protocol, 64, seed=2) as (dst, src, rx, tx):
        tx.open_peer("d", rx.endpoint())
        num = 12
        plans = {f"req{i}": (list(range(i * 5, i * 5 + 5))[::-1], list(range(63 - i * 5, 58 - i * 5, -1))) for i in range(num)}
        for layer in range(LAYERS):  # layer by layer, every request interleaved
            for req, (s, d) in plans.items():
                tx.write(req, "d", WriteOp(layer, s, d))
        handles = [tx.commit(req, "d") for req in plans]
        for h in handles:
            h.wait(30)
        want = dst.buffer.clone()
        want.zero_()
        for s, d in plans.values():
            want = expected(want, src.buffer, zip(s, d))
        assert torch.equal(dst.buffer, want)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_abort_fails_the_handle_and_drops_later_writes(protocol):
    with local_pair(protocol, 16, seed=3) as (dst, src, rx, tx):
        tx.open_peer("d", rx.endpoint())
        tx.write("gone", "d", WriteOp(0, [0, 1], [0, 1]))
        tx.abort("gone")
        tx.write("gone", "d", WriteOp(1, [2, 3], [2, 3]))  # after the abort: must not land
        handle = tx.commit("gone", "d")
        with pytest.raises(TransferError, match="aborted"):
            handle.wait(10)
        ok = write_layers(tx, "kept", "d", [5], [9])
        ok.wait(30)
        assert torch.count_nonzero(dst.buffer[1, :, 2:4]) == 0
        assert torch.equal(dst.buffer[:, :, 9], src.buffer[:, :, 5])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_forget_drops_a_failed_request_and_its_id_may_come_again(protocol):
    """The engine failed a prefill after some of its layers were written: what is queued of it
    goes, and a retry under the same id is a new transfer (its bytes only, not refused)."""
    with local_pair(protocol, 16, seed=6) as (dst, src, rx, tx):
        tx.open_peer("d", rx.endpoint())
        tx.write("r", "d", WriteOp(0, [0, 1], [0, 1]))
        tx.forget("r")
        tx.write("r", "d", WriteOp(0, [4], [7], num_layers=src.layout().num_layers))  # the retry, ranged
        retry = tx.commit("r", "d")
        retry.wait(30)
        per_layer = 2 * src.buffer[0, 0, 0].numel() * src.buffer.element_size()
        assert retry.nbytes == per_layer * src.layout().num_layers
        assert torch.equal(dst.buffer[:, :, 7], src.buffer[:, :, 4])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_incompatible_layout_is_refused(protocol):
    with local_pair(protocol, 16, seed=4, block_size=16) as (_, _, rx, tx):
        with pytest.raises(TransferError, match="block_size 8 here vs 16 there"):
            tx.open_peer("d", rx.endpoint())
        with pytest.raises(TransferError, match="not open"):
            tx.write("r", "d", WriteOp(0, [0], [0]))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_ops_are_refused(protocol):
    with local_pair(protocol, 4, seed=5, src_blocks=8, num_kv_heads=2, total_kv_heads=HEADS) as (dst, src, rx, tx):
        tx.open_peer("d", rx.endpoint())
        with pytest.raises(TransferError, match="differ in count"):
            tx.write("r", "d", WriteOp(0, [0], [0], (0, 4), (0, 2)))
        with pytest.raises(TransferError, match="dst block id outside"):
            tx.write("r", "d", WriteOp(0, [0], [4], (0, 2), (0, 2)))
        with pytest.raises(TransferError, match="dst heads"):
            tx.write("r", "d", WriteOp(0, [0], [0], (0, 1), (2, 3)))
        tx.write("r", "d", WriteOp(2, [7, 6], [0, 3], (2, 4), (0, 2)))  # a valid one still works
        # the checks of a write are reused only while its blocks and heads repeat
        with pytest.raises(TransferError, match="layer 9 outside"):
            tx.write("r", "d", WriteOp(9, [7, 6], [0, 3], (2, 4), (0, 2)))
        with pytest.raises(TransferError, match="dst block id outside"):
            tx.write("r", "d", WriteOp(1, [7, 6], [0, 4], (2, 4), (0, 2)))
        tx.commit("r", "d").wait(30)
        assert torch.equal(dst.buffer[2, :, 3], src.buffer[2, :, 6, 2:4])


@pytest.mark.parametrize("protocol", ["ipc", "tcp"])
def test_close_leaves_no_threads_or_fds(protocol):
    threads_before = set(threading.enumerate())
    fds_before = set(os.listdir("/proc/self/fd"))
    dst = make_cache(8, shared=protocol == "ipc")
    src = make_cache(8, seed=6)
    rx, tx = engine(protocol, dst), engine(protocol, src)
    tx.open_peer("d", rx.endpoint())
    write_layers(tx, "r", "d", [0, 1], [1, 0]).wait(30)
    pending = tx.commit("never-finished", "d")
    tx.close()
    rx.close()
    tx.close()  # idempotent
    src.close()
    dst.close()
    assert pending.done()
    assert set(threading.enumerate()) - threads_before == set()
    assert set(os.listdir("/proc/self/fd")) - fds_before == set()
    with pytest.raises(TransferError, match="closed"):
        tx.write("r", "d", WriteOp(0, [0], [0]))


# --------------------------------------------------------------------------- failures


def test_tcp_receiver_killed_mid_transfer_fails_the_handle():
    rx = Receiver("tcp", num_blocks=64)
    src = make_cache(64, seed=7)
    tx = create_transfer_engine("tcp", src, "127.0.0.1", io_timeout=20.0)
    try:
        tx.open_peer("decode0", rx.endpoint)
        os.kill(rx.proc.pid, signal.SIGSTOP)  # it stops reading: the transfer stalls mid-way
        big = list(range(64))
        for i in range(200):  # 77 MB: far more than the socket buffers hold
            for layer in range(LAYERS):
                tx.write(f"r{i}", "decode0", WriteOp(layer, big, big))
        handle = tx.commit("r199", "decode0")
        first = tx.commit("r0", "decode0")
        assert not handle.done()
        os.kill(rx.proc.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TransferError, match="decode0"):
            handle.wait(15)
        with pytest.raises(TransferError, match="decode0"):
            first.wait(1)
        assert time.monotonic() - start < 10
        # the peer is gone for good: the next write tries to reconnect and fails cleanly
        rx.proc.join(10)  # (once the kernel has closed its listening socket too)
        again = write_layers(tx, "after", "decode0", [0], [0])
        with pytest.raises(TransferError, match="cannot connect to peer decode0"):
            again.wait(15)
    finally:
        tx.close()
        src.close()
        rx.stop()


def _silent_peer(endpoint_like, lsock: socket.socket):
    """``endpoint_like`` pointing at ``lsock``, which accepts connections and never answers:
    commits stay pending."""
    return msgspec.structs.replace(endpoint_like, port=lsock.getsockname()[1])


def test_tcp_close_peer_fails_pending_handles_and_reopen_works():
    with socket.create_server(("127.0.0.1", 0)) as lsock, local_pair("tcp", 16, seed=8) as (dst, src, rx, tx):
        silent = _silent_peer(rx.endpoint(), lsock)
        tx.open_peer("d", silent)
        pending = write_layers(tx, "r", "d", [1, 2], [3, 4])
        with pytest.raises(TransferError, match="timed out"):
            pending.wait(0.2)
        tx.close_peer("d")
        with pytest.raises(TransferError, match="peer d .* was closed"):
            pending.wait(5)
        tx.open_peer("d", rx.endpoint())  # the same peer id, now a live receiver
        write_layers(tx, "r2", "d", [1, 2], [3, 4]).wait(30)
        assert torch.equal(dst.buffer[:, :, 3:5], src.buffer[:, :, 1:3])


def test_tcp_send_timeout_fails_the_handle():
    with socket.create_server(("127.0.0.1", 0)) as lsock, local_pair("tcp", 64, seed=9, tx_kw={"io_timeout": 0.5}) as (_, _, rx, tx):
        silent = _silent_peer(rx.endpoint(), lsock)
        tx.open_peer("d", silent)
        big = list(range(64))
        for i in range(200):  # 26 MB: more than the never-read socket buffers take
            tx.write("r", "d", WriteOp(i % LAYERS, big, big))
        handle = tx.commit("r", "d")
        with pytest.raises(TransferError, match=r"sending r to peer d \(127.0.0.1:\d+\) timed out"):
            handle.wait(10)


def test_tcp_receiver_validates_what_arrives():
    """A crafted write outside the cache is read and dropped, and its commit is refused."""
    import numpy as np

    from native.transfer import tcp_wire as tcp

    cache = make_cache(4)
    rx = engine("tcp", cache)
    try:
        ep = rx.endpoint()
        with socket.create_connection(("127.0.0.1", ep.port), timeout=10) as sock:
            payload = bytes(range(256)) * (2 * BLOCK * HEAD_DIM * 2 // 256)  # one block, 2 heads
            rid = b"bad"
            ids = np.asarray([7], dtype="<u4").tobytes()  # block 7 of a 4-block cache
            sock.sendall(tcp.HDR.pack(tcp.MAGIC, tcp.WRITE, 0, 0, len(rid), 0, 2, 1, len(payload)) + rid + ids)
            sock.sendall(payload)
            sock.sendall(tcp.HDR.pack(tcp.MAGIC, tcp.COMMIT, 0, 0, len(rid), 0, 0, 0, 0) + rid)
            ack = b""
            while len(ack) < tcp.ACK.size:
                ack += sock.recv(4096)
            _, mtype, status, req_len, err_len, _ = tcp.ACK.unpack_from(ack)
            while len(ack) < tcp.ACK.size + req_len + err_len:
                ack += sock.recv(4096)
            assert (mtype, status) == (tcp.ACK_TYPE, 1)
            assert b"block 7 outside" in ack[tcp.ACK.size + req_len :]
            assert torch.count_nonzero(cache.buffer) == 0
        with socket.create_connection(("127.0.0.1", ep.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:  # not our protocol: the receiver hangs up (a reset when our bytes were unread)
                assert sock.recv(10) == b""
            except ConnectionResetError:
                pass
    finally:
        rx.close()
        cache.close()


def test_tcp_listens_on_the_given_host_only():
    cache = make_cache(4)
    rx = engine("tcp", cache)
    try:
        ep = rx.endpoint()
        assert ep.host == "127.0.0.1" and ep.port > 0
        assert rx._listener.getsockname()[0] == "127.0.0.1"
        assert ep.layout.block_size == BLOCK
    finally:
        rx.close()
        cache.close()


def test_shm_needs_a_shared_cache_and_the_same_host():
    plain = make_cache(4)
    shared = make_cache(4, shared=True)
    src = make_cache(4, seed=10)
    rx_plain, rx, tx = engine("ipc", plain), engine("ipc", shared), engine("ipc", src)
    try:
        with pytest.raises(TransferError, match="shared=True"):
            rx_plain.endpoint()
        with pytest.raises(TransferError, match="one host"):
            tx.open_peer("d", msgspec.structs.replace(rx.endpoint(), host_id="another-machine"))
    finally:
        for x in (rx_plain, rx, tx):
            x.close()
        for c in (plain, shared, src):
            c.close()


def test_unknown_protocol_is_refused():
    cache = make_cache(1)
    with pytest.raises(ValueError, match="unknown KV transfer protocol"):
        create_transfer_engine("carrier-pigeon", cache)
    cache.close()


# --------------------------------------------------------------------------- mooncake specifics


def test_rdma_without_a_nic_is_one_clear_error(monkeypatch, tmp_path):
    from native.transfer import mooncake

    monkeypatch.setattr(mooncake, "_IB_SYSFS", str(tmp_path / "no-infiniband"))
    monkeypatch.delenv("PDBUS_MOONCAKE_TCP", raising=False)
    monkeypatch.delenv("KVCACHE_RDMA_NICS", raising=False)
    with pytest.raises(TransferError) as e:
        mooncake.choose_protocol()
    assert "\n" not in str(e.value)
    assert "KVCACHE_RDMA_NICS" in str(e.value) and "--cache-transfer-protocol tcp" in str(e.value)
    monkeypatch.setenv("KVCACHE_RDMA_NICS", "mlx5_0,mlx5_1")
    with pytest.raises(TransferError, match="NIC mlx5_0,mlx5_1 not found"):
        mooncake.choose_protocol()
    (tmp_path / "ib").mkdir()
    (tmp_path / "ib" / "mlx5_0").mkdir()
    monkeypatch.setattr(mooncake, "_IB_SYSFS", str(tmp_path / "ib"))
    monkeypatch.setenv("KVCACHE_RDMA_NICS", "mlx5_0")
    assert mooncake.choose_protocol() == ("rdma", "mlx5_0")
    monkeypatch.setenv("PDBUS_MOONCAKE_TCP", "1")
    assert mooncake.choose_protocol() == ("tcp", "")


@pytest.mark.skipif(not HAVE_MOONCAKE, reason=mooncake_reason)
def test_rdma_receiver_killed_fails_the_handle():
    rx = Receiver("rdma")
    src = make_cache(16, seed=11)
    tx = engine("rdma", src)
    try:
        tx.open_peer("decode0", rx.endpoint)
        write_layers(tx, "ok", "decode0", [1], [1]).wait(30)
        rx.proc.kill()
        rx.proc.join(10)
        handle = write_layers(tx, "dead", "decode0", [2], [2])
        with pytest.raises(TransferError, match="decode0"):
            handle.wait(60)
    finally:
        tx.close()
        src.close()
        rx.stop()
