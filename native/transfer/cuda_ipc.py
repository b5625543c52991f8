"""``ipc`` on GPU: the prefill writes straight into the decode's KV pool through CUDA IPC.

Receiver: exports the allocation that holds its cache buffer with ``cudaIpcGetMemHandle``
(through cupy) and publishes the handle, the buffer's offset inside that allocation, the GPU's
uuid and the host's boot id. Sender: opens the handle once per peer (``cudaIpcOpenMemHandle``,
peer access enabled lazily) and wraps the pointer as a torch tensor of the peer's cache shape.
Writes into a decode on this GPU queue on their request as runs of layers (a write may name one
layer, as the prefill's layer hook does, or a range, ``WriteOp.num_layers``); once
``FLUSH_LAYERS`` layers are queued, and at ``commit``, each run goes out as one
``copy_kv_blocks`` launch (native/kernels/kv_copy.py: K and V of every block of those layers,
the offsets computed on the device from the block ids, uploaded once per request) on a dedicated
CUDA stream that first waits for the compute stream, so the copy sees the finished layers and runs
beside the next ones. A decode on another GPU of the host is written layer by layer, with one
gather, a peer copy and one scatter (``copy_blocks``). ``commit`` then records an event; the
engine's one completion thread waits on the events in order and completes each handle (its
callbacks run there), and a caller of ``TransferHandle.wait`` completes it itself as soon as the
event has passed. An abort drops the writes not launched yet and waits for the launched ones.

The prefill process must see the decode's GPU (do not narrow CUDA_VISIBLE_DEVICES to its own
GPU only; pick the device with ``torch.cuda.set_device``). cupy is imported on first use, so
this module imports on machines without it.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from native.host import upload
from native.kernels.kv_copy import copy_kv_blocks
from native.kv_cache import DTYPES, KVCache
from native.transfer.base import TransferError
from native.transfer.blocks import ResolvedOp, block_index, copy_blocks
from native.transfer.peers import Peer, PeerEngine, PendingTransfer
from pdbus.messages import CudaIpcEndpoint, TransferProtocol

log = logging.getLogger(__name__)

# A request's writes into a decode on this GPU are launched once this many layers are queued: a
# few launches per request written layer by layer, each copying layers the prefill finished while
# it computes the next ones. Engines read it when they are built.
FLUSH_LAYERS = 8


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


@dataclass(eq=False)
class _Batch:
    """One request's writes into a peer on this GPU: the blocks and heads they copy (``op``, its
    block ids on the device once uploaded, on the transfer stream: the caching allocator hands
    their memory to nothing else before the launches queued there have read it) and the layer
    runs not launched yet."""

    peer: Peer
    op: ResolvedOp | None = None
    ids: tuple[torch.Tensor, torch.Tensor] | None = None
    runs: list[list[int]] = field(default_factory=list)  # [first layer, count] not launched yet

    @property
    def pending(self) -> int:
        return sum(n for _, n in self.runs)


class CudaIpcTransfer(PeerEngine):
    name = TransferProtocol.IPC.value
    endpoint_types = (CudaIpcEndpoint,)
    same_host_only = True
    takes_layer_ranges = True

    def __init__(self, cache: KVCache, host: str = "127.0.0.1"):
        if cache.device.type != "cuda":
            raise TransferError("the CUDA ipc backend is for GPU caches; CPU caches use shared memory")
        super().__init__(cache, host)
        self._index = cache.device.index if cache.device.index is not None else torch.cuda.current_device()
        self._stream = torch.cuda.Stream(device=self._index)
        self._flush_layers = max(1, FLUSH_LAYERS)
        self._batches: dict[PendingTransfer, _Batch] = {}  # requests with writes into this GPU; under _lock
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
        if mapped.buffer.device.index != self._index:
            for one in op.layers():
                self._write_to_peer_gpu(entry, peer, one)
            return
        with self._lock:
            batch = self._batches.get(entry)
            if batch is None:
                batch = self._batches[entry] = _Batch(peer)
            same = batch.op is not None and (batch.op.src_blocks, batch.op.dst_blocks, batch.op.src_heads, batch.op.dst_heads) == (
                op.src_blocks, op.dst_blocks, op.src_heads, op.dst_heads)  # fmt: skip
            if not same:  # other blocks or heads: what is queued goes first
                self._flush(entry, batch)
                batch.op, batch.ids = op, None
            if batch.runs and sum(batch.runs[-1]) == op.layer:
                batch.runs[-1][1] += op.num_layers  # the next layers of the same run
            else:
                batch.runs.append([op.layer, op.num_layers])
            if batch.pending >= self._flush_layers:
                self._flush(entry, batch)

    def _commit(self, entry: PendingTransfer, peer: Peer) -> None:
        with self._lock:
            batch = self._batches.pop(entry, None)
            if batch is not None:
                self._flush(entry, batch)
            if self._waiter is None:
                self._waiter = threading.Thread(target=self._wait_loop, name="pdbus-cuda-ipc-done", daemon=True)
                self._waiter.start()
        event = torch.cuda.Event()
        event.record(self._stream)
        # whoever sees the event first completes the handle: the waiter thread, or a caller of
        # ``wait`` (no thread hand-off on its way back)
        entry.handle.settle = lambda timeout: self._settle(event, entry, timeout)
        self._done.put((event, entry))

    def _aborted(self, entries: list[PendingTransfer]) -> None:
        """Writes not launched yet are dropped and launched ones waited for, so nothing of the
        request lands after abort returns."""
        with self._lock:
            for entry in entries:
                self._batches.pop(entry, None)
        self._stream.synchronize()

    def _shutdown(self, peers: list[Peer]) -> None:
        if self._waiter is not None:
            self._done.put(None)
            self._waiter.join()
            self._waiter = None
        super()._shutdown(peers)

    def _detach(self, mapped: _Mapped) -> None:
        self._index_key = self._block_index = None
        with self._lock:  # the peer's requests have failed: their queued writes go
            self._batches = {e: b for e, b in self._batches.items() if b.peer.obj is not mapped}
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

    def _flush(self, entry: PendingTransfer, batch: _Batch) -> None:
        """Launch ``batch``'s queued layer runs (one ``copy_kv_blocks`` each: one for a request
        written in order) on the transfer stream, after what the compute stream has queued so far."""
        if not batch.runs:
            return
        op = batch.op
        self._stream.wait_stream(torch.cuda.current_stream(self._index))  # the layers were produced there
        with torch.cuda.device(self._index), torch.cuda.stream(self._stream):
            if batch.ids is None:  # every layer of a request has the same blocks: uploaded once
                ids = upload([op.src_blocks, op.dst_blocks], self.cache.device, torch.int64)
                batch.ids = (ids[0], ids[1])
            for layer, n in batch.runs:
                entry.nbytes += copy_kv_blocks(
                    self.cache.buffer, batch.peer.obj.buffer, layer, n, *batch.ids, op.src_heads, op.dst_heads
                )
        batch.runs = []

    def _write_to_peer_gpu(self, entry: PendingTransfer, peer: Peer, op: ResolvedOp) -> None:
        """One layer's gather, peer copy and scatter into a decode on another GPU of the host."""
        mapped: _Mapped = peer.obj
        compute = torch.cuda.current_stream(self._index)
        self._stream.wait_stream(compute)  # the layer was produced on the compute stream
        with torch.cuda.device(self._index), torch.cuda.stream(self._stream):
            key = (peer.peer_id, op.src_blocks, op.dst_blocks)
            if key != self._index_key:  # every layer of a request uses the same blocks: upload once
                self._index_key = key
                self._block_index = block_index(op, self.cache.buffer.device, mapped.buffer.device)
            entry.nbytes += copy_blocks(self.cache.buffer, mapped.buffer, op, self._block_index)
            # the scatter ran on the peer GPU's current stream: keep commit's event after it
            self._stream.wait_stream(torch.cuda.current_stream(mapped.buffer.device))

    def _settle(self, event: torch.cuda.Event, entry: PendingTransfer, timeout: float | None) -> None:
        """Complete ``entry`` here if its copies finish within ``timeout`` (polled: a copy is
        microseconds to milliseconds, and the caller is a bench or a test; the engine uses the
        handle's callbacks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not event.query():
                if deadline is not None and time.monotonic() > deadline:
                    return
                time.sleep(0)  # let the other threads run between polls
        except RuntimeError as e:  # an asynchronous CUDA error surfaced here
            self._requests.finish(entry, f"ipc transfer of {entry.req_id} failed: {e}")
            return
        self._requests.finish(entry)

    def _wait_loop(self) -> None:
        while (item := self._done.get()) is not None:
            event, entry = item
            try:
                event.synchronize()
            except RuntimeError as e:  # an asynchronous CUDA error surfaced here
                self._requests.finish(entry, f"ipc transfer of {entry.req_id} failed: {e}")
                continue
            self._requests.finish(entry)
