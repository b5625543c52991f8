"""Prefix caching across PD, side by side in one run (issue 17 item 5).

    PYTHONPATH=. python bench/prefix_bench.py [--model DIR] [--workload chat,shared] \
        [--configs on:cache_aware,on:round_robin,off:round_robin] [--json out.json]

Each config starts its own system through ``pdbus.procs.Cluster`` — a router (``--router-policy``),
``--prefills`` prefill instances and one decode over ``--protocol``, every instance with
``--enable-prefix-caching`` or ``--no-enable-prefix-caching`` — and runs the workloads on it:

* ``chat``: ``--conversations`` conversations at once, each ``--turns`` turns one after another;
  every conversation starts with the same ``--system-len``-token system prompt, each turn adds
  ``--user-len`` new tokens to the history (the earlier prompts and the answers the server gave,
  as token ids) and asks for ``--answer-len`` tokens. A turn's prompt is the whole history, as a
  chat client sends it.
* ``probe``: one request at a time, ``--repeats`` times: a fresh prompt of ``--history-len``
  tokens (cold), the same history with another ``--user-len + --answer-len`` tokens at its end
  (warm: the history is cached), and those new tokens alone (fresh): the floor a cached
  history's turn approaches.
* ``shared``: ``vllm bench serve``'s prefix-repetition shape: ``--num-prefixes`` prefixes of
  ``--prefix-len`` tokens, each followed by ``--suffix-len`` fresh tokens, ``--shared-requests``
  requests in random order at concurrency ``--conversations``.

Requests are streamed ``/v1/completions`` with token-id prompts (greedy, ``ignore_eos``). It
prints per workload and config: TTFT p50 / p99 (turn 1 and later turns apart for ``chat``),
prompt tokens the prefills computed (the prompt tokens sent less the prefills'
``prefix_cache_hits`` from their ``/stats``), and the KV bytes the prefills sent (the router's
``pdbus:kv_transfer_bytes_total``) and did not send (``pdbus:kv_transfer_bytes_saved_total``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request

import aiohttp

from pdbus.procs import Cluster, http_json, wait_until

SENT = {"prompt_tokens": 0}  # prompt tokens the workload sent


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab - 1) for _ in range(n)]


async def complete(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """(TTFT seconds, the answer's token ids) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}  # fmt: skip
    SENT["prompt_tokens"] += len(prompt)
    t0 = time.perf_counter()
    first, out = None, []
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error chunk: {chunk}")
            for c in chunk.get("choices", ()):
                ids = c.get("completion_token_ids") or []
                if ids and first is None:
                    first = time.perf_counter() - t0
                out.extend(ids)
    if first is None:
        raise RuntimeError("no token received")
    return first, out


async def run_chat(url: str, args, vocab: int) -> dict:
    rng = random.Random(args.seed)
    system = tokens(rng, args.system_len, vocab)
    users = [[tokens(rng, args.user_len, vocab) for _ in range(args.turns)] for _ in range(args.conversations)]
    ttft_by_turn: list[list[float]] = [[] for _ in range(args.turns)]

    async def conversation(session, c: int) -> None:
        history = list(system)
        for t in range(args.turns):
            history += users[c][t]
            ttft, answer = await complete(session, url, history, args.answer_len)
            ttft_by_turn[t].append(ttft)
            history += answer

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(conversation(session, c) for c in range(args.conversations)))
    later = [x for turn in ttft_by_turn[1:] for x in turn]
    return {
        "ttft_turn1_p50_ms": pct(ttft_by_turn[0], 50) * 1e3,
        "ttft_turn1_p99_ms": pct(ttft_by_turn[0], 99) * 1e3,
        "ttft_later_p50_ms": pct(later, 50) * 1e3,
        "ttft_later_p99_ms": pct(later, 99) * 1e3,
        "ttft_by_turn_p50_ms": [pct(t, 50) * 1e3 for t in ttft_by_turn],
        "history_tokens_last_turn": args.system_len + args.turns * (args.user_len + args.answer_len) - args.answer_len,
    }


async def run_shared(url: str, args, vocab: int) -> dict:
    rng = random.Random(args.seed + 1)
    prefixes = [tokens(rng, args.prefix_len, vocab) for _ in range(args.num_prefixes)]
    prompts = [prefixes[i % args.num_prefixes] + tokens(rng, args.suffix_len, vocab) for i in range(args.shared_requests)]
    rng.shuffle(prompts)
    sem = asyncio.Semaphore(args.conversations)
    ttfts: list[float] = []

    async def one(session, prompt) -> None:
        async with sem:
            ttfts.append((await complete(session, url, prompt, args.answer_len))[0])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one(session, p) for p in prompts))
    return {"ttft_p50_ms": pct(ttfts, 50) * 1e3, "ttft_p99_ms": pct(ttfts, 99) * 1e3}


async def run_probe(url: str, args, vocab: int) -> dict:
    rng = random.Random(args.seed + 2)
    new = args.user_len + args.answer_len
    cold, warm, fresh = [], [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for _ in range(args.repeats):
            history = tokens(rng, args.history_len - new, vocab)
            cold.append((await complete(session, url, history + tokens(rng, new, vocab), 2))[0])
            warm.append((await complete(session, url, history + tokens(rng, new, vocab), 2))[0])
            fresh.append((await complete(session, url, tokens(rng, new, vocab), 2))[0])
    c, w, f = (pct(x, 50) * 1e3 for x in (cold, warm, fresh))
    return {"cold_ttft_p50_ms": c, "warm_ttft_p50_ms": w, "fresh_ttft_p50_ms": f, "warm_over_cold": w / c}


def counters(router_url: str, prefill_urls: list[str]) -> dict:
    """Prompt tokens the prefills found cached, and KV bytes sent / not sent, so far."""
    hits = 0
    for u in prefill_urls:
        _, st = http_json(u + "/stats")
        hits += int(st.get("prefix_cache_hits", 0))
    sent = saved = 0.0
    with urllib.request.urlopen(router_url + "/metrics", timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("pdbus:kv_transfer_bytes_total"):
                sent += float(line.rsplit(" ", 1)[1])
            elif line.startswith("pdbus:kv_transfer_bytes_saved_total"):
                saved += float(line.rsplit(" ", 1)[1])
    return {"prefill_tokens_hit": hits, "kv_bytes_sent": sent, "kv_bytes_saved": saved}


def delta(after: dict, before: dict, prompt_tokens: int) -> dict:
    d = {k: after[k] - before[k] for k in after}
    d["prompt_tokens"] = prompt_tokens
    d["prompt_tokens_computed"] = prompt_tokens - d["prefill_tokens_hit"]
    return d


def start(cluster: Cluster, args, cache: str, policy: str):
    flag = "--enable-prefix-caching" if cache == "on" else "--no-enable-prefix-caching"
    common = ["--max-model-len", str(args.max_model_len), "--kv-cache-memory-gb", str(args.kv_cache_memory_gb), flag,
              "--cache-transfer-protocol", args.protocol, *args.serve_arg]  # fmt: skip
    router = cluster.router("--router-policy", policy)
    prefills = [cluster.serve(args.model, "prefill", router, *common) for _ in range(args.prefills)]
    cluster.serve(args.model, "decode", router, *common)
    cluster.wait_health(router.url)

    def all_alive():
        _, body = http_json(router.url + "/instances")
        return sum(i["alive"] for i in body.get("instances", ())) >= args.prefills + 1

    wait_until(all_alive, 120, "every instance registered")
    return router, [p.url for p in prefills]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the built-in model)")
    ap.add_argument("--workload", default="chat,shared")
    ap.add_argument("--configs", default="on:cache_aware,on:round_robin,off:round_robin",
                    help="comma-separated cache:policy pairs")  # fmt: skip
    ap.add_argument("--prefills", type=int, default=2)
    ap.add_argument("--protocol", default="ipc")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--user-len", type=int, default=64)
    ap.add_argument("--answer-len", type=int, default=128)
    ap.add_argument("--num-prefixes", type=int, default=4)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--shared-requests", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=0.5)
    ap.add_argument("--serve-arg", action="append", default=[], help="extra flag for every instance (repeatable)")
    ap.add_argument("--history-len", type=int, default=2048, help="probe: the history's tokens")
    ap.add_argument("--repeats", type=int, default=5, help="probe: requests of each kind")
    ap.add_argument("--vocab", type=int, default=1024, help="prompt token ids are drawn below this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from pdbus.config import default_model_dir

    args.model = args.model or default_model_dir()
    workloads = args.workload.split(",")
    results = []
    for spec in args.configs.split(","):
        cache, policy = spec.split(":")
        for workload in workloads:
            with tempfile.TemporaryDirectory(prefix="pdbus-prefix-") as tmp, Cluster(tmp) as cluster:
                router, urls = start(cluster, args, cache, policy)
                vocab = args.vocab
                before = counters(router.url, urls)
                SENT["prompt_tokens"] = 0
                t0 = time.perf_counter()
                fn = {"chat": run_chat, "shared": run_shared, "probe": run_probe}[workload]
                row = asyncio.run(fn(router.url, args, vocab))
                row.update(delta(counters(router.url, urls), before, SENT["prompt_tokens"]))
                row.update(workload=workload, cache=cache, policy=policy, wall_s=round(time.perf_counter() - t0, 2))
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| workload | cache | policy | TTFT p50 / p99 ms (turn 1) | TTFT p50 / p99 ms (later turns) | prompt tokens computed | KV MB sent | KV MB not sent |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["workload"] == "probe":
            print(f"| probe | {r['cache']} | {r['policy']} | cold {r['cold_ttft_p50_ms']:.1f} | warm "
                  f"{r['warm_ttft_p50_ms']:.1f} ({r['warm_over_cold']:.2f}x cold), fresh {r['fresh_ttft_p50_ms']:.1f} "
                  f"| {r['prompt_tokens_computed']:,} of {r['prompt_tokens']:,} | {r['kv_bytes_sent'] / 1e6:.1f} "
                  f"| {r['kv_bytes_saved'] / 1e6:.1f} |")  # fmt: skip
            continue
        if r["workload"] == "chat":
            first = f"{r['ttft_turn1_p50_ms']:.1f} / {r['ttft_turn1_p99_ms']:.1f}"
            later = f"{r['ttft_later_p50_ms']:.1f} / {r['ttft_later_p99_ms']:.1f}"
        else:
            first, later = "–", f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f}"
        print(f"| {r['workload']} | {r['cache']} | {r['policy']} | {first} | {later} "
              f"| {r['prompt_tokens_computed']:,} of {r['prompt_tokens']:,} "
              f"| {r['kv_bytes_sent'] / 1e6:.1f} | {r['kv_bytes_saved'] / 1e6:.1f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
