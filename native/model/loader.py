"""Load an ERNIE-4.5 safetensors checkpoint (-PT or -Paddle layout) into ErnieForCausalLM.

Layouts (shared/ERNIE.md §3), detected from the tensor names:

* ``pt``: ``model.`` prefix, torch ``[out, in]`` weights, separate q/k/v and gate/up, per-expert
  tensors, ``mlp.moe_statics.e_score_correction_bias [1, E]``.
* ``paddle``: ``ernie.`` prefix, ``[in, out]`` weights (transposed), fused ``qkv_proj``
  (Q|K|V column blocks) and gate-first ``up_gate_proj``, router ``[H, E]``, ``lm_head [H, V]``
  when untied, bf16 possibly stored as uint16.

The model is built on the meta device and materialised empty; every checkpoint tensor is then
streamed in, checked against an expectation table (unexpected / wrong shape / missing raise
:class:`LoadError` naming the tensor) and written — quantized row by row when requested, so no
full-precision copy of the experts is ever held. MTP tensors are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from tqdm import tqdm

from .config import ErnieConfig
from .ernie import ErnieForCausalLM
from .quant import check_quantization, load_linear_rows

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class LoadError(RuntimeError):
    """The checkpoint does not match the config (unexpected, missing or mis-shaped tensor ...)."""


@dataclass
class _Entry:
    shapes: tuple[tuple[int, ...], ...]  # accepted stored shapes (first one is canonical)
    write: Callable[[torch.Tensor], None]  # receives the tensor already in torch [out, in] layout
    transpose: bool = False
    keep_fp32: bool = False


def resolve_dtype(dtype: str | torch.dtype, cfg: ErnieConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return cfg.dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LoadError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(model_dir, name)):
                raise LoadError(f"{index}: shard {name!r} not found")
        return [os.path.join(model_dir, n) for n in files]
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    shards = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not shards:
        raise LoadError(f"{model_dir}: no *.safetensors checkpoint")
    return [os.path.join(model_dir, n) for n in shards]


def detect_layout(names: list[str]) -> str:
    if any(n.startswith("ernie.") for n in names):
        return "paddle"
    if any(n.startswith("model.") for n in names):
        return "pt"
    raise LoadError("cannot tell the checkpoint layout: no tensor starts with 'model.' or 'ernie.'")


def _copy_into(param: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def write(t: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(t.reshape(param.shape))

    return write


def _rows(module, row_start: int) -> Callable[[torch.Tensor], None]:
    return lambda t: load_linear_rows(module, row_start, t)


def _expert_rows(experts, which: str, e: int, row_start: int) -> Callable[[torch.Tensor], None]:
    return lambda t: experts.load_rows(which, e, row_start, t)


def expected_tensors(model: ErnieForCausalLM, layout: str) -> dict[str, _Entry]:
    """Every tensor the checkpoint must hold (MTP excluded), with how to store it."""
    cfg = model.cfg
    H, V, q, kv = cfg.hidden_size, cfg.vocab_size, cfg.q_size, cfg.kv_size
    paddle = layout == "paddle"
    pre = "ernie." if paddle else "model."
    table: dict[str, _Entry] = {
        pre + "embed_tokens.weight": _Entry(((V, H),), _copy_into(model.model.embed_tokens.weight)),
        pre + "norm.weight": _Entry(((H,),), _copy_into(model.model.norm.weight)),
    }
    if model.lm_head is not None:
        shape = (H, V) if paddle else (V, H)
        table["lm_head.weight"] = _Entry((shape,), _copy_into(model.lm_head.weight), transpose=paddle)

    def linear(name: str, module, out_f: int, in_f: int, row_start: int = 0) -> None:
        shape = (in_f, out_f) if paddle else (out_f, in_f)
        table[name] = _Entry((shape,), _rows(module, row_start), transpose=paddle)

    def mlp(p: str, m, inter: int) -> None:
        if paddle:
            linear(p + "up_gate_proj.weight", m.gate_up_proj, 2 * inter, H)
        else:
            linear(p + "gate_proj.weight", m.gate_up_proj, inter, H, 0)
            linear(p + "up_proj.weight", m.gate_up_proj, inter, H, inter)
        linear(p + "down_proj.weight", m.down_proj, H, inter)

    for i, layer in enumerate(model.model.layers):
        p = f"{pre}layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            table[p + norm + ".weight"] = _Entry(((H,),), _copy_into(getattr(layer, norm).weight))
        attn = layer.self_attn
        if paddle:
            linear(p + "self_attn.qkv_proj.weight", attn.qkv_proj, q + 2 * kv, H)
        else:
            linear(p + "self_attn.q_proj.weight", attn.qkv_proj, q, H, 0)
            linear(p + "self_attn.k_proj.weight", attn.qkv_proj, kv, H, q)
            linear(p + "self_attn.v_proj.weight", attn.qkv_proj, kv, H, q + kv)
        linear(p + "self_attn.o_proj.weight", attn.o_proj, H, q)
        if not cfg.is_moe_layer(i):
            mlp(p + "mlp.", layer.mlp, cfg.intermediate_size)
            continue
        moe = layer.mlp
        E, mI = cfg.moe_num_experts, cfg.moe_intermediate_size
        table[p + "mlp.gate.weight"] = _Entry(
            ((H, E),) if paddle else ((E, H),), _copy_into(moe.gate.weight), transpose=paddle, keep_fp32=True
        )
        table[p + "mlp.moe_statics.e_score_correction_bias"] = _Entry(
            ((1, E), (E,)), _copy_into(moe.e_score_correction_bias), keep_fp32=True
        )
        for e in range(E):
            pe = f"{p}mlp.experts.{e}."
            if paddle:
                table[pe + "up_gate_proj.weight"] = _Entry(
                    ((H, 2 * mI),), _expert_rows(moe.experts, "w13", e, 0), transpose=True
                )
                table[pe + "down_proj.weight"] = _Entry(
                    ((mI, H),), _expert_rows(moe.experts, "w2", e, 0), transpose=True
                )
            else:
                table[pe + "gate_proj.weight"] = _Entry(((mI, H),), _expert_rows(moe.experts, "w13", e, 0))
                table[pe + "up_proj.weight"] = _Entry(((mI, H),), _expert_rows(moe.experts, "w13", e, mI))
                table[pe + "down_proj.weight"] = _Entry(((H, mI),), _expert_rows(moe.experts, "w2", e, 0))
        if moe.shared_experts is not None:
            mlp(p + "mlp.shared_experts.", moe.shared_experts, cfg.shared_intermediate_size)
    return table


def _as_float(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint16:  # Paddle's numpy export of bf16
        return t.view(torch.bfloat16)
    if not t.is_floating_point():
        raise LoadError(f"unsupported tensor dtype {t.dtype}")
    return t


def load_model(
    model_dir: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    quantization: str = "bf16",
    device: str | torch.device = "cpu",
) -> tuple[ErnieForCausalLM, ErnieConfig]:
    """Build ErnieForCausalLM from a checkpoint directory; quantize at load time."""
    model_dir = os.fspath(model_dir)
    check_quantization(quantization)
    cfg = ErnieConfig.from_model_dir(model_dir)
    torch_dtype = resolve_dtype(dtype, cfg)
    files = checkpoint_files(model_dir)

    names_by_file: list[list[str]] = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            names_by_file.append(list(f.keys()))
    layout = detect_layout([n for names in names_by_file for n in names])

    with torch.device("meta"):
        model = ErnieForCausalLM(cfg, dtype=torch_dtype, quantization=quantization)
    model.to_empty(device=device)
    table = expected_tensors(model, layout)
    seen: set[str] = set()

    for path, names in tqdm(
        list(zip(files, names_by_file)), desc="loading shards", unit="shard", disable=len(files) <= 1
    ):
        shard = os.path.basename(path)
        with safe_open(path, framework="pt") as f:
            for name in names:
                if "mtp" in name:
                    continue
                entry = table.get(name)
                if entry is None:
                    if name == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue  # a tied head is the embedding; a stored copy is redundant
                    raise LoadError(f"{shard}: unexpected tensor {name!r} (layout {layout})")
                shape = tuple(f.get_slice(name).get_shape())
                if shape not in entry.shapes:
                    raise LoadError(
                        f"{shard}: tensor {name!r} has shape {list(shape)}, expected {list(entry.shapes[0])}"
                    )
                if name in seen:
                    raise LoadError(f"{shard}: tensor {name!r} appears twice")
                t = _as_float(f.get_tensor(name))
                t = t.to(device=device, dtype=torch.float32 if entry.keep_fp32 else torch_dtype)
                entry.write(t.T if entry.transpose else t)
                seen.add(name)
                del t

    missing = [n for n in table if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoadError(f"{model_dir}: missing tensor {missing[0]!r}{more} (layout {layout})")
    model.requires_grad_(False)
    model.eval()
    return model, cfg
