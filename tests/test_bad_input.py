"""Bad input, class by class, without a model: every one is a 4xx in OpenAI's error shape and costs
nothing else (the backend is never asked), and no input at all yields a 5xx.

Three layers: the parser (``protocol.py``: every field given every wrong type, every number out
of range), the one preparation path (``OpenAIServer.prepare``, shared with bus clients), and
HTTP — an ``OpenAIServer`` on a real loopback port (picked at run time) in front of a backend
that counts what it is asked and streams made-up tokens. ``tests/test_fuzz.py`` sends the same
classes through a real router to real prefill and decode processes.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import socket
import threading

import msgspec
import pytest
from aiohttp import web

from actors.frontend import protocol as P
from actors.frontend.server import OpenAIServer
from actors.frontend.tokenizer import Tokenizer, TokenizerError
from pdbus.messages import SEED_RANGE, Generate, SamplingParams, TokenOut

MODEL = "m"
MAX_LEN = 64
VOCAB = 1024  # the built-in model's
MAX_BODY = 8 << 20


# --------------------------------------------------------------------------- parser, field by field

WRONG_VALUES = [
    True, False, 0, 1, -1, 7, 2**70, -(2**70), 1.5, -0.0, 1e308, -1e308, "x", "", "\x00", "\ud800",
    [], [1], ["a"], [[1]], [None], [[[[[[[[1]]]]]]]], {}, {"a": 1}, {"type": "x"}, {"type": "text"},
]  # fmt: skip
FIELDS = [
    "model", "prompt", "max_tokens", "max_completion_tokens", "n", "best_of", "stream", "stream_options",
    "top_k", "seed", "stop_token_ids", "min_tokens", "logit_bias", "temperature", "top_p", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "stop", "return_token_ids",
    "include_stop_str_in_output", "skip_special_tokens", "user", "logprobs", "echo", "suffix", "messages",
    "top_logprobs", "tools", "functions", "tool_choice", "response_format", "chat_template_kwargs",
    "enable_thinking", "add_generation_prompt",
]  # fmt: skip
COMPLETION = {"prompt": [1, 2], "max_tokens": 3, "stream": True}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


def _parse_all_the_way(parse, body) -> None:
    req = parse(body, model_names=[MODEL], max_model_len=MAX_LEN, vocab_size=VOCAB)
    P.resolve_max_tokens(req, 5, MAX_LEN)
    for i in range(req.n):  # what a request holds must cross the bus: msgpack has no int past 64 bits
        msgspec.msgpack.encode(P.choice_sampling(req, i))


def _message_variants(value):
    yield [{"role": "user", "content": value}]
    yield [{"role": value, "content": "x"}]
    yield [{"role": "user", "content": [value]}]
    yield [{"role": "user", "content": [{"type": "text", "text": value}]}]
    yield [{"role": "user", "content": "x", "name": value}]
    yield [value]


def test_every_field_of_any_type_is_parsed_or_refused_with_an_openai_error():
    surprises = []
    for field, value in itertools.product(FIELDS, WRONG_VALUES):
        bodies = [(P.parse_completion_request, dict(COMPLETION, **{field: value}))]
        bodies.append((P.parse_chat_request, dict(CHAT, **{field: value})))
        bodies += [(P.parse_chat_request, dict(CHAT, messages=m)) for m in _message_variants(value)]
        for parse, body in bodies:
            try:
                _parse_all_the_way(parse, body)
            except P.OpenAIError as exc:
                assert 400 <= exc.status < 500 and exc.message and len(exc.message) < 400, exc.message
            except Exception as exc:  # noqa: BLE001 (the point of the test)
                surprises.append(f"{parse.__name__} {field}={value!r}: {type(exc).__name__}: {exc}")
    assert not surprises, "\n".join(surprises[:20])


def refused(parse, **body) -> P.OpenAIError:
    with pytest.raises(P.OpenAIError) as info:
        _parse_all_the_way(parse, body)
    return info.value


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("messages", "hi", "non-empty list"),
        ("messages", {"role": "user"}, "non-empty list"),
        ("messages", [{"role": "user", "content": 5}], "string or a list of text parts"),
        ("messages", [{"role": ["user"], "content": "x"}], "must be one of"),
        ("messages", [{"role": "user", "content": "a\ud800b"}], "lone UTF-16 surrogate (U+D800) at position 1"),
        ("messages", [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}], "surrogate"),
        ("messages", [{"role": "user", "content": "x", "name": "\ud800"}], "surrogate"),
        ("stop", {"a": 1}, "string or a list"),
        ("stop", ["\ud800"], "surrogate"),
        ("n", "2", "integer"),
        ("logprobs", 0.5, "boolean"),
        ("temperature", float("nan"), "finite"),
        ("top_p", float("inf"), "finite"),
        ("presence_penalty", -float("inf"), "finite"),
        ("max_tokens", 1e400, "integer"),
        ("seed", SEED_RANGE[1] + 1, "between"),
        ("seed", 1.0, "integer"),
        ("stop_token_ids", [VOCAB], f"token id {VOCAB}"),
        ("stop_token_ids", [10**30], "out of range"),
        ("chat_template_kwargs", {"a": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]}, "nested"),
        ("chat_template_kwargs", {"a": "\ud800"}, "surrogate"),
        ("model", "gpt-17", "gpt-17"),
    ],
)
def test_chat_field_refused(field, value, words):
    err = refused(P.parse_chat_request, **dict(CHAT, **{field: value}))
    assert words in err.message, err.message
    assert err.status == (404 if field == "model" else 400)
    assert set(err.to_dict()) == {"error"} and set(err.to_dict()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ([5, VOCAB], f"token id {VOCAB}"),
        ([5, -1], "token id -1"),
        ([5, 2**70], "out of range"),
        ("\ud800", "surrogate"),
        ({"a": 1}, "string or a list of token ids"),
        ([1.5], "token ids"),
        ([], "empty"),
    ],
)
def test_completion_prompt_refused(prompt, words):
    err = refused(P.parse_completion_request, **dict(COMPLETION, prompt=prompt))
    assert err.status == 400 and err.param == "prompt" and words in err.message, err.message


def test_a_prompt_with_other_control_characters_is_text():
    req = P.parse_completion_request(
        dict(COMPLETION, prompt="bell \x07 escape \x1b form \x0c"), model_names=[MODEL], max_model_len=MAX_LEN
    )
    assert req.prompt.startswith("bell \x07")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b'{"prompt": [1, 2',
        b"\xff\xfe{}",
        b'{"prompt": "\xc3"}',  # truncated UTF-8
        b'{"prompt": "\\ud800"}',
        b'{"prompt": "\\udc00x"}',
        b'{"prompt": "a\x01b"}',  # a raw control character inside a string
        b'{"temperature": NaN}',
        b'{"temperature": Infinity}',
        b'{"temperature": -Infinity}',
        b'{"temperature": 1e400}',
        b'{"seed": ' + b"9" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"{" * 50_000,
    ],
    ids=lambda raw: repr(raw[:24]),
)
def test_parse_json_refuses_all_but_strict_json(raw):
    with pytest.raises(P.OpenAIError) as info:
        P.parse_json(raw)
    assert info.value.status == 400 and "not valid JSON" in info.value.message


def test_parse_json_takes_surrogate_pairs_and_escaped_controls():
    assert P.parse_json(b'{"p": "\\ud83d\\ude00 \\u0007"}') == {"p": "\U0001f600 \x07"}


def test_seeds_of_n_choices_wrap_into_the_bus_range():
    req = P.parse_completion_request(
        dict(COMPLETION, n=3, seed=SEED_RANGE[1] - 1), model_names=[MODEL], max_model_len=MAX_LEN
    )
    seeds = [P.choice_sampling(req, i).seed for i in range(3)]
    assert seeds == [SEED_RANGE[1] - 1, SEED_RANGE[1], 0]  # 2**64 wrapped: the same 64 bits


def test_top_k_past_any_vocabulary_is_off_and_fits_the_bus():
    req = P.parse_completion_request(dict(COMPLETION, top_k=2**70), model_names=[MODEL], max_model_len=MAX_LEN)
    assert req.sampling.top_k == P.MAX_TOKEN_ID


# --------------------------------------------------------------------------- one preparation path


class CountingBackend:
    """A backend that streams ``max_tokens`` made-up tokens and counts what it was asked."""

    def __init__(self):
        self.calls = 0
        self.fail: Exception | None = None  # raised by generate: the 'bug' a handler did not expect

    def ready(self) -> bool:
        return True

    def stats(self) -> dict:
        return {}

    async def generate(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        for i in range(sampling.max_tokens):
            await asyncio.sleep(0)
            yield TokenOut(req_id, [10 + i % 50], finish_reason="length" if i == sampling.max_tokens - 1 else None)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer(default_model_dir)


@pytest.fixture
def frontend(tokenizer) -> OpenAIServer:
    return OpenAIServer(CountingBackend(), tokenizer, MODEL, MAX_LEN, vocab_size=VOCAB)


def test_bus_clients_take_the_http_checks(frontend):
    def prepare(**kw):
        return frontend.prepare(*P.generate_body(Generate(req_id="r", **kw)))

    for kw, words in [
        (dict(prompt_token_ids=[5, VOCAB + 3]), f"token id {VOCAB + 3}"),
        (dict(prompt="x", sampling=SamplingParams(max_tokens=MAX_LEN)), "max_tokens"),
        (dict(prompt_token_ids=[5] * 60, sampling=SamplingParams(max_tokens=10)), "context length"),
        (dict(prompt=""), "empty"),
        (dict(messages=[{"role": "user", "content": 3}]), "content"),
        (dict(messages=[]), "non-empty"),
        (dict(prompt="x", sampling=SamplingParams(temperature=float("nan"))), "temperature"),
        (dict(prompt="x", sampling=SamplingParams(top_p=0.0)), "top_p"),
        (dict(prompt="x", sampling=SamplingParams(logprobs=99)), "logprobs"),
    ]:
        with pytest.raises(P.OpenAIError) as info:
            prepare(**kw)
        assert info.value.status == 400 and words in info.value.message, (kw, info.value.message)
    req, ids = prepare(messages=[{"role": "user", "content": "hi"}], sampling=SamplingParams(max_tokens=4, logprobs=2))
    assert ids and req.sampling.max_tokens == 4 and req.sampling.logprobs == 2
    req, ids = prepare(prompt_token_ids=[5, 6], sampling=SamplingParams(max_tokens=3, seed=9))
    assert ids == [5, 6] and req.sampling.seed == 9
    assert frontend.backend.calls == 0


def test_the_tokenizer_refuses_a_lone_surrogate(tokenizer):
    with pytest.raises(TokenizerError, match="surrogate"):
        tokenizer.encode("ok \ud800")


# --------------------------------------------------------------------------- HTTP


class Served:
    """``frontend`` behind aiohttp on a loopback port picked at run time, on its own thread."""

    def __init__(self, frontend: OpenAIServer):
        self.frontend = frontend
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10), "the test server did not start"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=MAX_BODY)
        self.frontend.add_routes(app)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def request(self, method: str, path: str, data: bytes | None = None) -> tuple[int, dict, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, dict(resp.getheaders()), json.loads(raw) if raw[:1] == b"{" else {"raw": raw}
        finally:
            conn.close()


@pytest.fixture
def served(frontend):
    s = Served(frontend)
    yield s
    s.close()


def _body(**kw) -> bytes:
    return json.dumps(dict({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2}, **kw)).encode()


def _chat(content) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}).encode()


BAD_HTTP = [
    # id, method, path, raw body, status, words the message must hold
    ("unparseable", "POST", "/v1/completions", b'{"prompt": [1', 400, "not valid JSON"),
    ("empty-body", "POST", "/v1/completions", b"", 400, "not valid JSON"),
    ("deep-array", "POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
    ("deep-field", "POST", "/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "JSON"),
    ("surrogate-chat", "POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "JSON"),
    ("surrogate-prompt", "POST", "/v1/completions", b'{"prompt": "x\\udfff"}', 400, "JSON"),
    ("raw-control", "POST", "/v1/completions", b'{"prompt": "x\x02y"}', 400, "JSON"),
    ("messages-not-list", "POST", "/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
    ("content-number", "POST", "/v1/chat/completions", _chat(5), 400, "content"),
    ("stop-dict", "POST", "/v1/completions", _body(stop={"a": 1}), 400, "stop"),
    ("n-string", "POST", "/v1/completions", _body(n="2"), 400, "'n'"),
    ("logprobs-float", "POST", "/v1/completions", _body(logprobs=1.5), 400, "logprobs"),
    ("temperature-nan", "POST", "/v1/completions", _body()[:-1] + b', "temperature": NaN}', 400, "JSON"),
    ("top-p-infinity", "POST", "/v1/completions", _body()[:-1] + b', "top_p": Infinity}', 400, "JSON"),
    ("max-tokens-1e400", "POST", "/v1/completions", _body()[:-1] + b', "max_tokens": 1e400}', 400, "JSON"),
    ("penalty-1e400", "POST", "/v1/completions", _body()[:-1] + b', "presence_penalty": -1e400}', 400, "JSON"),
    ("seed-huge", "POST", "/v1/completions", _body(seed=2**64), 400, "seed"),
    ("seed-5000-digits", "POST", "/v1/completions", _body()[:-1] + b', "seed": ' + b"7" * 5000 + b"}", 400, "JSON"),
    ("token-out-of-vocab", "POST", "/v1/completions", _body(prompt=[5, VOCAB + 7]), 400, str(VOCAB + 7)),
    ("prompt-too-long", "POST", "/v1/completions", _body(prompt=[5] * (MAX_LEN + 1)), 400, str(MAX_LEN)),
    ("unknown-model", "POST", "/v1/completions", _body(model="gpt-17"), 404, "gpt-17"),
    ("oversized-64mib", "POST", "/v1/completions", b'{"prompt": "' + b"a" * (64 << 20) + b'"}', 413, "too large"),
    ("wrong-path", "POST", "/v1/nothing", _body(), 404, "/v1/nothing"),
    ("wrong-method", "GET", "/v1/completions", None, 405, "GET"),
    ("wrong-method-models", "POST", "/v1/models", _body(), 405, "POST"),
]


@pytest.mark.parametrize(
    "method,path,data,status,words", [c[1:] for c in BAD_HTTP], ids=[c[0] for c in BAD_HTTP]
)
def test_bad_http_input_gets_a_4xx_openai_error_and_reserves_nothing(served, method, path, data, status, words):
    got, headers, body = served.request(method, path, data)
    assert got == status, body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err
    if status == 405:
        assert "POST" in headers.get("Allow", "") or "GET" in headers.get("Allow", "")
    assert served.frontend.backend.calls == 0
    ok, _, answer = served.request("POST", "/v1/completions", _body(max_tokens=3))
    assert ok == 200 and answer["usage"]["completion_tokens"] == 3


def test_escaped_control_characters_are_text_and_served(served):
    got, _, body = served.request("POST", "/v1/chat/completions", _chat("bell \u0007 esc \u001b"))
    assert got == 200 and body["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("stream", [False, True])
def test_an_unexpected_exception_is_an_openai_500_logged_in_one_line(served, caplog, stream):
    served.frontend.backend.fail = ZeroDivisionError("made up")
    with caplog.at_level("ERROR", logger="pdbus.api"):
        got, _, body = served.request("POST", "/v1/completions", _body(stream=stream))
    assert got == 500 and set(body) == {"error"} and body["error"]["type"] == "server_error", body
    assert "ZeroDivisionError" in body["error"]["message"]
    lines = [r.getMessage() for r in caplog.records if "unexpected ZeroDivisionError" in r.getMessage()]
    assert len(lines) == 1 and "test_bad_input.py" in lines[0] and not caplog.records[-1].exc_info, lines


def test_a_client_that_vanishes_mid_upload_costs_nothing(served):
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"prompt\": ")
    sock.close()
    ok, _, answer = served.request("POST", "/v1/completions", _body(max_tokens=2))
    assert ok == 200 and answer["usage"]["completion_tokens"] == 2
    assert served.frontend.backend.calls == 1


def test_nul_and_control_characters_are_text():
    """vLLM serves them (its own benchmark's random prompts hold NUL): the byte fallback encodes them."""
    req = P.parse_completion_request({"prompt": "a\x00b\x07c"}, model_names=["m"], max_model_len=MAX_LEN)
    assert req.prompt == "a\x00b\x07c"
