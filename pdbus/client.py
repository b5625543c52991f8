"""Bus clients: submit requests to the router over ZeroMQ and read the token stream, no HTTP.

Python API::

    async with BusClient("127.0.0.1:8109") as client:
        async for chunk in client.generate("Hello", max_tokens=32):
            print(chunk.text, end="", flush=True)

``BusClient.from_router`` asks the router's HTTP port for the bus endpoint (``GET /bus``).
The client registers with a ``Hello`` (role ``client``) like any bus member, so the router
sees it go if it dies, and aborts its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import urllib.request
import uuid

from pdbus.actor import BusMember
from pdbus.messages import PROTOCOL_VERSION, Abort, Generate, Hello, Role, SamplingParams, TextOut
from pdbus.security import client_curve_keys
from pdbus.sockets import BusError


class BusClient(BusMember):
    name = "client"

    def __init__(self, router: str, bus_key_file: str | None = None, timeout: float = 30.0):
        self.router = router
        self.timeout = timeout
        info = _get_json(f"http://{router}/bus", timeout)
        self.streams: dict[str, asyncio.Queue] = {}
        ident = f"client-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        super().__init__(
            info["endpoint"],
            identity=ident,
            hello=lambda: Hello(
                protocol=PROTOCOL_VERSION,
                instance_id=ident,
                role=Role.CLIENT,
                host="",
                http_port=0,
                model="",
                config_hash="",
                pid=os.getpid(),
            ),
            heartbeat_interval=float(info.get("heartbeat_interval", 1.0)),
            curve_client=client_curve_keys(bus_key_file),
        )

    async def __aenter__(self) -> BusClient:
        self.start()
        await self.wait_registered(self.timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def on_text(self, peer, msg: TextOut, frames) -> None:
        q = self.streams.get(msg.req_id)
        if q is not None:
            q.put_nowait(msg)

    async def generate(
        self,
        prompt: str | list[int] | None = None,
        *,
        messages: list[dict] | None = None,
        timeout: float = 300.0,
        **sampling,
    ):
        """Yield ``TextOut`` chunks until one carries a finish reason."""
        req_id = uuid.uuid4().hex[:16]
        q: asyncio.Queue = asyncio.Queue()
        self.streams[req_id] = q
        msg = Generate(req_id=req_id, sampling=SamplingParams(**sampling))
        if isinstance(prompt, list):
            msg.prompt_token_ids = prompt
        elif messages is not None:
            msg.messages = messages
        else:
            msg.prompt = prompt or ""
        done = False
        try:
            self.send(msg)
            while True:
                chunk: TextOut = await asyncio.wait_for(q.get(), timeout)
                yield chunk
                if chunk.finish_reason is not None:
                    done = True
                    return
        finally:
            self.streams.pop(req_id, None)
            if not done and self.sock is not None:
                with contextlib.suppress(BusError):
                    self.send(Abort(req_id=req_id, reason="client stopped reading"))


def _get_json(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


async def _main(args) -> int:
    import sys

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        sampling["seed"] = args.seed
    async with BusClient(args.router, bus_key_file=args.bus_key_file) as client:
        kwargs = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {}
        prompt = None if args.chat else args.prompt
        if args.token_ids:
            prompt = [int(t) for t in args.prompt.split(",")]
        async for chunk in client.generate(prompt, **kwargs, **sampling):
            if chunk.error:
                print(f"\nerror: {chunk.error}", file=sys.stderr)
                return 1
            if args.token_ids:
                print(" ".join(map(str, chunk.token_ids)), end=" ", flush=True)
            else:
                print(chunk.text, end="", flush=True)
        print()
    return 0


def add_client_args(p) -> None:
    p.add_argument("prompt", help="the prompt (text, or comma-separated ids with --token-ids)")
    p.add_argument("--router", default="127.0.0.1:8109", help="router HOST:PORT (HTTP port)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message (chat template)")
    p.add_argument("--token-ids", action="store_true", help="prompt is token ids; print token ids")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--bus-key-file", default=None)


def run_client(args) -> int:
    return asyncio.run(_main(args))
