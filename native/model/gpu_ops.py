"""The kernel op table (native/model/ops.py's :class:`Ops` on the Triton kernels of native.kernels).

``ErnieForCausalLM`` takes this table for its layers when its weights are CUDA bf16 and the KV
cache suits the kernels (:func:`kernels_supported`); the torch table stays the reference. The
module tree is the same; one layer of a step on this table:

    input norm (the previous block's output added to the residual in the same kernel)
    qkv GEMM -> RoPE + K/V store (one kernel) -> prefill or paged-decode attention -> o GEMM
    post-attention fused add + norm
    dense MLP (GEMM, silu * up, GEMM) or MoE (router, sort, two grouped GEMMs; the combine of
    the k expert outputs and the shared expert is fused into the next layer's input norm)

The layers own their collectives (native/model/layers.py): under TP ``o_proj`` / ``down_proj``
all-reduce, the MoE block combines its pairs (:meth:`KernelOps.combine`) and all-reduces, the
embedding all-reduces; under EP the MoE block all-gathers the step's rows, runs this rank's
experts (``fused_moe(expert_start=...)``) and reduce-scatters. On NCCL these collectives are
captured in the decode graphs with the rest.

bf16 linears are torch matmuls; weight-only int8 / int4 linears and experts run the kernels on
the formats native/model/quant.py stores (no second copy). A decode step (every query length 1)
reads only tensors of the AttnMeta and static shapes, never a host value, so it can be captured
in a CUDA graph (native.graphs).

Decode attention splits each context into partitions of a fixed :data:`DECODE_PARTITION_TOKENS`
tokens, whatever the batch size or block-table width: a row's result is then the same bits
alone or batched, in a graph bucket or eager, which is what makes graph == eager and PD == mixed
hold token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels as K
from ..attn_meta import AttnMeta
from ..kv_cache import KVCache
from .ops import Ops, padded_rows, split_qkv

# flash-decoding partition length; partitions never depend on the batch
DECODE_PARTITION_TOKENS = 256
# prefill attention query tile, fixed so that a sequence's rows do not depend on the rest of the
# batch (the kernel's own default follows the longest query of the step)
PREFILL_BLOCK_M = 64


def kernels_supported(model, kv_cache: KVCache | None = None) -> str | None:
    """None when the kernel path can run ``model`` over ``kv_cache``, else the reason it cannot."""
    if not K.HAVE_TRITON:
        return "Triton is not installed"
    weight = model.model.embed_tokens.weight
    if not weight.is_cuda:
        return f"the weights are on {weight.device}, not a CUDA device"
    if model.dtype != torch.bfloat16:
        return f"the kernels need bfloat16 weights, the model is {model.dtype}"
    hd = model.cfg.head_dim
    if hd < 16 or hd & (hd - 1):
        return f"head_dim {hd} is not a power of two >= 16"
    if kv_cache is not None:
        bs = kv_cache.block_size
        if bs < 16 or bs & (bs - 1):
            return f"block_size {bs} is not a power of two >= 16"
        if kv_cache.dtype != torch.bfloat16:
            return f"the KV cache is {kv_cache.dtype}, the kernels need bfloat16"
        if kv_cache.buffer.device != weight.device:  # tensor devices carry the index ("cuda:0")
            return f"the KV cache is on {kv_cache.buffer.device}, the weights on {weight.device}"
    return None


def graph_blocker(model) -> str | None:
    """None when a decode step of ``model`` can be captured in a CUDA graph, else why not."""
    parallel = model.parallel
    for what, group in (("tensor", parallel.tp), ("expert", parallel.ep)):
        if group.size > 1 and not group.comm.capturable:
            return f"the {what}-parallel collectives run on {group.comm.backend}, which a CUDA graph cannot capture"
    return None


def decode_blocks_per_partition(block_size: int) -> int:
    return max(1, DECODE_PARTITION_TOKENS // block_size)


def pad_block_tables(block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """Widen ``[B, W]`` tables to a multiple of the partition (shape-only: no host sync)."""
    bpp = decode_blocks_per_partition(block_size)
    extra = -block_tables.shape[1] % bpp
    return F.pad(block_tables, (0, extra)) if extra else block_tables


# ------------------------------------------------------------------------------------ the table


@dataclass
class MoEPairs:
    """A MoE block's uncombined output: ``pairs [T*k, H]`` (weighted), the shared expert's ``[T, H]``."""

    pairs: torch.Tensor
    top_k: int
    shared: torch.Tensor | None


@dataclass
class KernelStep:
    meta: AttnMeta
    positions: torch.Tensor
    theta: float
    decode_tables: torch.Tensor | None  # decode: block tables padded to whole partitions


def routed_pairs(moe, x: torch.Tensor, expert_start: int | None = None) -> torch.Tensor:
    """The routed experts' weighted outputs ``[T*k, H]``, uncombined (fused_moe's pairs)."""
    w13, w2, s13, s2 = moe.experts.stacks()
    return K.fused_moe(
        x,
        moe.gate.weight,
        w13,
        w2,
        moe.top_k,
        moe.e_score_correction_bias,
        w13_scales=s13,
        w2_scales=s2,
        return_pairs=True,
        expert_start=expert_start,
    )


class KernelOps(Ops):
    name = "kernels"

    def begin(self, model, positions, meta):
        tables = pad_block_tables(meta.block_tables, meta.block_size) if meta.is_decode else None
        return KernelStep(meta, positions, model.cfg.rope_theta, tables)

    def rmsnorm(self, x, weight, eps):
        return K.rmsnorm(x, weight, eps)

    def add_rmsnorm(self, delta, residual, weight, eps):
        """``residual += delta`` in place (bf16), then RMSNorm of it (a MoE delta combined here)."""
        if delta is None:
            return K.rmsnorm(residual, weight, eps), residual
        if isinstance(delta, MoEPairs):
            return K.moe_combine_add_rmsnorm(delta.pairs, delta.top_k, delta.shared, residual, weight, eps), residual
        return K.fused_add_rmsnorm(delta, residual, weight, eps), residual

    def linear(self, layer, x):
        if layer.bits is None:
            return F.linear(x, layer.weight)
        return K.wlinear(x, layer.qweight, layer.scales, layer.bits)

    def swiglu(self, gate_up, x):
        """A quantized gate/up projection fuses silu(gate) * up into its GEMM."""
        if gate_up.bits is not None:
            return K.wlinear(x, gate_up.qweight, gate_up.scales, gate_up.bits, act="swiglu")
        gate, up = F.linear(x, gate_up.weight).chunk(2, dim=-1)
        return F.silu(gate) * up

    def attention(self, attn, qkv, k_cache, v_cache, step: KernelStep):
        T = qkv.shape[0]
        q, k, v = split_qkv(attn, qkv)
        meta = step.meta
        K.rope_store_kv(q, k, v, step.positions, step.theta, k_cache, v_cache, meta.slot_mapping)
        if step.decode_tables is not None:
            n_parts = step.decode_tables.shape[1] // decode_blocks_per_partition(meta.block_size)
            o = K.paged_decode_attention(
                q, k_cache, v_cache, step.decode_tables, meta.context_lens_t, attn.scale, num_partitions=n_parts
            )
        else:
            # a graph's padding tokens are in no tile: zeros, never the pool's stale bits
            out = q.new_zeros(q.shape) if meta.tiles is not None else None
            o = K.prefill_attention(
                q,
                k_cache,
                v_cache,
                meta.query_start_loc,
                meta.context_lens_t,
                meta.block_tables,
                attn.scale,
                out=out,
                max_query_len=meta.max_query_len,
                block_m=PREFILL_BLOCK_M,
                tiles=meta.tiles,
            )
        return o.view(T, attn.num_heads * attn.head_dim)

    def moe_experts(self, moe, x):
        return routed_pairs(moe, x)

    def moe_output(self, routed, top_k, shared, dtype):
        return MoEPairs(routed, top_k, shared)

    def combine(self, delta):
        return K.moe_combine(delta.pairs, delta.top_k, delta.shared)

    def ep_payload(self, moe, x, rows):
        return padded_rows(x, rows)

    def ep_experts(self, moe, gathered):
        return K.moe_combine(routed_pairs(moe, gathered, expert_start=moe.experts.expert_start), moe.top_k)


KERNEL_OPS = KernelOps()
