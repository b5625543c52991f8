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

HTTP requests and bus clients take one preparation path, ``OpenAIServer.prepare``: validation,
the server's seed, template, tokenization, vocabulary and length — all before the backend
reserves anything. Every error, of any status, is OpenAI's body built by ``error_response``
(``protocol.OpenAIError.to_dict``); the ``openai_errors`` middleware gives that body to wrong
paths and methods too, and turns an exception no handler expected into a 500 of that shape
with one log line (a bug to fix where it is raised, never an answer to a client's input).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
import uuid
from dataclasses import dataclass, field

import msgspec
from aiohttp import web

from actors.frontend import chat_output as CO
from actors.frontend import protocol as P
from actors.frontend import tools as T
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


def error_response(exc: P.OpenAIError, headers: dict | None = None) -> web.Response:
    """The one HTTP error answer: OpenAI's body for every status."""
    return web.json_response(exc.to_dict(), status=exc.status, headers=headers)


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None):
    return error_response(P.OpenAIError(message, status=status, type=type_, param=param, code=code), headers)


def _error_event(message: str, type_: str, code=None) -> bytes:
    """An error inside a stream that has begun: the same body, as an SSE event."""
    return P.sse(P.OpenAIError(message, type=type_, code=code).to_dict())


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


def _where(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    return f"{frame.filename}:{frame.lineno}" if frame else "?"


@web.middleware
async def openai_errors(request: web.Request, handler):
    """Every answer of an app in OpenAI's error shape: aiohttp's own (404, 405, 413...) and the
    500 of an exception no handler expected, which is logged in one line with where it was raised."""
    try:
        return await handler(request)
    except P.OpenAIError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        if exc.status == 404:
            message = f"No route for {request.method} {request.path}."
        elif exc.status == 405:
            message = f"Method {request.method} is not allowed on {request.path} (allowed: {exc.headers.get('Allow', '')})."
        else:
            message = exc.text or exc.reason
        type_ = _STATUS_TYPES.get(exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
        return _error(exc.status, message, type_, code=exc.reason.lower().replace(" ", "_"), headers=headers)
    except ConnectionResetError:  # the client went away while its request was read: no one to answer
        log.info("%s %s: client disconnected", request.method, request.path)
        return _error(400, "client disconnected")
    except Exception as exc:
        log.error("%s %s: unexpected %s at %s: %s", request.method, request.path, type(exc).__name__, _where(exc), exc)
        return _error(500, f"Internal server error ({type(exc).__name__}).", "server_error")


class TextStream:
    """One sequence's text: the incremental detokenizer (never half a UTF-8 character) and the
    stop strings. HTTP choices and bus clients both turn tokens into text through it."""

    def __init__(
        self, tokenizer, prompt_ids: list[int], stop=(), include_stop: bool = False, skip_special_tokens: bool = True, keep=frozenset()
    ):
        self.detok = (
            IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens, keep=keep)
            if tokenizer is not None
            else None
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
    output: CO.ChatOutput | None = None  # chat: the reasoning split and tool calls, when the request has any


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
        tool_call_parser: str | None = None,
        reasoning_parser: str | None = None,
    ):
        self.backend = backend
        # --tool-call-parser / --reasoning-parser (pdbus.config.TOOL_CALL_PARSERS, REASONING_PARSERS)
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser
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
        app.middlewares.append(openai_errors)
        app.middlewares.append(self._guard)

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        api = request.path.startswith("/v1/")
        if api and self.api_key and request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            return _error(401, "Invalid or missing API key.", "authentication_error", code="invalid_api_key")
        if api and self.model_name is None:
            return _error(503, "No instance has registered yet.", "service_unavailable_error", headers={"Retry-After": "1"})
        return await handler(request)

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
        totals = getattr(self.backend, "totals", None)  # counters the backend keeps (the router's)
        body, ctype = self.metrics.render(self.backend.stats(), totals() if totals is not None else ())
        return web.Response(body=body, headers={"Content-Type": ctype})

    def seeded(self, sampling: SamplingParams) -> SamplingParams:
        """``sampling`` with the server's ``--seed`` where the request gave none. Resolved here,
        where the request is prepared, so that a prefill and its decode draw alike (PD = mixed)."""
        if sampling.seed is not None or self.default_seed is None:
            return sampling
        return msgspec.structs.replace(sampling, seed=self.default_seed)

    def text_stream(self, req, prompt_ids: list[int], output: CO.ChatOutput | None = None) -> TextStream:
        # markup a parser reads stays in the text where the tokenizer has it as special tokens
        keep = self.tokenizer.special_ids_of(CO.MARKUP) if output is not None and self.tokenizer is not None else frozenset()
        return TextStream(
            self.tokenizer,
            prompt_ids,
            req.stop,
            include_stop=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            keep=keep,
        )

    def chat_output(self, req) -> CO.ChatOutput | None:
        return CO.chat_output(req, self.reasoning_parser) if isinstance(req, P.ChatRequest) else None

    # ----------------------------------------------------------------- preparation
    async def _json(self, request: web.Request):
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise P.OpenAIError(f"Request body too large: {exc.text}.", status=413, code="request_too_large") from None
        return P.parse_json(raw)

    def prepare(self, body, chat: bool):
        """The one way in for HTTP requests and bus clients (``protocol.generate_body``), before
        anything is reserved: the checked request and its prompt's token ids, or ``OpenAIError``."""
        limits = dict(model_names=[self.model_name], max_model_len=self.max_model_len, vocab_size=self.vocab_size)
        if chat:
            req = P.parse_chat_request(body, **limits, auto_tools=self.tool_call_parser is not None)
        else:
            req = P.parse_completion_request(body, **limits)
        req.sampling = self.seeded(req.sampling)
        prompt_ids = self._prompt_ids(req)
        param = "messages" if chat else "prompt"
        if not prompt_ids:
            raise P.OpenAIError("The prompt is empty.", param=param)
        P.check_token_ids(param, prompt_ids, self.vocab_size)  # a tokenizer with more ids than the model
        P.resolve_max_tokens(req, len(prompt_ids), self.max_model_len)
        return req, prompt_ids

    def _prompt_ids(self, req) -> list[int]:
        if isinstance(req, P.ChatRequest):
            if self.tokenizer is None:
                raise P.OpenAIError("Chat needs a tokenizer, and this server has none (--skip-tokenizer-init).")
            messages, extra = T.template_inputs(req.messages, req.tools, self.tokenizer.supports_tools)
            kwargs = {"add_generation_prompt": req.add_generation_prompt, **extra, **req.chat_template_kwargs}
            try:  # the template may refuse these messages or keyword arguments
                req.prompt_text = self.tokenizer.apply_chat_template(messages, **kwargs)
                return self.tokenizer.encode(req.prompt_text)
            except TokenizerError as exc:
                raise P.OpenAIError(str(exc), param="messages") from None
        if req.prompt_token_ids is not None:
            return list(req.prompt_token_ids)  # checked against the vocabulary by the parser
        if self.tokenizer is None:
            raise P.OpenAIError(
                "Text prompts need a tokenizer, and this server has none: send 'prompt' as a list of token ids.",
                param="prompt",
            )
        try:
            return self.tokenizer.encode(req.prompt)
        except TokenizerError as exc:
            raise P.OpenAIError(str(exc), param="prompt") from None

    # ----------------------------------------------------------------- handlers
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        t0 = time.monotonic()
        try:
            req, prompt_ids = self.prepare(await self._json(request), chat)
        except P.OpenAIError as exc:
            self.metrics.rejected.inc()
            log.info("%s %s refused, %d (%s): %s", request.method, request.path, exc.status, exc.param, exc.message)
            return error_response(exc)
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
        self.choices = []
        for i in range(req.n):
            output = server.chat_output(req) if chat else None
            self.choices.append(ChoiceState(i, server.text_stream(req, prompt_ids, output), output=output))
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
            if c.output is not None and c.output.tool_calls:
                names = ",".join(t["function"]["name"] for t in c.output.tool_calls)
                log.info("req %s choice %d: %d tool call(s): %s", self.req_id, c.index, len(c.output.tool_calls), names)

    # ------------------------------------------------------------- non-streaming
    async def _drive_all(self, sink) -> None:
        """Every choice's stream at once; when one ends the request (an exception, or the client
        gone), the others are cancelled too — their sequences aborted — rather than left running."""
        tasks = [asyncio.ensure_future(self._drive(c, sink)) for c in self.choices]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def complete(self) -> web.Response:
        async def sink(c, text, ids, item):
            return None

        try:
            await self._drive_all(sink)
        except BackendUnavailable as exc:
            return _error(503, str(exc), "service_unavailable_error", headers={"Retry-After": str(exc.retry_after)})
        except RequestRejected as exc:
            return _error(400, str(exc))
        except RequestTimedOut as exc:
            return _error(504, str(exc), "timeout_error")
        self._finish_metrics()
        errors = [c.error for c in self.choices if c.error]
        if errors:  # never a truncated answer dressed as complete: the whole request failed
            log.warning("req %s failed after %d tokens: %s", self.req_id, sum(len(c.token_ids) for c in self.choices), errors[0])
            return _error(503, f"Generation failed: {errors[0]}", "service_unavailable_error", headers={"Retry-After": "1"})
        ids_opt = self.req.return_token_ids
        make_choice, make_response = (P.chat_choice, P.chat_response) if self.chat else (P.completion_choice, P.completion_response)
        choices = []
        for c in self.choices:
            ids = dict(prompt_token_ids=self.prompt_ids if ids_opt else None, completion_token_ids=c.token_ids if ids_opt else None)
            if c.output is None:
                choices.append(make_choice(c.index, c.text, c.finish_reason, logprobs=self._logprobs_obj(c, 0), **ids))
                continue
            c.output.feed(c.text, final=True)  # the whole text through the stream's parsers
            message = c.output.message()
            choices.append(
                P.chat_choice(
                    c.index,
                    message["content"],
                    c.output.finish_reason(c.finish_reason),
                    logprobs=self._logprobs_obj(c, 0),
                    reasoning_content=message.get("reasoning_content"),
                    tool_calls=message.get("tool_calls"),
                    **ids,
                )
            )
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
            parts = None
            if c.output is not None:  # reasoning / tool calls: the parsers say what this text is
                parts = c.output.feed(text, final=c.finish_reason is not None)
                fr = c.output.finish_reason(fr)
            if not (parts if parts is not None else text) and not ids and fr is None and not c.error and first_sent[c.index]:
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
            if parts is not None:
                chunk = P.chat_chunk(
                    content=parts.content or None,
                    reasoning_content=parts.reasoning or None,
                    tool_calls=parts.tool_calls or None,
                    first=not first_sent[c.index],
                    **common,
                )
            elif self.chat:
                chunk = P.chat_chunk(content=text, first=not first_sent[c.index], **common)
            else:
                chunk = P.completion_chunk(text=text, **common)
            first_sent[c.index] = True
            await resp.write(P.sse(chunk))
            if c.error:
                await resp.write(_error_event(c.error, "server_error"))

        try:
            await self._drive_all(sink)
        except BackendUnavailable as exc:
            if not started:
                return _error(503, str(exc), "service_unavailable_error", headers={"Retry-After": str(exc.retry_after)})
            await resp.write(_error_event(str(exc), "service_unavailable_error", 503))
        except RequestRejected as exc:
            if not started:
                return _error(400, str(exc))
            await resp.write(_error_event(str(exc), "invalid_request_error", 400))
        except RequestTimedOut as exc:
            if not started:
                return _error(504, str(exc), "timeout_error")
            await resp.write(_error_event(str(exc), "timeout_error", 504))
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("req %s: client disconnected", self.req_id)
            raise
        except Exception as exc:  # a bug: the middleware answers it while no chunk was sent
            if not started:
                raise
            log.error("req %s: unexpected %s at %s: %s", self.req_id, type(exc).__name__, _where(exc), exc)
            await resp.write(_error_event(f"Internal server error ({type(exc).__name__}).", "server_error"))
        await begin()
        self._finish_metrics()
        if self.req.include_usage:
            make = P.chat_usage_chunk if self.chat else P.completion_usage_chunk
            await resp.write(P.sse(make(id=self.req_id, model=self.s.model_name, created=self.created, usage=self._usage())))
        await resp.write(P.SSE_DONE)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp
