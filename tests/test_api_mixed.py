"""The OpenAI API of a real ``pdbus serve`` process in mixed role (CPU).

Token-id prompts run on the tiny random checkpoint (no tokenizer, ``--skip-tokenizer-init``);
text and chat run on the project's default model once it carries a tokenizer. Requests go
through the official ``openai`` client, raw HTTP (urllib, aiohttp, a bare socket) and ``curl``.
Every wait is bounded; the processes are torn down by ``pdbus.procs.Cluster``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest

from pdbus.procs import Cluster, http_json, wait_until

MODEL = "tiny"
MAX_MODEL_LEN = 128
BLOCK_SIZE = 8
NUM_BLOCKS = 512
MAX_BODY_MB = 1
TIMEOUT_S = 60.0
# the tiny random model repeats one token under plain greedy; a repetition penalty makes every
# continuation diverse, so that a wrong KV anywhere shows in the tokens
DIVERSE = {"temperature": 0, "repetition_penalty": 5.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """One mixed server for the module (the ``cluster`` fixture's Cluster, at module scope)."""
    with Cluster(tmp_path_factory.mktemp("api-mixed")) as c:
        proc = c.serve(
            tiny_model_dir,
            "mixed",
            None,
            "--served-model-name", MODEL,
            "--skip-tokenizer-init",
            "--block-size", str(BLOCK_SIZE),
            "--num-gpu-blocks-override", str(NUM_BLOCKS),
            "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", "64",
            "--max-num-batched-tokens", "512",
            "--max-body-mb", str(MAX_BODY_MB),
            "--device", "cpu",
        )  # fmt: skip
        c.wait_health(proc.url, timeout=120)
        yield proc
        assert proc.alive(), f"the server died during the tests:\n{proc.tail()}"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


# --------------------------------------------------------------------------- raw HTTP helpers


def http_raw(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    for k, v in (headers or {"Content-Type": "application/json"}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def sse_events(raw: bytes) -> list:
    """The ``data:`` payloads of an SSE body, JSON-decoded; the final ``[DONE]`` as the string."""
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


def complete(server, **body) -> dict:
    status, resp = http_json(
        server.url + "/v1/completions", dict({"model": MODEL}, **body), timeout=TIMEOUT_S
    )
    assert status == 200, resp
    return resp


def stream(server, **body) -> list:
    data = json.dumps(dict({"model": MODEL, "stream": True}, **body)).encode()
    status, raw = http_raw(server.url + "/v1/completions", data)
    assert status == 200, raw
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def streamed_tokens(events: list, index: int = 0) -> tuple[list[int], str | None]:
    ids: list[int] = []
    finish = None
    for ev in events:
        for ch in ev["choices"]:
            if ch["index"] == index:
                ids += ch.get("completion_token_ids") or []
                finish = ch["finish_reason"] or finish
    return ids, finish


def stats(server) -> dict:
    status, body = http_json(server.url + "/stats", timeout=10)
    assert status == 200
    return body


def wait_all_blocks_free(server, timeout: float = 30.0) -> dict:
    def idle():
        st = stats(server)
        return st if st["free_blocks"] == st["total_blocks"] and st["running"] == 0 and st["waiting"] == 0 else None

    return wait_until(idle, timeout, "KV blocks back in the free pool")


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 96) for _ in range(n)]


# --------------------------------------------------------------------------- basics


def test_health_models_and_metrics(server, client):
    status, body = http_json(server.url + "/health")
    assert status == 200 and body["status"] == "ok" and body["mixed"] == 1  # the router, one mixed instance
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, body = http_json(server.url + "/v1/models")
    assert status == 200 and body["object"] == "list" and body["data"][0]["max_model_len"] == MAX_MODEL_LEN

    complete(server, prompt=prompt_ids(5), max_tokens=3, **DIVERSE)
    stream(server, prompt=prompt_ids(5), max_tokens=3, **DIVERSE)
    status, raw = http_raw(server.url + "/metrics")
    text = raw.decode()
    assert status == 200
    for name in (
        "pdbus:time_to_first_token_seconds_count",
        "pdbus:inter_token_latency_seconds_bucket",
        "pdbus:time_per_output_token_seconds_sum",
        "pdbus:e2e_request_latency_seconds_count",
        "pdbus:requests_total",
        "pdbus:generation_tokens_total",
        "pdbus:prompt_tokens_total",
        'pdbus:request_finished_total{finish_reason="length"}',
        'pdbus:backend{instance="",key="total_blocks"}',
    ):
        assert name in text, f"{name} missing from /metrics"
    ttft_count = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("pdbus:time_to_first_token_seconds_count")
    )
    assert ttft_count >= 2


def test_stream_and_non_stream_give_the_same_tokens(server):
    prompt = prompt_ids(2 * BLOCK_SIZE + 3, seed=1)
    body = dict(prompt=prompt, max_tokens=12, return_token_ids=True, **DIVERSE)
    whole = complete(server, **body)
    (choice,) = whole["choices"]
    assert (
        whole["object"] == "text_completion" and whole["model"] == MODEL and whole["id"].startswith("cmpl-")
    )
    assert choice["prompt_token_ids"] == prompt
    assert len(choice["completion_token_ids"]) == 12 and choice["finish_reason"] == "length"
    assert len(set(choice["completion_token_ids"])) > 4
    assert whole["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 12,
        "total_tokens": len(prompt) + 12,
    }

    events = stream(server, stream_options={"include_usage": True}, **body)
    assert events[0]["choices"][0]["prompt_token_ids"] == prompt
    assert all("prompt_token_ids" not in ev["choices"][0] for ev in events[1:-1])
    ids, finish = streamed_tokens(events)
    assert ids == choice["completion_token_ids"] and finish == "length"
    *chunks, last = events
    assert last["choices"] == [] and last["usage"] == whole["usage"]  # include_usage: one last chunk
    assert all(ev.get("usage") is None for ev in chunks)
    assert all(ev["object"] == "text_completion" and ev["id"] == events[0]["id"] for ev in events)

    no_usage = stream(server, **body)
    assert all(ev.get("usage") is None for ev in no_usage)
    assert streamed_tokens(no_usage) == (ids, "length")


def test_continuous_usage_stats_in_every_chunk(server):
    prompt = prompt_ids(5, seed=11)
    body = dict(prompt=prompt, max_tokens=6, return_token_ids=True, **DIVERSE)
    events = stream(server, stream_options={"include_usage": True, "continuous_usage_stats": True}, **body)
    *chunks, last = events
    assert chunks and last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    seen = 0
    for ev in chunks:
        seen += len(ev["choices"][0].get("completion_token_ids") or [])
        assert ev["usage"] == {"prompt_tokens": 5, "completion_tokens": seen, "total_tokens": 5 + seen}, ev
    alone = stream(server, stream_options={"continuous_usage_stats": True}, **body)  # no final totals chunk
    assert all(ev["choices"] and ev["usage"]["prompt_tokens"] == 5 for ev in alone)
    assert streamed_tokens(alone) == streamed_tokens(events)


def test_openai_client_non_stream_and_stream(server, client):
    prompt = prompt_ids(BLOCK_SIZE + 1, seed=2)
    extra = {"return_token_ids": True, "repetition_penalty": 5.0, "ignore_eos": True}
    resp = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra
    )
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == 8
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    want = choice.model_extra["completion_token_ids"]
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
    )
    got = [t for ch in chunks for c in ch.choices for t in c.model_extra.get("completion_token_ids") or []]
    assert got == want
    assert chunks[-1].usage.completion_tokens == 8
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["length"]


def test_curl_stream(server):
    prompt = prompt_ids(BLOCK_SIZE, seed=3)
    body = dict(model=MODEL, prompt=prompt, max_tokens=6, return_token_ids=True, **DIVERSE)
    want = complete(server, **body)["choices"][0]["completion_token_ids"]
    proc = subprocess.run(
        ["curl", "-sS", "-N", "--max-time", str(int(TIMEOUT_S)), "-H", "Content-Type: application/json",
         "--data-binary", "@-", server.url + "/v1/completions"],
        input=json.dumps(dict(body, stream=True)).encode(),
        capture_output=True,
        timeout=TIMEOUT_S + 10,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    events = sse_events(proc.stdout)
    assert events[-1] == "[DONE]"
    assert streamed_tokens(events[:-1]) == (want, "length")


def test_n2_with_a_seed(server):
    body = dict(prompt=prompt_ids(6, seed=4), n=2, seed=42, temperature=1.0, max_tokens=8, ignore_eos=True)
    body["return_token_ids"] = True
    first = complete(server, **body)
    again = complete(server, **body)
    assert [c["index"] for c in first["choices"]] == [0, 1]
    tokens = [c["completion_token_ids"] for c in first["choices"]]
    assert tokens == [c["completion_token_ids"] for c in again["choices"]]  # seeded: reproducible
    assert all(len(t) == 8 for t in tokens) and tokens[0] != tokens[1]  # each choice its own seed
    assert first["usage"]["completion_tokens"] == 16 and first["usage"]["prompt_tokens"] == 6
    events = stream(server, **body)
    assert [streamed_tokens(events, i)[0] for i in (0, 1)] == tokens


def test_logprobs_with_token_id_prompts(server):
    resp = complete(
        server, prompt=prompt_ids(7, seed=5), max_tokens=4, logprobs=2, return_token_ids=True, **DIVERSE
    )
    choice = resp["choices"][0]
    lp = choice["logprobs"]
    assert lp is not None, "logprobs asked for but not returned"
    ids = choice["completion_token_ids"]
    assert lp["tokens"] == [f"token_id:{t}" for t in ids]
    assert len(lp["token_logprobs"]) == 4 and all(x <= 0.0 for x in lp["token_logprobs"])
    assert len(lp["top_logprobs"]) == 4 and all(1 <= len(row) <= 2 for row in lp["top_logprobs"])
    events = stream(server, prompt=prompt_ids(7, seed=5), max_tokens=4, logprobs=2, **DIVERSE)
    streamed = [
        x
        for ev in events
        for c in ev["choices"]
        if c.get("logprobs")
        for x in c["logprobs"]["token_logprobs"]
    ]
    assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-5)


def test_finish_reasons_length_and_stop_token_ids(server):
    prompt = prompt_ids(BLOCK_SIZE - 1, seed=6)
    ref = complete(server, prompt=prompt, max_tokens=10, return_token_ids=True, **DIVERSE)["choices"][0]
    tokens = ref["completion_token_ids"]
    assert ref["finish_reason"] == "length" and len(tokens) == 10
    short = complete(server, prompt=prompt, max_tokens=3, return_token_ids=True, **DIVERSE)["choices"][0]
    assert short["completion_token_ids"] == tokens[:3] and short["finish_reason"] == "length"
    stop = tokens[4]
    cut = tokens.index(stop) + 1
    body = dict(prompt=prompt, max_tokens=10, return_token_ids=True, stop_token_ids=[stop], **DIVERSE)
    stopped = complete(server, **body)["choices"][0]
    assert stopped["completion_token_ids"] == tokens[:cut] and stopped["finish_reason"] == "stop"
    assert streamed_tokens(stream(server, **body)) == (tokens[:cut], "stop")


# --------------------------------------------------------------------------- bad input


def _body(**kw) -> bytes:
    return json.dumps(dict({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2}, **kw)).encode()


def _oversized() -> bytes:
    pad = b" " * (MAX_BODY_MB * (1 << 20) + 1024)
    return b'{"model": "tiny", "prompt": [5, 6],' + pad + b'"max_tokens": 2}'


_long_prompt = [5] * (MAX_MODEL_LEN + 2)

BAD_INPUTS = [
    # id, path, raw body, status, param, words the message must hold
    ("invalid-json", "/v1/completions", b'{"prompt": [1, 2', 400, None, ["not valid JSON"]),
    ("not-an-object", "/v1/completions", b"[1, 2, 3]", 400, None, ["JSON object"]),
    (
        "max-tokens-str",
        "/v1/completions",
        _body(max_tokens="ten"),
        400,
        "max_tokens",
        ["max_tokens", "integer"],
    ),
    ("temperature-str", "/v1/completions", _body(temperature="hot"), 400, "temperature", ["temperature"]),
    ("stream-str", "/v1/completions", _body(stream="yes"), 400, "stream", ["stream", "boolean"]),
    ("prompt-number", "/v1/completions", _body(prompt=5), 400, "prompt", ["prompt"]),
    ("prompt-mixed-list", "/v1/completions", _body(prompt=[1, "a"]), 400, "prompt", ["prompt", "token ids"]),
    ("n-zero", "/v1/completions", _body(n=0), 400, "n", ["'n'"]),
    ("negative-token", "/v1/completions", _body(prompt=[5, -1]), 400, "prompt", ["-1"]),
    (
        "prompt-too-long",
        "/v1/completions",
        _body(prompt=_long_prompt),
        400,
        "prompt",
        [str(MAX_MODEL_LEN), str(len(_long_prompt))],
    ),
    (
        "prompt-plus-max-tokens-too-long",
        "/v1/completions",
        _body(prompt=[5] * 100, max_tokens=50),
        400,
        "max_tokens",
        [str(MAX_MODEL_LEN), "150", "100", "50"],
    ),
    ("unknown-model", "/v1/completions", _body(model="gpt-17"), 404, "model", ["gpt-17"]),
    ("oversized-body", "/v1/completions", _oversized(), 413, None, ["too large"]),
    ("text-prompt-no-tokenizer", "/v1/completions", _body(prompt="hello"), 400, "prompt", ["tokenizer"]),
    (
        "chat-no-tokenizer",
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode(),
        400,
        None,
        ["tokenizer"],
    ),
]


@pytest.mark.parametrize(
    "path,data,status,param,words", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(
    server, path, data, status, param, words
):
    got, raw = http_raw(server.url + path, data)
    assert got == status, raw
    body = json.loads(raw)
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    for word in words:
        assert word.lower() in err["message"].lower(), err["message"]
    ok = complete(server, prompt=[5, 6, 7], max_tokens=2, **DIVERSE)
    assert len(ok["choices"][0]["text"]) == 0 and ok["usage"]["completion_tokens"] == 2


def test_out_of_vocabulary_token_ids_fail_alone(server):
    # A token id past the vocabulary fails its request without touching others. The frontend
    # answers 400 once the rank passes its vocab size to the API server; until then the engine
    # refuses the request (an error answer, never a crashed step).
    got, raw = http_raw(server.url + "/v1/completions", _body(prompt=[5, 96]))
    assert got in (400, 500), raw
    assert "vocabulary" in json.loads(raw)["error"]["message"]
    assert complete(server, prompt=[5, 6, 7], max_tokens=2, **DIVERSE)["usage"]["completion_tokens"] == 2


def test_openai_client_raises_typed_errors(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=-1)
    assert info.value.status_code == 400 and "max_tokens" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=[5, 6], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=_long_prompt, max_tokens=2)
    assert str(MAX_MODEL_LEN) in str(info.value)


# --------------------------------------------------------------------------- disconnects


def _open_raw(server, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT_S)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {server.addr}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


@pytest.mark.parametrize("n", [1, 2])
def test_client_disconnect_mid_stream_frees_every_block(server, n):
    wait_all_blocks_free(server)
    before = stats(server)
    body = dict(
        model=MODEL, prompt=prompt_ids(3 * BLOCK_SIZE, seed=8), max_tokens=MAX_MODEL_LEN - 30, stream=True
    )
    sock = _open_raw(server, dict(body, n=n, **DIVERSE))
    received = b""
    deadline = time.monotonic() + TIMEOUT_S
    while b"data: " not in received:  # the first SSE chunk: the sequence is running
        assert time.monotonic() < deadline, "no chunk arrived"
        chunk = sock.recv(4096)
        assert chunk, f"server closed the stream early: {received!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()
    after = wait_all_blocks_free(server)
    assert after["tokens_generated"] - before["tokens_generated"] < n * (MAX_MODEL_LEN - 30), (
        "it ran to the end"
    )
    assert complete(server, prompt=[5, 6, 7], max_tokens=2, **DIVERSE)["usage"]["completion_tokens"] == 2


def test_client_disconnect_while_waiting_for_a_full_response(server):
    wait_all_blocks_free(server)
    before = stats(server)
    body = dict(model=MODEL, prompt=prompt_ids(10, seed=9), max_tokens=MAX_MODEL_LEN - 20, **DIVERSE)
    sock = _open_raw(server, body)
    # polled tightly: the built-in model decodes the whole request in ~0.1 s on the CPU kernels
    wait_until(
        lambda: stats(server)["tokens_generated"] != before["tokens_generated"], TIMEOUT_S, "the request decoding", 0.002
    )
    sock.close()
    after = wait_all_blocks_free(server)
    assert after["tokens_generated"] - before["tokens_generated"] < MAX_MODEL_LEN - 20, "it ran to the end"


async def _post_async(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S * 2)) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def test_32_concurrent_requests_equal_each_alone(server):
    rng = random.Random(10)
    bodies = [
        dict(
            model=MODEL,
            prompt=prompt_ids(rng.randint(1, 4 * BLOCK_SIZE), seed=100 + i),
            max_tokens=rng.randint(2, 10),
            return_token_ids=True,
            **DIVERSE,
        )
        for i in range(32)
    ]
    url = server.url + "/v1/completions"

    async def run_all() -> list[dict]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(_post_async(session, url, b) for b in bodies))

    together = asyncio.run(run_all())
    alone = [complete(server, **{k: v for k, v in b.items() if k != "model"}) for b in bodies]
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a["choices"][0]["completion_token_ids"] == b["choices"][0]["completion_token_ids"], (
            f"request {i}"
        )
        assert len(a["choices"][0]["completion_token_ids"]) == bodies[i]["max_tokens"]
    wait_all_blocks_free(server)


# --------------------------------------------------------------------------- text and chat (default model)


SERVER_SEED = 1234


@pytest.fixture(scope="module")
def text_server(request, tmp_path_factory):
    from pdbus.config import default_model_dir

    path = default_model_dir()
    assert os.path.isfile(os.path.join(path, "tokenizer.model")), f"the built-in model at {path} has no tokenizer"
    model_dir = request.getfixturevalue("default_model_dir")
    with Cluster(tmp_path_factory.mktemp("api-mixed-text")) as c:
        # --seed: the seed of requests that give none (greedy requests do not draw)
        proc = c.serve(model_dir, "mixed", None, "--max-model-len", "1024", "--device", "cpu", "--seed", str(SERVER_SEED))
        c.wait_health(proc.url, timeout=180)
        status, models = http_json(proc.url + "/v1/models")
        assert status == 200
        proc.extra["model"] = models["data"][0]["id"]
        yield proc


def _text_body(server, **kw) -> dict:
    return dict({"model": server.extra["model"], "temperature": 0}, **kw)


def _post(server, path: str, body: dict) -> dict:
    status, resp = http_json(server.url + path, body, timeout=TIMEOUT_S * 2)
    assert status == 200, resp
    return resp


def _stream_deltas(server, path: str, body: dict) -> list:
    status, raw = http_raw(server.url + path, json.dumps(dict(body, stream=True)).encode())
    assert status == 200, raw
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    return events[:-1]


CHINESE_PROMPT = "你好，请用中文介绍一下北京的历史和文化。"


def test_text_completion_streams_chinese_without_replacement_chars(text_server):
    body = _text_body(text_server, prompt=CHINESE_PROMPT, max_tokens=40, ignore_eos=True)
    whole = _post(text_server, "/v1/completions", body)
    text = whole["choices"][0]["text"]
    assert text and "\ufffd" not in text
    events = _stream_deltas(text_server, "/v1/completions", body)
    deltas = [c["text"] for ev in events for c in ev["choices"]]
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == text
    assert whole["usage"]["completion_tokens"] == 40


def test_chat_stream_equals_non_stream(text_server):
    messages = [{"role": "user", "content": CHINESE_PROMPT}]
    body = _text_body(text_server, messages=messages, max_tokens=32)
    whole = _post(text_server, "/v1/chat/completions", body)
    msg = whole["choices"][0]["message"]
    assert whole["object"] == "chat.completion" and msg["role"] == "assistant"
    assert "\ufffd" not in msg["content"]
    events = _stream_deltas(text_server, "/v1/chat/completions", body)
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"].get("role") == "assistant"
    content = "".join(c["delta"].get("content") or "" for ev in events for c in ev["choices"])
    assert content == msg["content"]
    assert [c["finish_reason"] for ev in events for c in ev["choices"] if c["finish_reason"]] == [
        whole["choices"][0]["finish_reason"]
    ]
    cli = openai.OpenAI(base_url=text_server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    resp = cli.chat.completions.create(
        model=text_server.extra["model"], messages=messages, max_tokens=32, temperature=0
    )
    assert resp.choices[0].message.content == msg["content"]


def test_stop_strings(text_server):
    body = _text_body(text_server, prompt=CHINESE_PROMPT, max_tokens=40, ignore_eos=True)
    text = _post(text_server, "/v1/completions", body)["choices"][0]["text"]
    assert len(text) >= 6, f"too little text to pick a stop string from: {text!r}"
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    at = text.find(stop)
    stopped = _post(text_server, "/v1/completions", dict(body, stop=[stop]))["choices"][0]
    assert stopped["text"] == text[:at] and stopped["finish_reason"] == "stop"
    events = _stream_deltas(text_server, "/v1/completions", dict(body, stop=[stop]))
    assert "".join(c["text"] for ev in events for c in ev["choices"]) == text[:at]
    kept = _post(text_server, "/v1/completions", dict(body, stop=[stop], include_stop_str_in_output=True))
    assert kept["choices"][0]["text"] == text[: at + len(stop)]
    wait_all_blocks_free(text_server)  # a stop string ends the request early: its blocks come back


def test_chat_logprobs(text_server):
    body = _text_body(
        text_server, messages=[{"role": "user", "content": "你好"}], max_tokens=6, ignore_eos=True
    )
    resp = _post(text_server, "/v1/chat/completions", dict(body, logprobs=True, top_logprobs=2))
    content = resp["choices"][0]["logprobs"]["content"]
    assert len(content) == resp["usage"]["completion_tokens"] == 6
    assert all(e["logprob"] <= 0.0 and len(e["top_logprobs"]) == 2 for e in content)


def test_server_seed_is_the_default_request_seed(text_server):
    """--seed seeds requests that give none: the same text every time (and in every run, since a
    seeded draw depends on the seed and the step only), as if the request gave that seed."""
    body = _text_body(text_server, prompt=CHINESE_PROMPT, max_tokens=16, temperature=1.0, ignore_eos=True)
    texts = [_post(text_server, "/v1/completions", body)["choices"][0]["text"] for _ in range(2)]
    assert texts[0] == texts[1]
    assert _post(text_server, "/v1/completions", dict(body, seed=SERVER_SEED))["choices"][0]["text"] == texts[0]
    others = {_post(text_server, "/v1/completions", dict(body, seed=s))["choices"][0]["text"] for s in (1, 2, 3)}
    assert others != {texts[0]}  # a request's own seed still wins
    two = _post(text_server, "/v1/completions", dict(body, n=2))["choices"]
    assert two[0]["text"] == texts[0] and two[1]["text"] != texts[0]  # choice i: seed + i


def test_chat_template_kwargs_reach_the_template(text_server):
    messages = [{"role": "user", "content": "你好"}]
    body = _text_body(text_server, messages=messages, max_tokens=1)
    full = _post(text_server, "/v1/chat/completions", body)["usage"]["prompt_tokens"]
    kwargs = _post(text_server, "/v1/chat/completions", dict(body, chat_template_kwargs={"add_generation_prompt": False}))
    field = _post(text_server, "/v1/chat/completions", dict(body, add_generation_prompt=False))
    assert kwargs["usage"]["prompt_tokens"] == field["usage"]["prompt_tokens"] < full
    passed = _post(text_server, "/v1/chat/completions", dict(body, chat_template_kwargs={"enable_thinking": False, "x": 1}))
    assert passed["usage"]["prompt_tokens"] == full  # unknown to this template: passed through, unused
    status, err = http_json(text_server.url + "/v1/chat/completions", dict(body, chat_template_kwargs={"messages": []}), timeout=TIMEOUT_S)
    assert status == 400 and err["error"]["param"] == "chat_template_kwargs"
