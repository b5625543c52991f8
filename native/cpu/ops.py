"""The CPU op table: the torch table (native/model/ops.py) with its hot ops on native/cpu's
compiled kernels — what a model on CPU tensors in fp32 or bf16 computes with when they build.

Per layer of a decode step: one attention call (RoPE, K/V store and paged attention fused), one
call per norm (with the residual add), one per SwiGLU, and one per MoE block with float experts
(router, each expert's GEMMs over its own rows only, shared expert, combine). Weight-only experts
(wint8 / wint4) route and combine through the kernels around the torch table's per-expert
dequantizing GEMMs. Rows of several queries over a long cached context (``KERNEL_MAX_PAIRS``)
keep torch's SDPA, and rows longer than ``KERNEL_MAX_QUERY`` queries (long prompts) its flash SDPA, which splits one long row over threads (the kernel splits rows, not one row;
single-threaded the two are level from ~256 queries up). Everything else (EP, TP collectives,
linears) is the torch table's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from native.attention import plan_attention
from native.attn_meta import AttnMeta
from native.model.layers import Experts
from native.model.ops import TorchOps, TorchStep

from . import kernels

KERNEL_MAX_QUERY = 512
# A chunk of several queries over a long cached context (a prompt whose prefix was cached) leaves
# the kernel for torch's SDPA past this many (query, key) pairs: the kernel scores one query at a
# time (a horizontal sum per key), ~24 ns a pair at head_dim 16, where SDPA's GEMMs take ~10 and
# a fixed ~0.3 ms: the built-in model's 192 new tokens over 1,856 cached, one thread, take 44.1 ms
# a forward on the kernel and 30.8 on SDPA (bench/cpu_prefix_attention.py, bench/RESULTS.md).
KERNEL_MAX_PAIRS = 1 << 16


def _kernel_row(q: int, ctx: int) -> bool:
    return 0 < q <= KERNEL_MAX_QUERY and (q == 1 or q * ctx <= KERNEL_MAX_PAIRS or ctx == q)
_EMPTY = torch.empty(0)


@dataclass
class CpuStep(TorchStep):
    rows: torch.Tensor | None = None  # int64 rows (sequences) the fused kernel computes
    cis_real: torch.Tensor | None = None  # fp32 [P, hd]: (cos, sin) pairs of the RoPE table
    torch_rows: bool = True  # some rows remain for the torch path


@dataclass
class _Routed:
    """A MoE block's routed part before the combine: grouped outputs and where each row went."""

    y: torch.Tensor  # [T * k, H], rows sorted by expert
    dest: torch.Tensor  # int64 [T, k]: the row of each (token, choice)
    weights: torch.Tensor  # fp32 [T, k]


class CpuOps(TorchOps):
    name = "cpu"

    def __init__(self, module):
        self.k = module

    def begin(self, model, positions, meta: AttnMeta):
        rows = [i for i, (q, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)) if _kernel_row(q, ctx)]
        if not rows:
            return super().begin(model, positions, meta)
        rest = len(rows) < len(meta.query_lens)
        plan = plan_attention(meta, frozenset(rows))
        cis = model.rotary.cis(positions, meta.max_context_len) if rest else None
        table = model.rotary.real_table(meta.max_context_len, meta.block_tables.device)
        return CpuStep(meta, plan, cis, torch.tensor(rows, dtype=torch.int64), table, rest)

    def rmsnorm(self, x, weight, eps):
        if x.dim() != 2:
            return super().rmsnorm(x, weight, eps)
        return self.k.add_rmsnorm(_EMPTY, x, weight, eps)[0]

    def add_rmsnorm(self, delta, residual, weight, eps):
        if residual.dim() != 2:
            return super().add_rmsnorm(delta, residual, weight, eps)
        out, res = self.k.add_rmsnorm(_EMPTY if delta is None else delta, residual, weight, eps)
        return out, res

    def swiglu(self, gate_up, x):
        return self.k.silu_mul(gate_up(x))

    def attention(self, attn, qkv, k_cache, v_cache, step):
        if not isinstance(step, CpuStep):
            return super().attention(attn, qkv, k_cache, v_cache, step)
        if k_cache.dtype != qkv.dtype:
            raise RuntimeError(
                f"the CPU kernel needs the KV cache in the model's dtype ({k_cache.dtype}, {qkv.dtype})"
            )
        if step.torch_rows:
            o = super().attention(attn, qkv, k_cache, v_cache, step)  # leaves the kernel's rows unwritten
        else:
            o = qkv.new_empty((qkv.shape[0], attn.num_heads * attn.head_dim))
        m = step.meta
        self.k.paged_attention(
            qkv.contiguous(),
            step.cis_real,
            m.slot_mapping,
            k_cache,
            v_cache,
            m.block_tables,
            m.query_start_loc,
            m.context_lens_t,
            step.rows,
            attn.num_heads,
            attn.num_kv_heads,
            attn.head_dim,
            attn.scale,
            o,
        )
        return o

    def moe(self, moe, x):
        experts = moe.experts
        if not isinstance(experts, Experts) or experts.shard_experts is not None or x.shape[0] == 0:
            return super().moe(moe, x)  # weight-only experts: moe_experts below
        shared = moe.shared_experts  # float too: it is quantized only where the experts are
        sw13, sw2 = (
            (shared.gate_up_proj.weight, shared.down_proj.weight) if shared is not None else (_EMPTY, _EMPTY)
        )
        return self.k.moe_block(
            x,
            moe.gate.weight,
            moe.e_score_correction_bias,
            moe.top_k,
            moe.norm_min,
            experts.w13,
            experts.w2,
            sw13,
            sw2,
        )

    def moe_experts(self, moe, x):
        """Weight-only experts: routed and sorted by the kernel, each expert's dequantizing GEMMs
        over its own rows, in place in the sorted buffer."""
        experts = moe.experts
        if x.shape[0] == 0 or experts.shard_experts is not None:
            return super().moe_experts(moe, x)
        logits = F.linear(x.float(), moe.gate.weight)
        weights, dest, xs, counts = self.k.moe_route(
            x, logits, moe.e_score_correction_bias, moe.top_k, moe.norm_min
        )
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows = xs[start : start + n]
                rows.copy_(experts.forward_expert(e, rows))
                start += n
        return _Routed(xs, dest, weights)

    def moe_output(self, routed, top_k, shared, dtype):
        if not isinstance(routed, _Routed):
            return super().moe_output(routed, top_k, shared, dtype)
        return self.k.moe_combine(routed.y, routed.dest, routed.weights, _EMPTY if shared is None else shared)


_CPU_OPS: CpuOps | None = None


def cpu_ops() -> CpuOps | None:
    """The CPU table, or None when the kernels are not available (native.cpu.kernels says why)."""
    global _CPU_OPS
    if _CPU_OPS is None:
        module = kernels()
        if module is None:
            return None
        _CPU_OPS = CpuOps(module)
    return _CPU_OPS
