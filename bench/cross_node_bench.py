"""Cross-node benchmark on one machine: two network namespaces joined by a veth pair.

    python bench/cross_node_bench.py [--reps 5] [--only transfer,ttft] [--model DIR] [--json FILE]

transfer  GB/s of one request's KV (ERNIE-4.5-21B-A3B-like: 28 layers, 4 KV heads, head_dim 128,
          bf16, a 2K-token prompt = 32 blocks of 64, scattered destination blocks: 117.4 MB) from
          a sender in namespace A to a receiver in namespace B, for
            socket    sendall / recv_into of the same bytes (the ceiling, measured in this run)
            tcp       the project's tcp backend
            rdma-tcp  the Mooncake adapter over Mooncake's own TCP transport
          and the same three with both ends inside A (loopback), for comparison.
ttft      time to the first token of a 2048-token prompt (streamed, token ids) through the router:
          on one host (loopback; ipc, and tcp) and across the two hosts (tcp, rdma-tcp); all four
          clusters run at once and are measured round-robin, one prompt each in turn.
          Model: --model, else a generated random ERNIE-4.5-MoE whose KV per token matches the
          transfer shape's heads (8 layers, 4 KV heads, head_dim 128, bf16: 16 KiB per token).

Needs root (``ip netns add``). Each side runs in its own process (``ip netns exec``); control
goes over pipes, data only over the veth (or A's loopback). Times are medians over --reps after
one warm-up, with the best run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS, KV_HEADS, BLOCK, HEAD_DIM, BLOCKS = 28, 4, 64, 128, 32
NBYTES = 2 * LAYERS * BLOCKS * KV_HEADS * BLOCK * HEAD_DIM * 2
PROMPT_LEN = 2048


# --------------------------------------------------------------------------- the two ends (subprocesses)


def _cache(num_blocks: int):
    import torch

    from native.kv_cache import KVCache

    return KVCache(LAYERS, num_blocks, KV_HEADS, BLOCK, HEAD_DIM, torch.bfloat16, "cpu", False)


def _dst_blocks() -> list[int]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randperm(2 * BLOCKS, generator=gen)[:BLOCKS].tolist()


def role_recv(protocol: str, host: str) -> None:
    """Print what the sender needs (one JSON line), serve until stdin closes or says stop."""
    if protocol == "socket":
        from transfer_bench import socket_sink  # bench/ is this script's folder

        with socket.create_server((host, 0)) as lsock:
            print(json.dumps({"host": host, "port": lsock.getsockname()[1]}), flush=True)
            socket_sink(lsock, NBYTES)
        return
    from native.transfer.base import create_transfer_engine

    cache = _cache(2 * BLOCKS)
    kwargs = {"use_tcp": True} if protocol == "rdma" else {}
    rx = create_transfer_engine(protocol, cache, host, **kwargs)
    import msgspec

    print(msgspec.json.encode(rx.endpoint()).decode(), flush=True)  # a typed endpoint, as on the bus
    sys.stdin.readline()
    rx.close()
    cache.close()


def role_send(protocol: str, endpoint: dict, reps: int) -> None:
    """Time ``reps`` transfers after one warm-up; print the seconds as one JSON line."""
    times: list[float] = []
    if protocol == "socket":
        import torch

        data = torch.empty(NBYTES, dtype=torch.uint8).random_(0, 255).numpy()
        with socket.create_connection((endpoint["host"], endpoint["port"]), timeout=120) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(reps + 1):
                t0 = time.perf_counter()
                sock.sendall(data)
                assert sock.recv(1) == b"k"
                if i:
                    times.append(time.perf_counter() - t0)
        print(json.dumps(times), flush=True)
        return
    import msgspec
    import torch

    from native.transfer.base import WriteOp, create_transfer_engine
    from pdbus.messages import Endpoint

    ep = msgspec.convert(endpoint, Endpoint)
    cache = _cache(BLOCKS)
    cache.buffer.copy_(torch.randn(cache.shape))
    kwargs = {"use_tcp": True} if protocol == "rdma" else {}
    tx = create_transfer_engine(protocol, cache, ep.host, **kwargs)
    tx.open_peer("decode", ep)
    src, dst = list(range(BLOCKS)), _dst_blocks()
    for i in range(reps + 1):
        t0 = time.perf_counter()
        for layer in range(LAYERS):
            tx.write(f"r{i}", "decode", WriteOp(layer, src, dst))
        tx.commit(f"r{i}", "decode").wait(300)
        if i:
            times.append(time.perf_counter() - t0)
    tx.close()
    cache.close()
    print(json.dumps(times), flush=True)


# --------------------------------------------------------------------------- orchestration


def _me(pair, ns: str, *args: str) -> list[str]:
    return pair.cmd(ns, [sys.executable, str(Path(__file__).resolve()), *args])


def measure_transfer(pair, protocol: str, recv_ns: str, send_ns: str, reps: int) -> list[float]:
    mooncake = "rdma" if protocol == "rdma-tcp" else protocol
    host = pair.ip(recv_ns)
    env = dict(os.environ, PDBUS_MOONCAKE_TCP="1") if protocol == "rdma-tcp" else None
    rx = subprocess.Popen(_me(pair, recv_ns, "--role", "recv", "--protocol", mooncake, "--host", host), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = rx.stdout.readline()
        if not line:
            raise RuntimeError(f"{protocol} receiver in {recv_ns} did not start")
        tx = subprocess.run(_me(pair, send_ns, "--role", "send", "--protocol", mooncake, "--endpoint", line.strip(), "--reps", str(reps)),
                            capture_output=True, text=True, timeout=600, env=env)
        if tx.returncode != 0:
            raise RuntimeError(f"{protocol} sender failed: {tx.stderr[-2000:]}")
        return json.loads(tx.stdout.strip().splitlines()[-1])
    finally:
        try:
            rx.stdin.write("stop\n")
            rx.stdin.close()
        except OSError:
            pass
        try:
            rx.wait(30)
        except subprocess.TimeoutExpired:
            rx.kill()
            rx.wait(10)


def bench_transfer(pair, reps: int, have_mooncake: bool) -> list[dict]:
    rows = []
    protocols = ["socket", "tcp"] + (["rdma-tcp"] if have_mooncake else [])
    for where, recv_ns in (("veth A->B", pair.b), ("loopback in A", pair.a)):
        for proto in protocols:
            times = measure_transfer(pair, proto, recv_ns, pair.a, reps)
            med = statistics.median(times)
            rows.append({"path": where, "protocol": proto, "median_s": med, "gbps": NBYTES / med / 1e9, "best_gbps": NBYTES / min(times) / 1e9})
            print(f"  transfer {where:14s} {proto:9s} {NBYTES / med / 1e9:6.2f} GB/s (best {NBYTES / min(times) / 1e9:.2f})", flush=True)
    return rows


# --------------------------------------------------------------------------- TTFT


def kv_heavy_model(out: str) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest_model
    import torch

    kv_heavy = (
        "ernie4_5_moe",
        dict(
            conftest_model._BASE,
            hidden_size=256,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            num_hidden_layers=8,
            max_position_embeddings=4096,
            moe_num_experts=4,
            moe_k=2,
            moe_intermediate_size=64,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            moe_layer_interval=1,
            tie_word_embeddings=True,
        ),
    )
    model = conftest_model.build_hf("bench-kv", configs={"bench-kv": kv_heavy})
    conftest_model.save_hf(model, out, dtype=torch.bfloat16)
    return out


def first_token_s(url: str, prompt: list[int]) -> float:
    import urllib.request

    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "return_token_ids": True, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                if any(c.get("completion_token_ids") for c in chunk["choices"]):
                    ttft = time.perf_counter() - t0
                    for _ in resp:  # drain the rest of the stream
                        pass
                    return ttft
    raise RuntimeError("no token came back")


SERVE = ["--skip-tokenizer-init", "--max-model-len", str(PROMPT_LEN + 256), "--block-size", str(BLOCK), "--kv-cache-memory-gb", "0.4", "--max-num-batched-tokens", str(PROMPT_LEN)]


def _prompts(reps: int) -> list[list[int]]:
    return [[(7 * j + 13 * i) % 90 + 3 for j in range(PROMPT_LEN)] for i in range(reps + 1)]


def one_host(stack, model: str, protocol: str, workdir: Path):
    """Router, prefill and decode on loopback; returns a function timing one prompt."""
    from pdbus.procs import Cluster, http_json

    c = stack.enter_context(Cluster(workdir / f"one-{protocol}"))
    router = c.router()
    args = [*SERVE, "--cache-transfer-protocol", protocol]
    c.serve(model, "prefill", router, *args)
    c.serve(model, "decode", router, *args)
    c.wait_health(router.url, timeout=300)
    _wait_instances(lambda: http_json(router.url + "/instances")[1])
    return lambda prompt: first_token_s(router.url, prompt)


def two_hosts(stack, pair, model: str, protocol: str, workdir: Path, port_base: int):
    """Router and prefill in A, decode in B; returns a function timing one prompt from inside A."""
    from pdbus.netns import TwoHosts
    from pdbus.procs import http_json

    mooncake = protocol == "rdma-tcp"
    args = [*SERVE, "--cache-transfer-protocol", "rdma" if mooncake else protocol]
    env = {"PDBUS_MOONCAKE_TCP": "1"} if mooncake else None
    hosts = stack.enter_context(TwoHosts(pair, workdir / f"two-{protocol}"))
    router = hosts.router(port=port_base, bus_port=port_base + 1)
    hosts.serve(pair.a, model, "prefill", router, *args, port=port_base + 2, env=env)
    hosts.serve(pair.b, model, "decode", router, *args, port=port_base + 3, env=env)
    hosts.wait_health(router, timeout=300)
    _wait_instances(lambda: hosts.call(pair.a, http_json, router.url + "/instances")[1])
    return lambda prompt: hosts.call(pair.a, first_token_s, router.url, prompt)


def _wait_instances(get, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        roles = [i["role"] for i in get()["instances"] if i["alive"]]
        if roles.count("prefill") == 1 and roles.count("decode") == 1:
            return
        time.sleep(0.1)
    raise TimeoutError("instances did not register")


def bench_ttft(pair, model: str, reps: int, have_mooncake: bool, workdir: Path) -> list[dict]:
    """Every placement up at once, measured round-robin (one prompt each in turn), so that
    other load on the machine weighs on all of them alike."""
    import contextlib

    cases = [("one host", "ipc"), ("one host", "tcp"), ("two hosts (veth)", "tcp")]
    if have_mooncake:
        cases.append(("two hosts (veth)", "rdma-tcp"))
    rows = []
    with contextlib.ExitStack() as stack:
        timers = []
        for i, (where, proto) in enumerate(cases):
            if where == "one host":
                timers.append(one_host(stack, model, proto, workdir))
            else:
                timers.append(two_hosts(stack, pair, model, proto, workdir, 9000 + 10 * i))
        times: list[list[float]] = [[] for _ in cases]
        for rep, prompt in enumerate(_prompts(reps)):
            for k, timer in enumerate(timers):
                t = timer(prompt)
                if rep:  # the first round warms up
                    times[k].append(t)
    for (where, proto), ts in zip(cases, times):
        rows.append({"placement": where, "protocol": proto, "median_s": statistics.median(ts), "best_s": min(ts)})
        print(f"  ttft {where:17s} {proto:9s} {statistics.median(ts) * 1e3:8.1f} ms (best {min(ts) * 1e3:.1f})", flush=True)
    return rows


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", default="transfer,ttft")
    p.add_argument("--model", default=None, help="model for the TTFT part (default: a generated KV-heavy tiny MoE)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--role", choices=["recv", "send"], help=argparse.SUPPRESS)
    p.add_argument("--protocol", help=argparse.SUPPRESS)
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "recv":
        role_recv(args.protocol, args.host)
        return 0
    if args.role == "send":
        role_send(args.protocol, json.loads(args.endpoint), args.reps)
        return 0

    import importlib.util

    from pdbus.netns import NetnsPair, unsupported

    reason = unsupported()
    if reason:
        print(f"[cross-node bench] skipped: {reason}")
        return 0
    have_mooncake = importlib.util.find_spec("mooncake") is not None
    only = set(args.only.split(","))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "kv_bytes": NBYTES,
    }
    print(f"[cross-node bench] {result['machine']}; KV per request {NBYTES / 1e6:.1f} MB; reps {args.reps}", flush=True)
    with NetnsPair() as pair, tempfile.TemporaryDirectory(prefix="pdbus-xbench-") as tmp:
        if "transfer" in only:
            result["transfer"] = bench_transfer(pair, args.reps, have_mooncake)
        if "ttft" in only:
            model = args.model or kv_heavy_model(os.path.join(tmp, "bench-kv"))
            result["ttft_model"] = "generated KV-heavy tiny MoE (8 layers, 4 KV heads x 128, bf16)" if not args.model else args.model
            result["ttft"] = bench_ttft(pair, model, args.reps, have_mooncake, Path(tmp))
    print()
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def render(result: dict) -> str:
    out = [f"machine: {result['machine']}; date {result['date']}; commit {result['commit']}"]
    if result.get("transfer"):
        out += ["", f"KV transfer, one request ({result['kv_bytes'] / 1e6:.1f} MB), sender in A", "", "| path | protocol | GB/s (median) | GB/s (best) |", "|---|---|---|---|"]
        out += [f"| {r['path']} | {r['protocol']} | {r['gbps']:.2f} | {r['best_gbps']:.2f} |" for r in result["transfer"]]
    if result.get("ttft"):
        out += ["", f"TTFT, {PROMPT_LEN}-token prompt ({result['ttft_model']})", "", "| placement | protocol | TTFT ms (median) | best |", "|---|---|---|---|"]
        out += [f"| {r['placement']} | {r['protocol']} | {r['median_s'] * 1e3:.1f} | {r['best_s'] * 1e3:.1f} |" for r in result["ttft"]]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
