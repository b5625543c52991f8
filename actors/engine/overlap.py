"""Asynchronous scheduling: the engine launches step n+1 before it reads step n's tokens back.

On a GPU the host's share of a decode step — scheduling, building the inputs, reading the drawn
tokens, finishing sequences, posting the tokens — otherwise runs while the GPU idles, and at a
short step it is a fifth of it (vLLM v1's async scheduling closes the same gap). Here a decode
step whose rows can all be drawn without the host knowing their last tokens' values
(``Sampler.reads_on_device``: no penalties, no logprobs) runs a step ahead:

1. the sampler's draw stays on the device; a copy into pinned memory and an event are queued
   behind it (:meth:`InFlight.launch`), and each row gets a placeholder token (``PENDING``) in its
   sequence, so that lengths, positions and block needs are right at once;
2. the next step is scheduled and launched at once; a row whose last token is a placeholder takes
   it from the step in flight on the device (``native.runner.DeviceTokens``);
3. only then the step in flight is read back (:meth:`InFlight.wait`), its placeholders replaced
   and its sequences finished — while the GPU runs the step just launched.

A grammar row (structured output) runs ahead too: its mask for step n+1 needs its matcher past
step n's token, so once step n+1's forward is launched the engine lands step n, advances the
matchers, fills and applies the masks and only then draws — the forward of n+1 runs meanwhile.

A sequence that stops at step n has already been given a row of step n+1: that row's output is
dropped, and the blocks of every sequence that ends while a step that holds it is in flight are
freed only once that step has run (``free_after``), so no block is handed to another request while
a kernel may still write into it. A sequence whose next token is sure to end it (``max_tokens``,
the model length) is not scheduled again (``Sequence.final_pending``). Anything else — a prompt
to compute, a row that needs its history, no room for a new block per row — lands the step in
flight first and runs as before, so preemption never meets a placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from actors.engine.sequence import Sequence
from native.runner import DeviceTokens

PENDING = -1  # a token drawn on the device and not read back yet


@dataclass(eq=False)
class InFlight:
    """One launched step whose drawn tokens the host has not read yet."""

    seqs: list[Sequence]
    slots: list[int]  # where each row's placeholder sits in its sequence's token list
    host: torch.Tensor  # the drawn ids, [B]: pinned (filled by a queued copy) or the CPU tensor
    tokens: torch.Tensor  # the same on the device, read by the next step's rows
    event: torch.cuda.Event | None
    rows: dict[str, int]  # request id -> row
    free_after: list[list[int]] = field(default_factory=list)  # block tables freed once it ran

    @classmethod
    def launch(cls, seqs: list[Sequence], tokens: torch.Tensor) -> InFlight:
        """Queue the read-back of ``tokens`` (the step's draw) and give each row its placeholder."""
        event = None
        host = tokens
        if tokens.device.type == "cuda":
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        slots = []
        for seq in seqs:
            slots.append(seq.num_tokens)
            seq.append_token(PENDING)
        return cls(seqs, slots, host, tokens, event, {seq.req_id: j for j, seq in enumerate(seqs)})

    @classmethod
    def guard(cls, seqs: list[Sequence]) -> InFlight:
        """A step launched and not sampled yet (a grammar's mask waits for the step before it):
        it holds ``seqs``, so that one ending meanwhile keeps its blocks until the step has run."""
        empty = torch.empty(0, dtype=torch.int64)
        return cls(seqs, [], empty, empty, None, {seq.req_id: j for j, seq in enumerate(seqs)})

    def holds(self, seq: Sequence) -> bool:
        j = self.rows.get(seq.req_id)
        return j is not None and self.seqs[j] is seq

    def device_tokens(self, seqs: list[Sequence]) -> DeviceTokens | None:
        """Where the rows of the next step whose last token is this step's placeholder read it."""
        rows = [i for i, seq in enumerate(seqs) if self.holds(seq)]
        if not rows:
            return None
        return DeviceTokens(rows, self.tokens, [self.rows[seqs[i].req_id] for i in rows])

    def wait(self) -> list[int]:
        """The drawn ids, once the step and its read-back have run."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def settle_device(device: torch.device) -> None:
    """Wait until everything queued on ``device``'s current stream has run (so no kernel still
    writes a block that is about to be freed); an asynchronous error surfacing here is ignored:
    the work is over either way."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.current_stream(device).synchronize()
    except RuntimeError:
        pass
