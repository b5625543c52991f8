"""``ipc`` on CPU: the decode's KV cache lives in POSIX shared memory; the prefill maps it.

Receiver: the cache is built with ``KVCache(shared=True)``; the endpoint (``ShmEndpoint``) names
the segment. Sender: maps the segment once per peer and copies each layer as the forward hands
it over (``write``, on the engine thread: K and V of the layer's block runs, a memcpy), so the
request's bytes have all landed when ``commit`` is called, which completes its handle at once.

Why not a copy thread: a layer of a CPU cache is a few hundred KiB at most, microseconds of
memcpy, while a hand-off to a worker costs a queue put, a wake-up and a GIL round trip per layer
per request, contending with the forward on the same interpreter. Measured on the 2-core box
(32 prompts of 64 tokens arriving at once): the worker finished the wave's copies ~100 ms after
the forward; inline, the handles complete with the step. A peer on another machine is refused
(the endpoint carries the boot id of its host).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import torch

from native.kv_cache import DTYPES, KVCache
from native.transfer.base import TransferError
from native.transfer.blocks import ResolvedOp, copy_blocks
from native.transfer.peers import Peer, PeerEngine, PendingTransfer
from pdbus.messages import ShmEndpoint, TransferProtocol

_SHM_DIR = "/dev/shm"


@dataclass(eq=False)
class _Mapping:
    mmap: mmap.mmap
    buffer: torch.Tensor  # the peer's whole cache, [layers, 2, blocks, heads, block_size, head_dim]


def _map_segment(name: str) -> mmap.mmap:
    """Map an existing POSIX shm segment read-write.

    Opened through /dev/shm rather than ``SharedMemory(create=False)``: before Python 3.13 the
    latter registers the segment with this process's resource tracker, which would unlink it
    at exit while the decode that owns it still runs (and confuses the owner's own tracker
    when both sides live in one process).
    """
    fd = os.open(os.path.join(_SHM_DIR, name.lstrip("/")), os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class ShmTransfer(PeerEngine):
    name = TransferProtocol.IPC.value
    endpoint_types = (ShmEndpoint,)
    same_host_only = True

    def __init__(self, cache: KVCache, host: str = "127.0.0.1"):
        if cache.device.type != "cpu":
            raise TransferError("the shm ipc backend is for CPU caches; GPU caches use CUDA IPC")
        super().__init__(cache, host)

    def endpoint(self) -> ShmEndpoint:
        if self.cache.shm_name is None:
            raise TransferError("ipc on CPU needs the receiving KVCache built with shared=True")
        return ShmEndpoint(self.host, self._host_id, self.cache.shm_name, self.cache.nbytes, self._layout)

    def _attach(self, peer_id: str, endpoint: ShmEndpoint) -> _Mapping:
        try:
            mapped = _map_segment(endpoint.shm_name)
        except FileNotFoundError:
            raise TransferError(f"peer {peer_id}: shared memory {endpoint.shm_name} does not exist") from None
        layout = endpoint.layout
        shape = (layout.num_layers, 2, layout.num_blocks, layout.num_kv_heads, layout.block_size, layout.head_dim)
        dtype = DTYPES[layout.dtype]
        numel = 1
        for s in shape:
            numel *= s
        if len(mapped) < numel * torch.empty((), dtype=dtype).element_size():
            mapped.close()
            raise TransferError(f"peer {peer_id}: shared memory {endpoint.shm_name} is smaller than its layout")
        buffer = torch.frombuffer(mapped, dtype=dtype, count=numel).view(shape)
        return _Mapping(mapped, buffer)

    def _write(self, entry: PendingTransfer, peer: Peer, op: ResolvedOp) -> None:
        try:
            entry.nbytes += copy_blocks(self.cache.buffer, peer.obj.buffer, op)
        except Exception as e:  # noqa: BLE001 - the request fails, the step and the engine live on
            self._requests.finish(entry, f"ipc transfer of {entry.req_id} to {peer.peer_id} failed: {e}")

    def _commit(self, entry: PendingTransfer, peer: Peer) -> None:
        self._requests.finish(entry)  # every write ran inline: the bytes are there

    def _detach(self, peer: _Mapping) -> None:
        peer.buffer = None  # type: ignore[assignment] - drop the export before unmapping
        try:
            peer.mmap.close()
        except BufferError:
            pass  # a view still alive elsewhere keeps the mapping until it is collected
