"""Where a CUDA ipc transfer's time goes, phase by phase (issue 15 item 5).

    python bench/ipc_phases.py [--reps 50]

The 2K shape of bench/transfer_bench.py (28 layers, 4 KV heads, block 64, head_dim 128, bf16, 32
scattered blocks, 117 MB), the receiver in another process on the same GPU. Median µs of the CUDA calls a ranged write
makes, each alone, then of: ``write`` (one ranged write: resolve, queue, id upload and the launch) and ``commit`` on the
host; ``wait`` (commit returned → handle complete); the whole request; the kernel alone on the
device (CUDA events) into the peer's IPC-mapped cache and into a local cache; and, for scale,
one device-to-device copy of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transfer_bench import SHAPES, _engine_receiver, _spawn, close_sender

from native.kernels import kv_copy
from native.transfer.base import WriteOp, create_transfer_engine


def _median_us(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e6, 1)


def _device_us(fn, reps: int) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) * 1e3 / reps, 1)


def phases(reps: int) -> dict:
    shape = SHAPES[0]
    proc, conn, endpoint = _spawn(_engine_receiver, "ipc", shape, "cuda", {})
    src = shape.cache(shape.blocks, "cuda")
    src.buffer.copy_(torch.randn(src.shape, device="cuda"))
    tx = create_transfer_engine("ipc", src, "127.0.0.1")
    tx.open_peer("decode", endpoint)
    src_blocks, dst_blocks = list(range(shape.blocks)), shape.dst_blocks()
    out: dict = {"bytes": shape.nbytes}
    try:
        w, c, wt, tot = [], [], [], []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            tx.write(f"r{i}", "decode", WriteOp(0, src_blocks, dst_blocks, num_layers=shape.layers))
            t1 = time.perf_counter()
            h = tx.commit(f"r{i}", "decode")
            t2 = time.perf_counter()
            h.wait(60)
            t3 = time.perf_counter()
            if i:
                w.append(t1 - t0), c.append(t2 - t1), wt.append(t3 - t2), tot.append(t3 - t0)
        out.update(write_us=_median_us(w), commit_us=_median_us(c), wait_us=_median_us(wt), request_us=_median_us(tot))
        peer = tx._peers["decode"].obj.buffer  # noqa: SLF001 - the mapped peer cache, for the kernel alone
        local = torch.empty_like(peer)
        ids = torch.tensor(src_blocks, device="cuda"), torch.tensor(dst_blocks, device="cuda")
        for name, dst in (("kernel_ipc_us", peer), ("kernel_local_us", local)):
            out[name] = _device_us(
                lambda d=dst: kv_copy.copy_kv_blocks(src.buffer, d, 0, shape.layers, *ids, (0, 4), (0, 4)), reps)
        flat = torch.empty(shape.nbytes, dtype=torch.uint8, device="cuda")
        flat2 = torch.empty_like(flat)
        out["device_copy_us"] = _device_us(lambda: flat2.copy_(flat), reps)
        host = []
        for _ in range(reps):
            t0 = time.perf_counter()
            kv_copy.copy_kv_blocks(src.buffer, local, 0, shape.layers, *ids, (0, 4), (0, 4))
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        out["launch_host_us"] = _median_us(host)
        out["request_gbps"] = round(shape.nbytes / (out["request_us"] * 1e-6) / 1e9, 1)
        out["device_copy_gbps"] = round(shape.nbytes / (out["device_copy_us"] * 1e-6) / 1e9, 1)
        return out
    finally:
        close_sender(tx, src, proc, conn)


def pieces(reps: int) -> dict:
    """Median host µs of each CUDA call a ranged write makes (on this host's driver)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream()
    blocks = list(range(32))
    cpu = torch.tensor([blocks, blocks])
    pinned = cpu.pin_memory()
    ev = torch.cuda.Event()
    cases = {
        "torch.tensor": lambda: torch.tensor([blocks, blocks], dtype=torch.int64),
        "pin_memory": lambda: cpu.pin_memory(),
        "to_device": lambda: pinned.to(dev, non_blocking=True),
        "wait_stream": lambda: side.wait_stream(torch.cuda.current_stream()),
        "record_wait_event": lambda: (ev.record(), side.wait_event(ev)),
        "device_stream_ctx": lambda: _enter(torch.cuda.device(dev.index), torch.cuda.stream(side)),
        "event_new_record": lambda: torch.cuda.Event().record(side),
        "event_query": lambda: ev.query(),
        "current_stream": lambda: torch.cuda.current_stream(dev.index),
    }
    out = {}
    for name, fn in cases.items():
        fn()
        xs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t0)
        out[name] = _median_us(xs)
        torch.cuda.synchronize()
    return out


def _enter(*ctxs) -> None:
    for c in ctxs:
        c.__enter__()
    for c in reversed(ctxs):
        c.__exit__(None, None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    print(json.dumps({"pieces_us": pieces(args.reps)}), flush=True)
    print(json.dumps(phases(args.reps)), flush=True)


if __name__ == "__main__":
    main()
