"""``pdbus multi-serve``: one rank server per DP rank (FastDeploy: multi_api_server).

    pdbus multi-serve --ports 8188,8189 --num-servers 2 --args --model DIR \\
        --splitwise-role decode --router 127.0.0.1:8109 --data-parallel-size 2 ...

Rank ``i`` gets ``--port ports[i] --data-parallel-rank i`` and, on GPUs, its slice of
CUDA_VISIBLE_DEVICES (``tensor-parallel-size`` devices each). If one rank exits, the others are
stopped and the exit code is non-zero; SIGINT/SIGTERM stop them all.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

from pdbus import envs
from pdbus.config import ConfigError, parse_ports


def _arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _int_arg(args: list[str], flag: str) -> int | None:
    value = _arg_value(args, flag)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r} in --args is not an integer") from None


def plan(ports: list[int], num_servers: int, child_args: list[str], visible: str | None) -> list[tuple[list[str], dict]]:
    if num_servers < 1:
        raise ConfigError(f"--num-servers must be >= 1, got {num_servers}")
    if len(ports) != num_servers:
        raise ConfigError(f"--ports lists {len(ports)} ports but --num-servers is {num_servers}")
    dp = _int_arg(child_args, "--data-parallel-size")
    if dp is not None and dp != num_servers:
        raise ConfigError(f"--data-parallel-size {dp} in --args differs from --num-servers {num_servers}")
    if _arg_value(child_args, "--port") is not None:
        raise ConfigError("--port must not be in --args: multi-serve assigns --ports to the ranks")
    tp = _int_arg(child_args, "--tensor-parallel-size") or 1
    devices = [d for d in (visible or "").split(",") if d.strip()]
    if devices and len(devices) < num_servers * tp:
        raise ConfigError(
            f"{num_servers} servers x TP{tp} need {num_servers * tp} GPUs, CUDA_VISIBLE_DEVICES has {len(devices)}"
        )
    ep_master = None
    if "--enable-expert-parallel" in child_args:
        from pdbus.procs import free_port

        ep_master = f"127.0.0.1:{free_port()}"  # rendezvous of the EP group (all ranks on this host)
    out = []
    for i, port in enumerate(ports):
        own: dict[str, str] = {}
        if ep_master:
            own["PDBUS_EP_MASTER"] = ep_master
        if devices:
            own["CUDA_VISIBLE_DEVICES"] = ",".join(devices[i * tp : (i + 1) * tp])
        env = envs.child_env(**own)
        args = [*child_args, "--port", str(port), "--data-parallel-rank", str(i)]
        if dp is None:
            args += ["--data-parallel-size", str(num_servers)]
        out.append((args, env))
    return out


def _validate_ranks(ranks: list[tuple[list[str], dict]]) -> None:
    """Check every rank's flags (and that its port is free) here, so that a mistake is one line
    from multi-serve rather than one from each rank."""
    from pdbus.config import add_serve_args, serve_config_from_args

    for args, _ in ranks:
        p = argparse.ArgumentParser(prog="pdbus multi-serve --args")
        add_serve_args(p)
        serve_config_from_args(p.parse_args(args))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdbus multi-serve", description="Spawn one rank server per DP rank")
    p.add_argument("--ports", required=True, help="comma list of HTTP ports, one per server")
    p.add_argument("--num-servers", type=int, required=True)
    p.add_argument("--metrics-ports", default=None, help="accepted for FastDeploy compatibility (metrics share --ports)")
    p.add_argument("--args", nargs=argparse.REMAINDER, default=[], help="everything after is passed to each server")
    ns = p.parse_args(argv)
    try:
        ranks = plan(parse_ports(ns.ports, "--ports"), ns.num_servers, ns.args, envs.CUDA_VISIBLE_DEVICES)
        _validate_ranks(ranks)
    except ConfigError as exc:
        print(f"pdbus: error: {exc}", file=sys.stderr)
        return 2
    procs = [subprocess.Popen([sys.executable, "-m", "pdbus", "serve", *args], env=env) for args, env in ranks]
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    while procs:
        for proc in list(procs):
            rc = proc.poll()
            if rc is None:
                continue
            procs.remove(proc)
            if rc != 0 and not stopping:
                print(f"pdbus multi-serve: rank pid {proc.pid} exited with {rc}; stopping the others", file=sys.stderr)
                code = rc
                stop()
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return code


if __name__ == "__main__":
    sys.exit(main())
