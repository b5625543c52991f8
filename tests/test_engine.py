"""The engine thread with the real tiny MoE model, ModelRunner and Sampler (CPU, fp32).

Greedy outputs must not depend on what else is in the batch, on chunked prefill or on
preemption, and must equal a plain non-paged reference (``forward_train``). The prefill role is
checked with a real shared-memory KV transfer into a decode-side cache, then decoded there.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from waits import wait_showing

from actors.engine.engine import Engine, EngineEvents, EngineLimits
from native.kv_cache import KVCache
from native.runner import ModelRunner
from native.sampler import Sampler
from pdbus.messages import Destination, SamplingParams, TokenOut
from pdbus.procs import wait_until

BLOCK_SIZE = 8
PROMPT_LENS = (1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE + 2)
MAX_NEW = 10
WAIT_S = 30.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def prompts(model) -> list[list[int]]:
    rng = random.Random(7)
    vocab = model.cfg.vocab_size
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


# The tiny random model repeats one token under plain greedy; a repetition penalty (applied
# here by hand, in the sampler by the engine) makes every continuation diverse, so that any
# error in the KV of an earlier position shows in the tokens.
PENALTY = 2.0


def reference_greedy(model, prompt: list[int], penalty: float, max_new: int = MAX_NEW) -> list[int]:
    """Greedy continuation from the plain causal forward (no paging, no cache)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(max_new):
            logits = model.forward_train(torch.tensor([ids]))[0, -1]
            if penalty != 1.0:
                seen = torch.tensor(sorted(set(ids)))
                v = logits[seen]
                logits[seen] = torch.where(v > 0, v / penalty, v * penalty)
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def reference(model, prompts) -> list[list[int]]:
    out = [reference_greedy(model, p, PENALTY) for p in prompts]
    assert all(len(set(o)) >= MAX_NEW // 2 for o in out), f"reference not diverse enough: {out}"
    return out


def greedy(
    max_tokens: int = MAX_NEW, repetition_penalty: float = PENALTY, ignore_eos: bool = True, **kw
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=ignore_eos,
        repetition_penalty=repetition_penalty,
        **kw,
    )


class Collector(EngineEvents):
    """Collects engine events; ``wait`` blocks (bounded) until a predicate holds."""

    def __init__(self, on_tokens_hook=None):
        self.cond = threading.Condition()
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.logprobs: dict[str, list[float]] = {}
        self.failed: dict[str, str] = {}
        self.prefilled: dict[str, tuple[TokenOut, int, float]] = {}
        self.reserved: dict[str, list[int] | None] = {}
        self.cached: dict[str, int] = {}  # req -> leading lease blocks from the decode's prefix cache
        self.hook = on_tokens_hook

    def on_tokens(self, items):
        if self.hook is not None:
            self.hook(items)  # on the engine thread, before anything else moves
        with self.cond:
            for item in items:
                self.tokens.setdefault(item.req_id, []).extend(item.token_ids)
                if item.logprobs:
                    self.logprobs.setdefault(item.req_id, []).extend(item.logprobs)
                if item.finish_reason is not None:
                    self.finish[item.req_id] = item.finish_reason
            self.cond.notify_all()

    def on_prefilled(self, req_id, first, nbytes, seconds):
        with self.cond:
            self.prefilled[req_id] = (first, nbytes, seconds)
            self.cond.notify_all()

    def on_failed(self, req_id, error, retryable):
        with self.cond:
            self.failed[req_id] = error
            self.cond.notify_all()

    def on_reserved(self, req_id, block_ids, reason, cached_blocks=0):
        with self.cond:
            self.reserved[req_id] = block_ids
            self.cached[req_id] = cached_blocks
            self.cond.notify_all()

    def wait(self, predicate, what: str, timeout: float = WAIT_S) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; failed: {self.failed}")

    def wait_done(self, req_ids) -> None:
        self.wait(
            lambda: all(r in self.finish or r in self.failed for r in req_ids), f"{list(req_ids)} to finish"
        )


def make_engine(
    model,
    num_blocks: int = 64,
    max_num_batched_tokens: int = 256,
    max_num_seqs: int = 16,
    max_model_len: int = 256,
    eos: set[int] | None = None,
    role: str = "mixed",
    transfers: dict | None = None,
    cache: KVCache | None = None,
    events: Collector | None = None,
    transfer_timeout_s: float = 30.0,
    async_scheduling: bool = False,
    runner=None,
    enable_prefix_caching: bool = True,
    grammars=None,
) -> tuple[Engine, Collector]:
    cfg = model.cfg
    if cache is None:
        cache = KVCache(
            cfg.num_hidden_layers, num_blocks, cfg.num_key_value_heads, BLOCK_SIZE, cfg.head_dim, model.dtype
        )
    events = events or Collector()
    engine = Engine(
        runner or ModelRunner(model, cache, "cpu"),
        Sampler(seed=0),
        events,
        EngineLimits(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            transfer_timeout_s=transfer_timeout_s,
            async_scheduling=async_scheduling,
            enable_prefix_caching=enable_prefix_caching,
        ),
        eos if eos is not None else {cfg.eos_token_id},
        role=role,
        transfer_engines=transfers,
        name=f"test-engine-{role}",
        grammars=grammars,
    )
    return engine, events


def run_batch(
    model, requests: list[tuple[list[int], SamplingParams]], **engine_kw
) -> tuple[Collector, Engine]:
    """All requests queued before the engine starts, so the first step sees all of them."""
    engine, events = make_engine(model, **engine_kw)
    ids = [f"r{i}" for i in range(len(requests))]
    for req_id, (prompt, sampling) in zip(ids, requests):
        engine.add_request(req_id, prompt, sampling)
    engine.start()
    try:
        events.wait_done(ids)
    finally:
        engine.stop()
    assert not engine._thread.is_alive()
    assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    assert not engine.seqs and not engine.scheduler.has_work()
    return events, engine


def outputs(events: Collector, n: int) -> list[list[int]]:
    assert not events.failed, events.failed
    return [events.tokens[f"r{i}"] for i in range(n)]


# --------------------------------------------------------------------------- greedy equivalence


@pytest.mark.parametrize("penalty", [1.0, PENALTY], ids=["plain", "penalty"])
def test_batched_greedy_equals_alone_and_the_unpaged_reference(model, prompts, penalty):
    sampling = greedy(repetition_penalty=penalty)
    events, engine = run_batch(model, [(p, sampling) for p in prompts])
    batched = outputs(events, len(prompts))
    assert all(events.finish[f"r{i}"] == "length" for i in range(len(prompts)))
    assert engine.steps == MAX_NEW  # one step prefilled every prompt together
    alone = [outputs(run_batch(model, [(p, sampling)])[0], 1)[0] for p in prompts]
    assert batched == alone
    assert batched == [reference_greedy(model, p, penalty) for p in prompts]


def test_chunked_prefill_gives_the_same_tokens(model, prompts, reference):
    events, engine = run_batch(model, [(p, greedy()) for p in prompts], max_num_batched_tokens=5)
    assert outputs(events, len(prompts)) == reference
    assert engine.steps > MAX_NEW + sum(PROMPT_LENS) // 5 - 1  # the prompts really were split


def test_preemption_gives_the_same_tokens(model, prompts, reference):
    # the batch needs 16 blocks over its life; 6 force preemption by recompute again and again
    events, engine = run_batch(model, [(p, greedy()) for p in prompts], num_blocks=6)
    assert engine.scheduler.num_preemptions > 0
    assert outputs(events, len(prompts)) == reference


def test_seeded_sampling_is_reproducible_across_batches_and_preemption(model, prompts):
    seeded = SamplingParams(max_tokens=MAX_NEW, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = outputs(run_batch(model, [(prompts[3], seeded)])[0], 1)[0]
    again = outputs(run_batch(model, [(prompts[3], seeded)])[0], 1)[0]
    assert alone == again
    mixed = [(p, greedy()) for p in prompts] + [(prompts[3], seeded)]
    events, engine = run_batch(model, mixed, num_blocks=6)
    assert engine.scheduler.num_preemptions > 0
    assert outputs(events, len(mixed))[-1] == alone
    other_seeds = [
        outputs(run_batch(model, [(prompts[3], SamplingParams(**{**_fields(seeded), "seed": s}))])[0], 1)[0]
        for s in (1, 2, 3)
    ]
    assert any(o != alone for o in other_seeds)  # the seed matters


def _fields(sp: SamplingParams) -> dict:
    import msgspec

    return msgspec.structs.asdict(sp)


def test_logprobs_are_returned_per_token(model, prompts):
    events, _ = run_batch(model, [(prompts[2], greedy(max_tokens=4, logprobs=2))])
    lps = events.logprobs["r0"]
    assert len(lps) == 4 and all(lp <= 0.0 for lp in lps)


# --------------------------------------------------------------------------- finish reasons


def test_max_tokens_finishes_with_length(model, prompts, reference):
    events, _ = run_batch(model, [(prompts[1], greedy(max_tokens=3)), (prompts[4], greedy(max_tokens=1))])
    assert outputs(events, 2) == [reference[1][:3], reference[4][:1]]
    assert events.finish == {"r0": "length", "r1": "length"}


def test_stop_token_ids_finish_with_stop(model, prompts, reference):
    ref = reference[4]
    stop_tok = ref[3]
    cut = ref.index(stop_tok) + 1
    events, _ = run_batch(model, [(prompts[4], greedy(stop_token_ids=[stop_tok]))])
    assert events.tokens["r0"] == ref[:cut]  # the stop token is the last output
    assert events.finish["r0"] == "stop"


def test_eos_ignore_eos_and_min_tokens(model, prompts, reference):
    ref = reference[4]
    eos = ref[2]
    first = ref.index(eos)
    plain = greedy(ignore_eos=False)
    min_tokens = greedy(ignore_eos=False, min_tokens=first + 3)
    requests = [(prompts[4], plain), (prompts[4], greedy()), (prompts[4], min_tokens)]
    events, _ = run_batch(model, requests, eos={eos})
    got = outputs(events, 3)
    assert got[0] == ref[: first + 1] and events.finish["r0"] == "stop"
    assert got[1] == ref and events.finish["r1"] == "length"  # ignore_eos
    # eos is masked until min_tokens outputs exist
    assert len(got[2]) >= first + 3 and eos not in got[2][: first + 3]
    assert got[2][:first] == ref[:first]
    assert events.finish["r2"] == ("stop" if got[2][-1] == eos else "length")


def test_max_model_len_caps_generation_and_rejects_long_prompts(model, prompts):
    limit = 20
    requests = [(prompts[3], greedy(max_tokens=50)), (prompts[4], greedy()), ([5] * limit, greedy())]
    events, _ = run_batch(model, requests, max_model_len=limit)
    assert len(events.tokens["r0"]) == limit - len(prompts[3]) and events.finish["r0"] == "length"
    assert "max_model_len" in events.failed["r1"]  # 26 tokens >= 20
    assert "max_model_len" in events.failed["r2"]


def test_bad_requests_fail_alone(model, prompts, reference):
    vocab = model.cfg.vocab_size
    requests = [(prompts[2], greedy()), ([], greedy()), ([3, vocab], greedy()), ([-1], greedy())]
    events, _ = run_batch(model, requests)
    assert events.tokens["r0"] == reference[2]  # the good request is untouched
    assert "empty" in events.failed["r1"]
    assert "vocabulary" in events.failed["r2"] and "vocabulary" in events.failed["r3"]


def test_a_sequence_longer_than_the_cache_ends_instead_of_waiting_forever(model):
    # 3 blocks of 8 tokens: the sequence ends (length) when it fills the cache
    events, _ = run_batch(model, [([5, 6, 7], greedy(max_tokens=100))], num_blocks=3)
    assert len(events.tokens["r0"]) == 3 * BLOCK_SIZE - 3 and events.finish["r0"] == "length"
    events, _ = run_batch(model, [([5] * 3 * BLOCK_SIZE, greedy())], num_blocks=3)
    assert "exceeds the KV cache" in events.failed["r0"]


def test_duplicate_request_id_is_refused(model, prompts, reference):
    engine, events = make_engine(model)
    engine.add_request("dup", prompts[2], greedy())
    engine.add_request("dup", prompts[3], greedy())
    engine.start()
    try:
        events.wait(lambda: "dup" in events.finish, "dup to finish")
    finally:
        engine.stop()
    assert "duplicate" in events.failed["dup"]
    assert events.tokens["dup"] == reference[2]
    assert engine.blocks.num_free == engine.blocks.num_blocks


# --------------------------------------------------------------------------- abort, load


def test_abort_frees_blocks_and_load_is_safe_from_other_threads(model, prompts):
    engine, events = make_engine(model, num_blocks=64, max_model_len=512)
    engine.add_request("long", prompts[4], greedy(max_tokens=400))
    engine.add_request("short", prompts[0], greedy(max_tokens=2))
    engine.start()
    errors: list[BaseException] = []
    stop = threading.Event()

    def poll_load() -> None:  # like /stats and the bus heartbeat do
        while not stop.is_set():
            try:
                engine.load()
            except BaseException as exc:  # noqa: BLE001 - any error fails the test below
                errors.append(exc)
                return

    poller = threading.Thread(target=poll_load, daemon=True)
    poller.start()
    try:
        events.wait(lambda: len(events.tokens.get("long", [])) >= 3 and "short" in events.finish, "tokens")
        assert engine.blocks.num_free < engine.blocks.num_blocks
        engine.abort("long")
        engine.abort("unknown-request")  # harmless
        wait_showing(
            lambda: (load := engine.load()).free_blocks == load.total_blocks and load.running == 0,
            WAIT_S,
            "blocks freed after the abort",
            engine.load,
            interval=0.01,
        )
        assert "long" not in events.finish and "long" not in events.failed  # abort is silent
        n = len(events.tokens["long"])
        engine.add_request("after", prompts[1], greedy(max_tokens=2))
        events.wait_done(["after"])
        assert len(events.tokens["long"]) == n  # nothing more for the aborted request
    finally:
        stop.set()
        poller.join(5)
        engine.stop()
    assert not errors, errors
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_stop_fails_requests_in_flight(model, prompts):
    engine, events = make_engine(model, max_model_len=1024)
    engine.add_request("forever", prompts[4], greedy(max_tokens=900))
    engine.start()
    events.wait(lambda: len(events.tokens.get("forever", [])) >= 1, "first token")
    engine.stop()
    assert "engine stopped" in events.failed["forever"]
    assert engine.blocks.num_free == engine.blocks.num_blocks


# --------------------------------------------------------------------------- prefill role -> decode


def _layer_kv(cache: KVCache, table: list[int], num_tokens: int) -> list[torch.Tensor]:
    """Per layer, K and V of the first ``num_tokens`` positions: [2, heads, tokens, head_dim]."""
    out = []
    for layer in range(cache.num_layers):
        kv = torch.stack([cache.k[layer][table], cache.v[layer][table]])  # [2, blocks, heads, bs, hd]
        kv = kv.permute(0, 2, 1, 3, 4).reshape(2, cache.num_kv_heads, -1, cache.head_dim)
        out.append(kv[:, :, :num_tokens].clone())
    return out


@pytest.mark.parametrize("budget", [256, 7])
def test_prefill_role_writes_kv_into_decode_blocks(model, prompts, reference, budget):
    from native.transfer.shm import ShmTransfer

    cfg = model.cfg
    prompt = prompts[4]

    # the KV that a mixed run computes (captured while the sequence is still running)
    captured: dict[str, list[int]] = {}
    mixed_engine: Engine | None = None

    def capture(items):
        for item in items:
            seq = mixed_engine.seqs.get(item.req_id)
            if seq is not None and item.req_id not in captured:
                captured[item.req_id] = list(seq.block_table)

    mixed_engine, mixed_events = make_engine(
        model, max_num_batched_tokens=budget, events=Collector(on_tokens_hook=capture)
    )
    mixed_engine.add_request("m", prompt, greedy(max_tokens=2))
    mixed_engine.start()
    try:
        mixed_events.wait_done(["m"])
    finally:
        mixed_engine.stop()
    mixed_kv = _layer_kv(mixed_engine.runner.kv_cache, captured["m"], len(prompt))

    decode_cache = KVCache(
        cfg.num_hidden_layers, 32, cfg.num_key_value_heads, BLOCK_SIZE, cfg.head_dim, model.dtype, shared=True
    )
    receiver = ShmTransfer(decode_cache)
    prefill_cache = KVCache(
        cfg.num_hidden_layers, 32, cfg.num_key_value_heads, BLOCK_SIZE, cfg.head_dim, model.dtype
    )
    sender = ShmTransfer(prefill_cache)
    prefill, p_events = make_engine(
        model, max_num_batched_tokens=budget, role="prefill", transfers={"ipc": sender}, cache=prefill_cache
    )
    decode, d_events = make_engine(model, role="decode", cache=decode_cache)
    prefill.start()
    decode.start()
    try:
        max_tokens = MAX_NEW
        # as the router does it: Reserve (with the prompt) and Prefill (no block ids) at once
        decode.reserve("pd", len(prompt) + max_tokens, 60.0, prompt, None, greedy(max_tokens=max_tokens))
        dest = Destination(instance_id="decode-0", protocol="ipc", endpoint=receiver.endpoint())
        prefill.add_prefill("pd", prompt, greedy(max_tokens=max_tokens), dest)
        d_events.wait(lambda: "pd" in d_events.reserved, "the reservation")
        dest_blocks = d_events.reserved["pd"]
        assert dest_blocks is not None and decode.blocks.num_reserved == len(dest_blocks)
        prefill.dest_ready("pd", dest_blocks)
        p_events.wait(lambda: "pd" in p_events.prefilled or "pd" in p_events.failed, "on_prefilled")
        assert "pd" not in p_events.failed, p_events.failed
        first, nbytes, seconds = p_events.prefilled["pd"]
        assert first.token_ids == [reference[4][0]] == mixed_events.tokens["m"][:1]
        n_blocks = prefill.blocks.blocks_for(len(prompt))
        assert nbytes == 2 * cfg.num_hidden_layers * n_blocks * decode_cache.block_bytes and seconds >= 0
        assert "pd" not in p_events.tokens  # the first token goes out only through on_prefilled
        assert prefill.blocks.num_free == prefill.blocks.num_blocks, "prefill kept its local blocks"
        assert not prefill.export.in_flight

        got_kv = _layer_kv(decode_cache, dest_blocks, len(prompt))
        for layer, (got, want) in enumerate(zip(got_kv, mixed_kv)):
            assert torch.equal(got, want), f"layer {layer}: transferred KV differs from the mixed run's"

        # the decode instance continues from the transferred KV exactly as the mixed run would
        decode.add_decode("pd", first.token_ids[0])  # prompt and sampling came with the reservation
        d_events.wait_done(["pd"])
        assert first.token_ids + d_events.tokens["pd"] == reference[4]
        assert d_events.finish["pd"] == "length"
    finally:
        prefill.stop()
        decode.stop()
        sender.close()
        receiver.close()
        decode_cache.close()
    assert decode.blocks.num_free == decode.blocks.num_blocks and not decode.blocks.leases
    assert prefill.blocks.num_free == prefill.blocks.num_blocks


def test_decode_without_reservation_fails_and_leases_expire(model, prompts):
    engine, events = make_engine(model, role="decode")
    engine.start()
    try:
        engine.add_decode("ghost", 5)
        events.wait(lambda: "ghost" in events.failed, "the failure")
        assert "no reservation" in events.failed["ghost"]
        engine.reserve("lease", 40, 0.05, prompts[2], None, greedy())  # its prompt expires with it
        events.wait(lambda: "lease" in events.reserved, "the reservation")
        assert events.reserved["lease"] is not None
        engine.reserve("too-big", 10_000, lease_s=60.0)
        events.wait(lambda: "too-big" in events.reserved, "the refusal")
        assert events.reserved["too-big"] is None
        wait_until(lambda: engine.load().reserved_blocks == 0, WAIT_S, "the lease expiring", 0.02)
        engine.add_decode("lease", 5)
        events.wait(lambda: "lease" in events.failed, "the failure")
        assert "no reservation" in events.failed["lease"]
    finally:
        engine.stop()
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_stalled_engine_waits_instead_of_spinning(model, prompts, reference):
    # every block leased: the request cannot start until the lease expires, and meanwhile the
    # engine thread must not busy-loop over an empty schedule
    engine, events = make_engine(model, num_blocks=8)
    calls = 0
    schedule = engine.scheduler.schedule

    def counting_schedule():
        nonlocal calls
        calls += 1
        return schedule()

    engine.scheduler.schedule = counting_schedule
    engine.start()
    try:
        engine.reserve("hold", 8 * BLOCK_SIZE, lease_s=0.5)
        events.wait(lambda: "hold" in events.reserved, "the reservation")
        assert engine.blocks.num_free == 0
        engine.add_request("w", prompts[2], greedy())
        events.wait_done(["w"])
    finally:
        engine.stop()
    assert events.tokens["w"] == reference[2]
    assert calls < 1000, f"{calls} schedule() calls while stalled for 0.5 s"
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_bad_destination_fails_only_its_own_prefill(model, prompts, reference):
    from native.transfer.shm import ShmTransfer

    cfg = model.cfg
    cache = KVCache(cfg.num_hidden_layers, 32, cfg.num_key_value_heads, BLOCK_SIZE, cfg.head_dim, model.dtype)
    sender = ShmTransfer(cache)
    engine, events = make_engine(model, role="prefill", transfers={"ipc": sender}, cache=cache)
    gone = {"protocol": "ipc", "kind": "shm", "shm_name": "pdbus-kv-no-such-segment"}
    bad = {
        "proto": Destination(instance_id="d", protocol="rdma", endpoint={}, block_ids=list(range(8))),
        "blocks": Destination(instance_id="d", protocol="ipc", endpoint={}, block_ids=[0]),
        "endpoint": Destination(instance_id="d", protocol="ipc", endpoint=gone, block_ids=list(range(8))),
    }
    for req_id, dest in bad.items():
        engine.add_prefill(req_id, prompts[4], greedy(), dest)
    engine.add_request("good", prompts[4], greedy())  # in the same first step as the bad ones
    engine.start()
    try:
        events.wait_done(["good", *bad])
    finally:
        engine.stop()
        sender.close()
    assert events.tokens["good"] == reference[4]
    assert "no rdma transfer engine" in events.failed["proto"]
    assert "reserved 1 blocks" in events.failed["blocks"]
    assert "failed" in events.failed["endpoint"]
    assert engine.blocks.num_free == engine.blocks.num_blocks


# --------------------------------------------------------------------------- transfer completion


class HeldTransfer:
    """A transfer engine (the neighbour of the engine, faked): writes are counted, and a commit's
    handle completes only when the test completes it."""

    def __init__(self):
        self.handles: dict = {}
        self.committed = threading.Event()
        self.aborted: list[str] = []
        self.writes = 0

    def open_peer(self, peer_id, endpoint) -> None:
        pass

    def write(self, req_id, peer_id, op) -> None:
        self.writes += 1

    def commit(self, req_id, peer_id):
        from native.transfer.base import TransferHandle

        self.handles[req_id] = handle = TransferHandle(req_id)
        self.committed.set()
        return handle

    def abort(self, req_id) -> None:
        self.aborted.append(req_id)
        if req_id in self.handles:
            self.handles[req_id].set_failed("aborted")

    def forget(self, req_id) -> None:  # the engine finished or failed the request
        pass


def _held_prefill(model, prompt, timeout_s: float):
    held = HeldTransfer()
    engine, events = make_engine(model, role="prefill", transfers={"held": held}, transfer_timeout_s=timeout_s)
    dest = Destination(instance_id="decode-0", protocol="held", endpoint={}, block_ids=list(range(8)))
    engine.add_prefill("p", prompt, greedy(), dest)
    return held, engine, events


def test_a_landed_transfer_wakes_the_idle_engine_at_once(model, prompts, reference):
    held, engine, events = _held_prefill(model, prompts[4], timeout_s=3600.0)
    engine.start()
    try:
        assert held.committed.wait(WAIT_S), "the prefill never committed its KV"
        # while the KV is in flight the engine sleeps on its inbox until the transfer's deadline
        waits: list = []
        probed = threading.Event()
        engine.submit(lambda: (waits.append(engine._wait_s()), probed.set()))
        assert probed.wait(WAIT_S)
        assert waits[0] > 3000, f"the engine wakes every {waits[0]}s while a transfer is in flight"
        assert "p" not in events.prefilled
        landed = time.monotonic()
        threading.Thread(target=held.handles["p"].set_done, args=(1234, 0.25)).start()
        events.wait(lambda: "p" in events.prefilled, "on_prefilled", timeout=5.0)
        assert time.monotonic() - landed < 5.0
    finally:
        engine.stop()
    first, nbytes, seconds = events.prefilled["p"]
    assert first.token_ids == reference[4][:1] and (nbytes, seconds) == (1234, 0.25)
    assert held.writes == model.cfg.num_hidden_layers and not held.aborted
    assert not engine.export.in_flight and engine.blocks.num_free == engine.blocks.num_blocks


def test_a_transfer_that_never_lands_fails_at_its_deadline(model, prompts):
    held, engine, events = _held_prefill(model, prompts[4], timeout_s=0.3)
    started = time.monotonic()
    engine.start()
    try:
        events.wait(lambda: "p" in events.failed, "the timeout", timeout=10.0)
        elapsed = time.monotonic() - started
    finally:
        engine.stop()
    assert "timed out" in events.failed["p"] and "p" not in events.prefilled
    assert 0.3 <= elapsed < 10.0
    assert held.aborted == ["p"]  # the transfer engine dropped its writes
    assert not engine.export.in_flight and engine.blocks.num_free == engine.blocks.num_blocks


# --------------------------------------------------------------------------- the destination comes later


def test_a_prefill_computes_before_its_destination_and_waits_only_at_the_last_chunk(model, prompts, reference):
    held = HeldTransfer()
    engine, events = make_engine(model, role="prefill", transfers={"held": held}, max_num_batched_tokens=BLOCK_SIZE)
    prompt = prompts[4]  # 3 full chunks + 2 tokens under a budget of one block
    engine.add_prefill("p", prompt, greedy(), Destination(instance_id="decode-0", protocol="held", endpoint={}))
    engine.add_request("other", prompts[1], greedy())  # behind it in the queue: must not wait with it
    schedule = engine.scheduler.schedule
    held_back = threading.Event()  # a step found only the prefill, and held it back

    def watching_schedule():
        batch = schedule()
        if not batch and "p" in engine.seqs:
            held_back.set()
        return batch

    engine.scheduler.schedule = watching_schedule
    engine.start()
    try:
        events.wait_done(["other"])
        assert held_back.wait(WAIT_S)
        probe: list = []
        probed = threading.Event()
        engine.submit(lambda: (probe.append((engine.seqs["p"].num_computed_tokens, engine._wait_s())), probed.set()))
        assert probed.wait(WAIT_S)
        computed, wait = probe[0]
        assert computed == 3 * BLOCK_SIZE, f"{computed} of {len(prompt)} computed: every chunk but the last runs at once"
        assert wait is None or wait > 10, f"the waiting prefill wakes the engine every {wait}s"
        assert not held.committed.is_set() and held.writes == 0 and "p" not in events.prefilled
        engine.dest_ready("p", list(range(8)))
        assert held.committed.wait(WAIT_S), "the last chunk never ran after its destination came"
        held.handles["p"].set_done(1, 0.0)
        events.wait(lambda: "p" in events.prefilled, "on_prefilled")
    finally:
        engine.stop()
    assert events.prefilled["p"][0].token_ids == reference[4][:1], "the same token one as the mixed run"
    assert events.tokens["other"] == reference[1]
    assert held.writes == model.cfg.num_hidden_layers, "one write per layer in the last chunk's step"
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_destination_that_never_comes_fails_the_prefill_and_frees_its_blocks(model, prompts):
    held = HeldTransfer()
    engine, events = make_engine(model, role="prefill", transfers={"held": held})
    engine.limits.dest_timeout_s = 0.3
    engine.add_prefill("p", prompts[4], greedy(), Destination(instance_id="decode-0", protocol="held", endpoint={}))
    engine.start()
    try:
        events.wait(lambda: "p" in events.failed, "the failure", timeout=10.0)
        engine.dest_ready("p", list(range(8)))  # too late: ignored
        engine.submit(lambda: None)
    finally:
        engine.stop()
    assert "no destination" in events.failed["p"] and not held.committed.is_set()
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.seqs


def test_a_destination_too_small_for_the_prompt_fails_the_prefill(model, prompts):
    held = HeldTransfer()
    engine, events = make_engine(model, role="prefill", transfers={"held": held})
    engine.add_prefill("p", prompts[4], greedy(), Destination(instance_id="decode-0", protocol="held", endpoint={}))
    engine.dest_ready("p", [0])
    engine.start()
    try:
        events.wait(lambda: "p" in events.failed, "the failure")
    finally:
        engine.stop()
    assert "reserved 1 blocks" in events.failed["p"] and held.writes == 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_lease_without_its_prompt_cannot_be_decoded(model):
    engine, events = make_engine(model, role="decode")
    engine.start()
    try:
        engine.reserve("bare", 16, 60.0)
        events.wait(lambda: "bare" in events.reserved, "the reservation")
        engine.add_decode("bare", 5)
        events.wait(lambda: "bare" in events.failed, "the failure")
    finally:
        engine.stop()
    assert "carries no prompt" in events.failed["bare"]
    assert engine.blocks.num_free == engine.blocks.num_blocks
