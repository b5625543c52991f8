"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with padded rows.

Static device buffers hold a step's inputs (token ids, positions, slot mapping, context lengths,
block tables ``[max_bucket, max_blocks]``), all views of one int64 tensor, so that a step uploads
its inputs in one copy from a pinned host mirror of the same layout; two mirrors take turns, so the
host fills one while the other's copy may still be queued behind the step in flight, and nothing
in ``run`` waits for the GPU (asynchronous scheduling launches step n+1 before it reads step n's
tokens). Rows whose token is still on the device (the step in flight's draw) are filled from it on
the device (``device_tokens``). Each bucket's graph is captured after one eager
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

_TABLES = 6  # int64 vectors of the max bucket's length ahead of the block tables in the inputs


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
        # one tensor: [ids | positions | slots | context lens | gather rows | gather sources | tables]
        self._n = n
        self._inputs = torch.zeros(_TABLES * n + n * self.max_blocks, **i64)
        self.input_ids, self.positions, self.slot_mapping, self.context_lens, self._gather_rows, self._gather_src = (
            self._inputs[i * n : (i + 1) * n] for i in range(_TABLES)
        )
        self.slot_mapping.fill_(-1)
        self.block_tables = self._inputs[_TABLES * n :].view(n, self.max_blocks)
        self.query_start_loc = torch.arange(n + 1, **i64)
        self._mirrors = [torch.zeros(self._inputs.numel(), dtype=torch.int64).pin_memory() for _ in range(2)]
        self._mirror_np = [m.numpy() for m in self._mirrors]
        self._uploaded: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
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
        device_tokens=None,
    ) -> torch.Tensor | None:
        """Replay the bucket for these decode rows: final hidden states ``[B, H]``, a view that
        the next replay overwrites; None when no graph fits (B too large, a table too wide).
        ``device_tokens`` (native.runner.DeviceTokens): rows whose token is read on the device."""
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
        self._stage(bs, token_ids, positions, block_tables, context_lens, device_tokens)
        graph, out = self.graphs[bs]
        graph.replay()
        self.replays += 1
        return out[:B]

    def _stage(self, bs, token_ids, positions, block_tables, context_lens, device_tokens) -> None:
        """Fill a pinned mirror of the input buffers and upload it in one copy that does not wait."""
        B, n, bsz = len(token_ids), self._n, self.block_size
        turn, self._turn = self._turn, self._turn ^ 1
        if self._uploaded[turn] is not None:
            self._uploaded[turn].synchronize()  # its copy two steps ago has run: safe to refill
        a = self._mirror_np[turn]
        slots = [t[p // bsz] * bsz + p % bsz for t, p in zip(block_tables, positions)]
        for i, (values, pad) in enumerate(((token_ids, 0), (positions, 0), (slots, -1), (context_lens, 0))):
            a[i * n : i * n + B] = values
            a[i * n + B : i * n + bs] = pad
        m = 0
        if device_tokens is not None:
            m = len(device_tokens.rows)
            a[4 * n : 4 * n + m] = device_tokens.rows
            a[5 * n : 5 * n + m] = device_tokens.source_rows
        width = self.max_blocks
        base = _TABLES * n
        for i, t in enumerate(block_tables):
            a[base + i * width : base + i * width + len(t)] = t
        end = base + B * width
        self._inputs[:end].copy_(self._mirrors[turn][:end], non_blocking=True)
        event = self._uploaded[turn] or torch.cuda.Event()
        event.record()
        self._uploaded[turn] = event
        if m:
            src = device_tokens.source.index_select(0, self._gather_src[:m])
            self.input_ids.index_copy_(0, self._gather_rows[:m], src)

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
