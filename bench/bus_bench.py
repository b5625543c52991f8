"""Bus latency and throughput over loopback: the real framing, sockets and actor dispatch.

    python bench/bus_bench.py [--peers actor,actor-uvloop,raw] [--rtt 5000] [--small 50000]
                              [--big 300] [--json PATH]

An echo peer runs in a second process (this script, ``--serve-peer``) and binds a ROUTER from
``pdbus.sockets.make_socket``; a DEALER client (also from the factory) registers with a Hello and
then measures, with ``Tokens`` messages (one ``TokenOut``) encoded and decoded by ``pdbus.wire``:

  rtt     one message out, the echo back, one at a time: p50 / p99 round trip (µs)
  small   one-way, pipelined (BusFull -> wait until writable), then an ack: messages/s
  1MiB    one-way ``Tokens`` + a 1 MiB binary frame (copy=False), then an ack: MiB/s and messages/s

Peers: ``actor`` is a ``pdbus.actor.BusServer`` (zmq.asyncio, the router's code path: receive
loop, ``wire.decode``, ``on_tokens`` dispatch, ``send``), ``actor-uvloop`` the same on uvloop,
``raw`` a plain blocking loop over the same socket and framing (the floor under the actor).
The issue's targets: round trip p50 <= 100 µs and >= 50,000 small messages/s one way.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import zmq

from pdbus import wire
from pdbus.messages import PROTOCOL_VERSION, Hello, TokenOut, Tokens, Welcome
from pdbus.sockets import BusFull, bind, make_socket, send_nowait, tcp_endpoint

TARGET_RTT_P50_US = 100.0
TARGET_SMALL_MSGS_S = 50_000.0
ECHO, ONE_WAY, ACK = "echo", "ow", "ack"


def small(req_id: str, token: int = 0) -> Tokens:
    return Tokens(items=[TokenOut(req_id=req_id, token_ids=[token])])


# --------------------------------------------------------------------------- the echo peer


class _Counter:
    """What both peers do with a ``Tokens``: echo it, count it, or answer the count."""

    def __init__(self):
        self.count = 0
        self.nbytes = 0

    def handle(self, msg: Tokens, frames: list) -> Tokens | None:
        tag = msg.items[0].req_id
        if tag == ECHO:
            return msg
        if tag == ONE_WAY:
            self.count += 1
            self.nbytes += sum(len(f) for f in frames)
            return None
        reply = Tokens(items=[TokenOut(req_id=ACK, token_ids=[self.count, self.nbytes])])
        self.count = self.nbytes = 0
        return reply


def run_actor_peer(port_out):
    import zmq.asyncio

    from pdbus.actor import BusServer

    class EchoServer(BusServer):
        name = "bench"

        def __init__(self, **kw):
            super().__init__(**kw)
            self.counter = _Counter()

        def on_tokens(self, peer, msg, frames):
            reply = self.counter.handle(msg, frames)
            if reply is not None:
                self.send(peer, reply)

    async def main():
        server = EchoServer(ctx=zmq.asyncio.Context(), heartbeat_interval=60.0)
        server.start()
        port_out(server.port)
        await asyncio.Event().wait()

    return main()


def run_raw_peer(port_out) -> None:
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.ROUTER)
    port_out(bind(sock, "127.0.0.1"))
    counter = _Counter()
    welcome = wire.encode(Welcome(protocol=PROTOCOL_VERSION, router_id="raw", heartbeat_interval=60.0))
    while True:
        ident, *frames = sock.recv_multipart(copy=False)
        msg = wire.decode(frames[0].buffer)
        if isinstance(msg, Hello):
            send_nowait(sock, [welcome], identity=ident.bytes)
            continue
        reply = counter.handle(msg, [f.buffer for f in frames[1:]])
        if reply is not None:
            send_nowait(sock, [wire.encode(reply)], identity=ident.bytes)


def serve_peer(kind: str) -> None:
    def port_out(port: int) -> None:
        print(f"PORT {port}", flush=True)

    if kind == "raw":
        run_raw_peer(port_out)
    elif kind == "actor-uvloop":
        import uvloop

        uvloop.run(run_actor_peer(port_out))
    else:
        asyncio.run(run_actor_peer(port_out))


# --------------------------------------------------------------------------- the client


class Client:
    def __init__(self, port: int):
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER, identity=b"bench-client")
        self.sock.connect(tcp_endpoint("127.0.0.1", port))
        if not self.sock.poll(10_000, zmq.POLLOUT):
            raise RuntimeError("peer not reachable")
        hello = Hello(
            protocol=PROTOCOL_VERSION, instance_id="bench-client", role="client", host="", http_port=0,
            model="", config_hash="", pid=os.getpid(),
        )
        self.send([wire.encode(hello)])
        reply = self.recv(10_000)
        if not isinstance(reply, Welcome):
            raise RuntimeError(f"expected Welcome, got {reply!r}")

    def send(self, frames: list) -> None:
        while True:
            try:
                send_nowait(self.sock, frames)
                return
            except BusFull:
                self.sock.poll(1000, zmq.POLLOUT)  # the real backpressure path: wait until writable

    def recv(self, timeout_ms: int = 30_000):
        if not self.sock.poll(timeout_ms):
            raise TimeoutError("no reply from the peer")
        frames = self.sock.recv_multipart(copy=False)
        return wire.decode(frames[0].buffer)

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    # -- measurements
    def rtt(self, n: int, warmup: int = 500) -> dict:
        times = []
        for i in range(warmup + n):
            t0 = time.perf_counter_ns()
            self.send([wire.encode(small(ECHO, i))])
            reply = self.recv()
            t1 = time.perf_counter_ns()
            assert reply.items[0].token_ids == [i]
            if i >= warmup:
                times.append((t1 - t0) / 1000)
        times.sort()
        return {
            "n": n,
            "p50_us": times[len(times) // 2],
            "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))],
            "min_us": times[0],
        }

    def one_way(self, n: int, payload: bytes | None = None) -> dict:
        extra = [payload] if payload is not None else []
        self._ack()  # reset the peer's counter
        t0 = time.perf_counter()
        for i in range(n):
            self.send([wire.encode(small(ONE_WAY, i)), *extra])
        count, nbytes = self._ack()
        dt = time.perf_counter() - t0
        assert count == n, f"peer counted {count} of {n}"
        out = {"n": n, "seconds": dt, "msgs_per_s": n / dt}
        if payload is not None:
            assert nbytes == n * len(payload)
            out["mib_per_s"] = nbytes / dt / (1 << 20)
        return out

    def _ack(self) -> tuple[int, int]:
        self.send([wire.encode(small(ACK))])
        reply = self.recv()
        assert reply.items[0].req_id == ACK
        count, nbytes = reply.items[0].token_ids
        return count, nbytes


def bench_peer(kind: str, args) -> dict:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve-peer", kind], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"peer {kind} did not start: {line!r}")
        client = Client(int(line.split()[1]))
        try:
            payload = os.urandom(1 << 20)
            return {
                "peer": kind,
                "rtt": client.rtt(args.rtt),
                "small": client.one_way(args.small),
                "big": client.one_way(args.big, payload),
            }
        finally:
            client.close()
    finally:
        proc.kill()
        proc.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default="actor,actor-uvloop,raw", help="comma list of actor, actor-uvloop, raw")
    p.add_argument("--rtt", type=int, default=5000, help="round trips to time")
    p.add_argument("--small", type=int, default=50_000, help="small one-way messages")
    p.add_argument("--big", type=int, default=300, help="1 MiB one-way messages")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--serve-peer", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_peer:
        serve_peer(args.serve_peer)
        return 0

    results = [bench_peer(kind.strip(), args) for kind in args.peers.split(",") if kind.strip()]
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "commit": _commit(),
    }
    print(f"bus bench {meta['date']} on {meta['host']} ({meta['cpu']}, {meta['cores']} cores, "
          f"load {meta['load_avg_1m']:.2f}), pyzmq {meta['pyzmq']} / libzmq {meta['libzmq']}, commit {meta['commit']}")
    head = f"{'peer':<14}{'rtt p50 µs':>12}{'rtt p99 µs':>12}{'small msg/s':>14}{'1MiB MiB/s':>13}{'1MiB msg/s':>12}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['peer']:<14}{r['rtt']['p50_us']:>12.1f}{r['rtt']['p99_us']:>12.1f}"
            f"{r['small']['msgs_per_s']:>14,.0f}{r['big']['mib_per_s']:>13,.0f}{r['big']['msgs_per_s']:>12,.0f}"
        )
    for r in results:
        ok_rtt = r["rtt"]["p50_us"] <= TARGET_RTT_P50_US
        ok_small = r["small"]["msgs_per_s"] >= TARGET_SMALL_MSGS_S
        print(f"{r['peer']}: rtt p50 target {TARGET_RTT_P50_US:.0f} µs {'met' if ok_rtt else 'MISSED'}, "
              f"small one-way target {TARGET_SMALL_MSGS_S:,.0f}/s {'met' if ok_small else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=2)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
