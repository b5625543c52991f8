"""Checkpoint loading: -PT and -Paddle layouts, sharding, strict errors, strict config keys."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest_model import PagedRunner, build_hf, edit_config, save_hf  # noqa: E402

from native.model.config import ConfigError, ErnieConfig  # noqa: E402
from native.model.export import save_paddle, save_pt  # noqa: E402
from native.model.loader import LoadError, load_model  # noqa: E402

IDS = [5, 17, 33, 8, 91, 4, 60, 23, 11, 77, 3]


def _logits(model) -> torch.Tensor:
    return PagedRunner(model, block_size=4).step({0: IDS})[0]


@pytest.fixture(scope="module", params=["moe_shared", "moe_noshared_start2", "dense_hd"])
def source(request, tmp_path_factory):
    """(pdbus model loaded from a transformers save, its directory)."""
    path = save_hf(build_hf(request.param, seed=3), str(tmp_path_factory.mktemp(request.param)))
    model, _ = load_model(path, dtype="float32")
    return model, path


def _rewrite(path: str, fn) -> None:
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_pt_and_paddle_layouts_give_identical_logits(source, tmp_path):
    model, _ = source
    save_pt(model, model.cfg, tmp_path / "pt")
    save_paddle(model, model.cfg, tmp_path / "pd")
    m_pt, _ = load_model(tmp_path / "pt", dtype="float32")
    m_pd, _ = load_model(tmp_path / "pd", dtype="float32")
    ref = _logits(model)
    assert torch.equal(_logits(m_pt), ref)
    assert torch.equal(_logits(m_pd), ref)


def test_paddle_bf16_is_uint16_transposed_and_fused(source, tmp_path):
    model, _ = source
    cfg = model.cfg
    save_paddle(model, cfg, tmp_path / "pd", dtype=torch.bfloat16)
    save_pt(model, cfg, tmp_path / "pt", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "pd" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        qkv = f.get_tensor("ernie.layers.0.self_attn.qkv_proj.weight")
        assert qkv.dtype == torch.uint16
        assert list(qkv.shape) == [cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size]
        assert list(f.get_slice("ernie.layers.0.mlp.up_gate_proj.weight").get_shape()) == [
            cfg.hidden_size,
            2 * cfg.intermediate_size,
        ]
        if cfg.is_moe:
            i = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
            gate = f.get_tensor(f"ernie.layers.{i}.mlp.gate.weight")
            assert gate.dtype == torch.float32 and list(gate.shape) == [cfg.hidden_size, cfg.moe_num_experts]
        if not cfg.tie_word_embeddings:
            assert list(f.get_slice("lm_head.weight").get_shape()) == [cfg.hidden_size, cfg.vocab_size]
    assert all(n.startswith("ernie.") or n == "lm_head.weight" for n in names)
    m_pd, _ = load_model(tmp_path / "pd")  # dtype auto -> bfloat16 from config.json
    m_pt, _ = load_model(tmp_path / "pt")
    assert m_pd.dtype == torch.bfloat16
    assert torch.equal(_logits(m_pd), _logits(m_pt))


@pytest.mark.parametrize("save", [save_pt, save_paddle])
def test_sharded_checkpoint_with_index(source, tmp_path, save):
    model, _ = source
    files = save(model, model.cfg, tmp_path, max_shard_bytes=40_000)
    assert len(files) > 2
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(files)
    loaded, _ = load_model(tmp_path, dtype="float32")
    assert torch.equal(_logits(loaded), _logits(model))


def test_quantized_load_same_from_both_layouts(source, tmp_path):
    model, _ = source
    save_pt(model, model.cfg, tmp_path / "pt", dtype=torch.bfloat16)
    save_paddle(model, model.cfg, tmp_path / "pd", dtype=torch.bfloat16)
    for q in ("wint8", "wint4"):
        a, _ = load_model(tmp_path / "pt", quantization=q)
        b, _ = load_model(tmp_path / "pd", quantization=q)
        assert torch.equal(_logits(a), _logits(b)), q


def test_mtp_tensors_are_skipped_and_tied_head_copy_ignored(tmp_path):
    model, _ = load_model(save_hf(build_hf("moe_shared", seed=4), str(tmp_path / "src")), dtype="float32")
    save_paddle(model, model.cfg, tmp_path / "pd")
    path = str(tmp_path / "pd" / "model.safetensors")
    emb = model.model.embed_tokens.weight.detach().clone()

    def add(t):
        t["ernie.mtp_block.0.self_attn.qkv_proj.weight"] = torch.zeros(3, 3)
        t["ernie.mtp_linear_proj.0.weight"] = torch.zeros(4, 2)
        t["lm_head.weight"] = emb.T.contiguous()  # redundant copy of a tied head

    _rewrite(path, add)
    loaded, _ = load_model(tmp_path / "pd", dtype="float32")
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.fixture()
def pt_dir(tmp_path):
    path = save_hf(build_hf("moe_shared", seed=5), str(tmp_path / "m"))
    return path


def test_missing_tensor_names_it(pt_dir):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(os.path.join(pt_dir, "model.safetensors"), lambda t: t.pop(name))
    with pytest.raises(
        LoadError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"
    ):
        load_model(pt_dir)


def test_unexpected_tensor_names_it(pt_dir):
    name = "model.layers.0.self_attn.rotary.inv_freq"
    _rewrite(os.path.join(pt_dir, "model.safetensors"), lambda t: t.__setitem__(name, torch.zeros(8)))
    with pytest.raises(LoadError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.rotary\.inv_freq'"):
        load_model(pt_dir)


def test_wrong_shape_names_it(pt_dir):
    name = "model.layers.2.self_attn.k_proj.weight"
    _rewrite(os.path.join(pt_dir, "model.safetensors"), lambda t: t.__setitem__(name, torch.zeros(16, 64)))
    with pytest.raises(
        LoadError, match=r"tensor 'model\.layers\.2\.self_attn\.k_proj\.weight' has shape \[16, 64\]"
    ):
        load_model(pt_dir)


@pytest.mark.parametrize("key", ["tie_word_embeddings", "moe_layer_interval", "moe_layer_start_index"])
def test_missing_strict_config_key_names_it(pt_dir, key):
    edit_config(pt_dir, drop=(key,))
    with pytest.raises(ConfigError, match=f"missing required key '{key}'") as e:
        load_model(pt_dir)
    assert "\n" not in str(e.value)


def test_no_checkpoint_is_a_load_error(tmp_path):
    model, _ = load_model(save_hf(build_hf("dense_hd"), str(tmp_path / "m")), dtype="float32")
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(LoadError, match="no \\*.safetensors"):
        load_model(tmp_path / "m")


# ------------------------------------------------------------------------------------- config
def _moe_dict(**kw) -> dict:
    d = dict(
        model_type="ernie4_5_moe",
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=32,
        moe_layer_start_index=1,
        moe_layer_interval=1,
    )
    d.update(kw)
    return d


def test_config_fields():
    cfg = ErnieConfig.from_dict(_moe_dict(head_dim=None, rope_parameters={"rope_theta": 1234.0}))
    assert cfg.head_dim == 16 and cfg.rope_theta == 1234.0
    assert cfg.moe_layer_end_index == 5 and [cfg.is_moe_layer(i) for i in range(6)] == [0, 1, 1, 1, 1, 1]
    cfg = ErnieConfig.from_dict(_moe_dict(moe_layer_end_index=-1, moe_layer_interval=2, rope_theta=10.0))
    assert [cfg.is_moe_layer(i) for i in range(6)] == [0, 1, 0, 1, 0, 1] and cfg.rope_theta == 10.0
    cfg = ErnieConfig.from_dict(_moe_dict(moe_layer_start_index=3, moe_layer_end_index=4))
    assert [cfg.is_moe_layer(i) for i in range(6)] == [0, 0, 0, 1, 1, 0]
    dense = ErnieConfig.from_dict(
        dict(_moe_dict(), model_type="ernie4_5", head_dim=128, torch_dtype="float32", fuse_attention_qkv=True)
    )
    assert not dense.is_moe and dense.head_dim == 128 and dense.dtype == torch.float32
    assert not any(dense.is_moe_layer(i) for i in range(6))


def test_config_hash_tracks_architecture_only():
    a = ErnieConfig.from_dict(_moe_dict(), name="a")
    b = ErnieConfig.from_dict(_moe_dict(torch_dtype="float32", use_rmsnorm=True), name="b")
    c = ErnieConfig.from_dict(_moe_dict(moe_k=3))
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert len(a.config_hash()) == 16


def test_config_rejects_non_ernie():
    with pytest.raises(ConfigError, match="not an ERNIE-4.5"):
        ErnieConfig.from_dict(dict(_moe_dict(), model_type="llama", architectures=["LlamaForCausalLM"]))
