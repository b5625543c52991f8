"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with padded rows.

Static device buffers hold a step's inputs (token ids, positions, slot mapping, block tables
``[max_bucket, max_blocks]``, context lengths). Each bucket's graph is captured after one eager
warm-up (which compiles its Triton kernels), largest bucket first, all into one memory pool;
each keeps its own output rows ``[bucket, H]``. A step of B sequences fills the first B rows and
replays the smallest bucket >= B; the padding rows have slot -1 (their K/V is not stored) and
context length 0 (their attention reads nothing), and their outputs are ignored. Sampling stays
outside the graph: the runner computes logits from the returned rows.

The model must run on the kernel op table (native/model/gpu_ops.py), whose decode step reads no
host value; its attention partitions do not depend on the batch, so a graph replay and an eager step
of the same rows give the same bits.
"""

from __future__ import annotations

import logging

import torch

from .attn_meta import AttnMeta
from .kv_cache import KVCache
from .model import gpu_ops

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to the first one >= max_batch (ascending)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out = [b for b in (1, 2, 4, 8) if b < max_batch]
    b = 16
    while b < max_batch:
        out.append(b)
        b += 8
    out.append(bucket_for(max_batch))
    return out


def bucket_for(batch: int) -> int:
    """The bucket that a step of ``batch`` rows replays (before the cap of ``batch_buckets``)."""
    if batch <= 8:
        return 1 << max(0, (batch - 1).bit_length())
    return max(16, -(-batch // 8) * 8)


class DecodeGraphs:
    def __init__(self, model, kv_cache: KVCache, max_batch: int, max_model_len: int):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.buckets: list[int] = []
        self.replays = 0
        reason = (
            gpu_ops.kernels_supported(model, kv_cache)
            if model.use_kernels is not False
            else "use_kernels=False"
        )
        if reason is None:
            reason = gpu_ops.graph_blocker(model)
        if reason is not None:
            log.warning("decode CUDA graphs disabled (steps run eagerly): %s", reason)
            return
        self.ep_rows = model.parallel.ep_rows  # EP: every rank replays the bucket agreed in ep.plan
        self.device = kv_cache.device
        bpp = gpu_ops.decode_blocks_per_partition(self.block_size)
        blocks = -(-max_model_len // self.block_size)
        self.max_blocks = -(-blocks // bpp) * bpp  # a whole number of attention partitions
        self.buckets = batch_buckets(max_batch)
        n = self.buckets[-1]
        i64 = dict(dtype=torch.int64, device=self.device)
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), -1, **i64)
        self.context_lens = torch.zeros(n, **i64)
        self.block_tables = torch.zeros((n, self.max_blocks), **i64)
        self.query_start_loc = torch.arange(n + 1, **i64)
        self._capture()

    @property
    def enabled(self) -> bool:
        return bool(self.graphs)

    @property
    def max_bucket(self) -> int:
        return self.buckets[-1] if self.buckets else 0

    def _meta(self, bs: int) -> AttnMeta:
        return AttnMeta(
            query_lens=[1] * bs,
            context_lens=[0] * bs,  # host values are not read by the kernel decode path
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            block_size=self.block_size,
            query_start_loc=self.query_start_loc[: bs + 1],
            context_lens_t=self.context_lens[:bs],
            is_decode=True,
            max_query_len=1,
            max_context_len=self.max_blocks * self.block_size,
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.buckets):
            if self.ep_rows is not None:
                self.ep_rows.tokens = bs  # the MoE dispatch buffers of this bucket (all ranks capture together)
            meta = self._meta(bs)
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_cache, meta)
            self.model(*args)  # warm-up: compiles this bucket's kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(*args)
            if pool is None:
                pool = graph.pool()
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    @torch.inference_mode()
    def run(
        self,
        token_ids: list[int],
        positions: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
    ) -> torch.Tensor | None:
        """Replay the bucket for these decode rows: final hidden states ``[B, H]``, a view that
        the next replay overwrites; None when no graph fits (B too large, a table too wide)."""
        B = len(token_ids)
        if not self.graphs or B == 0 or B > self.max_bucket:
            return None
        width = max(len(t) for t in block_tables)
        if width > self.max_blocks:
            return None
        if self.ep_rows is not None:
            bs = self.ep_rows.tokens  # agreed by all EP ranks; their eager steps pad to it too
            if bs not in self.graphs:
                return None
        else:
            bs = min(b for b in self.buckets if b >= B)
        pad = bs - B
        bsz = self.block_size
        slots = [t[p // bsz] * bsz + p % bsz for t, p in zip(block_tables, positions)]
        flat: list[int] = []
        for t in block_tables:
            flat.extend(t)
            flat.extend([0] * (width - len(t)))
        self.input_ids[:bs].copy_(torch.tensor(token_ids + [0] * pad, dtype=torch.int64))
        self.positions[:bs].copy_(torch.tensor(positions + [0] * pad, dtype=torch.int64))
        self.slot_mapping[:bs].copy_(torch.tensor(slots + [-1] * pad, dtype=torch.int64))
        self.context_lens[:bs].copy_(torch.tensor(context_lens + [0] * pad, dtype=torch.int64))
        self.block_tables[:B, :width].copy_(torch.tensor(flat, dtype=torch.int64).view(B, width))
        graph, out = self.graphs[bs]
        graph.replay()
        self.replays += 1
        return out[:B]

    @torch.inference_mode()
    def run_idle(self, bucket: int) -> bool:
        """EP: replay ``bucket`` with only padding rows (this rank joins the other ranks' MoE
        collectives without tokens of its own); False when no such graph exists."""
        if bucket not in self.graphs:
            return False
        self.slot_mapping[:bucket].fill_(-1)
        self.context_lens[:bucket].zero_()
        self.input_ids[:bucket].zero_()
        self.positions[:bucket].zero_()
        self.graphs[bucket][0].replay()
        self.replays += 1
        return True
