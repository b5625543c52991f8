"""The router process: the one OpenAI frontend, in front of a registry of prefill, decode and
mixed instances (vLLM's API server; the rank servers are its engine cores).

HTTP (aiohttp, ``--port``): ``/v1/*`` and ``/metrics`` (``OpenAIServer``'s route table, API-key
check and error body; this server is its backend, over ``PDBackend``), ``/bus`` (where instances
connect), ``/instances`` (registry), ``/health`` (200 only while a prefill + decode pair or a
mixed instance is alive), ``/stats`` (the router's counters; with one mixed instance as all it
serves — ``pdbus serve`` without ``--router`` — that instance's ``/stats``).
Bus (ZeroMQ ROUTER on a second port, zmq.asyncio in the same event loop): registration,
heartbeats, the request flow (pd.py: PD pairs, or a mixed instance), and bus clients
(``Generate`` -> ``TextOut`` stream, prepared and detokenized by the same frontend code as HTTP).

The router is started without a model: the first instance that registers brings the tokenizer
files and the model identity; an instance whose model or KV layout differs is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid

import zmq.asyncio
from aiohttp import web

from actors.frontend import protocol as P
from actors.frontend.metrics import Total
from actors.frontend.server import BackendUnavailable, OpenAIServer, RequestRejected, RequestTimedOut
from actors.router.cache_index import Routing
from actors.router.pd import PDBackend
from pdbus.actor import BusServer, Peer
from pdbus.config import RouterConfig
from pdbus.log import get_logger
from pdbus.messages import Busy, Failed, Generate, Hello, Prefilled, Reserved, Role, TextOut, Tokens
from pdbus.security import server_secret
from pdbus.sockets import BusError

log = get_logger("router")


def _layout_key(hello: Hello):
    kv = hello.kv
    if kv is None:
        return None
    return (kv.num_layers, kv.block_size, kv.head_dim, kv.dtype, kv.total_kv_heads or kv.num_kv_heads)


class RouterBus(BusServer):
    name = "router.bus"

    def __init__(self, router: RouterServer, **kw):
        self.router = router
        super().__init__(**kw)

    def peer_name(self, ident: bytes) -> str:
        peer = self.peers.get(ident)
        return peer.name if peer else ident.decode(errors="replace")

    def accept(self, peer: bytes, hello: Hello, files: dict[str, bytes]) -> str | None:
        if hello.role == "client":
            return None
        if hello.role not in (Role.PREFILL, Role.DECODE, Role.MIXED):
            return f"role {hello.role!r} cannot join a router (use prefill, decode or mixed)"
        for other in self.peers.values():
            if other.identity == peer or not other.alive or other.hello.role == "client":
                continue
            if (other.hello.model, other.hello.config_hash) != (hello.model, hello.config_hash):
                return (
                    f"model {hello.model} ({hello.config_hash}) differs from {other.name}'s "
                    f"{other.hello.model} ({other.hello.config_hash})"
                )
            if Role.MIXED in (hello.role, other.hello.role):
                continue  # a mixed instance's KV never crosses to another instance
            if _layout_key(other.hello) != _layout_key(hello):
                return f"KV layout {_layout_key(hello)} differs from {other.name}'s {_layout_key(other.hello)}"
        return None

    def peer_joined(self, peer: Peer) -> None:
        if peer.hello.role != "client":
            self.router.instance_joined(peer)

    def peer_lost(self, peer: Peer, reason: str) -> None:
        self.router.pd.on_instance_lost(peer, reason)
        self.router.client_lost(peer)

    # ----- PD flow
    def on_reserved(self, ident, msg: Reserved, frames):
        self.router.pd.on_reserve_answer(ident, msg.req_id, msg.block_ids, "", msg.cached_blocks)

    def on_busy(self, ident, msg: Busy, frames):
        self.router.pd.on_reserve_answer(ident, msg.req_id, None, msg.reason)

    def on_prefilled(self, ident, msg: Prefilled, frames):
        self.router.pd.on_prefill_end(ident, msg)

    def on_failed(self, ident, msg: Failed, frames):
        peer = self.peers.get(ident)
        if peer is not None and peer.hello.role == "prefill":
            self.router.pd.on_prefill_end(ident, msg)
        else:
            self.router.pd.on_decode_failed(ident, msg)

    def on_tokens(self, ident, msg: Tokens, frames):
        self.router.pd.on_tokens(ident, msg.items)

    # ----- bus clients
    def on_generate(self, ident, msg: Generate, frames):
        self.router.client_generate(ident, msg)

    def on_abort(self, ident, msg, frames):
        self.router.client_abort(ident, msg.req_id)


class RouterServer:
    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.router_id = f"router-{uuid.uuid4().hex[:8]}"
        ctx = zmq.asyncio.Context.instance()
        self._auth = None
        if cfg.bus_key_file:
            from pdbus.security import start_authenticator

            # ZAP first: the bus socket must never accept a peer before the key check is in place
            self._auth = start_authenticator(ctx, cfg.bus_key_file)
        self.bus = RouterBus(
            self,
            ctx=ctx,
            host=cfg.host,
            port=cfg.bus_port,
            heartbeat_interval=cfg.heartbeat_interval,
            router_id=self.router_id,
            curve_secret_key=server_secret(cfg.bus_key_file),
        )
        routing = Routing(cfg.router_policy, cfg.balance_abs_threshold, cfg.balance_rel_threshold)
        self.pd = PDBackend(self.bus, cfg.reserve_timeout_s, cfg.request_timeout_s, cfg.max_retries, routing=routing)
        # this server is the frontend's backend (ready, stats, generate); the model, its limits
        # and the tokenizer come with the first instance that registers
        self.frontend = OpenAIServer(
            self,
            api_key=cfg.api_key,
            default_seed=cfg.seed,
            tool_call_parser=cfg.tool_call_parser,
            reasoning_parser=cfg.reasoning_parser,
        )
        self._http = None  # aiohttp.ClientSession for a sole mixed instance's /stats
        self.client_tasks: dict[tuple[bytes, str], asyncio.Task] = {}
        self._stop = asyncio.Event()

    # ----------------------------------------------------------------- registry
    def instance_joined(self, peer: Peer) -> None:
        hello = peer.hello
        self.pd.routing.forget(peer.identity)  # a new Hello: what its cache held is unknown
        if self.frontend.model_name is None:
            tokenizer = None
            if peer.files:
                from actors.frontend.tokenizer import Tokenizer

                try:
                    tokenizer = Tokenizer.from_files(peer.files)
                except Exception as exc:
                    log.warning("tokenizer from %s unusable: %s", peer.name, exc)
            self.frontend.tokenizer = tokenizer
            self.frontend.max_model_len = hello.max_model_len
            self.frontend.model_name = hello.model
            self.frontend.vocab_size = hello.vocab_size or None
            log.info(
                "serving model %s (max_model_len %d, vocab_size %s, tokenizer %s)",
                hello.model,
                hello.max_model_len,
                hello.vocab_size or "unknown",
                "yes" if tokenizer else "no",
            )
        else:
            self.frontend.max_model_len = min(self.frontend.max_model_len, hello.max_model_len)
            if self.frontend.vocab_size is None and hello.vocab_size:
                self.frontend.vocab_size = hello.vocab_size
            if self.frontend.tokenizer is None and peer.files:
                from actors.frontend.tokenizer import Tokenizer

                with contextlib.suppress(Exception):
                    self.frontend.tokenizer = Tokenizer.from_files(peer.files)

    def instances(self) -> list[dict]:
        now = time.monotonic()
        out = []
        for peer in self.bus.peers.values():
            h = peer.hello
            if h.role == "client":
                continue
            out.append(
                {
                    "id": h.instance_id,
                    "role": h.role,
                    "host": h.host,
                    "http_port": h.http_port,
                    "pid": h.pid,
                    "alive": peer.alive,
                    "last_seen_s": round(now - peer.last_seen, 3),
                    "model": h.model,
                    "dp_rank": h.dp_rank,
                    "dp_size": h.dp_size,
                    "tp_size": h.tp_size,
                    "protocols": list(h.transfer),
                    "kv": None
                    if h.kv is None
                    else {"num_blocks": h.kv.num_blocks, "block_size": h.kv.block_size, "kv_heads": h.kv.num_kv_heads, "dtype": h.kv.dtype},
                    "load": {
                        "free_blocks": peer.load.free_blocks,
                        "total_blocks": peer.load.total_blocks,
                        "running": peer.load.running,
                        "waiting": peer.load.waiting,
                        "pending_prefill_tokens": peer.load.pending_prefill_tokens,
                        "reserved_blocks": peer.load.reserved_blocks,
                        "prefix_cache_queries": peer.load.prefix_cache_queries,
                        "prefix_cache_hits": peer.load.prefix_cache_hits,
                        "prefix_cache_blocks_reused": peer.load.prefix_cache_blocks_reused,
                    },
                }
            )
        return out

    @property
    def model_name(self) -> str | None:
        return self.frontend.model_name

    # ----------------------------------------------------------------- the frontend's backend
    def ready(self) -> bool:
        return self.pd.ready()

    def generate(self, req_id: str, prompt_ids: list[int], sampling):
        return self.pd.submit(req_id, prompt_ids, sampling)

    def stats(self) -> dict:
        per = {}
        totals = dict.fromkeys(("free_blocks", "total_blocks", "running", "waiting"), 0)
        insts = self.instances()
        for inst in insts:
            per[inst["id"]] = dict(inst["load"], alive=int(inst["alive"]))
            if inst["alive"] and inst["role"] in (Role.DECODE, Role.MIXED):  # where sequences live
                for key in totals:
                    totals[key] += inst["load"][key]
        roles = [i["role"] for i in insts if i["alive"]]
        counts = {f"{r}_instances": roles.count(r) for r in (Role.PREFILL, Role.DECODE, Role.MIXED)}
        return dict(self.pd.stats(), **counts, **totals, **per)

    def totals(self) -> list[Total]:
        """The router's running totals for /metrics: routing decisions, KV bytes sent and not sent
        (decode-side prefix reuse), and each instance's prefix-cache tokens looked up / found."""
        pd, policy = self.pd, self.pd.routing.policy.value
        out = [
            Total("router_decisions", "Instances chosen, by role, policy and reason", {"role": role, "policy": policy, "reason": why}, n)
            for (role, why), n in sorted(pd.routing.decisions.items())
        ]
        out.append(Total("kv_transfer_bytes", "KV bytes the prefills sent to decodes", {}, pd.counters["transfer_bytes"]))
        saved = pd.counters["transfer_bytes_saved"]
        out.append(Total("kv_transfer_bytes_saved", "KV bytes not sent: the decode's prefix cache held them", {}, saved))
        for peer in self.bus.peers.values():
            if peer.alive and peer.hello.role != "client":
                inst = {"instance": peer.name, "role": peer.hello.role}
                out.append(Total("prefix_cache_queries", "Tokens looked up in the prefix cache", inst, peer.load.prefix_cache_queries))
                out.append(Total("prefix_cache_hits", "Tokens found in the prefix cache", inst, peer.load.prefix_cache_hits))
                out.append(Total(
                    "prefix_cache_blocks_reused", "KV blocks taken from the prefix cache", inst, peer.load.prefix_cache_blocks_reused
                ))  # fmt: skip
        return out

    # ----------------------------------------------------------------- HTTP
    async def handle_bus(self, request: web.Request) -> web.Response:
        # "curve": the bus speaks CurveZMQ only; an instance without --bus-key-file cannot join
        return web.json_response({"endpoint": self.bus.endpoint, "heartbeat_interval": self.cfg.heartbeat_interval, "router_id": self.router_id, "curve": bool(self.cfg.bus_key_file)})

    async def handle_instances(self, request: web.Request) -> web.Response:
        return web.json_response({"instances": self.instances()})

    async def handle_health(self, request: web.Request) -> web.Response:
        ok = self.pd.ready()
        body = {"status": "ok" if ok else "waiting for instances", "prefill": 0, "decode": 0, "mixed": 0}
        for inst in self.instances():
            if inst["alive"]:
                body[inst["role"]] = body.get(inst["role"], 0) + 1
        return web.json_response(body, status=200 if ok else 503)

    async def handle_stats(self, request: web.Request) -> web.Response:
        insts = [i for i in self.instances() if i["alive"]]
        if len(insts) == 1 and insts[0]["role"] == Role.MIXED:
            # the one-command mixed server: answer with its engine's figures, as it did itself
            import aiohttp

            if self._http is None:
                self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
            url = f"http://{insts[0]['host']}:{insts[0]['http_port']}/stats"
            try:
                async with self._http.get(url) as resp:
                    return web.json_response(await resp.json(), status=resp.status)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("stats of %s at %s: %s", insts[0]["id"], url, exc)
                body = P.error_body(f"instance {insts[0]['id']} did not answer /stats: {exc}", "service_unavailable_error")
                return web.json_response(body, status=503, headers={"Retry-After": "1"})
        return web.json_response(self.stats())

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=int(self.cfg.max_body_mb * (1 << 20)))
        self.frontend.add_routes(app)  # /v1/*, /metrics, the API key, the error body
        app.router.add_get("/bus", self.handle_bus)
        app.router.add_get("/instances", self.handle_instances)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/stats", self.handle_stats)
        return app

    # ----------------------------------------------------------------- bus clients
    def client_generate(self, ident: bytes, msg: Generate) -> None:
        key = (ident, msg.req_id)
        if key in self.client_tasks:
            self._client_send(ident, TextOut(req_id=msg.req_id, text="", token_ids=[], finish_reason="error", error="duplicate req_id"))
            return
        task = asyncio.get_running_loop().create_task(self._client_run(ident, msg))
        self.client_tasks[key] = task
        task.add_done_callback(lambda _t: self.client_tasks.pop(key, None))

    def client_abort(self, ident: bytes, req_id: str) -> None:
        task = self.client_tasks.get((ident, req_id))
        if task is not None:
            task.cancel()

    def client_lost(self, peer: Peer) -> None:
        for (ident, _), task in list(self.client_tasks.items()):
            if ident == peer.identity:
                task.cancel()

    def _client_send(self, ident: bytes, msg: TextOut) -> None:
        try:
            self.bus.send(ident, msg)
        except BusError as exc:
            log.warning("bus client %s unreachable: %s", ident.decode(errors="replace"), exc)

    async def _client_run(self, ident: bytes, msg: Generate) -> None:
        fe = self.frontend
        sub_id = f"bus-{msg.req_id}-{uuid.uuid4().hex[:6]}"

        def fail(error: str) -> None:
            self._client_send(ident, TextOut(req_id=msg.req_id, text="", token_ids=[], finish_reason="error", error=error))

        if fe.model_name is None:
            return fail("no instance has registered yet")
        try:  # the HTTP requests' checks, before anything is reserved
            req, prompt_ids = fe.prepare(*P.generate_body(msg))
        except P.OpenAIError as exc:
            log.info("bus req %s refused: %s", msg.req_id, exc.message)
            return fail(exc.message)
        text = fe.text_stream(req, prompt_ids)  # the HTTP path's detokenizer + stop strings
        gen = self.generate(sub_id, prompt_ids, req.sampling)
        try:
            async for item in gen:
                delta = text.add(item.token_ids)
                if item.finish_reason is not None:
                    delta += text.finish()
                self._client_send(
                    ident,
                    TextOut(
                        req_id=msg.req_id,
                        text=delta,
                        token_ids=list(item.token_ids),
                        finish_reason=item.finish_reason,
                        error=item.error,
                        prompt_tokens=len(prompt_ids),
                    ),
                )
                if item.finish_reason is not None:
                    break
        except (BackendUnavailable, RequestRejected, RequestTimedOut) as exc:
            fail(str(exc))
        finally:
            await gen.aclose()

    # ----------------------------------------------------------------- run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.bus.start()
        watcher = None
        if self.cfg.bus_key_file:
            from pdbus.security import log_refused_handshakes

            watcher = loop.create_task(log_refused_handshakes(self.bus.sock))
        runner = web.AppRunner(self.build_app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.host, self.cfg.port, reuse_address=True)
        await site.start()
        log.info("router %s: HTTP on %s:%d, bus on %s", self.router_id, self.cfg.host, self.cfg.port, self.bus.endpoint)
        print(f"READY router http://{self.cfg.host}:{self.cfg.port} bus {self.bus.endpoint}", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        log.info("router shutting down")
        for task in list(self.client_tasks.values()):
            task.cancel()
        await runner.cleanup()
        if self._http is not None:
            await self._http.close()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self.bus.close()
        if self._auth is not None:
            self._auth.stop()
        return 0


def serve_router(cfg: RouterConfig) -> int:
    from pdbus.log import setup_logging

    setup_logging()
    async def main() -> int:
        return await RouterServer(cfg).run()  # built inside the loop (the ZAP handler needs it)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0
