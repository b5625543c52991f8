"""``./run.sh cross-node demo``: the cross-node topology on one machine.

Two network namespaces joined by a veth pair stand for two hosts: host A (10.200.X.1) runs the
router and the prefill instance, host B (10.200.X.2) the decode instance, each process started
with ``ip netns exec`` and its own ``PDBUS_HOST_ID`` (so the router pairs them over a network
protocol, never ``ipc``). KV goes over ``tcp`` (default) or over the Mooncake adapter in its
TCP test mode (``--protocol rdma-tcp``). The bus requires a CurveZMQ key made for the demo
(``--no-bus-key`` to run without). Once healthy it prints the curl command to run inside A;
Ctrl-C stops every process and deletes both namespaces.

    ./run.sh cross-node demo [--model DIR] [--protocol tcp|rdma-tcp] [--api-key KEY]
                             [--port 8109] [--bus-port 8110] [extra pdbus serve flags...]

Needs root (``ip netns add``) and iproute2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

from pdbus import envs
from pdbus.config import ConfigError, default_model_dir, load_toml

PREFILL_PORT, DECODE_PORT = 8188, 8200


def _fail(msg: str, code: int = 2) -> int:
    print(f"pdbus: error: cross-node demo: {msg}", file=sys.stderr)
    return code


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="./run.sh cross-node demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", default=None, help="model directory (default: the built-in model, native/default_model)")
    p.add_argument("--protocol", choices=["tcp", "rdma-tcp"], default="tcp", help="KV transfer between the hosts (rdma-tcp: the Mooncake adapter over Mooncake's TCP)")
    p.add_argument("--config", type=Path, default=None, help="topology TOML for the [serve]/[prefill]/[decode] flags (default: by the GPUs found)")
    p.add_argument("--port", type=int, default=8109, help="router HTTP port (inside host A)")
    p.add_argument("--bus-port", type=int, default=8110, help="router bus port (inside host A)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--no-bus-key", action="store_true", help="run the bus without CurveZMQ keys")
    p.add_argument("--start-timeout", type=float, default=envs.PDBUS_START_TIMEOUT)
    return p.parse_known_args(argv)


def curl_command(ns: str, host: str, port: int, api_key: str | None, tokenizer: bool = True) -> str:
    auth = f" -H {shlex.quote('Authorization: Bearer ' + api_key)}" if api_key else ""
    if tokenizer:
        path, body = "chat/completions", '{"messages": [{"role": "user", "content": "你好，请介绍一下自己。"}], "max_tokens": 128, "temperature": 0}'
    else:
        path, body = "completions", '{"prompt": [5, 6, 7, 8], "max_tokens": 16, "temperature": 0, "return_token_ids": true}'
    return (
        f"ip netns exec {ns} curl -s http://{host}:{port}/v1/{path} -H 'Content-Type: application/json'{auth} "
        f"-d {shlex.quote(body)}"
    )


def main(argv: list[str] | None = None) -> int:
    from pdbus.launch import Launcher, default_topology, role_command
    from pdbus.netns import NetnsError, NetnsPair, unsupported

    ns_args, overrides = parse(list(sys.argv[1:] if argv is None else argv))
    model = ns_args.model or default_model_dir()
    if not os.path.isfile(os.path.join(model, "config.json")):
        where = "the built-in model is missing at " + model if ns_args.model is None else f"--model {model} has no config.json"
        return _fail(f"{where}; pass --model DIR (an ERNIE-4.5 checkpoint directory)")
    reason = unsupported()
    if reason:
        return _fail(reason)
    try:
        conf = load_toml(str(ns_args.config or default_topology()))
    except ConfigError as exc:
        return _fail(str(exc))

    pair = NetnsPair()
    launcher = Launcher()
    tmp = tempfile.TemporaryDirectory(prefix="pdbus-demo-")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, launcher.stop)
    try:
        try:
            pair.create()
        except NetnsError as exc:
            return _fail(str(exc))
        key_args: list[str] = []
        if not ns_args.no_bus_key:
            from pdbus.security import generate_key_file

            key = os.path.join(tmp.name, "bus.key")
            generate_key_file(key)
            key_args = ["--bus-key-file", key]
        proto_env = {"PDBUS_MOONCAKE_TCP": "1"} if ns_args.protocol == "rdma-tcp" else {}
        proto = "rdma" if ns_args.protocol == "rdma-tcp" else "tcp"
        router_addr = f"{pair.ip_a}:{ns_args.port}"
        router_cmd = [sys.executable, "-m", "pdbus", "router", "--host", pair.ip_a, "--port", str(ns_args.port), "--bus-port", str(ns_args.bus_port), *key_args]
        if ns_args.api_key:
            router_cmd += ["--api-key", ns_args.api_key]
        launcher.start("router@A", pair.cmd(pair.a, router_cmd), envs.child_env(PDBUS_HOST_ID=pair.a))
        for role, ns, port in (("prefill", pair.a, PREFILL_PORT), ("decode", pair.b, DECODE_PORT)):
            section = dict(conf.get(role) or {})
            section.setdefault("ports", [port])
            role_conf = dict(conf, **{role: section})
            extra = ["--model", model, "--cache-transfer-protocol", proto, *key_args, *overrides]
            try:
                cmd, env = role_command(role_conf, role, router_addr, pair.ip(ns), extra)
            except ConfigError as exc:
                return _fail(str(exc))
            env.update(proto_env, PDBUS_HOST_ID=ns)
            launcher.start(f"{role}@{'A' if ns == pair.a else 'B'}", pair.cmd(ns, cmd), env)
        url = f"http://{router_addr}"
        if not _wait_health(pair, launcher, url, ns_args.start_timeout):
            if not launcher.stopping:
                print("[demo] the cluster did not become healthy; stopping", file=sys.stderr)
            return 1
        tokenizer = "--skip-tokenizer-init" not in overrides
        print(
            f"\n[demo] host A = network namespace {pair.a} ({pair.ip_a}): router HTTP :{ns_args.port}, bus :{ns_args.bus_port}, prefill :{PREFILL_PORT}"
            f"\n[demo] host B = network namespace {pair.b} ({pair.ip_b}): decode :{DECODE_PORT}"
            f"\n[demo] KV cache from A to B over {ns_args.protocol}; bus keys {'off' if ns_args.no_bus_key else 'on'}; API key {'on' if ns_args.api_key else 'off'}"
            f"\n[demo] pdbus is serving the OpenAI API at {url}/v1 inside {pair.a}  (Ctrl-C stops everything)"
            f"\n  try: {curl_command(pair.a, pair.ip_a, ns_args.port, ns_args.api_key, tokenizer)}\n",
            flush=True,
        )
        return launcher.supervise()
    finally:
        launcher.stop()
        pair.close()
        tmp.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_health(pair, launcher, url: str, timeout: float) -> bool:
    """Poll the router's /health from a thread inside host A (the address lives only there)."""
    from pdbus.procs import http_json

    def probe() -> bool:
        try:
            return http_json(url + "/health", timeout=2)[0] == 200
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    with pair.executor(pair.a, workers=1) as pool:
        while time.monotonic() < deadline and not launcher.stopping:
            gone = launcher.dead()
            if gone:
                print(f"[demo] {gone[0]} exited with code {gone[1]}; stopping everything", file=sys.stderr)
                return False
            if pool.submit(probe).result():
                return True
            time.sleep(0.25)
    return False


if __name__ == "__main__":
    sys.exit(main())
