"""Weight-only quantization with Paddle's semantics (shared/ERNIE.md §5, §8), gpt-fast style.

Primitives first (quantize / pack / unpack / dequantize on plain tensors), modules after
(:class:`WeightOnlyLinear`, :class:`QuantExperts`; the model's parallel linears in layers.py store
the same format), module swapping last (:func:`quantize_model`).

* Symmetric, per output channel: ``scale[n] = max_k |w[n, k]| / B`` stored in the model dtype,
  ``q = clip(round(w / scale), -B, B)`` with C ``round()`` (half away from zero); B = 127 (int8)
  or 7 (int4). Dequantization is ``q * scale``.
* int4 is stored as ``q + 8`` nibbles, two per byte along K, even k in the low nibble:
  uint8 ``[N, K/2]``.
* ``--quantization``: ``bf16`` (none), ``wint8`` (every Linear int8: attention, dense MLP,
  routed and shared experts), ``wint4`` (routed experts int4, every other Linear int8 — FastDeploy's
  mixed meaning). Embedding, lm_head and norms stay in the model dtype; the router stays fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Experts, ExpertsBase, LinearBase, ReplicatedLinear, allocate_weight

QUANTIZATIONS = ("bf16", "wint8", "wint4")
INT8_MAX = 127
INT4_MAX = 7


def check_quantization(quantization: str) -> str:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    return quantization


def linear_bits(quantization: str, is_expert: bool) -> int | None:
    """Bits for a Linear under ``quantization`` (None = not quantized)."""
    check_quantization(quantization)
    if quantization == "bf16":
        return None
    if quantization == "wint4" and is_expert:
        return 4
    return 8


# ---------------------------------------------------------------------------------- primitives
def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C ``round()``: halves go away from zero (torch.round goes to even)."""
    t = torch.trunc(x)
    return torch.where((x - t).abs() >= 0.5, t + torch.sign(x), t)


def _quantize(
    w: torch.Tensor, bound: int, scale_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if w.dim() < 2:
        raise ValueError(f"expected a weight [..., N, K], got shape {tuple(w.shape)}")
    wf = w.float()
    scale = (wf.abs().amax(dim=-1) / bound).to(scale_dtype or w.dtype)
    s = scale.float()
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = round_half_away(wf / s.unsqueeze(-1)).clamp_(-bound, bound).to(torch.int8)
    return q, scale


def quantize_int8(
    w: torch.Tensor, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q int8 [..., N, K] in [-127, 127], scale [..., N] in scale_dtype or w's dtype)."""
    return _quantize(w, INT8_MAX, scale_dtype)


def quantize_int4(
    w: torch.Tensor, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q int8 [..., N, K] in [-7, 7] (unpacked), scale [..., N])."""
    return _quantize(w, INT4_MAX, scale_dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., K] in [-7, 7] -> uint8 [..., K/2]: (q+8) nibbles, even k in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even K, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 [..., K] in [-8, 7] (inverse of :func:`pack_int4`)."""
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    return torch.stack((lo, hi), dim=-1).flatten(-2) - 8


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype or scale.dtype)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    return dequantize_int8(unpack_int4(packed), scale, dtype)


def quantize_weight(w: torch.Tensor, bits: int, scale_dtype: torch.dtype | None = None):
    """Storage form for ``bits``: (int8 [N, K] or packed uint8 [N, K/2], scale [N])."""
    if bits == 8:
        return quantize_int8(w, scale_dtype)
    if bits == 4:
        q, s = quantize_int4(w, scale_dtype)
        return pack_int4(q), s
    raise ValueError(f"unsupported bits {bits}")


@torch.no_grad()
def store_rows(
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    bits: int | None,
    rows: slice | torch.Tensor,
    w: torch.Tensor,
    cols: tuple[int, int] | None = None,
) -> None:
    """Write float rows ``w [n, K]`` into ``weight[rows]`` (a slice or n indices).

    With ``bits`` the rows are quantized (:func:`quantize_weight`) and their scales go to
    ``scales[rows]``. ``cols = (start, stop)`` keeps only those input columns of ``w``; rows are
    quantized whole first, so a kept row's scale is the scale of its whole checkpoint row (packed
    int4 keeps bytes ``start//2 : stop//2``, so both must be even).
    """
    if bits is not None:
        w, s = quantize_weight(w, bits, scales.dtype)
        scales[rows] = s
    if cols is not None:
        start, stop = cols
        if bits == 4:
            if start % 2 or stop % 2:
                raise ValueError(f"int4 columns {start}:{stop} do not fall on byte boundaries")
            start, stop = start // 2, stop // 2
        w = w[:, start:stop]
    weight[rows] = w.to(weight.dtype)


def int_weight(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """The int8 values of a stored weight (int8 as is; packed int4 unpacked)."""
    return stored if bits == 8 else unpack_int4(stored)


# ---------------------------------------------------------------------------------- modules
class WeightOnlyLinear(ReplicatedLinear):
    """y = x @ (q * scale)^T, with q stored as int8 [N, K] or packed int4 uint8 [N, K/2] (a whole,
    replicated Linear; the model's parallel linears of layers.py store the same format)."""

    def __init__(self, in_features: int, out_features: int, bits: int, dtype: torch.dtype = torch.bfloat16):
        if bits not in (4, 8):
            raise ValueError(f"unsupported bits {bits}")
        super().__init__(in_features, out_features, bits, dtype)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(int_weight(self.qweight, self.bits), self.scales, dtype)

    def load_rows(self, row_start: int, w: torch.Tensor) -> None:
        """Quantize output rows ``row_start:row_start+len(w)`` from a float weight slice."""
        store_rows(*self.storage(), slice(row_start, row_start + w.shape[0]), w)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> WeightOnlyLinear:
        if linear.bias is not None:
            raise ValueError("WeightOnlyLinear has no bias")
        m = cls(linear.in_features, linear.out_features, bits, linear.weight.dtype)
        m.to(linear.weight.device)
        m.load_rows(0, linear.weight.detach())
        return m


class QuantExperts(ExpertsBase):
    """Routed experts as quantized stacks: w13 (gate rows first, then up) [E, 2mI, H] and w2 [E, H, mI],
    of the experts and intermediate slice this rank holds (layers.ExpertsBase).

    Same interface as the float ``layers.Experts``: ``forward_expert(e, x)``, ``load_rows``.
    """

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        inter: int,
        bits: int,
        dtype: torch.dtype = torch.bfloat16,
        expert_range: tuple[int, int] | None = None,
        inter_range: tuple[int, int] | None = None,
    ):
        super().__init__(num_experts, hidden, inter, expert_range, inter_range)
        if bits not in (4, 8):
            raise ValueError(f"unsupported bits {bits}")
        E, mI = self.num_experts, self.inter
        if bits == 4 and (hidden % 2 or mI % 2):
            raise ValueError("int4 experts need even hidden and moe_intermediate sizes (per TP rank)")
        self.bits = bits
        qdtype = torch.int8 if bits == 8 else torch.uint8
        div = 1 if bits == 8 else 2
        self.register_buffer("w13_q", torch.zeros(E, 2 * mI, hidden // div, dtype=qdtype))
        self.register_buffer("w13_s", torch.zeros(E, 2 * mI, dtype=dtype))
        self.register_buffer("w2_q", torch.zeros(E, hidden, mI // div, dtype=qdtype))
        self.register_buffer("w2_s", torch.zeros(E, hidden, dtype=dtype))

    def storage(self, which: str, e: int):
        if which == "w13":
            return self.w13_q[e], self.w13_s[e], self.bits
        return self.w2_q[e], self.w2_s[e], self.bits

    def stacks(self):
        return self.w13_q, self.w2_q, self.w13_s, self.w2_s

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        w13 = int_weight(self.w13_q[e], self.bits).to(dt)
        gate_up = F.linear(x, w13) * self.w13_s[e].to(dt)
        gate, up = gate_up.chunk(2, dim=-1)
        w2 = int_weight(self.w2_q[e], self.bits).to(dt)
        return F.linear(F.silu(gate) * up, w2) * self.w2_s[e].to(dt)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, x [T, H] -> [E, T, H]; or each expert on its own rows,
        x [E, C, H] -> [E, C, H]."""
        dt = x.dtype
        w13 = int_weight(self.w13_q, self.bits).to(dt)
        gate_up = torch.matmul(x, w13.transpose(1, 2)) * self.w13_s[:, None, :].to(dt)
        gate, up = gate_up.chunk(2, dim=-1)
        w2 = int_weight(self.w2_q, self.bits).to(dt)
        return torch.matmul(F.silu(gate) * up, w2.transpose(1, 2)) * self.w2_s[:, None, :].to(dt)

    def load_rows(self, which: str, e: int, row_start: int, w: torch.Tensor) -> None:
        """Quantize rows of expert ``e``'s ``which`` ("w13" or "w2") from a float slice."""
        store_rows(*self.storage(which, e), slice(row_start, row_start + w.shape[0]), w)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden}, inter={self.inter}, bits={self.bits}"


# ---------------------------------------------------------------------------------- swapping
@torch.no_grad()
def quantize_linear_(layer: LinearBase, bits: int) -> None:
    """Turn a float layers.LinearBase weight-only in place (its shard record kept)."""
    w = layer.weight.detach()
    del layer.weight
    allocate_weight(layer, layer.out_features, layer.in_features, bits, w.dtype, w.device)
    store_rows(*layer.storage(), slice(None), w)


@torch.no_grad()
def quantize_model(model: nn.Module, quantization: str) -> nn.Module:
    """Make a float ERNIE model's linears and expert stacks weight-only, in place.

    The vocabulary embedding / head and the fp32 router ``gate`` stay as they are. Scales are
    those of the rows held (exact for a model that holds whole rows: TP1, or EP).
    """
    if check_quantization(quantization) == "bf16":
        return model
    for module in list(model.modules()):
        if isinstance(module, LinearBase) and module.bits is None:
            quantize_linear_(module, linear_bits(quantization, False))
        for child_name, child in list(module.named_children()):
            if isinstance(child, Experts):
                bits = linear_bits(quantization, True)
                q = QuantExperts(child.total_experts, child.hidden, child.total_inter, bits, child.w13.dtype,
                                 child.expert_range, child.inter_range).to(child.w13.device)
                for e in range(child.num_experts):
                    q.load_rows("w13", e, 0, child.w13[e])
                    q.load_rows("w2", e, 0, child.w2[e])
                setattr(module, child_name, q)
    model.quantization = quantization
    return model
