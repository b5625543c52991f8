"""Paged KV block bookkeeping: free list, reference counts and reservation leases.

Pure Python, owned by the engine thread. A *lease* holds blocks for a request that has not
arrived yet (a decode instance reserving room for a prefill's KV), and what the request will need
when it comes (``request``: the decode's prompt and sampling); it expires unless claimed, and its
request goes with it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


class NoFreeBlocks(RuntimeError):
    pass


@dataclass
class Lease:
    req_id: str
    block_ids: list[int]
    expires_at: float
    request: object = None  # opaque here: what the claimer needs (actors.engine.engine.Reservation)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.leases: dict[str, Lease] = {}

    # ------------------------------------------------------------------ counting
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_reserved(self) -> int:
        # a snapshot first: stats threads read this while the engine thread edits the dict
        return sum(len(lease.block_ids) for lease in list(self.leases.values()))

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    # ------------------------------------------------------------------ alloc / free
    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocks(f"need {n} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self.ref_counts[b] = 1
        return out

    def _check_id(self, b: int) -> None:
        if not 0 <= b < self.num_blocks:
            raise ValueError(f"block id {b} outside [0, {self.num_blocks})")

    def share(self, block_ids: list[int]) -> None:
        for b in block_ids:
            self._check_id(b)
            if self.ref_counts[b] <= 0:
                raise ValueError(f"block {b} is free and cannot be shared")
            self.ref_counts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        for b in block_ids:
            self._check_id(b)  # a negative id would silently index from the end
            if self.ref_counts[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)

    def ensure(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow ``block_table`` in place to hold ``num_tokens``; False if blocks ran out."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        block_table.extend(self.allocate(need))
        return True

    # ------------------------------------------------------------------ leases
    def reserve(
        self, req_id: str, num_tokens: int, lease_s: float, now: float | None = None, request: object = None
    ) -> list[int] | None:
        if req_id in self.leases:
            return self.leases[req_id].block_ids
        n = self.blocks_for(num_tokens)
        if n > len(self._free):
            return None
        ids = self.allocate(n)
        self.leases[req_id] = Lease(req_id, ids, (time.monotonic() if now is None else now) + lease_s, request)
        return ids

    def claim(self, req_id: str) -> Lease | None:
        """The lease ends: its blocks now belong to a sequence (which frees them when it ends)."""
        return self.leases.pop(req_id, None)

    def release(self, req_id: str) -> bool:
        lease = self.leases.pop(req_id, None)
        if lease is None:
            return False
        self.free(lease.block_ids)
        return True

    def next_expiry(self) -> float | None:
        """When the first lease runs out (``time.monotonic`` clock); None without leases."""
        return min((lease.expires_at for lease in self.leases.values()), default=None)

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now  # an explicit 0.0 is a time too
        gone = [r for r, lease in self.leases.items() if lease.expires_at <= now]
        for r in gone:
            self.release(r)
        return gone
