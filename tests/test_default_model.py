"""The committed default model (native/default_model): format, tokenizer, and that it answers."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from actors.frontend.tokenizer import Tokenizer
from native.model.config import ErnieConfig
from native.model.loader import load_model

MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "native", "default_model")
SELF_INTRO = "你好，请介绍一下自己。"


@pytest.fixture(scope="module")
def raw_config() -> dict:
    with open(os.path.join(MODEL_DIR, "config.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def eval_prompts() -> list[dict]:
    with open(os.path.join(MODEL_DIR, "eval_prompts.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, _ = load_model(MODEL_DIR, dtype=torch.bfloat16, device="cpu")
    return model


def test_files_present_and_small():
    names = set(os.listdir(MODEL_DIR))
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "eval_prompts.json"):
        assert name in names, name
    total = sum(os.path.getsize(os.path.join(MODEL_DIR, n)) for n in names)
    assert total < 10 * 1024 * 1024


def test_config_is_ernie45_moe(raw_config):
    assert raw_config["model_type"] == "ernie4_5_moe"
    assert raw_config["architectures"] == ["Ernie4_5_MoeForCausalLM"]
    for key in ("tie_word_embeddings", "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval",
                "moe_num_experts", "moe_k", "moe_num_shared_experts", "head_dim"):
        assert key in raw_config, key
    assert raw_config["torch_dtype"] == "bfloat16"
    cfg = ErnieConfig.from_dict(raw_config)
    assert not cfg.is_moe_layer(0)
    assert all(cfg.is_moe_layer(i) for i in range(1, cfg.num_hidden_layers))
    assert cfg.moe_num_shared_experts >= 1 and cfg.moe_k < cfg.moe_num_experts
    assert cfg.head_dim >= 32  # vLLM's CPU attention needs it


def test_checkpoint_is_paddle_layout(raw_config):
    cfg = ErnieConfig.from_dict(raw_config)
    with safe_open(os.path.join(MODEL_DIR, "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert all(n.startswith("ernie.") for n in names)
        qkv = f.get_tensor("ernie.layers.0.self_attn.qkv_proj.weight")
        assert qkv.dtype == torch.uint16  # bf16 as Paddle's numpy export stores it
        assert tuple(qkv.shape) == (cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size)
        gate = f.get_tensor("ernie.layers.1.mlp.gate.weight")
        assert gate.dtype == torch.float32 and tuple(gate.shape) == (cfg.hidden_size, cfg.moe_num_experts)
        assert "ernie.layers.1.mlp.shared_experts.up_gate_proj.weight" in names
        assert "ernie.layers.0.mlp.up_gate_proj.weight" in names


def test_tokenizer(tok, raw_config):
    assert tok.vocab_size <= raw_config["vocab_size"]
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == {2, tok.token_to_id("<|end_of_sentence|>")}
    text = tok.apply_chat_template([{"role": "user", "content": SELF_INTRO}])
    assert text == f"<|begin_of_sentence|>User: {SELF_INTRO}\nAssistant: "
    ids = tok.encode(text)
    assert ids[0] == tok.token_to_id("<|begin_of_sentence|>")
    assert tok.decode(ids, skip_special_tokens=False) == text
    again = Tokenizer.from_files(tok.files())
    assert again.encode(text) == ids
    with open(os.path.join(MODEL_DIR, "generation_config.json"), encoding="utf-8") as f:
        assert set(json.load(f)["eos_token_id"]) == tok.eos_token_ids


def test_eval_prompts_cover_every_task(eval_prompts):
    tasks = {p["task"] for p in eval_prompts}
    assert {"fact", "add", "sub", "count", "reverse", "copy", "think"} <= tasks
    assert any(p["prompt"] == SELF_INTRO for p in eval_prompts)
    for p in eval_prompts:
        assert p["messages"][-1] == {"role": "user", "content": p["prompt"]} and p["expected"]
        # a thinking prompt is asked with enable_thinking and answered in ERNIE's thinking format
        assert (p["task"] == "think") == (p.get("chat_template_kwargs") == {"enable_thinking": True})
        assert (p["task"] == "think") == ("\n</think>\n\n<response>\n" in p["expected"])


def test_enable_thinking_opens_think_in_the_template(tok):
    user = [{"role": "user", "content": "What is 12 + 7?"}]
    plain = f"<|begin_of_sentence|>User: {user[0]['content']}\nAssistant: "
    assert tok.apply_chat_template(user) == tok.apply_chat_template(user, enable_thinking=False) == plain
    assert tok.apply_chat_template(user, enable_thinking=True) == plain + "<think>\n"


@torch.inference_mode()
def _greedy(model, tok: Tokenizer, prompt: str, max_new_tokens: int, template_kwargs=None) -> str:
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}], **(template_kwargs or {})))
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model.forward_train(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt in tok.eos_token_ids:
            break
        out.append(nxt)
    return tok.decode(out)


def test_greedy_answers(model, tok, eval_prompts):
    """A handful of the fixed prompts, one per task plus the self-introduction, in bf16."""
    picked: dict[str, dict] = {}
    for p in eval_prompts:
        key = "intro" if p["prompt"] == SELF_INTRO else p["task"]
        picked.setdefault(key, p)
    results = {}
    for key, p in picked.items():
        got = _greedy(model, tok, p["prompt"], len(tok.encode(p["expected"])) + 4, p.get("chat_template_kwargs"))
        results[key] = (got == p["expected"], p["prompt"], got)
    assert results["intro"][0], results["intro"]
    failed = [r for r in results.values() if not r[0]]
    assert len(failed) <= 1, failed
