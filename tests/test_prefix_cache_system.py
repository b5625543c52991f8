"""Prefix caching end to end, through HTTP: a real router with a prefill and a decode instance
(caching on, the default) against a mixed instance started with ``--no-enable-prefix-caching``.
The same prompt twice and a prompt sharing its prefix give the mixed instance's greedy tokens;
the prefill's /stats and /metrics count the hits; the uncached instance counts none. A two-turn
chat across PD (two decodes, ``ipc`` and ``tcp``) goes back to its decode, which reuses the
conversation's blocks, so the prefill sends only the new ones; the router's /metrics counts it.
"""

from __future__ import annotations

import urllib.request

import pytest
from test_pd import BLOCK, COMMON, complete, start_pd, wait_all_blocks_free

from pdbus.procs import Cluster, http_json

pytestmark = pytest.mark.slow

SHARED = 12 * BLOCK  # tokens of the shared prefix: 12 full blocks
PROMPT_A = [(11 * j) % 90 + 3 for j in range(SHARED)] + [5, 6, 7]
PROMPT_B = PROMPT_A[:SHARED] + [40 + j for j in range(10)]
REQUESTS = [PROMPT_A, PROMPT_A, PROMPT_B]


def _stats(proc) -> dict:
    status, body = http_json(proc.url + "/stats")
    assert status == 200, body
    return body


def test_prefix_cache_through_http(cluster, tiny_model_dir, tmp_path):
    with Cluster(tmp_path / "mixed") as c:  # the reference: no cache at all
        server = c.serve(tiny_model_dir, "mixed", None, *COMMON, "--no-enable-prefix-caching")
        c.wait_health(server.url)
        ref = [complete(server.url, p) for p in REQUESTS]
        uncached = _stats(server)  # the router answers with its one mixed instance's figures
    assert ref[0] == ref[1]
    assert uncached["prefix_cache_hits"] == 0 and uncached["prefix_cache_blocks"] == 0

    router = start_pd(cluster, tiny_model_dir, "ipc")
    prefill = next(p for p in cluster.procs if p.name == "prefill")
    decode = next(p for p in cluster.procs if p.name == "decode")
    got = [complete(router.url, REQUESTS[0])]
    assert _stats(prefill)["prefix_cache_hits"] == 0
    got.append(complete(router.url, REQUESTS[1]))
    assert _stats(prefill)["prefix_cache_hits"] == SHARED  # its 12 full blocks (the tail is 3 tokens)
    got.append(complete(router.url, REQUESTS[2], stream=True))
    stats = _stats(prefill)
    assert got == ref  # PD with the cache == mixed without it, token for token
    assert stats["prefix_cache_hits"] == 2 * SHARED and stats["prefix_cache_queries"] == sum(map(len, REQUESTS))
    assert stats["prompt_tokens"] == sum(map(len, REQUESTS)) - 2 * SHARED
    assert _stats(decode)["prefix_cache_blocks"] > 0  # the decode registered the blocks that landed
    metrics = urllib.request.urlopen(prefill.url + "/metrics", timeout=10).read().decode()
    assert f"pdbus:prefix_cache_hits_total {float(2 * SHARED)}" in metrics
    assert "pdbus:prefix_cache_queries_total" in metrics
    wait_all_blocks_free(cluster)  # cached blocks nobody holds count as free


# --------------------------------------------------------------------------- a chat across PD

FIRST = [(7 * j) % 90 + 3 for j in range(5 * BLOCK + 3)]  # turn 1's prompt: 5 full blocks and 3
NEW = [41, 42, 43, 44, 45]  # turn 2's new message, after turn 1's prompt and answer
ANSWER = 2 * BLOCK + 4  # tokens of each answer
# the tiny model repeats one token under plain greedy: a penalty makes the answers diverse
CHAT = {"max_tokens": ANSWER, "repetition_penalty": 1.5}


def _chat(url: str) -> tuple[list[int], list[int]]:
    answer = complete(url, FIRST, **CHAT)
    return answer, complete(url, FIRST + answer + NEW, stream=True, **CHAT)


@pytest.fixture(scope="module")
def chat_without_cache(tiny_model_dir, tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("chat-mixed")) as c:
        server = c.serve(tiny_model_dir, "mixed", None, *COMMON, "--no-enable-prefix-caching")
        c.wait_health(server.url)
        return _chat(server.url)


def _metrics(url: str) -> str:
    return urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()


def _sample(text: str, name: str) -> float:
    """The value of the sample line starting with ``name`` (labels included) in ``text``."""
    line = next((ln for ln in text.splitlines() if ln.startswith(name + " ")), None)
    assert line is not None, f"no {name} in /metrics"
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.parametrize("protocol", ["ipc", "tcp"])
def test_a_second_turn_reuses_the_decodes_cache_and_sends_only_the_new_blocks(cluster, tiny_model_dir, chat_without_cache, protocol):
    """Router + a prefill + two decodes: turn 2 (turn 1's prompt, its answer and a new message) goes
    to turn 1's decode, which leases the conversation's blocks from its own prefix cache; the
    prefill sends only the blocks after them; the tokens are those of a mixed instance without any
    cache; the router's /metrics counts the choice and the bytes sent and not sent."""
    from waits import wait_showing

    router = start_pd(cluster, tiny_model_dir, protocol, decodes=2)
    prefill = next(p for p in cluster.procs if p.name == "prefill")
    decodes = [p for p in cluster.procs if p.name == "decode"]
    answer = complete(router.url, FIRST, **CHAT)
    turn1 = [_stats(d)["tokens_generated"] for d in decodes]
    (chosen,) = [d for d, n in zip(decodes, turn1) if n]
    bytes1 = _stats(prefill)["transfer_bytes"]
    block_bytes = bytes1 // -(-len(FIRST) // BLOCK)  # turn 1 sent every block of its prompt
    answer2 = complete(router.url, FIRST + answer + NEW, stream=True, **CHAT)
    assert [answer, answer2] == list(chat_without_cache)
    after = [_stats(d) for d in decodes]
    assert [s["tokens_generated"] for s in after] == [n + (ANSWER - 1 if d is chosen else 0) for d, n in zip(decodes, turn1)]
    # every full block of turn 1's sequence the decode holds the KV of (all but the answer's last token)
    cached = (len(FIRST) + len(answer) - 1) // BLOCK
    second = len(FIRST) + len(answer) + len(NEW)
    assert _stats(chosen)["prefix_cache_hits"] == cached * BLOCK
    sent = _stats(prefill)["transfer_bytes"] - bytes1
    assert sent == (-(-second // BLOCK) - cached) * block_bytes, "turn 2 sent the new blocks only"
    assert sent <= 2 * block_bytes
    text = _metrics(router.url)
    assert _sample(text, "pdbus:kv_transfer_bytes_total") == bytes1 + sent
    assert _sample(text, "pdbus:kv_transfer_bytes_saved_total") == cached * block_bytes
    assert _sample(text, 'pdbus:router_decisions_total{policy="cache_aware",reason="cache_hit",role="decode"}') == 1
    name = next(i["id"] for i in http_json(router.url + "/instances")[1]["instances"] if i["http_port"] == chosen.port)
    hits = f'pdbus:prefix_cache_hits_total{{instance="{name}",role="decode"}}'
    # the decode's counters reach the router with its next heartbeat
    wait_showing(lambda: f"{hits} {float(cached * BLOCK)}" in _metrics(router.url), 10, "the decode's hits on the router", lambda: _metrics(router.url))
    wait_all_blocks_free(cluster)
