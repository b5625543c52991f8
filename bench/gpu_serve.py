"""The standing served benchmark on the GPU: pdbus mixed and PD-on-one-GPU, bf16 and wint4, at
ERNIE-4.5-21B-A3B shapes (random weights), against the model step alone, its byte floor and
transformers, in one table.

    python3 bench/gpu_serve.py --layers 8,28 --modes bf16,wint4 --systems mixed,pd \
        --concurrency 1,16,64 --shapes 1024x256,4096x256 --results bench/out/gpu_serve.json
    python3 bench/gpu_serve.py --table-only --results bench/out/gpu_serve.json
    .venv/bin/python bench/gpu_serve.py --tiny --device cpu --layers 2 --concurrency 1,4 \
        --shapes 64x16          # the CPU smoke run: a small MoE of the same structure

For each layer count: a checkpoint built with transformers on the device in bf16 under
``--ckpt-dir`` (reused when one of the same config is there: bench/gpu_serve_probe.py build).
For each mode: one probe process (bench/gpu_serve_probe.py probe) measures the HBM read
bandwidth, the model step alone through ModelRunner with the decode CUDA graphs at each
(batch = concurrency, context = input + output/2), the step's byte floor, and transformers
``generate`` at batch 1 and 16 (bf16). Then for each system the servers start
(``pdbus serve --skip-tokenizer-init``; PD: router + prefill + decode on GPU 0, KV over
``--cache-transfer-protocol ipc``, each instance its ``--gpu-memory-utilization`` share), and each
(shape, concurrency) gets a warm-up wave then ``--num-prompts`` closed-loop streamed requests
(bench/serve_bench.py): TTFT / TPOT / ITL p50 and p99, output tok/s.

Every figure is appended to ``--results`` (a JSON keyed by point) as soon as it is measured, and a
point already there is not measured again (``--force`` does), so the grid runs in several
invocations of a few minutes each: re-running the same command finishes what a ``--budget-s``
cut short. ``--table-only`` prints the table from the JSON. Server and probe logs go to
``--out-dir``; every process started is stopped on exit, Ctrl-C or SIGTERM included (and one
left by a run killed outright is stopped by the next run). On the GPU machine install the
wheels first, as bench/gpu_tests.sh does, and pass ``--commit`` (its tree has no git metadata).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import serve_bench as sb  # noqa: E402

from pdbus import envs  # noqa: E402
from pdbus.procs import Cluster  # noqa: E402

SYSTEMS = ("mixed", "pd")
MODES = ("bf16", "wint4")
ITL_TARGET, TPOT_TARGET = 1.15, 1.3  # issue 15: ITL p50 / step at c1, c16, c64; TPOT p50 / step at c64


def log(*a) -> None:
    print(f"[gpu_serve {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="8,28", help="layer counts, one checkpoint each")
    p.add_argument("--modes", default="bf16,wint4")
    p.add_argument("--systems", default="mixed,pd")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--shapes", default="1024x256,4096x256", help="INPUTxOUTPUT token lengths")
    p.add_argument("--num-prompts", type=int, default=None, help="per point (default max(2*concurrency, 8))")
    p.add_argument("--results", type=Path, default=ROOT / "bench/out/gpu_serve.json")
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench/out/gpu-serve"))
    p.add_argument("--ckpt-dir", type=Path, default=Path("/dev/shm/pdbus-gpu-serve"))
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--force", action="store_true", help="measure points already in --results again")
    p.add_argument("--budget-s", type=float, default=0, help="start no new work after this many seconds (0: no limit)")
    p.add_argument("--tiny", action="store_true", help="a small MoE of the same structure (CPU smoke run)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, help="serving dtype (default: auto on cuda, float32 on cpu)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--mixed-mem", type=float, default=0.9, help="mixed: --gpu-memory-utilization")
    p.add_argument("--prefill-mem", type=float, default=0.4, help="PD prefill: its share of the GPU")
    p.add_argument("--decode-mem", type=float, default=0.5, help="PD decode: its share of the GPU")
    p.add_argument("--kv-cache-gb", type=float, default=0.25, help="CPU only: --kv-cache-memory-gb")
    p.add_argument("--threads", type=int, default=None, help="PDBUS_TORCH_THREADS (default 4 on cuda, 1 on cpu)")
    p.add_argument("--hf-batches", default="1,16", help="transformers generate batches (bf16 probes)")
    p.add_argument("--hf-tokens", type=int, default=16, help="transformers generate: new tokens per run")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for servers to become healthy")
    p.add_argument("--serve-args", default="", help="extra `pdbus serve` flags for every instance (quoted)")
    p.add_argument("--commit", default=None, help="commit id for the table (default: git rev-parse)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("auto" if args.device == "cuda" else "float32")
    args.threads = args.threads or (4 if args.device == "cuda" else 1)
    args.max_num_seqs = max(args.max_num_seqs, *ints(args.concurrency))
    for what, allowed in (("systems", SYSTEMS), ("modes", MODES)):
        bad = set(words(getattr(args, what))) - set(allowed)
        if bad:
            p.error(f"--{what}: unknown {', '.join(sorted(bad))} (known: {', '.join(allowed)})")
    return args


def words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def ints(text: str) -> list[int]:
    return [int(w) for w in words(text)]


def shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in w.split("x")) for w in words(text)]  # type: ignore[misc]


def label(layers: int, tiny: bool) -> str:
    return f"L{layers}" + ("-tiny" if tiny else "")


# --------------------------------------------------------------------------- results


class Results:
    """The JSON of every figure measured so far: ``runs`` (device, date, commit, command) and per
    key ``points`` (served), ``steps`` (step alone + floor), ``hf`` (transformers)."""

    def __init__(self, path: Path, copy_dir: Path | None = None):
        self.path, self.copy_dir = path, copy_dir
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        for k in ("runs", "points", "steps", "hf"):
            self.data.setdefault(k, [] if k == "runs" else {})

    def begin_run(self, info: dict) -> None:
        self.data["runs"].append(info)
        self.run = len(self.data["runs"]) - 1
        self.save()

    def put(self, section: str, key: str, value: dict) -> None:
        self.data[section][key] = dict(value, run=self.run)
        self.save()

    def has(self, section: str, key: str) -> bool:
        return key in self.data[section]

    def save(self) -> None:
        text = json.dumps(sb.json_safe(self.data), indent=1)
        for path in (self.path, self.copy_dir / self.path.name if self.copy_dir else None):
            if path is None:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)


def run_info(args, argv: list[str]) -> dict:
    commit = args.commit or _output(["git", "rev-parse", "--short", "HEAD"]) or "?"
    device = "cpu"
    if args.device == "cuda":
        device = (_output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) or "cuda").splitlines()[0]
    cmd = f"{Path(sys.executable).name} bench/gpu_serve.py " + " ".join(shlex.quote(a) for a in argv)
    return {"device": device, "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit, "command": cmd}


def _output(cmd: list[str]) -> str:
    """A command's stdout, "" when it fails or is not installed (the GPU machine's copy of the
    tree has no git metadata: pass --commit there)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


# --------------------------------------------------------------------------- child processes


class Reaper:
    """The process groups this script starts, listed in a file beside the checkpoints: a run
    killed outright (SIGKILL, no ``finally``) leaves servers holding the GPU, and the next run
    stops those (a listed pid still running pdbus or the probe) before it starts anything."""

    MARKS = ("pdbus", "gpu_serve_probe")

    def __init__(self, path: Path):
        self.path = path

    def add(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(f"{pid}\n")

    def reap(self) -> None:
        pids = self.path.read_text().split() if self.path.is_file() else []
        for pid in map(int, pids):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue  # gone
            if any(mark in cmdline for mark in self.MARKS):
                log(f"stopping process group {pid} left by an earlier run: {cmdline.replace(chr(0), ' ')[:120]}")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        self.path.unlink(missing_ok=True)


def run_child(args, cmd: list[str], log_path: Path, timeout: float) -> None:
    """Run a helper process to completion (its own session, output to ``log_path``); killed with
    its group on timeout, error or interrupt."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(args), start_new_session=True, cwd=ROOT)
    args.reaper.add(proc.pid)
    try:
        rc = proc.wait(timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise
    if rc != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{Path(cmd[1]).name} {cmd[2]} exited with {rc} (log {log_path}):\n{tail}")


def child_env(args) -> dict:
    return envs.child_env(PYTHONUNBUFFERED="1", PDBUS_TORCH_THREADS=args.threads)


def ensure_checkpoint(args, layers: int) -> Path:
    out = args.ckpt_dir / (f"ernie-21b-a3b-shape-L{layers}" if not args.tiny else f"tiny-moe-L{layers}")
    cmd = [sys.executable, str(HERE / "gpu_serve_probe.py"), "build", "--out", str(out), "--layers", str(layers),
           "--device", args.device, *(["--tiny"] if args.tiny else [])]  # fmt: skip
    t0 = time.monotonic()
    run_child(args, cmd, args.out_dir / f"build-{label(layers, args.tiny)}.log", 1200)
    log(f"checkpoint {out} ready after {time.monotonic() - t0:.0f}s")
    return out


def probe(args, ckpt: Path, layers: int, mode: str, res: Results) -> None:
    """Step alone + floor at every (concurrency, context) and transformers at every (batch,
    input) of this grid not yet in the results, in one probe process."""
    tag = label(layers, args.tiny)
    steps = sorted({(c, i + o // 2) for i, o in shapes(args.shapes) for c in ints(args.concurrency)})
    steps = [(b, ctx) for b, ctx in steps if args.force or not res.has("steps", f"{tag}/{mode}/b{b}/ctx{ctx}")]
    hf = []
    if mode == "bf16" and not args.no_hf:
        hf = sorted({(b, i) for i, _ in shapes(args.shapes) for b in ints(args.hf_batches)})
        hf = [(b, n) for b, n in hf if args.force or not res.has("hf", f"{tag}/b{b}/in{n}")]
    if not steps and not hf:
        return
    out = args.out_dir / f"probe-{tag}-{mode}.json"
    cmd = [
        sys.executable, str(HERE / "gpu_serve_probe.py"), "probe", "--model", str(ckpt), "--mode", mode,
        "--dtype", args.dtype, "--device", args.device, "--block-size", str(args.block_size),
        "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
        "--steps", ",".join(f"{b}x{c}" for b, c in steps), "--hf", ",".join(f"{b}x{n}" for b, n in hf),
        "--hf-tokens", str(args.hf_tokens), "--json", str(out), *(["--hbm"] if args.device == "cuda" else []),
    ]  # fmt: skip
    t0 = time.monotonic()
    run_child(args, cmd, args.out_dir / f"probe-{tag}-{mode}.log", 1200)
    got = json.loads(out.read_text())
    for key, value in got.get("steps", {}).items():
        b, ctx = key.split("x")
        res.put("steps", f"{tag}/{mode}/b{b}/ctx{ctx}", dict(value, hbm_gbps=got.get("hbm_gbps")))
    for key, value in got.get("hf", {}).items():
        b, n = key.split("x")
        res.put("hf", f"{tag}/b{b}/in{n}", value)
    log(f"probe {tag} {mode}: {len(steps)} steps, {len(hf)} transformers points in {time.monotonic() - t0:.0f}s")


# --------------------------------------------------------------------------- servers


def serve_flags(args, mode: str, mem: float) -> list[str]:
    flags = ["--skip-tokenizer-init", "--quantization", mode, "--dtype", args.dtype, "--device", args.device,
             "--block-size", str(args.block_size), "--max-model-len", str(args.max_model_len),
             "--max-num-seqs", str(args.max_num_seqs)]  # fmt: skip
    if args.device == "cuda":
        flags += ["--gpu-memory-utilization", str(mem)]
    else:
        flags += ["--kv-cache-memory-gb", str(args.kv_cache_gb)]
    return flags + shlex.split(args.serve_args)


def start_system(cluster: Cluster, args, ckpt: Path, mode: str, system: str) -> str:
    """Start ``system`` on ``ckpt``; its API URL once healthy (PD: both instances registered)."""
    env = {"PDBUS_TORCH_THREADS": str(args.threads)}
    if system == "mixed":
        server = cluster.serve(str(ckpt), "mixed", None, *serve_flags(args, mode, args.mixed_mem), env=env)
        args.reaper.add(server.popen.pid)
        cluster.wait_health(server.url, timeout=args.start_timeout)
        return server.url
    router = cluster.router(env=env)
    ipc = ("--cache-transfer-protocol", "ipc")
    prefill = cluster.serve(str(ckpt), "prefill", router, *serve_flags(args, mode, args.prefill_mem), *ipc, env=env)
    decode = cluster.serve(str(ckpt), "decode", router, *serve_flags(args, mode, args.decode_mem), *ipc, env=env)
    for proc in (router, prefill, decode):
        args.reaper.add(proc.popen.pid)
    cluster.wait_health(router.url, timeout=args.start_timeout)  # 200 only with a prefill + decode pair
    return router.url


def captured_graphs(cluster: Cluster) -> bool:
    logs = [p.log.read_text(errors="replace") for p in cluster.procs if p.name in ("mixed", "decode")]
    return any("captured decode CUDA graphs" in text for text in logs)


def measure_point(url: str, args, vocab: int, shape: tuple[int, int], conc: int) -> dict:
    """A warm-up wave of ``conc`` short requests, then the measured closed loop."""
    inp, out = shape
    n = args.num_prompts or max(2 * conc, 8)
    warm = sb.Load(conc, inp, min(out, 16), 0.0, vocab, seed=1)
    sb.measure(url, None, warm, float("inf"), conc, 1, round_offset=10_000, timeout=600)
    load = sb.Load(n, inp, out, 0.0, vocab, seed=0)
    s = sb.measure(url, None, load, float("inf"), conc, 1, timeout=600)["summary"]
    if not s["completed"]:  # not recorded: the next invocation measures it again
        raise RuntimeError(f"no request of {n} completed: {'; '.join(s['errors'])[:300]}")
    keep = ("completed", "failed", "short", "duration_s", "output_throughput", "request_throughput", "errors")
    point = {k: s[k] for k in keep}
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        point[metric] = {q: s[metric][q] for q in ("mean", "p50", "p99")}
    point["num_prompts"] = n
    return point


def run_system(args, ckpt: Path, layers: int, mode: str, system: str, res: Results, deadline: float) -> None:
    tag = label(layers, args.tiny)
    todo = [(shape, c) for shape in shapes(args.shapes) for c in ints(args.concurrency)]
    todo = [(s, c) for s, c in todo if args.force or not res.has("points", point_key(tag, system, mode, s, c))]
    if not todo:
        return
    if time.monotonic() > deadline:
        log(f"budget spent: {tag} {system} {mode} not started ({len(todo)} points left for the next run)")
        return
    vocab = sb.vocab_from_model_dir(str(ckpt))
    with Cluster(args.out_dir / f"{tag}-{system}-{mode}") as cluster:
        t0 = time.monotonic()
        url = start_system(cluster, args, ckpt, mode, system)
        graphs = captured_graphs(cluster)
        log(f"{tag} {system} {mode} up at {url} after {time.monotonic() - t0:.0f}s (decode graphs: {graphs})")
        for shape, conc in todo:
            if time.monotonic() > deadline:
                log(f"budget spent: {tag} {system} {mode} {shape} c{conc} left for the next run")
                continue
            t1 = time.monotonic()
            point = measure_point(url, args, vocab, shape, conc)
            res.put("points", point_key(tag, system, mode, shape, conc), dict(point, decode_graphs=graphs))
            log(f"{tag} {system} {mode} {shape[0]}x{shape[1]} c{conc}: TPOT p50 {point['tpot_ms']['p50']:.2f} ms, "
                f"{point['output_throughput']:.0f} tok/s, {point['failed']} failed ({time.monotonic() - t1:.0f}s)")  # fmt: skip


def point_key(tag: str, system: str, mode: str, shape: tuple[int, int], conc: int) -> str:
    return f"{tag}/{system}/{mode}/{shape[0]}x{shape[1]}/c{conc}"


# --------------------------------------------------------------------------- the table

HEADER = ("layers", "system", "mode", "shape", "c", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50",
          "ITL p99", "out tok/s", "step ms", "floor ms", "ITL/step", "TPOT/step", "HF tok/s")  # fmt: skip


def _num(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None or x != x else fmt.format(x)  # None / NaN: not measured


def _ratio(x: float | None, step: float | None, target: float | None) -> str:
    if x is None or not step:
        return "-"
    r = x / step
    return f"{r:.2f}" + ("*" if target is not None and r > target else "")


def _order(key: str) -> tuple:
    tag, system, mode, shape, conc = key.split("/")
    inp, out = shape.split("x")
    layers = int(tag[1:].split("-")[0])
    rank = {name: i for i, name in enumerate((*SYSTEMS, *MODES))}
    return layers, tag, rank.get(system, 9), rank.get(mode, 9), int(inp), int(out), int(conc[1:])


def table_row(data: dict, key: str) -> str:
    p = data["points"][key]
    tag, system, mode, shape, conc = key.split("/")
    c = int(conc[1:])
    inp, out = (int(x) for x in shape.split("x"))
    step = data["steps"].get(f"{tag}/{mode}/b{c}/ctx{inp + out // 2}", {})
    hf = data["hf"].get(f"{tag}/b{c}/in{inp}", {})
    ttft, tpot, itl = p["ttft_ms"], p["tpot_ms"], p["itl_ms"]
    tok_s = _num(p["output_throughput"], "{:.0f}") + (f" ({p['failed']} failed)" if p["failed"] else "")
    layers = tag[1:].replace("-tiny", " (tiny)")
    cells = [
        layers, system, mode, shape, str(c), _num(ttft["p50"], "{:.1f}"), _num(ttft["p99"], "{:.1f}"),
        _num(tpot["p50"]), _num(tpot["p99"]), _num(itl["p50"]), _num(itl["p99"]), tok_s,
        _num(step.get("step_ms")), _num(step.get("floor_ms")), _ratio(itl["p50"], step.get("step_ms"), ITL_TARGET),
        _ratio(tpot["p50"], step.get("step_ms"), TPOT_TARGET if c >= 64 else None), _num(hf.get("tok_s"), "{:.0f}"),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def format_table(data: dict) -> str:
    keys = sorted(data.get("points", {}), key=_order)
    used = {e["run"] for section in ("points", "steps", "hf") for e in data.get(section, {}).values()}
    hbm: dict[int, float] = {s["run"]: s["hbm_gbps"] for s in data.get("steps", {}).values() if s.get("hbm_gbps")}
    lines = ["pdbus served on ERNIE-4.5-21B-A3B shapes (random weights); times in ms", ""]
    for i, run in enumerate(data.get("runs", [])):
        if i in used or run.get("errors"):
            bw = f", HBM read {hbm[i]:.0f} GB/s" if i in hbm else ""
            lines.append(f"- run {i}: {run['device']}, {run['date']}, commit {run['commit']}{bw}: `{run['command']}`")
            lines += [f"  - failed: {e}" for e in run.get("errors", [])]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += [table_row(data, k) for k in keys]
    lines += [
        "",
        "step ms: ModelRunner.execute alone (decode CUDA graphs on a GPU) at batch c, context input + output/2, "
        "greedy ids to the host; floor ms: weight bytes read at that batch (routed experts: expected distinct "
        "share) + KV bytes, over the HBM read bandwidth; HF: transformers generate at batch c, bf16 "
        "(--tiny: the serving dtype), beside every mode.",
        f"* misses the target: ITL p50 <= {ITL_TARGET} x step (every c), TPOT p50 <= {TPOT_TARGET} x step (c >= 64).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def attempt(res: Results, what: str, fn, *a):
    """``fn(*a)``; a failure is logged and recorded in the run (the table lists it), never the
    end of the run: the next part still runs, and the next invocation tries this one again."""
    try:
        return fn(*a)
    except Exception as exc:  # noqa: BLE001 - reported, and retried by the next invocation
        first = f"{type(exc).__name__}: {exc}"
        log(f"{what} FAILED: {first}")
        res.data["runs"][res.run].setdefault("errors", []).append(f"{what}: {first.splitlines()[0][:300]}")
        res.save()
        return None


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through every `finally`: servers and probes stopped


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    res = Results(args.results, None if args.table_only else args.out_dir)
    if args.table_only:
        print(format_table(res.data))
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started with SIGINT ignored
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.reaper = Reaper(args.ckpt_dir / "gpu_serve.pids")
    args.reaper.reap()
    res.begin_run(run_info(args, argv))
    deadline = time.monotonic() + args.budget_s if args.budget_s else float("inf")
    try:
        run_grid(args, res, deadline)
    finally:
        args.reaper.path.unlink(missing_ok=True)  # every child has been stopped by now
    print(format_table(res.data), flush=True)
    left = missing_points(args, res)
    if left:
        print(f"\n{len(left)} points of this grid not measured yet (first: {left[0]}): run the same command again")
    return 0


def run_grid(args, res: Results, deadline: float) -> None:
    for layers in ints(args.layers):
        if time.monotonic() > deadline:
            log(f"budget spent: {layers} layers left for the next run")
            continue
        if not args.force and not missing_points(args, res, [layers]):
            continue  # measured already (the probes come with the points)
        ckpt = attempt(res, f"build {label(layers, args.tiny)}", ensure_checkpoint, args, layers)
        if ckpt is None:
            continue
        for mode in words(args.modes):
            if time.monotonic() <= deadline:
                attempt(res, f"probe {label(layers, args.tiny)} {mode}", probe, args, ckpt, layers, mode, res)
            for system in words(args.systems):
                what = f"{label(layers, args.tiny)} {system} {mode}"
                attempt(res, what, run_system, args, ckpt, layers, mode, system, res, deadline)


def missing_points(args, res: Results, layer_counts: list[int] | None = None) -> list[str]:
    return [
        key
        for layers in layer_counts or ints(args.layers)
        for mode in words(args.modes)
        for system in words(args.systems)
        for shape in shapes(args.shapes)
        for c in ints(args.concurrency)
        if not res.has("points", key := point_key(label(layers, args.tiny), system, mode, shape, c))
    ]


if __name__ == "__main__":
    sys.exit(main())
