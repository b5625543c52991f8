"""pdbus and vLLM-CPU loaded by the same external client, ``vllm bench serve`` (shared/PEERS.md).

    .venv/bin/python bench/vllm_client_bench.py [--systems vllm,mixed,pd] [--py-spy] [--out-dir DIR]

The built-in model is exported to the -PT layout in fp32 (vLLM reads only that layout) with its
tokenizer files beside it; each system is started alone on this machine — vLLM-CPU 0.32 from its
own venv (bench/README.md), pdbus mixed (``pdbus serve``), pdbus PD (router + prefill + decode,
KV over ipc) — warmed up, and loaded by ``vllm bench serve --backend openai --dataset-name
random`` (64 in / 64 out, 32 concurrent, 128 prompts, ``--ignore-eos``), which tokenizes with the
model's own tokenizer for every system alike. One table at the end: output tok/s, TTFT and ITL
p50, and the ratios the issue asks for. ``--py-spy`` records each pdbus process during an extra,
unmeasured run (flame graphs under ``--out-dir``). ``--rounds N`` starts and loads every system N
times in turn and reports medians, with the ratios round by round: one system's throughput moves
by 15-40% from run to run on a small shared VM, more than the differences being measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from peers import DEFAULT_VLLM_VENV, Systems  # noqa: E402  (bench/ is this script's folder)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def export_default_model(out: Path) -> str:
    """The built-in model in the -PT layout, fp32, with its tokenizer; reused when present."""
    if (out / "config.json").is_file() and (out / "tokenizer.model").is_file():
        return str(out)
    import torch

    from native.model.export import save_pt
    from native.model.loader import load_model
    from pdbus.config import default_model_dir

    src = Path(default_model_dir())
    model, cfg = load_model(src, dtype="float32")
    save_pt(model, cfg, out, dtype=torch.float32)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return str(out)


def model_name(url: str) -> str:
    from pdbus.procs import http_json

    return http_json(url + "/v1/models")[1]["data"][0]["id"]


def bench_serve(venv: Path, url: str, model_dir: str, out: Path, name: str, num_prompts: int, concurrency: int,
                input_len: int, output_len: int, seed: int) -> dict:
    """One ``vllm bench serve`` run; its saved result JSON."""
    cmd = [
        str(venv / "bin" / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", url,
        "--endpoint", "/v1/completions", "--model", model_name(url), "--tokenizer", model_dir,
        "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
        "--seed", str(seed), "--save-result", "--result-dir", str(out), "--result-filename", f"{name}.json",
    ]  # fmt: skip
    with open(out / f"{name}.client.log", "wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=900).returncode
    if rc != 0:
        raise RuntimeError(f"vllm bench serve against {name} exited {rc}: see {out / f'{name}.client.log'}")
    return json.loads((out / f"{name}.json").read_text())


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """name -> CPU seconds (user + system) used so far by that process and its descendants
    (`pdbus serve` in the mixed role runs its router as a child; vLLM its engine core)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, pid in pids.items():
        total, todo = 0, [pid]
        while todo:
            p = todo.pop()
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
            except (OSError, IndexError, ValueError):
                continue
            todo += _children(p)
        out[name.rsplit("-", 1)[0]] = total / tick
    return out


def py_spy(pids: dict[str, int], out: Path, seconds: int) -> list[subprocess.Popen]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return [
        subprocess.Popen([spy, "record", "-d", str(seconds), "-r", "50", "-p", str(pid), "-f", "raw", "-o", str(out / f"py-spy-{name}.txt")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, pid in pids.items()
    ]  # fmt: skip


def summarize_py_spy(path: Path, top: int = 12) -> list[tuple[str, float]]:
    """Share of samples by leaf-most project frame (a 'raw' collapsed-stack file)."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        mine = [f for f in frames if any(p in f for p in ("/pdbus/", "/actors/", "/native/", "(pdbus/", "(actors/", "(native/"))]
        key = (mine[-1] if mine else frames[-1]).split(" (")[0]
        counts[key] = counts.get(key, 0) + int(n)
        total += int(n)
    return [(k, v / total) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:top]] if total else []


def run_system(system: str, args, venv: Path, model_dir: str, out: Path, tag: str, profile: bool) -> dict:
    """Start ``system`` alone, warm it up, load it once (and once more under py-spy), stop it."""
    systems = Systems(out / f"procs-{system}")
    try:
        t0 = time.monotonic()
        if system == "vllm":
            url = systems.vllm_server(model_dir, venv, skip_tokenizer_init=False)
        elif system == "mixed":
            url = systems.pdbus_mixed(model_dir, args.threads, skip_tokenizer_init=False)
        elif system == "pd":
            url = systems.pdbus_pd(model_dir, "ipc", args.threads, skip_tokenizer_init=False)
        else:
            raise SystemExit(f"unknown system {system!r} (vllm, mixed, pd)")
        print(f"[{system}{tag}] up in {time.monotonic() - t0:.0f}s at {url}", flush=True)
        common = dict(model_dir=model_dir, out=out, concurrency=args.concurrency, input_len=args.input_len,
                      output_len=args.output_len)  # fmt: skip
        bench_serve(venv, url, name=f"{system}{tag}-warmup", num_prompts=args.concurrency, seed=1, **common)
        cpu0 = cpu_seconds(systems.pids())
        r = bench_serve(venv, url, name=f"{system}{tag}", num_prompts=args.num_prompts, seed=0, **common)
        cpu1 = cpu_seconds(systems.pids())
        tokens = max(1, r.get("total_output_tokens") or 1)
        r["cpu_ms_per_token"] = {k: (cpu1[k] - cpu0.get(k, 0.0)) * 1e3 / tokens for k in cpu1}
        print(f"[{system}{tag}] {r['output_throughput']:.0f} output tok/s, TTFT p50 {r['median_ttft_ms']:.1f} ms, "
              f"ITL p50 {r['median_itl_ms']:.1f} ms", flush=True)  # fmt: skip
        if profile and system != "vllm":
            spies = py_spy(systems.pids(), out, 25)
            bench_serve(venv, url, name=f"{system}-profiled", num_prompts=args.num_prompts, seed=2, **common)
            for spy in spies:
                spy.wait(60)
        return r
    finally:
        systems.close()


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(rounds: list[dict[str, dict]]) -> dict:
    """One table of medians over the rounds (min-max beside), and the issue's ratios, both of the
    medians and round by round (the systems of one round ran back to back)."""
    systems = list(rounds[0])
    print(
        "\n| system | output tok/s, median (min-max) | TTFT p50 (ms) | ITL p50 (ms) | completed | server CPU ms / output token |"
    )
    print("|---|---|---|---|---|---|")
    medians: dict[str, dict] = {}
    for system in systems:
        runs = [r[system] for r in rounds if system in r]
        tput = [r["output_throughput"] for r in runs]
        cpu_names = list(runs[-1].get("cpu_ms_per_token", {}))
        cpu = {
            k: _median([r["cpu_ms_per_token"][k] for r in runs if k in r.get("cpu_ms_per_token", {})])
            for k in cpu_names
        }
        m = medians[system] = {
            "output_throughput": _median(tput),
            "median_ttft_ms": _median([r["median_ttft_ms"] for r in runs]),
            "median_itl_ms": _median([r["median_itl_ms"] for r in runs]),
            "cpu_ms_per_token": cpu,
        }
        per = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()) + f" (total {sum(cpu.values()):.2f})"
        spread = f" ({min(tput):,.0f}-{max(tput):,.0f})" if len(tput) > 1 else ""
        done = "/".join(str(r["completed"]) for r in runs)
        print(f"| {system} | {m['output_throughput']:,.0f}{spread} | {m['median_ttft_ms']:.1f} | {m['median_itl_ms']:.1f} "
              f"| {done} | {per} |")  # fmt: skip

    def ratios(a: str, b: str) -> str:
        each = [r[a]["output_throughput"] / r[b]["output_throughput"] for r in rounds if a in r and b in r]
        return ", ".join(f"{x:.2f}" for x in each)

    if "vllm" in medians and "mixed" in medians:
        v, m = medians["vllm"], medians["mixed"]
        print(f"\nmixed / vLLM output tok/s: {m['output_throughput'] / v['output_throughput']:.2f}x of the medians "
              f"(rounds: {ratios('mixed', 'vllm')}; target >= 1.2x); ITL p50 {m['median_itl_ms']:.1f} vs "
              f"{v['median_itl_ms']:.1f} ms (target: no worse)")  # fmt: skip
    if "pd" in medians and "mixed" in medians:
        print(f"PD / mixed output tok/s: {medians['pd']['output_throughput'] / medians['mixed']['output_throughput']:.2f}x "
              f"of the medians (rounds: {ratios('pd', 'mixed')}; target >= 0.9x)")  # fmt: skip
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="vllm,mixed,pd")
    ap.add_argument("--vllm-venv", default=str(DEFAULT_VLLM_VENV))
    ap.add_argument("--out-dir", default=str(HERE / "out" / "vllm-client"))
    ap.add_argument(
        "--model-dir",
        default=None,
        help="a -PT checkpoint with tokenizer (default: the built-in model exported)",
    )
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="PDBUS_TORCH_THREADS of each pdbus engine")
    ap.add_argument("--rounds", type=int, default=1,
                    help="start and load every system this many times, in turn; the table shows medians")  # fmt: skip
    ap.add_argument("--py-spy", action="store_true", help="profile each pdbus system in its last round")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    venv = Path(args.vllm_venv)
    model_dir = args.model_dir or export_default_model(HERE / "out" / "default-pt")
    rounds: list[dict[str, dict]] = []
    for i in range(args.rounds):
        tag = f"-r{i}" if args.rounds > 1 else ""
        last = i == args.rounds - 1
        rounds.append(
            {
                s: run_system(s, args, venv, model_dir, out, tag, args.py_spy and last)
                for s in args.systems.split(",")
            }
        )
    medians = report(rounds)
    if args.py_spy:
        for f in sorted(out.glob("py-spy-*.txt")):
            print(f"\n{f.name}: where the samples are (leaf-most project frame)")
            for frame, share in summarize_py_spy(f):
                print(f"  {share:6.1%}  {frame}")
    (out / "summary.json").write_text(json.dumps({"medians": medians, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
