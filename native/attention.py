"""Paged attention on the CPU in plain torch (the reference path; Triton replaces it on the GPU).

The cache of one layer is ``[num_blocks, kv_heads, block_size, head_dim]``; token ``t`` of a step
lives at slot ``slot_mapping[t] = block * block_size + offset``. A sequence's context is gathered
from its block table, so a step mixes decode rows (one query each) and prefill / chunked-prefill
rows (queries at positions ``ctx - q_len .. ctx - 1`` attending causally over the whole context).

Decode rows are the fast path: one gather of every row's blocks, one masked SDPA call. Prefill
rows are padded into one SDPA call when that wastes little, else run one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attn_meta import AttnMeta


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, kv_heads, head_dim] -> caches at ``slot_mapping`` (rows with slot -1 are skipped)."""
    if slot_mapping.numel() == 0:
        return
    if int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    block_size = k_cache.shape[2]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    k_cache[blocks, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v.to(v_cache.dtype)


def _gather_context(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """cache [NB, kvh, bs, hd], tables [B, nb] -> [B, kvh, nb*bs, hd]."""
    B, nb = tables.shape
    _, kvh, bs, hd = cache.shape
    g = cache.index_select(0, tables.reshape(-1)).view(B, nb, kvh, bs, hd)  # index_select: 5x faster
    return g.transpose(1, 2).reshape(B, kvh, nb * bs, hd)


@dataclass
class _Group:
    """Padded rows of a step that go through one SDPA call."""

    seq_ids: list[int]
    tok_index: torch.Tensor  # [B, Q] token rows to gather (padding repeats a valid row)
    tok_valid: torch.Tensor  # [B, Q] bool
    tables: torch.Tensor  # [B, nb]
    mask: torch.Tensor | None  # [B, 1, Q, S] bool, True = attend
    flat_tokens: torch.Tensor  # [n] token rows in the order of tok_valid's True entries
    causal_len: int = 0  # > 0: every row is a fresh prompt of this length (is_causal, no mask)


@dataclass
class AttnPlan:
    """Index tensors derived once per step from an AttnMeta and shared by all layers."""

    num_tokens: int
    all_decode: bool
    groups: list[_Group]
    singles: list[tuple[int, int, int, int]]  # (seq, token start, q_len, ctx_len), causal-only rows


def _block_count(ctx: int, block_size: int) -> int:
    return max(1, -(-ctx // block_size))


def _decode_group(meta: AttnMeta, seqs: list[int], device) -> _Group:
    bs = meta.block_size
    ctx = [meta.context_lens[i] for i in seqs]
    nb = _block_count(max(ctx), bs)
    sel = torch.tensor(seqs, dtype=torch.int64, device=device)
    tables = (
        meta.block_tables.index_select(0, sel)[:, :nb]
        if len(seqs) != len(meta.query_lens)
        else (meta.block_tables[:, :nb])
    )
    ctx_t = torch.tensor(ctx, dtype=torch.int64, device=device)
    mask = (torch.arange(nb * bs, device=device)[None, :] < ctx_t[:, None])[:, None, None, :]
    starts = meta.query_start_loc.index_select(0, sel)
    return _Group(
        seq_ids=seqs,
        tok_index=starts[:, None],
        tok_valid=torch.ones(len(seqs), 1, dtype=torch.bool, device=device),
        tables=tables,
        mask=mask,
        flat_tokens=starts,
    )


def _prefill_group(meta: AttnMeta, seqs: list[int], device) -> _Group:
    bs = meta.block_size
    qlens = torch.tensor([meta.query_lens[i] for i in seqs], dtype=torch.int64, device=device)
    ctx_t = torch.tensor([meta.context_lens[i] for i in seqs], dtype=torch.int64, device=device)
    max_q = max(meta.query_lens[i] for i in seqs)
    nb = _block_count(max(meta.context_lens[i] for i in seqs), bs)
    sel = torch.tensor(seqs, dtype=torch.int64, device=device)
    starts = meta.query_start_loc.index_select(0, sel)
    j = torch.arange(max_q, device=device)[None, :]
    tok_valid = j < qlens[:, None]
    tok_index = starts[:, None] + torch.minimum(j, qlens[:, None] - 1)
    # query j of a row sits at position ctx - q_len + j and sees keys 0..that position
    qpos = (ctx_t - qlens)[:, None] + torch.minimum(j, qlens[:, None] - 1)  # [B, Q]
    kpos = torch.arange(nb * bs, device=device)
    mask = (kpos[None, None, :] <= qpos[:, :, None])[:, None]  # [B, 1, Q, S]
    return _Group(
        seq_ids=seqs,
        tok_index=tok_index,
        tok_valid=tok_valid,
        tables=meta.block_tables.index_select(0, sel)[:, :nb],
        mask=mask,
        flat_tokens=tok_index[tok_valid],
    )


def plan_attention(meta: AttnMeta, skip: frozenset[int] = frozenset()) -> AttnPlan:
    """Build the per-step index tensors (call once per forward, pass to every layer); rows in
    ``skip`` are left out (another path computes them: native/cpu's kernel)."""
    device = meta.block_tables.device
    n = len(meta.query_lens)
    num_tokens = sum(meta.query_lens)
    if n == len(skip):
        return AttnPlan(num_tokens, False, [], [])
    if meta.is_decode and not skip:
        return AttnPlan(num_tokens, True, [_decode_group(meta, list(range(n)), device)], [])
    decode = [i for i in range(n) if meta.query_lens[i] == 1 and i not in skip]
    prefill = [i for i in range(n) if meta.query_lens[i] > 1 and i not in skip]
    groups = [_decode_group(meta, decode, device)] if decode else []
    # rows without cached prefix run alone with is_causal (no mask, no gather waste)
    fresh = [i for i in prefill if meta.context_lens[i] == meta.query_lens[i]]
    rest = [i for i in prefill if meta.context_lens[i] != meta.query_lens[i]]
    if len(fresh) > 1 and len({meta.query_lens[i] for i in fresh}) == 1:
        grp = _prefill_group(meta, fresh, device)
        grp.causal_len = meta.query_lens[fresh[0]]
        grp.mask = None
        groups.append(grp)
        fresh = []
    if len(fresh) > 1:
        max_q = max(meta.query_lens[i] for i in fresh)
        if 2 * sum(meta.query_lens[i] for i in fresh) >= len(fresh) * max_q:
            rest += fresh  # little padding: batch them with the masked path
            fresh = []
    qsl = meta.query_start_loc.tolist()
    singles = [(i, qsl[i], meta.query_lens[i], meta.context_lens[i]) for i in fresh]
    if rest:
        max_q = max(meta.query_lens[i] for i in rest)
        if len(rest) == 1 or 2 * sum(meta.query_lens[i] for i in rest) >= len(rest) * max_q:
            groups.append(_prefill_group(meta, rest, device))
        else:
            groups.extend(_prefill_group(meta, [i], device) for i in rest)
    return AttnPlan(num_tokens, False, groups, singles)


def _sdpa(q, k, v, mask, scale, causal=False):
    """q [B, nh, Q, hd], k/v [B, kvh, S, hd] -> [B, nh, Q, hd]; mask [B, 1, Q|1, S] (True = attend)."""
    B, nh, Q, hd = q.shape
    kvh = k.shape[1]
    if nh != kvh and Q == 1:
        # decode: the g query heads of a kv head become g query rows (2x faster than enable_gqa)
        out = F.scaled_dot_product_attention(
            q.reshape(B, kvh, nh // kvh, hd), k, v, attn_mask=mask, scale=scale
        )
        return out.view(B, nh, 1, hd)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=nh != kvh
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    num_kv_heads: int,
    plan: AttnPlan | None = None,
) -> torch.Tensor:
    """q [T, nh, hd] -> [T, nh, hd]: each row of the plan attends over its sequence's paged
    context (the rows a plan skips are left unwritten)."""
    if plan is None:
        plan = plan_attention(meta)
    T, nh, hd = q.shape
    if T == 0:
        return q.new_empty((0, nh, hd))
    if plan.all_decode:
        grp = plan.groups[0]
        k = _gather_context(k_cache, grp.tables).to(q.dtype)
        v = _gather_context(v_cache, grp.tables).to(q.dtype)
        out = _sdpa(q[:, :, None, :], k, v, grp.mask, scale)  # q [B, nh, 1, hd]
        return out.view(T, nh, hd)
    out = torch.empty_like(q)
    for grp in plan.groups:
        k = _gather_context(k_cache, grp.tables).to(q.dtype)
        v = _gather_context(v_cache, grp.tables).to(q.dtype)
        qg = q[grp.tok_index].transpose(1, 2)  # [B, nh, Q, hd]
        if grp.causal_len:
            k, v = k[:, :, : grp.causal_len], v[:, :, : grp.causal_len]
        o = _sdpa(qg, k, v, grp.mask, scale, causal=grp.causal_len > 0).transpose(1, 2)  # [B, Q, nh, hd]
        out[grp.flat_tokens] = o[grp.tok_valid]
    bs = meta.block_size
    for seq, start, qlen, ctx in plan.singles:
        nb = _block_count(ctx, bs)
        table = meta.block_tables[seq, :nb]
        k = _gather_context(k_cache, table[None])[:, :, :ctx].to(q.dtype)
        v = _gather_context(v_cache, table[None])[:, :, :ctx].to(q.dtype)
        qs = q[start : start + qlen].transpose(0, 1)[None]  # [1, nh, Q, hd]
        out[start : start + qlen] = _sdpa(qs, k, v, None, scale, causal=True)[0].transpose(0, 1)
    return out
