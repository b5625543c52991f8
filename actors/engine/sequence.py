"""A request inside one engine: its tokens, its blocks, where it is in its life.

One list holds every token of the sequence (prompt, then outputs), as in nano-vllm: a decode row
reads its last token in O(1) and a step appends one; nothing is concatenated per step. The
prompt and the outputs are :class:`TokenSpan` views of that list, copied only when read.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as SequenceABC

from pdbus.messages import Destination, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    TRANSFERRING = "transferring"  # prefill role: KV on its way to the decode instance
    FINISHED = "finished"


class TokenSpan(SequenceABC):
    """``ids[start:stop]`` without the copy: O(1) to make and to measure; the sampler reads the
    contents only for rows with penalties."""

    __slots__ = ("_ids", "_start", "_stop")

    def __init__(self, ids: list[int], start: int, stop: int):
        self._ids, self._start, self._stop = ids, start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._ids[self._start : self._stop][i]
        n = self._stop - self._start
        if not -n <= i < n:
            raise IndexError("token index out of range")
        return self._ids[self._start + (i if i >= 0 else n + i)]

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids[self._start : self._stop])

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, TokenSpan)) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"TokenSpan({list(self)})"


class Sequence:
    def __init__(
        self,
        req_id: str,
        prompt_token_ids: Iterable[int],
        sampling: SamplingParams,
        *,
        output_token_ids: Iterable[int] = (),
        block_table: list[int] | None = None,
        dest: Destination | None = None,
        num_prompt_outputs: int = 0,
    ):
        self.req_id = req_id
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt, then every output
        self.num_prompt_tokens = len(self.token_ids)
        self.token_ids.extend(output_token_ids)
        self.sampling = sampling
        self.block_table: list[int] = block_table if block_table is not None else []
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        # prefix caching (actors.engine.prefix_cache): the hash chain of its full blocks whose
        # tokens are known, and how many of its block table's blocks registration has seen
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.status = Status.WAITING
        self.arrival = time.monotonic()
        self.dest = dest  # prefill role: where the KV goes
        # re-prefill: trailing prompt tokens that were generated outputs (the sampler counts them
        # as outputs: penalties, min_tokens, max_tokens and the seeded draw continue from there)
        self.num_prompt_outputs = num_prompt_outputs
        self.finish_reason: str | None = None
        self.first_token: object | None = None  # prefill role: token 1, held until the KV has landed
        # asynchronous scheduling: the token in flight ends it (max_tokens, model length), so it
        # is not scheduled again (actors.engine.overlap)
        self.final_pending = False
        # structured output (actors.engine.grammar.SeqGrammar): it samples only once its matcher is there
        self.grammar = None

    def __repr__(self) -> str:
        return f"Sequence({self.req_id!r}, {self.num_prompt_tokens}+{self.num_completion_tokens} tokens, {self.status.value})"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> TokenSpan:
        return TokenSpan(self.token_ids, 0, self.num_prompt_tokens)

    @property
    def completion_token_ids(self) -> TokenSpan:
        return TokenSpan(self.token_ids, self.num_prompt_tokens, len(self.token_ids))

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    @property
    def dest_pending(self) -> bool:
        """Prefill role: the destination's block ids have not come yet (the last chunk waits)."""
        return self.dest is not None and self.dest.block_ids is None

    def may_compute(self, num_new_tokens: int) -> bool:
        """Whether a step may compute the next ``num_new_tokens``: not the last chunk of a prompt
        whose destination blocks are still unknown (that step writes the KV out), nor a step that
        samples before the sequence's grammar has compiled."""
        if self.final_pending:
            return False
        if self.num_computed_tokens + num_new_tokens < len(self.token_ids):
            return True  # a chunk that does not sample
        return not self.dest_pending and (self.grammar is None or self.grammar.ready)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= len(self.token_ids) - 1 and self.num_completion_tokens > 0

    def outputs_through(self, slot: int) -> int:
        """Outputs up to and including token ``slot``, as the sampler counts them (a re-prefill's
        generated prompt tail included)."""
        return slot + 1 - self.num_prompt_tokens + self.num_prompt_outputs

    def sampling_history(self) -> tuple[TokenSpan, TokenSpan]:
        """(prompt ids, output ids) as the sampler sees them (re-prefill keeps outputs as outputs):
        views of the one token list, O(1)."""
        cut = self.num_prompt_tokens - self.num_prompt_outputs
        return TokenSpan(self.token_ids, 0, cut), TokenSpan(self.token_ids, cut, len(self.token_ids))
