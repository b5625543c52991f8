"""Token sampling for one engine step: logits ``[B, V]`` in, one token per row out.

Order of operations per row (OpenAI / vLLM semantics):

1. raw logprobs: ``log_softmax`` of the model's logits, before anything below (only when a row
   asked for logprobs);
2. ``min_tokens``: while the row has fewer outputs than ``min_tokens``, its eos ids and its
   ``stop_token_ids`` are masked to ``-inf`` (``ignore_eos`` is the engine's business, not ours);
3. penalties: repetition (over prompt + output tokens: positive logits divided, others
   multiplied), then frequency (times the output count) and presence (once per seen output token);
4. greedy rows (``params.greedy``) take the argmax here;
5. the others: temperature, ``min_p`` (relative to the top probability), ``top_k``, ``top_p``,
   then one draw: seeded rows by the exponential race ``argmax(p / E)``, ``E ~ Exp(1)`` per
   token; unseeded rows by the inverse CDF of one uniform each (the same distribution).

Seeded rows draw their noise from a generator seeded with ``hash64(seed, len(output_ids))``:
the draw depends on nothing but the request and the step, so it does not change with the batch
around it and a decode instance continues exactly where a prefill instance left off.
Unseeded rows share one generator per device.

All-greedy batches without penalties take one ``argmax``; otherwise the penalties and the
filters are batched tensor ops, and only seeded rows loop (one generator each).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from native.host import upload
from pdbus.messages import SamplingParams

_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finalizer: a bijection on 64-bit integers with good avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def hash64(seed: int, step: int) -> int:
    """Deterministic 64-bit seed for draw number ``step`` of a request seeded with ``seed``."""
    z = _mix64((seed + 0x9E3779B97F4A7C15) & _MASK64)
    return _mix64((z + step * 0x9E3779B97F4A7C15) & _MASK64)


@dataclass
class SampleOutput:
    token_ids: list[int]
    # Raw logprob (log_softmax of the model logits) of each sampled token; None when no row
    # asked. Rows that did not ask hold NaN: read them only where params.logprobs is not None.
    logprobs: list[float] | None = None
    # Per row, that row's top ``params.logprobs`` (token id, raw logprob), best first; None for
    # rows that did not ask (and the whole field None when no row asked).
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    out = out.to(device, non_blocking=True)
    return torch.where((out >= 0) & (out < pad), out, pad)  # ids outside the vocab land on the pad


def _token_counts(rows: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[len(rows), vocab]`` float counts of each token id per row."""
    ids = _padded(rows, vocab, device)
    counts = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


class Sampler:
    """Stateless but for the generators of unseeded rows; safe to share across steps."""

    def __init__(self, seed: int | None = None):
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _global_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed & _MASK64)
            self._generators[device] = gen
        return gen

    @staticmethod
    def reads_on_device(p: SamplingParams) -> bool:
        """Whether a row is drawn without the host knowing its earlier outputs' values (only their
        number): no penalties, no logprobs. Such rows may run a step ahead of their last token
        (the engine's asynchronous scheduling, :meth:`sample`)."""
        return p.logprobs is None and not _has_penalty(p)

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        eos_token_ids: set[int] | frozenset[int],
    ) -> SampleOutput:
        out = SampleOutput(token_ids=[])
        asked = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = None
        if asked:
            rows = logits if len(asked) == len(params) else logits[asked]
            raw_logprobs = torch.log_softmax(rows.float(), dim=-1)
        token_ids = self.sample(logits, params, prompt_ids, output_ids, eos_token_ids)
        if raw_logprobs is not None:
            self._fill_logprobs(out, raw_logprobs, token_ids, asked, params)
        out.token_ids = token_ids.tolist()
        return out

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        eos_token_ids: set[int] | frozenset[int],
    ) -> torch.Tensor:
        """The drawn token ids ``[B]`` on the logits' device, nothing read back (no logprobs):
        the draw ``__call__`` makes. For rows that :meth:`reads_on_device`, the values in
        ``output_ids`` are not read, only their number."""
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(params)} sampling params")
        if len(prompt_ids) != len(params) or len(output_ids) != len(params):
            raise ValueError("prompt_ids and output_ids need one entry per row")
        if logits.dtype != torch.float32:
            logits = logits.float()
        min_token_masks = self._min_token_masks(params, output_ids, eos_token_ids, logits.shape[1])
        if not min_token_masks and all(p.greedy and not _has_penalty(p) for p in params):
            return logits.argmax(dim=-1)
        return self._sample(logits, params, prompt_ids, output_ids, min_token_masks)

    # ------------------------------------------------------------------ pieces

    @staticmethod
    def _min_token_masks(
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        eos_token_ids: set[int] | frozenset[int],
        vocab: int,
    ) -> list[tuple[int, list[int]]]:
        masks = []
        for i, p in enumerate(params):
            if len(output_ids[i]) < p.min_tokens:
                banned = sorted({t for t in (*eos_token_ids, *p.stop_token_ids) if 0 <= t < vocab})
                if banned:
                    masks.append((i, banned))
        return masks

    def _sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        min_token_masks: list[tuple[int, list[int]]],
    ) -> torch.Tensor:
        device = logits.device
        penalized = [i for i, p in enumerate(params) if _has_penalty(p)]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not min_token_masks and not penalized and len(random_rows) == len(params):
            # every row random, nothing to mask: straight to the draw (no copy, no argmax)
            return self._sample_random(logits, list(params), [len(o) for o in output_ids])
        x = logits.clone()
        if min_token_masks:
            rows = [i for i, banned in min_token_masks for _ in banned]
            cols = [t for _, banned in min_token_masks for t in banned]
            x[upload(rows, device), upload(cols, device)] = -math.inf

        if penalized:
            self._apply_penalties(x, penalized, params, prompt_ids, output_ids)

        token_ids = x.argmax(dim=-1)  # right for greedy rows; the others are overwritten below
        if random_rows:
            index = upload(random_rows, device)
            sampled = self._sample_random(
                x.index_select(0, index), [params[i] for i in random_rows], [len(output_ids[i]) for i in random_rows]
            )
            token_ids[index] = sampled
        return token_ids

    @staticmethod
    def _apply_penalties(
        x: torch.Tensor,
        rows: list[int],
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
    ) -> None:
        device, vocab = x.device, x.shape[1]
        index = upload(rows, device)
        sub = x[index]
        out_counts = _token_counts([output_ids[i] for i in rows], vocab, device)
        out_seen = out_counts > 0

        rep = [params[i].repetition_penalty for i in rows]
        if any(r != 1.0 for r in rep):
            seen = out_seen | (_token_counts([prompt_ids[i] for i in rows], vocab, device) > 0)
            rep_t = upload(rep, device, torch.float32)[:, None].expand_as(sub)
            rep_t = torch.where(seen, rep_t, torch.ones_like(sub))
            sub = torch.where(sub > 0, sub / rep_t, sub * rep_t)

        freq = [params[i].frequency_penalty for i in rows]
        if any(freq):
            sub -= upload(freq, device, torch.float32)[:, None] * out_counts
        pres = [params[i].presence_penalty for i in rows]
        if any(pres):
            sub -= upload(pres, device, torch.float32)[:, None] * out_seen
        x[index] = sub

    def _sample_random(self, x: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
        device, vocab = x.device, x.shape[1]
        temps = [p.temperature for p in params]
        if len(set(temps)) == 1:  # one temperature for the batch (the usual case): a scalar divide
            x = x / temps[0] if temps[0] != 1.0 else x
        else:
            x = x / upload(temps, device, torch.float32)[:, None]

        min_p = [p.min_p for p in params]
        if any(m > 0 for m in min_p):
            probs = torch.softmax(x, dim=-1)
            floor = probs.amax(dim=-1, keepdim=True) * upload(min_p, device)[:, None]
            x = x.masked_fill(probs < floor, -math.inf)

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p if p.top_p < 1.0 else math.inf for p in params]
        if any(p != math.inf for p in top_p):
            x = _top_k_top_p_sorted(x, top_k, top_p)
        elif any(k < vocab for k in top_k):
            x = _top_k_only(x, top_k)

        probs = torch.softmax(x, dim=-1)
        seeded = [i for i, p in enumerate(params) if p.seed is not None]
        if not seeded:
            return _inverse_cdf(probs, self._global_generator(device))
        noise = torch.empty_like(probs)
        for i in seeded:
            gen = torch.Generator(device=device)
            gen.manual_seed(hash64(params[i].seed, steps[i]))
            noise[i].exponential_(generator=gen)
        token_ids = probs.div(noise.clamp_min_(1e-20)).argmax(dim=-1)
        if len(seeded) < len(params):
            unseeded = upload([i for i, p in enumerate(params) if p.seed is None], device)
            token_ids[unseeded] = _inverse_cdf(probs[unseeded], self._global_generator(device))
        return token_ids

    @staticmethod
    def _fill_logprobs(
        out: SampleOutput,
        raw: torch.Tensor,
        token_ids: torch.Tensor,
        asked: list[int],
        params: Sequence[SamplingParams],
    ) -> None:
        picked = token_ids if len(asked) == len(params) else token_ids[asked]
        chosen = raw.gather(1, picked[:, None])
        logprobs = [math.nan] * len(params)
        for row, lp in zip(asked, chosen.squeeze(1).tolist(), strict=True):
            logprobs[row] = lp
        out.logprobs = logprobs

        top: list[list[tuple[int, float]] | None] = [None] * len(params)
        k_max = min(max(params[i].logprobs or 0 for i in asked), raw.shape[1])
        values: list[list[float]] = []
        indices: list[list[int]] = []
        if k_max > 0:
            values, indices = raw.topk(k_max, dim=-1)
            values, indices = values.tolist(), indices.tolist()
        for j, row in enumerate(asked):
            k = min(params[row].logprobs or 0, raw.shape[1])
            top[row] = list(zip(indices[j][:k], values[j][:k], strict=True)) if k else []
        out.top_logprobs = top


def _inverse_cdf(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw per row of ``probs [B, V]`` from one uniform each: the first token whose
    cumulative probability exceeds it (the exponential race costs a random number per token,
    ~20x more on the CPU; it stays for seeded rows, whose noise must not depend on the batch)."""
    cdf = probs.cumsum(dim=-1)
    # just below the total, so that rounding never lands past the last token with mass
    u = torch.rand((probs.shape[0], 1), generator=gen, device=probs.device) * (cdf[:, -1:] * (1 - 2**-22))
    return (cdf <= u).sum(dim=-1).clamp_max_(probs.shape[1] - 1)


def _top_k_only(x: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    vocab = x.shape[1]
    rows = [i for i, k in enumerate(top_k) if k < vocab]
    index = upload(rows, x.device)
    ks = [top_k[i] for i in rows]
    sub = x[index]
    kth_index = upload(ks, x.device)[:, None] - 1
    kth = sub.topk(max(ks), dim=-1).values.gather(1, kth_index)
    x = x.clone()  # the caller's logits stay as they were
    x[index] = sub.masked_fill(sub < kth, -math.inf)
    return x


def _top_k_top_p_sorted(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    device, vocab = x.device, x.shape[1]
    sorted_x, order = x.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    sorted_x.masked_fill_(ranks >= upload(top_k, device)[:, None], -math.inf)
    probs = torch.softmax(sorted_x, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Keep the shortest prefix whose mass reaches top_p; the best token always survives.
    drop = mass_before >= upload(top_p, device, torch.float32)[:, None]
    drop[:, 0] = False
    sorted_x.masked_fill_(drop, -math.inf)
    return torch.empty_like(x).scatter_(1, order, sorted_x)
