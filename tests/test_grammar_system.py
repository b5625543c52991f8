"""Structured output end to end on real processes with the built-in model: a bus client's
``Generate`` with ``SamplingParams.structured`` (a json_schema) through a mixed server and
through PD (router, prefill, decode over ipc) gives JSON that fits the schema, and PD's tokens
equal mixed's token for token, greedy and seeded (the prefill draws token one under the grammar,
the decode's matcher accepts it before its first step). A grammar that does not compile fails
its request alone, with the compiler's message; the next request is served.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from test_grammar import JSON_SCHEMA, check_schema
from test_pd import start_pd

from pdbus.messages import StructuredOutput
from pdbus.procs import Cluster

pytestmark = pytest.mark.slow

PROMPTS = ["Who are you?", "你好，请介绍一下自己。", "1+2=?"]
SAMPLINGS = [
    {"max_tokens": 120, "temperature": 0.0},
    {"max_tokens": 120, "temperature": 1.0, "top_p": 0.95, "seed": 7},
]


def _generate(addr: str, messages: list[dict], **sampling) -> tuple[list[int], str, str | None, str]:
    from pdbus.client import BusClient

    async def run():
        ids: list[int] = []
        text, finish, error = "", None, None
        async with BusClient(addr) as client:
            async for chunk in client.generate(messages=messages, **sampling):
                ids += chunk.token_ids
                text += chunk.text
                finish, error = chunk.finish_reason, chunk.error
        return ids, text, error, finish

    return asyncio.run(run())


def _all(addr: str) -> list[tuple[list[int], str]]:
    out = []
    for prompt in PROMPTS:
        for sampling in SAMPLINGS:
            ids, text, error, finish = _generate(addr, [{"role": "user", "content": prompt}], structured=JSON_SCHEMA, **sampling)
            assert error is None and finish == "stop", (prompt, sampling, error, finish, text)
            check_schema(json.loads(text))
            out.append((ids, text))
    return out


def test_structured_output_pd_equals_mixed(cluster, default_model_dir, tmp_path):
    with Cluster(tmp_path / "mixed") as c:
        server = c.serve(default_model_dir, "mixed", None, "--max-model-len", "512", "--kv-cache-memory-gb", "0.05")
        c.wait_health(server.url)
        ref = _all(server.addr)
    router = start_pd(cluster, default_model_dir, "ipc")
    got = _all(router.addr)
    assert got == ref  # token for token, greedy and seeded
    bad = StructuredOutput("regex", "(unclosed")
    _, _, error, _ = _generate(router.addr, [{"role": "user", "content": "hi"}], structured=bad, max_tokens=8)
    assert error is not None and "regex" in error.lower(), error  # refused by the frontend or the engine
    assert _all(router.addr)[:1] == ref[:1]  # the instances go on serving
