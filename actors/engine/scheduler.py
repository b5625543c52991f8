"""Continuous batching with chunked prefill and preemption by recompute.

Each step: running sequences first (a decode token each, or the next chunk of a prompt), then
waiting ones, all under ``max_num_batched_tokens`` and ``max_num_seqs``. A prefill-role prompt
whose destination blocks are not known yet is not given its last chunk (that step writes its KV
out): it waits, and the sequences behind it go ahead. When the cache runs out
of blocks the most recently admitted running sequence is preempted: its blocks are freed and it
goes back to the front of the queue to be recomputed later. With a prefix cache, a sequence
admitted with no blocks starts after the longest cached prefix of its full blocks
(actors.engine.prefix_cache); only the rest counts against the token budget. Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from actors.engine.block_manager import BlockManager
from actors.engine.prefix_cache import PrefixCache
from actors.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """This step computes the last known token, so it yields a new one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        prefix_cache: PrefixCache | None = None,
    ):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV is already in its blocks (PD decode side)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def pending_prefill_tokens(self) -> int:
        # snapshots first: stats threads call this while the engine thread edits the queues, and
        # iterating a deque that changes underneath raises
        waiting, running = tuple(self.waiting), tuple(self.running)
        return sum(s.num_uncomputed for s in waiting) + sum(s.num_uncomputed for s in running if s.num_uncomputed > 1)

    # ------------------------------------------------------------------ schedule
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0  # its hashes stay: they name its tokens, not its blocks
        self.num_preemptions += 1
        self.add(seq, front=True)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n <= 0 or not seq.may_compute(n):
                i += 1
                continue
            while not self.blocks.ensure(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING or seq not in self.running:
                continue  # preempted itself; `i` now points at the next one
            out.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        held: list[Sequence] = []  # waiting for their destination: they keep their place in the queue
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cache = self.prefix_cache if not seq.block_table and seq.num_computed_tokens == 0 else None
            hit = cache.match(seq) if cache is not None else 0  # a waiting sequence holds no blocks
            n = seq.num_uncomputed
            admit = True
            if n > budget:
                admit = self.enable_chunked_prefill or not out
                n = budget
            if admit and not seq.may_compute(n):
                if cache is not None:
                    cache.unmatch(seq)
                held.append(self.waiting.popleft())
                continue
            if not admit or not self.blocks.ensure(seq.block_table, seq.num_computed_tokens + n):
                if cache is not None:
                    cache.unmatch(seq)
                break
            if cache is not None:
                cache.admitted(seq, hit)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(held))
        return out
