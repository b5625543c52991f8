"""``ipc`` on GPU: the prefill writes straight into the decode's KV pool through CUDA IPC.

Receiver: exports the allocation that holds its cache buffer with ``cudaIpcGetMemHandle``
(through cupy) and publishes the handle, the buffer's offset inside that allocation, the GPU's
uuid and the host's boot id. Sender: opens the handle once per peer (``cudaIpcOpenMemHandle``,
peer access enabled lazily), wraps the pointer as a torch tensor of the peer's cache shape,
and copies each layer with one gather and one scatter (K and V together) on a dedicated CUDA
stream that first waits for the compute stream, so the copy sees the finished layer and runs
beside the next one. ``commit`` records an event; a completion thread waits on it and
completes the handle. A decode GPU on another GPU of the host is written through a peer copy.

The prefill process must see the decode's GPU (do not narrow CUDA_VISIBLE_DEVICES to its own
GPU only; pick the device with ``torch.cuda.set_device``). cupy is imported on first use, so
this module imports on machines without it.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
from dataclasses import dataclass

import torch

from native.kv_cache import DTYPES, KVCache
from native.transfer.base import (
    RequestTable,
    TransferEngine,
    TransferError,
    TransferHandle,
    WriteOp,
    block_index,
    check_compatible,
    copy_blocks,
    host_id,
    layout_to_dict,
    peer_layout,
    resolve_op,
)
from pdbus.messages import KVLayout

log = logging.getLogger(__name__)


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise TransferError(f"ipc on GPU needs cupy (pip install cupy-cuda12x): {e}") from e
    return cupy


def _allocation_range(ptr: int) -> tuple[int, int]:
    """Base and size of the cudaMalloc allocation holding ``ptr`` (the caching allocator may
    have placed the cache inside a larger segment, and IPC handles name whole allocations)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise TransferError(f"ipc on GPU: cannot load libcuda ({e})") from None
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    rc = libcuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise TransferError(f"ipc on GPU: cuMemGetAddressRange failed (CUresult {rc})")
    return base.value, size.value


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


class _DevicePointer:
    """Presents a raw device pointer to ``torch.as_tensor`` (CUDA array interface v3)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


@dataclass(eq=False)
class _Mapped:
    peer_id: str
    endpoint: dict
    layout: KVLayout
    base: int  # what cudaIpcOpenMemHandle returned; closed with cudaIpcCloseMemHandle
    buffer: torch.Tensor  # the peer's cache, [layers, 2, blocks, heads, block_size, head_dim]
    closed: bool = False


class CudaIpcTransfer(TransferEngine):
    name = "ipc"

    def __init__(self, cache: KVCache, host: str = "127.0.0.1"):
        if cache.device.type != "cuda":
            raise TransferError("the CUDA ipc backend is for GPU caches; CPU caches use shared memory")
        super().__init__(cache, host)
        self._layout = cache.layout()
        self._index = cache.device.index if cache.device.index is not None else torch.cuda.current_device()
        self._host_id = host_id()
        self._stream = torch.cuda.Stream(device=self._index)
        self._requests = RequestTable(self.name)
        self._peers: dict[str, _Mapped] = {}
        self._lock = threading.Lock()
        self._endpoint: dict | None = None
        self._index_key: tuple | None = None
        self._block_index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # (event, entry); None stops
        self._waiter: threading.Thread | None = None
        self._closed = False

    # ----- receiver side
    def endpoint(self) -> dict:
        self._check_open()
        if self._endpoint is None:
            cp = _cupy()
            ptr = self.cache.buffer.data_ptr()
            with cp.cuda.Device(self._index):
                base, size = _allocation_range(ptr)
                handle = cp.cuda.runtime.ipcGetMemHandle(base)
            self._endpoint = {
                "protocol": "ipc",
                "kind": "cuda",
                "host": self.host,
                "host_id": self._host_id,
                "device": self._index,
                "device_uuid": _device_uuid(self._index),
                "handle": bytes(handle),
                "offset": ptr - base,
                "nbytes": self.cache.nbytes,
                "layout": layout_to_dict(self._layout),
            }
        return self._endpoint

    # ----- sender side
    def open_peer(self, peer_id: str, endpoint: dict) -> None:
        self._check_open()
        current = self._peers.get(peer_id)
        if current is not None and current.endpoint == endpoint:
            return
        layout = peer_layout(peer_id, endpoint)
        check_compatible(self._layout, layout, peer_id)
        if endpoint.get("kind") != "cuda" or "handle" not in endpoint:
            raise TransferError(f"peer {peer_id}: endpoint is not a CUDA ipc endpoint")
        if endpoint.get("host_id") != self._host_id:
            raise TransferError(f"peer {peer_id}: CUDA ipc needs both sides on one host ({endpoint.get('host')} is another)")
        uuid = endpoint.get("device_uuid")
        if uuid is not None and uuid not in {_device_uuid(i) for i in range(torch.cuda.device_count())}:
            raise TransferError(
                f"peer {peer_id}: its GPU {uuid} is not visible to this process (check CUDA_VISIBLE_DEVICES)"
            )
        if current is not None:
            self.close_peer(peer_id)
        cp = _cupy()
        try:
            with cp.cuda.Device(self._index):
                base = cp.cuda.runtime.ipcOpenMemHandle(bytes(endpoint["handle"]))
        except Exception as e:  # cupy raises its own CUDARuntimeError
            raise TransferError(f"peer {peer_id}: cudaIpcOpenMemHandle failed: {e}") from None
        shape = (layout.num_layers, 2, layout.num_blocks, layout.num_kv_heads, layout.block_size, layout.head_dim)
        nbytes = int(endpoint["nbytes"])
        raw = torch.as_tensor(_DevicePointer(base + int(endpoint["offset"]), nbytes))
        buffer = raw.view(DTYPES[layout.dtype]).view(shape)
        with self._lock:
            self._peers[peer_id] = _Mapped(peer_id, dict(endpoint), layout, base, buffer)

    def write(self, req_id: str, peer_id: str, op: WriteOp) -> None:
        self._check_open()
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransferError(f"ipc: peer {peer_id} is not open (call open_peer first)")
        resolved = resolve_op(op, self._layout, peer.layout, peer_id)
        entry = self._requests.get(req_id, peer_id)
        if entry.handle.done():
            return
        compute = torch.cuda.current_stream(self._index)
        self._stream.wait_stream(compute)  # the layer was produced on the compute stream
        with torch.cuda.device(self._index), torch.cuda.stream(self._stream):
            key = (peer_id, resolved.src_blocks, resolved.dst_blocks)
            if key != self._index_key:  # every layer of a request uses the same blocks: upload once
                self._index_key = key
                self._block_index = block_index(resolved, self.cache.buffer.device, peer.buffer.device)
            entry.nbytes += copy_blocks(self.cache.buffer, peer.buffer, resolved, self._block_index)
            if peer.buffer.device.index != self._index:
                # the scatter ran on the peer GPU's current stream: keep commit's event after it
                self._stream.wait_stream(torch.cuda.current_stream(peer.buffer.device))

    def commit(self, req_id: str, peer_id: str) -> TransferHandle:
        self._check_open()
        entry = self._requests.get(req_id, peer_id)
        if entry.handle.done():
            return entry.handle
        event = torch.cuda.Event()
        event.record(self._stream)
        with self._lock:
            if self._waiter is None:
                self._waiter = threading.Thread(target=self._wait_loop, name="pdbus-cuda-ipc-done", daemon=True)
                self._waiter.start()
        self._done.put((event, entry))
        return entry.handle

    def abort(self, req_id: str) -> None:
        """Fail the request; copies already queued on the stream are waited for, so nothing of
        it lands after this returns."""
        if self._requests.abort(req_id):
            self._stream.synchronize()

    def close_peer(self, peer_id: str) -> None:
        with self._lock:
            peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        self._requests.fail_peer(peer_id, f"ipc: peer {peer_id} was closed")
        self._unmap(peer)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers, self._peers = list(self._peers.values()), {}
        self._requests.fail_all("ipc transfer engine closed")
        if self._waiter is not None:
            self._done.put(None)
            self._waiter.join()
            self._waiter = None
        for peer in peers:
            self._unmap(peer)

    # ----- internals
    def _check_open(self) -> None:
        if self._closed:
            raise TransferError("ipc transfer engine is closed")

    def _unmap(self, peer: _Mapped) -> None:
        peer.closed = True
        self._index_key = self._block_index = None
        self._stream.synchronize()  # no copy into it may still be running
        if peer.buffer.device.index != self._index:
            torch.cuda.current_stream(peer.buffer.device).synchronize()
        peer.buffer = None  # type: ignore[assignment]
        cp = _cupy()
        try:
            with cp.cuda.Device(self._index):
                cp.cuda.runtime.ipcCloseMemHandle(peer.base)
        except Exception as e:  # closing the mapping of a dead peer may fail; nothing is left to free
            log.info("ipc: closing the mapping of %s failed: %s", peer.peer_id, e)

    def _wait_loop(self) -> None:
        while (item := self._done.get()) is not None:
            event, entry = item
            try:
                event.synchronize()
            except RuntimeError as e:  # an asynchronous CUDA error surfaced here
                self._requests.finish(entry, f"ipc transfer of {entry.req_id} failed: {e}")
                continue
            self._requests.finish(entry)
