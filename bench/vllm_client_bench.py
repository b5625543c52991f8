"""pdbus and vLLM-CPU loaded by the same external client, ``vllm bench serve`` (shared/PEERS.md).

    .venv/bin/python bench/vllm_client_bench.py [--systems vllm,mixed,pd] [--py-spy] [--out-dir DIR]

The built-in model is exported to the -PT layout in fp32 (vLLM reads only that layout) with its
tokenizer files beside it; each system is started alone on this machine — vLLM-CPU 0.32 from its
own venv (bench/README.md), pdbus mixed (``pdbus serve``), pdbus PD (router + prefill + decode,
KV over ipc) — warmed up, and loaded by ``vllm bench serve --backend openai --dataset-name
random`` (64 in / 64 out, 32 concurrent, 128 prompts, ``--ignore-eos``), which tokenizes with the
model's own tokenizer for every system alike. One table at the end: output tok/s, TTFT and ITL
p50, and the ratios the issue asks for. ``--py-spy`` records each pdbus process during an extra,
unmeasured run (flame graphs under ``--out-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="vllm,mixed,pd")
    ap.add_argument("--vllm-venv", default=str(DEFAULT_VLLM_VENV))
    ap.add_argument("--out-dir", default=str(HERE / "out" / "vllm-client"))
    ap.add_argument("--model-dir", default=None, help="a -PT checkpoint with tokenizer (default: the built-in model exported)")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="PDBUS_TORCH_THREADS of each pdbus engine")
    ap.add_argument("--py-spy", action="store_true")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    venv = Path(args.vllm_venv)
    model_dir = args.model_dir or export_default_model(HERE / "out" / "default-pt")
    results: dict[str, dict] = {}
    for system in args.systems.split(","):
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
            print(f"[{system}] up in {time.monotonic() - t0:.0f}s at {url}", flush=True)
            common = dict(model_dir=model_dir, out=out, concurrency=args.concurrency, input_len=args.input_len,
                          output_len=args.output_len)  # fmt: skip
            bench_serve(venv, url, name=f"{system}-warmup", num_prompts=args.concurrency, seed=1, **common)
            cpu0 = cpu_seconds(systems.pids())
            results[system] = bench_serve(venv, url, name=system, num_prompts=args.num_prompts, seed=0, **common)
            cpu1 = cpu_seconds(systems.pids())
            r = results[system]
            tokens = max(1, r.get("total_output_tokens") or 1)
            r["cpu_ms_per_token"] = {k: (cpu1[k] - cpu0.get(k, 0.0)) * 1e3 / tokens for k in cpu1}
            print(f"[{system}] {r['output_throughput']:.0f} output tok/s, TTFT p50 {r['median_ttft_ms']:.1f} ms, "
                  f"ITL p50 {r['median_itl_ms']:.1f} ms", flush=True)  # fmt: skip
            if args.py_spy and system != "vllm":
                spies = py_spy(systems.pids(), out, 25)
                bench_serve(venv, url, name=f"{system}-profiled", num_prompts=args.num_prompts, seed=2, **common)
                for s in spies:
                    s.wait(60)
        finally:
            systems.close()
    print("\n| system | output tok/s | TTFT p50 (ms) | ITL p50 (ms) | completed | server CPU ms / output token |")
    print("|---|---|---|---|---|---|")
    for system, r in results.items():
        cpu = r.get("cpu_ms_per_token", {})
        per = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()) + f" (total {sum(cpu.values()):.2f})"
        print(f"| {system} | {r['output_throughput']:,.0f} | {r['median_ttft_ms']:.1f} | {r['median_itl_ms']:.1f} | {r['completed']} | {per} |")
    if "vllm" in results and "mixed" in results:
        v, m = results["vllm"], results["mixed"]
        print(f"\nmixed / vLLM output tok/s: {m['output_throughput'] / v['output_throughput']:.2f}x (target >= 1.2x); "
              f"ITL p50 {m['median_itl_ms']:.1f} vs {v['median_itl_ms']:.1f} ms (target: no worse)")  # fmt: skip
    if "pd" in results and "mixed" in results:
        print(f"PD / mixed output tok/s: {results['pd']['output_throughput'] / results['mixed']['output_throughput']:.2f}x (target >= 0.9x)")
    if args.py_spy:
        for f in sorted(out.glob("py-spy-*.txt")):
            print(f"\n{f.name}: where the samples are (leaf-most project frame)")
            for frame, share in summarize_py_spy(f):
                print(f"  {share:6.1%}  {frame}")
    (out / "summary.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
