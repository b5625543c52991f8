"""The model's op table: what each layer's ``forward`` computes with, chosen once per model.

:class:`Ops` names the operations; :class:`TorchOps` (here, plain torch: the CPU path and the
reference) and ``gpu_ops.KernelOps`` (the Triton kernels) implement them. The module tree of
native/model/ernie.py is one: only the table differs. Two values are the table's own:

* the *step*: what :meth:`Ops.begin` prepares once per forward (attention plan and RoPE table on
  torch; padded decode tables on the kernels), passed to every attention layer;
* a block's *delta*: what a MLP / MoE block returns to be added to the residual. Torch returns the
  tensor; the kernels may return a MoE block's expert outputs uncombined, and
  :meth:`Ops.add_rmsnorm` fuses the combine into the next norm. :meth:`Ops.combine` makes a delta
  a tensor (before a TP all-reduce).

Numerics of the torch table follow transformers: RMSNorm casts back to the input dtype before the
weight multiply; interleaved RoPE in fp32; router in fp32 (softmax, correction bias for selection
only, renormalisation clamped at ``moe_norm_min``, weights cast to the model dtype); routed expert
outputs are accumulated in fp32.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import AttnPlan, paged_attention, plan_attention, store_kv
from ..attn_meta import AttnMeta

# a MoE step with at most this many multiply-adds over all (token, expert) pairs runs densely
DENSE_MOE_MACS = 1 << 24


class Rotary:
    """Interleaved (GPT-J) RoPE over the full head_dim, in fp32.

    Pairs (2i, 2i+1) rotate by ``pos * theta^(-2i/hd)``: a complex multiply by ``cos + i sin``
    (the same products as transformers' rotate_half form). Tables grow on demand.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._cis: torch.Tensor | None = None

    def real_table(self, max_pos: int, device: torch.device) -> torch.Tensor:
        """fp32 [P >= max_pos, hd]: each position's (cos, sin) pairs, interleaved (compiled kernels)."""
        return torch.view_as_real(self._table(max(max_pos, 1), device)).flatten(1)

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


def padded_rows(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """``x [T, ...]`` padded with zero rows to the step's agreed ``tokens`` (EP dispatch)."""
    T = x.shape[0]
    if T > tokens:
        raise RuntimeError(f"EP step of {T} tokens exceeds the agreed {tokens} (plan() was not called?)")
    return x if T == tokens else torch.cat([x, x.new_zeros((tokens - T, *x.shape[1:]))])


def split_qkv(attn, qkv: torch.Tensor):
    """qkv [..., (nh + 2 nkv) * hd] -> q [..., nh, hd], k, v [..., nkv, hd] (views)."""
    qkv = qkv.unflatten(-1, (-1, attn.head_dim))
    nh, nq = attn.num_heads, attn.num_heads + attn.num_kv_heads
    return qkv[..., :nh, :], qkv[..., nh:nq, :], qkv[..., nq:, :]


class Ops(abc.ABC):
    """The operations a layer's ``forward`` calls (see the module docstring)."""

    name = "abstract"

    @abc.abstractmethod
    def begin(self, model, positions: torch.Tensor, meta: AttnMeta):
        """Per-forward state for the attention layers."""

    @abc.abstractmethod
    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of ``x`` (ERNIE's: fp32 statistics, cast back before the weight)."""

    @abc.abstractmethod
    def add_rmsnorm(self, delta, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """(RMSNorm of ``residual + delta``, that sum as the new residual); ``delta`` None: no add."""

    @abc.abstractmethod
    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T of a layers.LinearBase (float or weight-only)."""

    @abc.abstractmethod
    def swiglu(self, gate_up, x: torch.Tensor) -> torch.Tensor:
        """silu(gate x) * up x of a fused gate/up projection (gate rows first)."""

    @abc.abstractmethod
    def attention(self, attn, qkv: torch.Tensor, k_cache, v_cache, step) -> torch.Tensor:
        """RoPE, K/V store at the step's slots, paged attention: qkv [T, .] -> [T, nh * hd]."""

    @abc.abstractmethod
    def moe_experts(self, moe, x: torch.Tensor):
        """Route ``x [T, H]`` and apply the routed experts (result in the table's own form)."""

    @abc.abstractmethod
    def moe_output(self, routed, top_k: int, shared: torch.Tensor | None, dtype: torch.dtype):
        """A MoE block's delta from its routed part (``top_k`` outputs a row) and shared expert."""

    def moe(self, moe, x: torch.Tensor):
        """A MoE block's delta before any collective: routed experts, shared expert, combine."""
        routed = self.moe_experts(moe, x)
        shared = moe.shared_experts(x) if moe.shared_experts is not None else None
        return self.moe_output(routed, moe.top_k, shared, x.dtype)

    @abc.abstractmethod
    def combine(self, delta) -> torch.Tensor:
        """A MoE block's delta as one tensor (where a collective or the caller needs it)."""

    @abc.abstractmethod
    def ep_payload(self, moe, x: torch.Tensor, rows: int) -> torch.Tensor:
        """What this rank sends into the EP all-gather: ``x`` padded to ``rows`` (and whatever
        else the table's experts need of each row)."""

    @abc.abstractmethod
    def ep_experts(self, moe, gathered: torch.Tensor) -> torch.Tensor:
        """This rank's experts over every rank's rows: the combined partial sums [N * rows, H]."""


@dataclass
class TorchStep:
    meta: AttnMeta
    plan: AttnPlan
    cis: torch.Tensor


class TorchOps(Ops):
    name = "torch"

    def begin(self, model, positions, meta):
        return TorchStep(meta, plan_attention(meta), model.rotary.cis(positions, meta.max_context_len))

    def rmsnorm(self, x, weight, eps):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * y.to(x.dtype)

    def add_rmsnorm(self, delta, residual, weight, eps):
        if delta is not None:
            residual = residual + delta
        return self.rmsnorm(residual, weight, eps), residual

    def linear(self, layer, x):
        if layer.bits is None:
            return F.linear(x, layer.weight)
        from .quant import int_weight

        # per-output-channel scale commutes with the GEMM (gpt-fast's int8 linear)
        return F.linear(x, int_weight(layer.qweight, layer.bits).to(x.dtype)) * layer.scales.to(x.dtype)

    def swiglu(self, gate_up, x):
        gate, up = gate_up(x).chunk(2, dim=-1)
        return F.silu(gate) * up

    def attention(self, attn, qkv, k_cache, v_cache, step: TorchStep):
        q, k, v = split_qkv(attn, qkv)
        q, k = Rotary.apply(q, step.cis), Rotary.apply(k, step.cis)
        store_kv(k, v, k_cache, v_cache, step.meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, step.meta, attn.scale, attn.num_kv_heads, plan=step.plan)
        return o.flatten(-2)

    def moe_experts(self, moe, x):
        """Combined routed output [T, H] in fp32."""
        weights, idx = moe.route(x)
        T = x.shape[0]
        if T * moe.num_experts * moe.expert_macs <= DENSE_MOE_MACS:
            # small step: all experts on all tokens in 3 GEMMs beats a per-expert loop
            dense_w = torch.zeros(T, moe.num_experts, dtype=torch.float32, device=x.device)
            dense_w = dense_w.scatter(1, idx, weights.float())
            y = moe.experts.forward_all(x).float()  # [E, T, H]
            return torch.einsum("te,eth->th", dense_w, y)
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=moe.num_experts).tolist()
        token_of = order // moe.top_k
        w_sorted = weights.flatten()[order].float()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = token_of[start : start + n]
            y = moe.experts.forward_expert(e, x[tok])
            out = out.index_add(0, tok, y.float() * w_sorted[start : start + n, None])
            start += n
        return out

    def moe_output(self, routed, top_k, shared, dtype):
        out = routed.float() if shared is None else routed.float() + shared.float()
        return out.to(dtype)

    def combine(self, delta):
        return delta

    def ep_payload(self, moe, x, rows):
        # routing is computed where the token lives (as without EP) and travels with it: one buffer
        # [rows, H | k ids | k weights] in fp32 (bf16 values and expert ids are exact in fp32)
        T, H = x.shape
        k = moe.top_k
        buf = padded_rows(x.new_zeros((T, H + 2 * k), dtype=torch.float32), rows)
        buf[:, H : H + k] = -1
        if T:
            weights, idx = moe.route(x)
            buf[:T, :H] = x.float()
            buf[:T, H : H + k] = idx.float()
            buf[:T, H + k :] = weights.float()
        return buf

    def ep_experts(self, moe, gathered):
        H, k = moe.hidden_size, moe.top_k
        xs = gathered[:, :H].to(moe.dtype)
        ids = gathered[:, H : H + k].long()
        ws = gathered[:, H + k :]
        out = torch.zeros((gathered.shape[0], H), dtype=torch.float32, device=gathered.device)
        experts = moe.experts
        lo = experts.expert_start
        for e in range(lo, lo + experts.num_experts):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            y = experts.forward_expert(e - lo, xs[tok]).float()
            out.index_add_(0, tok, y * ws[tok, slot, None])
        return out


TORCH_OPS = TorchOps()
