"""Every environment variable pdbus reads, declared once."""

from __future__ import annotations

import os


def _float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


PDBUS_LOG_LEVEL = os.environ.get("PDBUS_LOG_LEVEL", "INFO")
# torch intra-op threads per process (default min(4, cores))
PDBUS_TORCH_THREADS = os.environ.get("PDBUS_TORCH_THREADS")
# overrides the host identity used to decide whether ipc applies (network-namespace demos)
PDBUS_HOST_ID = os.environ.get("PDBUS_HOST_ID")
# Fault injection, for tests only: slow every engine step / fail every KV transfer commit.
PDBUS_FAULT_STEP_DELAY_S = _float("PDBUS_FAULT_STEP_DELAY_MS", 0.0) / 1000.0
PDBUS_FAULT_TRANSFER = os.environ.get("PDBUS_FAULT_TRANSFER", "")  # "fail" | "hang"
# Mooncake RDMA: NIC names, and forcing a real HCA (no TCP fallback)
KVCACHE_RDMA_NICS = os.environ.get("KVCACHE_RDMA_NICS", "")
MC_FORCE_HCA = os.environ.get("MC_FORCE_HCA", "")
# seconds a prefill waits for its KV transfer to land before failing the request
PDBUS_TRANSFER_TIMEOUT_S = _float("PDBUS_TRANSFER_TIMEOUT_S", 30.0)
# run the rdma adapter over Mooncake's own TCP (tests, machines without a NIC)
PDBUS_MOONCAKE_TCP = os.environ.get("PDBUS_MOONCAKE_TCP", "")
# Mooncake transfer timeout (seconds); pdbus sets it from PDBUS_TRANSFER_TIMEOUT_S when unset
MC_TRANSFER_TIMEOUT = os.environ.get("MC_TRANSFER_TIMEOUT", "")
# rendezvous host:port of an EP group, set by `pdbus multi-serve` for its ranks
PDBUS_EP_MASTER = os.environ.get("PDBUS_EP_MASTER", "")
# serve this directory when --model is not given (default: native/default_model)
PDBUS_DEFAULT_MODEL = os.environ.get("PDBUS_DEFAULT_MODEL", "")
