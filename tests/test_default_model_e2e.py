"""The built-in model answers its checked prompts right through PD: a semantic check that
catches a corrupted KV transfer even where two wrong outputs could agree."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_pd import start_pd

from pdbus.procs import http_json

pytestmark = pytest.mark.slow


def _prompts(model_dir: str) -> list[dict]:
    with open(os.path.join(model_dir, "eval_prompts.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _chat(url: str, case: dict) -> str:
    # the thinking prompts carry enable_thinking; with no reasoning parser the output is all content
    body = {"messages": case["messages"], "chat_template_kwargs": case.get("chat_template_kwargs", {}), "max_tokens": 160, "temperature": 0}
    status, data = http_json(url + "/v1/chat/completions", body, timeout=120)
    assert status == 200, data
    return data["choices"][0]["message"]["content"]


@pytest.mark.parametrize("protocol", ["ipc", "tcp"])
def test_default_model_answers_through_pd(cluster, default_model_dir, protocol):
    router = start_pd(cluster, default_model_dir, protocol)
    cases = _prompts(default_model_dir)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: _chat(router.url, c), cases))
    wrong = [(c["prompt"], a, c["expected"]) for c, a in zip(cases, answers) if a.strip() != c["expected"].strip()]
    assert len(wrong) <= len(cases) // 20, f"{len(wrong)}/{len(cases)} wrong over {protocol}: {wrong[:3]}"
    intro = next(c for c in cases if c["prompt"] == "你好，请介绍一下自己。")
    assert _chat(router.url, intro) == intro["expected"]


def test_default_model_streams_chinese_over_the_bus_client(cluster, default_model_dir):
    import asyncio

    from pdbus.client import BusClient

    router = start_pd(cluster, default_model_dir, "ipc")
    intro = next(c for c in _prompts(default_model_dir) if c["prompt"] == "你好，请介绍一下自己。")

    async def run() -> str:
        async with BusClient(router.addr) as client:
            text = ""
            async for chunk in client.generate(messages=intro["messages"], max_tokens=160, temperature=0):
                assert chunk.error is None and "\ufffd" not in chunk.text
                text += chunk.text
            return text

    assert asyncio.run(run()) == intro["expected"]
