"""TTFT of PD and of mixed at a few prompt lengths, concurrency 1, medians of several requests.

    PYTHONPATH=. python bench/ttft_bench.py --lengths 64,1024,4096 --repeats 7 --json out.json

Starts each system through ``pdbus.procs.Cluster`` (one at a time: PD = router + prefill + decode
over ``--protocol``; mixed = one rank server), warms it up, then sends ``--repeats`` streamed
completions per prompt length one after another (token-id prompts, ``max_tokens`` 2) and takes
TTFT at the first token-bearing SSE chunk. The processes come from the ``pdbus`` that this
script imports (``PYTHONPATH``), so one script measures two trees: run it once per tree.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time

from pdbus.procs import Cluster, http_json, wait_until


def ttft(host: str, port: int, prompt: list[int], max_tokens: int = 2) -> float:
    """Seconds from sending the request to the first SSE chunk that carries a token."""
    body = json.dumps(
        {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    )
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {resp.read()[:300]!r}")
        first = None
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error chunk: {chunk}")
            if first is None and any(c.get("completion_token_ids") for c in chunk.get("choices", ())):
                first = time.perf_counter() - t0
        if first is None:
            raise RuntimeError("no token received")
        return first
    finally:
        conn.close()


def prompt_of(n: int, salt: int, vocab: int = 1024) -> list[int]:
    return [(salt * 131 + 7 * j) % (vocab - 3) + 3 for j in range(n)]


def measure(url_host: str, port: int, lengths: list[int], repeats: int, warmup: int) -> dict[int, list[float]]:
    for i in range(warmup):
        for n in lengths:
            ttft(url_host, port, prompt_of(n, 1000 + i))
    out: dict[int, list[float]] = {}
    for n in lengths:
        # a salt of its own per (length, repeat): no prompt starts with another's blocks (the
        # prefix cache is on by default), so every TTFT here is a cold one
        out[n] = [ttft(url_host, port, prompt_of(n, r * 7919 + n)) for r in range(repeats)]
    return out


def start_system(cluster: Cluster, kind: str, model: str, common: list[str], protocol: str):
    if kind == "mixed":
        proc = cluster.serve(model, "mixed", None, *common)
        cluster.wait_health(proc.url)
        return proc
    router = cluster.router()
    cluster.serve(model, "prefill", router, *common, "--cache-transfer-protocol", protocol)
    cluster.serve(model, "decode", router, *common, "--cache-transfer-protocol", protocol)
    cluster.wait_health(router.url)

    def both_alive():
        _, body = http_json(router.url + "/instances")
        return sum(i["alive"] for i in body.get("instances", ())) >= 2

    wait_until(both_alive, 60, "prefill and decode registered")
    return router


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the built-in model)")
    ap.add_argument("--lengths", default="64,1024,4096")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--systems", default="pd,mixed")
    ap.add_argument("--protocol", default="ipc")
    ap.add_argument("--max-model-len", type=int, default=4100)
    ap.add_argument("--serve-arg", action="append", default=[], help="extra flag for every instance (repeatable)")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from pdbus.config import default_model_dir

    model = args.model or default_model_dir()
    lengths = [int(x) for x in args.lengths.split(",")]
    common = ["--max-model-len", str(args.max_model_len), "--kv-cache-memory-gb", "0.25", *args.serve_arg]
    results = {}
    for kind in args.systems.split(","):
        with tempfile.TemporaryDirectory(prefix=f"ttft-{kind}-") as tmp, Cluster(tmp) as cluster:
            front = start_system(cluster, kind, model, common, args.protocol)
            times = measure(front.host, front.port, lengths, args.repeats, args.warmup)
        results[kind] = {n: {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "all_ms": [x * 1e3 for x in t]} for n, t in times.items()}
        for n in lengths:
            r = results[kind][n]
            print(f"{args.label}\t{kind}\t{n}\tmedian {r['median_ms']:.1f} ms\tmin {r['min_ms']:.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"label": args.label, "pythonpath": os.environ.get("PYTHONPATH", ""), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
