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

import subprocess
import sys
import threading

import msgspec
import torch
import torch.distributed as dist
import zmq

from native.parallel.comm import GroupBroken, first_line
from native.transfer.base import TransferHandle
from pdbus import envs
from pdbus.log import get_logger
from pdbus.messages import Endpoint, RankEndpoint, TransferProtocol

log = get_logger("tp")


class StepCmd(msgspec.Struct, tag="step"):
    token_chunks: list[list[int]]
    start_positions: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]


class TransferCmd(msgspec.Struct, tag="transfer"):
    req_id: str
    protocol: TransferProtocol
    peer: str
    endpoint: Endpoint
    src_blocks: list[int]
    dst_blocks: list[int]


class AbortCmd(msgspec.Struct, tag="abort"):
    req_id: str


class StopCmd(msgspec.Struct, tag="stop"):
    pass


Command = StepCmd | TransferCmd | AbortCmd | StopCmd
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Command)


class EndpointsReport(msgspec.Struct, tag="endpoints"):
    """Worker -> leader, once loaded: where a decode's peers write into this rank's heads."""

    rank: int
    endpoints: dict[TransferProtocol, RankEndpoint]


class TransferReport(msgspec.Struct, tag="transfer_done"):
    """Worker -> leader: this rank's writes of a request have landed (or failed)."""

    rank: int
    req_id: str
    error: str | None = None
    nbytes: int = 0
    seconds: float = 0.0


Report = EndpointsReport | TransferReport
_report_dec = msgspec.msgpack.Decoder(Report)


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
        self.endpoints: dict[int, dict[TransferProtocol, RankEndpoint]] = {}  # worker rank -> its endpoints
        self.pending: dict[str, dict[int, TransferHandle]] = {}  # req -> worker rank -> its handle
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.dead: str | None = None
        self.on_dead = None
        self._closing = False
        self._threads: list[threading.Thread] = []

    def spawn(self) -> None:
        for rank in range(1, self.spec.size):
            spec = msgspec.structs.replace(self.spec, rank=rank, report_endpoint=self.report_endpoint)
            env = envs.child_env()
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
                msg = _report_dec.decode(self.pull.recv())
            except zmq.ZMQError:
                return
            except msgspec.ValidationError as exc:  # a bug, not a peer: the workers are ours
                log.error("TP group: dropping a malformed worker report: %s", exc)
                continue
            if isinstance(msg, EndpointsReport):
                self.endpoints[msg.rank] = msg.endpoints
                if len(self.endpoints) == self.spec.size - 1:
                    self._ready.set()
                continue
            with self._lock:
                handles = self.pending.get(msg.req_id, {})
                handle = handles.pop(msg.rank, None)
                if not handles:
                    self.pending.pop(msg.req_id, None)
            if handle is None:
                continue  # aborted meanwhile
            if msg.error:
                handle.set_failed(f"TP rank {msg.rank}: {msg.error}")
            else:
                handle.set_done(msg.nbytes, msg.seconds)

    # ----- the workers' KV transfers (transfer/tp_routing.RankFanOut)
    def start_transfer(self, control, cmd: TransferCmd) -> list[TransferHandle]:
        """Tell every worker to write its heads of ``cmd.req_id``; one handle per worker."""
        handles = {rank: TransferHandle(cmd.req_id) for rank in range(1, self.spec.size)}
        with self._lock:
            self.pending[cmd.req_id] = dict(handles)
        broadcast_cmd(cmd, control)
        return list(handles.values())

    def abort_transfer(self, control, req_id: str) -> None:
        broadcast_cmd(AbortCmd(req_id), control)
        with self._lock:
            handles = self.pending.pop(req_id, {})
        for handle in handles.values():
            handle.set_failed(f"transfer of {req_id} was aborted")

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


class TPRunner:
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


class WorkerTransfers:
    """The leader's view of its workers' KV writes (transfer/tp_routing.RankFanOut): a
    TransferCmd broadcast on the control group; each worker's report completes its handle."""

    def __init__(self, group: TPGroup, control):
        self.group, self.control = group, control

    def start(self, req_id, protocol, peer_id, endpoint, src_blocks, dst_blocks) -> list[TransferHandle]:
        return self.group.start_transfer(self.control, TransferCmd(req_id, protocol, peer_id, endpoint, src_blocks, dst_blocks))

    def abort(self, req_id: str) -> None:
        self.group.abort_transfer(self.control, req_id)
