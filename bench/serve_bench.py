"""Load generator for any OpenAI-compatible server, in the manner of ``vllm bench serve``.

    python bench/serve_bench.py --base-url http://127.0.0.1:8188 --num-prompts 200 \
        --input-len 64 --output-len 64 --request-rate 8 --goodput ttft:1000 tpot:50 --json out.json
    python bench/serve_bench.py --base-url URL --sweep-rates 1,2,4,8,inf --plot sweep.png
    python bench/serve_bench.py --suite cpu          # pdbus mixed / PD ipc / PD tcp / vLLM-CPU /
                                                     # transformers, one run (bench/cpu_suite.py)

Requests go to ``/v1/completions`` with token-id prompts (``prompt: [ids]``), ``stream: true``,
``ignore_eos: true`` and ``return_token_ids: true``, so servers started with
``--skip-tokenizer-init`` work. Per request: TTFT (first token-bearing SSE chunk), ITL (gap
between token-bearing chunks; a chunk carrying n tokens counts as n gaps of gap/n), TPOT
((e2e - ttft) / (tokens - 1)) and E2E. Tokens are counted from the chunk's token ids
(``completion_token_ids`` for pdbus, ``token_ids`` for vLLM), else one per non-empty chunk, and
the final ``usage`` when the server sends it corrects the total.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import msgspec

    _loads = msgspec.json.decode
except ImportError:  # pragma: no cover - msgspec is a pdbus dependency
    _loads = json.loads

PERCENTILES = (50, 90, 99)


# --------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0  # tokens received
    expected_len: int = 0
    ttft: float = 0.0  # seconds
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0  # perf_counter at send
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


def _chunk_tokens(chunk: dict) -> int | None:
    """Tokens carried by one completion chunk; None when the chunk says nothing about tokens."""
    n = None
    for choice in chunk.get("choices") or ():
        ids = choice.get("completion_token_ids")
        if ids is None:
            ids = choice.get("token_ids")
        if ids is not None:
            n = (n or 0) + len(ids)
        elif choice.get("text"):
            n = (n or 0) + 1
    return n


async def send_request(session, url: str, body: dict, res: RequestResult) -> RequestResult:
    """POST one streamed completion and time its chunks into ``res``."""
    res.start = last = time.perf_counter()
    usage_tokens = None
    done = False
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            buf = b""
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                buf += data.replace(b"\r\n", b"\n")
                *events, buf = buf.split(b"\n\n")
                if buf.rstrip() == b"data: [DONE]":  # the last event, whatever its line ending
                    events.append(buf)
                    buf = b""
                for event in events:
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            continue
                        chunk = _loads(payload)
                        if "error" in chunk:
                            res.error = f"stream error: {str(chunk['error'])[:300]}"
                            return res
                        if chunk.get("usage"):
                            usage_tokens = chunk["usage"].get("completion_tokens", usage_tokens)
                        n = _chunk_tokens(chunk)
                        if not n:
                            continue
                        if res.output_len == 0:
                            res.ttft = now - res.start
                        else:
                            res.itl.extend([(now - last) / n] * n)
                        res.output_len += n
                        last = now
        res.e2e = time.perf_counter() - res.start
        if usage_tokens is not None:
            res.output_len = max(res.output_len, usage_tokens)
        if not done:
            res.error = "stream ended without [DONE]"
        elif res.output_len == 0:
            res.error = "no tokens"
        else:
            res.ok = True
    except Exception as exc:  # a request's failure is that request's result, never the run's
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    return res


# --------------------------------------------------------------------------- a workload


@dataclass
class Load:
    num_prompts: int = 100
    input_len: int = 64
    output_len: int = 64
    range_ratio: float = 0.0  # lengths uniform in [len*(1-r), len*(1+r)]
    vocab_size: int = 96
    min_token_id: int = 3  # skip pad / bos / eos
    seed: int = 0

    def requests(self, round_index: int = 0) -> list[tuple[list[int], int]]:
        rng = random.Random(self.seed * 1_000_003 + round_index)

        def length(n: int) -> int:
            lo, hi = max(1, int(n * (1 - self.range_ratio))), max(1, int(n * (1 + self.range_ratio)))
            return rng.randint(lo, hi)

        out = []
        for _ in range(self.num_prompts):
            plen, olen = length(self.input_len), length(self.output_len)
            out.append(([rng.randrange(self.min_token_id, self.vocab_size) for _ in range(plen)], olen))
        return out


async def run_load(
    base_url: str,
    model: str | None,
    requests: list[tuple[list[int], int]],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    timeout: float = 600.0,
    extra_body: dict | None = None,
) -> list[RequestResult]:
    """Send ``requests`` (Poisson arrivals at ``request_rate``/s, or all at once when infinite),
    at most ``max_concurrency`` in flight; returns one result per request in order."""
    import aiohttp

    url = base_url.rstrip("/") + "/v1/completions"
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        if model is None:
            model = await _first_model(session, base_url)

        async def one(prompt: list[int], out_len: int) -> RequestResult:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": out_len,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "return_token_ids": True,
                "stream_options": {"include_usage": True},
                **(extra_body or {}),
            }
            res = RequestResult(prompt_len=len(prompt), expected_len=out_len)
            if sem is None:
                return await send_request(session, url, body, res)
            async with sem:
                return await send_request(session, url, body, res)

        tasks = []
        for i, (prompt, out_len) in enumerate(requests):
            if i and math.isfinite(request_rate) and request_rate > 0:
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(one(prompt, out_len)))
        return list(await asyncio.gather(*tasks))


async def _first_model(session, base_url: str) -> str | None:
    try:
        async with session.get(base_url.rstrip("/") + "/v1/models") as resp:
            data = await resp.json()
            return data["data"][0]["id"]
    except Exception:  # a server without /v1/models takes requests without a model name
        return None


# --------------------------------------------------------------------------- metrics


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist_ms(xs: list[float]) -> dict:
    out = {"mean": statistics.fmean(xs) * 1e3 if xs else float("nan")}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q) * 1e3
    return out


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``ttft:1000 tpot:50 e2el:5000`` (ms) -> {"ttft": 1.0, ...} in seconds."""
    slos = {}
    for item in items or ():
        for part in item.replace(",", " ").split():
            key, _, value = part.partition(":")
            if key not in ("ttft", "tpot", "e2el") or not value:
                raise SystemExit(f"--goodput takes ttft:MS tpot:MS e2el:MS, got {part!r}")
            slos[key] = float(value) / 1e3
    return slos


def summarize(results: list[RequestResult], slos: dict[str, float] | None = None) -> dict:
    ok = [r for r in results if r.ok]
    if results:
        t0 = min(r.start for r in results)
        t1 = max(r.start + r.e2e for r in results)
        duration = max(t1 - t0, 1e-9)
    else:
        duration = float("nan")
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    summary = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "short": sum(1 for r in ok if r.output_len != r.expected_len),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": dist_ms([r.ttft for r in ok]),
        "tpot_ms": dist_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": dist_ms([x for r in ok for x in r.itl]),
        "e2e_ms": dist_ms([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    if slos:
        good = [
            r
            for r in ok
            if r.ttft <= slos.get("ttft", math.inf)
            and (r.tpot or 0.0) <= slos.get("tpot", math.inf)
            and r.e2e <= slos.get("e2el", math.inf)
        ]
        summary["goodput"] = len(good) / duration
        summary["goodput_slos_ms"] = {k: v * 1e3 for k, v in slos.items()}
    return summary


def median_summary(rounds: list[dict]) -> dict:
    """The per-key median over rounds of every numeric leaf (lists of errors are merged)."""
    if len(rounds) == 1:
        return dict(rounds[0])
    out: dict = {}
    for key, first in rounds[0].items():
        values = [r.get(key) for r in rounds]
        if isinstance(first, dict):
            out[key] = median_summary([v for v in values if isinstance(v, dict)])
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            nums = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
            out[key] = statistics.median(nums) if nums else float("nan")
        elif isinstance(first, list):
            out[key] = sorted({x for v in values for x in (v or ())})[:5]
        else:
            out[key] = first
    return out


def measure(base_url: str, model: str | None, load: Load, rate: float, max_concurrency: int | None, rounds: int,
            slos: dict | None = None, warmup: int = 0, round_offset: int = 0, timeout: float = 600.0,
            extra_body: dict | None = None) -> dict:  # fmt: skip
    """``warmup`` discarded rounds, then ``rounds`` measured ones; round i uses prompt set i."""
    per_round = []
    for i in range(warmup + rounds):
        reqs = load.requests(round_offset + i)
        results = _run(
            run_load(base_url, model, reqs, rate, max_concurrency, load.seed + i, timeout, extra_body)
        )
        if i >= warmup:
            per_round.append(summarize(results, slos))
    return {
        "request_rate": rate,
        "max_concurrency": max_concurrency,
        "rounds": per_round,
        "summary": median_summary(per_round),
    }


def _run(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# --------------------------------------------------------------------------- printing


def format_summary(s: dict, title: str = "") -> str:
    lines = [f"{'=' * 20} {title or 'Serving Benchmark Result'} {'=' * 20}"]

    def row(name, value, fmt="{:.2f}"):
        lines.append(f"{name:<40}{fmt.format(value) if isinstance(value, (int, float)) else value:>12}")

    row("Successful requests:", s["completed"], "{}")
    row("Failed requests:", s["failed"], "{}")
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"], "{:.0f}")
    row("Total generated tokens:", s["total_output_tokens"], "{:.0f}")
    row("Request throughput (req/s):", s["request_throughput"])
    if "goodput" in s:
        row("Request goodput (req/s):", s["goodput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for key, name in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                      ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency")):  # fmt: skip
        lines.append(f"{'-' * 15}{name}{'-' * 15}")
        short = key.split("_")[0].upper()
        row(f"Mean {short} (ms):", s[key]["mean"])
        for q in PERCENTILES:
            row(f"P{q} {short} (ms):", s[key][f"p{q}"])
    for err in s.get("errors") or ():
        lines.append(f"error: {err}")
    lines.append("=" * 60)
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def parse_rate(text: str) -> float:
    return math.inf if text.strip().lower() in ("inf", "infinity") else float(text)


def vocab_from_model_dir(path: str) -> int:
    with open(os.path.join(path, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--suite", choices=["cpu"], help="run a whole side-by-side suite instead (see bench/cpu_suite.py)"
    )
    p.add_argument(
        "--base-url", default="http://127.0.0.1:8188", help="server root (the tool adds /v1/completions)"
    )
    p.add_argument(
        "--model", default=None, help="model name in the request (default: the first of /v1/models)"
    )
    p.add_argument("--model-dir", default=None, help="checkpoint dir: read vocab_size from its config.json")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="prompt ids are uniform in [3, vocab) (default 96, or --model-dir's)",
    )
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]")
    p.add_argument(
        "--request-rate",
        type=parse_rate,
        default=math.inf,
        help="requests/s, Poisson arrivals; inf = all at once",
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument(
        "--sweep-rates", default=None, help="comma list of request rates (inf allowed): one run each"
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="measured rounds per point; the report is their median"
    )
    p.add_argument("--warmup-rounds", type=int, default=0, help="discarded rounds before measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:1000 tpot:50 e2el:5000"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    p.add_argument(
        "--json", dest="json_path", default=None, metavar="PATH", help="write the full result here"
    )
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="with --sweep-rates: TTFT/TPOT/ITL p50/p99 against rate"
    )
    p.add_argument("--out-dir", default=None, help="--suite: where results, logs and the checkpoint go")
    p.add_argument("--suite-args", default="", help="--suite: extra options for bench/cpu_suite.py (quoted)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.suite:
        import shlex

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import cpu_suite

        extra = shlex.split(args.suite_args)
        if args.out_dir:
            extra = ["--out-dir", args.out_dir, *extra]
        cpu_suite.main(extra)
        return
    vocab = args.vocab_size or (vocab_from_model_dir(args.model_dir) if args.model_dir else 96)
    load = Load(args.num_prompts, args.input_len, args.output_len, args.range_ratio, vocab, seed=args.seed)
    slos = parse_goodput(args.goodput)
    extra_body = json.loads(args.extra_body) if args.extra_body else None
    rates = [parse_rate(x) for x in args.sweep_rates.split(",")] if args.sweep_rates else [args.request_rate]
    points = []
    for rate in rates:
        point = measure(args.base_url, args.model, load, rate, args.max_concurrency, args.rounds, slos,
                        args.warmup_rounds, timeout=args.timeout, extra_body=extra_body)  # fmt: skip
        points.append(point)
        title = f"rate {rate:g} req/s" + (
            f", max concurrency {args.max_concurrency}" if args.max_concurrency else ""
        )
        print(format_summary(point["summary"], title), flush=True)
    result = {
        "base_url": args.base_url,
        "load": asdict(load),
        "max_concurrency": args.max_concurrency,
        "rounds": args.rounds,
        "goodput_slos_ms": {k: v * 1e3 for k, v in slos.items()},
        "argv": sys.argv,
        "points": points,
    }
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(json_safe(result), indent=1))
        print(f"wrote {args.json_path}")
    if args.plot:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plot import plot_sweep

        plot_sweep([(p["request_rate"], p["summary"]) for p in points], args.plot, title=plot_title(args))
        print(f"wrote {args.plot}")


def plot_title(args) -> str:
    ratio = f" ±{args.range_ratio:.0%}" if args.range_ratio else ""
    conc = f", max concurrency {args.max_concurrency}" if args.max_concurrency else ""
    return f"{args.base_url}: prompt {args.input_len}{ratio}, output {args.output_len}{ratio}, {args.num_prompts} requests{conc}"


def json_safe(obj):
    """Strict JSON: inf -> "inf", nan -> null, tuples -> lists."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else ("inf" if math.isinf(obj) else obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
