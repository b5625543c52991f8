"""KV transfer throughput: every backend against the copies that bound it.

    python bench/transfer_bench.py [--reps 5] [--only memcpy,socket,ipc,tcp,rdma,cuda] [--json]

For each KV shape it times, with the receiver in another process where one exists:
  memcpy      one torch copy of the same number of bytes (the memory-bandwidth ceiling)
  blockcopy   the gather/scatter block copy of one layer at a time, in one process
  socket      sendall / recv_into of the same bytes over loopback (the TCP ceiling)
  ipc         shared-memory ipc backend (CPU) / CUDA ipc backend (GPU)
  tcp         the project's tcp backend
  rdma-tcp    the Mooncake adapter over Mooncake's own TCP transport (if installed)
  cuda-copy   device-to-device copy of the same bytes (with CUDA)
A transfer is timed from the first write to the handle's completion; the table shows the
median over ``--reps`` runs after one warm-up, and the best run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from native.kv_cache import KVCache
from native.transfer.base import WriteOp, create_transfer_engine
from native.transfer.blocks import ResolvedOp, copy_blocks


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    kv_heads: int
    block_size: int
    head_dim: int
    blocks: int  # blocks per request
    scattered: bool  # destination block ids scattered over a pool twice as large

    def cache(self, num_blocks: int, device: str = "cpu", shared: bool = False) -> KVCache:
        return KVCache(
            self.layers, num_blocks, self.kv_heads, self.block_size, self.head_dim, torch.bfloat16, device, shared
        )

    @property
    def nbytes(self) -> int:
        return 2 * self.layers * self.blocks * self.kv_heads * self.block_size * self.head_dim * 2

    def dst_blocks(self) -> list[int]:
        if not self.scattered:
            return list(range(self.blocks))
        gen = torch.Generator().manual_seed(0)
        return torch.randperm(2 * self.blocks, generator=gen)[: self.blocks].tolist()


SHAPES = [
    # ERNIE-4.5-21B-A3B-like: 28 layers, 4 KV heads, head_dim 128, block 64, a 2K-token prompt
    Shape("21B-A3B 2K prompt", 28, 4, 64, 128, 32, True),
    # large messages: 512 KiB per block and layer, 16 MiB per layer's K
    Shape("big blocks", 8, 8, 256, 128, 32, False),
]


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------- receivers


def _engine_receiver(protocol: str, shape: Shape, device: str, env: dict, conn) -> None:
    os.environ.update(env)
    cache = shape.cache(2 * shape.blocks, device, shared=protocol == "ipc" and device == "cpu")
    kwargs = {"use_tcp": True} if protocol == "rdma" else {}
    rx = create_transfer_engine(protocol, cache, "127.0.0.1", **kwargs)
    conn.send(rx.endpoint())
    conn.recv()  # stop
    rx.close()
    cache.close()


def socket_sink(lsock: socket.socket, nbytes: int) -> None:
    """The raw-socket ceiling's receiver: accept one sender, read ``nbytes`` at a time into one
    buffer and ack each with a byte, until the sender closes."""
    view = memoryview(bytearray(nbytes))
    sock, _ = lsock.accept()
    with sock:
        while True:
            got = 0
            while got < nbytes:
                n = sock.recv_into(view[got:])
                if n == 0:
                    return
                got += n
            sock.sendall(b"k")


def _socket_receiver(nbytes: int, conn) -> None:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        conn.send(lsock.getsockname()[1])
        socket_sink(lsock, nbytes)


def _spawn(target, *args):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    child.close()
    if not parent.poll(120):
        proc.kill()
        raise TimeoutError(f"{target.__name__} did not start")
    return proc, parent, parent.recv()


# --------------------------------------------------------------------------- measurements


def bench_memcpy(shape: Shape, reps: int, device: str = "cpu") -> list[float]:
    src = torch.empty(shape.nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()

    return timed(run, reps)


def bench_blockcopy(shape: Shape, reps: int, device: str = "cpu") -> list[float]:
    src, dst = shape.cache(shape.blocks, device), shape.cache(2 * shape.blocks, device)
    heads = (0, shape.kv_heads)
    ops = [ResolvedOp(layer, list(range(shape.blocks)), shape.dst_blocks(), heads, heads) for layer in range(shape.layers)]

    def run():
        for op in ops:
            copy_blocks(src.buffer, dst.buffer, op)
        if device != "cpu":
            torch.cuda.synchronize()

    try:
        return timed(run, reps)
    finally:
        src.close()
        dst.close()


def bench_socket(shape: Shape, reps: int) -> list[float]:
    proc, conn, port = _spawn(_socket_receiver, shape.nbytes)
    payload = memoryview(bytearray(os.urandom(1 << 20)) * (shape.nbytes >> 20) + bytearray(shape.nbytes % (1 << 20)))
    chunk = shape.nbytes // (2 * shape.layers)  # one message per layer's K or V, as the backends send
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def run():
        for off in range(0, shape.nbytes, chunk):
            sock.sendall(payload[off : off + chunk])
        assert sock.recv(1) == b"k"

    try:
        return timed(run, reps)
    finally:
        sock.close()
        proc.join(30)
        conn.close()


def bench_engine(protocol: str, shape: Shape, reps: int, device: str = "cpu", ranged: bool = False) -> list[float]:
    """Writes layer by layer, as the prefill's layer hook does, or (``ranged``) all layers in
    one write (``WriteOp.num_layers``), then commit and wait."""
    env = {"PDBUS_MOONCAKE_TCP": "1"} if protocol == "rdma" else {}
    proc, conn, endpoint = _spawn(_engine_receiver, protocol, shape, device, env)
    src = shape.cache(shape.blocks, device)
    src.buffer.copy_(torch.randn(src.shape, device=device))
    kwargs = {"use_tcp": True} if protocol == "rdma" else {}
    tx = create_transfer_engine(protocol, src, "127.0.0.1", **kwargs)
    tx.open_peer("decode", endpoint)
    src_blocks, dst_blocks = list(range(shape.blocks)), shape.dst_blocks()
    count = [0]

    def run():
        count[0] += 1
        req = f"req{count[0]}"
        if ranged:
            tx.write(req, "decode", WriteOp(0, src_blocks, dst_blocks, num_layers=shape.layers))
        else:
            for layer in range(shape.layers):
                tx.write(req, "decode", WriteOp(layer, src_blocks, dst_blocks))
        tx.commit(req, "decode").wait(120)

    try:
        return timed(run, reps)
    finally:
        close_sender(tx, src, proc, conn)


def close_sender(tx, src, proc, conn) -> None:
    """Close a sender's engine and cache and stop its receiver process."""
    tx.close()
    src.close()
    conn.send("stop")
    proc.join(30)
    if proc.is_alive():
        proc.kill()
    conn.close()


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated subset of: memcpy,blockcopy,socket,ipc,tcp,rdma,cuda")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    only = {x for x in args.only.split(",") if x}
    want = lambda name: not only or name in only  # noqa: E731
    have_mooncake = importlib.util.find_spec("mooncake") is not None
    have_cuda = torch.cuda.is_available()

    rows = []
    for shape in SHAPES:
        cases = [
            ("memcpy", "memcpy", lambda s=shape: bench_memcpy(s, args.reps)),
            ("blockcopy", "blockcopy", lambda s=shape: bench_blockcopy(s, args.reps)),
            ("socket", "socket", lambda s=shape: bench_socket(s, args.reps)),
            ("ipc", "shm ipc", lambda s=shape: bench_engine("ipc", s, args.reps)),
            ("tcp", "tcp", lambda s=shape: bench_engine("tcp", s, args.reps)),
        ]
        if have_mooncake:
            cases.append(("rdma", "mooncake-tcp", lambda s=shape: bench_engine("rdma", s, args.reps)))
        if have_cuda:
            cases += [
                ("cuda", "cuda-copy", lambda s=shape: bench_memcpy(s, args.reps, "cuda")),
                ("cuda", "cuda-blockcopy", lambda s=shape: bench_blockcopy(s, args.reps, "cuda")),
                ("cuda", "cuda ipc", lambda s=shape: bench_engine("ipc", s, args.reps, "cuda")),
                ("cuda", "cuda ipc 1 write", lambda s=shape: bench_engine("ipc", s, args.reps, "cuda", ranged=True)),
            ]
        for key, name, fn in cases:
            if not want(key):
                continue
            try:
                secs = fn()
            except Exception as e:  # one backend failing must not hide the others' figures
                rows.append({"shape": shape.name, "method": name, "error": f"{type(e).__name__}: {e}"})
                continue
            med = statistics.median(secs)
            rows.append(
                {
                    "shape": shape.name,
                    "method": name,
                    "bytes": shape.nbytes,
                    "median_s": med,
                    "gbps_median": shape.nbytes / med / 1e9,
                    "gbps_best": shape.nbytes / min(secs) / 1e9,
                }
            )
            if not args.json:
                print(f"  ... {shape.name}: {name} done", file=sys.stderr)

    info = {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if have_cuda else None,
        "reps": args.reps,
    }
    if args.json:
        print(json.dumps({"info": info, "results": rows}, indent=2))
        return
    print(f"# {info}")
    print(f"| {'shape':<18} | {'method':<15} | {'MB':>7} | {'median ms':>9} | {'GB/s':>6} | {'best GB/s':>9} |")
    print(f"|{'-' * 20}|{'-' * 17}|{'-' * 9}|{'-' * 11}|{'-' * 8}|{'-' * 11}|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']:<18} | {r['method']:<15} | error: {r['error']}")
            continue
        print(
            f"| {r['shape']:<18} | {r['method']:<15} | {r['bytes'] / 1e6:7.1f} | {r['median_s'] * 1e3:9.2f} "
            f"| {r['gbps_median']:6.2f} | {r['gbps_best']:9.2f} |"
        )


if __name__ == "__main__":
    main()
