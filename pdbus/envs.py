"""Every environment variable pdbus reads or sets, declared once; the only module that touches
``os.environ`` (``tests/test_envs.py`` checks that).

Read a variable as an attribute, ``envs.PDBUS_TRANSFER_TIMEOUT_S``: each read parses the
environment *now* (vLLM's ``envs.py`` does the same), so a value set for a spawned process is seen
there, and a test that sets a variable in-process is seen at once. A value pdbus sets for a child
process goes through ``child_env(NAME=value, ...)``, which accepts only the names declared here.
Third-party variables (Mooncake's ``MC_*``, ``CUDA_VISIBLE_DEVICES``, ``TRITON_INTERPRET``) are
declared here too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any


def _str(name: str, default: str = "") -> Callable[[], str]:
    return lambda: os.environ.get(name, default).strip()


def _opt_str(name: str) -> Callable[[], str | None]:
    return lambda: os.environ.get(name) or None


def _float(name: str, default: float, scale: float = 1.0) -> Callable[[], float]:
    def read() -> float:
        try:
            return float(os.environ.get(name, default)) * scale
        except ValueError:
            return default * scale

    return read


def _flag(name: str) -> Callable[[], bool]:
    return lambda: os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _torch_threads() -> int:
    try:
        return max(1, int(os.environ["PDBUS_TORCH_THREADS"]))
    except (KeyError, ValueError):
        return min(4, os.cpu_count() or 1)


# name -> reader. The name a variable is read under is the variable's own name, except where noted.
_VARIABLES: dict[str, Callable[[], Any]] = {
    # logging level of every process (DEBUG, INFO, WARNING...)
    "PDBUS_LOG_LEVEL": lambda: os.environ.get("PDBUS_LOG_LEVEL", "INFO").upper(),
    # torch intra-op threads per process (default min(4, cores))
    "PDBUS_TORCH_THREADS": _torch_threads,
    # overrides the host identity used to decide whether ipc applies (network-namespace demos)
    "PDBUS_HOST_ID": _str("PDBUS_HOST_ID"),
    # Fault injection, for tests only: slow every engine step (ms in the environment, s here) /
    # fail every KV transfer commit ("fail" | "hang").
    "PDBUS_FAULT_STEP_DELAY_S": _float("PDBUS_FAULT_STEP_DELAY_MS", 0.0, 1e-3),
    "PDBUS_FAULT_TRANSFER": _str("PDBUS_FAULT_TRANSFER"),
    # seconds a prefill waits for its KV transfer to land before failing the request
    "PDBUS_TRANSFER_TIMEOUT_S": _float("PDBUS_TRANSFER_TIMEOUT_S", 30.0),
    # seconds a TP / EP collective may block before the group counts as broken
    "PDBUS_TP_TIMEOUT_S": _float("PDBUS_TP_TIMEOUT_S", 600.0),
    # seconds the launchers (run.sh, the netns demo) wait for the cluster to become healthy
    "PDBUS_START_TIMEOUT": _float("PDBUS_START_TIMEOUT", 900.0),
    # run the rdma adapter over Mooncake's own TCP (tests, machines without a NIC)
    "PDBUS_MOONCAKE_TCP": _flag("PDBUS_MOONCAKE_TCP"),
    # rendezvous host:port of an EP group, set by `pdbus multi-serve` for its ranks
    "PDBUS_EP_MASTER": _str("PDBUS_EP_MASTER"),
    # serve this directory when --model is not given (default: native/default_model)
    "PDBUS_DEFAULT_MODEL": _str("PDBUS_DEFAULT_MODEL"),
    # 1: the CPU path runs plain torch only, without the compiled CPU kernels (native/cpu)
    "PDBUS_NO_CPU_KERNELS": _flag("PDBUS_NO_CPU_KERNELS"),
    # Mooncake RDMA: NIC names (comma list)
    "KVCACHE_RDMA_NICS": _str("KVCACHE_RDMA_NICS"),
    # Mooncake's own: force a real HCA (no TCP fallback); its transfer timeout in seconds (pdbus
    # sets both in-process, with set_default, before starting the engine)
    "MC_FORCE_HCA": _str("MC_FORCE_HCA"),
    "MC_TRANSFER_TIMEOUT": _str("MC_TRANSFER_TIMEOUT"),
    # CUDA's device list; `pdbus multi-serve` and run.sh give each rank its slice
    "CUDA_VISIBLE_DEVICES": _opt_str("CUDA_VISIBLE_DEVICES"),
    # Triton's: run the kernels on CPU tensors (debugging without a GPU)
    "TRITON_INTERPRET": lambda: os.environ.get("TRITON_INTERPRET") == "1",
    # Python's: unbuffered child output (set for spawned processes)
    "PYTHONUNBUFFERED": _str("PYTHONUNBUFFERED"),
}

# variables whose environment name differs from the name they are read under
_ENV_NAME = {"PDBUS_FAULT_STEP_DELAY_S": "PDBUS_FAULT_STEP_DELAY_MS"}

if TYPE_CHECKING:  # the types of the attributes above, for static tools
    PDBUS_LOG_LEVEL: str
    PDBUS_TORCH_THREADS: int
    PDBUS_HOST_ID: str
    PDBUS_FAULT_STEP_DELAY_S: float
    PDBUS_FAULT_TRANSFER: str
    PDBUS_TRANSFER_TIMEOUT_S: float
    PDBUS_TP_TIMEOUT_S: float
    PDBUS_START_TIMEOUT: float
    PDBUS_MOONCAKE_TCP: bool
    PDBUS_EP_MASTER: str
    PDBUS_DEFAULT_MODEL: str
    PDBUS_NO_CPU_KERNELS: bool
    KVCACHE_RDMA_NICS: str
    MC_FORCE_HCA: str
    MC_TRANSFER_TIMEOUT: str
    CUDA_VISIBLE_DEVICES: str | None
    TRITON_INTERPRET: bool
    PYTHONUNBUFFERED: str


def __getattr__(name: str) -> Any:
    read = _VARIABLES.get(name)
    if read is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (declare the variable in pdbus/envs.py)")
    return read()


def __dir__() -> list[str]:
    return sorted([*globals(), *_VARIABLES])


_ENV_NAMES = frozenset(_ENV_NAME.get(name, name) for name in _VARIABLES)


def _env_name(name: str) -> str:
    if name not in _ENV_NAMES:
        raise KeyError(f"environment variable {name} is not declared in pdbus/envs.py")
    return name


def child_env(base: dict[str, str] | None = None, *, defaults: dict[str, object] | None = None, **values: object) -> dict[str, str]:
    """The environment for a child process: ``base`` (default: this process's environment) with
    ``values`` set (``None`` removes one) and ``defaults`` set where not set already. Only
    variables declared here may be set, under their environment names (``PDBUS_FAULT_STEP_DELAY_MS``)."""
    env = dict(os.environ if base is None else base)
    for name, value in (defaults or {}).items():
        env.setdefault(_env_name(name), str(value))
    for name, value in values.items():
        key = _env_name(name)
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def set_default(name: str, value: object) -> None:
    """Set a declared variable in this process unless it is set already (for libraries that read
    the environment themselves, such as Mooncake)."""
    os.environ.setdefault(_env_name(name), str(value))
