"""Two "hosts" on one machine: a pair of network namespaces joined by a veth pair.

    with NetnsPair() as pair:                      # pdbus-a-<rand>, pdbus-b-<rand>
        pair.ip_a, pair.ip_b                       # 10.200.X.1 in A, 10.200.X.2 in B
        subprocess.run(pair.cmd(pair.a, ["ss", "-ltn"]))
        with pair.executor(pair.a) as pool:        # Python calls whose sockets live in A
            pool.submit(http_json, f"http://{pair.ip_a}:8109/health").result()
        pair.cut(); pair.restore()                 # veth down / up

Everything exists only inside the two namespaces (loopback up, one /24 on the veth, no route
out): nothing is added to the machine's own network, and the addresses are reachable only
from inside A or B. Traffic to them must be sent from there: through ``cmd`` (``ip netns
exec``), a ``wrapper`` script for a Python interpreter, or ``executor``, whose worker threads
have joined the namespace (``setns``, per thread) before they run anything.

``close()`` (also on ``with`` exit, at interpreter exit and after SIGTERM) kills whatever
still runs inside the two namespaces (processes this program started there) and deletes them;
the veth goes with them. Needs root (CAP_SYS_ADMIN) and iproute2: ``unsupported()`` says why not.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
_PREFIX = "pdbus"

_live: weakref.WeakSet[NetnsPair] = weakref.WeakSet()
_live_lock = threading.Lock()


class NetnsError(RuntimeError):
    """A namespace could not be created or used."""


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise NetnsError("the `ip` command (iproute2) is not installed: apt-get install -y iproute2") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`ip {' '.join(args)}` did not finish within {timeout}s") from None
    if check and res.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {(res.stderr or res.stdout).strip()}")
    return res


def _ip_tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        raise NetnsError("`tc` (iproute2) is not installed") from None
    if check and res.returncode != 0:
        raise NetnsError(f"`tc {' '.join(args)}` in {ns} failed: {(res.stderr or res.stdout).strip()}")
    return res


def unsupported() -> str | None:
    """None when network namespaces can be made here; otherwise one line saying why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed: apt-get install -y iproute2"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN): `ip netns add` is not permitted"
    probe = f"{_PREFIX}-probe-{secrets.token_hex(3)}"
    try:
        res = _ip("netns", "add", probe, check=False)
    except NetnsError as e:
        return str(e)
    if res.returncode != 0:
        return f"`ip netns add` is not permitted here: {(res.stderr or res.stdout).strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def enter_netns(name: str) -> None:
    """Move the *calling thread* into network namespace ``name`` (sockets it creates from now
    on live there). Verified: raises NetnsError unless the thread really is in ``name``."""
    path = os.path.join(NETNS_DIR, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)
    mine = os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino
    if mine != os.stat(path).st_ino:
        raise NetnsError(f"this thread is not in network namespace {name} after setns")


class NetnsPair:
    """Namespaces ``a`` and ``b`` joined by veth ``veth_a`` (in A) / ``veth_b`` (in B)."""

    def __init__(self, prefix: str = _PREFIX, subnet: int | None = None):
        tag = secrets.token_hex(3)
        self.a = f"{prefix}-a-{tag}"
        self.b = f"{prefix}-b-{tag}"
        self.veth_a = f"pdva{tag}"  # interface names are at most 15 characters
        self.veth_b = f"pdvb{tag}"
        octet = subnet if subnet is not None else 1 + secrets.randbelow(254)
        self.ip_a = f"10.200.{octet}.1"
        self.ip_b = f"10.200.{octet}.2"
        self.created: list[str] = []
        self._closed = False
        self._wrappers: list[Path] = []

    # ----------------------------------------------------------------- life cycle
    def create(self) -> NetnsPair:
        reason = unsupported()
        if reason:
            raise NetnsError(reason)
        with _live_lock:
            _live.add(self)
        _install_exit_hooks()
        try:
            for ns in (self.a, self.b):
                _ip("netns", "add", ns)
                self.created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            # made inside A, so the host's own namespace never holds (even for a moment) the pair
            _ip("-n", self.a, "link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b)
            _ip("-n", self.a, "link", "set", self.veth_b, "netns", self.b)
            for ns, dev, ip in ((self.a, self.veth_a, self.ip_a), (self.b, self.veth_b, self.ip_b)):
                _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
            self.wait_link(True)
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> NetnsPair:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill what runs inside A and B, delete them (and the veth). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for ns in self.created:
            self.kill_all(ns)
        for ns in self.created:
            _ip("netns", "delete", ns, check=False)
        self.created.clear()
        for path in self._wrappers:
            try:
                path.unlink()
            except OSError:
                pass
        with _live_lock:
            _live.discard(self)

    # ----------------------------------------------------------------- the link
    def cut(self) -> None:
        """Take the veth down on both sides: packets between A and B stop."""
        _ip("-n", self.a, "link", "set", self.veth_a, "down")
        _ip("-n", self.b, "link", "set", self.veth_b, "down")

    def restore(self) -> None:
        _ip("-n", self.a, "link", "set", self.veth_a, "up")
        _ip("-n", self.b, "link", "set", self.veth_b, "up")
        self.wait_link(True)

    def shape(self, ns: str, rate: str | None, latency_ms: int = 200) -> None:
        """Limit what ``ns`` sends over the veth to ``rate`` (tc tbf, e.g. "4mbit"); None
        removes the limit. Slows a transfer so that a cut can land in the middle of it."""
        dev = self.veth_a if ns == self.a else self.veth_b
        if rate is None:
            _ip_tc(ns, "qdisc", "del", "dev", dev, "root", check=False)
            return
        _ip_tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kb", "latency", f"{latency_ms}ms")

    def link_up(self) -> bool:
        """Both ends up and carrying (LOWER_UP on A's end needs B's end up too)."""
        out = _ip("-n", self.a, "-o", "link", "show", self.veth_a).stdout
        flags = out.partition("<")[2].partition(">")[0].split(",")
        return "UP" in flags and "LOWER_UP" in flags

    def wait_link(self, up: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.link_up() != up:
            if time.monotonic() > deadline:
                raise NetnsError(f"veth {self.veth_a} not {'up' if up else 'down'} within {timeout}s")
            time.sleep(0.02)

    # ----------------------------------------------------------------- running things inside
    def other(self, ns: str) -> str:
        return self.b if ns == self.a else self.a

    def ip(self, ns: str) -> str:
        return self.ip_a if ns == self.a else self.ip_b

    @staticmethod
    def cmd(ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``ns`` (``ip netns exec`` execs it: same pid, same environment)."""
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.cmd(ns, argv), **kw)

    def wrapper(self, ns: str, python: str, directory: str | os.PathLike, env: dict | None = None) -> str:
        """A script that runs ``python "$@"`` inside ``ns`` (with ``env`` exported): pass it
        where an interpreter path is expected (``Cluster(python=...)``)."""
        lines = ["#!/bin/sh"]
        for key, value in (env or {}).items():
            lines.append(f"export {key}={_sh_quote(str(value))}")
        lines.append(f"exec ip netns exec {_sh_quote(ns)} {_sh_quote(python)} \"$@\"")
        path = Path(directory) / f"python-in-{ns}.sh"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)
        self._wrappers.append(path)
        return str(path)

    def executor(self, ns: str, workers: int = 4) -> ThreadPoolExecutor:
        """A thread pool whose threads run inside ``ns`` (a thread that fails to get there
        breaks the pool instead of running anything outside)."""
        if ns not in self.created:
            raise NetnsError(f"{ns} is not one of this pair's namespaces")
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"in-{ns}", initializer=enter_netns, initargs=(ns,))

    def pids(self, ns: str) -> list[int]:
        res = _ip("netns", "pids", ns, check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def kill_all(self, ns: str, grace: float = 5.0) -> None:
        """SIGTERM every process inside ``ns`` (all started there by this program), SIGKILL
        what is left after ``grace`` seconds."""
        pids = [p for p in self.pids(ns) if p != os.getpid()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                pids = [p for p in self.pids(ns) if p != os.getpid()]
                if not pids:
                    return
                time.sleep(0.05)


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


_hooks_installed = False


def _close_all() -> None:
    with _live_lock:
        pairs = list(_live)
    for pair in pairs:
        try:
            pair.close()
        except Exception:  # at exit: best effort, keep closing the others
            pass


def _install_exit_hooks() -> None:
    """Delete live namespaces at interpreter exit and on SIGTERM (when we own the handler)."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_close_all)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return

    def on_term(signum, frame):
        _close_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)


# --------------------------------------------------------------------------- pdbus across the pair


class TwoHosts:
    """pdbus processes on the two "hosts" of a ``NetnsPair``: one ``Cluster`` per namespace,
    each process started through a wrapper that runs it inside its namespace with
    ``PDBUS_HOST_ID`` set to the namespace (so the router never pairs them over ``ipc``), and
    a thread pool per namespace for the HTTP calls that reach them.

        hosts = TwoHosts(pair, tmp_path)
        router = hosts.router()                                   # in A, on pair.ip_a
        hosts.serve(pair.a, model, "prefill", router, ...)
        hosts.serve(pair.b, model, "decode", router, ...)
        hosts.call(pair.a, http_json, router.url + "/health")
    """

    def __init__(self, pair: NetnsPair, workdir: str | os.PathLike, env: dict | None = None, python: str | None = None):
        import sys

        from pdbus.procs import Cluster

        self.pair = pair
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        python = python or sys.executable
        self.clusters = {}
        self.pools = {}
        for ns in (pair.a, pair.b):
            wrapper = pair.wrapper(ns, python, workdir, {"PDBUS_HOST_ID": ns})
            self.clusters[ns] = Cluster(workdir / ns, env=env, python=wrapper)
            self.pools[ns] = pair.executor(ns, workers=8)

    def __enter__(self) -> TwoHosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def procs(self):
        return [p for c in self.clusters.values() for p in c.procs]

    def ns_of(self, proc) -> str:
        return next(ns for ns, c in self.clusters.items() if proc in c.procs)

    def call(self, ns: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on a thread inside ``ns``; its sockets live there."""
        return self.pools[ns].submit(fn, *args, **kwargs).result()

    def router(self, *extra: str, port: int = 8109, bus_port: int = 8110, env: dict | None = None):
        c = self.clusters[self.pair.a]
        return c.router("--bus-port", str(bus_port), *extra, port=port, host=self.pair.ip_a, env=env)

    def serve(self, ns: str, model: str, role: str, router, *extra: str, port: int, env: dict | None = None):
        return self.clusters[ns].serve(model, role, router, *extra, port=port, host=self.pair.ip(ns), env=env)

    def wait_health(self, proc, timeout: float = 180.0, expect: int = 200) -> dict:
        ns = self.ns_of(proc)
        return self.call(ns, self.clusters[ns].wait_health, proc.url, timeout, expect)

    def close(self) -> None:
        for c in self.clusters.values():
            c.close()
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
