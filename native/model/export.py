"""Write an ErnieForCausalLM (or its state dict) as a -PT or -Paddle safetensors checkpoint.

The inverse of loader.py (shared/ERNIE.md §3): config.json plus ``model.safetensors`` or, with
``max_shard_bytes``, ``model-0000i-of-0000N.safetensors`` shards and
``model.safetensors.index.json``. The Paddle layout stores linears ``[in, out]``, fuses q/k/v and
gate/up (gate first), and stores bf16 as uint16 as Paddle's numpy export does. Router weight and
correction bias stay fp32 in both layouts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from native.kv_cache import dtype_name

from .config import ErnieConfig

PADDLE_CONFIG_EXTRAS = {
    "fuse_attention_qkv": True,
    "fuse_attn_ffn": True,
    "fuse_rms_norm": True,
    "use_rmsnorm": True,
    "compression_ratio": 1.0,
}


def _state(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    if any(k.endswith(("qweight", "_q")) for k in state):
        raise ValueError("export needs an unquantized model (quantization happens at load time)")
    return {k: v.detach() for k, v in state.items()}


def _tensors(
    state: dict[str, torch.Tensor], cfg: ErnieConfig, layout: str
) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(checkpoint name, torch-layout tensor, keep fp32) in the given layout, before transposing."""
    paddle = layout == "paddle"
    pre = "ernie." if paddle else "model."
    q, kv = cfg.q_size, cfg.kv_size
    yield pre + "embed_tokens.weight", state["model.embed_tokens.weight"], False
    for i in range(cfg.num_hidden_layers):
        s = f"model.layers.{i}."
        p = f"{pre}layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield p + norm + ".weight", state[s + norm + ".weight"], False
        qkv = state[s + "self_attn.qkv_proj.weight"]
        if paddle:
            yield p + "self_attn.qkv_proj.weight", qkv, False
        else:
            yield p + "self_attn.q_proj.weight", qkv[:q], False
            yield p + "self_attn.k_proj.weight", qkv[q : q + kv], False
            yield p + "self_attn.v_proj.weight", qkv[q + kv :], False
        yield p + "self_attn.o_proj.weight", state[s + "self_attn.o_proj.weight"], False
        mlps = []
        if cfg.is_moe_layer(i):
            yield p + "mlp.gate.weight", state[s + "mlp.gate.weight"], True
            bias = state[s + "mlp.e_score_correction_bias"].reshape(1, -1)
            yield p + "mlp.moe_statics.e_score_correction_bias", bias, True
            w13, w2 = state[s + "mlp.experts.w13"], state[s + "mlp.experts.w2"]
            mI = cfg.moe_intermediate_size
            for e in range(cfg.moe_num_experts):
                pe = f"{p}mlp.experts.{e}."
                if paddle:
                    yield pe + "up_gate_proj.weight", w13[e], False
                else:
                    yield pe + "gate_proj.weight", w13[e, :mI], False
                    yield pe + "up_proj.weight", w13[e, mI:], False
                yield pe + "down_proj.weight", w2[e], False
            if cfg.moe_num_shared_experts > 0:
                mlps.append(("mlp.shared_experts.", cfg.shared_intermediate_size))
        else:
            mlps.append(("mlp.", cfg.intermediate_size))
        for sub, inter in mlps:
            gate_up = state[s + sub + "gate_up_proj.weight"]
            if paddle:
                yield p + sub + "up_gate_proj.weight", gate_up, False
            else:
                yield p + sub + "gate_proj.weight", gate_up[:inter], False
                yield p + sub + "up_proj.weight", gate_up[inter:], False
            yield p + sub + "down_proj.weight", state[s + sub + "down_proj.weight"], False
    yield pre + "norm.weight", state["model.norm.weight"], False
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", state["lm_head.weight"], False


def _convert(name: str, t: torch.Tensor, keep_fp32: bool, layout: str, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(torch.float32 if keep_fp32 else dtype)
    if layout == "paddle":
        if t.dim() == 2 and name.endswith(("proj.weight", "gate.weight", "lm_head.weight")):
            t = t.T
        if t.dtype == torch.bfloat16:
            t = t.contiguous().view(torch.uint16)
    return t.contiguous().clone()


def _save(
    model_or_state, cfg: ErnieConfig, out_dir, layout: str, max_shard_bytes: int | None, dtype
) -> list[str]:
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    dtype = dtype or cfg.dtype
    state = _state(model_or_state)
    tensors = {n: _convert(n, t, fp32, layout, dtype) for n, t, fp32 in _tensors(state, cfg, layout)}

    config = cfg.to_dict()
    config["torch_dtype"] = dtype_name(dtype)
    if layout == "paddle":
        config.update(PADDLE_CONFIG_EXTRAS)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)

    if not max_shard_bytes:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, shard in zip(files, shards):
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


def save_pt(
    model_or_state: nn.Module | dict[str, torch.Tensor],
    cfg: ErnieConfig,
    out_dir: str | os.PathLike,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """-PT layout (transformers names, torch [out, in]). dtype defaults to the config's."""
    return _save(model_or_state, cfg, out_dir, "pt", max_shard_bytes, dtype)


def save_paddle(
    model_or_state: nn.Module | dict[str, torch.Tensor],
    cfg: ErnieConfig,
    out_dir: str | os.PathLike,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """-Paddle layout (``ernie.`` prefix, [in, out], fused qkv / up_gate, bf16 as uint16)."""
    return _save(model_or_state, cfg, out_dir, "paddle", max_shard_bytes, dtype)
