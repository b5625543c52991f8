"""The bus on real sockets: wire round trips, garbage, registration, liveness, router restarts,
backpressure and CurveZMQ.

Everything runs on 127.0.0.1 with random ports and bounded waits. Members that must be killed,
stopped or outlive their router run in their own process (``tests/bus_peer.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from pdbus import messages as m
from pdbus import wire
from pdbus.actor import BusMember, BusServer
from pdbus.procs import wait_until
from pdbus.security import (
    client_curve_keys,
    generate_key_file,
    load_key_file,
    server_secret,
    start_authenticator,
)
from pdbus.sockets import BusError, BusFull, PeerUnreachable, bind, make_socket, send_nowait, tcp_endpoint

PEER_SCRIPT = Path(__file__).with_name("bus_peer.py")
HB = 0.2  # heartbeat interval of the liveness tests
SLACK = 0.8  # scheduling slack on a loaded 2-core machine
BIG_UINT = 2**64 - 1  # the largest integer msgpack carries
BIG_NEG = -(2**63)
TEXT = "héllo 你好 мир 👋 \u0000\u202e end"


# --------------------------------------------------------------------------- samples

KV = m.KVLayout(
    num_layers=28, num_blocks=1 << 20, num_kv_heads=2, block_size=64, head_dim=128,
    dtype="bfloat16", total_kv_heads=4, head_start=2,
)
LOAD = m.Load(
    free_blocks=1000, total_blocks=4096, running=3, waiting=1, pending_prefill_tokens=10**9, reserved_blocks=7,
    prefix_cache_queries=10**12, prefix_cache_hits=10**11, prefix_cache_blocks_reused=10**9,
)
SAMPLING = m.SamplingParams(
    max_tokens=2**31 - 1, min_tokens=1, temperature=0.7, top_p=0.95, top_k=-1, min_p=1e-300,
    seed=BIG_UINT, presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1.1,
    stop_token_ids=[2, 100_295], ignore_eos=True, logprobs=5,
    structured=m.StructuredOutput("json_schema", '{"type": "object", "title": "' + TEXT + '"}'),
)
TOKEN = m.TokenOut(
    req_id=f"req-{TEXT}",
    token_ids=[0, 1, BIG_UINT, BIG_NEG],
    finish_reason=m.FinishReason.LENGTH.value,
    logprobs=[-0.0, -1.5e-12],
    top_logprobs=[[m.TokenLogprob(5, -0.1), m.TokenLogprob(6, -2.5)], []],
    error=TEXT,
)
ENDPOINTS = {
    m.TransferProtocol.TCP: m.TPEndpoint(
        "10.0.0.1", "boot-b", [m.TcpEndpoint("10.0.0.1", "boot-b", 5555, KV), m.TcpEndpoint("10.0.0.1", "boot-b", 5556, KV)]
    ),
    m.TransferProtocol.RDMA: m.RdmaEndpoint("host-b", "boot-b", "host-b:17000", BIG_UINT, 1 << 40, KV, transport="tcp"),
}

SAMPLES: dict[type, m.Message] = {
    m.Hello: m.Hello(
        protocol=m.PROTOCOL_VERSION, instance_id="decode-hostb-8200-ab12cd", role=m.Role.DECODE.value,
        host="::1", http_port=8200, model=f"ERNIE-4.5 {TEXT}", config_hash="0" * 64, kv=KV, transfer=ENDPOINTS,
        max_num_seqs=256, max_model_len=131072, dp_rank=3, dp_size=8, tp_size=2, load=LOAD, has_tokenizer=True,
        pid=2**22,
        vocab_size=103424,
    ),
    m.Welcome: m.Welcome(protocol=m.PROTOCOL_VERSION, router_id="router-1", heartbeat_interval=0.25),
    m.Refused: m.Refused(reason=TEXT),
    m.Heartbeat: m.Heartbeat(load=LOAD),
    m.Unknown: m.Unknown(),
    m.Bye: m.Bye(reason="shutting down"),
    m.Reserve: m.Reserve(
        req_id="r1", num_tokens=10**12, lease_s=1.5, prompt_token_ids=list(range(1000)), output_token_ids=[4, 5],
        sampling=SAMPLING,
    ),
    m.Reserved: m.Reserved(req_id="r1", block_ids=list(range(0, 4096, 3)), cached_blocks=5),
    m.Busy: m.Busy(req_id="r1", reason="no free blocks"),
    m.Prefill: m.Prefill(
        req_id="r1", prompt_token_ids=list(range(1000)), sampling=SAMPLING,
        dest=m.Destination(
            instance_id="d0", protocol=m.TransferProtocol.RDMA, endpoint=ENDPOINTS[m.TransferProtocol.RDMA],
            block_ids=[9, 8, 7], kv=KV, cached_blocks=2,
        ),
        num_output_tokens=12,
    ),
    m.DestReady: m.DestReady(
        req_id="r1", block_ids=[9, 8, 7], cached_blocks=1,
        dest=m.Destination(instance_id="d1", protocol=m.TransferProtocol.TCP, endpoint=ENDPOINTS[m.TransferProtocol.TCP]),
    ),
    m.Prefilled: m.Prefilled(req_id="r1", first=TOKEN, transfer_bytes=BIG_UINT, transfer_s=0.0125),
    m.Decode: m.Decode(req_id="r1", first_token_id=4),
    m.Release: m.Release(req_id="r1"),
    m.Abort: m.Abort(req_id="r1", reason=TEXT),
    m.Tokens: m.Tokens(items=[TOKEN, m.TokenOut(req_id="r2", token_ids=[7])]),
    m.Failed: m.Failed(req_id="r1", error=TEXT, retryable=True),
    m.Generate: m.Generate(
        req_id="g1", prompt=TEXT, prompt_token_ids=[1, 2],
        messages=[{"role": "user", "content": [{"type": "text", "text": TEXT}]}], sampling=SAMPLING,
    ),
    m.TextOut: m.TextOut(
        req_id="g1", text=TEXT, token_ids=[3], finish_reason="stop", error="none", prompt_tokens=17
    ),
}


def test_samples_cover_every_message_type():
    assert set(SAMPLES) == set(m.ALL_MESSAGE_TYPES)


@pytest.mark.parametrize("cls", m.ALL_MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_message_round_trip(cls):
    msg = SAMPLES[cls]
    frames = [wire.encode(msg)]
    assert len(frames) == 1 and frames[0][:3] == wire.PREFIX
    # every field carries a non-default value, so each one really crossed the wire
    raw = msgspec.msgpack.decode(frames[0][3:])
    assert set(raw) == {"t", *cls.__struct_fields__}, f"{cls.__name__} sample leaves fields at their defaults"
    back = wire.decode(frames[0])
    assert type(back) is cls and back == msg
    assert wire.decode(memoryview(frames[0])) == msg
    assert wire.encode(back) == frames[0]
    assert wire.tag_of(back) == raw["t"]


TOKENIZER_FILES = {
    "tokenizer.json": ('{"model": {"vocab": {"▁你好": 1}}}' * 2000).encode(),
    "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
    "special_tokens_map.json": b"{}",
}


def test_hello_with_tokenizer_files_as_frames():
    frames = [wire.encode(SAMPLES[m.Hello]), *wire.pack_files(TOKENIZER_FILES)]
    assert len(frames) == 1 + 2 * len(TOKENIZER_FILES)
    hello = wire.decode(frames[0])
    assert hello.has_tokenizer
    assert wire.unpack_files([memoryview(f) for f in frames[1:]]) == TOKENIZER_FILES


@pytest.mark.parametrize("frames", [[b"a"], [b"../etc/passwd", b"x"], [b".hidden", b"x"]])
def test_unpack_files_rejects_bad_frames(frames):
    with pytest.raises(wire.WireError):
        wire.unpack_files(frames)


# --------------------------------------------------------------------------- garbage

_BODY = msgspec.msgpack.encode(SAMPLES[m.Release])
GARBAGE = {
    "random bytes": random.Random(7).randbytes(300),
    "truncated msgpack": wire.encode(SAMPLES[m.Tokens])[:-4],
    "unknown tag": wire.PREFIX + msgspec.msgpack.encode({"t": "no-such-message", "req_id": "x"}),
    "wrong field type": wire.PREFIX + msgspec.msgpack.encode({"t": "tokens", "items": "not a list"}),
    "not a map": wire.PREFIX + msgspec.msgpack.encode([1, 2, 3]),
    "other protocol version": b"PD" + bytes([m.PROTOCOL_VERSION + 1]) + _BODY,
    "bad magic": b"XY" + bytes([m.PROTOCOL_VERSION]) + _BODY,
    "empty frame": b"",
    "multi-megabyte header": wire.encode(m.Failed(req_id="x", error="e" * (3 << 20))),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_decode_rejects_garbage_with_one_line(name):
    with pytest.raises(wire.WireError) as info:
        wire.decode(GARBAGE[name])
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


# --------------------------------------------------------------------------- harness


def run(body, timeout: float = 30.0):
    """Run ``body(ctx)`` in a fresh event loop and ZeroMQ context, bounded."""

    async def main():
        ctx = zmq.asyncio.Context()
        try:
            return await asyncio.wait_for(body(ctx), timeout)
        finally:
            ctx.destroy(linger=0)

    return asyncio.run(main())


class Server(BusServer):
    """A BusServer that records what happens to it."""

    name = "bus"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.joined: asyncio.Queue = asyncio.Queue()
        self.lost: asyncio.Queue = asyncio.Queue()
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.refuse_with: str | None = None

    def accept(self, peer, hello, files):
        return self.refuse_with

    def peer_joined(self, peer):
        self.joined.put_nowait(peer)

    def peer_lost(self, peer, reason):
        self.lost.put_nowait((time.monotonic(), peer, reason))

    def on_tokens(self, peer, msg, frames):
        self.inbox.put_nowait((peer, msg, frames))

    def on_failed(self, peer, msg, frames):
        raise RuntimeError(f"handler bug on {msg.req_id}")


class Member(BusMember):
    name = "member"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.refusals: asyncio.Queue = asyncio.Queue()

    def on_text(self, peer, msg, frames):
        self.inbox.put_nowait((msg, frames))

    def on_refused(self, reason):
        self.refusals.put_nowait(reason)


def hello_for(identity: str, protocol: int = m.PROTOCOL_VERSION) -> m.Hello:
    return m.Hello(
        protocol=protocol, instance_id=identity, role="decode", host="127.0.0.1", http_port=0,
        model="tiny", config_hash="h", pid=os.getpid(),
    )


async def start_server(stack: contextlib.AsyncExitStack, ctx, **kw) -> Server:
    kw.setdefault("heartbeat_interval", HB)
    server = Server(ctx=ctx, **kw)
    stack.push_async_callback(server.close)
    server.start()
    return server


async def start_member(
    stack, ctx, server: Server, identity: str, *, wait: bool = True, protocol: int = m.PROTOCOL_VERSION, **kw
) -> Member:
    kw.setdefault("heartbeat_interval", HB)
    member = Member(server.endpoint, identity, lambda: hello_for(identity, protocol), ctx=ctx, **kw)
    stack.push_async_callback(member.close)
    member.start()
    if wait:
        await member.wait_registered(10)
    return member


def tokens(req_id: str) -> m.Tokens:
    return m.Tokens(items=[m.TokenOut(req_id=req_id, token_ids=[1])])


# --------------------------------------------------------------------------- real sockets


def test_zero_copy_payload_both_ways():
    payload = random.Random(1).randbytes(8 << 20)

    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            server = await start_server(stack, ctx)
            member = await start_member(stack, ctx, server, "rank-a")
            member.send(tokens("big"), payload)
            peer, msg, frames = await asyncio.wait_for(server.inbox.get(), 10)
            assert peer == b"rank-a" and msg.items[0].req_id == "big"
            assert len(frames) == 1
            assert isinstance(frames[0], memoryview) and isinstance(frames[0].obj, zmq.Frame)  # no copy on receipt
            assert frames[0] == payload

            server.send(b"rank-a", m.TextOut(req_id="x", text="", token_ids=[]), payload, b"tail")
            msg, frames = await asyncio.wait_for(member.inbox.get(), 10)
            assert len(frames) == 2 and frames[0] == payload and frames[1] == b"tail"
            assert isinstance(frames[0].obj, zmq.Frame)

    run(body)


def _connected(dealer: zmq.Socket, timeout_ms: int = 5000) -> None:
    """IMMEDIATE is on: a DEALER is writable only once the connection is up."""
    assert dealer.poll(timeout_ms, zmq.POLLOUT), "DEALER never connected"


def _drain(sock: zmq.Socket, count: int, deadline_s: float = 10.0) -> list[list[zmq.Frame]]:
    out = []
    deadline = time.monotonic() + deadline_s
    while len(out) < count and time.monotonic() < deadline:
        if sock.poll(100):
            out.append(sock.recv_multipart(copy=False))
    return out


def test_hello_with_files_frame_count_on_the_wire():
    ctx = zmq.Context()
    try:
        router = make_socket(ctx, zmq.ROUTER)
        port = bind(router, "127.0.0.1")
        dealer = make_socket(ctx, zmq.DEALER, identity=b"rank-f")
        dealer.connect(tcp_endpoint("127.0.0.1", port))
        _connected(dealer)
        send_nowait(dealer, [wire.encode(SAMPLES[m.Hello]), *wire.pack_files(TOKENIZER_FILES)])
        [frames] = _drain(router, 1)
        assert len(frames) == 1 + 1 + 2 * len(TOKENIZER_FILES)  # identity, header, name/content pairs
        assert frames[0].bytes == b"rank-f"
        assert wire.decode(frames[1].buffer) == SAMPLES[m.Hello]
        assert wire.unpack_files([f.buffer for f in frames[2:]]) == TOKENIZER_FILES
    finally:
        ctx.destroy(linger=0)


def test_garbage_is_logged_once_and_dropped_both_ways(caplog):
    caplog.set_level(logging.WARNING, logger="pdbus")
    cases = dict(GARBAGE, **{"no handler here": wire.encode(m.Reserve(req_id="r", num_tokens=1))})

    def new_lines(start: int, logger: str) -> list[str]:
        return [r.getMessage() for r in caplog.records[start:] if r.name == logger]

    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            server = await start_server(stack, ctx)
            member = await start_member(stack, ctx, server, "rank-g")
            for name, frame in cases.items():
                # member -> server: the garbage, then a good message that must still be handled
                start, dropped = len(caplog.records), server.dropped_frames
                await member.sock.send_multipart([frame])
                member.send(tokens(name))
                peer, msg, _ = await asyncio.wait_for(server.inbox.get(), 5)
                assert msg.items[0].req_id == name
                assert server.dropped_frames == dropped + 1, name
                lines = new_lines(start, "pdbus.bus")
                assert len(lines) == 1 and "\n" not in lines[0] and "dropped" in lines[0], (name, lines)

                # server -> member: the same
                start, dropped = len(caplog.records), member.dropped_frames
                await server.sock.send_multipart([b"rank-g", frame])
                server.send(b"rank-g", m.TextOut(req_id=name, text="", token_ids=[]))
                msg, _ = await asyncio.wait_for(member.inbox.get(), 5)
                assert msg.req_id == name
                assert member.dropped_frames == dropped + 1, name
                lines = new_lines(start, "pdbus.member")
                assert len(lines) == 1 and "\n" not in lines[0], (name, lines)

            # a handler that raises: one ERROR line, the actor lives on
            start = len(caplog.records)
            member.send(m.Failed(req_id="boom", error="x"))
            member.send(tokens("after-boom"))
            _, msg, _ = await asyncio.wait_for(server.inbox.get(), 5)
            assert msg.items[0].req_id == "after-boom"
            lines = new_lines(start, "pdbus.bus")
            assert len(lines) == 1 and "RuntimeError" in lines[0] and "boom" in lines[0]
            assert server.peers[b"rank-g"].alive and member.registered.is_set()

    run(body)


# --------------------------------------------------------------------------- registration


def test_hello_is_welcomed_with_files_and_load():
    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            server = await start_server(stack, ctx)
            member = await start_member(
                stack, ctx, server, "rank-w", files=lambda: TOKENIZER_FILES, load=lambda: m.Load(free_blocks=42)
            )
            assert member.refused is None
            peer = await asyncio.wait_for(server.joined.get(), 5)
            assert peer.identity == b"rank-w" and peer.name == "rank-w" and peer.hello.pid == os.getpid()
            assert peer.hello.has_tokenizer and peer.files == TOKENIZER_FILES
            # the first heartbeat carries the load (polled off the loop, which keeps serving)
            await asyncio.to_thread(
                wait_until, lambda: server.peers[b"rank-w"].load.free_blocks == 42, 5, "a heartbeat with load", 0.02
            )

    run(body)


def test_wrong_protocol_is_refused_and_member_reports_why():
    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            server = await start_server(stack, ctx)
            member = await start_member(stack, ctx, server, "rank-old", wait=False, protocol=m.PROTOCOL_VERSION + 1)
            reason = await asyncio.wait_for(member.refusals.get(), 5)
            assert f"protocol {m.PROTOCOL_VERSION + 1} not supported" in reason
            assert member.refused == reason
            t0 = time.monotonic()
            with pytest.raises(BusError, match="refused: protocol"):
                await member.wait_registered(10)
            assert time.monotonic() - t0 < 1.0, "a refused member must not wait for the full timeout"
            assert b"rank-old" not in server.peers and server.joined.empty()

    run(body)


def test_accept_hook_refuses_with_its_reason():
    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            server = await start_server(stack, ctx)
            server.refuse_with = "model tiny (h) differs from rank-0's big (x)"
            member = await start_member(stack, ctx, server, "rank-m", wait=False)
            assert await asyncio.wait_for(member.refusals.get(), 5) == server.refuse_with
            assert not server.peers

    run(body)


def test_unregistered_peer_is_told_unknown():
    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            server = await start_server(stack, ctx)
            raw = make_socket(ctx, zmq.DEALER, identity=b"stranger")
            stack.callback(raw.close, 0)
            raw.connect(server.endpoint)
            for msg in (tokens("sneaky"), m.Heartbeat()):
                while True:  # IMMEDIATE: wait for the connection
                    try:
                        send_nowait(raw, [wire.encode(msg)])
                        break
                    except BusFull:
                        await asyncio.sleep(0.01)
                frames = await asyncio.wait_for(raw.recv_multipart(), 5)
                assert isinstance(wire.decode(frames[0]), m.Unknown)
            assert server.inbox.empty() and not server.peers
            with pytest.raises(PeerUnreachable):
                server.send(b"stranger", m.Abort(req_id="x"))

    run(body)


def test_close_says_bye_and_server_forgets_at_once():
    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            server = await start_server(stack, ctx, heartbeat_interval=1.0)
            member = await start_member(stack, ctx, server, "rank-bye", heartbeat_interval=1.0)
            await asyncio.wait_for(server.joined.get(), 5)
            t0 = time.monotonic()
            await member.close()
            t_lost, peer, reason = await asyncio.wait_for(server.lost.get(), 5)
            assert peer.name == "rank-bye" and "bye" in reason
            assert t_lost - t0 < 1.0, "a clean close must not wait for 3 silent intervals"

    run(body)


# --------------------------------------------------------------------------- members in their own process


async def spawn_peer(stack, endpoint: str, identity: str, log_dir: Path, *extra: str):
    log = open(log_dir / f"{identity}.log", "wb")
    stack.callback(log.close)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(PEER_SCRIPT), "--endpoint", endpoint, "--identity", identity, "--interval", str(HB),
        *extra, stdout=asyncio.subprocess.PIPE, stderr=log,
    )

    async def reap():
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        await proc.wait()

    stack.push_async_callback(reap)
    proc.log_path = log_dir / f"{identity}.log"
    return proc


async def expect_line(proc, prefix: str, timeout: float = 20.0) -> str:
    async def read():
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError(f"peer exited before {prefix!r}:\n{proc.log_path.read_text()[-2000:]}")
            if line.decode().startswith(prefix):
                return line.decode().strip()

    return await asyncio.wait_for(read(), timeout)


def test_killed_member_is_dead_within_three_intervals(tmp_path):
    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            server = await start_server(stack, ctx)
            proc = await spawn_peer(stack, server.endpoint, "rank-k", tmp_path)
            await expect_line(proc, "registered")
            await asyncio.wait_for(server.joined.get(), 5)
            # heartbeating keeps it alive for many intervals, and carries its load
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(server.lost.get(), 5 * HB)
            assert server.peers[b"rank-k"].load.free_blocks == 7

            proc.kill()
            t_kill = time.monotonic()
            t_lost, peer, reason = await asyncio.wait_for(server.lost.get(), 10)
            assert peer.name == "rank-k" and "silent" in reason
            assert t_lost - t_kill <= 3 * HB + SLACK, f"declared dead after {t_lost - t_kill:.2f}s"
            t0 = time.monotonic()
            with pytest.raises(PeerUnreachable):
                server.send(b"rank-k", m.Abort(req_id="r"))
            assert time.monotonic() - t0 < 0.1

    run(body)


def test_stalled_member_is_unreachable_then_rejoins(tmp_path):
    """SIGSTOP keeps the TCP connection up: only the bus's own liveness can see it is gone."""

    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            server = await start_server(stack, ctx)
            proc = await spawn_peer(stack, server.endpoint, "rank-s", tmp_path)
            await expect_line(proc, "registered")
            await asyncio.wait_for(server.joined.get(), 5)

            proc.send_signal(signal.SIGSTOP)
            t_stop = time.monotonic()
            t_lost, peer, _ = await asyncio.wait_for(server.lost.get(), 10)
            assert t_lost - t_stop <= 3 * HB + SLACK
            with pytest.raises(PeerUnreachable):  # no silent queueing to a dead peer
                server.send(b"rank-s", m.Abort(req_id="r"))

            proc.send_signal(signal.SIGCONT)
            peer = await asyncio.wait_for(server.joined.get(), 3 * HB + 5)
            assert peer.name == "rank-s"
            await expect_line(proc, "registered", 5)
            server.send(b"rank-s", m.Abort(req_id="r"))  # reachable again

    run(body)


def test_member_reregisters_after_router_restart(tmp_path):
    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            first = await start_server(stack, ctx)
            port = first.port
            proc = await spawn_peer(stack, first.endpoint, "rank-r", tmp_path)
            await expect_line(proc, "registered")
            await asyncio.wait_for(first.joined.get(), 5)

            await first.close()
            deadline = time.monotonic() + 5
            while True:  # the closed listener is released by ZeroMQ's I/O thread, not at once
                try:
                    second = await start_server(stack, ctx, port=port)
                    break
                except zmq.ZMQError:
                    assert time.monotonic() < deadline, f"port {port} not free again"
                    await asyncio.sleep(0.02)
            t_restart = time.monotonic()
            peer = await asyncio.wait_for(second.joined.get(), 3 * HB + 1.0 + 5)  # 1.0: max reconnect interval
            assert peer.name == "rank-r" and proc.returncode is None
            await expect_line(proc, "registered", 5)  # the same process, registered a second time
            assert time.monotonic() - t_restart < 3 * HB + 1.0 + 5

    run(body)


# --------------------------------------------------------------------------- backpressure


def _fill(send, limit: int = 100_000) -> int:
    """Send until BusFull; return how many were accepted. Each send must return at once."""
    for i in range(limit):
        t0 = time.monotonic()
        try:
            send(i)
        except BusFull:
            return i
        finally:
            assert time.monotonic() - t0 < 0.5, "a send blocked"
    raise AssertionError(f"{limit} sends never hit the high-water mark")


def _seqs(messages: list[list[zmq.Frame]], header_index: int) -> list[int]:
    return [int(wire.decode(f[header_index].buffer).items[0].req_id) for f in messages]


@pytest.fixture
def sync_pair():
    ctx = zmq.Context()
    router = make_socket(ctx, zmq.ROUTER, hwm=4)
    port = bind(router, "127.0.0.1")
    dealer = make_socket(ctx, zmq.DEALER, identity=b"slow", hwm=4)
    dealer.connect(tcp_endpoint("127.0.0.1", port))
    _connected(dealer)
    try:
        yield router, dealer
    finally:
        ctx.destroy(linger=0)


PAYLOAD = b"x" * (64 << 10)


def test_dealer_to_stalled_router_raises_busfull_and_drops_nothing(sync_pair):
    router, dealer = sync_pair
    accepted = _fill(lambda i: send_nowait(dealer, [wire.encode(tokens(str(i))), PAYLOAD]))
    assert accepted > 0
    got = _drain(router, accepted)
    assert _seqs(got, 1) == list(range(accepted))  # every accepted message, in order
    assert not router.poll(100)  # and no more


def test_router_to_stalled_dealer_raises_busfull_and_drops_nothing(sync_pair):
    router, dealer = sync_pair
    send_nowait(dealer, [wire.encode(m.Heartbeat())])
    assert _drain(router, 1)  # the ROUTER now knows b"slow"
    with pytest.raises(PeerUnreachable):
        send_nowait(router, [wire.encode(m.Heartbeat())], identity=b"nobody")
    accepted = _fill(lambda i: send_nowait(router, [wire.encode(tokens(str(i))), PAYLOAD], identity=b"slow"))
    assert accepted > 0
    got = _drain(dealer, accepted)
    assert _seqs(got, 0) == list(range(accepted))
    assert not dealer.poll(100)


# --------------------------------------------------------------------------- CurveZMQ


def test_curve_admits_only_the_cluster_key(tmp_path):
    key, other = tmp_path / "bus.key", tmp_path / "other.key"
    generate_key_file(str(key))
    generate_key_file(str(other))
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    server_public, _ = load_key_file(str(key))
    other_public, other_secret = load_key_file(str(other))

    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            auth = start_authenticator(ctx, str(key))
            stack.callback(auth.stop)
            server = await start_server(stack, ctx, curve_secret_key=server_secret(str(key)))
            intruders = {
                "plain": None,  # no Curve at all
                "other-client-key": (server_public, other_public, other_secret),  # ZAP must refuse it
                "wrong-server-key": client_curve_keys(str(other)),  # the handshake itself fails
            }
            members = [
                await start_member(stack, ctx, server, name, wait=False, curve_client=keys)
                for name, keys in intruders.items()
            ]
            good = await start_member(stack, ctx, server, "holder", curve_client=client_curve_keys(str(key)))
            assert (await asyncio.wait_for(server.joined.get(), 5)).name == "holder"
            provider = auth.credentials_providers["*"]
            await asyncio.to_thread(wait_until, lambda: provider.num_refused, 5, "ZAP seeing the intruder's key", 0.02)
            with pytest.raises(asyncio.TimeoutError):  # a dozen more Hellos from each intruder: none joins
                await asyncio.wait_for(server.joined.get(), 6 * HB)
            assert set(server.peers) == {b"holder"} and good.registered.is_set()
            assert not any(member.registered.is_set() for member in members)

    run(body)


def test_member_adopts_the_router_heartbeat_interval():
    async def body(ctx):
        async with contextlib.AsyncExitStack() as stack:
            server = await start_server(stack, ctx)  # HB
            member = await start_member(stack, ctx, server, "rank-slow", heartbeat_interval=30.0)
            assert member.heartbeat_interval == HB
            with pytest.raises(asyncio.TimeoutError):  # heartbeats at the router's pace: never declared dead
                await asyncio.wait_for(server.lost.get(), 5 * HB)

    run(body)
