"""``ipc`` on GPU: the prefill writes straight into the decode's KV pool through CUDA IPC.

Receiver: exports the allocation that holds its cache buffer with ``cudaIpcGetMemHandle``
(through cupy) and publishes the handle, the buffer's offset inside that allocation, the GPU's
uuid and the host's boot id. Sender: opens the handle once per peer (``cudaIpcOpenMemHandle``,
peer access enabled lazily), wraps the pointer as a torch tensor of the peer's cache shape,
and copies each layer with one gather and one scatter (K and V together) on a dedicated CUDA
stream that first waits for the compute stream, so the copy sees the finished layer and runs
beside the next one. ``commit`` records an event; the engine's one completion thread waits on
the events in order and completes each handle (its callbacks run there). A decode on another
GPU of the host is written through a peer copy.

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
from native.transfer.base import TransferError
from native.transfer.blocks import ResolvedOp, block_index, copy_blocks
from native.transfer.peers import Peer, PeerEngine, PendingTransfer
from pdbus.messages import CudaIpcEndpoint, TransferProtocol

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
    base: int  # what cudaIpcOpenMemHandle returned; closed with cudaIpcCloseMemHandle
    buffer: torch.Tensor  # the peer's cache, [layers, 2, blocks, heads, block_size, head_dim]


class CudaIpcTransfer(PeerEngine):
    name = TransferProtocol.IPC.value
    endpoint_types = (CudaIpcEndpoint,)
    same_host_only = True

    def __init__(self, cache: KVCache, host: str = "127.0.0.1"):
        if cache.device.type != "cuda":
            raise TransferError("the CUDA ipc backend is for GPU caches; CPU caches use shared memory")
        super().__init__(cache, host)
        self._index = cache.device.index if cache.device.index is not None else torch.cuda.current_device()
        self._stream = torch.cuda.Stream(device=self._index)
        self._endpoint: CudaIpcEndpoint | None = None
        self._index_key: tuple | None = None
        self._block_index: tuple[torch.Tensor, torch.Tensor] | None = None
        # One thread for the engine, not one per request: it waits on each commit's event in
        # order (the events of one stream complete in order) and completes its handle.
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # (event, entry); None stops
        self._waiter: threading.Thread | None = None

    # ----- receiver side
    def endpoint(self) -> CudaIpcEndpoint:
        self._check_open()
        if self._endpoint is None:
            cp = _cupy()
            ptr = self.cache.buffer.data_ptr()
            with cp.cuda.Device(self._index):
                base, size = _allocation_range(ptr)
                handle = cp.cuda.runtime.ipcGetMemHandle(base)
            self._endpoint = CudaIpcEndpoint(
                self.host,
                self._host_id,
                device=self._index,
                device_uuid=_device_uuid(self._index),
                handle=bytes(handle),
                offset=ptr - base,
                nbytes=self.cache.nbytes,
                layout=self._layout,
            )
        return self._endpoint

    # ----- PeerEngine hooks
    def _attach(self, peer_id: str, endpoint: CudaIpcEndpoint) -> _Mapped:
        uuid = endpoint.device_uuid
        if uuid and uuid not in {_device_uuid(i) for i in range(torch.cuda.device_count())}:
            raise TransferError(
                f"peer {peer_id}: its GPU {uuid} is not visible to this process (check CUDA_VISIBLE_DEVICES)"
            )
        cp = _cupy()
        try:
            with cp.cuda.Device(self._index):
                base = cp.cuda.runtime.ipcOpenMemHandle(bytes(endpoint.handle))
        except Exception as e:  # cupy raises its own CUDARuntimeError
            raise TransferError(f"peer {peer_id}: cudaIpcOpenMemHandle failed: {e}") from None
        layout = endpoint.layout
        shape = (layout.num_layers, 2, layout.num_blocks, layout.num_kv_heads, layout.block_size, layout.head_dim)
        raw = torch.as_tensor(_DevicePointer(base + int(endpoint.offset), int(endpoint.nbytes)))
        buffer = raw.view(DTYPES[layout.dtype]).view(shape)
        return _Mapped(peer_id, base, buffer)

    def _write(self, entry: PendingTransfer, peer: Peer, op: ResolvedOp) -> None:
        mapped: _Mapped = peer.obj
        compute = torch.cuda.current_stream(self._index)
        self._stream.wait_stream(compute)  # the layer was produced on the compute stream
        with torch.cuda.device(self._index), torch.cuda.stream(self._stream):
            key = (peer.peer_id, op.src_blocks, op.dst_blocks)
            if key != self._index_key:  # every layer of a request uses the same blocks: upload once
                self._index_key = key
                self._block_index = block_index(op, self.cache.buffer.device, mapped.buffer.device)
            entry.nbytes += copy_blocks(self.cache.buffer, mapped.buffer, op, self._block_index)
            if mapped.buffer.device.index != self._index:
                # the scatter ran on the peer GPU's current stream: keep commit's event after it
                self._stream.wait_stream(torch.cuda.current_stream(mapped.buffer.device))

    def _commit(self, entry: PendingTransfer, peer: Peer) -> None:
        event = torch.cuda.Event()
        event.record(self._stream)
        with self._lock:
            if self._waiter is None:
                self._waiter = threading.Thread(target=self._wait_loop, name="pdbus-cuda-ipc-done", daemon=True)
                self._waiter.start()
        self._done.put((event, entry))

    def _aborted(self, entries: list[PendingTransfer]) -> None:
        """Copies already queued on the stream are waited for, so nothing of the request lands
        after abort returns."""
        self._stream.synchronize()

    def _shutdown(self, peers: list[Peer]) -> None:
        if self._waiter is not None:
            self._done.put(None)
            self._waiter.join()
            self._waiter = None
        super()._shutdown(peers)

    def _detach(self, mapped: _Mapped) -> None:
        self._index_key = self._block_index = None
        self._stream.synchronize()  # no copy into it may still be running
        if mapped.buffer.device.index != self._index:
            torch.cuda.current_stream(mapped.buffer.device).synchronize()
        mapped.buffer = None  # type: ignore[assignment]
        cp = _cupy()
        try:
            with cp.cuda.Device(self._index):
                cp.cuda.runtime.ipcCloseMemHandle(mapped.base)
        except Exception as e:  # closing the mapping of a dead peer may fail; nothing is left to free
            log.info("ipc: closing the mapping of %s failed: %s", mapped.peer_id, e)

    def _wait_loop(self) -> None:
        while (item := self._done.get()) is not None:
            event, entry = item
            try:
                event.synchronize()
            except RuntimeError as e:  # an asynchronous CUDA error surfaced here
                self._requests.finish(entry, f"ipc transfer of {entry.req_id} failed: {e}")
                continue
            self._requests.finish(entry)
