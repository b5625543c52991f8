"""CUDA IPC transfer: two processes on one GPU (and across two GPUs when there are two).

Marked ``gpu``: skipped without CUDA (and without cupy, which exports the IPC handles).
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing as mp
import threading

import msgspec
import pytest
import torch

from native.kernels import kv_copy
from native.kv_cache import KVCache
from native.transfer import cuda_ipc
from native.transfer.base import TransferError, WriteOp, create_transfer_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs cupy for CUDA IPC handles"),
]

LAYERS, HEADS, BLOCK, HEAD_DIM = 4, 4, 16, 64


def make_cache(num_blocks: int, device: str, seed: int | None = None, **kw) -> KVCache:
    args = dict(num_layers=LAYERS, num_kv_heads=HEADS, block_size=BLOCK, head_dim=HEAD_DIM, dtype=torch.bfloat16)
    args.update(kw)
    cache = KVCache(num_blocks=num_blocks, device=device, **args)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        cache.buffer.copy_(torch.randn(cache.shape, generator=gen))
    return cache


def _receiver_main(device: str, num_blocks: int, num_layers: int, conn) -> None:
    torch.cuda.set_device(device)
    # a small allocation first, so the cache does not start its CUDA allocation (offset != 0)
    pad = torch.empty(3 << 20, dtype=torch.uint8, device=device)
    cache = make_cache(num_blocks, device, num_layers=num_layers)
    rx = create_transfer_engine("ipc", cache)
    conn.send(rx.endpoint())
    while conn.recv() == "dump":
        conn.send_bytes(cache.buffer.view(torch.uint8).cpu().numpy().tobytes())
    rx.close()
    del pad
    conn.send("closed")


class Receiver:
    def __init__(self, device: str, num_blocks: int = 32, num_layers: int = LAYERS):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_receiver_main, args=(device, num_blocks, num_layers, child), daemon=True)
        self.proc.start()
        child.close()
        assert self.conn.poll(120), "receiver did not start"
        self.endpoint = self.conn.recv()
        self.shape = (num_layers, 2, num_blocks, HEADS, BLOCK, HEAD_DIM)

    def buffer(self) -> torch.Tensor:
        self.conn.send("dump")
        assert self.conn.poll(60)
        return torch.frombuffer(bytearray(self.conn.recv_bytes()), dtype=torch.bfloat16).view(self.shape).clone()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send("stop")
            self.conn.poll(60)
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
        self.conn.close()


def expected(shape, src: torch.Tensor, plans) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.bfloat16)
    src = src.cpu()
    for pairs, (s0, s1), (d0, d1) in plans:
        for s, d in pairs:
            out[:, :, d, d0:d1] = src[:, :, s, s0:s1]
    return out


def _transfer_and_check(rx: Receiver, src_device: str) -> None:
    src = make_cache(24, src_device, seed=1)
    tx = create_transfer_engine("ipc", src)
    try:
        tx.open_peer("decode0", rx.endpoint)
        assert rx.endpoint.offset > 0  # the cache sits inside a larger allocation
        sliced = (list(zip([1, 3, 5, 7, 8, 9, 0], [0, 2, 4, 6, 10, 11, 13], strict=True)), (2, 4), (0, 2))
        whole = (list(zip([2, 3, 4, 10, 11, 12], [20, 21, 22, 30, 17, 18], strict=True)), (0, HEADS), (0, HEADS))
        run = (list(zip([14, 15], [24, 25], strict=True)), (0, HEADS), (0, HEADS))  # one contiguous run
        handles = []
        for n, (pairs, sh, dh) in enumerate([sliced, whole, run]):
            src_blocks, dst_blocks = [p[0] for p in pairs], [p[1] for p in pairs]
            for layer in range(LAYERS):
                tx.write(f"r{n}", "decode0", WriteOp(layer, src_blocks, dst_blocks, sh, dh))
            handles.append(tx.commit(f"r{n}", "decode0"))
        for h in handles:
            h.wait(60)
        assert torch.equal(rx.buffer(), expected(rx.shape, src.buffer, [sliced, whole, run]))
    finally:
        tx.close()
        src.close()


def test_cuda_ipc_two_processes_one_gpu():
    rx = Receiver("cuda:0")
    try:
        _transfer_and_check(rx, "cuda:0")
    finally:
        rx.stop()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_ipc_across_two_gpus():
    rx = Receiver("cuda:1")
    try:
        _transfer_and_check(rx, "cuda:0")
    finally:
        rx.stop()


def test_cuda_ipc_28_layers_land_in_a_few_launches():
    """A 28-layer model's writes, interleaved over three requests (scattered blocks with head
    slices, scattered whole blocks, one run of whole blocks): every byte lands, each request's
    bytes are counted, and each request takes at most ceil(28 / FLUSH_LAYERS) + 1 launches."""
    layers = 28
    rx = Receiver("cuda:0", num_blocks=80, num_layers=layers)
    src = make_cache(48, "cuda:0", seed=3, num_layers=layers)
    tx = create_transfer_engine("ipc", src)
    try:
        tx.open_peer("decode0", rx.endpoint)
        gen = torch.Generator().manual_seed(4)
        src_ids = torch.randperm(40, generator=gen).tolist()
        dst_ids = torch.randperm(64, generator=gen).tolist()
        plans = {
            "sliced": (list(zip(src_ids[:12], dst_ids[:12], strict=True)), (1, 3), (2, 4)),
            "whole": (list(zip(src_ids[12:30], dst_ids[12:30], strict=True)), (0, HEADS), (0, HEADS)),
            "run": (list(zip(range(40, 48), range(70, 78), strict=True)), (0, HEADS), (0, HEADS)),
        }
        before = kv_copy.launches
        for layer in range(layers):
            for req, (pairs, sh, dh) in plans.items():
                tx.write(req, "decode0", WriteOp(layer, [p[0] for p in pairs], [p[1] for p in pairs], sh, dh))
        handles = {req: tx.commit(req, "decode0") for req in plans}
        for h in handles.values():
            h.wait(60)
        assert kv_copy.launches - before <= len(plans) * (math.ceil(layers / cuda_ipc.FLUSH_LAYERS) + 1)
        # every layer in one write: one launch, the same bytes
        pairs, sh, dh = plans["whole"]
        before = kv_copy.launches
        tx.write("ranged", "decode0", WriteOp(0, [p[0] for p in pairs], [p[1] for p in pairs], sh, dh, layers))
        ranged = tx.commit("ranged", "decode0")
        ranged.wait(60)
        assert kv_copy.launches - before == 1 and ranged.nbytes == handles["whole"].nbytes
        for req, (pairs, (s0, s1), _) in plans.items():
            assert handles[req].nbytes == 2 * layers * len(pairs) * (s1 - s0) * BLOCK * HEAD_DIM * 2
        assert torch.equal(rx.buffer(), expected(rx.shape, src.buffer, plans.values()))
    finally:
        tx.close()
        src.close()
        rx.stop()


def test_cuda_ipc_waits_for_the_compute_stream():
    """The copy must see a layer that a kernel on the compute stream is still writing."""
    rx = Receiver("cuda:0")
    src = make_cache(24, "cuda:0")
    tx = create_transfer_engine("ipc", src)
    try:
        tx.open_peer("d", rx.endpoint)
        big = torch.randn(4096, 4096, device="cuda:0")
        for layer in range(LAYERS):
            (big @ big).sum()  # keep the compute stream busy ahead of the fill
            src.k[layer].fill_(layer + 1)
            src.v[layer].fill_(-(layer + 1))
            tx.write("r", "d", WriteOp(layer, list(range(8)), list(range(8, 16))))
        tx.commit("r", "d").wait(60)
        got = rx.buffer()
        for layer in range(LAYERS):
            assert torch.all(got[layer, 0, 8:16] == layer + 1)
            assert torch.all(got[layer, 1, 8:16] == -(layer + 1))
    finally:
        tx.close()
        src.close()
        rx.stop()


def test_cuda_ipc_abort_close_and_refusals():
    threads_before = set(threading.enumerate())
    rx = Receiver("cuda:0")
    src = make_cache(24, "cuda:0", seed=2)
    tx = create_transfer_engine("ipc", src)
    try:
        with pytest.raises(TransferError, match="one host"):
            tx.open_peer("x", msgspec.structs.replace(rx.endpoint, host_id="elsewhere"))
        with pytest.raises(TransferError, match="block_size"):
            other = msgspec.structs.replace(rx.endpoint.layout, block_size=32)
            tx.open_peer("x", msgspec.structs.replace(rx.endpoint, layout=other))
        tx.open_peer("d", rx.endpoint)
        tx.write("gone", "d", WriteOp(0, [0], [0]))
        tx.abort("gone")
        tx.write("gone", "d", WriteOp(1, [1], [1]))  # after the abort: dropped
        with pytest.raises(TransferError, match="aborted"):
            tx.commit("gone", "d").wait(10)
        assert torch.count_nonzero(rx.buffer()[1]) == 0
        tx.write("late", "d", WriteOp(0, [2], [2]))
        tx.close_peer("d")
        with pytest.raises(TransferError, match="not open"):
            tx.write("late", "d", WriteOp(0, [2], [2]))
    finally:
        tx.close()
        src.close()
        rx.stop()
    assert set(threading.enumerate()) - threads_before == set()
