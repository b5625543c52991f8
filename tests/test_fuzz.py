"""Bad bodies, vanishing clients and valid streams at once, through a real router to real prefill and
decode processes (the built-in model, with its tokenizer, so chat and text prompts take the
template and tokenizer path too).

While valid requests stream (and not), several threads send known-bad bodies (each must get a
4xx with OpenAI's error body), random mutations of valid bodies (any answer but a 5xx or a reset
connection), a 64 MiB body, and clients that close their socket after the first SSE chunk; a bus
client sends a prompt outside the vocabulary. Then: every valid request got its full answer, the
same tokens as when it ran alone; every rank has all its blocks free within a few seconds; the
router holds no request and no orphan lease.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import socket
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_pd import start_pd, wait_all_blocks_free

from pdbus.procs import wait_until

pytestmark = pytest.mark.slow

VOCAB = 1024  # the built-in model's
MAX_MODEL_LEN = 512  # test_pd's COMMON
MAX_TOKENS = 24
TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- HTTP without urllib's retries


def post(url: str, path: str, data: bytes, timeout: float = TIMEOUT_S) -> tuple[int, dict]:
    """One POST on a fresh connection: (status, JSON body). A reset or a dropped connection raises."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except json.JSONDecodeError:
        return resp.status, {"raw": raw[:200].decode(errors="replace")}


def sse_events(url: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        assert resp.status == 200
        for raw in resp:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                return events
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    raise AssertionError(f"stream ended without [DONE] after {len(events)} events")


# --------------------------------------------------------------------------- valid requests


def prompt_ids(i: int) -> list[int]:
    return [(11 * i + 7 * j) % 900 + 20 for j in range(5 + 9 * i)]


VALID = [("completion", i) for i in range(6)] + [("chat", i) for i in range(2)]
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


def run_valid(url: str, kind: str, i: int, stream: bool) -> tuple:
    """(token ids, or text for chat; finish reason) of one valid request."""
    if kind == "chat":
        body = {"messages": [{"role": "user", "content": f"Tell me about number {i}."}], **GREEDY}
        if not stream:
            status, data = post(url, "/v1/chat/completions", json.dumps(body).encode())
            assert status == 200, data
            choice = data["choices"][0]
            return choice["message"]["content"], choice["finish_reason"], data["usage"]["completion_tokens"]
        events = sse_events(url, "/v1/chat/completions", dict(body, stream=True, stream_options={"include_usage": True}))
        assert all("error" not in e for e in events), events
        text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        finish = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
        return text, finish[-1], events[-1]["usage"]["completion_tokens"]
    body = {"prompt": prompt_ids(i), "return_token_ids": True, **GREEDY}
    if not stream:
        status, data = post(url, "/v1/completions", json.dumps(body).encode())
        assert status == 200, data
        choice = data["choices"][0]
        return choice["completion_token_ids"], choice["finish_reason"], data["usage"]["completion_tokens"]
    events = sse_events(url, "/v1/completions", dict(body, stream=True, stream_options={"include_usage": True}))
    assert all("error" not in e for e in events), events
    ids = [t for e in events for c in e["choices"] for t in c.get("completion_token_ids") or []]
    finish = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    return ids, finish[-1], events[-1]["usage"]["completion_tokens"]


# --------------------------------------------------------------------------- bad bodies


def _c(**kw) -> bytes:
    return json.dumps({"prompt": [5, 6, 7], "max_tokens": 2, **kw}).encode()


def _chat(content) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 2}).encode()


def _with(raw_field: bytes) -> bytes:
    return b'{"prompt": [5, 6], "max_tokens": 2, ' + raw_field + b"}"


C, CHAT = "/v1/completions", "/v1/chat/completions"
BAD = [
    # (path, raw body, status)
    (C, b'{"prompt": [1, 2', 400),
    (C, b"", 400),
    (C, b"\xff\xfe\x00", 400),
    (C, b"[" * 100_000 + b"]" * 100_000, 400),
    (CHAT, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    (C, b'{"prompt": ' + b"{" * 100_000, 400),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    (C, b'{"prompt": "abc\\udfff"}', 400),
    (CHAT, b'{"messages": [{"role": "user", "content": "raw \x01 control"}]}', 400),
    (CHAT, b'{"messages": "hello"}', 400),
    (CHAT, b'{"messages": {"role": "user", "content": "x"}}', 400),
    (CHAT, _chat(42), 400),
    (CHAT, _chat([{"type": "image_url"}]), 400),
    (CHAT, json.dumps({"messages": [{"role": ["user"], "content": "x"}]}).encode(), 400),
    (C, _c(stop={"a": 1}), 400),
    (C, _c(n="2"), 400),
    (C, _c(logprobs=1.5), 400),
    (C, _c(stream="yes"), 400),
    (C, _c(max_tokens=True), 400),
    (C, _c(prompt={"text": "x"}), 400),
    (C, _with(b'"temperature": NaN'), 400),
    (C, _with(b'"temperature": Infinity'), 400),
    (C, _with(b'"top_p": -Infinity'), 400),
    (C, _with(b'"temperature": 1e400'), 400),
    (C, _with(b'"max_tokens": 1e400'), 400),
    (C, _with(b'"frequency_penalty": 1e400'), 400),
    (C, _with(b'"seed": 1e400'), 400),
    (C, _with(b'"seed": ' + b"9" * 5000), 400),
    (C, _c(seed=2**64), 400),
    (C, _c(temperature=-1), 400),
    (C, _c(top_p=0), 400),
    (C, _c(n=17), 400),
    (C, _c(stop_token_ids=[10**30]), 400),
    (C, _c(prompt=[5, VOCAB]), 400),
    (C, _c(prompt=[5, 2**70]), 400),
    (C, _c(prompt=[5] * MAX_MODEL_LEN), 400),
    (C, _c(max_tokens=MAX_MODEL_LEN), 400),
    (C, _c(model="gpt-17"), 404),
    ("/v1/nothing", _c(), 404),
    ("/v1/models", _c(), 405),
]
WRONG_VALUES = [
    None, True, 0, -1, 3, 2**70, 1.5, -0.0, 1e308, "x", "", "\x07", "\ud83d\ude00",
    [], [1], ["a"], [[1]], {}, {"a": 1}, {"type": "text"},
]  # fmt: skip
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "n", "stream", "stream_options", "top_k", "seed", "stop",
    "stop_token_ids", "min_tokens", "temperature", "top_p", "logprobs", "top_logprobs", "response_format",
    "chat_template_kwargs", "logit_bias", "user", "echo", "best_of",
]  # fmt: skip


def check_error_body(status: int, body: dict, what) -> None:
    assert 400 <= status < 500, (what, status, body)
    assert set(body) == {"error"}, (what, body)
    err = body.get("error")
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, (what, body)
    assert isinstance(err["message"], str) and err["message"], (what, body)


def mutated_bodies(seed: int, count: int):
    rnd = random.Random(seed)
    for _ in range(count):
        chat = rnd.random() < 0.5
        body = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": [5, 6, 7]}
        body["max_tokens"] = 2
        for _ in range(rnd.randint(1, 3)):
            body[rnd.choice(FIELDS)] = rnd.choice(WRONG_VALUES)
        if body.get("stream") is True:
            body["stream"] = False  # answers are read whole here; streams are the valid threads' part
        yield (CHAT if chat else C), json.dumps(body).encode()


def vanish_after_first_chunk(url: str, i: int) -> None:
    """A client that closes its socket once the first SSE chunk came: the request is running."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": prompt_ids(i), "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
    try:
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        received = b""
        while b"data: " not in received:
            chunk = sock.recv(4096)
            assert chunk, f"the stream ended before its first chunk: {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
    finally:
        sock.close()


def bus_client_out_of_vocabulary(router_url: str) -> str:
    import asyncio

    from pdbus.client import BusClient

    async def run() -> str:
        async with BusClient(router_url.removeprefix("http://")) as client:
            async for chunk in client.generate([5, VOCAB + 11], max_tokens=4, timeout=TIMEOUT_S):
                if chunk.finish_reason is not None:
                    return chunk.error or ""
        return ""

    return asyncio.run(run())


def router_holds(router_url: str) -> dict:
    """The router's open requests and orphan leases, from its /metrics."""
    with urllib.request.urlopen(router_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("pdbus:backend{") and 'instance=""' in line:
            key = re.search(r'key="(\w+)"', line)
            if key and key.group(1) in ("requests", "orphans"):
                out[key.group(1)] = float(line.rsplit(" ", 1)[1])
    return out


# --------------------------------------------------------------------------- the test


def test_bad_bodies_and_vanishing_clients_while_valid_streams_run(cluster, default_model_dir):
    router = start_pd(cluster, default_model_dir, "tcp")
    url = router.url
    alone = {(kind, i): run_valid(url, kind, i, stream=False) for kind, i in VALID}
    for (kind, i), (_, finish, n) in alone.items():
        assert finish == "length" and n == MAX_TOKENS, (kind, i, finish, n)
    wait_all_blocks_free(cluster, timeout=10)

    problems: list[str] = []
    lock = threading.Lock()

    def note(what: str) -> None:
        with lock:
            problems.append(what)

    def valid(job) -> None:
        (kind, i), stream = job
        try:
            got = run_valid(url, kind, i, stream)
        except Exception as exc:  # noqa: BLE001 (every failure is a finding, reported together)
            return note(f"valid {kind} {i} stream={stream}: {type(exc).__name__}: {exc}")
        if got != alone[(kind, i)]:
            note(f"valid {kind} {i} stream={stream}: {got} != alone {alone[(kind, i)]}")

    def bad(worker: int) -> None:
        mine = BAD[worker::3]
        for path, data, status in mine + [(p, d, None) for p, d in mutated_bodies(worker, 25)]:
            try:
                got, body = post(url, path, data)
            except Exception as exc:  # noqa: BLE001
                note(f"bad {path} {data[:60]!r}: {type(exc).__name__}: {exc}")
                continue
            if status is None:  # a mutation: any answer but a 5xx (a 200 is a valid request)
                if got >= 500 or (got >= 400 and set(body) != {"error"}):
                    note(f"mutation {data[:200]!r}: {got} {body}")
                continue
            try:
                assert got == status, f"status {got}, expected {status}"
                check_error_body(got, body, data[:60])
            except AssertionError as exc:
                note(f"bad {path} {data[:60]!r}: {exc}: {body}")

    def oversized() -> None:
        try:
            got, body = post(url, C, b'{"prompt": "' + b"a" * (64 << 20) + b'"}')
            assert got == 413, (got, body)
            check_error_body(got, body, "64 MiB")
        except Exception as exc:  # noqa: BLE001
            note(f"64 MiB body: {type(exc).__name__}: {exc}")

    def vanish(i: int) -> None:
        try:
            vanish_after_first_chunk(url, i)
        except Exception as exc:  # noqa: BLE001
            note(f"vanishing client {i}: {type(exc).__name__}: {exc}")

    def bus_client() -> None:
        try:
            error = bus_client_out_of_vocabulary(url)
            assert str(VOCAB + 11) in error, error
        except Exception as exc:  # noqa: BLE001
            note(f"bus client: {type(exc).__name__}: {exc}")

    jobs = [(v, s) for v in VALID for s in (False, True)]
    with ThreadPoolExecutor(len(jobs) + 9) as pool:
        futures = [pool.submit(valid, job) for job in jobs]
        futures += [pool.submit(bad, w) for w in range(3)]
        futures += [pool.submit(vanish, i) for i in range(4)]
        futures += [pool.submit(oversized), pool.submit(bus_client)]
        for f in futures:
            f.result(timeout=TIMEOUT_S * 3)
    assert not problems, "\n".join(problems)

    wait_all_blocks_free(cluster, timeout=5)
    idle = {"requests": 0.0, "orphans": 0.0}
    wait_until(lambda: router_holds(url) == idle, 5, "the router holding no request and no orphan lease")
    assert run_valid(url, *VALID[0], stream=True) == alone[VALID[0]]  # and it still serves
