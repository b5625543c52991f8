"""The OpenAI HTTP API: the router's frontend, the one process that speaks it.

``OpenAIServer`` owns the route table of ``/v1/*`` and ``/metrics``, the API-key check and the
error body (``protocol.error_body``, for every status, 5xx included). It validates
(protocol.py), prepares a request (``prepare``: seed, chat template, tokenization, limits — the
one path, shared with the router's bus clients), asks its *backend* for token streams and turns
them into OpenAI responses (JSON or SSE) through one ``TextStream`` per sequence (incremental
detokenizer + stop strings, also the bus clients'). A backend is anything with::

    ready() -> bool
    stats() -> dict
    async generate(req_id, prompt_token_ids, sampling) -> async iterator of TokenOut

Closing the iterator early (client gone, stop string) aborts the request in the backend.
A backend raises ``BackendUnavailable`` for 503 + Retry-After. A client that disconnects
cancels the handler (aiohttp ``handler_cancellation``), which closes the iterators.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field

import msgspec
from aiohttp import web

from actors.frontend import protocol as P
from actors.frontend.metrics import FrontendMetrics
from actors.frontend.tokenizer import IncrementalDetokenizer, TokenizerError
from pdbus.log import get_logger
from pdbus.messages import SamplingParams, TokenOut

log = get_logger("api")


class BackendUnavailable(Exception):
    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class RequestRejected(Exception):
    """The backend refused the request for good (HTTP 400)."""


class RequestTimedOut(Exception):
    """An instance stayed silent past the request timeout (HTTP 504)."""


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None):
    return web.json_response(P.error_body(message, type_, param, code), status=status, headers=headers)


def _sse_error(message: str, type_: str, code=None) -> bytes:
    return P.sse(P.error_body(message, type_, None, code))


class TextStream:
    """One sequence's text: the incremental detokenizer (never half a UTF-8 character) and the
    stop strings. HTTP choices and bus clients both turn tokens into text through it."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop=(), include_stop: bool = False, skip_special_tokens: bool = True):
        self.detok = (
            IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens) if tokenizer is not None else None
        )
        self.stop = P.StopChecker(stop, include_stop=include_stop)

    @property
    def stopped(self) -> bool:
        """A stop string ended the text."""
        return self.stop.stopped

    def add(self, ids: list[int]) -> str:
        """The text that ``ids`` add and that is safe to emit (``stopped`` tells if a stop string hit)."""
        if self.detok is None or not ids:
            return ""
        return self.stop.feed(self.detok.add(ids))[0]

    def finish(self) -> str:
        """The held-back rest, once the sequence ended for another reason than a stop string."""
        if self.detok is None or self.stop.stopped:
            return ""
        tail, stopped = self.stop.feed(self.detok.flush())
        return tail + ("" if stopped else self.stop.flush())


@dataclass
class ChoiceState:
    index: int
    stream: TextStream
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list] = field(default_factory=list)
    error: str | None = None


class OpenAIServer:
    def __init__(
        self,
        backend,
        tokenizer=None,
        model_name: str | None = None,
        max_model_len: int = 0,
        api_key: str | None = None,
        eos_token_ids: set[int] | None = None,
        vocab_size: int | None = None,
        default_seed: int | None = None,
    ):
        self.backend = backend
        # model_name None: nothing to serve yet (the router before its first instance registers)
        self.default_seed = default_seed  # --seed: the seed of requests that give none
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.vocab_size = vocab_size
        self.metrics = FrontendMetrics()

    # ----------------------------------------------------------------- routes
    def add_routes(self, app: web.Application) -> None:
        """The one route table of the OpenAI API (the router adds only its own /bus, /instances,
        /health, /stats), guarded by the one middleware: API key, then errors in OpenAI's shape."""
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.handle_metrics)
        app.middlewares.append(self._guard)

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        api = request.path.startswith("/v1/")
        if api and self.api_key and request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            return _error(401, "Invalid or missing API key.", "authentication_error", code="invalid_api_key")
        if api and self.model_name is None:
            return _error(503, "No instance has registered yet.", "service_unavailable_error", headers={"Retry-After": "1"})
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge as exc:
            return _error(413, f"Request body too large: {exc.text}", code="request_too_large")
        except web.HTTPException as exc:
            if exc.status >= 400:
                type_ = "invalid_request_error" if exc.status < 500 else "server_error"
                return _error(exc.status, exc.reason or "error", type_, headers={k: v for k, v in exc.headers.items() if k == "Allow"})
            raise
        except ConnectionResetError:
            raise
        except Exception as exc:  # a bug, not the client's doing: still an answer in OpenAI's shape
            log.exception("%s %s: internal error: %s", request.method, request.path, exc)
            return _error(500, f"Internal server error: {type(exc).__name__}", "server_error")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "pdbus",
                        "max_model_len": self.max_model_len,
                    }
                ],
            }
        )

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body, ctype = self.metrics.render(self.backend.stats())
        return web.Response(body=body, headers={"Content-Type": ctype})

    def seeded(self, sampling: SamplingParams) -> SamplingParams:
        """``sampling`` with the server's ``--seed`` where the request gave none. Resolved here,
        where the request is prepared, so that a prefill and its decode draw alike (PD = mixed)."""
        if sampling.seed is not None or self.default_seed is None:
            return sampling
        return msgspec.structs.replace(sampling, seed=self.default_seed)

    def prepare(self, req) -> list[int]:
        """The one preparation path of a parsed request (HTTP body or bus client): the server's
        ``--seed`` where it gave none, the chat template and tokenization, the context limits
        (``req.sampling.max_tokens`` resolved). Returns the prompt's token ids; ``OpenAIError``."""
        req.sampling = self.seeded(req.sampling)
        prompt_ids = self._prompt_ids(req)
        if not prompt_ids:
            raise P.OpenAIError("The prompt is empty.", param="messages" if isinstance(req, P.ChatRequest) else "prompt")
        P.resolve_max_tokens(req, len(prompt_ids), self.max_model_len)
        return prompt_ids

    def text_stream(self, req, prompt_ids: list[int]) -> TextStream:
        return TextStream(
            self.tokenizer, prompt_ids, req.stop, include_stop=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens
        )

    # ----------------------------------------------------------------- parsing
    async def _json(self, request: web.Request):
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise P.OpenAIError(f"Request body is not valid JSON: {exc}") from None

    def _prompt_ids(self, req) -> list[int]:
        if isinstance(req, P.ChatRequest):
            if self.tokenizer is None:
                raise P.OpenAIError("Chat needs a tokenizer, and this server has none (--skip-tokenizer-init).")
            kwargs = {"add_generation_prompt": req.add_generation_prompt, **req.chat_template_kwargs}
            try:
                text = self.tokenizer.apply_chat_template(req.messages, **kwargs)
            except TokenizerError as exc:  # the template refused these messages or keyword arguments
                raise P.OpenAIError(str(exc), param="messages") from None
            return self.tokenizer.encode(text)
        if req.prompt_token_ids is not None:
            if self.vocab_size is not None and any(t >= self.vocab_size for t in req.prompt_token_ids):
                raise P.OpenAIError(f"'prompt' holds a token id outside the vocabulary ({self.vocab_size}).", param="prompt")
            return list(req.prompt_token_ids)
        if self.tokenizer is None:
            raise P.OpenAIError(
                "Text prompts need a tokenizer, and this server has none: send 'prompt' as a list of token ids.",
                param="prompt",
            )
        return self.tokenizer.encode(req.prompt)

    # ----------------------------------------------------------------- handlers
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        t0 = time.monotonic()
        try:
            body = await self._json(request)
            parse = P.parse_chat_request if chat else P.parse_completion_request
            kwargs = {"model_names": [self.model_name], "max_model_len": self.max_model_len}
            if not chat:
                kwargs["vocab_size"] = self.vocab_size
            req = parse(body, **kwargs)
            prompt_ids = self.prepare(req)
        except P.OpenAIError as exc:
            self.metrics.rejected.inc()
            return web.json_response(exc.to_dict(), status=exc.status)
        if not self.backend.ready():
            return _error(503, "No instance is ready to serve.", "service_unavailable_error", headers={"Retry-After": "1"})
        req_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.ignored_fields:
            log.info("req %s: ignoring unknown fields %s", req_id, ",".join(req.ignored_fields))
        self.metrics.requests.inc()
        self.metrics.prompt_tokens.inc(len(prompt_ids) * req.n)
        run = _Run(self, req, req_id, prompt_ids, chat, t0)
        if req.stream:
            return await run.stream(request)
        return await run.complete()


class _Run:
    """One HTTP request: n choices, each a backend stream."""

    def __init__(self, server: OpenAIServer, req, req_id: str, prompt_ids: list[int], chat: bool, t0: float):
        self.s = server
        self.req = req
        self.req_id = req_id
        self.prompt_ids = prompt_ids
        self.chat = chat
        self.t0 = t0
        self.created = int(time.time())
        self.choices = [ChoiceState(i, server.text_stream(req, prompt_ids)) for i in range(req.n)]
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def _want_logprobs(self) -> bool:
        return (self.req.logprobs if self.chat else self.req.logprobs is not None) or False

    # ------------------------------------------------------------- per-token processing
    def _absorb(self, c: ChoiceState, item: TokenOut) -> tuple[str, list[int]]:
        """Apply one TokenOut to a choice; return (text delta, new token ids)."""
        now = time.monotonic()
        if self.first_token_at is None and item.token_ids:
            self.first_token_at = now
            self.s.metrics.ttft.observe(now - self.t0)
        elif item.token_ids and self.last_token_at is not None:
            self.s.metrics.itl.observe(now - self.last_token_at)
        if item.token_ids:
            self.last_token_at = now
        ids = list(item.token_ids)
        c.token_ids.extend(ids)
        if item.logprobs:
            c.logprobs.extend(item.logprobs)
            c.top_logprobs.extend(item.top_logprobs or [[] for _ in item.logprobs])
        text = c.stream.add(ids)
        if c.stream.stopped:
            c.finish_reason = "stop"
        if item.error:
            c.error = item.error
            c.finish_reason = c.finish_reason or "error"
        elif item.finish_reason and c.finish_reason is None:
            c.finish_reason = "stop" if item.finish_reason == "stop" else item.finish_reason
        if c.finish_reason is not None:
            text += c.stream.finish()
        c.text += text
        return text, ids

    async def _drive(self, c: ChoiceState, sink) -> None:
        """Iterate one choice's backend stream, feeding ``sink(choice, text, ids, item)``."""
        sampling = P.choice_sampling(self.req, c.index)
        sub_id = self.req_id if self.req.n == 1 else f"{self.req_id}-{c.index}"
        gen = self.s.backend.generate(sub_id, self.prompt_ids, sampling)
        try:
            async for item in gen:
                text, ids = self._absorb(c, item)
                await sink(c, text, ids, item)
                if c.finish_reason is not None:
                    break
        finally:
            await gen.aclose()
        if c.finish_reason is None:
            c.finish_reason = "error"
            c.error = c.error or "stream ended without a finish reason"

    def _logprobs_obj(self, c: ChoiceState, start: int, end: int | None = None):
        if not self._want_logprobs():
            return None
        tok = self.s.tokenizer

        def piece(t: int) -> str:  # without a tokenizer (token-id prompts), tokens are named by id
            return tok.decode([t], skip_special_tokens=False) if tok is not None else f"token_id:{t}"

        ids = c.token_ids[start:end]
        lps = c.logprobs[start:end]
        if len(lps) != len(ids):
            return None
        pieces = [piece(t) for t in ids]
        tops = [[(piece(t.token_id), t.logprob) for t in row] for row in c.top_logprobs[start:end]]
        if self.chat:
            return P.chat_logprobs(pieces, lps, tops)
        return P.completion_logprobs(pieces, lps, tops if self.req.logprobs else None)

    def _usage(self) -> dict:
        return P.usage(len(self.prompt_ids) * 1, sum(len(c.token_ids) for c in self.choices))

    def _finish_metrics(self) -> None:
        m = self.s.metrics
        m.e2e.observe(time.monotonic() - self.t0)
        n_out = sum(len(c.token_ids) for c in self.choices)
        m.generation_tokens.inc(n_out)
        if self.first_token_at is not None and n_out > 1 and self.last_token_at is not None:
            m.tpot.observe((self.last_token_at - self.first_token_at) / max(1, n_out / len(self.choices) - 1))
        for c in self.choices:
            m.finished.labels(finish_reason=c.finish_reason or "error").inc()

    # ------------------------------------------------------------- non-streaming
    async def complete(self) -> web.Response:
        async def sink(c, text, ids, item):
            return None

        try:
            await asyncio.gather(*(self._drive(c, sink) for c in self.choices))
        except BackendUnavailable as exc:
            return _error(503, str(exc), "service_unavailable_error", headers={"Retry-After": str(exc.retry_after)})
        except RequestRejected as exc:
            return _error(400, str(exc))
        except RequestTimedOut as exc:
            return _error(504, str(exc), "timeout_error")
        self._finish_metrics()
        errors = [c.error for c in self.choices if c.error]
        if errors and all(not c.token_ids for c in self.choices):
            log.warning("req %s failed: %s", self.req_id, errors[0])
            return _error(500, f"Generation failed: {errors[0]}", "server_error")
        ids_opt = self.req.return_token_ids
        make_choice, make_response = (P.chat_choice, P.chat_response) if self.chat else (P.completion_choice, P.completion_response)
        choices = [
            make_choice(
                c.index,
                c.text,
                c.finish_reason if c.finish_reason != "error" else "stop",
                logprobs=self._logprobs_obj(c, 0),
                prompt_token_ids=self.prompt_ids if ids_opt else None,
                completion_token_ids=c.token_ids if ids_opt else None,
            )
            for c in self.choices
        ]
        body = make_response(id=self.req_id, model=self.s.model_name, created=self.created, choices=choices, usage=self._usage())
        return web.Response(body=P.dumps(body).encode(), content_type="application/json")

    # ------------------------------------------------------------- streaming
    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        started = False
        ids_opt = self.req.return_token_ids
        first_sent = [False] * len(self.choices)
        continuous = self.req.continuous_usage_stats

        async def begin() -> None:
            nonlocal started
            if not started:
                started = True
                await resp.prepare(request)

        async def sink(c: ChoiceState, text: str, ids: list[int], item: TokenOut):
            await begin()
            fr = c.finish_reason
            if fr == "error":
                fr = None
            if not text and not ids and fr is None and not c.error and first_sent[c.index]:
                return
            start = len(c.token_ids) - len(ids)
            common = dict(
                id=self.req_id,
                model=self.s.model_name,
                created=self.created,
                index=c.index,
                finish_reason=fr,
                logprobs=self._logprobs_obj(c, start) if ids else None,
                prompt_token_ids=self.prompt_ids if ids_opt and not first_sent[c.index] else None,
                completion_token_ids=ids if ids_opt else None,
                # stream_options.continuous_usage_stats: every chunk carries this choice's counts so
                # far (vLLM's shape); include_usage alone adds only the final totals chunk
                usage=P.usage(len(self.prompt_ids), len(c.token_ids)) if continuous else None,
            )
            if self.chat:
                chunk = P.chat_chunk(content=text, first=not first_sent[c.index], **common)
            else:
                chunk = P.completion_chunk(text=text, **common)
            first_sent[c.index] = True
            await resp.write(P.sse(chunk))
            if c.error:
                await resp.write(_sse_error(c.error, "server_error"))

        try:
            await asyncio.gather(*(self._drive(c, sink) for c in self.choices))
        except BackendUnavailable as exc:
            if not started:
                return _error(503, str(exc), "service_unavailable_error", headers={"Retry-After": str(exc.retry_after)})
            await resp.write(_sse_error(str(exc), "service_unavailable_error", 503))
        except RequestRejected as exc:
            if not started:
                return _error(400, str(exc))
        except RequestTimedOut as exc:
            if not started:
                return _error(504, str(exc), "timeout_error")
            await resp.write(_sse_error(str(exc), "timeout_error", 504))
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("req %s: client disconnected", self.req_id)
            raise
        await begin()
        self._finish_metrics()
        if self.req.include_usage:
            make = P.chat_usage_chunk if self.chat else P.completion_usage_chunk
            await resp.write(P.sse(make(id=self.req_id, model=self.s.model_name, created=self.created, usage=self._usage())))
        await resp.write(P.SSE_DONE)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp
