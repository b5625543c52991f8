"""The router's instance choice: cache-aware routing over an approximate prefix index (SGLang's
``cache_aware`` policy), power of two choices, or round robin (``--router-policy``).

:class:`PrefixIndex` remembers, per instance, the block hash chains of the token sequences the
router sent there (prompts, and a finished request's prompt + outputs on its decode): what that
instance's prefix cache most likely holds. A chain is computed from the token ids with the
instance's block size (``Hello.kv.block_size``) and only has to agree with itself inside this
router (Python's hash of the parent and the block's ids). Each instance's entry is an LRU bounded
by its KV cache's block count (it cannot cache more) and ``max_blocks``; an instance that is lost
or says Hello again is forgotten.

:class:`Routing` picks among the candidates ``PDBackend`` hands it (alive, of one role, not
excluded), by policy:

* ``cache_aware`` (the default): a decode (or mixed instance) with the longest indexed prefix of
  the request's tokens (``cache_hit``) unless its load exceeds the least loaded candidate's by
  more than ``balance_abs_threshold`` and more than ``balance_rel_threshold`` times (SGLang's two
  thresholds): then the least loaded (``load_balance``); no prefix anywhere: the least loaded
  (``no_match``), ties to the instance with the smaller index (more room for new prefixes). A
  prefill by the tokens it would compute before this prompt's first token — the prompt's
  uncached part plus the prompt tokens in flight there — so that a prefix every request shares
  (one system prompt) is spread over the prefills holding it rather than queued on one: with
  SGLang's request-count thresholds, 16 conversations on one system prompt all went to one of two
  prefills and turn TTFT p50 was 1.9x round robin's (bench/prefix_bench.py, CPU box).
* ``power_of_two``: two candidates at random, the better by the role's score (``power_of_two``).
* ``round_robin``: each candidate in turn (``round_robin``).

Loads and scores per role: a decode's load is its sequences (running + waiting, and those the
router started since), its score free blocks less the router's reservations, then fewest
sequences; a prefill's load is the prefills the router has in flight there, its score their
tokens; a mixed instance's both are its sequences. Every decision is counted by role and reason
(``decisions``: the router's ``pdbus:router_decisions_total``).
"""

from __future__ import annotations

import enum
import random
from collections import Counter, OrderedDict
from collections.abc import Callable

from pdbus.actor import Peer
from pdbus.messages import KVLayout

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}  # native/kv_cache.DTYPES, without torch


class RouterPolicy(enum.StrEnum):
    CACHE_AWARE = "cache_aware"
    POWER_OF_TWO = "power_of_two"
    ROUND_ROBIN = "round_robin"


def block_bytes(kv: KVLayout | None) -> int:
    """Bytes of one block's K and V over every layer and every KV head (all TP ranks)."""
    if kv is None:
        return 0
    heads = kv.total_kv_heads or kv.num_kv_heads
    return 2 * kv.num_layers * heads * kv.block_size * kv.head_dim * _ITEMSIZE.get(kv.dtype, 2)


def chain(tokens: list[int], block_size: int) -> list[int]:
    """The router's hash chain of the full blocks of ``tokens``."""
    parent = hash(("pdbus-router", block_size))
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        out.append(parent)
    return out


class PrefixIndex:
    """Per instance, an LRU of the block hashes the router sent there."""

    def __init__(self, max_blocks: int = 1 << 17):
        self.max_blocks = max_blocks
        self._blocks: dict[bytes, OrderedDict[int, None]] = {}

    @staticmethod
    def block_size(peer: Peer) -> int:
        kv = peer.hello.kv
        return kv.block_size if kv is not None and kv.block_size > 0 else 0

    def size(self, ident: bytes) -> int:
        entry = self._blocks.get(ident)
        return len(entry) if entry is not None else 0

    def match(self, peer: Peer, tokens: list[int] | None, hashes: dict[int, list[int]]) -> int:
        """Leading full blocks of ``tokens`` indexed for ``peer`` (``hashes``: chains by block
        size, filled as needed, shared by the calls of one decision)."""
        entry = self._blocks.get(peer.identity)
        bs = self.block_size(peer)
        if not entry or not tokens or not bs:
            return 0
        n = 0
        for h in self._chain(tokens, bs, hashes):
            if h not in entry:
                break
            n += 1
        return n

    def record(self, peer: Peer, tokens: list[int]) -> None:
        """``peer`` is about to hold (or holds) the KV of ``tokens``' full blocks."""
        bs = self.block_size(peer)
        if not bs or len(tokens) < bs:
            return
        entry = self._blocks.setdefault(peer.identity, OrderedDict())
        for h in chain(tokens, bs):
            entry[h] = None
            entry.move_to_end(h)
        kv = peer.hello.kv
        cap = min(self.max_blocks, kv.num_blocks) if kv is not None and kv.num_blocks > 0 else self.max_blocks
        while len(entry) > cap:
            entry.popitem(last=False)

    def forget(self, ident: bytes) -> None:
        self._blocks.pop(ident, None)

    @staticmethod
    def _chain(tokens: list[int], bs: int, hashes: dict[int, list[int]]) -> list[int]:
        if bs not in hashes:
            hashes[bs] = chain(tokens, bs)
        return hashes[bs]


class Routing:
    """Picks an instance for a request by policy (see the module docstring); ``load_of(ident)``
    is what the router dispatched to an instance (actors.router.flow.InstanceLoad)."""

    def __init__(
        self,
        policy: RouterPolicy | str = RouterPolicy.CACHE_AWARE,
        balance_abs_threshold: float = 16,
        balance_rel_threshold: float = 1.5,
        index: PrefixIndex | None = None,
        load_of: Callable | None = None,  # PDBackend binds its own
    ):
        self.load_of = load_of
        self.policy = RouterPolicy(policy)
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.index = index or PrefixIndex()
        self.decisions: Counter[tuple[str, str]] = Counter()  # (role, reason) -> decisions
        self._turn: Counter[str] = Counter()

    # ----------------------------------------------------------------- per role: load and score
    def load(self, peer: Peer) -> float:
        """How busy ``peer`` is, in the units of the balance thresholds (requests)."""
        mine = self.load_of(peer.identity)
        if peer.hello.role == "prefill":
            return mine.prefills
        return peer.load.running + peer.load.waiting + mine.active

    def score(self, peer: Peer) -> tuple:
        """Lower is better: the power-of-two choice's order and the tie-break of the least loaded."""
        mine = self.load_of(peer.identity)
        if peer.hello.role == "prefill":
            return (mine.pending_prefill_tokens,)
        if peer.hello.role == "decode":
            return (-(peer.load.free_blocks - mine.reserved_blocks), peer.load.running + mine.active)
        return (self.load(peer),)

    # ----------------------------------------------------------------- the choice
    def choose(self, role: str, cands: list[Peer], tokens: list[int] | None = None) -> tuple[Peer | None, str]:
        """(the instance for a request of ``tokens`` among ``cands``, why); nothing is counted."""
        if not cands:
            return None, ""
        if self.policy is RouterPolicy.ROUND_ROBIN:
            ordered = sorted(cands, key=lambda p: p.identity)
            return ordered[self._turn[role] % len(ordered)], "round_robin"
        if self.policy is RouterPolicy.POWER_OF_TWO:
            two = random.sample(cands, 2) if len(cands) > 2 else cands
            return min(two, key=self.score), "power_of_two"
        hashes: dict[int, list[int]] = {}
        matched = {p.identity: self.index.match(p, tokens, hashes) for p in cands}
        if role == "prefill":
            return self._choose_prefill(cands, tokens or [], matched)
        least = min(cands, key=lambda p: (self.load(p), self.score(p), self.index.size(p.identity)))
        top = max(matched.values())
        if top == 0:
            return least, "no_match"
        best = min((p for p in cands if matched[p.identity] == top), key=lambda p: (self.load(p), self.score(p)))
        gap, low = self.load(best) - self.load(least), self.load(least)
        if gap > self.balance_abs_threshold and self.load(best) > low * self.balance_rel_threshold:
            return least, "load_balance"
        return best, "cache_hit"

    def _choose_prefill(self, cands: list[Peer], tokens: list[int], matched: dict[bytes, int]) -> tuple[Peer, str]:
        """The prefill that would reach this prompt's first token soonest: fewest tokens to
        compute, its uncached part plus the prompt tokens the router has in flight there. A
        prefix shared by every request (a system prompt) then spreads over the prefills that hold
        it instead of piling onto the first, and a conversation's history outweighs a short queue."""

        def cost(p: Peer) -> tuple:
            uncached = max(0, len(tokens) - matched[p.identity] * self.index.block_size(p))
            return (uncached + self.load_of(p.identity).pending_prefill_tokens, self.load(p), p.identity)

        best = min(cands, key=cost)
        top = max(matched.values())
        if top == 0:
            return best, "no_match"
        return best, "cache_hit" if matched[best.identity] == top else "load_balance"

    def pick(self, role: str, cands: list[Peer], tokens: list[int] | None = None) -> Peer | None:
        """:meth:`choose`, counted (a round robin's turn moves on)."""
        peer, reason = self.choose(role, cands, tokens)
        if peer is not None:
            self.counted(role, reason)
        return peer

    def counted(self, role: str, reason: str) -> None:
        self.decisions[(role, reason)] += 1
        self._turn[role] += 1

    # ----------------------------------------------------------------- the index
    def record(self, peer: Peer | None, tokens: list[int]) -> None:
        if peer is not None and self.policy is RouterPolicy.CACHE_AWARE:
            self.index.record(peer, tokens)

    def forget(self, ident: bytes) -> None:
        self.index.forget(ident)
