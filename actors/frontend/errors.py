"""OpenAI's error shape and the checks every request module shares (``protocol.py``,
``structured.py``, ``tools.py``): one ``OpenAIError`` whose ``to_dict()`` is the one error body,
bounded reprs for messages, and the text / free-form JSON checks."""

from __future__ import annotations

import re
import reprlib
from typing import Any

_BAD_CHAR = re.compile("[\ud800-\udfff]")  # UTF-16 surrogates (lone: no pair in a str); NUL is text like any


class OpenAIError(Exception):
    """An error answered to the client in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    """OpenAI's error body, the one shape of every error answer (any status, 5xx included) and of
    an SSE stream's error event."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(param: str, message: str) -> OpenAIError:
    return OpenAIError(message, param=param)


def unsupported(param: str, what: str) -> OpenAIError:
    return OpenAIError(f"{what} is not supported by this server.", param=param, code="unsupported_parameter")


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 40, 40


def short(value: Any) -> str:
    """A bounded repr for error messages: a client's value may be 8 MiB long or 900 levels deep."""
    return _REPR.repr(value)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_text(name: str, value: str) -> str:
    """``value`` if it is text a tokenizer can take: no lone UTF-16 surrogate (NUL and other
    control characters are text: the tokenizer's byte fallback encodes them, as vLLM serves them)."""
    bad = _BAD_CHAR.search(value)
    if bad is not None:
        char = bad.group()
        raise invalid(name, f"'{name}' holds a lone UTF-16 surrogate (U+{ord(char):04X}) at position {bad.start()}.")
    return value


def check_free_form(name: str, value: Any, limit: int) -> None:
    """Free-form JSON passed on as it is: nested at most ``limit`` deep (checked without recursion,
    so any depth is safe), its strings text (``check_text``), object keys included."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                raise invalid(name, f"'{name}' is nested more than {limit} levels deep.")
            if isinstance(item, dict):
                for key in item:
                    if isinstance(key, str):
                        check_text(name, key)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
        elif isinstance(item, str):
            check_text(name, item)
