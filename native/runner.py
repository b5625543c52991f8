"""Model runner: turns a scheduled step into tensors, runs the model, returns logits.

It knows nothing of requests: each entry of a step is (tokens to compute, position of the first
of them, block table). Rows listed in ``sample_rows`` get the logits of their last token.
On a GPU, decode-only steps replay CUDA graphs (native.graphs) when enabled, and steps with
prompt chunks of up to a bucket's tokens replay the prompt-chunk graphs.
:func:`profile_activation_peak` measures what a step needs beyond the weights and the KV cache,
so that the cache can be sized from ``--gpu-memory-utilization``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from native.attn_meta import AttnMeta
from native.host import upload
from native.kv_cache import KVCache


@dataclass(frozen=True)
class DeviceTokens:
    """Input tokens still on the device: the one query token of row ``rows[i]`` of this step is
    ``source[source_rows[i]]`` (the step in flight's draw, not read back yet; the host passes a
    placeholder for it). Asynchronous scheduling, actors.engine.engine."""

    rows: list[int]
    source: torch.Tensor
    source_rows: list[int]


class Runner(abc.ABC):
    """What the engine calls each step. A runner alone decides by itself; a runner of a group
    whose ranks must step together (native.parallel.ep_runner.EPRunner) overrides the step
    agreement: ``plan`` before every step, ``idle_step`` when this rank has nothing to run."""

    # how long an engine with nothing to do may wait before it must plan again (None: forever)
    idle_wait_s: float | None = None
    # ``execute`` takes ``device_tokens`` (the engine may launch a step before it has read the
    # last one's tokens); a group whose ranks get each step's tokens from the host does not
    supports_device_tokens: bool = False

    def plan(self, num_tokens: int, decode_only: bool) -> bool:
        """Step now? ``num_tokens`` is this rank's step (0: nothing scheduled here)."""
        return num_tokens > 0

    def idle_step(self) -> None:  # noqa: B027 - a runner alone has no idle step to run
        """Run the step the plan agreed on with no tokens of this rank's own."""

    @property
    def busy(self) -> bool:
        """Other ranks are mid-work and wait for this one: plan again at once."""
        return False

    @abc.abstractmethod
    def execute(self, token_chunks, start_positions, block_tables, sample_rows, layer_done=None) -> torch.Tensor:
        """Run one step over these rows; the logits of ``sample_rows``. Runners that
        ``supports_device_tokens`` also take ``device_tokens`` (a :class:`DeviceTokens`)."""


class ModelRunner(Runner):
    supports_device_tokens = True

    def __init__(self, model, kv_cache: KVCache, device: torch.device | str = "cpu", graphs=None, prefill_graphs=None):
        self.model = model
        self.kv_cache = kv_cache
        self.device = torch.device(device)
        self.block_size = kv_cache.block_size
        self.graphs = graphs  # optional CUDA graph runner for decode-only steps
        self.prefill_graphs = prefill_graphs  # optional one for steps with prompt chunks (PrefillGraphs)

    @torch.inference_mode()
    def execute(
        self,
        token_chunks: list[list[int]],
        start_positions: list[int],
        block_tables: list[list[int]],
        sample_rows: list[int],
        layer_done: Callable[[int], None] | None = None,
        device_tokens: DeviceTokens | None = None,
    ) -> torch.Tensor:
        query_lens = [len(c) for c in token_chunks]
        context_lens = [p + n for p, n in zip(start_positions, query_lens)]
        every_row = len(sample_rows) == len(token_chunks)  # rows in order: no index to upload
        if self.graphs is not None and layer_done is None and all(n == 1 for n in query_lens):
            hidden_rows = self.graphs.run(
                [c[0] for c in token_chunks], start_positions, block_tables, context_lens, device_tokens
            )
            if hidden_rows is not None:
                return self.model.compute_logits(hidden_rows if every_row else hidden_rows[sample_rows])
        pg = self.prefill_graphs
        if pg is not None and pg.fits(sum(query_lens), len(query_lens), max(map(len, block_tables)), layer_done is not None):
            hidden, ends = pg.run(token_chunks, start_positions, block_tables, device_tokens)
            if layer_done is not None:  # every layer's K/V is stored once the replay has run
                for i in range(self.kv_cache.num_layers):
                    layer_done(i)
            if not sample_rows:
                return hidden.new_empty((0, 0), dtype=torch.float32)
            return self.model.compute_logits(hidden[upload([ends[i] for i in sample_rows], self.device, torch.int64)])
        flat: list[int] = []
        positions: list[int] = []
        for chunk, start in zip(token_chunks, start_positions):
            flat.extend(chunk)
            positions.extend(range(start, start + len(chunk)))
        meta = AttnMeta.build(query_lens, context_lens, block_tables, self.block_size, self.device)
        input_ids = upload(flat, self.device, torch.int64)
        pos = upload(positions, self.device, torch.int64)
        if device_tokens is not None:  # each such row's last (its only) query token
            ends = meta.query_start_loc[1:] - 1
            at = ends[upload(device_tokens.rows, self.device, torch.int64)]
            src = device_tokens.source[upload(device_tokens.source_rows, self.device, torch.int64)]
            input_ids[at] = src
        hidden = self.model(input_ids, pos, self.kv_cache, meta, layer_done=layer_done)
        if not sample_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        last = meta.query_start_loc[1:] - 1
        rows = last if every_row else last[upload(sample_rows, self.device, torch.int64)]
        return self.model.compute_logits(hidden[rows])


# prompt chunk lengths that warm_up_prefill runs: two per tier of the kernels' tile choices by
# rows (attention BLOCK_M 16 / 64 / 128, the quantized GEMMs' and GEMVs' configs), one a
# multiple of 16 and one not (Triton compiles an integer argument's two cases apart); the MoE's
# tiers, by routed pairs per expert, are added from the model's expert count (warm_lengths)
WARM_QUERY_LENS = (3, 16, 40, 64, 200, 256, 600, 1024)
MOE_PAIRS_PER_EXPERT = (8, 32, 100, 200)  # one inside each of moe_block_m's tiers


def warm_lengths(cfg, limit: int) -> list[int]:
    """The chunk lengths to warm up for a model of config ``cfg``, none over ``limit`` tokens."""
    lens = set(WARM_QUERY_LENS)
    experts, k = getattr(cfg, "moe_num_experts", 0), getattr(cfg, "moe_k", 0)
    if experts and k:
        for per_expert in MOE_PAIRS_PER_EXPERT:
            n = -(-per_expert * experts // k)
            lens |= {n, n + 1} if n % 16 == 0 else {n, max(16, n // 16 * 16)}
    return sorted(n for n in lens if 0 < n <= limit)


@torch.inference_mode()
def warm_up_prefill(runner: ModelRunner, max_tokens: int = 4096) -> int:
    """Run eager prompt chunks of a few lengths, fresh and over one cached block, and one step that
    mixes a chunk with a decode row, so that the Triton kernels each variant needs compile at load
    and not inside a request (on a fresh server the first prompt over a cached prefix spent ~1 s
    compiling its attention: the c16 chat's second turn in bench/RESULTS.md); chunks of at most
    ``max_tokens`` (the scheduler's budget per step). Writes K/V into the
    first blocks of the cache, which no request holds yet. Returns the steps run (0: the cache
    is too small to hold them)."""
    bs = runner.block_size
    lengths = warm_lengths(runner.model.cfg, max_tokens)
    if not lengths:
        return 0
    table = list(range(-(-(bs + max(lengths)) // bs)))
    if runner.kv_cache.num_blocks < len(table):
        return 0
    steps = 0
    graphs, runner.prefill_graphs = runner.prefill_graphs, None  # eager: PD's pushed chunks may run so
    try:
        for n in lengths:
            chunk = [3 + i % 61 for i in range(n)]
            for cached in (0, bs):
                runner.execute([chunk], [cached], [table], [0])
                steps += 1
        runner.execute([[3] * 16, [4]], [bs, bs + 16], [table, table], [0, 1])  # a chunk beside a decode row
    finally:
        runner.prefill_graphs = graphs
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return steps + 1


@torch.inference_mode()
def profile_activation_peak(model, cfg, device: torch.device | str | None = None, graph_tokens: int = 0) -> int:
    """Peak bytes a step allocates on the GPU beyond the weights and the KV cache.

    Runs eagerly, on dummy tokens, the largest prefill step the scheduler can form
    (``cfg.max_num_batched_tokens`` tokens in sequences of at most ``cfg.max_model_len``) and the
    largest decode step (``cfg.max_num_seqs`` rows), each followed by the logits of
    ``cfg.max_num_seqs`` rows, over a temporary cache just large enough, and returns the larger
    peak of ``torch.cuda.max_memory_allocated`` above what was allocated before, plus the peak
    again of the largest step a CUDA graph holds in the graphs' shared pool: the decode step's,
    or a prompt chunk of ``graph_tokens`` tokens (native.graphs.PrefillGraphs) when larger. Frees everything (``empty_cache``)
    before it returns, so ``torch.cuda.mem_get_info`` then shows the memory left for the cache.
    Also compiles the prefill kernels, so the first real step starts warm.
    """
    device = torch.device(device) if device is not None else model.model.embed_tokens.weight.device
    if device.type != "cuda":
        raise ValueError(f"profile_activation_peak needs a CUDA device, got {device}")
    mcfg = model.cfg
    bs = cfg.block_size
    tokens = max(1, min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len))
    prefill = [min(cfg.max_model_len, tokens - start) for start in range(0, tokens, cfg.max_model_len)]
    decode_rows = cfg.max_num_seqs
    blocks_per_seq = [-(-n // bs) for n in prefill]
    num_blocks = max(sum(blocks_per_seq), decode_rows) + 1
    cache = KVCache(
        mcfg.num_hidden_layers,
        num_blocks,
        model.model.layers[0].self_attn.num_kv_heads,  # this TP rank's KV heads
        bs,
        mcfg.head_dim,
        next(p.dtype for p in model.parameters() if p.dtype != torch.float32),
        device=device,
    )
    gen = torch.Generator().manual_seed(0)
    peaks = []
    try:
        tables, first = [], 1
        for n in blocks_per_seq:
            tables.append(list(range(first, first + n)))
            first += n
        steps = [
            (prefill, [0] * len(prefill), tables),
            ([1] * decode_rows, [0] * decode_rows, [[1 + i % (num_blocks - 1)] for i in range(decode_rows)]),
        ]
        graph_tokens = min(graph_tokens, prefill[0])
        if graph_tokens:
            steps.append(([graph_tokens], [0], [tables[0][: -(-graph_tokens // bs)]]))
        ep_rows = model.parallel.ep_rows
        for qlens, starts, step_tables in steps:
            if ep_rows is not None:
                ep_rows.tokens = sum(qlens)  # every EP rank profiles the same steps, together
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            ids = torch.randint(3, mcfg.vocab_size, (sum(qlens),), generator=gen).to(device)
            pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, qlens)]).to(device)
            ctx = [s + n for s, n in zip(starts, qlens)]
            meta = AttnMeta.build(qlens, ctx, step_tables, bs, device)
            hidden = model(ids, pos, cache, meta)
            rows = torch.arange(decode_rows, device=device) % hidden.shape[0]
            logits = model.compute_logits(hidden[rows])
            torch.softmax(logits, dim=-1)  # the sampler's working copy of the logits
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
            del hidden, logits, meta, ids, pos
    finally:
        cache.close()
        del cache
        torch.cuda.empty_cache()
    return max(peaks) + max(peaks[1:])
