"""Weight-only quantization: Paddle semantics of the primitives, and wint8 / wint4 models.

Stated bounds (bf16 checkpoints of tiny random models, seed 1, logits of a 37-token prompt, error
relative to max |logit| of the unquantized bf16 model): wint8 <= 0.06, wint4 <= 0.15 (measured
0.02-0.03 and 0.02-0.08). The exact check is separate: a quantized model in fp32 equals the float
model whose weights are replaced by their dequantized values within 1e-4.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest_model import PagedRunner, build_hf, rel_err, save_hf  # noqa: E402

from native.model.ernie import Experts  # noqa: E402
from native.model.export import save_pt  # noqa: E402
from native.model.layers import LinearBase  # noqa: E402
from native.model.loader import load_model  # noqa: E402
from native.model.quant import (  # noqa: E402
    QuantExperts,
    WeightOnlyLinear,
    dequantize_int4,
    dequantize_int8,
    int_weight,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    round_half_away,
    unpack_int4,
)

WINT8_BOUND = 0.06
WINT4_BOUND = 0.15
PROMPT = list(range(3, 40))


# ------------------------------------------------------------------------------- primitives
def test_int4_pack_unpack_round_trip_exact():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 3, 34), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 17)
    assert torch.equal(unpack_int4(packed), q)


def test_int4_packing_layout():
    q = torch.tensor([[-7, 7, 0, -1]], dtype=torch.int8)
    # stored as q+8: [1, 15, 8, 7]; even k in the low nibble
    assert pack_int4(q).tolist() == [[0xF1, 0x78]]
    with pytest.raises(ValueError, match="even K"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def test_round_half_away_from_zero():
    x = torch.tensor([2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 0.49999997, 2.4, -2.6, 0.0])
    assert round_half_away(x).tolist() == [3, -3, 1, -1, 2, -2, 0, 2, -3, 0]


def test_quantize_int8_paddle_semantics():
    # max 127 -> scale exactly 1.0, so q = round(w) and the halves show the rounding rule
    w = torch.tensor([[127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -127.0, 3.2]], dtype=torch.bfloat16)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (1,)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 3, -3, 1, -1, 2, -127, 3]]
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(64, 96, generator=g) * torch.rand(64, 1, generator=g)).to(torch.bfloat16)
    q, s = quantize_int8(w)
    assert int(q.min()) >= -127 and int(q.max()) <= 127  # symmetric: -128 never produced
    assert torch.equal(s, (w.float().abs().amax(1) / 127).to(torch.bfloat16))
    expect = round_half_away(w.float() / s.float()[:, None]).clamp(-127, 127)
    assert torch.equal(q.float(), expect)
    err = (dequantize_int8(q, s, torch.float32) - w.float()).abs()
    assert bool((err <= s.float()[:, None] * 0.51 + 1e-6).all())


def test_quantize_int4_paddle_semantics():
    w = torch.tensor([[7.0, 3.5, -3.5, 6.5, -0.5, 0.4, -7.0, 1.0]], dtype=torch.bfloat16)
    q, s = quantize_int4(w)
    assert s.item() == 1.0
    assert q.tolist() == [[7, 4, -4, 7, -1, 0, -7, 1]]
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 40, generator=g).to(torch.bfloat16)
    q, s = quantize_int4(w)
    assert int(q.min()) >= -7 and int(q.max()) <= 7
    assert torch.equal(s, (w.float().abs().amax(1) / 7).to(torch.bfloat16))
    assert torch.equal(dequantize_int4(pack_int4(q), s), dequantize_int8(q, s))


def test_zero_row_quantizes_to_zero():
    q, s = quantize_int8(torch.zeros(2, 4))
    assert torch.equal(q, torch.zeros(2, 4, dtype=torch.int8)) and torch.equal(s, torch.zeros(2))


# ------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_linear_matches_dequantized(bits):
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(64, 48, bias=False)
    lin.weight.data = torch.randn(48, 64, generator=g)
    wol = WeightOnlyLinear.from_linear(lin, bits)
    assert wol.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert wol.qweight.shape == ((48, 64) if bits == 8 else (48, 32))
    x = torch.randn(5, 64, generator=g)
    ref = torch.nn.functional.linear(x, wol.dequantized(torch.float32))
    assert rel_err(wol(x), ref) <= 1e-5
    assert rel_err(wol.dequantized(torch.float32), lin.weight) <= (0.01 if bits == 8 else 0.08)


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_experts_match_dequantized(bits):
    g = torch.Generator().manual_seed(4)
    ex = Experts(3, 32, 16, torch.float32)
    ex.w13.data = torch.randn(3, 32, 32, generator=g)
    ex.w2.data = torch.randn(3, 32, 16, generator=g)
    qe = QuantExperts(3, 32, 16, bits, torch.float32)
    for e in range(3):
        qe.load_rows("w13", e, 0, ex.w13[e])
        qe.load_rows("w2", e, 0, ex.w2[e])
    deq = Experts(3, 32, 16, torch.float32)
    unpack = (lambda t: t) if bits == 8 else unpack_int4
    deq.w13.data = dequantize_int8(unpack(qe.w13_q), qe.w13_s, torch.float32)
    deq.w2.data = dequantize_int8(unpack(qe.w2_q), qe.w2_s, torch.float32)
    x = torch.randn(6, 32, generator=g)
    with torch.no_grad():
        for e in range(3):
            assert rel_err(qe.forward_expert(e, x), deq.forward_expert(e, x)) <= 1e-5
        assert rel_err(qe.forward_all(x), deq.forward_all(x)) <= 1e-5


# ------------------------------------------------------------------------------- models
@pytest.fixture(scope="module", params=["moe_shared", "moe_noshared_start2", "dense_hd"])
def bf16_dir(request, tmp_path_factory):
    src = save_hf(build_hf(request.param, seed=1), str(tmp_path_factory.mktemp("src")))
    model, cfg = load_model(src, dtype="float32")
    out = tmp_path_factory.mktemp(request.param)
    save_pt(model, cfg, out, dtype=torch.bfloat16)
    return out


def _logits(model):
    return PagedRunner(model, block_size=4).step({0: PROMPT})[0]


@pytest.mark.parametrize("quantization,bound", [("wint8", WINT8_BOUND), ("wint4", WINT4_BOUND)])
def test_quantized_model_within_bound_of_bf16(bf16_dir, quantization, bound):
    ref = _logits(load_model(bf16_dir)[0])
    model, _ = load_model(bf16_dir, quantization=quantization)
    assert rel_err(_logits(model), ref) <= bound


@pytest.mark.parametrize("quantization", ["wint8", "wint4"])
def test_quantized_model_equals_dequantized_float_model(bf16_dir, quantization):
    """fp32: the weight-only model computes exactly the float model with dequantized weights."""
    qmodel, _ = load_model(bf16_dir, dtype="float32", quantization=quantization)
    fmodel, _ = load_model(bf16_dir, dtype="float32")
    state = fmodel.state_dict()
    for name, mod in qmodel.named_modules():
        if _weight_only(mod):
            state[name + ".weight"] = dequantize_int8(int_weight(mod.qweight, mod.bits), mod.scales, torch.float32)
        elif isinstance(mod, QuantExperts):
            unpack = (lambda t: t) if mod.bits == 8 else unpack_int4
            state[name + ".w13"] = dequantize_int8(unpack(mod.w13_q), mod.w13_s, torch.float32)
            state[name + ".w2"] = dequantize_int8(unpack(mod.w2_q), mod.w2_s, torch.float32)
    fmodel.load_state_dict(state)
    assert rel_err(_logits(qmodel), _logits(fmodel)) <= 1e-4


def _weight_only(mod) -> bool:
    """A weight-only linear of the model (any parallel kind)."""
    return isinstance(mod, LinearBase) and mod.bits is not None


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def test_quantized_storage_dtypes_and_bytes(bf16_dir):
    bf16, cfg = load_model(bf16_dir)
    w8, _ = load_model(bf16_dir, quantization="wint8")
    w4, _ = load_model(bf16_dir, quantization="wint4")
    # bytes held by Linear / expert weights in the bf16 model
    dense_numel = sum(m.weight.numel() for n, m in bf16.named_modules() if n.endswith(("_proj",)))
    expert_numel = sum(m.w13.numel() + m.w2.numel() for m in bf16.modules() if isinstance(m, Experts))
    dense_rows = sum(m.weight.shape[0] for n, m in bf16.named_modules() if n.endswith("_proj"))
    expert_rows = sum(
        m.w13.shape[0] * (m.w13.shape[1] + m.w2.shape[1]) for m in bf16.modules() if isinstance(m, Experts)
    )
    base = _bytes(bf16)
    # int8 weights (1 byte) plus one bf16 scale per output row replace 2-byte weights
    assert _bytes(w8) == base - (dense_numel + expert_numel) + 2 * (dense_rows + expert_rows)
    # wint4: routed experts at half a byte, every other Linear int8
    assert _bytes(w4) == base - dense_numel - expert_numel * 3 // 2 + 2 * (dense_rows + expert_rows)
    assert _bytes(w4) <= _bytes(w8) < base
    for name, mod in w4.named_modules():
        if _weight_only(mod):
            assert mod.qweight.dtype == torch.int8 and mod.scales.dtype == torch.bfloat16, name
        if isinstance(mod, QuantExperts):
            assert mod.w13_q.dtype == torch.uint8 and mod.w2_q.dtype == torch.uint8, name
            assert mod.w13_q.shape[-1] == cfg.hidden_size // 2
    for name, mod in w8.named_modules():
        if isinstance(mod, QuantExperts):
            assert mod.w13_q.dtype == torch.int8, name
    # embedding, lm_head and norms stay bf16; the router stays fp32
    for name, p in w4.named_parameters():
        want = torch.float32 if name.endswith("mlp.gate.weight") else torch.bfloat16
        assert p.dtype == want, name
    assert not any(
        isinstance(m, torch.nn.Linear) and not n.endswith(("lm_head", ".gate")) for n, m in w4.named_modules()
    )


@pytest.mark.parametrize("quantization", ["wint8", "wint4"])
def test_module_swap_equals_load_time_quantization(bf16_dir, quantization):
    swapped = quantize_model(load_model(bf16_dir)[0], quantization)
    loaded, _ = load_model(bf16_dir, quantization=quantization)
    assert torch.equal(_logits(swapped), _logits(loaded))
