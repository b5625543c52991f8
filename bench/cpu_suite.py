"""The CPU suite: pdbus mixed, pdbus PD (ipc, tcp), vLLM-CPU and transformers, side by side.

    python bench/serve_bench.py --suite cpu            # = python bench/cpu_suite.py
    python bench/cpu_suite.py --rounds 5 --py-spy --out-dir bench/out/cpu-suite

One run, one checkpoint (shared/PEERS.md's MoE: hidden 64, 8 heads / 2 KV heads, head_dim 32,
6 experts top-2, zero correction bias, fp32), one load: ``--concurrency`` streamed requests at
once (prompt ``--input-len`` random ids, ``--output-len`` tokens, ignore_eos), and one request
at a time. Every server is started first and kept up; then the rounds are interleaved (round r
of every system before round r+1 of any), so background load on a shared machine hits all
systems alike. Each row is the median over rounds. Then, with ``--py-spy``, extra rounds run
under py-spy (never the measured ones) and each server process's hottest frames are summarized.
transformers ``generate`` (batch = concurrency, and 1) runs with every server stopped, and
bench/transfer_bench.py's table is included when that file exists.

Writes ``cpu_suite.json`` and ``cpu_suite.md`` (a snippet for bench/RESULTS.md) to --out-dir.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import peers  # noqa: E402
import serve_bench as sb  # noqa: E402

SERVERS = {  # key -> label
    "mixed": "pdbus mixed",
    "pd-ipc": "pdbus PD ipc",
    "pd-tcp": "pdbus PD tcp",
    "vllm": "vLLM-CPU 0.32",
}


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- servers


def start_servers(systems: peers.Systems, keys: list[str], model: str, args) -> dict[str, dict]:
    """Start every server; a failure is that row's note, never the suite's end."""
    out: dict[str, dict] = {}
    order = ["vllm"] + [k for k in keys if k != "vllm"]  # vLLM first: it takes longest
    for key in order:
        if key not in keys:
            continue
        t0 = time.monotonic()
        before = set(systems.pids())
        try:
            if key == "mixed":
                url = systems.pdbus_mixed(model, args.mixed_threads)
            elif key.startswith("pd-"):
                url = systems.pdbus_pd(model, key[3:], args.pd_threads)
            else:
                url = systems.vllm_server(model, args.vllm_venv, timeout=args.vllm_timeout)
            pids = {k: v for k, v in systems.pids().items() if k not in before}
            out[key] = {"url": url, "pids": pids, "start_s": time.monotonic() - t0}
            log(f"{SERVERS[key]} up at {url} after {time.monotonic() - t0:.1f}s")
        except Exception as exc:  # noqa: BLE001 - reported in the table
            out[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            log(f"{SERVERS[key]} failed to start: {exc}")
    return out


# --------------------------------------------------------------------------- measuring


def group_cpu_seconds(pgids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process group (a server and its children)."""
    tick = os.sysconf("SC_CLK_TCK")
    want = {pgid: name for name, pgid in pgids.items()}
    out = dict.fromkeys(pgids, 0.0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = want.get(int(fields[2]))  # fields[0] is the state; [2] the process group
        if name is not None:
            out[name] += (int(fields[11]) + int(fields[12])) / tick
    return out


def measure_servers(servers: dict[str, dict], load_args: dict, concurrencies: list[int], rounds: int) -> dict:
    """Interleaved rounds; returns {key: {conc: {"rounds", "summary"}}}. Each round also records
    the CPU seconds its server processes used, so a cost per token survives a shared machine."""
    up = {k: v for k, v in servers.items() if "url" in v}
    res: dict[str, dict] = {k: {} for k in up}
    for conc in concurrencies:
        n = conc if conc > 1 else load_args["single_prompts"]
        load = sb.Load(
            n,
            load_args["input_len"],
            load_args["output_len"],
            0.0,
            load_args["vocab"],
            seed=load_args["seed"],
        )
        for srv in up.values():  # warm-up round each
            sb.measure(srv["url"], None, load, float("inf"), conc, 1, warmup=0, round_offset=10_000)
        per_round: dict[str, list] = {k: [] for k in up}
        for r in range(rounds):
            for key, srv in up.items():
                cpu0 = group_cpu_seconds(srv["pids"])
                s = sb.measure(srv["url"], None, load, float("inf"), conc, 1, round_offset=r)["rounds"][0]
                cpu = {k: v - cpu0[k] for k, v in group_cpu_seconds(srv["pids"]).items()}
                s["server_cpu_s"] = cpu
                s["cpu_ms_per_token"] = 1e3 * sum(cpu.values()) / max(1, s["total_output_tokens"])
                s["server_cores_busy"] = sum(cpu.values()) / s["duration_s"]
                per_round[key].append(s)
            log(f"concurrency {conc}: round {r + 1}/{rounds} done (load average {os.getloadavg()[0]:.1f})")
        for key in up:
            res[key][conc] = {"rounds": per_round[key], "summary": sb.median_summary(per_round[key])}
    return res


def profile_servers(servers: dict[str, dict], load_args: dict, conc: int, rounds: int, out_dir: Path) -> dict:
    """py-spy record every server process during ``rounds`` extra rounds; summarize each."""
    pyspy = Path(sys.executable).parent / "py-spy"
    if not pyspy.exists():
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    load = sb.Load(
        conc, load_args["input_len"], load_args["output_len"], 0.0, load_args["vocab"], seed=load_args["seed"]
    )
    report = {}
    for key, srv in servers.items():
        if "url" not in srv:
            continue
        recorders = []
        for name, pid in srv["pids"].items():
            path = out_dir / f"{key}-{name}.txt"
            cmd = [str(pyspy), "record", "--pid", str(pid), "--rate", str(PROFILE_HZ), "--format", "raw", "--output", str(path),
                   "--subprocesses", "--nonblocking"]  # fmt: skip
            recorders.append(
                (name, path, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            )
        time.sleep(1.5)  # let py-spy attach
        t0 = time.monotonic()
        m = sb.measure(srv["url"], None, load, float("inf"), conc, rounds, round_offset=20_000)
        wall = time.monotonic() - t0
        for _, _, proc in recorders:
            proc.send_signal(signal.SIGINT)
        procs = {}
        for name, path, proc in recorders:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            procs[name] = summarize_profile(path, wall + 1.5, PROFILE_HZ)
        report[key] = {
            "wall_s": wall,
            "output_throughput": m["summary"]["output_throughput"],
            "processes": procs,
        }
        log(f"profiled {SERVERS[key]}")
    return report


PROFILE_HZ = 100
BUCKETS = (  # (label, substring of a frame) — first match from the leaf up wins; asyncio only if none
    ("engine -> I/O thread handoff (call_soon_threadsafe)", ("call_soon_threadsafe",)),
    (
        "model forward (native/model, attention, kernels)",
        ("native/model", "native/attention", "native/kernels", "torch/nn/"),
    ),
    ("sampler", ("native/sampler",)),
    ("KV transfer", ("native/transfer",)),
    ("engine scheduling / block manager", ("actors/engine",)),
    ("bus: zmq / msgspec", ("zmq/", "msgspec", "pdbus/wire", "pdbus/sockets", "pdbus/actor")),
    ("HTTP / SSE (aiohttp, frontend)", ("aiohttp", "actors/frontend", "actors/router")),
    ("rank server glue (actors/rank)", ("actors/rank",)),
    ("vLLM model", ("vllm/model_executor", "vllm/v1/attention", "vllm/v1/worker")),
    ("vLLM engine / scheduler", ("vllm/v1/core", "vllm/v1/engine")),
    ("vLLM API server", ("vllm/entrypoints",)),
)


def summarize_profile(path: Path, wall: float, rate: int) -> dict:
    """Busy share of each process and the hottest frames, from py-spy's raw (collapsed) output."""
    if not path.exists():
        return {"error": "py-spy wrote nothing"}
    total = 0
    per_proc: Counter = Counter()
    leaf: Counter = Counter()
    bucket: Counter = Counter()
    thread: Counter = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        proc = frames[0] if frames[0].startswith("process ") else "main"
        per_proc[proc.split(":")[0]] += n
        leaf[_short(frames[-1])] += n
        label = (
            "asyncio loop, sockets"
            if any("asyncio/" in f or "selectors.py" in f for f in frames)
            else "other"
        )
        for frame in reversed(frames):
            hit = next((lab for lab, keys in BUCKETS if any(k in frame for k in keys)), None)
            if hit:
                label = hit
                break
        bucket[label] += n
        thread[
            "engine thread"
            if any("Engine._loop" in f for f in frames)
            else "I/O thread(s)"
            if any("asyncio/" in f or "selectors.py" in f or "aiohttp" in f for f in frames)
            else "other threads"
        ] += n
    expected = wall * rate
    return {
        "samples": total,
        "busy_cores": total / expected if expected else None,  # py-spy skips idle threads
        "by_process": {k: v / expected for k, v in per_proc.most_common(6)},
        "by_thread": {k: v / expected for k, v in thread.most_common()},
        "buckets": {k: v / total for k, v in bucket.most_common()} if total else {},
        "top_leaf": [(k, v / total) for k, v in leaf.most_common(12)] if total else [],
    }


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


# --------------------------------------------------------------------------- baselines


def run_hf(model: str, args) -> dict:
    out = {}
    for batch in (args.concurrency, 1):
        try:
            r = peers.run_hf_subprocess(
                model, batch, args.input_len, args.output_len, args.hf_rounds, args.hf_threads, args.seed
            )
            out[batch] = {"rounds": r["rounds"], "summary": sb.median_summary(r["rounds"])}
        except Exception as exc:  # noqa: BLE001 - reported in the table
            out[batch] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        log(f"transformers generate batch {batch} done")
    return out


def run_transfer_bench(reps: int) -> dict | None:
    path = HERE / "transfer_bench.py"
    if not path.exists():
        return None
    try:
        proc = subprocess.run([sys.executable, str(path), "--json", "--reps", str(reps)], capture_output=True, text=True,
                              timeout=600, cwd=str(ROOT))  # fmt: skip
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {proc.stderr[-500:]}"}
        return json.loads(proc.stdout)
    except Exception as exc:  # noqa: BLE001 - reported beside the table
        return {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------- tables


def rows(result: dict) -> list[dict]:
    out = []
    conc = result["load"]["concurrency"]
    for key, label in SERVERS.items():
        srv = result["servers"].get(key)
        if srv is None:
            continue
        for c in (conc, 1):
            if "error" in srv:
                out.append({"system": label, "conc": c, "note": srv["error"]})
                continue
            m = result["measured"][key][c]
            s = m["summary"]
            tps = [r["output_throughput"] for r in m["rounds"]]
            out.append({"system": label, "conc": c, "ttft": (s["ttft_ms"]["p50"], s["ttft_ms"]["p99"]),
                        "itl": (s["itl_ms"]["p50"], s["itl_ms"]["p99"]), "tpot": s["tpot_ms"]["p50"],
                        "tps": s["output_throughput"], "tps_range": (min(tps), max(tps)),
                        "failed": sum(r["failed"] for r in m["rounds"]), "cpu": s.get("cpu_ms_per_token")})  # fmt: skip
    for batch, h in (result.get("transformers") or {}).items():
        label = f"transformers generate, batch {batch}"
        if "error" in h:
            out.append({"system": label, "conc": int(batch), "note": h["error"]})
            continue
        s = h["summary"]
        tps = [r["output_throughput"] for r in h["rounds"]]
        out.append({"system": label, "conc": int(batch), "ttft": (s["ttft_ms"], None), "itl": (s["itl_ms"]["p50"], s["itl_ms"]["p99"]),
                    "tpot": s["itl_ms"]["mean"], "tps": s["output_throughput"], "tps_range": (min(tps), max(tps)), "failed": 0,
                    "cpu": None})  # fmt: skip
    return out


def _f(x, digits: int = 1) -> str:
    if x is None:
        return "–"
    return f"{x:,.{digits}f}" if x < 100 else f"{x:,.0f}"


def markdown_table(result: dict) -> str:
    lines = [
        "| system | concurrency | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | TPOT p50 (ms) | output tok/s (min–max) "
        "| server CPU ms / token | failed |",
        "|---|---:|---|---|---:|---|---:|---:|",
    ]
    for r in rows(result):
        if "note" in r:
            lines.append(f"| {r['system']} | {r['conc']} | not run: {r['note']} | | | | | |")
            continue
        ttft = _f(r["ttft"][0], 1) + (f" / {_f(r['ttft'][1], 1)}" if r["ttft"][1] is not None else "")
        lines.append(
            f"| {r['system']} | {r['conc']} | {ttft} | {_f(r['itl'][0], 2)} / {_f(r['itl'][1], 2)} | {_f(r['tpot'], 2)} "
            f"| {r['tps']:,.0f} ({r['tps_range'][0]:,.0f}–{r['tps_range'][1]:,.0f}) | {_f(r['cpu'], 2)} | {r['failed']} |"
        )
    return "\n".join(lines)


def ratios(result: dict) -> list[str]:
    conc = result["load"]["concurrency"]
    tps = {}
    for key in SERVERS:
        m = result["measured"].get(key, {}).get(conc)
        if m:
            tps[key] = m["summary"]["output_throughput"]
    out = []
    for pd in ("pd-ipc", "pd-tcp"):
        if pd in tps and "mixed" in tps:
            out.append(
                f"{SERVERS[pd]} / mixed output tok/s at {conc} concurrent: {tps[pd] / tps['mixed']:.0%} (aim ≥ 80%)"
            )
    if "mixed" in tps and "vllm" in tps:
        out.append(
            f"pdbus mixed / vLLM-CPU output tok/s at {conc} concurrent: {tps['mixed'] / tps['vllm']:.0%} (aim > 100%)"
        )
    return out


def transfer_table(tb: dict | None) -> str:
    if not tb:
        return ""
    if "error" in tb:
        return f"transfer_bench.py failed: {tb['error']}"
    lines = ["| shape | method | MB | median ms | GB/s | best GB/s |", "|---|---|---:|---:|---:|---:|"]
    for r in tb.get("results", []):
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | error: {r['error']} | | | |")
        else:
            lines.append(f"| {r['shape']} | {r['method']} | {r['bytes'] / 1e6:.1f} | {r['median_s'] * 1e3:.2f} | "
                         f"{r['gbps_median']:.2f} | {r['gbps_best']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def profile_text(prof: dict | None) -> str:
    if not prof:
        return ""
    if "error" in prof:
        return f"py-spy: {prof['error']}"
    lines = []
    for key, p in prof.items():
        lines.append(f"- **{SERVERS[key]}** ({p['output_throughput']:,.0f} tok/s under py-spy)")
        for name, s in p["processes"].items():
            if "error" in s:
                lines.append(f"  - {name}: {s['error']}")
                continue
            top = ", ".join(f"{k} {v:.0%}" for k, v in list(s["buckets"].items())[:5])
            threads = ", ".join(f"{k} {v:.2f}" for k, v in s["by_thread"].items())
            lines.append(f"  - {name}: {s['busy_cores']:.2f} cores busy ({threads}); {top}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    ld = result["load"]
    parts = [
        f"### CPU suite — {result['date']}, commit `{result['commit']}`, card: CPU, {result['cores']} cores",
        "",
        f"Checkpoint: random ERNIE-4.5-MoE (shared/PEERS.md shape: hidden 64, 8 heads / 2 KV heads, head_dim 32, "
        f"6 experts top-2, {ld['layers']} layers, vocab {ld['vocab']}, zero correction bias), fp32. Load: "
        f"{ld['concurrency']} concurrent streamed requests (and 1 at a time, {ld['single_prompts']} per round), prompt "
        f"{ld['input_len']} random ids, {ld['output_len']} tokens out, ignore_eos; median of {ld['rounds']} interleaved "
        f"rounds. pdbus threads: mixed {ld['mixed_threads']}, PD {ld['pd_threads']} per process. transformers: "
        f"median of {ld.get('hf_rounds', ld['rounds'])} `generate` calls, {ld.get('hf_threads', '?')} threads.",
        "",
        f"Command: `{result['command']}`",
        "",
        markdown_table(result),
        "",
        *[f"- {x}" for x in ratios(result)],
    ]
    if result.get("profile"):
        parts += [
            "",
            "py-spy (extra rounds, not the measured ones; share of samples):",
            "",
            profile_text(result["profile"]),
        ]
    if result.get("transfer"):
        parts += ["", "KV transfer (bench/transfer_bench.py):", "", transfer_table(result["transfer"])]
    if result.get("notes"):
        parts += ["", *[f"Note: {n}" for n in result["notes"]]]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out-dir", default=str(HERE / "out" / "cpu-suite"))
    p.add_argument(
        "--model-dir", default=None, help="checkpoint to serve (default: build PEERS.md's into --out-dir/..)"
    )
    p.add_argument(
        "--systems", default="mixed,pd-ipc,pd-tcp,vllm,hf", help="subset of mixed,pd-ipc,pd-tcp,vllm,hf"
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--single-prompts", type=int, default=4, help="requests per round at concurrency 1")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-threads", type=int, default=1, help="PDBUS_TORCH_THREADS for the mixed server")
    p.add_argument("--pd-threads", type=int, default=1, help="PDBUS_TORCH_THREADS for each PD rank")
    p.add_argument(
        "--hf-rounds", type=int, default=3, help="transformers generate rounds (after one warm-up)"
    )
    p.add_argument("--hf-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vllm-venv", default=str(peers.DEFAULT_VLLM_VENV))
    p.add_argument(
        "--vllm-timeout", type=float, default=420.0, help="seconds vLLM may take to become healthy"
    )
    p.add_argument("--py-spy", action="store_true", help="profile every server during extra rounds")
    p.add_argument("--profile-rounds", type=int, default=3)
    p.add_argument("--transfer-reps", type=int, default=3, help="bench/transfer_bench.py --reps (0: skip it)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: stop every server

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    keys = [k for k in args.systems.split(",") if k]
    model = args.model_dir or peers.build_checkpoint(out_dir.parent / "peer-moe")
    cfg = json.loads((Path(model) / "config.json").read_text())
    result = {
        "date": datetime.date.today().isoformat(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "command": (f"nice -n {os.nice(0)} " if os.nice(0) else "")
        + ".venv/bin/python bench/serve_bench.py --suite cpu"
        + (f" --suite-args {shlex.quote(shlex.join(argv))}" if argv else ""),
        "model": model,
        "load": {
            "concurrency": args.concurrency,
            "single_prompts": args.single_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "rounds": args.rounds,
            "vocab": cfg["vocab_size"],
            "layers": cfg["num_hidden_layers"],
            "mixed_threads": args.mixed_threads,
            "pd_threads": args.pd_threads,
            "hf_rounds": args.hf_rounds,
            "hf_threads": args.hf_threads,
        },  # fmt: skip
        "notes": [],
    }
    load_args = {"input_len": args.input_len, "output_len": args.output_len, "vocab": cfg["vocab_size"], "seed": args.seed,
                 "single_prompts": args.single_prompts}  # fmt: skip
    loadavg = os.getloadavg()
    server_keys = [k for k in keys if k in SERVERS]
    systems = peers.Systems(out_dir / "logs")
    try:
        servers = start_servers(systems, server_keys, model, args)
        result["servers"] = servers
        result["load_average_before"] = loadavg
        result["measured"] = measure_servers(servers, load_args, [args.concurrency, 1], args.rounds)
        result["load_average_after"] = os.getloadavg()
        if args.py_spy:
            result["profile"] = profile_servers(
                servers, load_args, args.concurrency, args.profile_rounds, out_dir / "py-spy"
            )
    finally:
        systems.close()
    if "hf" in keys:
        result["transformers"] = run_hf(model, args)
    if args.transfer_reps > 0:
        result["transfer"] = run_transfer_bench(args.transfer_reps)
    result["nice"] = os.nice(0)
    if result["nice"]:
        result["notes"].append(f"run at nice {result['nice']} (servers and client inherit it)")
    after = result.get("load_average_after") or os.getloadavg()
    if max(loadavg[0], after[0]) > (os.cpu_count() or 1) * 0.5:
        result["notes"].append(
            f"the machine was shared: 1-minute load average {loadavg[0]:.1f} before the measured rounds, "
            f"{after[0]:.1f} after (other work on the same cores). Rounds were interleaved so it hit every "
            "system alike, but a process's share of the cores then grows with its count of runnable threads; "
            "read the server CPU ms / token beside the wall-clock figures"
        )
    result["wall_s"] = time.monotonic() - t_start
    (out_dir / "cpu_suite.json").write_text(json.dumps(sb.json_safe(result), indent=1))
    md = markdown(result)
    (out_dir / "cpu_suite.md").write_text(md)
    print(md)
    log(f"wrote {out_dir / 'cpu_suite.json'} and {out_dir / 'cpu_suite.md'} in {result['wall_s']:.0f}s")


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=str(ROOT), timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    main()
