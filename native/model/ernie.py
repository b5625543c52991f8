"""ERNIE-4.5 dense and MoE in plain torch, exactly per shared/ERNIE.md §1.

One implementation of both models (nano-vllm style): q/k/v fused into ``qkv_proj``, gate/up into
``gate_up_proj`` (gate rows first), routed experts stacked as ``w13 [E, 2*mI, H]`` and
``w2 [E, H, mI]`` so a grouped kernel can replace the per-expert loop. ``forward`` runs on the
paged KV cache (AttnMeta); ``forward_train`` is a plain causal pass without cache.

Numerics follow transformers: RMSNorm casts back to the input dtype before the weight multiply;
interleaved RoPE in fp32; router in fp32 (softmax, correction bias for selection only,
renormalisation clamped at ``moe_norm_min``, weights cast to the model dtype); routed expert
outputs are accumulated in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttnPlan, paged_attention, plan_attention, store_kv
from ..attn_meta import AttnMeta
from ..kv_cache import KVCache
from .config import ErnieConfig
from .quant import QuantExperts, check_quantization, linear_bits, make_linear

# a MoE step with at most this many multiply-adds over all (token, expert) pairs runs densely
DENSE_MOE_MACS = 1 << 24


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class Rotary:
    """Interleaved (GPT-J) RoPE over the full head_dim, in fp32.

    Pairs (2i, 2i+1) rotate by ``pos * theta^(-2i/hd)``: a complex multiply by ``cos + i sin``
    (the same products as transformers' rotate_half form). Tables grow on demand.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._cis: torch.Tensor | None = None

    def _table(self, max_pos: int, device: torch.device) -> torch.Tensor:
        if self._cis is None or self._cis.shape[0] < max_pos or self._cis.device != device:
            n = 1 << max(10, (max_pos - 1).bit_length())
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
            inv_freq = 1.0 / (self.theta**exponent)
            freqs = torch.arange(n, device=device).float()[:, None] * inv_freq[None, :]
            self._cis = torch.complex(freqs.cos(), freqs.sin())
        return self._cis

    def cis(self, positions: torch.Tensor, max_pos: int | None = None) -> torch.Tensor:
        """positions [T] (all < max_pos) -> complex64 [T, 1, hd/2]."""
        if max_pos is None:
            max_pos = int(positions.max()) + 1 if positions.numel() else 1
        return self._table(max(max_pos, 1), positions.device).index_select(0, positions)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """x [..., T, n, hd] -> rotated, same dtype (math in fp32)."""
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * cis).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ErnieConfig, dtype: torch.dtype, quantization: str):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        bits = linear_bits(quantization, is_expert=False)
        self.qkv_proj = make_linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bits, dtype)
        self.o_proj = make_linear(cfg.q_size, cfg.hidden_size, bits, dtype)

    def _qkv(self, x: torch.Tensor, cis: torch.Tensor):
        """x [..., H] -> q [..., nh, hd], k, v [..., nkv, hd] with RoPE applied to q and k."""
        qkv = self.qkv_proj(x).unflatten(-1, (-1, self.head_dim))
        nq = self.num_heads + self.num_kv_heads
        qk = Rotary.apply(qkv[..., :nq, :], cis)
        return qk[..., : self.num_heads, :], qk[..., self.num_heads :, :], qkv[..., nq:, :]

    def forward(self, x, cis, k_cache, v_cache, meta: AttnMeta, plan: AttnPlan) -> torch.Tensor:
        q, k, v = self._qkv(x, cis)
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale, self.num_kv_heads, plan=plan)
        return self.o_proj(o.flatten(-2))

    def forward_train(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H], plain causal attention."""
        q, k, v = self._qkv(x, cis)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(o.transpose(1, 2).flatten(-2))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x), gate and up fused into one [2I, H] projection."""

    def __init__(self, hidden: int, inter: int, bits: int | None, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = make_linear(hidden, 2 * inter, bits, dtype)
        self.down_proj = make_linear(inter, hidden, bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """Routed experts as stacked weights: w13 [E, 2mI, H] (gate rows, then up), w2 [E, H, mI]."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=dtype))

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[e])

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: x [T, H] -> [E, T, H]."""
        gate, up = torch.matmul(x, self.w13.transpose(1, 2)).chunk(2, dim=-1)
        return torch.matmul(F.silu(gate) * up, self.w2.transpose(1, 2))

    @torch.no_grad()
    def load_rows(self, which: str, e: int, row_start: int, w: torch.Tensor) -> None:
        getattr(self, which)[e, row_start : row_start + w.shape[0]].copy_(w)


class MoE(nn.Module):
    def __init__(self, cfg: ErnieConfig, dtype: torch.dtype, quantization: str):
        super().__init__()
        E, H, mI = cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = E
        self.top_k = cfg.moe_k
        self.norm_min = cfg.moe_norm_min
        self.expert_macs = 3 * H * mI
        self.gate = nn.Linear(H, E, bias=False, dtype=torch.float32)  # router: always fp32
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        bits = linear_bits(quantization, is_expert=True)
        self.experts = Experts(E, H, mI, dtype) if bits is None else QuantExperts(E, H, mI, bits, dtype)
        self.shared_experts = None
        if cfg.moe_num_shared_experts > 0:
            self.shared_experts = MLP(
                H, cfg.shared_intermediate_size, linear_bits(quantization, False), dtype
            )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] in x's dtype, expert ids [T, k])."""
        probs = torch.softmax(F.linear(x.float(), self.gate.weight.float()), dim=-1)
        _, idx = torch.topk(probs + self.e_score_correction_bias, self.top_k, dim=-1)
        w = probs.gather(-1, idx)
        w = w / w.sum(-1, keepdim=True).clamp(min=self.norm_min)
        return w.to(x.dtype), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.route(x)
        T = x.shape[0]
        if T * self.num_experts * self.expert_macs <= DENSE_MOE_MACS:
            # small step: all experts on all tokens in 3 GEMMs beats a per-expert loop
            dense_w = torch.zeros(T, self.num_experts, dtype=torch.float32, device=x.device)
            dense_w = dense_w.scatter(1, idx, weights.float())
            y = self.experts.forward_all(x).float()  # [E, T, H]
            out = torch.einsum("te,eth->th", dense_w, y)
        else:
            out = self._forward_sparse(x, weights, idx)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).float()
        return out.to(x.dtype).reshape(shape)

    def _forward_sparse(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // self.top_k
        w_sorted = weights.flatten()[order].float()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = token_of[start : start + n]
            y = self.experts.forward_expert(e, x[tok])
            out = out.index_add(0, tok, y.float() * w_sorted[start : start + n, None])
            start += n
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ErnieConfig, layer_idx: int, dtype: torch.dtype, quantization: str):
        super().__init__()
        self.self_attn = Attention(cfg, dtype, quantization)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(cfg, dtype, quantization)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, linear_bits(quantization, False), dtype)


class ErnieModel(nn.Module):
    def __init__(self, cfg: ErnieConfig, dtype: torch.dtype, quantization: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id, dtype=dtype
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, dtype, quantization) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class ErnieForCausalLM(nn.Module):
    def __init__(self, cfg: ErnieConfig, dtype: torch.dtype = torch.bfloat16, quantization: str = "bf16"):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.quantization = check_quantization(quantization)
        self.model = ErnieModel(cfg, dtype, quantization)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        )
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        # None: the Triton kernel path whenever it supports the weights and cache (CUDA bf16);
        # True / False force it (True on CPU tensors needs TRITON_INTERPRET=1)
        self.use_kernels: bool | None = None
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
        pad = self.cfg.pad_token_id
        if 0 <= pad < self.cfg.vocab_size:
            self.model.embed_tokens.weight[pad].zero_()
        for m in self.modules():
            if isinstance(m, MoE):
                m.e_score_correction_bias.zero_()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

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
        On CUDA the step runs on the Triton kernels (native/model/gpu_ops.py).
        """
        if self.kernel_path(kv_cache):
            from . import gpu_ops

            return gpu_ops.forward(self, input_ids, positions, kv_cache, meta, layer_done)
        plan = plan_attention(meta)
        cis = self.rotary.cis(positions, meta.max_context_len)
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            h = h + layer.self_attn(x, cis, kv_cache.k[i], kv_cache.v[i], meta, plan)
            if layer_done is not None:
                layer_done(i)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.norm(h)

    def kernel_path(self, kv_cache: KVCache) -> bool:
        """Whether forward runs on the Triton kernels (see ``use_kernels``)."""
        if self.use_kernels is not None:
            return self.use_kernels
        if not self.model.embed_tokens.weight.is_cuda:
            return False
        from . import gpu_ops

        return gpu_ops.kernels_supported(self, kv_cache) is None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] in fp32."""
        return F.linear(hidden, self.lm_head_weight).float()

    def forward_train(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> logits [B, L, V] (fp32); plain causal attention, no cache."""
        L = input_ids.shape[1]
        cis = self.rotary.cis(torch.arange(L, device=input_ids.device), L)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = h + layer.self_attn.forward_train(layer.input_layernorm(h), cis)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.compute_logits(self.model.norm(h))
