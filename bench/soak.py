"""Soak a PD deployment: minutes of mixed load while prefill and decode instances are killed.

    .venv/bin/python bench/soak.py --duration-s 180 --concurrency 8 --fault-interval-s 15

Starts a router, ``--prefills`` prefill and ``--decodes`` decode instances on this host (the
built-in model unless ``--model DIR``; KV over ``--transport ipc|tcp``) through
``pdbus.procs.Cluster``, then for ``--duration-s`` runs ``--concurrency`` closed-loop clients
(aiohttp, real HTTP) that send, chosen by ``--seed``:

- valid requests: chat and completions, streamed and not, ``n`` 1-3, stop strings, logprobs /
  top_logprobs, ``stream_options.include_usage``, greedy and seeded sampling, short and
  multi-block prompts;
- clients that vanish: a stream closed after a few SSE chunks;
- bad bodies: malformed JSON, wrong types, non-finite numbers, over-long prompts, an unknown
  model, out-of-vocabulary token ids, deep nesting, a lone UTF-16 surrogate, an empty body.

Meanwhile every ``--fault-interval-s`` an instance gets SIGKILL (prefill and decode in turn) and a
new process of the same role is started against the same router; with ``--outage-every N``
every N-th decode fault takes *every* decode down at once (the requests in flight must end with
an error event or a 503, never hang) before they are restarted. A bad body answered 503 while no
decode is alive counts as a failure (``bad_503``): input is to be refused before capacity.

At the end (load stopped, faults stopped, every role back at full strength) it checks:

1. every request got a terminal answer within ``--request-bound-s``: a finished answer, an error
   event in its stream, or a 4xx / 503 / 504 with an OpenAI error body (a vanished client counts
   once it has closed);
2. no valid request got a 5xx other than 503 / 504, no bad body got anything but a 4xx, no 200
   was malformed (missing choices or finish reasons, no ``[DONE]``, a stop string in the text);
3. the router holds no request and no orphan lease (``requests``, ``orphans``) and every live
   rank has all blocks free (``free_blocks == total_blocks``, ``running == 0``,
   ``reserved_blocks == 0``), each within ``--settle-s`` of quiescence;
4. the deployment still serves (one probe request);
5. after teardown no process of the soak is left (found by a marker in their environment, so
   other pdbus processes on the host do not count), no port any of them listened on accepts a
   connection, and no ``/dev/shm/pdbus-kv-<pid>-*`` segment of theirs remains.

It prints a summary (requests by outcome, faults, leaks) and exits 1 if any check fails.
``run_soak(SoakConfig(...))`` is the same as a function (``tests/test_soak.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdbus.procs import Cluster, Proc, http_json, wait_until  # noqa: E402

MARKER = "PDBUS_SOAK_RUN"  # set in every process the soak starts; how leftovers are found

# prompts the built-in model answers (tools/default_model/corpus.py); others give it random text
PROMPTS = [
    "What is 12 + 7?",
    "What is 45 - 19?",
    "Count from 3 to 8.",
    "Count from 1 to 9.",
    "Reverse the string abcdef.",
    "Copy the string pdbus-soak.",
    "你好，请介绍一下自己。",
    "What is pdbus?",
]
STOPS = [[" 5"], ["4", "7"], ["."], ["pdbus"], ["\n"], ["+"]]


@dataclass
class SoakConfig:
    duration_s: float = 180.0
    concurrency: int = 8
    seed: int = 0
    fault_interval_s: float = 15.0
    transport: str = "ipc"
    prefills: int = 2
    decodes: int = 2
    model: str | None = None
    outage_every: int = 0  # every N-th decode fault kills every decode at once (0: never)
    max_faults: int | None = None
    request_bound_s: float = 60.0  # a request without a terminal answer by then has hung
    settle_s: float = 5.0  # blocks / router entries must be back within this after quiescence
    reserve_timeout_s: float = 5.0  # router: wait for decode room (then 503)
    request_timeout_s: float = 20.0  # router: an instance silent this long (then 504)
    bad_fraction: float = 0.15
    bad_kinds: tuple[str, ...] = ()  # the bad bodies to send (empty: all of BAD_KINDS)
    vanish_fraction: float = 0.1
    max_model_len: int = 512
    block_size: int = 16
    kv_blocks: int | None = None  # --num-gpu-blocks-override for every rank (KV pressure)
    workdir: str | None = None
    verbose: bool = False


@dataclass
class Outcome:
    kind: str  # valid | vanish | bad:<what>
    endpoint: str
    stream: bool
    status: int | None
    outcome: str
    reason: str = ""
    elapsed_s: float = 0.0


@dataclass
class Fault:
    at_s: float
    role: str
    killed: list[int]
    detected_s: float | None = None  # router marked the victims dead after the kill
    restarted_s: float | None = None  # replacements registered after the kill
    error: str = ""


# outcomes that end a request acceptably; anything else fails the soak
GOOD = {"finished", "error_event", "http_503", "http_504", "valid_4xx", "vanished", "rejected"}


@dataclass
class SoakReport:
    config: dict
    outcomes: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    leaks: dict[str, list] = field(default_factory=lambda: {"blocks": [], "requests": [], "processes": [], "sockets": [], "shm": []})
    requests: int = 0
    wall_s: float = 0.0
    commit: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        lines = [f"soak: {self.requests} requests in {self.wall_s:.0f}s, {len(self.faults)} faults, commit {self.commit}"]
        lines.append("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())))
        for kind, counts in sorted(self.by_kind.items()):
            lines.append(f"  {kind:22s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for f in self.faults:
            det = "-" if f["detected_s"] is None else f"{f['detected_s']:.1f}s"
            rst = "-" if f["restarted_s"] is None else f"{f['restarted_s']:.1f}s"
            lines.append(f"  fault at {f['at_s']:6.1f}s: SIGKILL {f['role']} pid {f['killed']}, seen dead {det}, back {rst} {f['error']}")
        lines.append("leaks: " + ", ".join(f"{k} {len(v)}" for k, v in self.leaks.items()))
        for k, v in self.leaks.items():
            for item in v[:5]:
                lines.append(f"  {k}: {item}")
        for n in self.notes:
            lines.append(f"note: {n}")
        for f in self.failures:
            lines.append(f"FAIL: {f}")
        lines.append("soak: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


# --------------------------------------------------------------------------- requests


def _error_body(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("error"), dict) and isinstance(data["error"].get("message"), str)


def make_valid(rng: random.Random, chat_ok: bool) -> tuple[str, dict]:
    chat = chat_ok and rng.random() < 0.5
    prompt = rng.choice(PROMPTS)
    if rng.random() < 0.15:  # many blocks of KV to move
        prompt = " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(6, 14)))
    body: dict = {"max_tokens": rng.randint(4, 48)}
    n = rng.choices([1, 2, 3], [0.7, 0.2, 0.1])[0]
    if n > 1:
        body["n"] = n
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body["temperature"] = 0.8
        body["seed"] = rng.randint(0, 2**31 - 1)
    if rng.random() < 0.25:
        body["stop"] = rng.choice(STOPS)
    if rng.random() < 0.25:
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 3)
        else:
            body["logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.2:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


BAD_KINDS = (
    "malformed_json", "wrong_type", "non_finite", "over_long", "unknown_model",
    "oov_token", "deep_nesting", "lone_surrogate", "empty_body", "not_object",
)  # fmt: skip


def make_bad(rng: random.Random, model: str, max_model_len: int, vocab: int, kinds=BAD_KINDS) -> tuple[str, str, bytes]:
    what = rng.choice(kinds or BAD_KINDS)
    ep = "/v1/completions"
    if what == "malformed_json":
        raw = b'{"prompt": "What is 1 + 1?", "max_tokens": 8'
    elif what == "wrong_type":
        ep, body = rng.choice(
            [
                ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}),
                ("/v1/completions", {"prompt": "hi", "temperature": "hot"}),
                ("/v1/completions", {"prompt": {"text": "hi"}}),
                ("/v1/chat/completions", {"messages": "hi"}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": "two"}),
                ("/v1/completions", {"prompt": "hi", "stop": 5}),
                ("/v1/completions", {"prompt": "hi", "stream": "yes"}),
            ]
        )
        raw = json.dumps(body).encode()
    elif what == "non_finite":
        raw = b'{"prompt": "hi", "max_tokens": 4, "temperature": NaN}'
    elif what == "over_long":
        raw = json.dumps({"prompt": "What is 12 + 7? " * (max_model_len // 2), "max_tokens": 8}).encode()
    elif what == "unknown_model":
        raw = json.dumps({"prompt": "hi", "model": f"not-{model}", "max_tokens": 4}).encode()
    elif what == "oov_token":
        raw = json.dumps({"prompt": [5, 6, vocab + 7], "max_tokens": 4}).encode()
    elif what == "deep_nesting":
        depth = 50_000
        raw = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    elif what == "lone_surrogate":
        ep = "/v1/chat/completions"
        raw = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 4}'
    elif what == "empty_body":
        raw = b""
    else:
        raw = b'[{"prompt": "hi"}]'
    return what, ep, raw


def check_answer(body: dict, data, chat: bool) -> str:
    """'' if a 200 non-stream answer is well formed, else what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return f"no choices: {str(data)[:200]}"
    n = body.get("n", 1)
    if sorted(c.get("index") for c in data["choices"]) != list(range(n)):
        return f"choice indices {[c.get('index') for c in data['choices']]} for n={n}"
    for c in data["choices"]:
        if c.get("finish_reason") not in ("stop", "length"):
            return f"choice {c.get('index')} finish_reason {c.get('finish_reason')!r}"
        text = c["message"]["content"] if chat else c.get("text")
        if not isinstance(text, str):
            return f"choice {c.get('index')} without text"
        for s in body.get("stop") or []:
            if s in text:
                return f"choice {c.get('index')} holds stop string {s!r}: {text!r}"
        if c["finish_reason"] == "stop" and body.get("ignore_eos") and not body.get("stop"):
            return f"choice {c.get('index')} finish_reason 'stop' under ignore_eos without stop strings (a failure reported as a finish?)"
        if body.get("logprobs") and c.get("logprobs") is None:
            return f"choice {c.get('index')} lacks the logprobs asked for"
    if not isinstance(data.get("usage"), dict):
        return "no usage"
    return ""


async def _read_sse(resp, on_chunk=None):
    """Yield parsed SSE ``data:`` payloads ('[DONE]' as the string)."""
    async for raw in resp.content:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data: "):
            continue
        payload = line[6:]
        if payload == "[DONE]":
            yield "[DONE]"
            return
        yield json.loads(payload)


async def send_valid(session, url: str, ep: str, body: dict, bound: float, vanish_after: int | None) -> tuple[int | None, str, str]:
    import aiohttp

    chat = ep.endswith("chat/completions")
    stream = bool(body.get("stream"))
    try:
        async with session.post(url + ep, json=body, timeout=aiohttp.ClientTimeout(total=bound)) as resp:
            status = resp.status
            if status != 200:
                raw = await resp.read()
                try:
                    data = json.loads(raw)
                except ValueError:
                    data = None
                if not _error_body(data):
                    return status, "no_error_body", " ".join(raw[:200].decode(errors="replace").split())
                msg = data["error"]["message"][:160]
                if status in (503, 504):
                    return status, f"http_{status}", msg
                if 400 <= status < 500:
                    return status, "valid_4xx", msg
                return status, "http_5xx", msg
            if not stream:
                data = await resp.json(content_type=None)
                wrong = check_answer(body, data, chat)
                return status, ("malformed" if wrong else "finished"), wrong
            n = body.get("n", 1)
            finished: dict[int, str] = {}
            texts: dict[int, str] = collections.defaultdict(str)
            chunks = 0
            error = ""
            done = False
            async for chunk in _read_sse(resp):
                if chunk == "[DONE]":
                    done = True
                    break
                if "error" in chunk and "choices" not in chunk:
                    error = str(chunk["error"].get("message", chunk["error"]))[:160]
                    continue
                chunks += 1
                for c in chunk.get("choices") or []:
                    idx = c.get("index")
                    piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    texts[idx] += piece or ""
                    if c.get("finish_reason"):
                        finished[idx] = c["finish_reason"]
                if vanish_after is not None and chunks >= vanish_after:
                    resp.close()  # the client goes away mid-stream
                    return status, "vanished", f"after {chunks} chunks"
            if error:
                return status, "error_event", error
            if not done:
                return status, "malformed", f"stream ended without [DONE] after {chunks} chunks"
            if sorted(finished) != list(range(n)):
                return status, "malformed", f"finish reasons for choices {sorted(finished)} of n={n}"
            for idx, text in texts.items():
                if finished.get(idx) == "stop" and body.get("ignore_eos") and not body.get("stop"):
                    return status, "malformed", f"choice {idx} finish_reason 'stop' under ignore_eos without stop strings"
                for s in body.get("stop") or []:
                    if finished.get(idx) == "stop" and s in text:
                        return status, "malformed", f"choice {idx} holds stop string {s!r}: {text!r}"
            return status, "finished", ""
    except TimeoutError:
        return None, "hung", f"no terminal answer within {bound:g}s"
    except (aiohttp.ClientError, ConnectionError) as exc:
        return None, "conn_error", f"{type(exc).__name__}: {exc}"[:200]


async def send_bad(session, url: str, ep: str, raw: bytes, bound: float) -> tuple[int | None, str, str]:
    import aiohttp

    try:
        async with session.post(url + ep, data=raw, headers={"Content-Type": "application/json"}, timeout=aiohttp.ClientTimeout(total=bound)) as resp:
            status = resp.status
            text = await resp.read()
    except TimeoutError:
        return None, "hung", f"no answer within {bound:g}s"
    except (aiohttp.ClientError, ConnectionError) as exc:
        return None, "conn_error", f"{type(exc).__name__}: {exc}"[:200]
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    snippet = " ".join(text[:160].decode(errors="replace").split())
    if 400 <= status < 500:
        return status, ("rejected" if _error_body(data) else "no_error_body"), snippet
    if status in (503, 504):  # capacity checked before the body was: still not an answer to bad input
        return status, f"bad_{status}", snippet
    if status >= 500:
        return status, "bad_5xx", snippet
    return status, "bad_accepted", snippet


# --------------------------------------------------------------------------- processes, sockets


def _proc_env_has(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return marker in fh.read().split(b"\0")
    except OSError:
        return False


def tagged_processes(tag: str) -> list[str]:
    """Live processes whose environment carries this run's marker (zombies excluded)."""
    marker = f"{MARKER}={tag}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        if pid == os.getpid() or not _proc_env_has(pid, marker):
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            state = stat.rsplit(")", 1)[1].split()[0]
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:
            continue
        if state != "Z":
            out.append(f"pid {pid} ({state}): {cmd}")
    return out


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (its socket inodes against /proc/net/tcp{,6})."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) > 9 and parts[3] == "0A" and parts[9] in inodes:  # 0A = LISTEN
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def shm_segments(pids: set[int]) -> list[str]:
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("pdbus-kv-") and n.split("-")[2].isdigit() and int(n.split("-")[2]) in pids)


# --------------------------------------------------------------------------- the soak


class Soak:
    def __init__(self, cfg: SoakConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.tag = uuid.uuid4().hex[:12]
        self.report = SoakReport(config=asdict(cfg))
        self.outcomes: list[Outcome] = []
        self.pids: set[int] = set()
        self.ports: dict[int, str] = {}  # port -> which process listened on it
        self.t0 = 0.0
        self.model = cfg.model
        self.cluster: Cluster | None = None
        self.router: Proc | None = None
        self.serve_args: list[str] = []
        self.vocab = 1024
        self.chat_ok = True
        self.model_name = ""
        self.decode_faults = 0

    def log(self, msg: str) -> None:
        if self.cfg.verbose:
            print(f"[soak {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    # ------------------------------------------------------------- cluster
    def instances(self) -> list[dict]:
        return http_json(self.router.url + "/instances", timeout=5)[1]["instances"]

    def alive_pids(self, role: str) -> set[int]:
        return {i["pid"] for i in self.instances() if i["alive"] and i["role"] == role}

    def ranks(self, role: str | None = None) -> list[Proc]:
        return [p for p in self.cluster.procs if p.name in ("prefill", "decode") and (role is None or p.name == role) and p.alive()]

    def note_ports(self, proc: Proc) -> None:
        self.pids.add(proc.popen.pid)
        for port in listening_ports(proc.popen.pid):
            self.ports[port] = f"{proc.name} pid {proc.popen.pid}"

    def start_rank(self, role: str) -> Proc:
        proc = self.cluster.serve(self.model, role, self.router, *self.serve_args)
        self.pids.add(proc.popen.pid)
        return proc

    def wait_registered(self, procs: list[Proc], timeout: float = 90.0) -> None:
        want = {p.popen.pid for p in procs}

        def registered():
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} pid {p.popen.pid} exited with {p.popen.returncode}:\n{p.tail()}")
            alive = {i["pid"] for i in self.instances() if i["alive"]}
            return want <= alive

        wait_until(registered, timeout, f"instances {sorted(want)} registered", interval=0.1)
        for p in procs:
            self.note_ports(p)

    def start_cluster(self) -> None:
        cfg = self.cfg
        if self.model is None:
            from pdbus.config import default_model_dir

            self.model = default_model_dir()
        with contextlib.suppress(OSError, ValueError, KeyError):
            self.vocab = int(json.loads(Path(self.model, "config.json").read_text())["vocab_size"])
        has_tok = Path(self.model, "tokenizer.model").is_file()
        self.chat_ok = has_tok
        self.serve_args = [
            "--cache-transfer-protocol", cfg.transport,
            "--max-model-len", str(cfg.max_model_len),
            "--block-size", str(cfg.block_size),
            "--kv-cache-memory-gb", "0.05",
        ]  # fmt: skip
        if not has_tok:
            self.serve_args.append("--skip-tokenizer-init")
        if cfg.kv_blocks:
            self.serve_args += ["--num-gpu-blocks-override", str(cfg.kv_blocks)]
        self.router = self.cluster.router("--reserve-timeout-s", str(cfg.reserve_timeout_s), "--request-timeout-s", str(cfg.request_timeout_s))
        self.pids.add(self.router.popen.pid)
        procs = [self.start_rank("prefill") for _ in range(cfg.prefills)] + [self.start_rank("decode") for _ in range(cfg.decodes)]
        self.cluster.wait_health(self.router.url, timeout=120)
        self.wait_registered(procs)
        self.note_ports(self.router)
        self.model_name = http_json(self.router.url + "/v1/models", timeout=5)[1]["data"][0]["id"]
        self.log(f"cluster up: router {self.router.url}, ports {sorted(self.ports)}")

    # ------------------------------------------------------------- faults
    def inject_fault(self, index: int) -> Fault:
        """Blocking (runs in a thread): SIGKILL one instance (or every decode), restart, wait."""
        cfg = self.cfg
        role = "prefill" if index % 2 == 0 else "decode"  # in turn
        outage = False
        if role == "decode":
            self.decode_faults += 1
            outage = cfg.outage_every > 0 and self.decode_faults % cfg.outage_every == 0
        live = self.ranks(role)
        victims = live if outage else [self.rng.choice(live)] if live else []
        fault = Fault(at_s=round(time.monotonic() - self.t0, 1), role=("all decodes" if outage else role), killed=[v.popen.pid for v in victims])
        t_kill = time.monotonic()
        for v in victims:
            v.kill()  # SIGKILL, then reaps it
        self.log(f"fault {index}: killed {fault.role} {fault.killed}")
        try:
            killed = set(fault.killed)
            wait_until(lambda: not (killed & self.alive_pids(role)), 15, "router sees the victims dead", interval=0.05)
            fault.detected_s = round(time.monotonic() - t_kill, 2)
            fresh = [self.start_rank(role) for _ in victims]
            self.wait_registered(fresh)
            fault.restarted_s = round(time.monotonic() - t_kill, 2)
        except (TimeoutError, RuntimeError, OSError) as exc:
            fault.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        self.log(f"fault {index}: {fault}")
        return fault

    async def fault_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        index = 0
        while not stop.is_set():
            if self.cfg.max_faults is not None and index >= self.cfg.max_faults:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.fault_interval_s)  # pacing, not synchronisation
            if stop.is_set():
                return
            fault = await loop.run_in_executor(None, self.inject_fault, index)
            self.report.faults.append(asdict(fault))
            index += 1

    # ------------------------------------------------------------- load
    async def client(self, session, stop: asyncio.Event, rng: random.Random) -> None:
        cfg = self.cfg
        url = self.router.url
        while not stop.is_set():
            t = time.monotonic()
            r = rng.random()
            if r < cfg.bad_fraction:
                what, ep, raw = make_bad(rng, self.model_name, cfg.max_model_len, self.vocab, cfg.bad_kinds)
                status, outcome, reason = await send_bad(session, url, ep, raw, cfg.request_bound_s)
                rec = Outcome(f"bad:{what}", ep, False, status, outcome, reason)
            else:
                ep, body = make_valid(rng, self.chat_ok)
                vanish = r < cfg.bad_fraction + cfg.vanish_fraction
                if vanish or rng.random() < 0.5:
                    body["stream"] = True
                    if rng.random() < 0.5:
                        body["stream_options"] = {"include_usage": True}
                status, outcome, reason = await send_valid(session, url, ep, body, cfg.request_bound_s, rng.randint(1, 3) if vanish else None)
                rec = Outcome("vanish" if vanish else "valid", ep, bool(body.get("stream")), status, outcome, reason)
                if outcome not in GOOD:
                    rec.reason += f" | body {json.dumps(body)[:300]}"
            rec.elapsed_s = round(time.monotonic() - t, 3)
            self.outcomes.append(rec)
            if rec.outcome not in GOOD:
                self.log(f"{rec.kind} {rec.endpoint} -> {rec.status} {rec.outcome}: {rec.reason}")
            # pacing: a client told 503 backs off a little, as a real one would
            await asyncio.sleep(rng.uniform(0.1, 0.5) if rec.status == 503 else rng.uniform(0, 0.05))

    async def load(self) -> None:
        import aiohttp

        stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            faults = asyncio.ensure_future(self.fault_loop(stop))
            clients = [asyncio.ensure_future(self.client(session, stop, random.Random(self.cfg.seed * 1000 + i))) for i in range(self.cfg.concurrency)]
            await asyncio.sleep(self.cfg.duration_s)  # the soak's length
            stop.set()
            # every client's current request is bounded by request_bound_s; the fault by its waits
            done, pending = await asyncio.wait(clients + [faults], timeout=self.cfg.request_bound_s + 120)
            for task in pending:
                task.cancel()
                self.report.failures.append(f"a load task did not end within its bound: {task!r}")
            for task in done:
                if task.exception() is not None:
                    self.report.failures.append(f"a load task raised {task.exception()!r}")

    # ------------------------------------------------------------- checks
    def router_stats(self) -> dict:
        status, body = http_json(self.router.url + "/stats", timeout=5)
        if status == 200 and "requests" in body:
            return body
        import urllib.request

        text = urllib.request.urlopen(self.router.url + "/metrics", timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith('pdbus:backend{instance="",key="'):
                key = line.split('key="', 1)[1].split('"', 1)[0]
                out[key] = float(line.rsplit(" ", 1)[1])
        return out

    def check_quiescent(self) -> None:
        rep = self.report
        # every role back at full strength (a fault that failed to restart is a finding of its own)
        for role, want in (("prefill", self.cfg.prefills), ("decode", self.cfg.decodes)):
            missing = want - len(self.ranks(role))
            if missing > 0:
                rep.failures.append(f"{missing} {role} instance(s) missing at the end; restarting them for the checks")
                self.wait_registered([self.start_rank(role) for _ in range(missing)])
        t_quiet = time.monotonic()
        last = {}

        def router_clean():
            last.update(self.router_stats())
            return last.get("requests") == 0 and last.get("orphans") == 0

        try:
            wait_until(router_clean, self.cfg.settle_s, "router requests and orphans 0", interval=0.1)
        except TimeoutError:
            rep.leaks["requests"].append({k: last.get(k) for k in ("requests", "orphans")})
            rep.failures.append(f"router still holds requests/orphans {self.cfg.settle_s:g}s after quiescence: {rep.leaks['requests'][-1]}")
        busy: dict[str, dict] = {}

        def blocks_free():
            busy.clear()
            for p in self.ranks():
                s = http_json(p.url + "/stats", timeout=5)[1]
                if not (s["free_blocks"] == s["total_blocks"] and s["running"] == 0 and s["reserved_blocks"] == 0 and s.get("waiting", 0) == 0):
                    busy[f"{p.name} pid {p.popen.pid}"] = {k: s[k] for k in ("free_blocks", "total_blocks", "running", "waiting", "reserved_blocks")}
            return not busy

        try:
            wait_until(blocks_free, self.cfg.settle_s, "every rank's blocks free", interval=0.1)
        except TimeoutError:
            rep.leaks["blocks"].extend(f"{k}: {v}" for k, v in busy.items())
            rep.failures.append(f"blocks not free {self.cfg.settle_s:g}s after quiescence: {busy}")
        rep.notes.append(f"quiescence checks took {time.monotonic() - t_quiet:.1f}s")
        # still serving
        status, body = http_json(self.router.url + "/v1/completions", {"prompt": "What is 12 + 7?", "max_tokens": 8, "temperature": 0}, timeout=60)
        if status != 200:
            rep.failures.append(f"probe request after the soak: {status} {str(body)[:200]}")
        stats = self.router_stats()
        rep.notes.append("router exits: " + ", ".join(f"{k[5:]} {int(v)}" for k, v in stats.items() if k.startswith("exit_") and v))
        rep.notes.append(f"router reschedules {int(stats.get('reschedules', 0))}, busy {int(stats.get('busy', 0))}, failures {int(stats.get('failures', 0))}")

    def check_teardown(self) -> None:
        rep = self.report
        # sockets are known per process while it lived; the last rank of each role may have been
        # started after the first census, so take one more of every live process now
        for p in self.cluster.procs:
            if p.alive():
                self.note_ports(p)
        self.cluster.close()
        left: list[str] = []

        def gone():
            left[:] = tagged_processes(self.tag)
            return not left

        try:
            wait_until(gone, 15, "every soak process gone", interval=0.1)
        except TimeoutError:
            rep.leaks["processes"].extend(left)
            rep.failures.append(f"{len(left)} process(es) left after teardown: {left[:3]}")
        open_ports = [f"{port} ({who})" for port, who in sorted(self.ports.items()) if port_open(port)]
        if open_ports:
            rep.leaks["sockets"].extend(open_ports)
            rep.failures.append(f"ports still accepting connections after teardown: {open_ports}")
        segs = shm_segments(self.pids)
        if segs:
            rep.leaks["shm"].extend(segs)
            rep.failures.append(f"shared-memory segments left in /dev/shm: {segs}")
        rep.notes.append(f"{len(self.pids)} processes started, {len(self.ports)} listening ports checked closed")

    def tally(self) -> None:
        rep = self.report
        rep.requests = len(self.outcomes)
        rep.outcomes = dict(collections.Counter(o.outcome for o in self.outcomes))
        by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for o in self.outcomes:
            by_kind[o.kind if not o.kind.startswith("bad:") else "bad"][o.outcome] += 1
        rep.by_kind = {k: dict(v) for k, v in by_kind.items()}
        bad_kinds = collections.Counter(o.kind for o in self.outcomes if o.kind.startswith("bad:"))
        rep.notes.append("bad bodies: " + ", ".join(f"{k[4:]} {v}" for k, v in sorted(bad_kinds.items())))
        reasons = collections.Counter()
        for o in self.outcomes:
            if o.outcome not in GOOD:
                reasons[(o.kind, o.status, o.outcome, o.reason.split(" | body")[0][:120])] += 1
        for (kind, status, outcome, reason), count in reasons.most_common():
            rep.failures.append(f"{count}x {kind} -> {status} {outcome}: {reason}")
        valid_4xx = collections.Counter(o.reason[:100] for o in self.outcomes if o.outcome == "valid_4xx")
        for reason, count in valid_4xx.most_common(5):
            rep.notes.append(f"{count}x valid request -> 4xx: {reason}")
        for code in ("http_503", "http_504", "error_event"):
            why = collections.Counter(o.reason[:100] for o in self.outcomes if o.outcome == code)
            for reason, count in why.most_common(3):
                rep.notes.append(f"{count}x {code}: {reason}")
        slow = max((o.elapsed_s for o in self.outcomes), default=0.0)
        rep.notes.append(f"slowest request {slow:.1f}s (bound {self.cfg.request_bound_s:g}s)")
        for f in rep.faults:
            if f["error"]:
                rep.failures.append(f"fault at {f['at_s']}s: {f['error']}")

    def run(self) -> SoakReport:
        cfg = self.cfg
        self.t0 = time.monotonic()
        with contextlib.suppress(OSError, Exception):
            import subprocess

            self.report.commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent, timeout=10
            ).stdout.strip()
        workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="pdbus-soak-"))
        self.cluster = Cluster(workdir / "procs", env={MARKER: self.tag})
        try:
            self.start_cluster()
            asyncio.run(self.load())
            self.tally()
            self.check_quiescent()
        except Exception as exc:
            self.report.failures.append(f"soak aborted: {type(exc).__name__}: {str(exc)[:2000]}")
            if not self.report.requests:
                self.tally()
        finally:
            self.check_teardown()
            self.report.wall_s = round(time.monotonic() - self.t0, 1)
        self.report.notes.append(f"logs in {workdir / 'procs'}")
        return self.report


def run_soak(cfg: SoakConfig) -> SoakReport:
    return Soak(cfg).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SoakConfig()
    p.add_argument("--duration-s", type=float, default=d.duration_s)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--fault-interval-s", type=float, default=d.fault_interval_s)
    p.add_argument("--transport", choices=["ipc", "tcp"], default=d.transport)
    p.add_argument("--prefills", type=int, choices=[1, 2], default=d.prefills)
    p.add_argument("--decodes", type=int, choices=[1, 2], default=d.decodes)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--outage-every", type=int, default=d.outage_every, help="every N-th decode fault kills every decode at once (0: never)")
    p.add_argument("--max-faults", type=int, default=None)
    p.add_argument("--request-bound-s", type=float, default=d.request_bound_s)
    p.add_argument("--settle-s", type=float, default=d.settle_s)
    p.add_argument("--reserve-timeout-s", type=float, default=d.reserve_timeout_s)
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    p.add_argument("--bad-fraction", type=float, default=d.bad_fraction)
    p.add_argument("--bad-kinds", default="", help=f"comma list of bad bodies to send (default all: {','.join(BAD_KINDS)})")
    p.add_argument("--vanish-fraction", type=float, default=d.vanish_fraction)
    p.add_argument("--kv-blocks", type=int, default=None, help="--num-gpu-blocks-override for every rank")
    p.add_argument("--workdir", default=None, help="process logs go to WORKDIR/procs (default: a new temp dir)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    unknown = set(filter(None, args.bad_kinds.split(","))) - set(BAD_KINDS)
    if unknown:
        p.error(f"unknown --bad-kinds {sorted(unknown)}; known: {','.join(BAD_KINDS)}")
    args.bad_kinds = tuple(filter(None, args.bad_kinds.split(",")))
    cfg = SoakConfig(**{k: v for k, v in vars(args).items() if k != "json"})
    report = run_soak(cfg)
    print(report.summary())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
