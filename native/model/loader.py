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

Shard-aware loading: ``load_model(..., prepare=fn)`` runs ``fn`` on the meta model before
anything is allocated, e.g. ``lambda m: shard_model_(m, rank, size, comm)`` (TP) or
``lambda m: shard_experts_(m, rank, size, group)`` (EP). The modules they slice record which part
of the checkpoint they hold, and the writes keep exactly that part:

* ``shard_rows`` (Linear / WeightOnlyLinear / embedding / lm_head; routed experts' w13 rows):
  global output rows held, in local order. A checkpoint tensor holding the module's global rows
  ``[row_start, row_start + n)`` (q / k / v, gate / up are separate tensors in the -PT layout)
  writes the rows of that block the shard holds, to their local positions.
* ``shard_cols = (start, stop)`` (Linear / WeightOnlyLinear; routed experts' w2): input columns
  held. Quantized rows are quantized whole, then narrowed, so scales are those of full rows.
* ``shard_experts = (lo, hi)`` (routed experts): only experts ``lo..hi-1`` are held, at ``e - lo``.

A tensor of which the shard holds nothing (another EP rank's expert) is shape-checked from the
file header and counted as seen, but never read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from tqdm import tqdm

from native.kv_cache import DTYPES

from .config import ErnieConfig
from .ernie import ErnieForCausalLM
from .quant import check_quantization, expert_storage, linear_storage, store_rows

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class LoadError(RuntimeError):
    """The checkpoint does not match the config (unexpected, missing or mis-shaped tensor ...)."""


Writer = Callable[[torch.Tensor], None]


@dataclass
class _Entry:
    shapes: tuple[tuple[int, ...], ...]  # accepted stored shapes (first one is canonical)
    # receives the tensor already in torch [out, in] layout; None: this shard holds none of it
    # (the tensor is shape-checked but never read)
    write: Writer | None
    transpose: bool = False
    keep_fp32: bool = False


def resolve_dtype(dtype: str | torch.dtype, cfg: ErnieConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return cfg.dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


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


def _held_rows(shard_rows: torch.Tensor | None, row_start: int, n: int):
    """Of the global rows ``[row_start, row_start + n)`` held in one checkpoint tensor: (the local
    rows they go to, their rows in the tensor). ``shard_rows`` None: every row, in place."""
    if shard_rows is None:
        return slice(row_start, row_start + n), slice(None)
    local = ((shard_rows >= row_start) & (shard_rows < row_start + n)).nonzero().flatten()
    return local, shard_rows[local] - row_start


def _rows_writer(
    storage: tuple[torch.Tensor, torch.Tensor | None, int | None],
    n: int,
    row_start: int = 0,
    shard_rows: torch.Tensor | None = None,
    shard_cols: tuple[int, int] | None = None,
) -> Writer | None:
    """Writer of a checkpoint tensor holding ``n`` global rows from ``row_start`` of ``storage``
    (quant.store_rows' first arguments), narrowed to the shard; None if it holds none of them."""
    local, src = _held_rows(shard_rows, row_start, n)
    if isinstance(local, torch.Tensor) and local.numel() == 0:
        return None
    return lambda t: store_rows(*storage, local, t[src], shard_cols)


def _module_rows(module, n: int, row_start: int = 0) -> Writer | None:
    """Rows of a (weight-only) Linear or embedding, honouring its ``shard_rows`` / ``shard_cols``."""
    shard_rows, shard_cols = getattr(module, "shard_rows", None), getattr(module, "shard_cols", None)
    return _rows_writer(linear_storage(module), n, row_start, shard_rows, shard_cols)


def _expert_rows(experts, which: str, local: int | None, n: int, row_start: int = 0) -> Writer | None:
    """Rows of ``which`` ("w13" or "w2") of the checkpoint expert held at ``local`` (None: not held
    here), honouring the stacks' ``shard_rows`` (w13 rows) and ``shard_cols`` (w2 columns)."""
    if local is None:
        return None
    storage = expert_storage(experts, which, local)
    if which == "w13":
        return _rows_writer(storage, n, row_start, shard_rows=getattr(experts, "shard_rows", None))
    return _rows_writer(storage, n, row_start, shard_cols=getattr(experts, "shard_cols", None))


def expected_tensors(model: ErnieForCausalLM, layout: str) -> dict[str, _Entry]:
    """Every tensor the checkpoint must hold (MTP excluded), with how to store it."""
    cfg = model.cfg
    H, V, q, kv = cfg.hidden_size, cfg.vocab_size, cfg.q_size, cfg.kv_size
    paddle = layout == "paddle"
    pre = "ernie." if paddle else "model."
    table: dict[str, _Entry] = {
        pre + "embed_tokens.weight": _Entry(((V, H),), _module_rows(model.model.embed_tokens, V)),
        pre + "norm.weight": _Entry(((H,),), _copy_into(model.model.norm.weight)),
    }

    def matrix(name: str, out_f: int, in_f: int, write) -> None:
        """A [out_f, in_f] torch-layout matrix, stored transposed by Paddle."""
        shape = (in_f, out_f) if paddle else (out_f, in_f)
        table[name] = _Entry((shape,), write, transpose=paddle)

    if model.lm_head is not None:
        matrix("lm_head.weight", V, H, _module_rows(model.lm_head, V))

    def linear(name: str, module, out_f: int, in_f: int, row_start: int = 0) -> None:
        matrix(name, out_f, in_f, _module_rows(module, out_f, row_start))

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
        ex = moe.experts
        lo, hi = getattr(ex, "shard_experts", (0, E))  # EP: only experts lo..hi-1 are held
        for e in range(E):
            pe = f"{p}mlp.experts.{e}."
            local = e - lo if lo <= e < hi else None
            if paddle:
                matrix(pe + "up_gate_proj.weight", 2 * mI, H, _expert_rows(ex, "w13", local, 2 * mI))
            else:
                matrix(pe + "gate_proj.weight", mI, H, _expert_rows(ex, "w13", local, mI, 0))
                matrix(pe + "up_proj.weight", mI, H, _expert_rows(ex, "w13", local, mI, mI))
            matrix(pe + "down_proj.weight", H, mI, _expert_rows(ex, "w2", local, H))
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
    prepare: Callable[[ErnieForCausalLM], object] | None = None,
) -> tuple[ErnieForCausalLM, ErnieConfig]:
    """Build ErnieForCausalLM from a checkpoint directory; quantize at load time.

    ``prepare`` runs on the model while it is still on the meta device (its result is ignored):
    a TP / EP sharding function there makes this rank allocate and read only its shard.
    """
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
    if prepare is not None:
        prepare(model)  # outside the meta context: index tensors it records stay real
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
                seen.add(name)
                if entry.write is None:
                    continue  # another shard's part (e.g. an expert held by another EP rank)
                t = _as_float(f.get_tensor(name))
                t = t.to(device=device, dtype=torch.float32 if entry.keep_fp32 else torch_dtype)
                entry.write(t.T if entry.transpose else t)
                del t

    missing = [n for n in table if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoadError(f"{model_dir}: missing tensor {missing[0]!r}{more} (layout {layout})")
    model.requires_grad_(False)
    model.eval()
    return model, cfg
