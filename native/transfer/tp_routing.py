"""KV between different TP sizes: which of this rank's heads go to which decode rank, the engine
that writes them as head slices, and a handle over several parts.

A decode with TP > 1 publishes a ``TPEndpoint`` (one endpoint per rank, each layout naming the
rank's head range ``[head_start, head_start + num_kv_heads)``). ``route_heads`` intersects the
local head range with each rank's: every overlap is one write of a head slice. ``TPTransfer`` is
the prefill's engine: it opens each overlapping decode rank as a peer ``<peer>#<rank>`` of the
backend engine, writes every layer's slices as the prefill goes, and at commit lets the
prefill's other TP ranks write theirs (``RankFanOut``, the TP group's side). The handle it
returns is ``all_of`` the parts, completed through their callbacks: no thread waits on a part.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Protocol

from native.transfer.base import TransferEngine, TransferError, TransferHandle, WriteOp
from pdbus.messages import Endpoint, KVLayout, RankEndpoint, SenderEndpoint, TPEndpoint


def head_overlaps(src_start: int, src_count: int, dst_start: int, dst_count: int):
    """Overlap of two global head ranges as (src local range, dst local range), or None."""
    lo, hi = max(src_start, dst_start), min(src_start + src_count, dst_start + dst_count)
    if lo >= hi:
        return None
    return (lo - src_start, hi - src_start), (lo - dst_start, hi - dst_start)


class RankWrite(NamedTuple):
    """One decode rank that receives a slice of this rank's heads."""

    rank: int  # index in the destination's ranks
    endpoint: RankEndpoint
    src_heads: tuple[int, int]
    dst_heads: tuple[int, int]


def rank_peer(peer_id: str, rank: int) -> str:
    """The backend peer id of rank ``rank`` of decode ``peer_id``."""
    return f"{peer_id}#{rank}"


def route_heads(local: KVLayout, dest: Endpoint, sends: bool = True) -> list[RankWrite]:
    """The writes that carry this rank's KV heads into ``dest`` (one rank, or a TP decode's).
    ``sends`` False: this rank holds a replica of heads a lower rank sends (nothing to write)."""
    if isinstance(dest, SenderEndpoint):
        raise TransferError(f"a prefill's endpoint (host {dest.host}) cannot be written to")
    if not sends:
        return []
    ranks = dest.ranks if isinstance(dest, TPEndpoint) else [dest]
    out = []
    for i, ep in enumerate(ranks):
        lay = ep.layout
        ov = head_overlaps(local.head_start, local.num_kv_heads, lay.head_start, lay.num_kv_heads)
        if ov is not None:
            out.append(RankWrite(i, ep, ov[0], ov[1]))
    return out


def all_of(req_id: str, parts: list[TransferHandle]) -> TransferHandle:
    """A handle that completes once every part has: done when all are (bytes summed, seconds the
    longest), failed with the first failed part's error (in part order) otherwise. It waits for
    every part even when one fails early, so that no byte of the request lands after it
    completes. Driven by the parts' callbacks, on the thread completing the last part."""
    if len(parts) == 1:
        return parts[0]
    combined = TransferHandle(req_id)
    remaining = [len(parts)]
    lock = threading.Lock()

    def on_part(_part: TransferHandle) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        errors = [p.error for p in parts if p.error is not None]
        if errors:
            combined.set_failed(errors[0])
        else:
            combined.set_done(sum(p.nbytes for p in parts), max(p.seconds for p in parts))

    if not parts:
        combined.set_done()
    for part in parts:
        part.add_done_callback(on_part)
    return combined


class RankFanOut(Protocol):
    """The prefill's other TP ranks (native/parallel/group.py): told at commit to write their
    slices of a request; one handle per rank, completed when its report comes in."""

    def start(
        self, req_id: str, protocol: str, peer_id: str, endpoint: Endpoint, src_blocks: list[int], dst_blocks: list[int]
    ) -> list[TransferHandle]: ...

    def abort(self, req_id: str) -> None: ...


class TPTransfer(TransferEngine):
    """The prefill side's engine: this rank's heads routed onto the decode's ranks over the
    backend engine ``local``; with TP > 1 the other ranks write theirs through ``ranks``."""

    def __init__(self, local: TransferEngine, ranks: RankFanOut | None = None):
        super().__init__(local.cache, local.host)
        self.name = local.name
        self.local = local
        self.ranks = ranks
        self._layout = local.cache.layout()
        self._plans: dict[str, tuple[Endpoint, list[RankWrite]]] = {}  # peer -> (endpoint, writes)
        self._blocks: dict[str, tuple[list[int], list[int]]] = {}  # req -> (src, dst) of its writes

    def endpoint(self) -> Endpoint:
        return self.local.endpoint()

    def open_peer(self, peer_id: str, endpoint: Endpoint) -> None:
        plan = self._plans.get(peer_id)
        if plan is None or plan[0] != endpoint:
            plan = (endpoint, route_heads(self._layout, endpoint))
        for w in plan[1]:
            self.local.open_peer(rank_peer(peer_id, w.rank), w.endpoint)
        self._plans[peer_id] = plan

    def write(self, req_id: str, peer_id: str, op: WriteOp) -> None:
        for w in self._plan(peer_id)[1]:
            self.local.write(
                req_id, rank_peer(peer_id, w.rank), WriteOp(op.layer, op.src_blocks, op.dst_blocks, w.src_heads, w.dst_heads, op.num_layers)
            )
        self._blocks[req_id] = (op.src_blocks, op.dst_blocks)

    def commit(self, req_id: str, peer_id: str) -> TransferHandle:
        endpoint, writes = self._plan(peer_id)
        blocks = self._blocks.pop(req_id, None)
        if blocks is None:
            raise TransferError(f"{self.name}: commit of {req_id} to {peer_id} before any write")
        parts = [self.local.commit(req_id, rank_peer(peer_id, w.rank)) for w in writes]
        if self.ranks is not None:
            parts += self.ranks.start(req_id, self.name, peer_id, endpoint, list(blocks[0]), list(blocks[1]))
        return all_of(req_id, parts)

    def abort(self, req_id: str) -> None:
        self._blocks.pop(req_id, None)
        self.local.abort(req_id)
        if self.ranks is not None:
            self.ranks.abort(req_id)

    def forget(self, req_id: str) -> None:
        self._blocks.pop(req_id, None)
        self.local.forget(req_id)  # the other ranks get a request only at its commit

    def close_peer(self, peer_id: str) -> None:
        plan = self._plans.pop(peer_id, None)
        for w in plan[1] if plan else []:
            self.local.close_peer(rank_peer(peer_id, w.rank))

    def close(self) -> None:
        self.local.close()

    def _plan(self, peer_id: str) -> tuple[Endpoint, list[RankWrite]]:
        plan = self._plans.get(peer_id)
        if plan is None:
            raise TransferError(f"{self.name}: peer {peer_id} is not open (call open_peer first)")
        return plan
