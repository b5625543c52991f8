"""Cross-node PD on one machine: two network namespaces ("hosts") joined by a veth pair.

Host A (10.200.X.1) runs the router and a prefill, host B (10.200.X.2) a decode; each process
has its own PDBUS_HOST_ID, so the router must pick a cross-host protocol. Every request and
every /stats read is sent from inside the namespace that owns the address (``TwoHosts.call``);
nothing here talks to a 10.x address from the machine's own network namespace.

Skipped, with the reason, where ``ip netns add`` is not permitted. The namespaces, and every
process in them, are removed by the fixtures whatever happens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_pd import COMMON, complete, prompts
from waits import roles, wait_idle, wait_instances, wait_showing

from pdbus.netns import NetnsError, NetnsPair, TwoHosts, unsupported
from pdbus.procs import http_json, wait_until
from pdbus.security import generate_key_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HAVE_MOONCAKE = importlib.util.find_spec("mooncake") is not None
ROUTER_PORT, BUS_PORT, PREFILL_PORT, DECODE_PORT = 8109, 8110, 8188, 8200
N_PROMPTS = 12


@pytest.fixture(scope="module")
def netns_ok():
    reason = unsupported()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")


@pytest.fixture
def pair(netns_ok):
    p = NetnsPair()
    try:
        p.create()
        yield p
    finally:
        p.close()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert p.a not in left and p.b not in left, f"namespaces left behind: {left}"


@pytest.fixture
def hosts(pair, tmp_path):
    h = TwoHosts(pair, tmp_path / "hosts")
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """Mixed role on one host (loopback), each prompt alone, greedy."""
    from pdbus.procs import Cluster

    with Cluster(tmp_path_factory.mktemp("mixed")) as c:
        server = c.serve(tiny_model_dir, "mixed", None, *COMMON)
        c.wait_health(server.url)
        ps = prompts(N_PROMPTS)
        return ps, [complete(server.url, p) for p in ps]


# --------------------------------------------------------------------------- helpers


def _protocol_args(protocol: str) -> tuple[list[str], dict]:
    if protocol == "rdma-tcp":  # the Mooncake adapter, over Mooncake's own TCP transport
        return ["--cache-transfer-protocol", "rdma"], {"PDBUS_MOONCAKE_TCP": "1"}
    return ["--cache-transfer-protocol", protocol], {}


def start_cross(hosts: TwoHosts, model: str, protocol: str, *, router_extra=(), serve_extra=(), prefill_env=None, decode_env=None, decode_extra=(), common=COMMON):
    pair = hosts.pair
    proto_args, proto_env = _protocol_args(protocol)
    router = hosts.router(*router_extra, port=ROUTER_PORT, bus_port=BUS_PORT)
    prefill = hosts.serve(pair.a, model, "prefill", router, *common, *proto_args, *serve_extra, port=PREFILL_PORT, env={**proto_env, **(prefill_env or {})})
    decode = hosts.serve(pair.b, model, "decode", router, *common, *proto_args, *serve_extra, *decode_extra, port=DECODE_PORT, env={**proto_env, **(decode_env or {})})
    hosts.wait_health(router)
    wait_registered(hosts, router, prefill=1, decode=1)
    return router, prefill, decode


def wait_registered(hosts: TwoHosts, router, prefill: int, decode: int, timeout: float = 60.0) -> list[dict]:
    """The router's alive instances once they are ``prefill`` prefill and ``decode`` decode (read from host A)."""
    return wait_instances(
        router.url,
        roles(prefill, decode),
        timeout,
        f"instances registered ({prefill} prefill, {decode} decode)",
        read=lambda url: hosts.call(hosts.pair.a, http_json, url, None, 5),
    )


def stats(hosts: TwoHosts, proc) -> dict:
    """A rank's /stats, read from inside its own namespace (reachable even with the link cut)."""
    return hosts.call(hosts.ns_of(proc), http_json, proc.url + "/stats", None, 5)[1]


def wait_all_blocks_free(hosts: TwoHosts, ranks, timeout: float = 60.0) -> None:
    wait_idle(lambda: [stats(hosts, p) for p in ranks], timeout)


def wait_refused(hosts: TwoHosts, proc, timeout: float = 120.0) -> None:
    """``proc`` is up but not registered (/health 503), or it stopped itself with one line
    naming --bus-key-file; never registered."""

    def refused() -> bool:
        if not proc.alive():
            assert proc.popen.returncode != 0 and "--bus-key-file" in proc.tail(3), proc.tail()
            return True
        status, body = hosts.call(hosts.ns_of(proc), http_json, proc.url + "/health", None, 5)  # OSError: not yet
        assert status != 200, f"{proc.name} without the cluster key registered: {body}"
        return status == 503 and body.get("status") == "starting"

    wait_showing(refused, timeout, f"{proc.name} serving /health 503 or stopping", proc.tail, interval=0.2)


def listeners(pair: NetnsPair, ns: str) -> list[tuple[str, int, str]]:
    """(local address, port, process) of every listening TCP socket inside ``ns``."""
    out = pair.run(ns, ["ss", "-H", "-ltnp"]).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        addr, _, port = cols[3].rpartition(":")
        found.append((addr.strip("[]"), int(port), cols[-1] if "users:" in cols[-1] else ""))
    return found


def connections(pair: NetnsPair, ns: str) -> list[tuple[str, str]]:
    """(local, peer) of every established TCP connection inside ``ns``."""
    out = pair.run(ns, ["ss", "-H", "-tn", "state", "established"]).stdout
    return [(cols[2], cols[3]) for cols in (line.split() for line in out.splitlines()) if len(cols) >= 4]


def post(url: str, body: dict, timeout: float = 90.0) -> tuple[int, dict | str]:
    """One completion, streamed: (HTTP status, the error it ended with or the token ids)."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(dict(body, stream=True)).encode(), headers={"Content-Type": "application/json"})
    ids: list[int] = []
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    return resp.status, {"ids": ids}
                if line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return resp.status, {"error": chunk["error"], "ids": ids}
                    for choice in chunk["choices"]:
                        ids += choice.get("completion_token_ids") or []
            return resp.status, {"error": "stream ended without [DONE]", "ids": ids}
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}


# --------------------------------------------------------------------------- tests


PROTOCOLS = [
    "tcp",
    pytest.param("rdma-tcp", marks=pytest.mark.skipif(not HAVE_MOONCAKE, reason="mooncake-transfer-engine is not installed")),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pd_across_hosts_equals_mixed(hosts, tiny_model_dir, reference, protocol):
    pair = hosts.pair
    ps, ref = reference
    # "ipc" offered first on both sides: the router must see two hosts and skip it
    proto = "ipc,tcp" if protocol == "tcp" else protocol
    router, prefill, decode = start_cross(hosts, tiny_model_dir, proto)
    with ThreadPoolExecutor(N_PROMPTS) as pool:
        got = list(pool.map(lambda ip: hosts.call(pair.a, complete, router.url, ip[1], stream=ip[0] % 2 == 1), enumerate(ps)))
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g == r, f"prompt {i} (len {len(ps[i])}) over {protocol} across hosts: {g} != {r}"
    wait_all_blocks_free(hosts, [prefill, decode])
    assert stats(hosts, prefill)["transfer_bytes"] > 0
    # the KV really crossed the veth: a connection from A's address into B's
    assert any(local.startswith(pair.ip_b + ":") and peer.startswith(pair.ip_a + ":") for local, peer in connections(pair, pair.b))
    # everything that listens is bound to its host's own address, never to all interfaces
    for ns in (pair.a, pair.b):
        for addr, port, proc in listeners(pair, ns):
            if protocol == "rdma-tcp" and addr in ("0.0.0.0", "*", "::"):
                continue  # Mooncake binds its handshake and data ports to all interfaces (docs/CROSS_NODE.md)
            assert addr == pair.ip(ns), f"{proc} listens on {addr}:{port} in {ns}"


def test_instance_without_the_bus_key_is_refused(hosts, tiny_model_dir, reference, tmp_path):
    pair = hosts.pair
    ps, ref = reference
    key, other = tmp_path / "bus.key", tmp_path / "other.key"
    generate_key_file(str(key))
    generate_key_file(str(other))
    proto_args = ["--cache-transfer-protocol", "tcp"]
    router = hosts.router("--bus-key-file", str(key), "--heartbeat-interval", "0.5", port=ROUTER_PORT, bus_port=BUS_PORT)
    prefill = hosts.serve(pair.a, tiny_model_dir, "prefill", router, *COMMON, *proto_args, "--bus-key-file", str(key), port=PREFILL_PORT)
    # on host B: one instance with no key at all, one with another cluster's key
    plain = hosts.serve(pair.b, tiny_model_dir, "decode", router, *COMMON, *proto_args, port=DECODE_PORT)
    intruder = hosts.serve(pair.b, tiny_model_dir, "decode", router, *COMMON, *proto_args, "--bus-key-file", str(other), port=DECODE_PORT + 1)
    wait_registered(hosts, router, prefill=1, decode=0, timeout=180)
    status, body = hosts.call(pair.b, http_json, router.url + "/bus", None, 5)
    assert status == 200 and body["curve"] is True
    for p in (plain, intruder):
        wait_refused(hosts, p)
    time.sleep(3)  # several Hellos of each
    alive = wait_registered(hosts, router, prefill=1, decode=0)
    assert [i["role"] for i in alive] == ["prefill"]
    for p in (plain, intruder):
        wait_refused(hosts, p)
    status, body = hosts.call(pair.a, http_json, router.url + "/health", None, 5)
    assert status == 503 and body["decode"] == 0
    assert "refused a bus connection" in router.tail(200) and "--bus-key-file" in router.tail(200)
    # the key holder on host B is admitted, and PD works across the hosts
    holder = hosts.serve(pair.b, tiny_model_dir, "decode", router, *COMMON, *proto_args, "--bus-key-file", str(key), port=DECODE_PORT + 2)
    wait_registered(hosts, router, prefill=1, decode=1, timeout=180)
    assert hosts.call(pair.a, complete, router.url, ps[3]) == ref[3]
    assert prefill.alive() and holder.alive()


def send_queue(pair: NetnsPair, ns: str, dst: str) -> int:
    """Bytes waiting in the send queues of ``ns``'s TCP connections to ``dst`` (host:port)."""
    out = pair.run(ns, ["ss", "-H", "-tn", "state", "established", "dst", dst]).stdout
    return sum(int(cols[1]) for cols in (line.split() for line in out.splitlines()) if len(cols) >= 4 and cols[1].isdigit())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_link_cut_mid_transfer_fails_cleanly_and_recovers(hosts, tiny_model_dir, reference, protocol):
    """A's side of the veth is rate-limited (tc tbf) so KV transfers take a while; decode steps
    are slowed so streams are mid-decode too. The cut lands while KV bytes are queued towards B
    and a stream is decoding on B. Every in-flight request must end with an error, promptly;
    every block on both hosts comes back; after the link returns, serving resumes with the
    exact greedy outputs."""
    pair = hosts.pair
    ps, ref = reference
    router, prefill, decode = start_cross(
        hosts,
        tiny_model_dir,
        protocol,
        router_extra=("--reserve-timeout-s", "2", "--max-retries", "1"),
        prefill_env={"PDBUS_TRANSFER_TIMEOUT_S": "3"},
        decode_env={"PDBUS_FAULT_STEP_DELAY_MS": "100"},
    )
    assert hosts.call(pair.a, complete, router.url, ps[2]) == ref[2]
    wait_all_blocks_free(hosts, [prefill, decode])
    kv_ports = [port for addr, port, _ in listeners(pair, pair.b) if port != DECODE_PORT]
    try:
        pair.shape(pair.a, "2mbit")  # ~250 KB/s from A to B: a 480-token prompt's KV takes ~1.5 s
    except NetnsError as exc:
        pytest.skip(f"cannot slow the link (tc tbf): {exc}")

    long_prompt = [(j % 90) + 3 for j in range(480)]
    decoding = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 80, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    bodies = [decoding] + [{"prompt": long_prompt[i:], "max_tokens": 20, "temperature": 0, "ignore_eos": True, "return_token_ids": True} for i in range(3)]
    results: list = [None] * len(bodies)

    def run(i: int) -> None:
        results[i] = hosts.call(pair.a, post, router.url, bodies[i], 120)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(bodies))]
    threads[0].start()
    wait_until(lambda: stats(hosts, decode)["running"], 30, "the first request reaching the decode", 0.02)
    for t in threads[1:]:
        t.start()
    def in_flight() -> int:
        return sum(send_queue(pair, pair.a, f"{pair.ip_b}:{port}") for port in kv_ports)

    wait_until(in_flight, 30, "a KV transfer towards B seen in flight", 0.01)
    failed_before = stats(hosts, prefill)["failed"]
    t_cut = time.monotonic()
    pair.cut()
    try:
        # the prefill's engine is never stuck on the unreachable peer much longer than the
        # transfer timeout (3 s here): it reports its in-flight transfers failed promptly
        wait_showing(
            lambda: stats(hosts, prefill)["failed"] != failed_before,
            t_cut + 15 - time.monotonic(),
            "the prefill engine failing its transfers after the cut",
            lambda: stats(hosts, prefill),
        )
        for t in threads:
            t.join(max(1.0, t_cut + 60 - time.monotonic()))
        ended = time.monotonic() - t_cut
        assert not any(t.is_alive() for t in threads), f"a request hangs after the link was cut: {results}"
        for i, (status, body) in enumerate(results):
            assert "error" in body, f"request {i} did not fail after the cut: {status} {body}"
            assert status in (200, 502, 503, 504), (status, body)  # an SSE error event or an HTTP error
        assert ended < 45, f"requests took {ended:.1f}s to fail after the cut"
        # every block on both sides of the cut comes back (each read inside its own namespace)
        wait_all_blocks_free(hosts, [prefill, decode], timeout=60)
    finally:
        pair.restore()
        pair.shape(pair.a, None)
    wait_registered(hosts, router, prefill=1, decode=1, timeout=60)
    hosts.wait_health(router)
    assert hosts.call(pair.a, complete, router.url, ps[4]) == ref[4]
    assert hosts.call(pair.a, complete, router.url, ps[7], stream=True) == ref[7]
    wait_all_blocks_free(hosts, [prefill, decode])
    assert prefill.alive() and decode.alive() and router.alive()


def test_rdma_forced_without_a_nic_fails_at_start(pair, tiny_model_dir, tmp_path):
    """On host B, with no RDMA NIC and no test mode: one clear line, exit 1, nothing served."""
    import os

    if os.path.isdir("/sys/class/infiniband") and os.listdir("/sys/class/infiniband"):
        pytest.skip("this machine has an RDMA NIC")
    env = {k: v for k, v in os.environ.items() if k not in ("PDBUS_MOONCAKE_TCP", "KVCACHE_RDMA_NICS", "MC_FORCE_HCA")}
    argv = [sys.executable, "-m", "pdbus", "serve", "--model", tiny_model_dir, "--host", pair.ip_b, "--port", str(DECODE_PORT),
            "--splitwise-role", "decode", "--router", f"{pair.ip_a}:{ROUTER_PORT}", *COMMON, "--cache-transfer-protocol", "rdma"]
    for extra_env, needle in (({}, "no RDMA NIC on this host"), ({"KVCACHE_RDMA_NICS": "mlx5_7"}, "NIC mlx5_7 not found")):
        res = pair.run(pair.b, argv, env={**env, **extra_env}, timeout=120)
        assert res.returncode == 1, res.stderr[-2000:]
        last = res.stderr.strip().splitlines()[-1]
        assert needle in last and "KVCACHE_RDMA_NICS" in last and "--cache-transfer-protocol tcp" in last, res.stderr[-2000:]
        assert last.startswith("pdbus: error:"), last
        assert "Traceback" not in res.stderr
        assert not listeners(pair, pair.b)  # it never served anything


def test_run_sh_cross_node_demo(netns_ok, tiny_model_dir, reference, tmp_path):
    """``python -m pdbus.launch cross-node demo`` (what ``./run.sh cross-node demo`` runs):
    healthy across the two namespaces, the printed curl command answers, Ctrl-C removes all."""
    import os
    import re
    import signal

    ps, ref = reference
    cmd = [sys.executable, "-m", "pdbus.launch", "cross-node", "demo", "--model", tiny_model_dir, "--start-timeout", "240", *COMMON]
    log = tmp_path / "demo.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    names: set[str] = set()
    try:
        def ready() -> bool:
            text = log.read_text()
            if "  try: " in text:
                return True
            assert proc.poll() is None, text[-3000:]
            return False

        wait_showing(ready, 300, "the demo printing its curl line", lambda: log.read_text()[-3000:], interval=0.2)
        text = log.read_text()
        names = set(re.findall(r"network namespace (pdbus-[ab]-[0-9a-f]+)", text))
        assert len(names) == 2, text
        curl = text.split("  try: ", 1)[1].splitlines()[0]
        assert curl.startswith("ip netns exec pdbus-a-")
        out = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=120)
        body = json.loads(out.stdout)
        assert len(body["choices"][0]["completion_token_ids"]) == 16
        # the same cluster gives the reference outputs (the request goes in from inside host A)
        ns_a = next(n for n in names if "-a-" in n)
        host_a = re.search(r"http://([0-9.]+):8109", text).group(1)
        data = json.dumps({"prompt": ps[5], "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        out = subprocess.run(["ip", "netns", "exec", ns_a, "curl", "-s", "--max-time", "60", f"http://{host_a}:8109/v1/completions",
                              "-H", "Content-Type: application/json", "-d", data], capture_output=True, text=True, timeout=90)
        assert json.loads(out.stdout)["choices"][0]["completion_token_ids"] == ref[5]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(n in left for n in names), left
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for name in names:  # only if the demo could not clean up after itself
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_unsupported_says_why(monkeypatch):
    """The skip reason is one line naming what is missing (no namespace is made here)."""
    import os
    import shutil

    from pdbus import netns

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "iproute2" in netns.unsupported()
    monkeypatch.undo()
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in netns.unsupported()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_default_model_answers_across_hosts(hosts, default_model_dir, protocol):
    """The built-in model's checked answers survive a KV transfer between two hosts."""
    cases = json.load(open(os.path.join(default_model_dir, "eval_prompts.json"), encoding="utf-8"))[::3]
    router, prefill, decode = start_cross(hosts, default_model_dir, protocol, common=[c for c in COMMON if c != "--skip-tokenizer-init"])

    def chat(case: dict) -> str:
        status, data = http_json(router.url + "/v1/chat/completions", {"messages": case["messages"], "chat_template_kwargs": case.get("chat_template_kwargs", {}), "max_tokens": 160, "temperature": 0}, timeout=120)
        assert status == 200, data
        return data["choices"][0]["message"]["content"]

    answers = [hosts.call(hosts.pair.a, chat, c) for c in cases]
    wrong = [(c["prompt"], a) for c, a in zip(cases, answers) if a.strip() != c["expected"].strip()]
    assert not wrong, f"wrong answers across hosts over {protocol}: {wrong[:3]}"
    assert stats(hosts, prefill)["transfer_bytes"] > 0
