"""ERNIE-4.5 dense and MoE, exactly per shared/ERNIE.md §1: one module tree for every path.

One implementation of both models (nano-vllm style): q/k/v fused into ``qkv_proj``, gate/up into
``gate_up_proj`` (gate rows first), routed experts stacked as ``w13 [E, 2*mI, H]`` and
``w2 [E, H, mI]`` so a grouped kernel can replace the per-expert loop. ``forward`` runs on the
paged KV cache (AttnMeta); ``forward_train`` is a plain causal pass without cache (torch).

Built for a :class:`~native.parallel.context.ParallelContext`: under TP every layer holds its
shard (native/model/layers.py, split per native/parallel/tp.py) and does its own collectives;
under EP each MoE layer holds its expert range and dispatches the step's rows over the EP group
itself. Every layer computes through the op table (native/model/ops.py: torch, the reference;
native/model/gpu_ops.py: Triton) that :meth:`ErnieForCausalLM.forward` picks for the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..attn_meta import AttnMeta
from ..kv_cache import KVCache
from ..parallel.context import NO_PARALLEL, Group, ParallelContext
from ..parallel.tp import HeadSplit, split_range
from .config import ErnieConfig
from .layers import (
    Experts,
    MergedColumnParallelLinear,
    OpModule,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from .ops import TORCH_OPS, Ops, Rotary
from .quant import QuantExperts, check_quantization, linear_bits

__all__ = ["Attention", "DecoderLayer", "ErnieForCausalLM", "Experts", "MLP", "MoE", "RMSNorm", "Rotary"]


class RMSNorm(OpModule):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rmsnorm(x, self.weight, self.eps)

    def add(self, delta, residual: torch.Tensor):
        """(norm of ``residual + delta``, the new residual); the op table may fuse both."""
        return self.ops.add_rmsnorm(delta, residual, self.weight, self.eps)


class Attention(OpModule):
    def __init__(self, cfg: ErnieConfig, split: HeadSplit, tp: Group, dtype: torch.dtype, quantization: str):
        super().__init__()
        self.num_heads = len(split.q_heads)
        self.num_kv_heads = len(split.kv_heads)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        bits = linear_bits(quantization, is_expert=False)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, split, bits, dtype)
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, bits, dtype, tp)

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step) -> torch.Tensor:
        """x [T, H] -> [T, H]; stores this step's K/V at the step's slot mapping."""
        return self.o_proj(self.ops.attention(self, self.qkv_proj(x), k_cache, v_cache, step))

    def forward_train(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H], plain causal attention."""
        qkv = self.qkv_proj(x).unflatten(-1, (-1, self.head_dim))
        nq = self.num_heads + self.num_kv_heads
        qk = Rotary.apply(qkv[..., :nq, :], cis)
        q, k, v = qk[..., : self.num_heads, :], qk[..., self.num_heads :, :], qkv[..., nq:, :]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(o.transpose(1, 2).flatten(-2))


class MLP(OpModule):
    """SwiGLU: down(silu(gate x) * up x), gate and up fused into one [2I, H] projection, split
    over TP along I; ``reduce=False`` leaves the sum over the group to the caller."""

    def __init__(self, hidden: int, inter: int, bits: int | None, dtype: torch.dtype, tp: Group, reduce: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bits, dtype, tp)
        self.down_proj = RowParallelLinear(inter, hidden, bits, dtype, tp, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.swiglu(self.gate_up_proj, x))


class MoE(OpModule):
    """Router (fp32, whole on every rank), routed experts, optional shared experts.

    TP: every expert holds its slice of the intermediate dimension; the block's output (routed +
    shared) is all-reduced once. EP (``parallel.ep_rows`` set): this rank holds experts
    ``[r*E/N, (r+1)*E/N)``; each step it pads its rows to the agreed ``ep_rows.tokens``,
    all-gathers them (fixed buffers per rank, nothing read back to the host), applies its own
    experts and reduce-scatters every rank its rows back (native/parallel/ep.py plans the size).
    """

    def __init__(self, cfg: ErnieConfig, parallel: ParallelContext, dtype: torch.dtype, quantization: str):
        super().__init__()
        E, H, mI = cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        tp, ep = parallel.tp, parallel.ep
        self.num_experts = E
        self.hidden_size = H
        self.dtype = dtype
        self.top_k = cfg.moe_k
        self.norm_min = cfg.moe_norm_min
        self.tp, self.ep, self.ep_rows = tp, ep, parallel.ep_rows
        inter_range = split_range(mI, tp.rank, tp.size, "moe_intermediate_size")
        expert_range = None
        if self.ep_rows is not None:
            if E % ep.size:
                raise ValueError(f"{E} experts do not split over EP{ep.size}")
            expert_range = (ep.rank * E // ep.size, (ep.rank + 1) * E // ep.size)
        self.expert_macs = 3 * H * (inter_range[1] - inter_range[0])
        self.gate = nn.Linear(H, E, bias=False, dtype=torch.float32)  # router: always fp32
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        bits = linear_bits(quantization, is_expert=True)
        if bits is None:
            self.experts = Experts(E, H, mI, dtype, expert_range, inter_range)
        else:
            self.experts = QuantExperts(E, H, mI, bits, dtype, expert_range, inter_range)
        self.shared_experts = None
        if cfg.moe_num_shared_experts > 0:
            self.shared_experts = MLP(
                H, cfg.shared_intermediate_size, linear_bits(quantization, False), dtype, tp, reduce=False
            )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] in x's dtype, expert ids [T, k])."""
        probs = torch.softmax(F.linear(x.float(), self.gate.weight.float()), dim=-1)
        _, idx = torch.topk(probs + self.e_score_correction_bias, self.top_k, dim=-1)
        w = probs.gather(-1, idx)
        w = w / w.sum(-1, keepdim=True).clamp(min=self.norm_min)
        return w.to(x.dtype), idx

    def forward(self, x: torch.Tensor):
        """x [T, H] -> the block's delta (the op table's form; [.., H] tensors keep x's shape)."""
        if x.dim() != 2:  # forward_train's [B, L, H] (torch table)
            return self.forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        if self.ep_rows is not None:
            return self._forward_ep(x)
        delta = self.ops.moe(self, x)
        if self.tp.size > 1:
            delta = self.tp.comm.all_reduce(self.ops.combine(delta))
        return delta

    def _forward_ep(self, x: torch.Tensor):
        rows = self.ep_rows.tokens
        if rows == 0:  # nobody has rows this step: no collectives
            return x
        T = x.shape[0]
        comm = self.ep.comm
        gathered = comm.all_gather(self.ops.ep_payload(self, x, rows))  # [N * rows, ...]
        mine = comm.reduce_scatter(self.ops.ep_experts(self, gathered))[:T]
        shared = self.shared_experts(x) if self.shared_experts is not None and T else None
        return self.ops.moe_output(mine, 1, shared, x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ErnieConfig, layer_idx: int, parallel: ParallelContext, split: HeadSplit,
                 dtype: torch.dtype, quantization: str):
        super().__init__()
        self.self_attn = Attention(cfg, split, parallel.tp, dtype, quantization)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(cfg, parallel, dtype, quantization)
        else:
            bits = linear_bits(quantization, False)
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bits, dtype, parallel.tp)


class ErnieModel(nn.Module):
    def __init__(self, cfg: ErnieConfig, parallel: ParallelContext, split: HeadSplit, dtype: torch.dtype,
                 quantization: str):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, dtype, parallel.tp, padding_idx=cfg.pad_token_id
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, parallel, split, dtype, quantization) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class ErnieForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ErnieConfig,
        dtype: torch.dtype = torch.bfloat16,
        quantization: str = "bf16",
        parallel: ParallelContext | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.quantization = check_quantization(quantization)
        self.parallel = parallel = parallel or NO_PARALLEL
        tp = parallel.tp
        self.head_split = HeadSplit(tp.rank, tp.size, cfg.num_attention_heads, cfg.num_key_value_heads)
        self.model = ErnieModel(cfg, parallel, self.head_split, dtype, quantization)
        self.lm_head = (
            None if cfg.tie_word_embeddings else ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, tp)
        )
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        # None: the Triton kernel path whenever it supports the weights and cache (CUDA bf16);
        # True / False force it (True on CPU tensors needs TRITON_INTERPRET=1)
        self.use_kernels: bool | None = None
        # CPU tensors: the torch table's hot ops on native/cpu's compiled kernels when they build
        # (False: plain torch throughout, the reference)
        self.cpu_kernels = True
        self.ops: Ops = TORCH_OPS
        if self.model.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """transformers-style init: normal(0, std) matrices, unit norms, zero correction bias."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        embed = self.model.embed_tokens
        pad = self.cfg.pad_token_id
        if embed.start <= pad < embed.stop:
            embed.weight[pad - embed.start].zero_()
        for m in self.modules():
            if isinstance(m, MoE):
                m.e_score_correction_bias.zero_()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def use_ops(self, ops: Ops) -> Ops:
        """Make ``ops`` the table of every layer (a no-op when it already is)."""
        if ops is not self.ops:
            self.ops = ops
            for m in self.modules():
                if isinstance(m, OpModule):
                    m.ops = ops
        return ops

    def select_ops(self, kv_cache: KVCache | None) -> Ops:
        """The op table for steps over ``kv_cache`` (see ``use_kernels``), made the layers' own.
        None: keep the current one."""
        if kv_cache is None:
            return self.ops
        if self.kernel_path(kv_cache):
            from .gpu_ops import KERNEL_OPS

            return self.use_ops(KERNEL_OPS)
        on_cpu = self.model.embed_tokens.weight.device.type == "cpu"
        if self.cpu_kernels and on_cpu and self.dtype in (torch.float32, torch.bfloat16):
            from native.cpu.ops import cpu_ops

            table = cpu_ops()
            if table is not None:
                return self.use_ops(table)
        return self.use_ops(TORCH_OPS)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttnMeta,
        layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final-normed hidden states [T, H].

        Stores each layer's K/V at ``meta.slot_mapping`` and calls ``layer_done(i)`` as soon as
        layer ``i`` has stored its K/V (so a KV transfer of layer i overlaps later layers).
        On CUDA bf16 the layers run on the Triton kernels (native/model/gpu_ops.py), on the CPU
        on native/cpu's compiled kernels where they build (native/cpu/ops.py).
        """
        ops = self.select_ops(kv_cache)
        step = ops.begin(self, positions, meta)
        residual = self.model.embed_tokens(input_ids)
        delta = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer.input_layernorm.add(delta, residual)
            o = layer.self_attn(x, kv_cache.k[i], kv_cache.v[i], step)
            if layer_done is not None:
                layer_done(i)
            x, residual = layer.post_attention_layernorm.add(o, residual)
            delta = layer.mlp(x)
        return self.model.norm.add(delta, residual)[0]

    def kernel_path(self, kv_cache: KVCache) -> bool:
        """Whether steps over ``kv_cache`` run on the Triton kernels (see ``use_kernels``)."""
        if self.use_kernels is not None:
            return self.use_kernels
        if not self.model.embed_tokens.weight.is_cuda:
            return False
        from . import gpu_ops

        return gpu_ops.kernels_supported(self, kv_cache) is None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] in fp32 (all-gathered over the TP group)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.logits(hidden)

    def forward_train(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> logits [B, L, V] (fp32); plain causal attention, no cache (torch)."""
        self.use_ops(TORCH_OPS)
        L = input_ids.shape[1]
        cis = self.rotary.cis(torch.arange(L, device=input_ids.device), L)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = h + layer.self_attn.forward_train(layer.input_layernorm(h), cis)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.compute_logits(self.model.norm(h))
