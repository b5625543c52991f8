"""The KV block copy of the CUDA ipc backend: ``copy_kv_blocks`` (native/kernels/kv_copy.py) —
its torch path on the CPU and its Triton kernel (marked ``gpu``) — against ``copy_blocks``
(native/transfer/blocks.py) layer by layer, on random caches of different block counts and head
counts, scattered and consecutive blocks, head slices and layer ranges. Destinations are poisoned
first; every case also checks that nothing the op does not name is touched.
"""

from __future__ import annotations

import random

import pytest
import torch

from native.kernels import kv_copy
from native.transfer.blocks import ResolvedOp, copy_blocks

POISON = -1.0  # sources are drawn from [0, 1)


def random_case(rng: random.Random, gen: torch.Generator, dtype=torch.float32, device="cpu"):
    """(source cache, poisoned destination cache, a multi-layer op between them)."""
    block_size, head_dim = rng.choice([(1, 1), (2, 3), (4, 8), (16, 64)])
    layers = rng.randint(1, 6)
    src_heads, dst_heads = rng.randint(1, 4), rng.randint(1, 4)
    src_blocks_n, dst_blocks_n = rng.randint(4, 24), rng.randint(4, 24)
    heads = rng.randint(1, min(src_heads, dst_heads))
    n = rng.randint(0, min(src_blocks_n, dst_blocks_n))
    if rng.random() < 0.4:  # one run on both sides
        s, d = rng.randint(0, src_blocks_n - n), rng.randint(0, dst_blocks_n - n)
        src_blocks, dst_blocks = list(range(s, s + n)), list(range(d, d + n))
    else:
        src_blocks, dst_blocks = rng.sample(range(src_blocks_n), n), rng.sample(range(dst_blocks_n), n)
    first = rng.randint(0, layers - 1)
    s0, d0 = rng.randint(0, src_heads - heads), rng.randint(0, dst_heads - heads)
    op = ResolvedOp(first, src_blocks, dst_blocks, (s0, s0 + heads), (d0, d0 + heads), rng.randint(1, layers - first))
    src = torch.rand((layers, 2, src_blocks_n, src_heads, block_size, head_dim), generator=gen).to(dtype).to(device)
    dst = torch.full((layers, 2, dst_blocks_n, dst_heads, block_size, head_dim), POISON, dtype=dtype, device=device)
    return src, dst, op


def reference(src, dst, op: ResolvedOp) -> torch.Tensor:
    ref = dst.clone()
    for one in op.layers():
        copy_blocks(src, ref, one)
    return ref


def run(src, dst, op: ResolvedOp) -> int:
    ids = torch.tensor([op.src_blocks, op.dst_blocks], dtype=torch.int64, device=src.device).view(2, -1)
    return kv_copy.copy_kv_blocks(src, dst, op.layer, op.num_layers, ids[0], ids[1], op.src_heads, op.dst_heads)


@pytest.mark.parametrize("seed", range(30))
def test_torch_path_copies_what_copy_blocks_copies(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    src, dst, op = random_case(rng, gen)
    ref = reference(src, dst, op)
    nbytes = run(src, dst, op)
    assert torch.equal(dst, ref)
    (s0, s1) = op.src_heads
    assert nbytes == 2 * op.num_layers * len(op.src_blocks) * (s1 - s0) * src.shape[4] * src.shape[5] * 4
    written = torch.zeros(dst.shape, dtype=torch.bool)
    d0, d1 = op.dst_heads
    for layer in op.layer_range:
        written[layer, :, op.dst_blocks, d0:d1] = True
    assert torch.all(dst[~written] == POISON)


def test_bad_arguments_are_refused():
    src = torch.zeros((2, 2, 4, 2, 4, 8))
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="layers 1\\+2 outside"):
        kv_copy.copy_kv_blocks(src, src.clone(), 1, 2, ids, ids, (0, 2), (0, 2))
    with pytest.raises(ValueError, match="bad heads"):
        kv_copy.copy_kv_blocks(src, src.clone(), 0, 1, ids, ids, (0, 2), (1, 2))
    with pytest.raises(ValueError, match="2 src blocks but 1 dst blocks"):
        kv_copy.copy_kv_blocks(src, src.clone(), 0, 1, ids, ids[:1], (0, 2), (0, 2))
    with pytest.raises(ValueError, match="int64"):
        kv_copy.copy_kv_blocks(src, src.clone(), 0, 1, ids.int(), ids.int(), (0, 2), (0, 2))
    assert kv_copy.copy_kv_blocks(src, src.clone(), 0, 0, ids, ids, (0, 2), (0, 2)) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_copies_what_copy_blocks_copies(dtype, monkeypatch):
    """The Triton kernel, also with the grid's second dimension capped so that programs loop."""
    pytest.importorskip("triton")
    for seed in range(20):
        rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
        src, dst, op = random_case(rng, gen, dtype, "cuda")
        if seed % 2:
            monkeypatch.setattr(kv_copy, "_MAX_TILE", 128)
            monkeypatch.setattr(kv_copy, "_MAX_GRID_Y", 1)
        else:
            monkeypatch.undo()
        ref = reference(src, dst, op)
        run(src, dst, op)
        torch.cuda.synchronize()
        assert torch.equal(dst, ref), seed
