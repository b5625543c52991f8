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


class Staging:
    """Pinned host mirrors of a graph's one int64 input tensor, uploaded in one copy that does not
    wait: two mirrors take turns, so the host fills one while the other's copy may still be
    queued behind the step in flight."""

    def __init__(self, inputs: torch.Tensor):
        self.inputs = inputs
        self._mirrors = [torch.zeros(inputs.numel(), dtype=torch.int64).pin_memory() for _ in range(2)]
        self._np = [m.numpy() for m in self._mirrors]
        self._uploaded: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def mirror(self):
        """The next mirror (numpy), free to fill: its copy two steps ago has run."""
        turn = self._turn
        if self._uploaded[turn] is not None:
            self._uploaded[turn].synchronize()
        return self._np[turn]

    def upload(self, end: int) -> None:
        """Copy the first ``end`` values of the mirror just filled to the device (queued)."""
        turn, self._turn = self._turn, self._turn ^ 1
        self.inputs[:end].copy_(self._mirrors[turn][:end], non_blocking=True)
        event = self._uploaded[turn] or torch.cuda.Event()
        event.record()
        self._uploaded[turn] = event


class DecodeGraphs:
    def __init__(self, model, kv_cache: KVCache, max_batch: int, max_model_len: int, pool=None):
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
        self._staging = Staging(self._inputs)
        self._capture(pool)

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
    def _capture(self, pool) -> None:
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
        a = self._staging.mirror()
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
        self._staging.upload(base + B * width)
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


# ------------------------------------------------------------------------------ prompt chunks

_PREFILL_VECTORS = 3  # int64 vectors of the max bucket's length: ids, positions, slots


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts that prompt-chunk graphs are captured for: 16 .. 512 by doubling, then
    multiples of 256, up to ``max_tokens`` (ascending; empty below 16)."""
    out = [t for t in (16, 32, 64, 128, 256, 512) if t <= max_tokens]
    t = 768
    while t <= max_tokens:
        out.append(t)
        t += 256
    return out


class PrefillGraphs:
    """CUDA graphs for steps that compute prompt chunks (alone or beside decode rows): one graph
    per token-count bucket (:func:`prefill_buckets`), each for up to ``max_rows`` sequences.

    An eager chunk on a GPU host is launch-bound: a few hundred kernels of a few µs each, at
    ~45 µs of host time per launch here (bench/RESULTS.md: 192 new tokens over 1,856 cached took
    9.2 ms of wall for 2.4 ms of GPU work). A replay launches them all at once. The step's T tokens
    fill the first rows of a bucket of Tb >= T; the rest are padding: token 0 at position 0, slot
    -1 (no K/V stored), in no attention tile, so their attention output is zero and their rows of
    the output are ignored. The prefill attention reads its work from a tile list on the device
    (``AttnMeta.tiles``, sequence and query tile per program) rather than from a grid sized by
    the longest query, so one graph serves any split of Tb tokens into at most ``max_rows``
    sequences. The rest of the step's kernels read only device metadata and static shapes.

    Inputs: one int64 tensor ``[ids | positions | slots (Tb max) | query starts (R+1) | context
    lens (R) | tiles | gather rows (R) | gather sources (R) | block tables (R x W)]`` uploaded from
    a pinned mirror (:class:`Staging`). All graphs share one memory pool (the decode graphs' too,
    when given: graphs replay one at a time on one stream).

    A row's result depends on the bucket only as much as the GEMMs' rounding depends on their row
    count (cuBLAS may pick another kernel); the same step always picks the same bucket, so PD
    and mixed, which run a prompt in the same chunks, stay equal. A step's per-layer hook
    (``layer_done``, PD's layer-by-layer KV push) runs for every layer after the replay, so
    the runner replays such steps only up to ``layer_done_max`` tokens, where the launches cost
    more than the overlap of the push with later layers would save.
    """

    def __init__(self, model, kv_cache: KVCache, max_rows: int, max_model_len: int, max_tokens: int,
                 pool=None, layer_done_max: int = 512):  # fmt: skip
        from .kernels.attention import max_prefill_tiles
        from .model.gpu_ops import PREFILL_BLOCK_M

        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.layer_done_max = layer_done_max
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.buckets: list[int] = []
        self.replays = 0
        self.pool = pool
        reason = (
            gpu_ops.kernels_supported(model, kv_cache) if model.use_kernels is not False else "use_kernels=False"
        )
        parallel = model.parallel
        if reason is None and (parallel.tp.size > 1 or parallel.ep.size > 1):
            reason = "the ranks of a TP or EP group run prompt chunks eagerly, in lockstep"
        buckets = prefill_buckets(max_tokens)
        if reason is None and not buckets:
            reason = f"--max-num-batched-tokens {max_tokens} is under the smallest bucket (16)"
        if reason is not None:
            log.warning("prompt-chunk CUDA graphs disabled (chunks run eagerly): %s", reason)
            return
        self.device = kv_cache.device
        self.block_m = PREFILL_BLOCK_M
        self.rows = R = max(1, max_rows)
        self.max_blocks = W = -(-max_model_len // self.block_size)
        n = buckets[-1]
        self._n = n
        self._tiles_of = {t: max_prefill_tiles(t, R, self.block_m) for t in buckets}
        nt = self._tiles_of[n]
        sizes = [n, n, n, R + 1, R, nt, R, R, R * W]
        i64 = dict(dtype=torch.int64, device=self.device)
        self._inputs = torch.zeros(sum(sizes), **i64)
        self._offsets = [0]
        for size in sizes:
            self._offsets.append(self._offsets[-1] + size)
        views = [self._inputs[a:b] for a, b in zip(self._offsets, self._offsets[1:])]
        (self.input_ids, self.positions, self.slot_mapping, self.query_start_loc, self.context_lens,
         self.tiles, self._gather_rows, self._gather_src, tables) = views  # fmt: skip
        self.block_tables = tables.view(R, W)
        self.slot_mapping.fill_(-1)
        self.tiles.fill_(-1)
        self._staging = Staging(self._inputs)  # a step uploads what its bucket reads, stale beyond
        self.buckets = buckets
        self._capture()

    @property
    def enabled(self) -> bool:
        return bool(self.graphs)

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1] if self.buckets else 0

    def _meta(self, tokens: int) -> AttnMeta:
        return AttnMeta(
            query_lens=[],  # host values are not read on the kernel path
            context_lens=[],
            block_tables=self.block_tables,
            slot_mapping=self.slot_mapping[:tokens],
            block_size=self.block_size,
            query_start_loc=self.query_start_loc,
            context_lens_t=self.context_lens,
            is_decode=False,
            max_query_len=tokens,
            max_context_len=self.max_blocks * self.block_size,
            tiles=self.tiles[: self._tiles_of[tokens]],
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        import time

        t0 = time.monotonic()
        for tokens in reversed(self.buckets):
            args = (self.input_ids[:tokens], self.positions[:tokens], self.kv_cache, self._meta(tokens))
            self.model(*args)  # warm-up: compiles this bucket's kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model(*args)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[tokens] = (graph, out)
        torch.cuda.synchronize(self.device)
        log.info("captured prompt-chunk CUDA graphs for %s tokens (up to %d sequences) in %.1fs",
                 self.buckets, self.rows, time.monotonic() - t0)  # fmt: skip

    def fits(self, num_tokens: int, num_rows: int, width: int, layer_done: bool) -> bool:
        limit = min(self.max_tokens, self.layer_done_max) if layer_done else self.max_tokens
        return bool(self.graphs) and 0 < num_tokens <= limit and num_rows <= self.rows and width <= self.max_blocks

    @torch.inference_mode()
    def run(self, token_chunks, start_positions, block_tables, device_tokens=None):
        """Replay the bucket for this step (call :meth:`fits` first): ``(hidden [Tb, H], ends)``,
        ``ends[i]`` the row of sequence i's last token; the view is overwritten by the next replay."""
        import numpy as np

        from .kernels.attention import TILE_SHIFT

        lens = [len(c) for c in token_chunks]
        T = sum(lens)
        tokens = next(t for t in self.buckets if t >= T)
        o, bs, W = self._offsets, self.block_size, self.max_blocks
        a = self._staging.mirror()
        ids, pos, slots = a[o[0] : o[0] + tokens], a[o[1] : o[1] + tokens], a[o[2] : o[2] + tokens]
        qsl, ctx = a[o[3] : o[4]], a[o[4] : o[5]]
        tables = a[o[8] :]
        at = 0
        ends = []
        tiles = []
        for b, (chunk, start, table) in enumerate(zip(token_chunks, start_positions, block_tables)):
            n = len(chunk)
            ids[at : at + n] = chunk
            p = np.arange(start, start + n)
            pos[at : at + n] = p
            t = np.asarray(table, dtype=np.int64)
            slots[at : at + n] = t[p // bs] * bs + p % bs
            qsl[b] = at
            ctx[b] = start + n
            tables[b * W : b * W + len(t)] = t
            tiles.extend((b << TILE_SHIFT) | m for m in range(-(-n // self.block_m)))
            at += n
            ends.append(at - 1)
        B = len(lens)
        ids[T:tokens] = 0
        pos[T:tokens] = 0
        slots[T:tokens] = -1
        qsl[B:] = T
        ctx[B:] = 0
        nt = self._tiles_of[tokens]
        tl_ = a[o[5] : o[5] + nt]
        tl_[: len(tiles)] = tiles
        tl_[len(tiles) :] = -1
        m = 0
        if device_tokens is not None:
            m = len(device_tokens.rows)
            a[o[6] : o[6] + m] = [ends[r] for r in device_tokens.rows]
            a[o[7] : o[7] + m] = device_tokens.source_rows
        self._staging.upload(o[8] + B * W)
        if m:
            src = device_tokens.source.index_select(0, self._gather_src[:m])
            self.input_ids.index_copy_(0, self._gather_rows[:m], src)
        graph, out = self.graphs[tokens]
        graph.replay()
        self.replays += 1
        return out, ends
