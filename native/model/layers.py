"""Layers built knowing their rank and group size (the shape of nano-vllm's ``layers/linear.py``).

Each layer allocates only its part of the checkpoint tensor and records which part it holds, for
the loader (native/model/loader.py):

* ``shard_rows``: the global output rows held, in local order (None: every row, in place);
* ``shard_cols = (start, stop)``: the input columns held (None: all of them);
* ``shard_experts = (lo, hi)`` (routed experts): experts ``lo..hi-1`` held, at ``e - lo``.

Linears store bf16 / fp32 (``weight [N, K]``, a Parameter) or weight-only int8 / int4 (``qweight``
int8 ``[N, K]`` or packed uint8 ``[N, K/2]`` and per-row ``scales [N]``, buffers); the format is
native/model/quant.py's. Row-parallel layers all-reduce their output themselves; the
vocabulary-parallel embedding all-reduces its rows and all-gathers the logits. Every ``forward``
computes through ``self.ops``, the model's op table (native/model/ops.py: torch; gpu_ops.py:
Triton), which the model sets once for all its layers.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel.context import Group
from ..parallel.tp import HeadSplit, split_range
from .ops import TORCH_OPS, Ops


class OpModule(nn.Module):
    """A module that computes through the model's op table (``ErnieForCausalLM.use_ops``)."""

    ops: Ops = TORCH_OPS


def allocate_weight(
    module: nn.Module, rows: int, cols: int, bits: int | None, dtype: torch.dtype, device: torch.device | None = None
) -> None:
    """Give ``module`` the storage of a ``[rows, cols]`` weight: ``weight`` (float) or
    ``qweight`` + ``scales`` (weight-only ``bits``)."""
    module.bits = bits
    if bits is None:
        module.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device))
        return
    if bits not in (4, 8):
        raise ValueError(f"unsupported bits {bits}")
    if bits == 4 and cols % 2:
        raise ValueError(f"int4 needs an even number of input columns, got {cols}")
    qdtype, width = (torch.int8, cols) if bits == 8 else (torch.uint8, cols // 2)
    module.register_buffer("qweight", torch.zeros(rows, width, dtype=qdtype, device=device))
    module.register_buffer("scales", torch.zeros(rows, dtype=dtype, device=device))


class LinearBase(OpModule):
    """y = x W^T on this rank's rows ``shard_rows`` and columns ``shard_cols`` of a checkpoint
    Linear (no bias); ``bits`` None (float), 8 or 4 (weight-only)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int | None,
        dtype: torch.dtype,
        shard_rows: torch.Tensor | None = None,
        shard_cols: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shard_rows, self.shard_cols = shard_rows, shard_cols
        allocate_weight(self, out_features, in_features, bits, dtype)

    def storage(self) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """(weight, scales, bits): the first arguments of quant.store_rows."""
        if self.bits is None:
            return self.weight, None, None
        return self.qweight, self.scales, self.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(self, x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


class ReplicatedLinear(LinearBase):
    """The whole Linear on every rank."""

    def __init__(self, in_features: int, out_features: int, bits: int | None, dtype: torch.dtype):
        super().__init__(in_features, out_features, bits, dtype)


def _rows(blocks: list[tuple[int, int, int]]) -> torch.Tensor:
    """Global rows of ``(offset, start, stop)`` blocks: ``offset + [start, stop)`` each (a host
    index tensor, also when the model is built on the meta device: the loader reads it)."""
    return torch.cat([torch.arange(off + a, off + b, device="cpu") for off, a, b in blocks])


class ColumnParallelLinear(LinearBase):
    """Output rows split over the TP group: rank r holds rows ``[r*N/n, (r+1)*N/n)``."""

    def __init__(self, in_features: int, out_features: int, bits: int | None, dtype: torch.dtype, tp: Group):
        a, b = split_range(out_features, tp.rank, tp.size, "output dimension")
        rows = None if tp.size == 1 else _rows([(0, a, b)])
        super().__init__(in_features, b - a, bits, dtype, shard_rows=rows)


class MergedColumnParallelLinear(LinearBase):
    """Several Linears stacked along the output (gate and up), each split over the TP group: a
    rank holds its slice of every one, in order."""

    def __init__(self, in_features: int, sizes: list[int], bits: int | None, dtype: torch.dtype, tp: Group):
        blocks, off = [], 0
        for n in sizes:
            blocks.append((off, *split_range(n, tp.rank, tp.size, "output dimension")))
            off += n
        rows = None if tp.size == 1 else _rows(blocks)
        super().__init__(in_features, sum(b - a for _, a, b in blocks), bits, dtype, shard_rows=rows)


class QKVParallelLinear(LinearBase):
    """Fused q / k / v: a rank holds the rows of its query heads and of its KV heads (a KV head
    may be held by several ranks when there are fewer KV heads than ranks)."""

    def __init__(self, hidden: int, head_dim: int, split: HeadSplit, bits: int | None, dtype: torch.dtype):
        nh, nkv, hd = split.num_heads, split.num_kv_heads, head_dim
        q, kv = split.q_heads, split.kv_heads
        rows = None
        if split.size > 1:
            rows = _rows([(0, q.start * hd, q.stop * hd), (nh * hd, kv.start * hd, kv.stop * hd),
                          ((nh + nkv) * hd, kv.start * hd, kv.stop * hd)])
        super().__init__(hidden, (len(q) + 2 * len(kv)) * hd, bits, dtype, shard_rows=rows)


class RowParallelLinear(LinearBase):
    """Input columns split over the TP group; the partial outputs are summed over the group here
    (``reduce=False``: by the caller, e.g. a MoE block's shared expert, summed with the routed
    experts in one all-reduce)."""

    def __init__(
        self, in_features: int, out_features: int, bits: int | None, dtype: torch.dtype, tp: Group, reduce: bool = True
    ):
        a, b = split_range(in_features, tp.rank, tp.size, "input dimension")
        if bits == 4 and (a % 2 or b % 2):
            raise ValueError(f"int4 columns {a}:{b} of TP{tp.size} do not fall on byte boundaries")
        super().__init__(b - a, out_features, bits, dtype, shard_cols=None if tp.size == 1 else (a, b))
        self.tp, self.reduce = tp, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.linear(self, x)
        if self.reduce and self.tp.size > 1:
            y = self.tp.comm.all_reduce(y)
        return y


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, stop)`` of the vocabulary; ids outside embed to zero and the rows are
    summed over the TP group. Also the tied head: :meth:`logits`."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, tp: Group, padding_idx: int | None = None):
        super().__init__()
        self.tp = tp
        self.start, self.stop = split_range(vocab, tp.rank, tp.size, "vocabulary")
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.empty(self.stop - self.start, hidden, dtype=dtype))
        self.shard_rows = None if tp.size == 1 else _rows([(0, self.start, self.stop)])
        self.shard_cols = None

    def storage(self) -> tuple[torch.Tensor, None, None]:
        return self.weight, None, None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = (ids >= self.start) & (ids < self.stop)
        rows = F.embedding(torch.where(local, ids - self.start, 0), self.weight)
        return self.tp.comm.all_reduce(rows.masked_fill_(~local[..., None], 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> fp32 logits [N, V] over the whole vocabulary."""
        part = F.linear(hidden, self.weight).float()
        if self.tp.size == 1:
            return part
        n, v = part.shape
        size = self.tp.size
        return self.tp.comm.all_gather(part).view(size, n, v).transpose(0, 1).reshape(n, size * v)


class ParallelLMHead(VocabParallelEmbedding):
    """An untied head: the same vocabulary rows as the embedding, used only for :meth:`logits`."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, tp: Group):
        super().__init__(vocab, hidden, dtype, tp)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden)


class ExpertsBase(nn.Module, abc.ABC):
    """Routed experts ``lo..hi-1`` (EP) of a MoE layer, each holding intermediate slice
    ``[a, b)`` (TP): w13 rows gate ``[a, b)`` then up ``mI + [a, b)``, w2 columns ``[a, b)``."""

    def __init__(self, num_experts: int, hidden: int, inter: int, expert_range: tuple[int, int] | None = None,
                 inter_range: tuple[int, int] | None = None):
        super().__init__()
        lo, hi = expert_range or (0, num_experts)
        a, b = inter_range or (0, inter)
        self.total_experts, self.total_inter = num_experts, inter
        self.expert_range, self.inter_range = (lo, hi), (a, b)
        self.num_experts, self.hidden, self.inter = hi - lo, hidden, b - a
        self.expert_start = lo
        self.shard_experts = None if (lo, hi) == (0, num_experts) else (lo, hi)
        sliced = (a, b) != (0, inter)
        self.shard_rows = _rows([(0, a, b), (inter, a, b)]) if sliced else None  # w13 rows of every expert
        self.shard_cols = (a, b) if sliced else None  # w2 columns of every expert

    @abc.abstractmethod
    def storage(self, which: str, e: int) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """Local expert ``e``'s ``which`` ("w13" or "w2") as quant.store_rows' first arguments."""

    @abc.abstractmethod
    def stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(w13, w2, w13 scales, w2 scales) as the grouped kernels take them."""


class Experts(ExpertsBase):
    """Float stacks: w13 [E, 2mI, H] (gate rows, then up), w2 [E, H, mI]."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                 expert_range: tuple[int, int] | None = None, inter_range: tuple[int, int] | None = None):
        super().__init__(num_experts, hidden, inter, expert_range, inter_range)
        E, mI = self.num_experts, self.inter
        self.w13 = nn.Parameter(torch.empty(E, 2 * mI, hidden, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(E, hidden, mI, dtype=dtype))

    def storage(self, which: str, e: int):
        return (self.w13 if which == "w13" else self.w2)[e], None, None

    def stacks(self):
        return self.w13, self.w2, None, None

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[e])

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, x [T, H] -> [E, T, H]; or each expert on its own rows,
        x [E, C, H] -> [E, C, H]."""
        gate, up = torch.matmul(x, self.w13.transpose(1, 2)).chunk(2, dim=-1)
        return torch.matmul(F.silu(gate) * up, self.w2.transpose(1, 2))

    @torch.no_grad()
    def load_rows(self, which: str, e: int, row_start: int, w: torch.Tensor) -> None:
        (self.w13 if which == "w13" else self.w2)[e, row_start : row_start + w.shape[0]].copy_(w)
