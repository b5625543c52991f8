"""Compiled CPU kernels (C++ through torch's extension builder), the CPU path's fast ops.

:func:`kernels` builds them on first use (about 30 s once per machine; torch caches the build
under ``~/.cache/torch_extensions`` by the hash of the source) and returns the module, or None
when they cannot be had — no compiler, a failed build, or ``PDBUS_NO_CPU_KERNELS=1`` — after
one log line saying why; the CPU path then runs plain torch (native/model/ops.py), which is
also the reference the kernels are tested against.

* ``paged_attention`` (attention.cpp): RoPE + K/V store + causal paged attention of a step's
  rows, one call per layer in place of some twenty torch ops;
* ``add_rmsnorm``, ``silu_mul``, ``moe_route`` (softmax + bias + top-k + renormalisation and
  the rows grouped by expert), ``moe_combine`` (layers.cpp).

native/cpu/ops.py is the op table built on them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pdbus import envs

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_module = None
_tried = False


def kernels():
    """The compiled module, or None (see the module docstring). Thread-safe; builds once."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if envs.PDBUS_NO_CPU_KERNELS:
            log.info("CPU kernels off (PDBUS_NO_CPU_KERNELS): the CPU path runs plain torch")
        else:
            _module = _build()
        _tried = True
    return _module


def _build():
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name="pdbus_cpu_kernels",
            sources=[str(_HERE / name) for name in ("attention.cpp", "layers.cpp")],
            extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"],
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure leaves the torch path
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("CPU kernels unavailable (%s): the CPU path runs plain torch", first[:200])
        return None
