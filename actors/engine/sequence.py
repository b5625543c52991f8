"""A request inside one engine: its tokens, its blocks, where it is in its life."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pdbus.messages import Destination, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    TRANSFERRING = "transferring"  # prefill role: KV on its way to the decode instance
    FINISHED = "finished"


@dataclass
class Sequence:
    req_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    status: Status = Status.WAITING
    arrival: float = field(default_factory=time.monotonic)
    dest: Destination | None = None  # prefill role: where the KV goes
    num_prompt_outputs: int = 0  # re-prefill: trailing prompt tokens that were generated outputs
    finish_reason: str | None = None
    transfer: object | None = None  # TransferHandle while TRANSFERRING
    first_token: object | None = None  # prefill role: token 1, held until the KV has landed
    transfer_started: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_tokens - 1 and bool(self.output_token_ids)

    def sampling_history(self) -> tuple[list[int], list[int]]:
        """(prompt ids, output ids) as the sampler sees them (re-prefill keeps outputs as outputs)."""
        if self.num_prompt_outputs:
            cut = len(self.prompt_token_ids) - self.num_prompt_outputs
            return self.prompt_token_ids[:cut], self.prompt_token_ids[cut:] + self.output_token_ids
        return self.prompt_token_ids, self.output_token_ids
