"""Paged KV block bookkeeping: free list, reference counts, reservation leases, prefix cache.

Pure Python, owned by the engine thread. A *lease* holds blocks for a request that has not
arrived yet (a decode instance reserving room for a prefill's KV), and what the request will need
when it comes (``request``: the decode's prompt and sampling); it expires unless claimed, and its
request goes with it.

Automatic prefix caching (vLLM's): a full block whose KV is computed can be *registered* under
the hash of its contents, a chain ``block_hash(parent hash, its token ids)`` that starts from the
hash of ``cache_key`` (whatever changes the KV besides the tokens: model, dtype, quantization, TP
slice), so equal hashes mean equal prefixes. The hash is blake2b over explicit little-endian
bytes, stable across processes. A registered block whose last reference goes stays cached:
it waits in an LRU pool of *cached-free* blocks, counted free, until a hit takes it back
(:meth:`BlockManager.touch`) or :meth:`BlockManager.allocate`, with the plain free list empty,
evicts the least recently freed one. A block that anything references (a sequence, a lease, a
transfer in flight) is never evicted. Every operation is O(1) per block.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import OrderedDict, deque
from dataclasses import dataclass


class NoFreeBlocks(RuntimeError):
    pass


def block_hash(parent: bytes, token_ids) -> bytes:
    """The hash of a full block: its parent's hash (the chain) and its token ids (int64 each)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def root_hash(cache_key: str | bytes) -> bytes:
    """The parent of every chain's first block: the hash of what makes this cache's KV."""
    key = cache_key.encode() if isinstance(cache_key, str) else bytes(cache_key)
    return hashlib.blake2b(b"pdbus-prefix-v1\0" + key, digest_size=16).digest()


@dataclass
class Lease:
    req_id: str
    block_ids: list[int]
    expires_at: float
    request: object = None  # opaque here: what the claimer needs (actors.engine.engine.Reservation)
    num_cached: int = 0  # leading blocks taken from the prefix cache (their KV is there already)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, cache_key: str | bytes = b"", enable_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.leases: dict[str, Lease] = {}
        # prefix cache: hash -> block, block -> hash, and the cached blocks nobody references
        # (least recently freed first)
        self.enable_caching = enable_caching
        self.root = root_hash(cache_key)
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self.num_evicted = 0

    # ------------------------------------------------------------------ counting
    @property
    def num_free(self) -> int:
        """Blocks an allocation can have: plain free ones and cached ones nobody references."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (referenced or not)."""
        return len(self._by_hash)

    @property
    def num_reserved(self) -> int:
        # a snapshot first: stats threads read this while the engine thread edits the dict
        return sum(len(lease.block_ids) for lease in list(self.leases.values()))

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    # ------------------------------------------------------------------ alloc / free
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"need {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently freed cached block
                b, _ = self._cached_free.popitem(last=False)
                del self._by_hash[self._hash_of[b]]
                self._hash_of[b] = None
                self.num_evicted += 1
            self.ref_counts[b] = 1
            out.append(b)
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
        # the tail first: of a sequence's cached blocks the last ones are evicted first (vLLM)
        for b in reversed(block_ids):
            self._check_id(b)  # a negative id would silently index from the end
            if self.ref_counts[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self._hash_of[b] is not None:
                    self._cached_free[b] = None
                else:
                    self._free.append(b)

    def ensure(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow ``block_table`` in place to hold ``num_tokens``; False if blocks ran out."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        block_table.extend(self.allocate(need))
        return True

    # ------------------------------------------------------------------ prefix cache
    def cached(self, h: bytes) -> int | None:
        """The block registered under hash ``h``, or None."""
        return self._by_hash.get(h) if self.enable_caching else None

    def touch(self, b: int) -> None:
        """Take a reference to the cached block ``b`` (a hit); a cached-free one leaves the pool."""
        if self._hash_of[b] is None:
            raise ValueError(f"block {b} is not cached")
        if self.ref_counts[b] == 0:
            del self._cached_free[b]
        self.ref_counts[b] += 1

    def register(self, b: int, h: bytes) -> bool:
        """Register the full, computed block ``b`` (referenced) under hash ``h``; False when
        caching is off, ``b`` already has a hash, or another block holds ``h`` (computed twice at
        once: the first stays cached, ``b`` stays plain)."""
        if self.ref_counts[b] <= 0:
            raise ValueError(f"block {b} is free and cannot be registered")
        if not self.enable_caching or self._hash_of[b] is not None or h in self._by_hash:
            return False
        self._hash_of[b] = h
        self._by_hash[h] = b
        return True

    def hash_of(self, b: int) -> bytes | None:
        return self._hash_of[b]

    # ------------------------------------------------------------------ leases
    def reserve(
        self,
        req_id: str,
        num_tokens: int,
        lease_s: float,
        now: float | None = None,
        request: object = None,
        cached: list[int] = (),
    ) -> list[int] | None:
        """Lease blocks for ``num_tokens`` tokens: ``cached`` (blocks the caller took from the
        prefix cache with :meth:`touch`, whose references the lease now owns) first, fresh ones
        for the rest. None when they do not fit (the references in ``cached`` are given back);
        an existing lease of ``req_id`` is returned as it is (``cached`` given back too)."""
        cached = list(cached)
        if req_id in self.leases:
            self.free(cached)
            return self.leases[req_id].block_ids
        n = self.blocks_for(num_tokens) - len(cached)
        if n < 0 or n > self.num_free:
            self.free(cached)
            return None
        ids = cached + self.allocate(n)
        expires = (time.monotonic() if now is None else now) + lease_s
        self.leases[req_id] = Lease(req_id, ids, expires, request, len(cached))
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
