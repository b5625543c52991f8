"""``rdma``: one-sided writes into the decode's KV pool through Mooncake's TransferEngine.

Both sides start an engine in P2P handshake mode (no etcd: metadata server ``P2PHANDSHAKE``;
the session id is ``host:rpc_port``) and register their whole KV buffer. The decode publishes
its session id and buffer address; the prefill writes each layer's K and V block regions
(head slices included) with one ``batch_transfer_sync_write`` per layer, run on the copy worker
so the engine loop never waits on the network.

Protocol: RDMA over the NICs named in ``KVCACHE_RDMA_NICS`` (comma-separated), or those found
under /sys/class/infiniband. No NIC is an error at construction, never a silent fall back to
TCP. ``PDBUS_MOONCAKE_TCP=1`` (or ``use_tcp=True``) runs the same adapter over Mooncake's own
TCP transport: that is how machines without a NIC (and CI) exercise it.
"""

from __future__ import annotations

import math
import os

from native.kv_cache import KVCache
from native.transfer.base import TransferError
from native.transfer.blocks import ResolvedOp, region_spans
from native.transfer.serial import SerialCopyEngine
from pdbus import envs
from pdbus.messages import RdmaEndpoint, TransferProtocol

_IB_SYSFS = "/sys/class/infiniband"
_HINT = "set KVCACHE_RDMA_NICS=<device,...> (e.g. mlx5_0) or use --cache-transfer-protocol tcp"


def choose_protocol(use_tcp: bool | None = None, nics: str | None = None) -> tuple[str, str]:
    """(Mooncake protocol, device filter). Raises TransferError when RDMA has no NIC."""
    if use_tcp is None:
        use_tcp = envs.PDBUS_MOONCAKE_TCP
    if use_tcp:
        return "tcp", ""
    wanted = [n.strip() for n in (nics if nics is not None else envs.KVCACHE_RDMA_NICS).split(",")]
    wanted = [n for n in wanted if n]
    present = sorted(os.listdir(_IB_SYSFS)) if os.path.isdir(_IB_SYSFS) else []
    if wanted:
        missing = [n for n in wanted if n not in present]
        if missing:
            raise TransferError(
                f"rdma: NIC {','.join(missing)} not found (present: {','.join(present) or 'none'}); {_HINT}"
            )
    elif not wanted and not present:
        raise TransferError(f"rdma: no RDMA NIC on this host; {_HINT}")
    return "rdma", ",".join(wanted)


def _import_engine():
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        raise TransferError(
            f"rdma: Mooncake's TransferEngine is not importable ({e}); "
            "pip install mooncake-transfer-engine (or -non-cuda), and apt-get install libibverbs1"
        ) from e
    return TransferEngine


class MooncakeTransfer(SerialCopyEngine):
    name = TransferProtocol.RDMA.value
    endpoint_types = (RdmaEndpoint,)

    def __init__(
        self, cache: KVCache, host: str = "127.0.0.1", use_tcp: bool | None = None, nics: str | None = None
    ):
        super().__init__(cache, host)
        self.transport, devices = choose_protocol(use_tcp, nics)
        if self.transport == "rdma":
            envs.set_default("MC_FORCE_HCA", 1)  # a missing NIC must fail, not degrade
        # Mooncake's own per-transfer timeout (30 s by default) bounds how long a write to an
        # unreachable peer blocks the copy worker, and with it an abort on the engine thread:
        # keep it within pdbus's transfer timeout
        envs.set_default("MC_TRANSFER_TIMEOUT", max(1, math.ceil(envs.PDBUS_TRANSFER_TIMEOUT_S)))
        engine_cls = _import_engine()
        self._engine = engine_cls()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", self.transport, devices)
        if rc != 0:
            self._engine = None
            where = f" on {devices}" if devices else ""
            hint = f"; {_HINT}" if self.transport == "rdma" else ""
            raise TransferError(f"rdma: Mooncake failed to start {self.transport}{where} at {host} (rc {rc}){hint}")
        self.session = f"{host}:{self._engine.get_rpc_port()}"
        self._base = cache.buffer.data_ptr()
        self._elem = cache.buffer.element_size()
        rc = self._engine.register_memory(self._base, cache.nbytes)
        if rc != 0:
            self._engine = None
            raise TransferError(f"rdma: Mooncake could not register the KV buffer ({cache.nbytes} bytes, rc {rc})")

    def endpoint(self) -> RdmaEndpoint:
        self._check_open()
        return RdmaEndpoint(
            self.host, self._host_id, self.session, self._base, self.cache.nbytes, self._layout, transport=self.transport
        )

    def _attach(self, peer_id: str, endpoint: RdmaEndpoint) -> RdmaEndpoint:
        if endpoint.transport != self.transport:
            raise TransferError(
                f"peer {peer_id}: it runs Mooncake over {endpoint.transport}, this side over {self.transport}"
            )
        return endpoint

    def _copy(self, peer: RdmaEndpoint, op: ResolvedOp) -> int:
        srcs: list[int] = []
        dsts: list[int] = []
        lengths: list[int] = []
        for kind in (0, 1):
            src_spans = region_spans(self._layout, self._elem, op.layer, kind, op.src_blocks, op.src_heads)
            dst_spans = region_spans(peer.layout, self._elem, op.layer, kind, op.dst_blocks, op.dst_heads)
            _pair_spans(src_spans, dst_spans, self._base, peer.base, srcs, dsts, lengths)
        rc = self._engine.batch_transfer_sync_write(peer.session, srcs, dsts, lengths)
        if rc != 0:
            raise TransferError(f"Mooncake batch write to {peer.session} failed (rc {rc})")
        return sum(lengths)

    def _detach(self, peer: RdmaEndpoint) -> None:
        pass  # P2P mode keeps no per-peer state worth tearing down

    def close(self) -> None:
        super().close()
        if self._engine is not None:
            self._engine.unregister_memory(self._base)
            self._engine = None


def _pair_spans(src_spans, dst_spans, src_base, dst_base, srcs, dsts, lengths) -> None:
    """Cut two span lists covering the same number of bytes into aligned (src, dst, len) triples."""
    i = j = 0
    src_off, src_left = src_spans[0] if src_spans else (0, 0)
    dst_off, dst_left = dst_spans[0] if dst_spans else (0, 0)
    while i < len(src_spans) and j < len(dst_spans):
        n = min(src_left, dst_left)
        srcs.append(src_base + src_off)
        dsts.append(dst_base + dst_off)
        lengths.append(n)
        src_off, src_left, dst_off, dst_left = src_off + n, src_left - n, dst_off + n, dst_left - n
        if src_left == 0:
            i += 1
            if i < len(src_spans):
                src_off, src_left = src_spans[i]
        if dst_left == 0:
            j += 1
            if j < len(dst_spans):
                dst_off, dst_left = dst_spans[j]
