"""Weight-only quantization with Paddle's semantics (shared/ERNIE.md §5, §8), gpt-fast style.

Primitives first (quantize / pack / unpack / dequantize on plain tensors), modules after
(:class:`WeightOnlyLinear`, :class:`QuantExperts`), module swapping last (:func:`quantize_model`).

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


def _int_weight(stored: torch.Tensor, bits: int) -> torch.Tensor:
    return stored if bits == 8 else unpack_int4(stored)


# ---------------------------------------------------------------------------------- modules
class WeightOnlyLinear(nn.Module):
    """y = x @ (q * scale)^T, with q stored as int8 [N, K] or packed int4 uint8 [N, K/2]."""

    def __init__(self, in_features: int, out_features: int, bits: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"unsupported bits {bits}")
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 needs an even in_features, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        width = in_features if bits == 8 else in_features // 2
        qdtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=qdtype))
        self.register_buffer("scales", torch.zeros(out_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # per-output-channel scale commutes with the GEMM (gpt-fast's int8 linear)
        w = _int_weight(self.qweight, self.bits).to(x.dtype)
        return F.linear(x, w) * self.scales.to(x.dtype)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(_int_weight(self.qweight, self.bits), self.scales, dtype)

    def load_rows(self, row_start: int, w: torch.Tensor) -> None:
        """Quantize output rows ``row_start:row_start+len(w)`` from a float weight slice."""
        store_rows(self.qweight, self.scales, self.bits, slice(row_start, row_start + w.shape[0]), w)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> WeightOnlyLinear:
        if linear.bias is not None:
            raise ValueError("WeightOnlyLinear has no bias")
        m = cls(linear.in_features, linear.out_features, bits, linear.weight.dtype)
        m.to(linear.weight.device)
        m.load_rows(0, linear.weight.detach())
        return m

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


class QuantExperts(nn.Module):
    """Routed experts as quantized stacks: w13 (gate rows first, then up) [E, 2mI, H] and w2 [E, H, mI].

    Same interface as the bf16 ``Experts`` of ernie.py: ``forward_expert(e, x)``, ``load_rows``.
    """

    def __init__(
        self, num_experts: int, hidden: int, inter: int, bits: int, dtype: torch.dtype = torch.bfloat16
    ):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"unsupported bits {bits}")
        if bits == 4 and (hidden % 2 or inter % 2):
            raise ValueError("int4 experts need even hidden and moe_intermediate sizes")
        self.num_experts, self.hidden, self.inter, self.bits = num_experts, hidden, inter, bits
        qdtype = torch.int8 if bits == 8 else torch.uint8
        div = 1 if bits == 8 else 2
        self.register_buffer("w13_q", torch.zeros(num_experts, 2 * inter, hidden // div, dtype=qdtype))
        self.register_buffer("w13_s", torch.zeros(num_experts, 2 * inter, dtype=dtype))
        self.register_buffer("w2_q", torch.zeros(num_experts, hidden, inter // div, dtype=qdtype))
        self.register_buffer("w2_s", torch.zeros(num_experts, hidden, dtype=dtype))

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        w13 = _int_weight(self.w13_q[e], self.bits).to(dt)
        gate_up = F.linear(x, w13) * self.w13_s[e].to(dt)
        gate, up = gate_up.chunk(2, dim=-1)
        w2 = _int_weight(self.w2_q[e], self.bits).to(dt)
        return F.linear(F.silu(gate) * up, w2) * self.w2_s[e].to(dt)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: x [T, H] -> [E, T, H]."""
        dt = x.dtype
        w13 = _int_weight(self.w13_q, self.bits).to(dt)
        gate_up = torch.matmul(x, w13.transpose(1, 2)) * self.w13_s[:, None, :].to(dt)
        gate, up = gate_up.chunk(2, dim=-1)
        w2 = _int_weight(self.w2_q, self.bits).to(dt)
        return torch.matmul(F.silu(gate) * up, w2.transpose(1, 2)) * self.w2_s[:, None, :].to(dt)

    def load_rows(self, which: str, e: int, row_start: int, w: torch.Tensor) -> None:
        """Quantize rows of expert ``e``'s ``which`` ("w13" or "w2") from a float slice."""
        store_rows(*expert_storage(self, which, e), slice(row_start, row_start + w.shape[0]), w)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden}, inter={self.inter}, bits={self.bits}"


def make_linear(
    in_features: int, out_features: int, bits: int | None, dtype: torch.dtype
) -> nn.Linear | WeightOnlyLinear:
    if bits is None:
        return nn.Linear(in_features, out_features, bias=False, dtype=dtype)
    return WeightOnlyLinear(in_features, out_features, bits, dtype)


def load_linear_rows(module: nn.Module, row_start: int, w: torch.Tensor) -> None:
    """Write float rows into a plain or weight-only Linear (quantizing on the way in)."""
    store_rows(*linear_storage(module), slice(row_start, row_start + w.shape[0]), w)


def linear_storage(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """(weight, scales, bits) of a weight-only Linear, (weight, None, None) of a plain one (or an
    Embedding): the first arguments of :func:`store_rows`."""
    if isinstance(module, WeightOnlyLinear):
        return module.qweight, module.scales, module.bits
    return module.weight, None, None


def expert_storage(
    experts: nn.Module, which: str, e: int
) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """Like :func:`linear_storage` for expert ``e``'s ``which`` ("w13" or "w2") of a
    :class:`QuantExperts` or bf16 ``Experts`` stack."""
    if isinstance(experts, QuantExperts):
        return getattr(experts, which + "_q")[e], getattr(experts, which + "_s")[e], experts.bits
    return getattr(experts, which)[e], None, None


# ---------------------------------------------------------------------------------- swapping
@torch.no_grad()
def quantize_model(model: nn.Module, quantization: str) -> nn.Module:
    """Swap a float ERNIE model's Linears and expert stacks for weight-only ones, in place.

    Skips ``lm_head`` (stays in the model dtype) and the fp32 router ``gate``.
    """
    if check_quantization(quantization) == "bf16":
        return model
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and not full.endswith(("lm_head", ".gate")):
                setattr(
                    parent, child_name, WeightOnlyLinear.from_linear(child, linear_bits(quantization, False))
                )
            elif hasattr(child, "w13") and hasattr(child, "w2"):  # ernie.Experts
                bits = linear_bits(quantization, True)
                E, two_i, H = child.w13.shape
                q = QuantExperts(E, H, two_i // 2, bits, child.w13.dtype).to(child.w13.device)
                for e in range(E):
                    q.load_rows("w13", e, 0, child.w13[e])
                    q.load_rows("w2", e, 0, child.w2[e])
                setattr(parent, child_name, q)
    model.quantization = quantization
    return model
