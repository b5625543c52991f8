"""Processes of a pdbus deployment started from Python: free ports, JSON over HTTP, health waits, clean teardown.

    with Cluster(workdir) as c:
        router = c.router()
        c.serve(model, role="prefill", router=router)
        c.serve(model, role="decode", router=router)
        c.wait_health(router.url)

Every process gets its own log file; on a failed wait the last lines of each log are in the
error. ``close()`` terminates the group (SIGTERM, then SIGKILL after a bound). The launcher, the
network-namespace demo, the benchmarks and the tests all start processes through it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pdbus import envs


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate()`` until it returns something truthy (returned) or ``timeout`` seconds
    pass (``TimeoutError`` naming ``what``, with the last value or error). The one poll-with-a-
    deadline loop: for state that can only be observed from outside (HTTP, another process)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
        except OSError as exc:  # a server not yet (or no longer) answering
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not within {timeout}s (last: {last!r})")
        time.sleep(interval)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a process to bind later. Picked below the kernel's ephemeral range, so
    that the ports the kernel hands out meanwhile (``bind(0)``, outgoing connections: gloo's, the
    transfers') can never take it before its owner binds it; ``bind(0)`` if none is free there."""
    low = _ephemeral_low()
    if low > 11000:
        for _ in range(50):
            port = random.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 30.0, method: str | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if body is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except json.JSONDecodeError:
            return exc.code, {"raw": raw.decode(errors="replace")}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    port: int
    host: str = "127.0.0.1"
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)
            self.popen.wait(10)


class Cluster:
    def __init__(self, workdir: str | os.PathLike, env: dict | None = None, python: str = sys.executable):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.python = python
        self.env = envs.child_env(PYTHONUNBUFFERED="1", defaults={"PDBUS_TORCH_THREADS": 1})
        if env:
            self.env.update(env)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, name: str, args: list[str], port: int, env: dict | None = None, host: str = "127.0.0.1") -> Proc:
        log = self.workdir / f"{name}-{len(self.procs)}.log"
        fh = open(log, "wb")
        popen = subprocess.Popen(
            [self.python, "-m", "pdbus", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(self.env, **(env or {})),
            start_new_session=True,
        )
        fh.close()
        proc = Proc(name, popen, log, port, host)
        self.procs.append(proc)
        return proc

    def router(self, *extra: str, port: int | None = None, host: str = "127.0.0.1", env: dict | None = None) -> Proc:
        port = port or free_port(host)
        return self.start("router", ["router", "--host", host, "--port", str(port), *extra], port, env=env, host=host)

    def serve(
        self,
        model: str,
        role: str = "mixed",
        router: Proc | str | None = None,
        *extra: str,
        port: int | None = None,
        host: str = "127.0.0.1",
        env: dict | None = None,
    ) -> Proc:
        port = port or free_port(host)
        args = ["serve", "--model", str(model), "--host", host, "--port", str(port), "--splitwise-role", role]
        if router is not None:
            args += ["--router", router.addr if isinstance(router, Proc) else router]
        return self.start(role, [*args, *extra], port, env=env, host=host)

    def wait_health(self, url: str, timeout: float = 120.0, expect: int = 200) -> dict:
        seen: list = [None]

        def healthy():
            for p in self.procs:
                if not p.alive() and p.popen.returncode not in (0, -9, -15):
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{p.tail()}")
            seen[0] = http_json(url.rstrip("/") + "/health", timeout=2)
            return seen[0][0] == expect

        try:
            wait_until(healthy, timeout, f"{url}/health {expect}", interval=0.1)
        except TimeoutError:
            logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.procs)
            raise TimeoutError(f"{url}/health not {expect} within {timeout}s (last: {seen[0]})\n{logs}") from None
        return seen[0][1]

    def close(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            if p.alive():
                try:
                    os.killpg(p.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.popen.wait(5)
        self.procs.clear()
