"""Per-step attention metadata, built by the model runner and read by every attention layer.

Tokens of all sequences in a step are flattened into one ``[T]`` axis; sequence ``i`` owns
tokens ``query_start_loc[i]:query_start_loc[i+1]``. Its KV lives in the paged cache at the
blocks of ``block_tables[i]``; after this step the cache holds ``context_lens[i]`` tokens of it
(the new ones included). ``slot_mapping[t]`` is where token ``t``'s K/V is stored
(``block_id * block_size + offset``); ``-1`` means "do not store" (padding rows of a graph).
``tiles`` (a prefill CUDA graph's step, native.graphs.PrefillGraphs): the prefill attention's
query tiles, read on the device; tokens in none of them are padding, and their attention output
is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttnMeta:
    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor  # int64 [B, max_blocks], padded with 0
    slot_mapping: torch.Tensor  # int64 [T]
    block_size: int
    query_start_loc: torch.Tensor  # int64 [B+1]
    context_lens_t: torch.Tensor  # int64 [B]
    is_decode: bool  # every query_len == 1
    max_query_len: int
    max_context_len: int
    tiles: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttnMeta:
        if len(query_lens) != len(context_lens) or len(query_lens) != len(block_tables):
            raise ValueError("query_lens, context_lens and block_tables differ in length")
        slots: list[int] = []
        for q, c, table in zip(query_lens, context_lens, block_tables):
            for pos in range(c - q, c):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0) or 1
        # one tensor from padded rows (a tensor per row costs microseconds each)
        padded = [t if len(t) == width else [*t, *([0] * (width - len(t)))] for t in block_tables]
        bt = torch.tensor(padded, dtype=torch.int64) if padded else torch.zeros((0, width), dtype=torch.int64)
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        return cls(
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            block_tables=bt.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_size=block_size,
            query_start_loc=torch.tensor(qsl, dtype=torch.int64, device=device),
            context_lens_t=torch.tensor(context_lens, dtype=torch.int64, device=device),
            is_decode=all(q == 1 for q in query_lens),
            max_query_len=max(query_lens, default=0),
            max_context_len=max(context_lens, default=0),
        )
