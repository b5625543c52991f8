"""Block-run arithmetic shared by the backends: a ``WriteOp`` checked against both pools, runs of
consecutive blocks, byte spans of a cache buffer, and the torch copy of one layer's blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from native.transfer.base import TransferError, WriteOp
from pdbus.messages import KVLayout

# Up to this many runs of consecutive blocks are copied slice by slice (no temporary); longer
# block lists use one gather and one scatter.
_MAX_SLICE_RUNS = 4


@dataclass(frozen=True)
class ResolvedOp:
    """A validated WriteOp: head ranges filled in, block ids checked against both pools."""

    layer: int
    src_blocks: list[int]
    dst_blocks: list[int]
    src_heads: tuple[int, int]
    dst_heads: tuple[int, int]
    num_layers: int = 1  # layers [layer, layer + num_layers)

    def layers(self) -> list[ResolvedOp]:
        """One op per layer (for backends that copy a layer at a time)."""
        if self.num_layers == 1:
            return [self]
        return [ResolvedOp(i, self.src_blocks, self.dst_blocks, self.src_heads, self.dst_heads) for i in self.layer_range]

    @property
    def layer_range(self) -> range:
        return range(self.layer, self.layer + self.num_layers)

    @property
    def num_heads(self) -> int:
        return self.src_heads[1] - self.src_heads[0]


def resolve_op(op: WriteOp, local: KVLayout, peer: KVLayout, peer_id: str) -> ResolvedOp:
    def heads(rng: tuple[int, int] | None, total: int, side: str) -> tuple[int, int]:
        start, stop = (0, total) if rng is None else (int(rng[0]), int(rng[1]))
        if not 0 <= start < stop <= total:
            raise TransferError(f"write to {peer_id}: {side} heads {rng} outside [0, {total})")
        return start, stop

    src_heads = heads(op.src_heads, local.num_kv_heads, "src")
    dst_heads = heads(op.dst_heads, peer.num_kv_heads, "dst")
    if src_heads[1] - src_heads[0] != dst_heads[1] - dst_heads[0]:
        raise TransferError(f"write to {peer_id}: src heads {src_heads} and dst heads {dst_heads} differ in count")
    check_layers(op, local.num_layers, peer_id)
    src_blocks, dst_blocks = [int(b) for b in op.src_blocks], [int(b) for b in op.dst_blocks]
    if len(src_blocks) != len(dst_blocks):
        raise TransferError(
            f"write to {peer_id}: {len(src_blocks)} src blocks but {len(dst_blocks)} dst blocks"
        )
    for blocks, limit, side in ((src_blocks, local.num_blocks, "src"), (dst_blocks, peer.num_blocks, "dst")):
        if blocks and not (0 <= min(blocks) and max(blocks) < limit):
            raise TransferError(f"write to {peer_id}: {side} block id outside [0, {limit})")
    return ResolvedOp(op.layer, src_blocks, dst_blocks, src_heads, dst_heads, op.num_layers)


def check_layers(op: WriteOp, num_layers: int, peer_id: str) -> None:
    if op.num_layers < 1 or not 0 <= op.layer <= op.layer + op.num_layers - 1 < num_layers:
        last = op.layer + op.num_layers - 1
        what = f"layer {op.layer}" if op.num_layers == 1 else f"layers {op.layer}..{last}"
        raise TransferError(f"write to {peer_id}: {what} outside [0, {num_layers})")


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) runs where both block lists advance by one together."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            s0, d0, n = runs[-1]
            runs[-1] = (s0, d0, n + 1)
        else:
            runs.append((s, d, 1))
    return runs


def region_spans(
    layout: KVLayout, elem_size: int, layer: int, kind: int, blocks, heads: tuple[int, int]
) -> list[tuple[int, int]]:
    """Byte (offset, length) spans of a cache buffer holding ``heads`` of ``blocks`` of one
    layer's K (kind 0) or V (kind 1). A block's head range is contiguous; consecutive whole
    blocks merge into one span."""
    head_bytes = layout.block_size * layout.head_dim * elem_size
    block_bytes = layout.num_kv_heads * head_bytes
    h0, h1 = heads
    length = (h1 - h0) * head_bytes
    base = (layer * 2 + kind) * layout.num_blocks * block_bytes + h0 * head_bytes
    whole = h1 - h0 == layout.num_kv_heads
    spans: list[tuple[int, int]] = []
    for b in blocks:
        start = base + int(b) * block_bytes
        if whole and spans and spans[-1][0] + spans[-1][1] == start:
            spans[-1] = (spans[-1][0], spans[-1][1] + length)
        else:
            spans.append((start, length))
    return spans


def block_index(op: ResolvedOp, src_device: torch.device, dst_device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``op``'s source and destination block ids as index tensors on each side's device."""
    idx = torch.tensor([op.src_blocks, op.dst_blocks], dtype=torch.long)
    if src_device.type == "cuda":  # a pinned, asynchronous upload: a pageable one would wait for the stream
        idx = idx.pin_memory()
    return idx[0].to(src_device, non_blocking=True), idx[1].to(dst_device, non_blocking=True)


def copy_blocks(
    src: torch.Tensor, dst: torch.Tensor, op: ResolvedOp, index: tuple[torch.Tensor, torch.Tensor] | None = None
) -> int:
    """Copy K and V of ``op``'s blocks from one cache buffer into another; returns bytes.

    A few runs of consecutive blocks are copied as slices; otherwise one gather and one
    scatter (K and V together), with ``index`` from ``block_index`` when the caller reuses it.
    """
    (s0, s1), (d0, d1) = op.src_heads, op.dst_heads
    src_layer = src[op.layer][:, :, s0:s1]  # [2, blocks, heads, block_size, head_dim]
    dst_layer = dst[op.layer][:, :, d0:d1]
    runs = block_runs(op.src_blocks, op.dst_blocks)
    if len(runs) <= _MAX_SLICE_RUNS:
        for s, d, n in runs:
            dst_layer[:, d : d + n].copy_(src_layer[:, s : s + n])
    else:
        src_idx, dst_idx = index if index is not None else block_index(op, src.device, dst.device)
        gathered = src_layer.index_select(1, src_idx)
        if gathered.device != dst.device:  # another GPU of this host: one peer copy, then scatter
            gathered = gathered.to(dst.device, non_blocking=True)
        dst_layer.index_copy_(1, dst_idx, gathered)
    per_block = 2 * (s1 - s0) * src.shape[4] * src.shape[5] * src.element_size()
    return per_block * len(op.src_blocks)
