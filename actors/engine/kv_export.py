"""The prefill role's KV export: a finishing prefill's KV written into its decode instance's blocks.

The engine hands :class:`KVExport` the sequences whose prompt's last chunk the coming step
computes. Of each layer it writes the blocks after the destination's ``cached_blocks`` (those
the decode's own prefix cache already holds, read-only there). :meth:`KVExport.writer` checks
each destination (:meth:`KVExport.check`, the same
checks the engine runs when the request arrives) and returns the ``layer_done`` hook that writes
each layer's blocks as soon as the forward has them; a write that fails mid-step is recorded,
never raised inside the forward (other ranks may be running it in lockstep), and fails the
request at :meth:`KVExport.commit`. After token 1 is sampled, ``commit`` hands the sequence's
writes to the transfer engine; the handle's done callback posts ``on_landed(seq, handle)`` to the
engine's inbox (``submit``), so the engine thread finishes the sequence as soon as the last byte
landed, with no polling and no thread per handle. A transfer that does not land within
``timeout_s`` is aborted by :meth:`KVExport.expire`, which the engine runs when its inbox wait,
bounded by :meth:`KVExport.next_deadline`, runs out.

Everything here runs on the engine thread except the done callbacks, which only post.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from actors.engine.block_manager import BlockManager
from actors.engine.sequence import Sequence, Status
from native.transfer.base import TransferError, TransferHandle, WriteOp


@dataclass
class InFlight:
    seq: Sequence
    handle: TransferHandle
    started: float
    deadline: float


class KVExport:
    def __init__(
        self,
        transfers: dict,
        blocks: BlockManager,
        submit: Callable[[Callable[[], None]], None],
        on_landed: Callable[[Sequence, TransferHandle], None],
        timeout_s: float,
    ):
        self.transfers = transfers  # protocol -> TransferEngine
        self.blocks = blocks
        self.submit = submit
        self.on_landed = on_landed
        self.timeout_s = timeout_s
        self.in_flight: dict[str, InFlight] = {}  # req -> its KV on the way (status TRANSFERRING)
        self.write_errors: dict[str, str] = {}  # req -> KV write error of its last prefill step

    def __len__(self) -> int:
        return len(self.in_flight)

    # ------------------------------------------------------------------ before and during the step
    def check(self, seq: Sequence) -> str | None:
        """Why ``seq``'s destination cannot take its KV (one line), or None. Its block ids may be
        still unknown (checked again when they come, and before the last chunk)."""
        dest = seq.dest
        engine = self.transfers.get(dest.protocol)
        if engine is None:
            return f"no {dest.protocol} transfer engine on this instance"
        need = self.blocks.blocks_for(seq.num_tokens)
        if dest.block_ids is not None and need > len(dest.block_ids):
            return f"decode reserved {len(dest.block_ids)} blocks, the prompt needs {need}"
        most = (seq.num_tokens - 1) // self.blocks.block_size  # the last token's block is always written
        if not 0 <= dest.cached_blocks <= most:
            return f"decode says {dest.cached_blocks} of its blocks hold the prompt's KV, at most {most} can"
        try:
            engine.open_peer(dest.instance_id, dest.endpoint)
        except (TransferError, OSError) as exc:
            return f"KV transfer to {dest.instance_id} failed: {exc}"
        return None

    def writer(self, seqs: list[Sequence]) -> tuple[Callable[[int], None] | None, list[tuple[Sequence, str]]]:
        """(layer_done hook or None when nothing is to be written, [(sequence, error)] of those
        whose destination is unusable: returned, not raised, so they fail alone)."""
        plans, dropped = [], []
        for seq in seqs:
            error = self.check(seq)
            if error is not None:
                dropped.append((seq, error))
                continue
            dest = seq.dest
            # blocks the decode has cached already hold this KV (and are shared there): not sent
            k, n = dest.cached_blocks, self.blocks.blocks_for(seq.num_tokens)
            plans.append((self.transfers[dest.protocol], seq.req_id, dest.instance_id, seq.block_table[k:n], dest.block_ids[k:n]))
        if not plans:
            return None, dropped
        errors = self.write_errors

        def layer_done(layer: int) -> None:
            for engine, req_id, peer, src, dst in plans:
                if req_id in errors:
                    continue
                try:
                    engine.write(req_id, peer, WriteOp(layer, src, dst))
                except (TransferError, OSError) as exc:
                    errors[req_id] = str(exc)

        return layer_done, dropped

    # ------------------------------------------------------------------ after token 1
    def commit(self, seq: Sequence) -> str | None:
        """Every write of ``seq`` is queued: wait for them to land (status TRANSFERRING), or say
        why the transfer failed at once."""
        engine = self.transfers[seq.dest.protocol]
        try:
            error = self.write_errors.pop(seq.req_id, None)
            if error is not None:
                engine.abort(seq.req_id)
                raise TransferError(error)
            handle = engine.commit(seq.req_id, seq.dest.instance_id)
        except Exception as exc:  # noqa: BLE001 - any backend error fails this request alone
            return f"KV transfer failed: {exc}"
        now = time.monotonic()
        seq.status = Status.TRANSFERRING
        self.in_flight[seq.req_id] = InFlight(seq, handle, now, now + self.timeout_s)
        handle.add_done_callback(lambda h: self.submit(lambda: self._landed(seq, h)))
        return None

    def _landed(self, seq: Sequence, handle: TransferHandle) -> None:
        entry = self.in_flight.get(seq.req_id)
        if entry is None or entry.handle is not handle:
            return  # aborted or timed out before it landed: already finished
        del self.in_flight[seq.req_id]
        self.on_landed(seq, handle)

    def next_deadline(self) -> float | None:
        """When the first transfer in flight times out (``time.monotonic``); None when none is."""
        return min((e.deadline for e in self.in_flight.values()), default=None)

    def expire(self, now: float | None = None) -> list[Sequence]:
        """The sequences whose transfer ran past its deadline, aborted and dropped."""
        now = time.monotonic() if now is None else now
        gone = [e.seq for e in self.in_flight.values() if e.deadline <= now]
        for seq in gone:
            self.abort(seq)
        return gone

    # ------------------------------------------------------------------ ending
    def abort(self, seq: Sequence) -> None:
        """Stop ``seq``'s transfer in flight (its handle fails; the callback finds it gone)."""
        if self.in_flight.pop(seq.req_id, None) is not None:
            self.transfers[seq.dest.protocol].abort(seq.req_id)

    def discard(self, seq: Sequence) -> None:
        """Forget ``seq`` (the engine is finishing or failing it): no more writes, no transfer in
        flight, nothing of it left queued in its transfer engine (a step that failed after some of
        its layers were written)."""
        self.write_errors.pop(seq.req_id, None)
        self.in_flight.pop(seq.req_id, None)
        engine = self.transfers.get(seq.dest.protocol) if seq.dest is not None else None
        if engine is not None:
            engine.forget(seq.req_id)
