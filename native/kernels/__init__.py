"""Triton kernels of the GPU model path (bf16 activations, fp32 accumulation).

Importing this package needs no GPU and no Triton; without Triton, using a kernel raises
ImportError. The host functions (each checks shapes, dtypes, strides and devices, and raises
ValueError):

* norm_rope: ``rmsnorm``, ``fused_add_rmsnorm``, ``moe_combine_add_rmsnorm``, ``rope_interleaved``,
  ``store_kv``, ``rope_store_kv``
* attention: ``paged_decode_attention``, ``prefill_attention``
* wlinear:   ``wlinear`` (quantize with native/model/quant.py)
* moe:       ``fused_moe``, ``moe_route``, ``moe_align``, ``moe_gemm``, ``moe_combine``

and, imported from its module by the CUDA ipc backend (it copies with torch where Triton is
missing): kv_copy: ``copy_kv_blocks``.

The package attribute ``wlinear`` is the function; the module is
``importlib.import_module("native.kernels.wlinear")``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "rmsnorm": "norm_rope",
    "fused_add_rmsnorm": "norm_rope",
    "moe_combine_add_rmsnorm": "norm_rope",
    "rope_interleaved": "norm_rope",
    "store_kv": "norm_rope",
    "rope_store_kv": "norm_rope",
    "rope_inv_freq": "norm_rope",
    "paged_decode_attention": "attention",
    "prefill_attention": "attention",
    "decode_partitions": "attention",
    "wlinear": "wlinear",
    "fused_moe": "moe",
    "moe_route": "moe",
    "moe_align": "moe",
    "moe_gemm": "moe",
    "moe_combine": "moe",
    "moe_block_m": "moe",
}

__all__ = sorted(_EXPORTS)

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

if HAVE_TRITON:
    # Load every module now, then bind the functions: a submodule import binds the module's name
    # on this package once (``wlinear`` the module would shadow ``wlinear`` the function), and
    # never again after the module is in sys.modules.
    for _mod in sorted(set(_EXPORTS.values())):
        importlib.import_module(f".{_mod}", __name__)
    for _name, _mod in _EXPORTS.items():
        globals()[_name] = getattr(importlib.import_module(f".{_mod}", __name__), _name)
    del _name, _mod
else:

    def __getattr__(name: str):
        if name in _EXPORTS:
            raise ImportError(f"native.kernels.{name} needs Triton (and a CUDA GPU)")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
