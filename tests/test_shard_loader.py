"""Shard-aware loading: ``load_model(..., prepare=shard)`` equals a full load sharded afterwards.

For TP (``shard_model_``, every rank of TP2 / TP4) and EP (``shard_experts_``, every rank of EP2 /
EP4), bf16 / wint8 / wint4, -PT and -Paddle layouts: the state dicts (parameters and buffers) are
bit-identical, the sharded load allocates less, and an EP rank never reads another rank's experts.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest_model import TINY_CONFIGS  # noqa: E402

from native.model import loader  # noqa: E402
from native.model.config import ErnieConfig  # noqa: E402
from native.model.ernie import ErnieForCausalLM  # noqa: E402
from native.model.export import save_paddle, save_pt  # noqa: E402
from native.model.loader import LoadError, load_model  # noqa: E402
from native.parallel.ep import shard_experts_  # noqa: E402
from native.parallel.tp import shard_model_  # noqa: E402

# the existing tiny configs; experts raised to a multiple of 4 so that they split over EP2 and EP4
# (heads, KV heads, intermediate sizes and vocab already split over TP2 and TP4; moe_shared has
# 2 KV heads, so TP4 replicates them; moe_noshared_start2 is untied with one KV head)
CONFIGS = {
    "moe_shared": dict(moe_num_experts=8),
    "moe_noshared_start2": dict(moe_num_experts=4),
    "dense_hd": {},
}
SPLITS = {"tp": shard_model_, "ep": shard_experts_}
QUANTS = ("bf16", "wint8", "wint4")


def _tiny_cfg(name: str) -> ErnieConfig:
    model_type, kw = TINY_CONFIGS[name]
    return dataclasses.replace(ErnieConfig.from_dict(dict(kw, model_type=model_type)), **CONFIGS[name])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[tuple[str, str], str]:
    """(config, layout) -> directory: -PT in fp32 (one file), -Paddle in bf16 (uint16, sharded)."""
    out = {}
    for i, name in enumerate(CONFIGS):
        cfg = _tiny_cfg(name)
        model = ErnieForCausalLM(cfg, dtype=torch.float32)
        model.init_weights(std=0.05, generator=torch.Generator().manual_seed(i))
        base = tmp_path_factory.mktemp(name)
        save_pt(model, cfg, base / "pt", dtype=torch.float32)
        save_paddle(model, cfg, base / "paddle", dtype=torch.bfloat16, max_shard_bytes=256 << 10)
        out[name, "pt"], out[name, "paddle"] = str(base / "pt"), str(base / "paddle")
    return out


class _ReadLog:
    """Wraps loader.safe_open and records every tensor name read with get_tensor."""

    def __init__(self, monkeypatch):
        self.read: list[str] = []
        real = loader.safe_open
        log = self

        class Recording:
            def __init__(self, path, framework):
                self._f = real(path, framework=framework)

            def __enter__(self):
                self._f.__enter__()
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def get_tensor(self, name):
                log.read.append(name)
                return self._f.get_tensor(name)

            def __getattr__(self, attr):
                return getattr(self._f, attr)

        monkeypatch.setattr(loader, "safe_open", Recording)


def _numel(model) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def _assert_identical(got, want, what: str) -> None:
    a, b = got.state_dict(), want.state_dict()
    assert list(a) == list(b), what
    for key in b:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, f"{what}: {key}"
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _cases():
    for name in CONFIGS:
        for split, sizes in (("tp", (2, 4)), ("ep", (2, 4))):
            if split == "ep" and not _tiny_cfg(name).is_moe:
                continue
            for size in sizes:
                yield name, split, size


def _tensor_names(path: str) -> list[str]:
    names = []
    for f in loader.checkpoint_files(path):
        with safe_open(f, framework="pt") as st:
            names += st.keys()
    return names


def _routed_expert(name: str) -> int | None:
    """The expert index of a routed-expert tensor name, else None."""
    if ".mlp.experts." not in name:
        return None
    return int(name.split(".mlp.experts.")[1].split(".")[0])


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("layout", ["pt", "paddle"])
@pytest.mark.parametrize("name,split,size", list(_cases()))
def test_sharded_load_equals_load_then_shard(checkpoints, monkeypatch, name, split, size, layout, quant):
    path = checkpoints[name, layout]
    shard = SPLITS[split]
    names = _tensor_names(path)
    full, cfg = load_model(path, quantization=quant)
    full_numel = _numel(full)
    log = _ReadLog(monkeypatch)
    for rank in range(size):
        what = f"{name} {layout} {quant} {split}{size} rank {rank}"
        want = copy.deepcopy(full)
        shard(want, rank, size, None)
        log.read.clear()
        got, _ = load_model(path, quantization=quant, prepare=lambda m, r=rank: shard(m, r, size, None))
        _assert_identical(got, want, what)
        assert _numel(got) < full_numel, what
        # TP reads every tensor once; EP skips the experts of other ranks without reading them
        held = range(rank * cfg.moe_num_experts // size, (rank + 1) * cfg.moe_num_experts // size)
        keep = [n for n in names if split == "tp" or _routed_expert(n) in (None, *held)]
        assert sorted(log.read) == sorted(keep), what
        if split == "ep":
            assert len(keep) < len(names), what


def test_noop_prepare_is_a_plain_load(checkpoints):
    path = checkpoints["moe_shared", "paddle"]
    want, _ = load_model(path, quantization="wint4")
    got, _ = load_model(path, quantization="wint4", prepare=lambda m: None)
    _assert_identical(got, want, "no-op prepare")


def _rewrite(path: str, fn) -> None:
    for fname in os.listdir(path):
        if fname.endswith(".safetensors"):
            tensors = load_file(os.path.join(path, fname))
            fn(tensors)
            save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})


@pytest.mark.parametrize("damage", ["drop", "reshape"])
def test_unread_expert_still_checked(checkpoints, tmp_path, damage):
    """An expert EP rank 0 does not hold is never read, but must still be present and well-shaped."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(checkpoints["moe_shared", "pt"], path)
    name = "model.layers.2.mlp.experts.7.down_proj.weight"  # EP2 rank 0 holds experts 0..3

    def edit(tensors):
        if name in tensors:
            if damage == "drop":
                del tensors[name]
            else:
                tensors[name] = tensors[name][:, :-2].contiguous()

    _rewrite(path, edit)
    with pytest.raises(LoadError, match="missing tensor" if damage == "drop" else "has shape"):
        load_model(path, prepare=lambda m: shard_experts_(m, 0, 2, None))
