"""One frontend: ``pdbus serve`` in the mixed role is a router (the only process that speaks the
OpenAI API, on ``--port``) plus the rank server, a ``mixed`` instance on the bus (vLLM's
API-server / engine-core split). Real processes and HTTP (pdbus.procs.Cluster), bounded waits.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import urllib.request

import pytest

from pdbus.procs import http_json, wait_until

COMMON = (
    "--skip-tokenizer-init",
    "--block-size", "8",
    "--num-gpu-blocks-override", "128",
    "--max-model-len", "64",
    "--max-num-seqs", "8",
    "--device", "cpu",
)  # fmt: skip
BODY = {"prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True}


def router_pid(proc) -> int:
    """The router's pid, from the one line ``pdbus serve`` prints when it starts it."""

    def found():
        m = re.search(r"router \(pid (\d+)\)", proc.log.read_text(errors="replace"))
        return int(m.group(1)) if m else None

    return wait_until(found, 60, "the router's pid in the serve log")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as fh:  # a zombie not yet reaped by its parent counts as gone
        return fh.read().split(")")[-1].split()[0] == "Z"


def sole_instance(url: str) -> dict:
    status, body = http_json(url + "/instances")
    assert status == 200
    (inst,) = body["instances"]
    return inst


def test_serve_is_a_router_in_front_of_a_mixed_instance(cluster, tiny_model_dir):
    serve = cluster.serve(tiny_model_dir, "mixed", None, *COMMON, "--api-key", "k")
    health = cluster.wait_health(serve.url, timeout=120)
    assert health["mixed"] == 1 and health["prefill"] == 0 and health["decode"] == 0
    inst = sole_instance(serve.url)
    assert inst["role"] == "mixed" and inst["alive"] and inst["http_port"] != serve.port
    rank = f"http://{inst['host']}:{inst['http_port']}"
    assert f"this rank serves /health, /metrics, /stats on {rank}" in serve.log.read_text()

    # the rank's own port: health, metrics and stats, never the OpenAI API
    status, body = http_json(rank + "/health")
    assert status == 200 and body["role"] == "mixed"
    assert http_json(rank + "/v1/models")[0] == 404
    with urllib.request.urlopen(rank + "/metrics", timeout=10) as resp:
        assert 'pdbus:instance{instance="mixed",key="total_blocks"}' in resp.read().decode()

    # the router's port: the API, behind the one API-key check, every error in OpenAI's shape
    status, body = http_json(serve.url + "/v1/completions", BODY)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    req = urllib.request.Request(serve.url + "/v1/nope", headers={"Authorization": "Bearer k"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 404 and set(http_body(exc.value)["error"]) == {"message", "type", "param", "code"}
    req = urllib.request.Request(
        serve.url + "/v1/completions",
        data=json.dumps(BODY).encode(),
        headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        (choice,) = json.loads(resp.read())["choices"]
    assert len(choice["completion_token_ids"]) == 4 and choice["finish_reason"] == "length"

    # /stats on the router answers with its sole mixed instance's figures
    status, st = http_json(serve.url + "/stats")
    assert status == 200 and st["role"] == "mixed" and st["tokens_generated"] >= 4
    assert wait_until(lambda: http_json(rank + "/stats")[1]["running"] == 0, 30, "the request done")

    # bus clients take the same preparation path: the context limit, then the same tokens
    from pdbus.client import BusClient

    async def bus() -> list[int]:
        async with BusClient(serve.addr) as client:
            chunks = [c async for c in client.generate(BODY["prompt"], max_tokens=100, temperature=0)]
            assert chunks[-1].error and "maximum context length" in chunks[-1].error and "64 tokens" in chunks[-1].error
            ids = []
            async for c in client.generate(BODY["prompt"], max_tokens=4, temperature=0, ignore_eos=True):
                assert c.error is None
                ids += c.token_ids
            return ids

    ids = asyncio.run(asyncio.wait_for(bus(), 60))
    assert ids == choice["completion_token_ids"]

    # Ctrl-C stops both processes
    pid = router_pid(serve)
    os.kill(serve.popen.pid, signal.SIGINT)
    assert serve.popen.wait(30) == 0
    wait_until(lambda: gone(pid), 20, "the router gone with the rank")


def http_body(exc) -> dict:
    return json.loads(exc.read())


def test_a_dying_router_takes_the_rank_down_with_one_line(cluster, tiny_model_dir):
    serve = cluster.serve(tiny_model_dir, "mixed", None, *COMMON)
    cluster.wait_health(serve.url, timeout=120)
    os.kill(router_pid(serve), signal.SIGKILL)
    assert serve.popen.wait(30) == 1
    assert "the router (pid" in serve.log.read_text() and "exited with code -9; stopping the rank" in serve.log.read_text()


def test_a_dying_rank_takes_the_router_down(cluster, tiny_model_dir):
    serve = cluster.serve(tiny_model_dir, "mixed", None, *COMMON)
    cluster.wait_health(serve.url, timeout=120)
    pid = router_pid(serve)
    serve.kill(signal.SIGKILL)
    wait_until(lambda: gone(pid), 20, "the router gone after its rank was killed")


def test_mixed_instance_registers_with_an_existing_router(cluster, tiny_model_dir):
    router = cluster.router()
    serve = cluster.serve(tiny_model_dir, "mixed", router, *COMMON)
    cluster.wait_health(router.url, timeout=120)
    inst = sole_instance(router.url)
    assert inst["role"] == "mixed" and inst["http_port"] == serve.port
    status, body = http_json(router.url + "/v1/completions", BODY, timeout=60)
    assert status == 200 and len(body["choices"][0]["completion_token_ids"]) == 4
    assert "router (pid" not in serve.log.read_text()  # it started none of its own
