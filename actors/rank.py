"""The rank server: one DP rank of a prefill, decode or mixed instance (vLLM's engine core).

It owns the model, the KV cache, the engine thread and the transfer engines, and serves
``/health``, ``/metrics`` and ``/stats`` on ``--port``; it never speaks the OpenAI API: the
router does (``pdbus serve`` in the mixed role without ``--router`` starts one on ``--port`` and
moves this server to a free port, pdbus/launch.py ``serve_with_router``). Every role learns the
bus endpoint from the router (``GET /bus``), registers with a ``Hello`` describing its role, KV
layout and transfer endpoints, and then follows the router:

  Reserve   -> engine leases blocks, keeps prompt + sampling with them -> Reserved | Busy; the
               prompt's blocks already in its prefix cache lead the lease (Reserved.cached_blocks)
  Prefill   -> engine prefills (the router sent it with the Reserve, so no block ids yet)
  DestReady -> the decode's block ids: the last chunk may run and write KV out (not the cached blocks)
               -> Prefilled(first token) | Failed
  Prefill without dest (mixed) -> prefills and decodes here -> Tokens (from the first token on)
  Decode(token one) -> engine claims the lease, decodes -> Tokens (one message per step, all sequences)
  Abort / Release -> sequence or lease dropped, blocks freed

Socket I/O stays on the asyncio thread; the engine runs on its own thread and hands events
back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import time
import urllib.request
import uuid

import torch
from aiohttp import web

from actors.engine.engine import Engine, EngineEvents, EngineLimits
from actors.rank_load import LoadedRank, load_rank
from actors.rank_setup import tune_cpu_runtime
from pdbus import envs
from pdbus.actor import BusMember
from pdbus.config import ServeConfig
from pdbus.log import get_logger
from pdbus.messages import (
    PROTOCOL_VERSION,
    Abort,
    Busy,
    Decode,
    DestReady,
    Failed,
    Hello,
    Load,
    Prefill,
    Prefilled,
    Release,
    Reserve,
    Reserved,
    TokenOut,
    Tokens,
)
from pdbus.sockets import BusError

log = get_logger("rank")


# --------------------------------------------------------------------------- building blocks


class _LoopEvents(EngineEvents):
    """Engine-thread callbacks forwarded onto the asyncio loop.

    Events queue up in a deque and the loop is woken only when no wake-up is pending, so a loop
    that falls behind drains several engine steps per wake-up instead of one wake-up each.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, target):
        self.loop = loop
        self.target = target
        self._events: collections.deque = collections.deque()
        self._scheduled = False

    def _post(self, fn, *args) -> None:
        self._events.append((fn, args))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        while self._events:
            fn, args = self._events.popleft()
            fn(*args)

    def on_tokens(self, items):
        self._post(self.target.on_engine_tokens, items)

    def on_prefilled(self, req_id, first, nbytes, seconds):
        self._post(self.target.on_engine_prefilled, req_id, first, nbytes, seconds)

    def on_failed(self, req_id, error, retryable):
        self._post(self.target.on_engine_failed, req_id, error, retryable)

    def on_reserved(self, req_id, block_ids, reason, cached_blocks=0):
        self._post(self.target.on_engine_reserved, req_id, block_ids, reason, cached_blocks)


class RankBus(BusMember):
    name = "rank-bus"

    def __init__(self, server: RankServer, endpoint: str, **kw):
        self.server = server
        super().__init__(endpoint, **kw)

    def on_reserve(self, peer, msg: Reserve, frames):
        engine = self.server.engine
        if msg.sampling is None:  # a lease without its request: only Release or expiry ends it
            engine.reserve(msg.req_id, msg.num_tokens, msg.lease_s)
        else:
            engine.reserve(msg.req_id, msg.num_tokens, msg.lease_s, msg.prompt_token_ids, msg.output_token_ids, msg.sampling)

    def on_prefill(self, peer, msg: Prefill, frames):
        if msg.dest is not None:  # a mixed instance's prefill runs on into the decode: no Prefilled
            self.server.prefill_started[msg.req_id] = time.monotonic()
        self.server.engine.add_prefill(msg.req_id, msg.prompt_token_ids, msg.sampling, msg.dest, msg.num_output_tokens)

    def on_dest_ready(self, peer, msg: DestReady, frames):
        self.server.engine.dest_ready(msg.req_id, msg.block_ids, msg.dest, msg.cached_blocks)

    def on_decode(self, peer, msg: Decode, frames):
        self.server.engine.add_decode(msg.req_id, msg.first_token_id)

    def on_release(self, peer, msg: Release, frames):
        self.server.engine.release(msg.req_id)

    def on_abort(self, peer, msg: Abort, frames):
        self.server.engine.abort(msg.req_id, msg.reason or "aborted by router")

    def on_refused(self, reason: str) -> None:
        self.server.refused(reason)


# --------------------------------------------------------------------------- the server


class RankServer:
    """Serves one loaded rank (``self.rank``, from actors.rank_load) through its engine."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.instance_id = f"{cfg.splitwise_role}-{socket.gethostname()}-{cfg.port}-{uuid.uuid4().hex[:6]}"
        self.rank: LoadedRank | None = None
        self.engine: Engine | None = None
        self.bus: RankBus | None = None
        self.prefill_started: dict[str, float] = {}
        self.counters = {"transfer_bytes": 0, "transfer_seconds": 0.0, "prefilled": 0, "failed": 0}
        self._stop = asyncio.Event()
        self._exit_code = 0

    def hello(self) -> Hello:
        rank = self.rank
        return Hello(
            protocol=PROTOCOL_VERSION,
            instance_id=self.instance_id,
            role=self.cfg.splitwise_role,
            host=self.cfg.host,
            http_port=self.cfg.port,
            model=rank.model_name,
            config_hash=rank.model_cfg.config_hash(),
            kv=rank.kv_cache.layout(),
            transfer=rank.endpoints,
            max_num_seqs=self.cfg.max_num_seqs,
            max_model_len=self.cfg.max_model_len,
            dp_rank=self.cfg.data_parallel_rank,
            dp_size=self.cfg.data_parallel_size,
            tp_size=self.cfg.tensor_parallel_size,
            load=self.engine.load() if self.engine else Load(),
            pid=os.getpid(),
            vocab_size=self.rank.model_cfg.vocab_size,
        )

    def tokenizer_files(self) -> dict[str, bytes]:
        tokenizer = self.rank.tokenizer
        return tokenizer.files() if tokenizer is not None else {}

    def stats(self) -> dict:
        e = self.engine
        load = e.load()
        return {
            "role": self.cfg.splitwise_role,
            "running": load.running,
            "waiting": load.waiting,
            "free_blocks": load.free_blocks,
            "total_blocks": load.total_blocks,
            "reserved_blocks": load.reserved_blocks,
            "steps": e.steps,
            "steps_ahead": e.steps_ahead,
            "tokens_generated": e.tokens_generated,
            "prompt_tokens": e.prompt_tokens_computed,
            "preemptions": e.scheduler.num_preemptions,
            **e.prefix_cache.stats(),
            **self.counters,
        }

    # ----------------------------------------------------------------- engine events (loop thread)
    def on_engine_tokens(self, items: list[TokenOut]) -> None:
        self._bus_send(Tokens(items=items))

    def on_engine_prefilled(self, req_id: str, first: TokenOut, nbytes: int, seconds: float) -> None:
        self.counters["transfer_bytes"] += nbytes
        self.counters["transfer_seconds"] += seconds
        self.counters["prefilled"] += 1
        started = self.prefill_started.pop(req_id, None)
        log.info(
            "req %s prefilled in %.1f ms, KV %.2f MiB in %.1f ms",
            req_id,
            (time.monotonic() - started) * 1e3 if started else -1,
            nbytes / 2**20,
            seconds * 1e3,
        )
        self._bus_send(Prefilled(req_id=req_id, first=first, transfer_bytes=nbytes, transfer_s=seconds))

    def on_engine_failed(self, req_id: str, error: str, retryable: bool) -> None:
        self.counters["failed"] += 1
        self.prefill_started.pop(req_id, None)
        log.warning("req %s failed: %s", req_id, error)
        self._bus_send(Failed(req_id=req_id, error=error, retryable=retryable))

    def on_engine_reserved(self, req_id: str, block_ids, reason: str, cached_blocks: int = 0) -> None:
        if block_ids is None:
            self._bus_send(Busy(req_id=req_id, reason=reason))
        else:
            self._bus_send(Reserved(req_id=req_id, block_ids=block_ids, cached_blocks=cached_blocks))

    def _bus_send(self, msg) -> None:
        if self.bus is None:
            return
        try:
            self.bus.send(msg)
        except BusError as exc:
            log.warning("bus send of %s failed: %s", type(msg).__name__, exc)

    def _die(self, why: str) -> None:
        log.error("stopping %s: %s", self.instance_id, why)
        self._exit_code = 1
        self._stop.set()

    def refused(self, reason: str) -> None:
        log.error("stopping: the router refused this instance: %s", reason)
        self._exit_code = 3
        self._stop.set()

    # ----------------------------------------------------------------- HTTP
    async def handle_health(self, request: web.Request) -> web.Response:
        ok = self.engine is not None and (self.bus is None or self.bus.registered.is_set())
        body = {"status": "ok" if ok else "starting", "role": self.cfg.splitwise_role, "instance": self.instance_id}
        return web.json_response(body, status=200 if ok else 503)

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    def build_app(self) -> web.Application:
        from actors.frontend.metrics import instance_metrics_handler

        app = web.Application()
        app.router.add_get("/metrics", instance_metrics_handler(self.stats, self.cfg.splitwise_role))
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/stats", self.handle_stats)
        return app

    # ----------------------------------------------------------------- run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.rank = rank = load_rank(self.cfg)
        from actors.engine.grammar import Grammars
        from native.sampler import Sampler

        def die(why: str) -> None:  # from the engine thread or a TP group's watcher
            loop.call_soon_threadsafe(self._die, why)

        self.engine = Engine(
            rank.runner,
            Sampler(),
            _LoopEvents(loop, self),
            EngineLimits(
                max_num_seqs=self.cfg.max_num_seqs,
                max_num_batched_tokens=self.cfg.max_num_batched_tokens,
                max_model_len=self.cfg.max_model_len,
                transfer_timeout_s=envs.PDBUS_TRANSFER_TIMEOUT_S,
                # on the CPU the host is the device: nothing to overlap
                async_scheduling=rank.device.type == "cuda" and not self.cfg.no_async_scheduling,
                enable_prefix_caching=self.cfg.enable_prefix_caching,
            ),
            rank.eos_ids,
            role=self.cfg.splitwise_role,
            transfer_engines=rank.transfers,
            name=f"engine.{self.cfg.splitwise_role}",
            lockstep=rank.lockstep,
            on_fatal=die,
            cache_key=rank.prefix_cache_key(),
            grammars=Grammars(rank.tokenizer, rank.eos_ids) if rank.tokenizer else None,
        )
        self.engine.start()
        if rank.tp_group is not None:
            rank.tp_group.on_dead = die
        runner = web.AppRunner(self.build_app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.host, self.cfg.port, reuse_address=True)
        await site.start()
        log.info("%s serving HTTP on %s:%d", self.instance_id, self.cfg.host, self.cfg.port)
        if self.cfg.router:  # always (validate): mixed without one is started by serve_with_router
            endpoint, interval = await self._discover_bus()
            from pdbus.security import client_curve_keys

            self.bus = RankBus(
                self,
                endpoint,
                identity=self.instance_id,
                hello=self.hello,
                files=self.tokenizer_files,
                load=lambda: self.engine.load(),
                heartbeat_interval=interval,
                curve_client=client_curve_keys(self.cfg.bus_key_file),
            )
            self.bus.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._stop.set)
        print(f"READY {self.instance_id} http://{self.cfg.host}:{self.cfg.port}", flush=True)
        await self._stop.wait()
        log.info("%s shutting down", self.instance_id)
        if self.bus is not None:
            await self.bus.close()
        await runner.cleanup()
        self.engine.stop()
        rank.close(clean=self.engine.fatal is None)
        return self._exit_code

    async def _discover_bus(self) -> tuple[str, float]:
        url = f"http://{self.cfg.router}/bus"
        deadline = time.monotonic() + 120
        last = ""
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                body = await asyncio.to_thread(_http_get_json, url)
                return body["endpoint"], float(body.get("heartbeat_interval", self.cfg.heartbeat_interval))
            except Exception as exc:  # router not up yet
                if str(exc) != last:
                    log.info("waiting for router at %s: %s", url, exc)
                    last = str(exc)
                await asyncio.sleep(0.5)
        raise RuntimeError(f"router at {url} not reachable within 120s")


def _http_get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def serve(cfg: ServeConfig) -> int:
    from pdbus.log import setup_logging

    setup_logging()
    tune_cpu_runtime()
    torch.set_num_threads(envs.PDBUS_TORCH_THREADS)
    server = RankServer(cfg)
    try:
        code = asyncio.run(server.run())
    except KeyboardInterrupt:
        return 0
    rank = server.rank
    if rank is not None and rank.lockstep:
        # process groups: a broken collective may leave the engine thread stuck in C code, and gloo
        # threads still referenced at interpreter teardown can abort the process: leave now
        logging.shutdown()
        dead = rank.tp_group is not None and rank.tp_group.dead
        os._exit((code or 1) if dead else code)
    return code
