"""Parallelism by construction: a model built for a TP / EP rank (``load_model(..., parallel=ctx)``)
holds exactly its shard of the full model.

For TP (every rank of TP2 / TP4) and EP (every rank of EP2 / EP4), bf16 / wint8 / wint4, -PT and
-Paddle layouts: every tensor (parameters and buffers) is bit-identical to the full load's tensor
cut to the rows / columns / experts the layer records, the records are those of the split
(native/parallel/tp.py), the sharded load allocates less, and an EP rank never reads another
rank's experts. Plus: nothing in native/ shards by surgery (no forward hooks, no patched methods,
no probes for parallel state).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import pathlib
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
from native.model.layers import ExpertsBase  # noqa: E402
from native.model.loader import LoadError, load_model  # noqa: E402
from native.parallel.context import Group, ParallelContext, StepRows  # noqa: E402

# the existing tiny configs; experts raised to a multiple of 4 so that they split over EP2 and EP4
# (heads, KV heads, intermediate sizes and vocab already split over TP2 and TP4; moe_shared has
# 2 KV heads, so TP4 replicates them; moe_noshared_start2 is untied with one KV head)
CONFIGS = {
    "moe_shared": dict(moe_num_experts=8),
    "moe_noshared_start2": dict(moe_num_experts=4),
    "dense_hd": {},
}


def _context(split: str, rank: int, size: int) -> ParallelContext:
    """A rank's context; the collectives are not needed to build and load (a stand-in comm)."""
    if split == "tp":
        return ParallelContext(tp=Group(rank, size, comm=_NO_COMM))
    return ParallelContext(ep=Group(rank, size, comm=_NO_COMM), ep_rows=StepRows())


_NO_COMM = object()  # never called: loading runs no collective
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


def _cut(t: torch.Tensor, rows, cols, packed: bool, lead: int = 0) -> torch.Tensor:
    """``t`` cut to ``rows`` (dim ``lead``) and ``cols`` (the last dim; packed int4: bytes)."""
    if rows is not None:
        t = t.index_select(lead, rows)
    if cols is not None and t.dim() > lead + 1:
        a, b = (cols[0] // 2, cols[1] // 2) if packed else cols
        t = t[..., a:b]
    return t


def _expected_shard(full, shard) -> dict[str, torch.Tensor]:
    """The full model's tensors cut to what each layer of ``shard`` records it holds."""
    want = dict(full.state_dict())
    for name, mod in shard.named_modules():
        pre = name + "." if name else ""
        if isinstance(mod, ExpertsBase):
            lo, hi = mod.shard_experts or (0, mod.total_experts)
            packed = getattr(mod, "bits", None) == 4
            for key in ("w13", "w13_q", "w13_s"):
                if pre + key in want:
                    want[pre + key] = _cut(want[pre + key][lo:hi], mod.shard_rows, None, packed, lead=1)
            for key in ("w2", "w2_q", "w2_s"):
                if pre + key in want:
                    want[pre + key] = _cut(want[pre + key][lo:hi], None, mod.shard_cols if key != "w2_s" else None, packed)
        elif hasattr(mod, "shard_rows"):
            packed = getattr(mod, "bits", None) == 4
            for key in ("weight", "qweight", "scales"):
                if pre + key in want:
                    want[pre + key] = _cut(want[pre + key], mod.shard_rows, mod.shard_cols, packed and key == "qweight")
    return want


def _assert_holds_shard(got, full, what: str) -> None:
    a, b = got.state_dict(), _expected_shard(full, got)
    assert list(a) == list(b), what
    for key, t in a.items():
        assert t.dtype == b[key].dtype and t.shape == b[key].shape, f"{what}: {key} {tuple(t.shape)} vs {tuple(b[key].shape)}"
        assert torch.equal(t, b[key]), f"{what}: {key} differs"


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
def test_rank_model_holds_exactly_its_shard(checkpoints, monkeypatch, name, split, size, layout, quant):
    path = checkpoints[name, layout]
    names = _tensor_names(path)
    full, cfg = load_model(path, quantization=quant)
    full_numel = _numel(full)
    log = _ReadLog(monkeypatch)
    for rank in range(size):
        what = f"{name} {layout} {quant} {split}{size} rank {rank}"
        log.read.clear()
        got, _ = load_model(path, quantization=quant, parallel=_context(split, rank, size))
        _assert_holds_shard(got, full, what)
        assert _numel(got) < full_numel, what
        # TP reads every tensor once; EP skips the experts of other ranks without reading them
        held = range(rank * cfg.moe_num_experts // size, (rank + 1) * cfg.moe_num_experts // size)
        keep = [n for n in names if split == "tp" or _routed_expert(n) in (None, *held)]
        assert sorted(log.read) == sorted(keep), what
        if split == "ep":
            assert len(keep) < len(names), what


def test_tp_records_are_the_split(checkpoints):
    """TP2 rank 1 of moe_shared: its query / KV head rows, intermediate halves and vocabulary."""
    path = checkpoints["moe_shared", "pt"]
    model, cfg = load_model(path, parallel=_context("tp", 1, 2))
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q, kv = range(nh // 2, nh), range(nkv // 2, nkv)
    rows = [r for h in q for r in range(h * hd, (h + 1) * hd)]
    rows += [nh * hd + r for h in kv for r in range(h * hd, (h + 1) * hd)]
    rows += [(nh + nkv) * hd + r for h in kv for r in range(h * hd, (h + 1) * hd)]
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.shard_rows.tolist() == rows
    assert (attn.num_heads, attn.num_kv_heads) == (len(q), len(kv))
    assert attn.o_proj.shard_cols == (nh // 2 * hd, nh * hd)
    moe = model.moe_layers()[0]
    mI = cfg.moe_intermediate_size
    assert moe.experts.shard_cols == (mI // 2, mI) and moe.experts.shard_experts is None
    assert moe.experts.shard_rows.tolist() == list(range(mI // 2, mI)) + list(range(mI + mI // 2, 2 * mI))
    V = cfg.vocab_size
    assert model.model.embed_tokens.shard_rows.tolist() == list(range(V // 2, V))
    ep = load_model(path, parallel=_context("ep", 1, 2))[0].moe_layers()[0].experts
    E = cfg.moe_num_experts
    assert ep.shard_experts == (E // 2, E) and ep.shard_rows is None and ep.shard_cols is None


def test_size_one_context_is_a_plain_load(checkpoints):
    path = checkpoints["moe_shared", "paddle"]
    want, _ = load_model(path, quantization="wint4")
    got, _ = load_model(path, quantization="wint4", parallel=ParallelContext())
    _assert_identical(got, want, "TP1 / EP-less context")


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
        load_model(path, parallel=_context("ep", 0, 2))


NATIVE = pathlib.Path(__file__).resolve().parent.parent / "native"


def test_no_parallelism_by_surgery_in_native():
    """No forward hooks, no methods patched with MethodType, no getattr probes for parallel state."""
    found = []
    for path in sorted(NATIVE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(NATIVE.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and node.attr in ("register_forward_hook", "register_forward_pre_hook"):
                found.append(f"{where} {node.attr}")
            elif isinstance(node, ast.Name) and node.id == "MethodType":
                found.append(f"{where} MethodType")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
                probe = node.args[1] if len(node.args) > 1 else None
                if isinstance(probe, ast.Constant) and probe.value in ("tp_comm", "tp_split", "ep", "ep_lo", "ep_moes"):
                    found.append(f"{where} {node.func.id}(..., {probe.value!r})")
    assert not found, found
