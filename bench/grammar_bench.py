"""What a grammar costs a served decode: inter-token latency at concurrency 16 with a json_schema
(structured output, actors/engine/grammar.py) against the same load without, in one run.

    PYTHONPATH=. python bench/grammar_bench.py                      # built-in model, mixed server
    PYTHONPATH=. python bench/grammar_bench.py --base-url URL --rounds 3 --json out.json

Starts a mixed server on the built-in model through ``pdbus.procs.Cluster`` (or uses
``--base-url``), then alternates rounds of ``bench/serve_bench.py``'s load (token-id prompts,
streamed ``/v1/completions``, ``ignore_eos``): one plain, one with vLLM's
``structured_outputs: {"json": SCHEMA}`` (a schema whose output runs ~100 tokens), each round
``--num-prompts`` requests at most ``--concurrency`` in flight. Prints the median over rounds of
each run's ITL and the ratio constrained / plain (issue 18's target: <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_suite import PROFILE_HZ, summarize_profile  # noqa: E402
from serve_bench import Load, measure, median_summary  # noqa: E402

from pdbus.procs import Cluster  # noqa: E402

# eight short strings and a few typed fields: long enough to measure, sure to end
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 8, "maxItems": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "done": {"type": "boolean"},
    },
    "required": ["title", "items", "count", "kind", "done"],
}


def profile(pid: int, path: Path, run) -> dict:
    """py-spy record ``pid`` and its children (raw stacks into ``path``) while ``run()`` runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [pyspy, "record", "--pid", str(pid), "--rate", str(PROFILE_HZ), "--format", "raw", "--output", str(path),
           "--subprocesses", "--nonblocking"]  # fmt: skip
    rec = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not path.exists() and rec.poll() is None and time.monotonic() - t0 < 2.0:
        time.sleep(0.05)  # py-spy attaching (it writes its file when it stops; bounded either way)
    t0 = time.monotonic()
    run()
    wall = time.monotonic() - t0
    rec.send_signal(signal.SIGINT)
    try:
        _, err = rec.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        rec.kill()
        _, err = rec.communicate()
    summary = summarize_profile(path, wall, PROFILE_HZ)
    if "error" in summary:
        summary["stderr"] = (err or "")[-500:]
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=None, help="a running server (default: start a mixed one)")
    ap.add_argument("--model", default=None, help="model directory (default: the built-in model)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=96, help="max_tokens (the plain run makes exactly this many)")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds of each, alternating")
    ap.add_argument("--json", default=None)
    ap.add_argument("--py-spy", default=None, metavar="DIR",
                    help="after the measured rounds, py-spy record the server (raw stacks into DIR) "
                    "during one more round of each kind")  # fmt: skip
    args = ap.parse_args(argv)
    from pdbus.config import default_model_dir

    model = args.model or default_model_dir()
    load = Load(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len)
    constrained = {"structured_outputs": {"json": SCHEMA}}
    with tempfile.TemporaryDirectory(prefix="grammar-bench-") as tmp, Cluster(tmp) as cluster:
        url = args.base_url
        if url is None:
            proc = cluster.serve(model, "mixed", None, "--max-model-len", "1024", "--kv-cache-memory-gb", "0.25")
            cluster.wait_health(proc.url)
            url = proc.url
        # warm-up: the server's first steps, and the schema's compile (cached from then on)
        measure(url, None, Load(num_prompts=args.concurrency, input_len=8, output_len=8), math.inf, args.concurrency, 1)
        measure(url, None, Load(num_prompts=2, input_len=8, output_len=8), math.inf, 2, 1, extra_body=constrained)
        runs: dict[str, list[dict]] = {"plain": [], "json_schema": []}
        for i in range(args.rounds):
            for name, extra in (("plain", None), ("json_schema", constrained)):
                out = measure(url, None, load, math.inf, args.concurrency, 1, round_offset=i, extra_body=extra)
                summary = out["summary"]
                if summary["failed"]:
                    raise SystemExit(f"{name}: {summary['failed']} requests failed: {summary['errors']}")
                runs[name].append(summary)
        if args.py_spy and args.base_url is None:
            profiles = {name: profile(proc.popen.pid, Path(args.py_spy) / f"{name}.txt",
                                      lambda extra=extra: measure(url, None, load, math.inf, args.concurrency, 1,
                                                                  round_offset=50, extra_body=extra))
                        for name, extra in (("plain", None), ("json_schema", constrained))}  # fmt: skip
    result = {name: median_summary(rounds) for name, rounds in runs.items()}
    for name, s in result.items():
        itl = s["itl_ms"]
        print(
            f"{name:12s} ITL mean {itl['mean']:.2f} ms  p50 {itl['p50']:.2f}  p90 {itl['p90']:.2f}  "
            f"tokens/request {s['total_output_tokens'] / max(s['completed'], 1):.0f}  "
            f"output {s['output_throughput']:.0f} tok/s",
            flush=True,
        )
    ratio_mean = result["json_schema"]["itl_ms"]["mean"] / result["plain"]["itl_ms"]["mean"]
    ratio_p50 = result["json_schema"]["itl_ms"]["p50"] / result["plain"]["itl_ms"]["p50"]
    print(f"ratio json_schema / plain at c{args.concurrency}: ITL mean {ratio_mean:.3f}, p50 {ratio_p50:.3f} (target <= 1.10)")
    out = {"args": vars(args), "result": result, "ratio_mean": ratio_mean, "ratio_p50": ratio_p50}
    if args.py_spy and args.base_url is None:
        out["profiles"] = profiles
        for name, prof in profiles.items():
            print(f"py-spy {name}: {json.dumps(prof.get('by_thread'))}")
            for frame, share in prof.get("top_leaf", [])[:10]:
                print(f"    {share:6.1%}  {frame}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
