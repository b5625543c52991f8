"""ErnieForCausalLM on the Triton kernels (native.kernels): the GPU dispatch layer.

``ErnieForCausalLM.forward`` hands a step here when its weights are CUDA bf16 and the KV cache
suits the kernels (:func:`kernels_supported`); the CPU path in ernie.py stays the reference.
One layer of a step:

    input norm (the previous block's output added to the residual in the same kernel)
    qkv GEMM -> RoPE + K/V store (one kernel) -> prefill or paged-decode attention -> o GEMM
    post-attention fused add + norm
    dense MLP (GEMM, silu * up, GEMM) or MoE (router, sort, two grouped GEMMs; the combine of
    the k expert outputs and the shared expert is fused into the next layer's input norm)

Under TP (native/parallel/tp.py: ``model.tp_comm``) the attention output, the dense MLP's and the
MoE block's outputs and the embedding are all-reduced; under EP (native/parallel/ep.py) a MoE
block all-gathers the step's rows, runs this rank's experts and reduce-scatters (``moe_ep``).
On NCCL these collectives are captured in the decode graphs with the rest.

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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels as K
from ..attn_meta import AttnMeta
from ..kv_cache import KVCache
from .quant import QuantExperts, WeightOnlyLinear

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
    for what, comm in (("tensor", getattr(model, "tp_comm", None)), ("expert", getattr(getattr(model, "ep", None), "comm", None))):
        if comm is not None and comm.size > 1 and not comm.capturable:
            return f"the {what}-parallel collectives run on {comm.backend}, which a CUDA graph cannot capture"
    return None


def decode_blocks_per_partition(block_size: int) -> int:
    return max(1, DECODE_PARTITION_TOKENS // block_size)


def pad_block_tables(block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """Widen ``[B, W]`` tables to a multiple of the partition (shape-only: no host sync)."""
    bpp = decode_blocks_per_partition(block_size)
    extra = -block_tables.shape[1] % bpp
    return F.pad(block_tables, (0, extra)) if extra else block_tables


# ------------------------------------------------------------------------------------ blocks


@dataclass
class MoEPairs:
    """A MoE block's uncombined output: ``pairs [T*k, H]`` (weighted), the shared expert's ``[T, H]``."""

    pairs: torch.Tensor
    top_k: int
    shared: torch.Tensor | None


Delta = torch.Tensor | MoEPairs | None


def add_norm(residual: torch.Tensor, delta: Delta, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``residual += delta`` in place (bf16), then RMSNorm of it."""
    if delta is None:
        return K.rmsnorm(residual, weight, eps)
    if isinstance(delta, MoEPairs):
        return K.moe_combine_add_rmsnorm(delta.pairs, delta.top_k, delta.shared, residual, weight, eps)
    return K.fused_add_rmsnorm(delta, residual, weight, eps)


def linear(module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, WeightOnlyLinear):
        return K.wlinear(x, module.qweight, module.scales, module.bits)
    return F.linear(x, module.weight)


def mlp(module, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP; a quantized gate/up projection fuses silu(gate) * up into its GEMM."""
    gate_up = module.gate_up_proj
    if isinstance(gate_up, WeightOnlyLinear):
        h = K.wlinear(x, gate_up.qweight, gate_up.scales, gate_up.bits, act="swiglu")
    else:
        gate, up = F.linear(x, gate_up.weight).chunk(2, dim=-1)
        h = F.silu(gate) * up
    return linear(module.down_proj, h)


def routed_pairs(module, x: torch.Tensor, expert_start: int | None = None) -> torch.Tensor:
    """The routed experts' weighted outputs ``[T*k, H]``, uncombined (fused_moe's pairs)."""
    experts = module.experts
    if isinstance(experts, QuantExperts):
        w13, w2, s13, s2 = experts.w13_q, experts.w2_q, experts.w13_s, experts.w2_s
    else:
        w13, w2, s13, s2 = experts.w13, experts.w2, None, None
    return K.fused_moe(
        x,
        module.gate.weight,
        w13,
        w2,
        module.top_k,
        module.e_score_correction_bias,
        w13_scales=s13,
        w2_scales=s2,
        return_pairs=True,
        expert_start=expert_start,
    )


def moe(module, x: torch.Tensor, comm=None) -> Delta:
    """The MoE block; under TP (``comm``) its partial output is combined and all-reduced here."""
    if getattr(module, "ep", None) is not None:
        return moe_ep(module, x)
    pairs = routed_pairs(module, x)
    shared = mlp(module.shared_experts, x) if module.shared_experts is not None else None
    if comm is None:
        return MoEPairs(pairs, module.top_k, shared)
    return comm.all_reduce(K.moe_combine(pairs, module.top_k, shared))


def moe_ep(module, x: torch.Tensor) -> MoEPairs:
    """The MoE block under expert parallelism (native/parallel/ep.py): all-gather every rank's
    rows (padded to the step's agreed size), apply this rank's experts, reduce-scatter."""
    from native.parallel.ep import padded_rows

    ep = module.ep
    T = x.shape[0]
    pairs = routed_pairs(module, ep.comm.all_gather(padded_rows(x, ep.tokens)), expert_start=module.ep_lo)
    mine = ep.comm.reduce_scatter(K.moe_combine(pairs, module.top_k))[:T]
    shared = mlp(module.shared_experts, x) if module.shared_experts is not None and T else None
    return MoEPairs(mine, 1, shared)


def attention(
    attn,
    x: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMeta,
    theta: float,
    decode_tables: torch.Tensor | None,
) -> torch.Tensor:
    """x [T, H] -> o_proj(attention) [T, H]; stores this step's K/V at ``meta.slot_mapping``."""
    T = x.shape[0]
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = linear(attn.qkv_proj, x)
    q = qkv[:, : nh * hd].view(T, nh, hd)
    k = qkv[:, nh * hd : (nh + nkv) * hd].view(T, nkv, hd)
    v = qkv[:, (nh + nkv) * hd :].view(T, nkv, hd)
    K.rope_store_kv(q, k, v, positions, theta, k_cache, v_cache, meta.slot_mapping)
    if decode_tables is not None:
        n_parts = decode_tables.shape[1] // decode_blocks_per_partition(meta.block_size)
        o = K.paged_decode_attention(
            q, k_cache, v_cache, decode_tables, meta.context_lens_t, attn.scale, num_partitions=n_parts
        )
    else:
        o = K.prefill_attention(
            q,
            k_cache,
            v_cache,
            meta.query_start_loc,
            meta.context_lens_t,
            meta.block_tables,
            attn.scale,
            max_query_len=meta.max_query_len,
            block_m=PREFILL_BLOCK_M,
        )
    return linear(attn.o_proj, o.view(T, nh * hd))


def embed(module, input_ids: torch.Tensor, comm) -> torch.Tensor:
    """Token embeddings; under TP each rank holds a vocabulary slice and the rows are all-reduced."""
    if comm is None:
        return F.embedding(input_ids, module.weight)
    local = (input_ids >= module.start) & (input_ids < module.stop)
    rows = F.embedding(torch.where(local, input_ids - module.start, 0), module.weight)
    return comm.all_reduce(rows.masked_fill_(~local[:, None], 0))


def forward(
    model,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    kv_cache: KVCache,
    meta: AttnMeta,
    layer_done: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The kernel path of ``ErnieForCausalLM.forward``: input_ids, positions [T] -> hidden [T, H]."""
    cfg = model.cfg
    eps = cfg.rms_norm_eps
    inner = model.model
    decode_tables = pad_block_tables(meta.block_tables, meta.block_size) if meta.is_decode else None
    comm = getattr(model, "tp_comm", None)  # TP: heads, MLP and vocabulary are sharded
    residual = embed(inner.embed_tokens, input_ids, comm)
    delta: Delta = None
    for i, layer in enumerate(inner.layers):
        x = add_norm(residual, delta, layer.input_layernorm.weight, eps)
        o = attention(
            layer.self_attn, x, positions, kv_cache.k[i], kv_cache.v[i], meta, cfg.rope_theta, decode_tables
        )
        if layer_done is not None:
            layer_done(i)
        if comm is not None:
            o = comm.all_reduce(o)
        x = K.fused_add_rmsnorm(o, residual, layer.post_attention_layernorm.weight, eps)
        if hasattr(layer.mlp, "experts"):
            delta = moe(layer.mlp, x, comm)
        else:
            delta = mlp(layer.mlp, x)
            if comm is not None:
                delta = comm.all_reduce(delta)
    return add_norm(residual, delta, inner.norm.weight, eps)
