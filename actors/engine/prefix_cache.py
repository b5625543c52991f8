"""Automatic prefix caching, per sequence: what the scheduler and the engine do with the
block manager's hash-keyed blocks (actors.engine.block_manager).

* **Admission** (:meth:`PrefixCache.match`): a sequence that holds no blocks and has computed
  nothing (new, or preempted) takes the longest run of its full blocks that the cache holds, as
  its block table's first blocks, and starts computing after them. At most
  ``(num_tokens - 1) // block_size`` blocks are taken, so at least the last token is computed
  (the step that computes it samples) and the first position it writes is the first of a block
  of its own: blocks from the cache are shared read-only, never written.
* **A decode's lease** (:meth:`PrefixCache.match_lease`): a decode reserving blocks for a
  prefill's KV matches the coming prompt (prompt + outputs so far) the same way, under the same
  bound, and leases the cached blocks as the lease's first blocks: the prefill writes only the
  blocks after them, and the decode's first written position (the prompt's length) is in a
  block of its own.
* **Registration** (:meth:`PrefixCache.register`): after a step, every block of a sequence that
  is now full of computed KV is registered under its hash, prompt and generated tokens alike.
  A block holding a placeholder (``actors.engine.overlap.PENDING``, negative: a token drawn on
  the device and not read back yet) is not hashed until its token is known.

A sequence keeps the hash chain of its full blocks (``Sequence.block_hashes``, computed once per
block: hashes name contents, not block ids, so they outlive a preemption) and how many of its
blocks registration has seen (``Sequence.num_registered_blocks``). The counters are vLLM's
``prefix_cache_queries`` / ``prefix_cache_hits`` (tokens looked up / found at admission) and
the blocks reused.
"""

from __future__ import annotations

from actors.engine.block_manager import BlockManager, block_hash
from actors.engine.sequence import Sequence


class PrefixCache:
    def __init__(self, blocks: BlockManager):
        self.blocks = blocks
        self.queries = 0  # tokens of admitted sequences looked up
        self.hits = 0  # of them found in the cache
        self.blocks_reused = 0

    @property
    def enabled(self) -> bool:
        return self.blocks.enable_caching

    def _hashes(self, seq: Sequence, num_blocks: int) -> int:
        """Extend ``seq.block_hashes`` to ``num_blocks`` full blocks, stopping at a block that is
        not full or holds a placeholder; returns how many hashes there are (at most ``num_blocks``)."""
        return self._chain(seq.block_hashes, seq.token_ids, num_blocks)

    def _chain(self, hashes: list[bytes], ids: list[int], num_blocks: int) -> int:
        bs = self.blocks.block_size
        parent = hashes[-1] if hashes else self.blocks.root
        while len(hashes) < num_blocks:
            start = len(hashes) * bs
            chunk = ids[start : start + bs]
            if len(chunk) < bs or min(chunk) < 0:
                break
            parent = block_hash(parent, chunk)
            hashes.append(parent)
        return min(len(hashes), num_blocks)

    def match(self, seq: Sequence) -> int:
        """Give ``seq`` (no blocks, nothing computed) the cached blocks of its longest cached
        prefix, leaving at least its last token to compute; returns the tokens found."""
        if not self.enabled:
            return 0
        n = self._hashes(seq, (seq.num_tokens - 1) // self.blocks.block_size)
        table = self._take_run(seq.block_hashes[:n])
        seq.block_table = table
        seq.num_computed_tokens = len(table) * self.blocks.block_size
        seq.num_registered_blocks = len(table)
        return seq.num_computed_tokens

    def match_lease(self, token_ids: list[int], hashes: list[bytes]) -> list[int]:
        """The cached blocks of ``token_ids``' longest cached prefix (the KV a prefill is about to
        compute for them), referenced for a lease, leaving at least the last token's block to
        write: at most ``(len(token_ids) - 1) // block_size`` blocks. ``hashes`` (empty, or the
        chain of a former call) is extended in place; counted as a query like an admission."""
        if not self.enabled or not token_ids:
            return []
        n = self._chain(hashes, token_ids, (len(token_ids) - 1) // self.blocks.block_size)
        return self._take_run(hashes[:n])

    def _take_run(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the leading run of ``hashes``, each referenced (``touch``)."""
        table = []
        for h in hashes:
            b = self.blocks.cached(h)
            if b is None:
                break
            table.append(b)
        for b in table:
            self.blocks.touch(b)
        return table

    def leased(self, num_tokens: int, num_blocks: int) -> None:
        """A lease of ``num_tokens`` tokens was granted with ``num_blocks`` cached blocks."""
        if self.enabled:
            self.queries += num_tokens
            self.hits += num_blocks * self.blocks.block_size
            self.blocks_reused += num_blocks

    def unmatch(self, seq: Sequence) -> None:
        """Undo :meth:`match` for a sequence that was not admitted after all (it waits on)."""
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def admitted(self, seq: Sequence, hit_tokens: int) -> None:
        if self.enabled:
            self.queries += seq.num_tokens
            self.hits += hit_tokens
            self.blocks_reused += hit_tokens // self.blocks.block_size

    def register(self, seq: Sequence, upto: int | None = None) -> None:
        """Register ``seq``'s blocks that are full of computed KV (of positions below ``upto``
        too, when given: what a landed step computed) and whose tokens are known."""
        if not self.enabled:
            return
        done = seq.num_computed_tokens if upto is None else min(upto, seq.num_computed_tokens)
        full = min(done // self.blocks.block_size, len(seq.block_table))
        if full <= seq.num_registered_blocks:
            return
        n = self._hashes(seq, full)
        for i in range(seq.num_registered_blocks, n):
            self.blocks.register(seq.block_table[i], seq.block_hashes[i])
        seq.num_registered_blocks = max(seq.num_registered_blocks, n)

    def stats(self) -> dict:
        return {
            "prefix_cache_queries": self.queries,
            "prefix_cache_hits": self.hits,
            "prefix_cache_blocks_reused": self.blocks_reused,
            "prefix_cache_blocks": self.blocks.num_cached,
            "prefix_cache_evictions": self.blocks.num_evicted,
        }
