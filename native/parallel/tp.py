"""Tensor parallelism: which part of the model a TP rank holds (Megatron-style split).

The layers of native/model/layers.py are built from these splits (no sharding after the fact):

* attention: query heads split evenly; KV heads split when there are at least as many as ranks,
  otherwise each rank keeps the one KV head its query heads use (replication). ``qkv_proj`` keeps
  the rows of the local heads, ``o_proj`` the matching input columns; the attention output is a
  partial sum, all-reduced by ``o_proj``.
* dense MLP and shared experts: ``gate_up_proj`` rows (gate and up halves) split, ``down_proj``
  columns split; routed experts split the same way inside every expert; the MoE block's output
  (routed + shared) is all-reduced once. The router stays whole on every rank.
* embedding and head: vocabulary-parallel; each rank embeds its vocabulary slice (others zero)
  and all-reduces; logits are all-gathered.

Quantized weights split the same way: int8 ``[N, K]`` and packed int4 ``[N, K/2]`` along N
(rows, with their per-row scales) or along K (columns; scales are those of whole rows).
"""

from __future__ import annotations

from dataclasses import dataclass


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


def split_range(n: int, rank: int, size: int, what: str = "dimension") -> tuple[int, int]:
    """Rank ``rank``'s ``[start, stop)`` of ``n`` split evenly over ``size`` ranks."""
    if n % size:
        raise ValueError(f"{what} {n} does not split over TP{size}")
    per = n // size
    return rank * per, (rank + 1) * per
