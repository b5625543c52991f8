"""A TP group: the rank server's process is TP rank 0 (the leader); ranks 1..N-1 are worker
processes (``python -m native.parallel.worker``) that follow it step by step.

Control goes over a gloo process group (parallel/comm.py; the model's tensors go over NCCL
when every rank has a GPU of its own, else over gloo too): the leader
broadcasts each command as msgpack bytes — a model step, a KV transfer to start, an abort, or
stop — and every rank executes it; the model's own collectives (all-reduce, all-gather) keep
them in lockstep. Workers report asynchronous results (their transfer engines' endpoints at
start, each transfer's completion) on a ZeroMQ PUSH socket to the leader.

A worker that dies breaks the collectives: the leader's watchdog sees the process exit, logs one
line and stops the rank server, and the router sees the instance go.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import msgspec
import torch
import torch.distributed as dist
import zmq

from native.parallel.comm import GroupBroken, first_line
from native.parallel.tp import HeadSplit, head_overlaps
from native.runner import Runner
from native.transfer.base import TransferEngine, TransferError, TransferHandle, WriteOp
from pdbus.log import get_logger

log = get_logger("tp")


class StepCmd(msgspec.Struct, tag="step"):
    token_chunks: list[list[int]]
    start_positions: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]


class TransferCmd(msgspec.Struct, tag="transfer"):
    req_id: str
    protocol: str
    peer: str
    endpoint: dict
    src_blocks: list[int]
    dst_blocks: list[int]


class AbortCmd(msgspec.Struct, tag="abort"):
    req_id: str


class StopCmd(msgspec.Struct, tag="stop"):
    pass


Command = StepCmd | TransferCmd | AbortCmd | StopCmd
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Command)


class CacheSizing(msgspec.Struct):
    """The ServeConfig fields that size a rank's KV cache (native/kv_cache.kv_blocks_for_budget,
    runner.profile_activation_peak read them by name)."""

    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    num_gpu_blocks_override: int | None
    gpu_memory_utilization: float
    kv_cache_memory_gb: float

    @classmethod
    def of(cls, cfg) -> CacheSizing:
        return cls(**{f: getattr(cfg, f) for f in cls.__struct_fields__})


class WorkerSpec(msgspec.Struct):
    """Everything a worker needs to build its shard (passed as JSON on its command line)."""

    model: str
    dtype: str
    quantization: str
    device: str
    rank: int
    size: int
    master_port: int
    report_endpoint: str
    sizing: CacheSizing
    role: str
    protocols: list[str]
    transfer_host: str
    shared_kv: bool
    decode_graphs: bool = False  # capture decode CUDA graphs (every rank together)


def broadcast_cmd(cmd, group) -> None:
    data = torch.frombuffer(bytearray(_enc.encode(cmd)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    try:
        dist.broadcast(size, 0, group=group)
        dist.broadcast(data, 0, group=group)
    except (RuntimeError, OSError) as exc:  # a worker is gone (its watchdog line says which)
        raise GroupBroken(f"TP group broken: {first_line(exc)}") from None


def recv_cmd(group):
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, 0, group=group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, 0, group=group)
    return _dec.decode(data.numpy().tobytes())


def init_group(rank: int, size: int, master_port: int, device: torch.device):
    """Join the TP group: (data Comm, gloo control group); see parallel/comm.py."""
    from native.parallel.comm import init_groups

    return init_groups(rank, size, f"tcp://127.0.0.1:{master_port}", device, "TP")


def split_writes(split: HeadSplit, local_layout: dict, endpoint: dict) -> list[tuple[int, dict, tuple, tuple]]:
    """For this rank's KV heads and a peer's endpoint (one rank, or {"ranks": [...]}), the writes:
    (dest rank index, dest endpoint, src head range, dst head range)."""
    if not split.owns_kv:
        return []
    dests = endpoint.get("ranks") or [endpoint]
    out = []
    src_start = local_layout["head_start"]
    src_count = local_layout["num_kv_heads"]
    for i, ep in enumerate(dests):
        lay = ep["layout"]
        ov = head_overlaps(src_start, src_count, lay.get("head_start", 0), lay["num_kv_heads"])
        if ov is not None:
            out.append((i, ep, ov[0], ov[1]))
    return out


class TPGroup:
    """Leader side: spawn the workers, join the process group, collect their reports."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.report_endpoint = f"tcp://127.0.0.1:{port}"
        self.procs: list[subprocess.Popen] = []
        self.endpoints: dict[int, dict] = {}  # worker rank -> {protocol: endpoint}
        self.pending: dict[str, _Combined] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.dead: str | None = None
        self.on_dead = None
        self._closing = False
        self._threads: list[threading.Thread] = []

    def spawn(self) -> None:
        for rank in range(1, self.spec.size):
            spec = msgspec.structs.replace(self.spec, rank=rank, report_endpoint=self.report_endpoint)
            env = dict(os.environ)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "native.parallel.worker", msgspec.json.encode(spec).decode()], env=env
                )
            )
        for target in (self._reports, self._watchdog):
            t = threading.Thread(target=target, name=f"pdbus-tp{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def wait_ready(self, timeout: float = 600.0) -> None:
        if not self._ready.wait(timeout):
            raise RuntimeError(f"TP workers not ready within {timeout:.0f}s (ranks reported: {sorted(self.endpoints)})")
        if self.dead:
            raise RuntimeError(self.dead)

    def _reports(self) -> None:
        while not self._closing:
            try:
                if not self.pull.poll(200):
                    continue
                msg = msgspec.msgpack.decode(self.pull.recv())
            except zmq.ZMQError:
                return
            if "endpoints" in msg:
                self.endpoints[msg["rank"]] = msg["endpoints"]
                if len(self.endpoints) == self.spec.size - 1:
                    self._ready.set()
                continue
            with self._lock:
                combined = self.pending.get(msg["req_id"])
            if combined is not None:
                combined.report(msg["rank"], msg.get("error"), msg.get("nbytes", 0))

    def _watchdog(self) -> None:
        while not self._closing:
            for proc in self.procs:
                try:
                    rc = proc.wait(0.5)
                except subprocess.TimeoutExpired:
                    continue
                if self.dead is None and not self._closing:
                    self.dead = f"TP worker pid {proc.pid} exited with code {rc}"
                    log.error("%s; this instance cannot continue", self.dead)
                    self._ready.set()
                    if self.on_dead is not None:
                        self.on_dead(self.dead)
                return

    def close(self) -> None:
        self._closing = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for t in self._threads:
            t.join(5)
        self.pull.close(0)
        self.ctx.term()


class TPRunner(Runner):
    """The engine's runner for TP > 1: broadcast the step, run rank 0's shard."""

    def __init__(self, runner, control_group):
        self.inner = runner
        self.kv_cache = runner.kv_cache
        self.group = control_group

    def execute(self, token_chunks, start_positions, block_tables, sample_rows, layer_done=None):
        broadcast_cmd(StepCmd(token_chunks, start_positions, block_tables, list(sample_rows)), self.group)
        return self.inner.execute(token_chunks, start_positions, block_tables, sample_rows, layer_done=layer_done)

    def stop(self) -> None:
        broadcast_cmd(StopCmd(), self.group)


@dataclass
class _Combined:
    """Completes when the leader's own handles and every worker's report are in."""

    handle: TransferHandle
    waiting: set[int]
    local: list[TransferHandle] = field(default_factory=list)
    nbytes: int = 0
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, rank: int, error: str | None, nbytes: int) -> None:
        with self.lock:
            self.waiting.discard(rank)
            self.nbytes += nbytes
            if error and not self.error:
                self.error = f"TP rank {rank}: {error}"
        self.check()

    def check(self) -> None:
        with self.lock:
            if self.waiting or not all(h.done() for h in self.local):
                return
            errors = [h.error for h in self.local if h.error] + ([self.error] if self.error else [])
            if errors:
                self.handle.set_failed(errors[0])
            else:
                self.handle.set_done(self.nbytes + sum(h.nbytes for h in self.local), max((h.seconds for h in self.local), default=0.0))


class TPTransfer(TransferEngine):
    """The prefill side's transfer engine: it maps this rank's KV heads onto the decode's TP
    ranks (an endpoint with ``ranks`` lists one per decode TP rank) and writes each overlap as a
    head slice, layer by layer as the prefill goes. With TP > 1 the workers are told at commit to
    write their slices, and the handle completes once every rank's writes have landed."""

    def __init__(self, name: str, local: TransferEngine, group: TPGroup | None, control_group, split: HeadSplit):
        super().__init__(local.cache, local.host)
        self.name = name
        self.local = local
        self.tp = group
        self.control = control_group
        self.split = split
        self.layout = msgspec.structs.asdict(local.cache.layout())
        self.plans: dict[str, tuple] = {}  # peer -> (endpoint, writes of this rank's heads)
        self.blocks: dict[str, tuple] = {}  # req -> (src blocks, dst blocks) of its writes

    def endpoint(self) -> dict:
        return self.local.endpoint()

    def open_peer(self, peer_id: str, endpoint: dict) -> None:
        self.plans[peer_id] = (endpoint, split_writes(self.split, self.layout, endpoint))
        for i, ep, _, _ in self.plans[peer_id][1]:
            self.local.open_peer(f"{peer_id}#{i}", ep)

    def write(self, req_id: str, peer_id: str, op: WriteOp) -> None:
        for i, _ep, src_heads, dst_heads in self.plans[peer_id][1]:
            self.local.write(req_id, f"{peer_id}#{i}", WriteOp(op.layer, op.src_blocks, op.dst_blocks, src_heads, dst_heads))
        self.blocks[req_id] = (op.src_blocks, op.dst_blocks)

    def commit(self, req_id: str, peer_id: str) -> TransferHandle:
        endpoint, writes = self.plans[peer_id]
        src, dst = self.blocks.pop(req_id)
        combined = _Combined(TransferHandle(req_id), waiting=set(range(1, self.split.size)))
        combined.local = [self.local.commit(req_id, f"{peer_id}#{i}") for i, *_ in writes]
        if self.tp is not None:
            with self.tp._lock:
                self.tp.pending[req_id] = combined
            broadcast_cmd(TransferCmd(req_id, self.name, peer_id, endpoint, list(src), list(dst)), self.control)
        for h in combined.local:
            threading.Thread(target=_wait_then, args=(h, combined.check), daemon=True).start()
        combined.check()
        return combined.handle

    def abort(self, req_id: str) -> None:
        self.blocks.pop(req_id, None)
        self.local.abort(req_id)
        if self.tp is None:
            return
        broadcast_cmd(AbortCmd(req_id), self.control)
        with self.tp._lock:
            combined = self.tp.pending.pop(req_id, None)
        if combined is not None:
            combined.handle.set_failed("aborted")

    def close_peer(self, peer_id: str) -> None:
        endpoint_writes = self.plans.pop(peer_id, None)
        for i, *_ in endpoint_writes[1] if endpoint_writes else []:
            self.local.close_peer(f"{peer_id}#{i}")

    def close(self) -> None:
        self.local.close()


def _wait_then(handle: TransferHandle, then) -> None:
    try:
        handle.wait(None)
    except TransferError:
        pass
    then()
