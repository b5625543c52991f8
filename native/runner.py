"""Model runner: turns a scheduled step into tensors, runs the model, returns logits.

It knows nothing of requests: each entry of a step is (tokens to compute, position of the first
of them, block table). Rows listed in ``sample_rows`` get the logits of their last token.
On a GPU, decode-only steps replay CUDA graphs (pdbus.native.graphs) when enabled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pdbus.native.attn_meta import AttnMeta
from pdbus.native.kv_cache import KVCache


class ModelRunner:
    def __init__(self, model, kv_cache: KVCache, device: torch.device | str = "cpu", graphs=None):
        self.model = model
        self.kv_cache = kv_cache
        self.device = torch.device(device)
        self.block_size = kv_cache.block_size
        self.graphs = graphs  # optional CUDA graph runner for decode-only steps

    @torch.inference_mode()
    def execute(
        self,
        token_chunks: list[list[int]],
        start_positions: list[int],
        block_tables: list[list[int]],
        sample_rows: list[int],
        layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        query_lens = [len(c) for c in token_chunks]
        context_lens = [p + n for p, n in zip(start_positions, query_lens)]
        if self.graphs is not None and layer_done is None and all(n == 1 for n in query_lens):
            hidden_rows = self.graphs.run(
                [c[0] for c in token_chunks], start_positions, block_tables, context_lens
            )
            if hidden_rows is not None:
                return self.model.compute_logits(hidden_rows[sample_rows])
        flat: list[int] = []
        positions: list[int] = []
        for chunk, start in zip(token_chunks, start_positions):
            flat.extend(chunk)
            positions.extend(range(start, start + len(chunk)))
        meta = AttnMeta.build(query_lens, context_lens, block_tables, self.block_size, self.device)
        input_ids = torch.tensor(flat, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, pos, self.kv_cache, meta, layer_done=layer_done)
        if not sample_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        last = meta.query_start_loc[1:] - 1
        rows = last[torch.tensor(sample_rows, dtype=torch.int64, device=self.device)]
        return self.model.compute_logits(hidden[rows])
