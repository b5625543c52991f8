"""Typed transfer endpoints on the wire, head routing between TP sizes, and handles that complete
through callbacks (no thread waits on a handle). Pure CPU: real structs, real shared memory."""

from __future__ import annotations

import threading

import msgspec
import pytest
import torch

from native.kv_cache import KVCache
from native.transfer.base import TransferError, TransferHandle, WriteOp, create_transfer_engine
from native.transfer.tp_routing import TPTransfer, all_of, route_heads
from pdbus import messages as m
from pdbus import wire

pytestmark = pytest.mark.timeout(60)

LAYERS, HEADS, BLOCK, HEAD_DIM = 2, 4, 4, 8


def layout(num_kv_heads: int = HEADS, head_start: int = 0) -> m.KVLayout:
    return m.KVLayout(LAYERS, 16, num_kv_heads, BLOCK, HEAD_DIM, "bfloat16", HEADS, head_start)


def hello(transfer) -> m.Hello:
    return m.Hello(
        protocol=m.PROTOCOL_VERSION, instance_id="d0", role="decode", host="h", http_port=1, model="x",
        config_hash="0", kv=layout(), transfer=transfer,
    )


SHM = m.ShmEndpoint("h", "boot-a", "pdbus-kv-1", 1 << 20, layout())
CUDA = m.CudaIpcEndpoint("h", "boot-a", 0, "GPU-1234", b"\x00\xff" * 32, 4096, 1 << 20, layout())
TCP = m.TcpEndpoint("h", "boot-a", 5555, layout())
RDMA = m.RdmaEndpoint("h", "boot-a", "h:17000", 1 << 40, 1 << 20, layout())
TP = m.TPEndpoint("h", "boot-a", [m.TcpEndpoint("h", "boot-a", 5555 + i, layout(2, 2 * i)) for i in range(2)])


@pytest.mark.parametrize("endpoint", [SHM, CUDA, TCP, RDMA, TP, m.SenderEndpoint("h", "boot-a")], ids=lambda e: type(e).__name__)
def test_every_endpoint_kind_crosses_the_wire_typed(endpoint):
    proto = getattr(endpoint, "protocol", m.TransferProtocol.TCP)
    msg = hello({proto: endpoint})
    back = wire.decode(wire.encode(msg))
    assert back == msg
    got = back.transfer[proto]
    assert type(got) is type(endpoint) and got == endpoint
    assert isinstance(next(iter(back.transfer)), m.TransferProtocol)
    dest = m.Destination("d0", proto, endpoint, [1, 2], layout())
    prefill = m.Prefill(req_id="r", prompt_token_ids=[1], sampling=m.SamplingParams(), dest=dest)
    assert wire.decode(wire.encode(prefill)).dest.endpoint == endpoint


def _hello_with(transfer) -> bytes:
    raw = msgspec.to_builtins(hello({}))
    raw["transfer"] = transfer
    return wire.PREFIX + msgspec.msgpack.encode({"t": "hello", **raw})


_TCP_RAW = msgspec.to_builtins(TCP)
GARBAGE = {
    "missing field": {"tcp": {"kind": "tcp", "host": "h", "host_id": "b", "layout": _TCP_RAW["layout"]}},
    "unknown kind": {"tcp": dict(_TCP_RAW, kind="carrier-pigeon")},
    "no kind": {"tcp": {k: v for k, v in _TCP_RAW.items() if k != "kind"}},
    "unknown protocol": {"pigeon": _TCP_RAW},
    "wrong type": {"tcp": dict(_TCP_RAW, port="5555")},
    "a dict, not an endpoint": {"tcp": "10.0.0.1:5555"},
    "empty TP ranks": {"tcp": {"kind": "tp", "host": "h", "host_id": "b", "ranks": []}},
    "mixed TP ranks": {"tcp": {"kind": "tp", "host": "h", "host_id": "b", "ranks": msgspec.to_builtins([TCP, RDMA])}},
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_endpoint_is_refused_at_decode_with_one_line(name):
    with pytest.raises(wire.WireError) as info:
        wire.decode(_hello_with(GARBAGE[name]))
    text = str(info.value)
    assert "\n" not in text and len(text) < 300 and "$.transfer" in text, text


def test_a_backend_refuses_an_endpoint_of_another_kind():
    src = KVCache(LAYERS, 16, HEADS, BLOCK, HEAD_DIM, torch.bfloat16)
    tx = create_transfer_engine("tcp", src)
    try:
        with pytest.raises(TransferError, match=r"^peer d: tcp here writes into a tcp endpoint, not a shm one$"):
            tx.open_peer("d", SHM)
        with pytest.raises(TransferError, match="not open"):
            tx.write("r", "d", WriteOp(0, [0], [0]))
    finally:
        tx.close()
        src.close()


# --------------------------------------------------------------------------- head routing


def test_route_heads_between_tp_sizes():
    tp4 = m.TPEndpoint("h", "b", [m.TcpEndpoint("h", "b", 1 + i, layout(1, i)) for i in range(4)])
    # prefill TP2 rank 1 (heads 2, 3) into a TP4 decode: ranks 2 and 3, one head each
    writes = route_heads(layout(2, 2), tp4)
    assert [(w.rank, w.src_heads, w.dst_heads) for w in writes] == [(2, (0, 1), (0, 1)), (3, (1, 2), (0, 1))]
    assert writes[0].endpoint is tp4.ranks[2]
    # the same rank into a TP1 decode: one slice of its four heads
    assert [(w.rank, w.src_heads, w.dst_heads) for w in route_heads(layout(2, 2), TCP)] == [(0, (0, 2), (2, 4))]
    assert route_heads(layout(2, 2), TCP, sends=False) == []  # a replica: a lower rank sends it
    with pytest.raises(TransferError, match="prefill's endpoint"):
        route_heads(layout(), m.SenderEndpoint("h", "b"))


def test_tp_transfer_writes_head_slices_into_every_decode_rank():
    """A TP1 prefill into a TP2 decode (two shm caches of two heads each): the handle it returns
    completes through the parts' callbacks once both ranks' writes landed."""
    src = KVCache(LAYERS, 16, HEADS, BLOCK, HEAD_DIM, torch.bfloat16)
    src.buffer.copy_(torch.randn(src.shape, generator=torch.Generator().manual_seed(1)))
    dsts = [
        KVCache(LAYERS, 8, 2, BLOCK, HEAD_DIM, torch.bfloat16, shared=True, total_kv_heads=HEADS, head_start=2 * i)
        for i in range(2)
    ]
    receivers = [create_transfer_engine("ipc", c) for c in dsts]
    tx = TPTransfer(create_transfer_engine("ipc", src))
    dest = m.TPEndpoint("127.0.0.1", receivers[0].endpoint().host_id, [r.endpoint() for r in receivers])
    dest = msgspec.msgpack.decode(msgspec.msgpack.encode(dest), type=m.Endpoint)  # as the router sends it
    try:
        tx.open_peer("decode", dest)
        tx.open_peer("decode", dest)  # idempotent
        for layer in range(LAYERS):
            tx.write("r", "decode", WriteOp(layer, [3, 5], [1, 0]))
        handle = tx.commit("r", "decode")
        seen = threading.Event()
        calls = []
        handle.add_done_callback(lambda h: (calls.append(h), seen.set()))
        assert seen.wait(30)
        handle.wait(0)
        # 2 ranks x 2 blocks x (K, V) x layers, one rank's block of K or V each
        assert calls == [handle] and handle.nbytes == 2 * 2 * 2 * LAYERS * dsts[0].block_bytes
        for i, cache in enumerate(dsts):
            heads = slice(2 * i, 2 * i + 2)
            assert torch.equal(cache.buffer[:, :, 1], src.buffer[:, :, 3, heads])
            assert torch.equal(cache.buffer[:, :, 0], src.buffer[:, :, 5, heads])
        with pytest.raises(TransferError, match="not open"):
            tx.write("r2", "elsewhere", WriteOp(0, [0], [0]))
    finally:
        tx.close()
        for r, c in zip(receivers, dsts, strict=True):
            r.close()
            c.close()
        src.close()


# --------------------------------------------------------------------------- handle callbacks


def test_all_of_completes_once_every_part_has_without_a_thread():
    threads = threading.active_count()
    parts = [TransferHandle("r") for _ in range(3)]
    combined = all_of("r", parts)
    calls: list[tuple[TransferHandle, threading.Thread]] = []
    combined.add_done_callback(lambda h: calls.append((h, threading.current_thread())))
    parts[2].set_done(100, 0.5)
    parts[0].set_done(10, 0.1)
    assert not combined.done() and calls == []
    assert threading.active_count() == threads  # nothing waits on the parts
    worker = threading.Thread(target=parts[1].set_done, args=(1, 0.2))
    worker.start()
    worker.join()
    assert combined.done() and combined.error is None
    assert (combined.nbytes, combined.seconds) == (111, 0.5)
    assert calls == [(combined, worker)]  # once, on the thread that completed the last part
    late = []
    combined.add_done_callback(late.append)  # already done: called at once, here
    assert late == [combined]
    assert threading.active_count() == threads


def test_all_of_fails_when_any_part_fails_but_only_after_all_are_done():
    parts = [TransferHandle("r") for _ in range(3)]
    combined = all_of("r", parts)
    calls = []
    combined.add_done_callback(calls.append)
    parts[1].set_failed("TP rank 1: peer d was closed")
    assert not combined.done()  # a byte of another part may still land: wait for it
    parts[0].set_done(5)
    parts[2].set_failed("second error")
    assert calls == [combined]
    with pytest.raises(TransferError, match=r"^TP rank 1: peer d was closed$"):
        combined.wait(0)


def test_all_of_edge_cases():
    one = TransferHandle("r")
    assert all_of("r", [one]) is one
    empty = all_of("r", [])
    assert empty.done() and empty.error is None and empty.nbytes == 0
    done = [TransferHandle("r") for _ in range(2)]
    for h in done:
        h.set_done(7)
    assert all_of("r", done).nbytes == 14  # parts already complete: completes at once
