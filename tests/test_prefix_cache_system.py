"""Prefix caching end to end, through HTTP: a real router with a prefill and a decode instance
(caching on, the default) against a mixed instance started with ``--no-enable-prefix-caching``.
The same prompt twice and a prompt sharing its prefix give the mixed instance's greedy tokens;
the prefill's /stats and /metrics count the hits; the uncached instance counts none.
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
