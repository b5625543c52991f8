"""Structured output (actors/engine/grammar.py) on the CPU: compiling every kind, the bounded
cache, a random-logits row under a schema that ends as valid JSON; then the engine with the
built-in model and its tokenizer: a json_schema output that parses and fits the schema (greedy
and seeded, seeded reproducible), ``length`` when max_tokens is too small, a bad grammar failing
its request alone, a slow compile holding only its own request, asynchronous scheduling giving
the same tokens, and a decode claiming a lease (token one accepted first) drawing what mixed draws.
"""

from __future__ import annotations

import json
import threading

import pytest
import test_engine
import torch
from test_engine import Collector

from actors.engine.engine import Engine
from actors.engine.grammar import GrammarError, Grammars
from actors.frontend.tokenizer import Tokenizer
from native.model.loader import load_model
from pdbus.messages import FinishReason, SamplingParams, StructuredOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "kind", "ok"],
}
JSON_SCHEMA = StructuredOutput("json_schema", json.dumps(SCHEMA))


def check_schema(doc) -> None:
    """SCHEMA checked by hand (jsonschema is not a dependency)."""
    assert isinstance(doc, dict) and set(doc) == {"name", "age", "kind", "ok"}, doc
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 12
    assert isinstance(doc["age"], int) and not isinstance(doc["age"], bool) and 0 <= doc["age"] <= 150
    assert doc["kind"] in ("cat", "dog", "bird") and isinstance(doc["ok"], bool)


@pytest.fixture(scope="module")
def tok(default_model_dir) -> Tokenizer:
    return Tokenizer(default_model_dir)


@pytest.fixture(scope="module")
def model(default_model_dir):
    m, _ = load_model(default_model_dir, dtype="float32", device="cpu")
    return m.eval()


@pytest.fixture
def grammars(tok, model):
    g = Grammars(tok, tok.eos_token_ids)
    yield g
    g.close()


# ---------------------------------------------------------------------------------------- units


def _walk(grammars: Grammars, spec: StructuredOutput, seed: int, max_steps: int = 400) -> list[int]:
    """Random logits masked by the grammar, one token at a time, until the matcher terminates."""
    grammar = grammars.start(spec, lambda: None)
    grammar.future.result(timeout=60)
    assert grammar.bind([]) is None
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []

    class Row:  # what Grammars.fill reads of a sequence
        pass

    row = Row()
    row.grammar = grammar
    for _ in range(max_steps):
        # logits wider than the tokenizer (a model's padded vocabulary), the padding the likeliest
        logits = torch.randn(1, grammars.vocab_size + PADDING, generator=gen)
        logits[:, grammars.vocab_size :] += 30.0
        fill = grammars.fill([row])
        fill.apply(logits)
        tok = int(torch.softmax(logits, -1).multinomial(1, generator=gen))
        assert grammar.accept(tok), tok
        out.append(tok)
        if grammar.terminated:
            return out
    raise AssertionError(f"no end within {max_steps} tokens")


PADDING = 96  # logits columns past the tokenizer's ids in the walks


def test_padding_past_the_tokenizer_is_banned_in_grammar_rows_only(grammars):
    class Row:
        grammar = None

    plain, constrained = Row(), Row()
    constrained.grammar = grammars.start(JSON_SCHEMA, lambda: None)
    constrained.grammar.future.result(timeout=60)
    assert constrained.grammar.bind([]) is None
    width = grammars.vocab_size
    assert grammars.fill([plain]) is None  # no grammar row: nothing to mask
    logits = torch.randn(2, width + PADDING)
    before = logits.clone()
    fill = grammars.fill([plain, constrained])
    assert fill.bitmask.shape[1] == (width + 31) // 32  # the tokenizer's ids, not the padding's
    fill.apply(logits)
    assert torch.equal(logits[0], before[0])  # the row without a grammar is untouched
    assert torch.isinf(logits[1, width:]).all() and (logits[1, width:] < 0).all()
    allowed = torch.isfinite(logits[1, :width])
    assert 0 < int(allowed.sum()) < width  # the grammar's own mask over the tokenizer's ids


def test_random_logits_under_a_schema_give_valid_json(grammars, tok):
    for seed in range(3):
        out = _walk(grammars, JSON_SCHEMA, seed)
        assert out[-1] in tok.eos_token_ids  # the stop token the grammar accepted
        # strict: the bounded string ("name") admits no raw control byte (<0x05>), which random
        # logits would pick (test_a_bounded_string_admits_no_control_character)
        check_schema(json.loads(tok.decode(out)))


def test_a_bounded_string_admits_no_control_character(grammars):
    """xgrammar lowers a string under maxLength to a class that admits U+0000-U+001F but CR and
    LF (mlc-ai/xgrammar#800); the engine compiles it with JSON's string class instead."""
    bounded = StructuredOutput("json_schema", json.dumps({"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}}}))
    for text, ok in (('{"s": "北京"}', True), ('{"s": "a\x01', False), ('{"s": "a\t', False), ('{"s": "123456789', False)):
        grammar = grammars.start(bounded, lambda: None)
        grammar.future.result(timeout=60)
        assert grammar.bind([]) is None and grammar.matcher.accept_string(text) is ok, text


def test_every_kind_compiles_and_holds(grammars, tok):
    obj = grammars.start(StructuredOutput("json_object"), lambda: None)
    obj.future.result(timeout=60)
    assert obj.bind([]) is None and obj.matcher.accept_string('{"a": [1, {"b": null}], "c": "d"}')
    assert obj.accept(min(tok.eos_token_ids)) and obj.terminated
    array = grammars.start(StructuredOutput("json_object"), lambda: None)
    assert array.bind([]) is None and not array.matcher.accept_string("[1]")  # an object, nothing else
    assert tok.decode(_walk(grammars, StructuredOutput("choice", json.dumps(["yes", "no"])), 1)) in ("yes", "no")
    text = tok.decode(_walk(grammars, StructuredOutput("regex", r"[0-9]{3}-[a-c]{2}"), 2))
    assert len(text) == 6 and text[:3].isdigit() and text[3] == "-" and set(text[4:]) <= set("abc")
    ebnf = 'root ::= "x=" [0-9] [0-9]? ";"'
    text = tok.decode(_walk(grammars, StructuredOutput("ebnf", ebnf), 3))
    assert text.startswith("x=") and text.endswith(";") and text[2:-1].isdigit()


def test_the_cache_compiles_a_spec_once_and_stays_bounded(tok, model):
    grammars = Grammars(tok, tok.eos_token_ids, cache_size=2)
    try:
        first = grammars.compile(JSON_SCHEMA)
        assert grammars.compile(JSON_SCHEMA) is first
        first.result(timeout=60)
        assert grammars.compiled == 1
        for i in range(3):  # three other specs push the schema out of a cache of two
            grammars.compile(StructuredOutput("regex", f"a{{{i + 1}}}")).result(timeout=60)
        assert len(grammars._cache) == 2
        assert grammars.compile(JSON_SCHEMA) is not first
    finally:
        grammars.close()


@pytest.mark.parametrize(
    "spec",
    [
        StructuredOutput("json_schema", "{not json"),
        StructuredOutput("regex", "(unclosed"),
        StructuredOutput("ebnf", "root ::= undefined_rule"),
        StructuredOutput("choice", "[]"),
        StructuredOutput("xml", "<a/>"),
    ],
)
def test_a_bad_spec_fails_with_a_clear_error(grammars, spec):
    with pytest.raises(GrammarError, match=spec.kind):
        grammars.compile(spec).result(timeout=60)


# ---------------------------------------------------------------------------------------- engine


def make_engine(model, tok, *, grammars: Grammars | None = None, **kw):
    """tests/test_engine.py's engine on the built-in model, with its tokenizer's grammars."""
    grammars = grammars or Grammars(tok, tok.eos_token_ids)
    return test_engine.make_engine(model, num_blocks=128, max_model_len=512, eos=tok.eos_token_ids, grammars=grammars, **kw)


def run(model, tok, requests, **kw) -> tuple[Collector, Engine]:
    """tests/test_engine.py's ``run_batch`` (every block free after, nothing left)."""
    return test_engine.run_batch(model, requests, num_blocks=128, max_model_len=512, eos=tok.eos_token_ids,
                                 grammars=Grammars(tok, tok.eos_token_ids), **kw)  # fmt: skip


def _prompt(tok, text: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": text}])


GREEDY = SamplingParams(max_tokens=120, temperature=0.0, structured=JSON_SCHEMA)
SEEDED = SamplingParams(max_tokens=120, temperature=1.0, top_p=0.95, seed=7, structured=JSON_SCHEMA)


def test_engine_json_schema_greedy_and_seeded(model, tok):
    prompts = [_prompt(tok, "Who are you?"), _prompt(tok, "你好，请介绍一下自己。")]
    plain = SamplingParams(max_tokens=10, temperature=0.0)
    requests = [(prompts[0], GREEDY), (prompts[1], SEEDED), (prompts[0], plain), (prompts[1], SEEDED)]
    events, _ = run(model, tok, requests)
    assert not events.failed, events.failed
    for r in ("r0", "r1", "r3"):
        assert events.finish[r] == FinishReason.STOP
        assert events.tokens[r][-1] in tok.eos_token_ids
        check_schema(json.loads(tok.decode(events.tokens[r])))
    assert events.tokens["r1"] == events.tokens["r3"]  # seeded: the same draw
    alone, _ = run(model, tok, [requests[2]])  # the row without a grammar is untouched
    assert events.tokens["r2"] == alone.tokens["r0"]


def test_max_tokens_before_the_grammar_ends_is_length(model, tok):
    events, _ = run(model, tok, [(_prompt(tok, "Who are you?"), SamplingParams(max_tokens=4, temperature=0.0, structured=JSON_SCHEMA))])
    assert events.finish["r0"] == FinishReason.LENGTH and len(events.tokens["r0"]) == 4


def test_a_bad_grammar_fails_its_request_alone(model, tok):
    bad = SamplingParams(max_tokens=8, structured=StructuredOutput("regex", "(unclosed"))
    good = SamplingParams(max_tokens=8, temperature=0.0)
    events, _ = run(model, tok, [(_prompt(tok, "hi"), bad), (_prompt(tok, "hi"), good)])
    assert events.failed["r0"].startswith("regex does not compile: Regex parsing error"), events.failed
    assert events.finish["r1"] in (FinishReason.STOP, FinishReason.LENGTH) and "r1" not in events.failed


def test_a_compiling_grammar_holds_only_its_own_request(model, tok):
    grammars = Grammars(tok, tok.eos_token_ids)
    gate = threading.Event()
    grammars._compile_pool.submit(gate.wait, 60)  # the compile thread is busy until the gate opens
    engine, events = make_engine(model, tok, grammars=grammars)
    engine.add_request("held", _prompt(tok, "Who are you?"), GREEDY)
    engine.add_request("free", _prompt(tok, "hi"), SamplingParams(max_tokens=6, temperature=0.0))
    engine.start()
    try:
        events.wait_done(["free"])
        assert "held" not in events.finish and not events.tokens.get("held")
        gate.set()
        events.wait_done(["held"])
    finally:
        gate.set()
        engine.stop()
    check_schema(json.loads(tok.decode(events.tokens["held"])))


def test_async_scheduling_gives_the_same_tokens(model, tok):
    prompts = [_prompt(tok, "Who are you?"), _prompt(tok, "hi")]
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    requests = [(prompts[0], GREEDY), (prompts[1], plain), (prompts[1], SEEDED)]
    base, _ = run(model, tok, requests)
    ahead, engine = run(model, tok, requests, async_scheduling=True)
    assert ahead.tokens == base.tokens and ahead.finish == base.finish
    assert engine.steps_ahead > 0  # grammar rows run a step ahead too (masks filled after landing)


def test_grammar_rows_alone_run_ahead_and_end_where_the_grammar_ends(model, tok):
    """Every row under a grammar, asynchronous scheduling on: the steps run ahead, each output is
    what the synchronous engine draws, ends with stop where the grammar ends (its row in the step
    after dropped) and leaves no block behind."""
    prompts = [_prompt(tok, "Who are you?"), _prompt(tok, "hi"), _prompt(tok, "你好")]
    requests = [(p, GREEDY) for p in prompts] + [(prompts[0], SEEDED)]
    base, _ = run(model, tok, requests)
    ahead, engine = run(model, tok, requests, async_scheduling=True)
    assert ahead.tokens == base.tokens and ahead.finish == base.finish
    assert engine.steps_ahead > 10
    for r in ahead.tokens:
        assert ahead.finish[r] == FinishReason.STOP
        check_schema(json.loads(tok.decode(ahead.tokens[r])))


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_decode_accepts_token_one_and_draws_what_mixed_draws(model, tok, sampling):
    prompt = _prompt(tok, "Who are you?")
    mixed, _ = run(model, tok, [(prompt, sampling)])
    want = mixed.tokens["r0"]
    # the prefill's part: the prompt's KV computed into the decode's lease (as a transfer would
    # land it) and mixed's token one; the decode's matcher must start from that token
    engine, events = make_engine(model, tok, role="decode")
    engine.reserve("d", len(prompt) + 1, 30.0, prompt, [], sampling)
    engine.start()
    try:
        events.wait(lambda: "d" in events.reserved, "the lease")
        _fill_lease_kv(engine, prompt)
        engine.add_decode("d", want[0])
        events.wait_done(["d"])
    finally:
        engine.stop()
    assert not events.failed, events.failed
    assert [want[0], *events.tokens["d"]] == want and events.finish["d"] == mixed.finish["r0"]


def _fill_lease_kv(engine: Engine, prompt: list[int]) -> None:
    """Compute the prompt's KV into the decode's leased blocks, as a prefill's transfer would."""
    done = threading.Event()

    def compute():
        block_ids = engine.blocks.leases["d"].block_ids
        engine.runner.execute([prompt], [0], [block_ids], [])
        done.set()

    engine.submit(compute)
    assert done.wait(60)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_masks_on_the_gpu_equal_the_cpu_masks(grammars, tok):
    """The bitmask copied to the device and applied there (xgrammar's Triton kernel, or its
    torch path) bans exactly what the CPU path bans, for a batch with rows left unmasked."""
    matchers = [grammars.start(JSON_SCHEMA, lambda: None) for _ in range(2)]  # one per sequence
    for grammar in matchers:
        grammar.future.result(timeout=60)
        assert grammar.bind([]) is None

    class Row:
        def __init__(self, g):
            self.grammar = g

    rows = [Row(matchers[0]), Row(None), Row(matchers[1])]
    gen = torch.Generator().manual_seed(0)
    cpu = torch.randn(3, grammars.vocab_size + PADDING, generator=gen)  # a padded model vocabulary
    cuda = cpu.to("cuda")
    grammars.fill(rows).apply(cpu)
    grammars.fill(rows).apply(cuda)
    torch.cuda.synchronize()
    assert torch.equal(cuda.cpu(), cpu)
    assert torch.isinf(cpu[0]).any() and not torch.isinf(cpu[1]).any()
    assert torch.isinf(cpu[[0, 2], grammars.vocab_size :]).all()
