"""Helpers for the model / loader / quant tests: tiny configs, HF reference models, a paged runner.

Import from test files as ``from conftest_model import ...`` (tests/ is on sys.path).
"""

from __future__ import annotations

import json
import os
import random

import torch

from native.attn_meta import AttnMeta
from native.kv_cache import KVCache

_BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (model_type, config kwargs for transformers)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    # MoE with a shared expert, layer 0 dense (the 21B pattern), tied head
    "moe_shared": (
        "ernie4_5_moe",
        dict(
            _BASE,
            num_hidden_layers=3,
            moe_num_experts=6,
            moe_k=2,
            moe_intermediate_size=32,
            moe_num_shared_experts=2,
            moe_layer_start_index=1,
            moe_layer_interval=1,
            tie_word_embeddings=True,
        ),
    ),
    # MoE without shared experts, untied head, MoE from layer 2, GQA 4:1 (the 300B pattern)
    "moe_noshared_start2": (
        "ernie4_5_moe",
        dict(
            _BASE,
            num_hidden_layers=4,
            num_key_value_heads=1,
            moe_num_experts=5,
            moe_k=3,
            moe_intermediate_size=24,
            moe_num_shared_experts=0,
            moe_layer_start_index=2,
            moe_layer_interval=1,
            tie_word_embeddings=False,
        ),
    ),
    # dense with head_dim != hidden/heads (the 0.3B pattern), tied head
    "dense_hd": (
        "ernie4_5",
        dict(_BASE, num_hidden_layers=2, head_dim=24, tie_word_embeddings=True),
    ),
    # dense, untied, MHA
    "dense_untied": (
        "ernie4_5",
        dict(_BASE, num_hidden_layers=2, num_key_value_heads=4, tie_word_embeddings=False),
    ),
}


def hf_config(name: str, configs: dict[str, tuple[str, dict]] = TINY_CONFIGS):
    """The transformers config of ``configs[name]`` (a ``(model_type, kwargs)`` table like TINY_CONFIGS)."""
    from transformers import Ernie4_5_MoeConfig, Ernie4_5Config

    model_type, kw = configs[name]
    cls = Ernie4_5_MoeConfig if model_type == "ernie4_5_moe" else Ernie4_5Config
    return cls(**kw)


def build_hf(name: str, seed: int = 0, configs: dict[str, tuple[str, dict]] = TINY_CONFIGS):
    """A transformers ERNIE model in fp32 with random weights, norms and correction bias non-trivial."""
    from transformers import Ernie4_5_MoeForCausalLM, Ernie4_5ForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(name, configs)
    cls = Ernie4_5_MoeForCausalLM if cfg.model_type == "ernie4_5_moe" else Ernie4_5ForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "e_score_correction_bias" in key:
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model


def save_hf(model, out_dir: str, dtype: torch.dtype | None = None) -> str:
    """save_pretrained (optionally cast) and make sure config.json carries the strict keys."""
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out_dir)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        d = json.load(f)
    d.setdefault("tie_word_embeddings", model.config.tie_word_embeddings)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
    return out_dir


def edit_config(model_dir: str, drop: tuple[str, ...] = (), **updates) -> None:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        d = json.load(f)
    for k in drop:
        d.pop(k, None)
    d.update(updates)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


class PagedRunner:
    """Drives ErnieForCausalLM.forward over a paged KV cache on the model's device, like a tiny
    model runner.

    Blocks are handed out in shuffled order so that block tables are non-contiguous.
    ``step({seq_id: new_token_ids})`` runs one forward over all given sequences (their tokens
    flattened in the dict's order) and returns {seq_id: logits [n_new, V]} on the CPU.
    """

    def __init__(self, model, block_size: int = 4, num_blocks: int = 64, seed: int = 0):
        cfg = model.cfg
        self.model = model
        self.block_size = block_size
        self.device = model.model.embed_tokens.weight.device
        self.cache = KVCache(
            cfg.num_hidden_layers,
            num_blocks,
            cfg.num_key_value_heads,
            block_size,
            cfg.head_dim,
            model.dtype,
            device=self.device,
        )
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.layers_done: list[int] = []

    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        ids, pos, qlens, clens, tables = [], [], [], [], []
        for sid, toks in new_tokens.items():
            start = self.lens.get(sid, 0)
            end = start + len(toks)
            table = self.tables.setdefault(sid, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            ids += toks
            pos += range(start, end)
            qlens.append(len(toks))
            clens.append(end)
            tables.append(table)
            self.lens[sid] = end
        meta = AttnMeta.build(qlens, clens, tables, self.block_size, self.device)
        self.layers_done = []
        with torch.inference_mode():
            ids_t, pos_t = torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device)
            hidden = self.model(ids_t, pos_t, self.cache, meta, layer_done=self.layers_done.append)
            logits = self.model.compute_logits(hidden).cpu()
        out, off = {}, 0
        for sid, n in zip(new_tokens, qlens):
            out[sid] = logits[off : off + n]
            off += n
        return out


def greedy_paged(model, prompt: list[int], max_new: int, block_size: int = 4) -> list[int]:
    runner = PagedRunner(model, block_size=block_size, num_blocks=(len(prompt) + max_new) // block_size + 2)
    logits = runner.step({0: prompt})[0]
    out = []
    for _ in range(max_new):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits = runner.step({0: [tok]})[0]
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (both in fp32)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
