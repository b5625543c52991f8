"""Topology launcher behind ``./run.sh single-node | cross-node | bench``, and the one-command
mixed server (``serve_with_router``: ``pdbus serve`` without ``--router``).

A topology (conf/*.toml) has a ``[router]`` section, a ``[serve]`` section of flags shared by
every instance, and ``[prefill]`` / ``[decode]`` sections: ``gpus`` (CUDA_VISIBLE_DEVICES for that
role), ``ports`` (one per DP rank) and any ``pdbus serve`` flag. Each role with DP > 1 runs as
``pdbus multi-serve``. Child output is streamed with a ``[role]`` prefix; Ctrl-C (or any child
dying) stops every process this launcher started.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pdbus import envs
from pdbus.config import ConfigError, frontend_flags, load_toml
from pdbus.procs import http_json, wait_until

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def default_topology() -> Path:
    n = gpu_count()
    if n >= 8:
        return CONF / "single-node.toml"
    if n >= 1:
        return CONF / "single-gpu.toml"
    return CONF / "cpu.toml"


def _flags(section: dict) -> list[str]:
    out: list[str] = []
    for key, value in section.items():
        if key in ("gpus", "ports", "host"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                out.append(flag)
        elif isinstance(value, list):
            out += [flag, ",".join(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


def role_command(conf: dict, role: str, router: str, host: str, overrides: list[str]) -> tuple[list[str], dict]:
    common = dict(conf.get("serve") or {})
    sec = dict(conf.get(role) or {})
    ports = sec.get("ports") or [8188 if role == "prefill" else 8200]
    ports = [int(p) for p in (ports if isinstance(ports, list) else str(ports).split(","))]
    dp = int(sec.get("data_parallel_size", len(ports)))
    if dp != len(ports):
        raise ConfigError(f"[{role}] data_parallel_size {dp} but {len(ports)} ports")
    merged = {**common, **{k: v for k, v in sec.items() if k not in ("ports",)}}
    merged["splitwise_role"] = role
    merged["router"] = router
    merged.setdefault("host", host)
    serve_flags = ["--host", str(merged["host"]), *_flags(merged), *overrides]
    env = envs.child_env(**({"CUDA_VISIBLE_DEVICES": sec["gpus"]} if sec.get("gpus") is not None else {}))
    py = [sys.executable, "-m", "pdbus"]
    if dp > 1:
        ports_arg = ",".join(map(str, ports))
        return [*py, "multi-serve", "--ports", ports_arg, "--num-servers", str(dp), "--args", *serve_flags], env
    return [*py, "serve", "--port", str(ports[0]), *serve_flags], env


class Launcher:
    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.stopping = False

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True, text=True, bufsize=1
        )
        self.procs.append((name, proc))
        threading.Thread(target=self._pump, args=(name, proc), daemon=True).start()
        return proc

    @staticmethod
    def _pump(name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()

    def stop(self, *_args) -> None:
        if self.stopping:
            return
        self.stopping = True
        for _, proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def dead(self) -> tuple[str, int] | None:
        for name, proc in self.procs:
            rc = proc.poll()
            if rc is not None:
                return name, rc
        return None

    def wait_health(self, url: str, timeout: float) -> bool:
        def settled():  # healthy, or no point waiting longer
            return self.stopping or self.dead() is not None or http_json(url + "/health", timeout=2)[0] == 200

        try:
            wait_until(settled, timeout, f"{url}/health", interval=0.25)
        except TimeoutError:
            return False
        return not self.stopping and self.dead() is None

    def supervise(self) -> int:
        while not self.stopping:
            gone = self.dead()
            if gone:
                print(f"[launch] {gone[0]} exited with code {gone[1]}; stopping everything", file=sys.stderr)
                self.stop()
                return 1
            time.sleep(0.25)
        return 0


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the parent dies, however it dies (Linux)."""
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took hold
        os._exit(1)


def router_flags(cfg) -> list[str]:
    """``pdbus router`` flags for the router a ``pdbus serve`` (mixed, no --router) starts."""
    out = ["--host", cfg.host, "--port", str(cfg.port), "--max-body-mb", str(cfg.max_body_mb)]
    out += ["--heartbeat-interval", str(cfg.heartbeat_interval)]
    for flag, value in (("--api-key", cfg.api_key), ("--bus-key-file", cfg.bus_key_file), ("--seed", cfg.seed)):
        if value is not None:
            out += [flag, str(value)]
    return out + frontend_flags(cfg)


def serve_with_router(cfg, serve) -> int:
    """``pdbus serve`` in the mixed role without ``--router``: vLLM's API-server / engine-core split
    in one command. A router (a child process, its own session) serves the OpenAI API on
    ``--port``; this process runs ``serve(cfg)``, the rank server, on a free port and registers
    with the router as a ``mixed`` instance. SIGINT / SIGTERM here stop both; the router dying
    stops the rank (one line, exit code 1); the rank dying, however, stops the router (its
    parent-death signal)."""
    from pdbus.procs import free_port

    api_port = cfg.port
    cfg.port = free_port(cfg.host)
    cfg.router = f"{cfg.host}:{api_port}"
    cmd = [sys.executable, "-m", "pdbus", "router", *router_flags(dataclasses.replace(cfg, port=api_port))]
    router = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)
    print(
        f"[serve] router (pid {router.pid}) serves the OpenAI API on http://{cfg.host}:{api_port}; "
        f"this rank serves /health, /metrics, /stats on http://{cfg.host}:{cfg.port}",
        flush=True,
    )
    stopping = threading.Event()
    lost: list[int] = []

    def watch() -> None:
        rc = router.wait()
        if not stopping.is_set():
            lost.append(rc)
            print(f"pdbus serve: the router (pid {router.pid}) exited with code {rc}; stopping the rank", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="router-watch", daemon=True).start()
    try:
        code = serve(cfg)
    finally:
        stopping.set()
        if router.poll() is None:
            router.terminate()
            try:
                router.wait(15)
            except subprocess.TimeoutExpired:
                router.kill()
                router.wait(5)
    return 1 if lost else code


def _curl(host: str, port: int) -> str:
    return (
        f"curl -s http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' "
        """-d '{"messages": [{"role": "user", "content": "你好，请介绍一下自己。"}], "max_tokens": 128, "temperature": 0}'"""
    )


def run_topology(conf_path: Path, roles: list[str], router_host: str, router_port: int | None, start_router: bool, overrides: list[str], bind_host: str, router_extra: list[str] = ()) -> int:
    try:
        conf = load_toml(str(conf_path))
    except ConfigError as exc:
        print(f"pdbus: error: {exc}", file=sys.stderr)
        return 2
    rconf = conf.get("router") or {}
    port = router_port or int(rconf.get("port", 8109))
    launcher = Launcher()
    signal.signal(signal.SIGINT, launcher.stop)
    signal.signal(signal.SIGTERM, launcher.stop)
    print(f"[launch] topology {conf_path.relative_to(ROOT) if conf_path.is_relative_to(ROOT) else conf_path}", flush=True)
    try:
        if start_router:
            # [router] of the topology (bus_port, api_key, bus_key_file, ...) applies; flags win
            launcher.start("router", [sys.executable, "-m", "pdbus", "router", "--config", str(conf_path), "--host", router_host, "--port", str(port), *router_extra])
        for role in roles:
            cmd, env = role_command(conf, role, f"{router_host}:{port}", bind_host, overrides)
            launcher.start(role, cmd, env)
    except ConfigError as exc:
        launcher.stop()
        print(f"pdbus: error: {exc}", file=sys.stderr)
        return 2
    url = f"http://{router_host}:{port}"
    if start_router:
        if not launcher.wait_health(url, timeout=envs.PDBUS_START_TIMEOUT):
            if not launcher.stopping:
                print("[launch] the cluster did not become healthy; stopping", file=sys.stderr)
            launcher.stop()
            return 1
        print(f"\n[launch] pdbus is serving the OpenAI API at {url}/v1  (Ctrl-C stops everything)\n  try: {_curl(router_host, port)}\n", flush=True)
    return launcher.supervise()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m pdbus.launch {single-node,cross-node,bench} ...", file=sys.stderr)
        return 2
    what, rest = argv[0], argv[1:]
    if what == "single-node":
        p = argparse.ArgumentParser(prog="./run.sh single-node")
        p.add_argument("--config", type=Path, default=None, help="topology TOML (default: by the GPUs found)")
        p.add_argument("--port", type=int, default=None, help="router HTTP port (default 8109)")
        p.add_argument("--host", default="127.0.0.1")
        ns, overrides = p.parse_known_args(rest)
        return run_topology(ns.config or default_topology(), ["prefill", "decode"], ns.host, ns.port, True, overrides, ns.host)
    if what == "cross-node":
        p = argparse.ArgumentParser(prog="./run.sh cross-node")
        p.add_argument("side", choices=["prefill", "decode", "demo"])
        p.add_argument("--router-ip", default=None, help="address of the router host (prefill host)")
        p.add_argument("--host", default=None, help="address this host's instances bind (default: --router-ip on the prefill side)")
        p.add_argument("--config", type=Path, default=CONF / "cross-node.toml")
        p.add_argument("--port", type=int, default=None)
        p.add_argument("--bus-port", type=int, default=None, help="router bus port (default: [router] bus_port)")
        p.add_argument("--api-key", default=None, help="router: require 'Authorization: Bearer KEY' on /v1/*")
        p.add_argument("--bus-key-file", default=None, help="CurveZMQ cluster key (pdbus keygen FILE), for the router and every instance")
        ns, overrides = p.parse_known_args(rest)
        if ns.side == "demo":
            from pdbus.netns_demo import main as demo

            return demo(overrides)
        if not ns.router_ip:
            print("pdbus: error: cross-node needs --router-ip IP (the prefill host's address)", file=sys.stderr)
            return 2
        bind = ns.host or (ns.router_ip if ns.side == "prefill" else "0.0.0.0")
        if ns.side == "decode" and not ns.host:
            print("pdbus: error: cross-node decode needs --host IP (this host's address, reachable from the prefill host)", file=sys.stderr)
            return 2
        router_extra: list[str] = []
        if ns.bus_port:
            router_extra += ["--bus-port", str(ns.bus_port)]
        if ns.api_key:
            router_extra += ["--api-key", ns.api_key]
        if ns.bus_key_file:
            router_extra += ["--bus-key-file", ns.bus_key_file]
            overrides = ["--bus-key-file", ns.bus_key_file, *overrides]
        return run_topology(ns.config, [ns.side], ns.router_ip, ns.port, ns.side == "prefill", overrides, bind, router_extra)
    if what == "bench":
        return _bench(rest)
    print(f"pdbus: error: unknown launch target {what!r}", file=sys.stderr)
    return 2


BENCHES = {
    "bus": ["bench/bus_bench.py"],
    "cross-node": ["bench/cross_node_bench.py"],
    "transfer": ["bench/transfer_bench.py"],
    "serve": ["bench/serve_bench.py", "--suite", "cpu"],
    "gpu": ["bench/gpu_bench.py"],
}


def _bench(rest: list[str]) -> int:
    name = rest[0] if rest else "all"
    names = list(BENCHES) if name == "all" else [name]
    code = 0
    for n in names:
        if n not in BENCHES:
            print(f"pdbus: error: unknown benchmark {n!r} (known: {', '.join(BENCHES)})", file=sys.stderr)
            return 2
        if n == "gpu" and gpu_count() == 0:
            print("[bench] gpu: skipped (no GPU on this machine)")
            continue
        print(f"[bench] {n}", flush=True)
        code |= subprocess.call([sys.executable, *BENCHES[n], *rest[1:]], cwd=ROOT)
    return code


if __name__ == "__main__":
    sys.exit(main())
