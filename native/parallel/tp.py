"""Tensor parallelism: shard a loaded ERNIE model in place across a torch.distributed group.

Megatron-style split, applied after loading (so the loader stays one code path):

* attention: query heads split evenly; KV heads split when there are at least as many as ranks,
  otherwise each rank keeps the one KV head its query heads use (replication). ``qkv_proj`` keeps
  the rows of the local heads, ``o_proj`` the matching input columns; the attention output is a
  partial sum, all-reduced.
* dense MLP and shared experts: ``gate_up_proj`` rows (gate and up halves) split, ``down_proj``
  columns split; routed experts split the same way inside every expert; the MoE block's output
  (routed + shared) is all-reduced once. The router stays whole on every rank.
* embedding and head: vocabulary-parallel; each rank embeds its vocabulary slice (others zero)
  and all-reduces; logits are all-gathered.

Quantized weights shard the same way: int8 ``[N, K]`` and packed int4 ``[N, K/2]`` split along N
(rows, with their per-row scales) or along K (columns; scales are per row, so they stay whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadSplit:
    """Which heads TP rank ``rank`` of ``size`` holds."""

    rank: int
    size: int
    num_heads: int
    num_kv_heads: int

    def __post_init__(self):
        if self.num_heads % self.size:
            raise ValueError(f"{self.num_heads} attention heads do not split over TP{self.size}")
        if self.num_kv_heads >= self.size and self.num_kv_heads % self.size:
            raise ValueError(f"{self.num_kv_heads} KV heads do not split over TP{self.size}")
        if self.num_kv_heads < self.size and self.size % self.num_kv_heads:
            raise ValueError(f"TP{self.size} is not a multiple of {self.num_kv_heads} KV heads")

    @property
    def q_heads(self) -> range:
        n = self.num_heads // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_heads(self) -> range:
        if self.num_kv_heads >= self.size:
            n = self.num_kv_heads // self.size
            return range(self.rank * n, (self.rank + 1) * n)
        h = self.rank * self.num_kv_heads // self.size
        return range(h, h + 1)

    @property
    def owns_kv(self) -> bool:
        """With replicated KV heads, only the lowest rank holding a head sends it."""
        if self.num_kv_heads >= self.size:
            return True
        return self.rank % (self.size // self.num_kv_heads) == 0


def _all_reduce_hook(comm):
    def hook(module, args, output):
        return comm.all_reduce(output)

    return hook


def _rows(linear: nn.Module, rows: torch.Tensor) -> None:
    """Keep output rows ``rows`` of a Linear or WeightOnlyLinear."""
    if hasattr(linear, "qweight"):
        linear.qweight = linear.qweight[rows].contiguous()
        linear.scales = linear.scales[rows].contiguous()
    else:
        linear.weight = nn.Parameter(linear.weight.data[rows].contiguous(), requires_grad=False)
    linear.out_features = len(rows)
    linear.shard_rows = rows  # the checkpoint rows this shard holds (the shard-aware loader reads it)


def _cols(linear: nn.Module, start: int, stop: int) -> None:
    """Keep input columns ``[start, stop)``."""
    if hasattr(linear, "qweight"):
        packed = linear.bits == 4
        a, b = (start // 2, stop // 2) if packed else (start, stop)
        if packed and (start % 2 or stop % 2):
            raise ValueError("int4 column split must be even")
        linear.qweight = linear.qweight[:, a:b].contiguous()
    else:
        linear.weight = nn.Parameter(linear.weight.data[:, start:stop].contiguous(), requires_grad=False)
    linear.in_features = stop - start
    linear.shard_cols = (start, stop)  # checkpoint columns held; scales stay those of whole rows


def _split_range(n: int, rank: int, size: int) -> tuple[int, int]:
    if n % size:
        raise ValueError(f"dimension {n} does not split over TP{size}")
    per = n // size
    return rank * per, (rank + 1) * per


def _shard_mlp(mlp: nn.Module, inter: int, rank: int, size: int) -> None:
    a, b = _split_range(inter, rank, size)
    rows = torch.cat([torch.arange(a, b), torch.arange(inter + a, inter + b)])
    _rows(mlp.gate_up_proj, rows)
    _cols(mlp.down_proj, a, b)


def _shard_experts(experts: nn.Module, inter: int, rank: int, size: int) -> None:
    a, b = _split_range(inter, rank, size)
    rows = torch.cat([torch.arange(a, b), torch.arange(inter + a, inter + b)])
    if hasattr(experts, "w13_q"):
        experts.w13_q = experts.w13_q[:, rows].contiguous()
        experts.w13_s = experts.w13_s[:, rows].contiguous()
        packed = experts.bits == 4
        ca, cb = (a // 2, b // 2) if packed else (a, b)
        experts.w2_q = experts.w2_q[:, :, ca:cb].contiguous()
    else:
        experts.w13 = nn.Parameter(experts.w13.data[:, rows].contiguous(), requires_grad=False)
        experts.w2 = nn.Parameter(experts.w2.data[:, :, a:b].contiguous(), requires_grad=False)
    for name in ("inter", "intermediate_size", "moe_intermediate_size"):
        if hasattr(experts, name):
            setattr(experts, name, b - a)
    experts.shard_rows, experts.shard_cols = rows, (a, b)  # w13 rows and w2 columns of every expert


class VocabParallelEmbedding(nn.Module):
    def __init__(self, full: nn.Embedding, rank: int, size: int, comm):
        super().__init__()
        self.start, self.stop = _split_range(full.num_embeddings, rank, size)
        self.weight = nn.Parameter(full.weight.data[self.start : self.stop].contiguous(), requires_grad=False)
        self.shard_rows = torch.arange(self.start, self.stop)
        self.comm = comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = (ids >= self.start) & (ids < self.stop)
        out = F.embedding(torch.where(local, ids - self.start, torch.zeros_like(ids)), self.weight)
        out = out * local.unsqueeze(-1).to(out.dtype)
        return self.comm.all_reduce(out)


def shard_model_(model: nn.Module, rank: int, size: int, comm=None) -> HeadSplit:
    """Shard ``model`` (an ErnieForCausalLM) in place for TP rank ``rank`` of ``size``, its
    collectives on ``comm`` (a parallel.comm.Comm). Works on a meta-device model too (the
    shard-aware loader shards before it allocates)."""
    cfg = model.cfg
    split = HeadSplit(rank, size, cfg.num_attention_heads, cfg.num_key_value_heads)
    if size == 1:
        return split
    hd = cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in split.q_heads])
    k_rows = torch.cat([torch.arange(nh * hd + h * hd, nh * hd + (h + 1) * hd) for h in split.kv_heads])
    v_rows = k_rows + nkv * hd
    hook = _all_reduce_hook(comm)
    for layer in model.model.layers:
        attn = layer.self_attn
        _rows(attn.qkv_proj, torch.cat([q_rows, k_rows, v_rows]))
        q0 = split.q_heads.start * hd
        _cols(attn.o_proj, q0, q0 + len(split.q_heads) * hd)
        attn.num_heads = len(split.q_heads)
        attn.num_kv_heads = len(split.kv_heads)
        attn.register_forward_hook(hook)
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            _shard_experts(mlp.experts, cfg.moe_intermediate_size, rank, size)
            if getattr(mlp, "expert_macs", None):
                mlp.expert_macs //= size
            if mlp.shared_experts is not None:
                _shard_mlp(mlp.shared_experts, cfg.moe_intermediate_size * cfg.moe_num_shared_experts, rank, size)
        else:
            _shard_mlp(mlp, cfg.intermediate_size, rank, size)
        mlp.register_forward_hook(hook)
    embed = model.model.embed_tokens
    model.model.embed_tokens = VocabParallelEmbedding(embed, rank, size, comm)
    if model.lm_head is not None:
        start, stop = _split_range(cfg.vocab_size, rank, size)
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.data[start:stop].contiguous(), requires_grad=False)
        model.lm_head.shard_rows = torch.arange(start, stop)
    local_logits = model.compute_logits

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        part = local_logits(hidden)
        n, v = part.shape
        return comm.all_gather(part).view(size, n, v).transpose(0, 1).reshape(n, size * v)

    model.compute_logits = compute_logits
    model.tp_split = split
    model.tp_comm = comm  # the kernel path (gpu_ops) issues its collectives on it
    return split
