"""The OpenAI API schema layer: request validation, response shapes, SSE framing, stop strings.

Requests and errors live here; response builders (``responses.py``) and ``StopChecker``
(``stop.py``) are re-exported so handlers import everything from this one module.
Pure functions and plain data, no I/O: the mixed-role server and the router's HTTP server both
wrap these in their aiohttp handlers. A handler does, per request:

0. ``parse_json(raw)``: the body's bytes to Python values, or a 400 for anything that is not
   strict JSON (bad UTF-8, lone UTF-16 surrogates, NaN / Infinity, numbers out of range, any
   nesting deeper than ``MAX_JSON_DEPTH``); a bus client's ``Generate`` becomes the same kind of
   body through ``generate_body(msg)``;
1. ``parse_completion_request(body, ...)`` / ``parse_chat_request(body, ...)``: every field is
   checked explicitly (type, range, and text free of lone surrogates); a bad one raises
   ``OpenAIError`` (400 naming the field, 404 for an unknown model) whose ``to_dict()`` is
   OpenAI's error body, the one way any error body is built;
2. tokenizes (chat: applies the template to ``req.messages``), then
   ``resolve_max_tokens(req, prompt_len, max_model_len)``, which fixes ``req.sampling.max_tokens``
   or raises the context-length error;
3. for choice ``i`` of ``n`` submits ``choice_sampling(req, i)``;
4. feeds detokenized deltas through a ``StopChecker(req.stop)`` per choice and builds responses
   with ``completion_response`` / ``completion_chunk`` / ``chat_response`` / ``chat_chunk``,
   framed by ``sse()`` and ended by ``SSE_DONE``.

Unknown request fields are ignored (as vLLM and FastDeploy do) and listed in
``req.ignored_fields`` for the handler to log; fields we know but cannot honour (``echo``,
``suffix``, ``logit_bias``) are rejected with a clear 400. Structured output (``response_format``,
vLLM's ``guided_*`` / ``structured_outputs``) is checked and mapped by ``structured.py`` into
``sampling.structured``; ``tools`` / ``tool_choice`` and tool messages by ``tools.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from pdbus.messages import SEED_RANGE, Generate, SamplingParams

from . import structured as S
from . import tools as T
from .errors import OpenAIError, error_body
from .errors import check_free_form as _check_free_form
from .errors import check_text as _text
from .errors import invalid as _invalid
from .errors import short as _short
from .errors import type_name as _type_name
from .errors import unsupported as _unsupported
from .responses import (
    SSE_DONE,
    chat_choice,
    chat_chunk,
    chat_logprobs,
    chat_response,
    chat_usage_chunk,
    completion_choice,
    completion_chunk,
    completion_logprobs,
    completion_response,
    completion_usage_chunk,
    dumps,
    finish_reason,
    now,
    random_id,
    sse,
    usage,
)
from .stop import StopChecker

__all__ = [
    "SSE_DONE",
    "ChatRequest",
    "CompletionRequest",
    "OpenAIError",
    "StopChecker",
    "chat_choice",
    "chat_chunk",
    "chat_logprobs",
    "chat_response",
    "chat_usage_chunk",
    "choice_sampling",
    "completion_choice",
    "completion_chunk",
    "completion_logprobs",
    "completion_response",
    "completion_usage_chunk",
    "dumps",
    "error_body",
    "finish_reason",
    "generate_body",
    "now",
    "parse_chat_request",
    "parse_completion_request",
    "parse_json",
    "random_id",
    "resolve_max_tokens",
    "sse",
    "usage",
]

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_KWARGS_DEPTH = 16  # chat_template_kwargs: arrays and objects inside one another
MAX_TOKEN_ID = (1 << 31) - 1  # the bound of a token id while the vocabulary is not known
_MISSING = object()


# --------------------------------------------------------------------------- field readers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Fields:
    """Reads fields of one JSON object, remembering which ones it saw."""

    def __init__(self, body: Any):
        if not isinstance(body, dict):
            raise OpenAIError(f"The request body must be a JSON object, got {_type_name(body)}.")
        self.body = body
        self.known: set[str] = set()

    def raw(self, name: str) -> Any:
        """The value, or ``_MISSING`` when absent or null (OpenAI treats null as 'use the default')."""
        self.known.add(name)
        value = self.body.get(name)
        return _MISSING if value is None else value

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise _invalid(name, f"'{name}' must be a boolean, got {_type_name(value)}.")
        return value

    def int(self, name: str, default: Any, lo: int | None = None, hi: int | None = None) -> Any:
        value = self.raw(name)
        if value is _MISSING:
            return default
        if not _is_int(value):
            raise _invalid(name, f"'{name}' must be an integer, got {_type_name(value)}.")
        _check_range(name, value, lo, hi)
        return value

    def float(self, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = self.raw(name)
        if value is _MISSING:
            return default
        if not _is_number(value) or not math.isfinite(value):
            raise _invalid(name, f"'{name}' must be a finite number, got {_type_name(value)} {_short(value)}.")
        ok = (lo < value if lo_open else lo <= value) and value <= hi
        if not ok:
            low = f"greater than {lo}" if lo_open else f"at least {lo}"
            high = "" if hi == math.inf else f" and at most {hi}"
            raise _invalid(name, f"'{name}' must be {low}{high}, got {value}.")
        return float(value)

    def str(self, name: str, default: Any) -> Any:
        value = self.raw(name)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise _invalid(name, f"'{name}' must be a string, got {_type_name(value)}.")
        return _text(name, value)

    def unknown(self) -> list[str]:
        return sorted(k for k in self.body if k not in self.known)


def _check_range(name: str, value: int, lo: int | None, hi: int | None) -> None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise _invalid(name, f"'{name}' must be between {lo} and {hi}, got {value}.")
    if lo is not None and value < lo:
        raise _invalid(name, f"'{name}' must be at least {lo}, got {value}.")
    if hi is not None and value > hi:
        raise _invalid(name, f"'{name}' must be at most {hi}, got {value}.")


def _token_ids(name: str, value: Any, vocab_size: int | None) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise _invalid(name, f"'{name}' must be a list of integer token ids.")
    check_token_ids(name, value, vocab_size)
    return value


def check_token_ids(name: str, ids: Sequence[int], vocab_size: int | None) -> None:
    """Every id in ``[0, vocab_size)`` (``[0, MAX_TOKEN_ID]`` while the vocabulary is unknown)."""
    limit = vocab_size or MAX_TOKEN_ID + 1
    bad = next((t for t in ids if not 0 <= t < limit), None)
    if bad is not None:
        known = f" (vocabulary size {vocab_size})" if vocab_size else ""
        raise _invalid(name, f"'{name}' holds token id {bad}, which is out of range{known}.")


def parse_json(raw: bytes) -> Any:
    """A request body's bytes as Python values; anything but strict JSON is a 400.

    msgspec refuses what ``json.loads`` would let through to fail later: invalid UTF-8, lone
    UTF-16 surrogates, NaN / Infinity, numbers past float or 64-bit integer range. Nesting past
    the interpreter's recursion limit raises ``RecursionError`` (caught here); what nests less
    deeply is only ever looked at one level at a time, or through ``_short`` and ``_check_free_form``.
    """
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise OpenAIError(f"Request body is not valid JSON: {exc}.") from None
    except RecursionError:
        raise OpenAIError("Request body is not valid JSON: nested too deeply.") from None


# --------------------------------------------------------------------------- requests


@dataclass(kw_only=True)
class _Request:
    default_max_tokens: ClassVar[int | None] = None

    model: str
    sampling: SamplingParams
    max_tokens: int | None  # as asked; None: the default (see resolve_max_tokens)
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    continuous_usage_stats: bool = False
    return_token_ids: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    user: str | None = None
    ignored_fields: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class CompletionRequest(_Request):
    default_max_tokens: ClassVar[int | None] = 16  # OpenAI's default for /v1/completions

    prompt: str | None = None  # exactly one of prompt / prompt_token_ids is set
    prompt_token_ids: list[int] | None = None
    logprobs: int | None = None  # None: off; k: sampled token's logprob plus the top k


@dataclass(kw_only=True)
class ChatRequest(_Request):
    messages: list[dict] = field(default_factory=list)  # [{"role", "content": str, "name"?, "tool_calls"?, "tool_call_id"?}]
    tools: T.ToolSpec | None = None  # tools, tool_choice, parallel_tool_calls
    prompt_text: str = ""  # the rendered template (set by the server: the reasoning split reads its end)
    logprobs: bool = False
    top_logprobs: int = 0
    add_generation_prompt: bool = True
    chat_template_kwargs: dict = field(default_factory=dict)  # template variables, passed through


def _resolve_model(f: _Fields, model_names: Sequence[str]) -> str:
    if not model_names:
        raise OpenAIError("No model is being served yet.", status=503, type="service_unavailable_error")
    name = f.str("model", None)
    if name is None:
        return model_names[0]
    if name not in model_names:
        raise OpenAIError(
            f"The model `{name}` does not exist. Served: {', '.join(model_names)}.",
            status=404,
            param="model",
            code="model_not_found",
        )
    return name


def _parse_stop(f: _Fields) -> list[str]:
    value = f.raw("stop")
    if value is _MISSING:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _invalid("stop", "'stop' must be a string or a list of strings.")
    if len(stops) > MAX_STOP:
        raise _invalid("stop", f"'stop' must hold at most {MAX_STOP} strings, got {len(stops)}.")
    if any(s == "" for s in stops):
        raise _invalid("stop", "'stop' must not contain empty strings.")
    for s in stops:
        _text("stop", s)
    return list(dict.fromkeys(stops))


def _parse_common(
    f: _Fields,
    *,
    model_names: Sequence[str],
    max_model_len: int,
    vocab_size: int | None,
    max_tokens_names: Sequence[str],
) -> dict:
    """Fields shared by both endpoints, as keyword arguments of ``_Request``."""
    model = _resolve_model(f, model_names)

    max_tokens = None
    for name in max_tokens_names:  # the first one given wins (max_completion_tokens over max_tokens)
        value = f.int(name, None, lo=1)
        if value is not None and max_tokens is None:
            max_tokens = value
            if value >= max_model_len:
                raise _invalid(
                    name,
                    f"'{name}' must be less than the model's maximum context length "
                    f"({max_model_len} tokens), got {value}.",
                )

    n = f.int("n", 1, lo=1, hi=MAX_N)
    best_of = f.int("best_of", None, lo=1)
    if best_of is not None and best_of != n:
        raise _unsupported("best_of", "'best_of' other than 'n'")

    stream = f.bool("stream", False)
    include_usage = continuous = False
    options = f.raw("stream_options")
    if options is not _MISSING:
        if not stream:
            raise _invalid("stream_options", "'stream_options' is only allowed when 'stream' is true.")
        if not isinstance(options, dict):
            raise _invalid("stream_options", "'stream_options' must be an object.")
        for key in ("include_usage", "continuous_usage_stats"):
            value = options.get(key)
            if value is not None and not isinstance(value, bool):
                raise _invalid(f"stream_options.{key}", f"'stream_options.{key}' must be a boolean.")
        include_usage = bool(options.get("include_usage"))
        continuous = bool(options.get("continuous_usage_stats"))

    top_k = min(f.int("top_k", 0, lo=-1), MAX_TOKEN_ID)  # past the vocabulary it is off: fits the bus
    seed = f.int("seed", None, lo=SEED_RANGE[0], hi=SEED_RANGE[1])
    stop_token_ids = f.raw("stop_token_ids")
    if stop_token_ids is _MISSING:
        stop_token_ids = []
    else:
        stop_token_ids = _token_ids("stop_token_ids", stop_token_ids, vocab_size)
    min_tokens = f.int("min_tokens", 0, lo=0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise _invalid(
            "min_tokens", f"'min_tokens' ({min_tokens}) must not exceed max_tokens ({max_tokens})."
        )

    guided = {name: value for name in S.GUIDED_FIELDS if (value := f.raw(name)) is not _MISSING}
    logit_bias = f.raw("logit_bias")
    if logit_bias is not _MISSING and logit_bias != {}:
        raise _unsupported("logit_bias", "'logit_bias'")

    sampling = SamplingParams(
        max_tokens=max_tokens or 16,
        min_tokens=min_tokens,
        temperature=f.float("temperature", 1.0, 0.0, 2.0),
        top_p=f.float("top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(top_k, 0),
        min_p=f.float("min_p", 0.0, 0.0, 1.0),
        seed=seed,
        presence_penalty=f.float("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=f.float("frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=f.float("repetition_penalty", 1.0, 0.0, math.inf, lo_open=True),
        stop_token_ids=list(dict.fromkeys(stop_token_ids)),
        ignore_eos=f.bool("ignore_eos", False),
        structured=S.parse_guided(guided),
    )
    return dict(
        model=model,
        sampling=sampling,
        max_tokens=max_tokens,
        n=n,
        stop=_parse_stop(f),
        stream=stream,
        include_usage=include_usage,
        continuous_usage_stats=continuous,
        return_token_ids=f.bool("return_token_ids", False),
        include_stop_str_in_output=f.bool("include_stop_str_in_output", False),
        skip_special_tokens=f.bool("skip_special_tokens", True),
        user=f.str("user", None),
    )


def parse_completion_request(
    body: Any, *, model_names: Sequence[str], max_model_len: int, vocab_size: int | None = None
) -> CompletionRequest:
    """Validate a ``POST /v1/completions`` body. ``vocab_size`` (optional) bounds prompt and stop token ids."""
    f = _Fields(body)
    common = _parse_common(
        f,
        model_names=model_names,
        max_model_len=max_model_len,
        vocab_size=vocab_size,
        max_tokens_names=["max_tokens"],
    )
    if common["max_tokens"] is None:
        common["sampling"].max_tokens = CompletionRequest.default_max_tokens

    prompt = f.raw("prompt")
    if prompt is _MISSING:
        raise _invalid("prompt", "'prompt' is required.")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise _unsupported("prompt", f"A batch of {len(prompt)} prompts (send one prompt per request)")
        prompt = prompt[0]
    text, token_ids = None, None
    if isinstance(prompt, str):
        if not prompt:
            raise _invalid("prompt", "'prompt' must not be empty.")
        text = _text("prompt", prompt)
    elif isinstance(prompt, list):
        if not prompt:
            raise _invalid("prompt", "'prompt' must not be empty.")
        token_ids = _token_ids("prompt", prompt, vocab_size)
    else:
        raise _invalid(
            "prompt", f"'prompt' must be a string or a list of token ids, got {_type_name(prompt)}."
        )

    logprobs = f.int("logprobs", None, lo=0, hi=MAX_LOGPROBS)
    common["sampling"].logprobs = logprobs
    if f.bool("echo", False):
        raise _unsupported("echo", "'echo'")
    suffix = f.str("suffix", None)
    if suffix:
        raise _unsupported("suffix", "'suffix'")
    return CompletionRequest(
        **common, prompt=text, prompt_token_ids=token_ids, logprobs=logprobs, ignored_fields=f.unknown()
    )


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _parse_message(i: int, message: Any) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _invalid(where, f"'{where}' must be an object, got {_type_name(message)}.")
    role = message.get("role")
    if role == "function":
        raise _unsupported(f"{where}.role", "Role 'function' (the legacy function calling; send 'tool' messages)")
    if not isinstance(role, str) or role not in _ROLES:
        raise _invalid(
            f"{where}.role", f"'{where}.role' must be one of system, user, assistant, tool; got {_short(role)}."
        )
    calls = message.get("tool_calls")
    if calls is not None and role != "assistant":
        raise _invalid(f"{where}.tool_calls", f"'{where}.tool_calls' is only for assistant messages.")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise _invalid(at, f"'{at}' must be an object.")
            if part.get("type") != "text":
                raise _unsupported(f"{at}.type", f"Content part type {_short(part.get('type'))} (only 'text' is)")
            if not isinstance(part.get("text"), str):
                raise _invalid(f"{at}.text", f"'{at}.text' must be a string.")
            texts.append(_text(f"{at}.text", part["text"]))
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise _invalid(
            f"{where}.content",
            f"'{where}.content' must be a string or a list of text parts, got {_type_name(content)}.",
        )
    else:
        _text(f"{where}.content", content)
    out = {"role": _ROLES[role], "content": content}
    if calls is not None and (parsed_calls := T.parse_tool_calls_field(f"{where}.tool_calls", calls)):
        out["tool_calls"] = parsed_calls
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise _invalid(f"{where}.tool_call_id", f"'{where}.tool_call_id' is required in a tool message (a string).")
        out["tool_call_id"] = _text(f"{where}.tool_call_id", call_id)
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise _invalid(f"{where}.name", f"'{where}.name' must be a string.")
        out["name"] = _text(f"{where}.name", name)
    return out


def parse_chat_request(
    body: Any, *, model_names: Sequence[str], max_model_len: int, vocab_size: int | None = None, auto_tools: bool = False
) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body. ``vocab_size`` (optional) bounds stop token ids;
    ``auto_tools``: the server parses tool calls out of text (``tool_choice`` auto is possible)."""
    f = _Fields(body)
    common = _parse_common(
        f,
        model_names=model_names,
        max_model_len=max_model_len,
        vocab_size=vocab_size,
        max_tokens_names=["max_completion_tokens", "max_tokens"],
    )
    messages = f.raw("messages")
    if messages is _MISSING:
        raise _invalid("messages", "'messages' is required.")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "'messages' must be a non-empty list.")
    parsed = [_parse_message(i, m) for i, m in enumerate(messages)]

    logprobs = f.bool("logprobs", False)
    top_logprobs = f.int("top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise _invalid("top_logprobs", "'top_logprobs' must be used together with 'logprobs': true.")
    top_logprobs = top_logprobs or 0
    common["sampling"].logprobs = top_logprobs if logprobs else None

    if f.raw("functions") not in (_MISSING, []):
        raise _unsupported("functions", "The legacy 'functions' field (send 'tools')")
    tools = T.parse_tools(
        *(None if (v := f.raw(n)) is _MISSING else v for n in ("tools", "tool_choice", "parallel_tool_calls")),
        auto_tools=auto_tools,
    )
    response_format = f.raw("response_format")
    constraints = [
        ("guided decoding fields", common["sampling"].structured),
        ("response_format", None if response_format is _MISSING else S.parse_response_format(response_format)),
        ("tool_choice", T.tool_structured(tools)),
    ]
    given = [(name, so) for name, so in constraints if so is not None]
    if len(given) > 1:
        raise _invalid(given[1][0], f"Only one of {' and '.join(n for n, _ in given)} may constrain the output.")
    common["sampling"].structured = given[0][1] if given else None

    kwargs = f.raw("chat_template_kwargs")
    if kwargs is _MISSING:
        kwargs = {}
    elif not isinstance(kwargs, dict):
        raise _invalid("chat_template_kwargs", "'chat_template_kwargs' must be an object.")
    elif "messages" in kwargs:
        raise _invalid("chat_template_kwargs", "'chat_template_kwargs' must not set 'messages' (send them as 'messages').")
    else:
        _check_free_form("chat_template_kwargs", kwargs, MAX_KWARGS_DEPTH)
    thinking = f.bool("enable_thinking", None)  # FastDeploy's shortcut for the template flag
    if thinking is not None:
        kwargs = {"enable_thinking": thinking, **kwargs}

    return ChatRequest(
        **common,
        messages=parsed,
        tools=tools,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        add_generation_prompt=f.bool("add_generation_prompt", True),
        chat_template_kwargs=kwargs,
        ignored_fields=f.unknown(),
    )


def resolve_max_tokens(req: _Request, prompt_len: int, max_model_len: int) -> int:
    """Fix ``req.sampling.max_tokens`` once the prompt's length is known, or raise the 400.

    An explicit ``max_tokens`` must fit beside the prompt; the default (16 for completions,
    'the rest of the context' for chat) is clamped to what is left.
    """
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    room = max_model_len - prompt_len
    if req.max_tokens is not None and req.max_tokens > room:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + req.max_tokens} tokens ({prompt_len} in the prompt, {req.max_tokens} for the "
            "completion). Please reduce the length of the prompt or of the completion.",
            param=param if room <= 0 else "max_tokens",
            code="context_length_exceeded",
        )
    if room <= 0:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for the completion. Please reduce the length "
            "of the prompt.",
            param=param,
            code="context_length_exceeded",
        )
    default = req.default_max_tokens or room
    max_tokens = req.max_tokens if req.max_tokens is not None else min(default, room)
    req.sampling.max_tokens = max_tokens
    req.sampling.min_tokens = min(req.sampling.min_tokens, max_tokens)
    return max_tokens


def choice_sampling(req: _Request, index: int) -> SamplingParams:
    """Sampling for choice ``index`` of ``n``: seeded choices get distinct, reproducible seeds.

    A seed past the top of ``SEED_RANGE`` wraps to the int64 of the same 64 bits (the sampler
    draws alike from both), so every seed still crosses the bus (msgpack has no wider int).
    """
    if index == 0 or req.sampling.seed is None:
        return req.sampling
    seed = req.sampling.seed + index
    if seed > SEED_RANGE[1]:
        seed -= 1 << 64
    return msgspec.structs.replace(req.sampling, seed=seed)


def generate_body(msg: Generate) -> tuple[dict, bool]:
    """A bus client's ``Generate`` as the body of the HTTP request it stands for, and whether
    that is a chat request: bus clients take the same checks as HTTP clients, field by field."""
    body: dict[str, Any] = msgspec.structs.asdict(msg.sampling)
    structured = body.pop("structured")
    if structured is not None:  # back to the field a client would have sent: checked alike
        body["structured_outputs"] = S.as_request_field(structured)
    chat = msg.messages is not None
    if chat:
        body["messages"] = msg.messages
        logprobs = body.pop("logprobs")
        if logprobs is not None:
            body["logprobs"], body["top_logprobs"] = True, logprobs
    else:
        body["prompt"] = msg.prompt_token_ids if msg.prompt_token_ids is not None else msg.prompt
    return body, chat
