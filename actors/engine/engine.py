"""The per-rank engine: one thread that owns the scheduler, the blocks and the model runner.

A request's walk through it, by role:

* mixed: ``add_request`` -> waiting -> prefill (maybe in chunks) -> token 1 -> decode steps ->
  finished (eos / stop ids / max_tokens / max_model_len) -> blocks freed.
* prefill: ``add_prefill`` carries a destination (decode instance, protocol, endpoint), usually
  without the decode's block ids: they come with ``dest_ready`` while the prompt computes. The
  scheduler holds back the prompt's last chunk until they are there (the sequence waits, nothing
  else does; ``dest_timeout_s`` bounds the wait). During the step that computes the last chunk,
  each layer's KV is written into the destination blocks as soon as that layer is done
  (``layer_done`` hook, actors.engine.kv_export); after sampling token 1 the sequence waits in
  TRANSFERRING until the transfer handle's callback posts its completion to the inbox, then
  ``on_prefilled`` fires and the local blocks are freed.
* decode: ``reserve`` leases blocks for a coming request and keeps its prompt and sampling with
  the lease; the prompt's longest cached prefix (actors.engine.prefix_cache ``match_lease``)
  comes first in the lease, and ``on_reserved`` says how many blocks those are (the prefill
  skips them). ``add_decode(req, token one)`` claims the blocks (the KV is all there now) and the
  sequence joins the running batch with its first token.
* structured output (``SamplingParams.structured``, any role): the grammar compiles off this
  thread (actors.engine.grammar) while the sequence waits in the queue (only its sampling step is
  held); its matcher masks each draw and advances with each token.

Every other thread talks to the engine through ``submit`` (a queue drained between steps); the
engine answers through the ``EngineEvents`` callbacks, which must be thread-safe. With nothing
to run the thread sleeps on that queue until a command, a landed transfer or the next deadline
(a lease's or a transfer's expiry); it polls nothing.

The runner (native.runner.Runner) decides with the engine whether to step: ``plan`` before each
step, ``idle_step`` when the rank has nothing of its own but its group steps (expert parallelism,
native.parallel.ep_runner), ``busy`` while the group waits for this rank. ``lockstep`` says that
other ranks run each step's collectives with this one (TP or EP), so a step that fails after it
started is fatal (``GroupBroken``): ``on_fatal`` is called once and the engine stops.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from actors.engine.block_manager import BlockManager
from actors.engine.kv_export import KVExport
from actors.engine.overlap import InFlight, settle_device
from actors.engine.prefix_cache import PrefixCache
from actors.engine.scheduler import Scheduler
from actors.engine.sequence import Sequence, Status
from native.parallel.comm import GroupBroken
from pdbus.log import get_logger
from pdbus.messages import Destination, FinishReason, SamplingParams, TokenLogprob, TokenOut


class _Ended:
    """What the mask fill sees of a sequence that ended while its next row was in flight."""

    grammar = None


_ENDED = _Ended()


class EngineEvents:
    """Callbacks from the engine thread. Implementations hop to their own thread/loop."""

    def on_tokens(self, items: list[TokenOut]) -> None: ...

    def on_prefilled(self, req_id: str, first: TokenOut, nbytes: int, seconds: float) -> None: ...

    def on_failed(self, req_id: str, error: str, retryable: bool) -> None: ...

    def on_reserved(self, req_id: str, block_ids: list[int] | None, reason: str, cached_blocks: int = 0) -> None: ...


@dataclass
class EngineLimits:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    transfer_timeout_s: float = 30.0
    dest_timeout_s: float = 60.0  # prefill: a last chunk waits this long for its block ids
    # launch a decode step before reading the last one's tokens (actors.engine.overlap); used only
    # where the runner takes tokens on the device and the role decodes
    async_scheduling: bool = False
    # automatic prefix caching (actors.engine.prefix_cache): full blocks kept by their contents
    enable_prefix_caching: bool = True


@dataclass
class Reservation:
    """Decode role: what a lease keeps for its request until ``add_decode`` claims it."""

    prompt_token_ids: list[int]
    sampling: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)  # a re-prefill's tokens so far
    block_hashes: list[bytes] = field(default_factory=list)  # the prefix cache's chain of its full blocks


class Engine:
    def __init__(
        self,
        runner,  # native.runner.Runner: ModelRunner, or a wrapper (TP, EP)
        sampler,  # native.sampler.Sampler
        events: EngineEvents,
        limits: EngineLimits,
        eos_token_ids: set[int],
        role: str = "mixed",
        transfer_engines: dict | None = None,
        name: str = "engine",
        *,
        lockstep: bool = False,
        on_fatal: Callable[[str], None] | None = None,
        cache_key: str | bytes = b"",  # what makes this cache's KV besides the tokens (model, dtype, ...)
        grammars=None,  # actors.engine.grammar.Grammars (None: no tokenizer, structured output refused)
    ):
        self.runner = runner
        self.sampler = sampler
        self.events = events
        self.limits = limits
        self.eos_token_ids = set(eos_token_ids)
        self.role = role
        self.grammars = grammars
        self.log = get_logger(name)
        cache = runner.kv_cache
        self.blocks = BlockManager(cache.num_blocks, cache.block_size, cache_key, limits.enable_prefix_caching)
        self.prefix_cache = PrefixCache(self.blocks)
        # a sequence longer than the whole cache could never get its blocks: it would wait forever
        self.max_len = min(limits.max_model_len, cache.num_blocks * cache.block_size)
        model_cfg = getattr(getattr(runner, "model", None), "cfg", None)
        self.vocab_size: int | None = getattr(model_cfg, "vocab_size", None)
        self.scheduler = Scheduler(
            self.blocks, limits.max_num_seqs, limits.max_num_batched_tokens, prefix_cache=self.prefix_cache
        )
        self.seqs: dict[str, Sequence] = {}
        self.on_fatal = on_fatal  # the engine cannot go on (called once)
        # TP or EP: other ranks run each step's collectives with this one, so a step that fails
        # after it started cannot be recovered from (GroupBroken)
        self.lockstep = lockstep
        self.fatal: str | None = None  # why the group broke and the engine stopped
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.export = KVExport(transfer_engines or {}, self.blocks, self.submit, self._landed, limits.transfer_timeout_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.steps_ahead = 0  # of them launched before the previous step was read back
        self.tokens_generated = 0
        self.prompt_tokens_computed = 0
        self.last_error: str | None = None
        self._stalled = False  # the last step had work but no blocks to run it: don't spin
        self._dest_waits: dict[str, float] = {}  # prefill: req -> deadline for its block ids
        self.async_scheduling = (
            limits.async_scheduling and role != "prefill" and getattr(runner, "supports_device_tokens", False)
        )
        self._inflight: InFlight | None = None  # the step launched ahead, not read back yet

    # ------------------------------------------------------------------ thread API
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pdbus-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.grammars is not None:
            self.grammars.close()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine thread between steps."""
        self._inbox.put(fn)

    def add_request(self, req_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        self.submit(lambda: self._add(Sequence(req_id, prompt_token_ids, sampling)))

    def add_prefill(
        self, req_id: str, prompt_token_ids: list[int], sampling: SamplingParams, dest: Destination, num_outputs: int = 0
    ) -> None:
        seq = Sequence(req_id, prompt_token_ids, sampling, dest=dest, num_prompt_outputs=num_outputs)
        self.submit(lambda: self._add(seq))

    def dest_ready(self, req_id: str, block_ids: list[int], dest: Destination | None = None, cached_blocks: int = 0) -> None:
        """Prefill role: the decode's block ids for ``req_id`` (and a new destination, if set);
        the first ``cached_blocks`` of them hold the KV already (not written)."""
        self.submit(lambda: self._dest_ready(req_id, block_ids, dest, cached_blocks))

    def add_decode(self, req_id: str, first_token_id: int) -> None:
        self.submit(lambda: self._add_decode(req_id, first_token_id))

    def reserve(
        self,
        req_id: str,
        num_tokens: int,
        lease_s: float,
        prompt_token_ids: list[int] | None = None,
        output_token_ids: list[int] | None = None,
        sampling: SamplingParams | None = None,
    ) -> None:
        request = None
        if prompt_token_ids is not None:
            request = Reservation(list(prompt_token_ids), sampling or SamplingParams(), list(output_token_ids or ()))
        self.submit(lambda: self._reserve(req_id, num_tokens, lease_s, request))

    def release(self, req_id: str) -> None:
        self.submit(lambda: self._release(req_id))

    def abort(self, req_id: str, reason: str = "aborted") -> None:
        self.submit(lambda: self._abort(req_id, reason))

    def load(self):
        from pdbus.messages import Load

        return Load(
            free_blocks=self.blocks.num_free,
            total_blocks=self.blocks.num_blocks,
            running=len(self.scheduler.running) + len(self.export),
            waiting=len(self.scheduler.waiting),
            pending_prefill_tokens=self.scheduler.pending_prefill_tokens,
            reserved_blocks=self.blocks.num_reserved,
            prefix_cache_queries=self.prefix_cache.queries,
            prefix_cache_hits=self.prefix_cache.hits,
            prefix_cache_blocks_reused=self.prefix_cache.blocks_reused,
        )

    # ------------------------------------------------------------------ loop
    def _wait_s(self) -> float | None:
        """How long the loop may sleep on the inbox before it must step (None: until a command)."""
        if (self.scheduler.has_work() and not self._stalled) or self.runner.busy or self._inflight is not None:
            return 0.0  # work to run, a step in flight to read, or a busy group waiting in plan
        # stalled: the blocks it waits for come back only through the inbox (a command, a landed
        # transfer) or when a lease expires
        wait = self.runner.idle_wait_s
        dest_wait = min(self._dest_waits.values(), default=None)
        deadlines = [d for d in (self.blocks.next_expiry(), self.export.next_deadline(), dest_wait) if d is not None]
        if deadlines:
            until = max(0.0, min(deadlines) - time.monotonic())
            wait = until if wait is None else min(wait, until)
        return wait

    def _loop(self) -> None:
        while not self._stop.is_set():
            timeout = self._wait_s()
            try:
                item = self._inbox.get(timeout=timeout) if timeout != 0.0 else self._inbox.get_nowait()
            except queue.Empty:
                item = None
            try:
                self._iterate(item)
            except GroupBroken as exc:  # a peer rank (EP or TP) died: this group can never step again
                self.last_error = self.fatal = str(exc)
                self.log.error("%s; this instance cannot continue", exc)
                self._fail_all(str(exc))
                if self.on_fatal is not None:
                    self.on_fatal(str(exc))
                break
        self._fail_all("engine stopped")

    def _iterate(self, item) -> None:
        self._run_cmd(item)
        while True:  # drain everything queued before stepping
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._run_cmd(item)
        if self._stop.is_set():
            return
        self._expire_leases()
        self._expire_transfers()
        self._expire_dest_waits()
        try:
            self.step()
        except GroupBroken:
            raise
        except Exception as exc:  # a failed step fails its requests, not the rank
            self.log.exception("engine step failed: %s", exc)
            self.last_error = str(exc)
            self._fail_all(f"engine error: {type(exc).__name__}: {exc}")

    def _run_cmd(self, item) -> None:
        if item is None:
            return
        try:
            item()
        except GroupBroken:
            raise
        except Exception as exc:
            self.log.exception("engine command failed: %s", exc)

    # ------------------------------------------------------------------ commands (engine thread)
    def _add(self, seq: Sequence) -> None:
        if seq.req_id in self.seqs:
            self.events.on_failed(seq.req_id, f"duplicate request id {seq.req_id}", False)
            return
        if not seq.token_ids:
            self.events.on_failed(seq.req_id, "empty prompt", False)
            return
        if self.vocab_size is not None:
            bad = next((t for t in seq.token_ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:  # would crash the step and with it every request in the batch
                self.events.on_failed(seq.req_id, f"token id {bad} outside the vocabulary ({self.vocab_size})", False)
                return
        if seq.num_tokens >= self.limits.max_model_len:
            self.events.on_failed(
                seq.req_id, f"prompt of {seq.num_tokens} tokens does not fit max_model_len {self.limits.max_model_len}", False
            )
            return
        if seq.num_tokens >= self.max_len:
            self.events.on_failed(seq.req_id, f"prompt of {seq.num_tokens} tokens exceeds the KV cache", False)
            return
        if seq.dest is not None:
            # checked here, not when the last chunk runs: a step that raises fails every request in it
            error = self.export.check(seq)
            if error is not None:
                self.events.on_failed(seq.req_id, error, True)
                return
        if seq.sampling.structured is not None and not self._start_grammar(seq):
            return
        self.seqs[seq.req_id] = seq
        if seq.dest_pending:
            self._dest_waits[seq.req_id] = time.monotonic() + self.limits.dest_timeout_s
        self.scheduler.add(seq)

    def _dest_ready(self, req_id: str, block_ids: list[int], dest: Destination | None, cached_blocks: int) -> None:
        seq = self.seqs.get(req_id)
        if seq is None or not seq.dest_pending:
            return  # gone already (failed, aborted: the router hears that) or told twice
        self._dest_waits.pop(req_id, None)
        seq.dest = msgspec.structs.replace(dest or seq.dest, block_ids=list(block_ids), cached_blocks=cached_blocks)
        error = self.export.check(seq)  # the blocks suffice; a new destination is reachable
        if error is not None:
            self.scheduler.remove(seq)
            self._finish(seq)
            self.events.on_failed(req_id, error, True)

    def _add_decode(self, req_id: str, first_token_id: int) -> None:
        lease = self.blocks.claim(req_id)
        if lease is None:
            self.events.on_failed(req_id, "no reservation for this request (expired?)", True)
            return
        req = lease.request
        if not isinstance(req, Reservation):
            self.blocks.free(lease.block_ids)
            self.events.on_failed(req_id, "the reservation carries no prompt", False)
            return
        seq = Sequence(
            req_id,
            req.prompt_token_ids,
            req.sampling,
            output_token_ids=[*req.output_token_ids, first_token_id],
            block_table=lease.block_ids,
        )
        seq.num_computed_tokens = seq.num_tokens - 1
        # the first blocks are shared cached ones (read-only; the first position this sequence
        # writes, num_tokens - 1, is past them); the KV of the rest has landed: later turns find it
        seq.block_hashes, seq.num_registered_blocks = req.block_hashes, lease.num_cached
        self.prefix_cache.register(seq)
        self.seqs[req_id] = seq
        if self._check_finished(seq):
            self.events.on_tokens([TokenOut(req_id, [], finish_reason=seq.finish_reason)])
            self._finish(seq)
            return
        if seq.sampling.structured is not None and not self._start_grammar(seq):
            self._finish(seq)
            return
        self.scheduler.add_running(seq)

    def _start_grammar(self, seq: Sequence) -> bool:
        """Compile ``seq``'s grammar off this thread; its matcher is made here once it is done."""
        if self.grammars is None:
            error = "structured output needs the tokenizer (this instance runs with --skip-tokenizer-init)"
            self.events.on_failed(seq.req_id, error, False)
            return False
        seq.grammar = self.grammars.start(seq.sampling.structured, lambda: self.submit(lambda: self._grammar_ready(seq)))
        return True

    def _grammar_ready(self, seq: Sequence) -> None:
        if self.seqs.get(seq.req_id) is not seq or seq.grammar.ready:
            return  # gone meanwhile
        error = seq.grammar.bind(seq.sampling_history()[1])  # the outputs it has (a decode: token one)
        if error is not None:
            self._grammar_failed(seq, error)

    def _grammar_failed(self, seq: Sequence, error: str) -> None:
        self.log.warning("req %s: structured output failed: %s", seq.req_id, error)
        self.scheduler.remove(seq)
        self._finish(seq)
        self.events.on_failed(seq.req_id, error, False)

    def _reserve(self, req_id: str, num_tokens: int, lease_s: float, request: Reservation | None = None) -> None:
        lease = self.blocks.leases.get(req_id)
        if lease is not None:  # asked twice: the same lease
            self.events.on_reserved(req_id, lease.block_ids, "", lease.num_cached)
            return
        cached: list[int] = []
        if request is not None:  # the KV the prefill is about to send for its prompt, cached here
            tokens = [*request.prompt_token_ids, *request.output_token_ids]
            if len(tokens) < num_tokens:  # the lease holds every token the prefill writes
                cached = self.prefix_cache.match_lease(tokens, request.block_hashes)
        ids = self.blocks.reserve(req_id, num_tokens, lease_s, request=request, cached=cached)
        if ids is not None and request is not None and request.sampling.structured is not None and self.grammars:
            self.grammars.compile(request.sampling.structured)  # compiles while the prompt prefills
        if ids is None:
            need = self.blocks.blocks_for(num_tokens)
            self.events.on_reserved(req_id, None, f"need {need} blocks, {self.blocks.num_free} free")
            return
        if request is not None:
            self.prefix_cache.leased(len(tokens), len(cached))
        self.events.on_reserved(req_id, ids, "", len(cached))

    def _release(self, req_id: str) -> None:
        self.blocks.release(req_id)

    def _abort(self, req_id: str, reason: str) -> None:
        self._release(req_id)
        seq = self.seqs.get(req_id)
        if seq is None:
            return
        if seq.status is Status.TRANSFERRING:
            self.export.abort(seq)
        else:
            self.scheduler.remove(seq)
        seq.finish_reason = FinishReason.ABORT
        self._finish(seq)
        self.log.info("req %s aborted: %s", req_id, reason)
        if seq.dest is not None:
            # tell the router this prefill will write no more, so the decode's lease can go
            self.events.on_failed(req_id, f"aborted: {reason}", False)

    def _expire_leases(self) -> None:
        if self.blocks.leases:
            for req_id in self.blocks.expire():
                self.log.warning("req %s: reservation expired, blocks reclaimed", req_id)

    def _expire_dest_waits(self) -> None:
        if not self._dest_waits:
            return
        now = time.monotonic()
        for req_id in [r for r, deadline in self._dest_waits.items() if deadline <= now]:
            del self._dest_waits[req_id]
            seq = self.seqs.get(req_id)
            if seq is None:
                continue
            self.scheduler.remove(seq)
            self._finish(seq)
            self.events.on_failed(req_id, f"no destination block ids within {self.limits.dest_timeout_s:g}s", True)

    def _expire_transfers(self) -> None:
        if self.export.in_flight:
            for seq in self.export.expire():
                self._finish(seq)
                self.events.on_failed(
                    seq.req_id, f"KV transfer timed out after {self.limits.transfer_timeout_s:.0f}s", True
                )

    def _landed(self, seq: Sequence, handle) -> None:
        """Inbox: ``seq``'s KV transfer completed or failed (posted by the handle's callback)."""
        self._finish(seq)
        if handle.error is not None:
            self.events.on_failed(seq.req_id, f"KV transfer failed: {handle.error}", True)
        else:
            self.events.on_prefilled(seq.req_id, seq.first_token, handle.nbytes, handle.seconds)

    def _finish(self, seq: Sequence) -> None:
        self.export.discard(seq)
        self._dest_waits.pop(seq.req_id, None)
        if seq.status is not Status.FINISHED:
            if self._inflight is not None and self._inflight.holds(seq):
                self._inflight.free_after.append(seq.block_table)  # its row may still be running
            else:
                self.blocks.free(seq.block_table)
            seq.block_table = []
            seq.status = Status.FINISHED
        self.seqs.pop(seq.req_id, None)

    def _free_after(self, inflight: InFlight) -> None:
        for table in inflight.free_after:
            self.blocks.free(table)
        inflight.free_after = []

    def _fail_all(self, error: str) -> None:
        # nothing queued on the device may still write a block once it is free (a step that failed
        # after its launch, the step in flight): wait for the device, then free
        settle_device(self.runner.kv_cache.device)
        inflight, self._inflight = self._inflight, None
        if inflight is not None:  # nothing of it is read
            self._free_after(inflight)
        for seq in list(self.seqs.values()):
            self.scheduler.remove(seq)
            self._finish(seq)
            self.events.on_failed(seq.req_id, error, True)

    # ------------------------------------------------------------------ step
    def step(self) -> None:
        if self._inflight is not None and not self._chainable():
            self._land()  # the next step needs host values the step in flight has not given yet
        batch = self.scheduler.schedule()
        self._stalled = not batch and self.scheduler.has_work()
        layer_done = None
        finishing = [s.seq for s in batch if s.seq.dest is not None and s.samples]
        if finishing:  # before the plan: a bad destination drops its request, not the step
            layer_done, dropped = self.export.writer(finishing)
            for seq, error in dropped:
                batch = [s for s in batch if s.seq is not seq]
                self.scheduler.remove(seq)
                self._finish(seq)
                self.events.on_failed(seq.req_id, error, True)
        # the runner's group (EP) agrees on the step, then steps, or joins its collectives idle
        decode_only = layer_done is None and all(s.num_new_tokens == 1 for s in batch)
        if not self.runner.plan(sum(s.num_new_tokens for s in batch), decode_only):
            return  # nothing to run here (nor, in a group, anywhere)
        if not batch:
            self.runner.idle_step()
            return
        if self.async_scheduling and layer_done is None and self._may_run_ahead(batch):
            self._step_ahead(batch)
            return
        if self._inflight is not None:  # a safety net (_chainable said this batch runs ahead)
            self._land()
            batch = [s for s in batch if s.seq.status is Status.RUNNING]
            if not batch:
                return
        self.steps += 1
        sampled = [s for s in batch if s.samples]
        # grammar rows: their bitmasks fill on a worker thread while the forward runs
        masks = self.grammars.fill([s.seq for s in sampled]) if self.grammars is not None else None
        try:
            logits = self.runner.execute(
                [s.seq.token_ids[s.seq.num_computed_tokens : s.seq.num_computed_tokens + s.num_new_tokens] for s in batch],
                [s.seq.num_computed_tokens for s in batch],
                [s.seq.block_table for s in batch],
                [i for i, s in enumerate(batch) if s.samples],
                layer_done=layer_done,
            )
        except GroupBroken:
            raise
        except Exception as exc:
            if self.lockstep:  # the other ranks are inside this step's collectives: no way back
                raise GroupBroken(f"step failed mid-collective: {type(exc).__name__}: {exc}") from None
            raise
        for s in batch:
            s.seq.num_computed_tokens += s.num_new_tokens
            if s.seq.num_computed_tokens <= s.seq.num_prompt_tokens:
                self.prompt_tokens_computed += s.num_new_tokens
            self.prefix_cache.register(s.seq)
        if not sampled:
            return
        histories = [s.seq.sampling_history() for s in sampled]
        params = [s.seq.sampling for s in sampled]
        if masks is not None:  # before the draw: a seeded draw under a grammar stays deterministic
            masks.apply(logits)
            params = masks.sampling(params)
        out = self.sampler(
            logits,
            params,
            [h[0] for h in histories],
            [h[1] for h in histories],
            self.eos_token_ids,
        )
        items: list[TokenOut] = []
        for j, s in enumerate(sampled):
            seq = s.seq
            tok = out.token_ids[j]
            seq.append_token(tok)
            self.tokens_generated += 1
            if seq.grammar is not None and not seq.grammar.accept(tok):
                self._grammar_failed(seq, f"token {tok} does not fit the grammar")
                continue
            item = TokenOut(seq.req_id, [tok])
            if out.logprobs is not None and seq.sampling.logprobs is not None:
                item.logprobs = [out.logprobs[j]]
                tops = out.top_logprobs[j] if out.top_logprobs else None
                item.top_logprobs = [[TokenLogprob(t, lp) for t, lp in (tops or [])]]
            if seq.dest is not None:  # prefill role: token 1 waits for the KV to land
                self.scheduler.remove(seq)
                seq.first_token = item
                error = self.export.commit(seq)
                if error is not None:
                    self._finish(seq)
                    self.events.on_failed(seq.req_id, error, True)
                continue
            if self._check_finished(seq):
                item.finish_reason = seq.finish_reason
                self.scheduler.remove(seq)
                self._finish(seq)
            items.append(item)
        if items:
            self.events.on_tokens(items)

    def _check_finished(self, seq: Sequence) -> bool:
        return self._finished_at(seq, seq.num_tokens - 1)

    def _finished_at(self, seq: Sequence, slot: int) -> bool:
        """Whether the token at ``slot`` of ``seq`` (its last, or a placeholder just read back)
        ends it; sets the finish reason."""
        sp = seq.sampling
        if seq.grammar is not None and seq.grammar.terminated:  # it accepted its stop token
            seq.finish_reason = FinishReason.STOP
            return True
        tok = seq.token_ids[slot] if slot >= seq.num_prompt_tokens else None
        if tok is not None and seq.outputs_through(slot) >= sp.min_tokens:
            if (tok in self.eos_token_ids and not sp.ignore_eos) or tok in sp.stop_token_ids:
                seq.finish_reason = FinishReason.STOP
                return True
        if self._ends_by_length(seq, slot):
            seq.finish_reason = FinishReason.LENGTH
            return True
        return False

    def _ends_by_length(self, seq: Sequence, slot: int) -> bool:
        """Token ``slot`` is the last one ``max_tokens`` or the model length allow, whatever it is."""
        return seq.outputs_through(slot) >= seq.sampling.max_tokens or slot + 1 >= self.max_len

    # ------------------------------------------------------------------ a step ahead (overlap.py)
    def _chainable(self) -> bool:
        """The next step may be launched before the one in flight is read: only decode rows that
        draw on the device, nothing waiting to be admitted, a free block for every row (so the
        step cannot preempt a sequence whose last token is a placeholder)."""
        sched = self.scheduler
        if sched.waiting:
            return False
        live = [s for s in sched.running if not s.final_pending]
        if not live or len(live) > sched.max_num_batched_tokens or self.blocks.num_free < len(live):
            return False
        return all(s.num_uncomputed == 1 and self._draws_ahead(s) for s in live)

    def _may_run_ahead(self, batch) -> bool:
        return all(s.num_new_tokens == 1 and s.samples and self._draws_ahead(s.seq) for s in batch)

    def _draws_ahead(self, seq: Sequence) -> bool:
        """A decode row whose draw needs no host value of its earlier tokens (no KV to export; a
        grammar only once its matcher is there: its mask is filled after the step in flight lands,
        while this step's forward runs)."""
        return (
            seq.dest is None
            and (seq.grammar is None or seq.grammar.ready)
            and self.sampler.reads_on_device(seq.sampling)
        )

    def _step_ahead(self, batch) -> None:
        """Launch a decode step, then read the one in flight back while the device runs it."""
        seqs = [s.seq for s in batch]
        prev = self._inflight
        self.steps += 1
        self.steps_ahead += 1
        logits = self.runner.execute(
            [[seq.token_ids[seq.num_computed_tokens]] for seq in seqs],
            [seq.num_computed_tokens for seq in seqs],
            [seq.block_table for seq in seqs],
            list(range(len(seqs))),
            device_tokens=prev.device_tokens(seqs) if prev is not None else None,
        )
        for seq in seqs:
            seq.num_computed_tokens += 1
            if seq.num_computed_tokens <= seq.num_prompt_tokens:  # a one-token prompt (or last chunk)
                self.prompt_tokens_computed += 1
        params = [seq.sampling for seq in seqs]
        guard = None
        if self.grammars is not None and any(seq.grammar is not None for seq in seqs):
            # a grammar's mask needs the matcher past the step in flight: land it now, while the
            # device runs this step's forward (vLLM's structured output under async scheduling);
            # a sequence that ends there keeps its blocks until this step has run (the guard)
            if prev is not None:
                guard = self._inflight = InFlight.guard(seqs)
                self._land(prev)
                prev = None
            # filled here: the draw waits for it at once, and the forward runs meanwhile anyway
            masks = self.grammars.fill([seq if seq.status is not Status.FINISHED else _ENDED for seq in seqs], inline=True)
            if masks is not None:
                masks.apply(logits)
                params = masks.sampling(params)
        histories = [seq.sampling_history() for seq in seqs]
        tokens = self.sampler.sample(logits, params, [h[0] for h in histories], [h[1] for h in histories], self.eos_token_ids)
        self._inflight = InFlight.launch(seqs, tokens)
        if guard is not None:
            self._inflight.free_after += guard.free_after
        for seq, slot in zip(seqs, self._inflight.slots):
            seq.final_pending = self._ends_by_length(seq, slot)  # its read-back ends it, whatever its value
        if prev is not None:
            self._land(prev)

    def _land(self, inflight: InFlight | None = None) -> None:
        """Read a step in flight back (default: the only one): its placeholders become tokens,
        its sequences finish or go on, its tokens are posted."""
        if inflight is None:
            inflight, self._inflight = self._inflight, None
        try:
            tokens = inflight.wait()
        except BaseException:
            settle_device(self.runner.kv_cache.device)  # the step is over either way: its blocks go
            self._free_after(inflight)
            raise
        items: list[TokenOut] = []
        for seq, slot, tok in zip(inflight.seqs, inflight.slots, tokens):
            if seq.status is Status.FINISHED:
                continue  # aborted or failed while in flight
            seq.token_ids[slot] = tok
            if seq.grammar is not None and not seq.grammar.accept(tok):
                self._grammar_failed(seq, f"token {tok} does not fit the grammar")
                continue
            self.prefix_cache.register(seq, upto=slot)  # the KV of positions before it is computed
            self.tokens_generated += 1
            item = TokenOut(seq.req_id, [tok])
            if self._finished_at(seq, slot):
                item.finish_reason = seq.finish_reason
                self.scheduler.remove(seq)
                self._finish(seq)
            items.append(item)
        self._free_after(inflight)
        if items:
            self.events.on_tokens(items)
