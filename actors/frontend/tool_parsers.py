"""Tool calling, the output side: a choice's text (after the reasoning split) into content and
OpenAI ``tool_calls``, incrementally, so that a stream and a whole answer are one code path
(the whole answer is the stream fed at once, ``final=True``).

Every parser's ``feed(text, final)`` returns ``(content, deltas)``: the text that is content and
the tool-call deltas, OpenAI's stream shape — a call's first delta carries ``index``, ``id``,
``type`` and ``function.name`` (with ``arguments`` ""), later ones argument fragments. Text that
may still turn out to be markup (half a ``<tool_call>`` tag) is held back until it is known.

- ``ErnieX1ToolParser`` (``--tool-call-parser ernie_x1``, FastDeploy's ``ernie-x1``; ``tool_choice``
  auto): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks anywhere in the
  text. The arguments stream as the model writes them (their exact text); a block the parser
  cannot read is content, as written.
- ``RequiredToolParser`` (``tool_choice`` required): the constrained output, a JSON array of
  ``{"name", "parameters"}``; each call goes out whole once its element is complete.
- ``NamedToolParser`` (``tool_choice`` naming a function): the constrained output is the
  arguments of that one call, streamed as they come.
"""

from __future__ import annotations

import json
import re
import uuid

from pdbus.log import get_logger

log = get_logger("api")

TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (what to hold back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def merge_deltas(deltas: list[dict]) -> list[dict]:
    """One entry per call index: a call's name and argument fragments of one feed together."""
    out: dict[int, dict] = {}
    for d in deltas:
        have = out.get(d["index"])
        if have is None:
            out[d["index"]] = {**d, "function": dict(d["function"])}
        else:
            have["function"]["arguments"] = have["function"].get("arguments", "") + d["function"].get("arguments", "")
    return list(out.values())


class ValueScanner:
    """Where one JSON value ends in text that arrives in pieces: depth and string state only, so
    each character is looked at once."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False
        self.scalar = False
        self.done = False

    def take(self, text: str) -> int:
        """How many leading characters of ``text`` belong to the value (``done`` once it ended)."""
        for i, ch in enumerate(text):
            if not self.started:
                self.started = True
                if ch in "{[":
                    self.depth = 1
                elif ch == '"':
                    self.in_string = True
                else:
                    self.scalar = True
                continue
            if self.scalar:
                if ch in ",}] \t\r\n<":
                    self.done = True
                    return i
                continue
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.done = True
                        return i + 1
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


class ErnieX1ToolParser:
    """``<tool_call>`` blocks out of free text (``tool_choice`` auto)."""

    def __init__(self, parallel: bool = True):
        self.parallel = parallel
        self.buf = ""
        self.state = "text"  # text | head | args | tail
        self.calls: list[dict] = []  # complete or in progress, OpenAI's message shape
        self.muted = False  # a call past the first while parallel_tool_calls is false: swallowed
        self.scanner: ValueScanner | None = None
        self.spaces = ""  # whitespace held back: content only if more content follows

    def _content(self, text: str, out: list[str]) -> None:
        """Trailing whitespace waits for more content: before a block or at the end of an answer
        with calls it is layout, not content (so a stream and a whole answer cut alike)."""
        text = self.spaces + text
        kept = text.rstrip()
        if kept:
            out.append(kept)
        self.spaces = text[len(kept) :]

    def _start_call(self, name: str, deltas: list[dict]) -> None:
        self.muted = not self.parallel and bool(self.calls)
        if self.muted:
            log.info("tool call %s dropped: parallel_tool_calls is false and a call came before", name)
            return
        call = {"id": tool_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        deltas.append({"index": len(self.calls) - 1, **call, "function": dict(call["function"])})

    def _arguments(self, text: str, deltas: list[dict]) -> None:
        if self.muted or not text:
            return
        self.calls[-1]["function"]["arguments"] += text
        deltas.append({"index": len(self.calls) - 1, "function": {"arguments": text}})

    def _whole_block(self, block: str, content: list[str], deltas: list[dict]) -> None:
        """A block the streaming head did not match (keys in another order, odd spacing)."""
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            arguments = value.get("arguments", value.get("parameters", {}))
            self._start_call(value["name"], deltas)
            self._arguments(arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False), deltas)
            return
        log.info("unreadable tool call block kept as content: %.80r", block)
        self._content(f"{TOOL_START}{block}{TOOL_END}", content)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        self.buf += text
        content: list[str] = []
        deltas: list[dict] = []
        while True:
            if self.state == "text":
                at = self.buf.find(TOOL_START)
                if at >= 0:
                    self._content(self.buf[:at], content)
                    self.buf, self.state = self.buf[at + len(TOOL_START) :], "head"
                    continue
                keep = 0 if final else partial_tag(self.buf, TOOL_START)
                self._content(self.buf[: len(self.buf) - keep], content)
                self.buf = self.buf[len(self.buf) - keep :]
                break
            if self.state == "head":
                m = _HEAD.match(self.buf)
                end = self.buf.find(TOOL_END)
                if m is not None and (end < 0 or m.end() <= end):
                    self._start_call(json.loads(f'"{m.group(1)}"'), deltas)
                    self.buf, self.state, self.scanner = self.buf[m.end() :], "args", ValueScanner()
                    continue
                if end >= 0:
                    self._whole_block(self.buf[:end], content, deltas)
                    self.buf, self.state = self.buf[end + len(TOOL_END) :], "text"
                    continue
                if final:  # an unfinished block that never became a call: the text it was
                    self._content(TOOL_START + self.buf, content)
                    self.buf = ""
                break
            if self.state == "args":
                if not self.scanner.started:
                    self.buf = self.buf.lstrip()
                    if not self.buf:
                        break
                n = self.scanner.take(self.buf)
                self._arguments(self.buf[:n], deltas)
                self.buf = self.buf[n:]
                if not self.scanner.done:
                    break
                self.state = "tail"
                continue
            # tail: the rest of the block (the object's closing brace) up to the end tag
            end = self.buf.find(TOOL_END)
            if end < 0:
                if final:
                    self.buf = ""
                break
            self.buf, self.state = self.buf[end + len(TOOL_END) :], "text"
        if final and self.spaces and not self.calls:
            content.append(self.spaces)
            self.spaces = ""
        return "".join(content), deltas


class RequiredToolParser:
    """The array a ``required`` choice constrains the output to; calls go out element by element."""

    def __init__(self):
        self.text = ""
        self.pos = 0  # where scanning resumes in ``text``
        self.opened = False
        self.scanner: ValueScanner | None = None
        self.element_start = 0
        self.calls: list[dict] = []

    def _element(self, raw: str, deltas: list[dict]) -> None:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            log.info("tool call element unreadable, skipped: %.80r", raw)
            return
        params = value.get("parameters", value.get("arguments", {}))
        arguments = params if isinstance(params, str) else json.dumps(params, ensure_ascii=False)
        call = {"id": tool_call_id(), "type": "function", "function": {"name": value["name"], "arguments": arguments}}
        self.calls.append(call)
        deltas.append({"index": len(self.calls) - 1, **call, "function": dict(call["function"])})

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        self.text += text
        deltas: list[dict] = []
        while self.pos < len(self.text):
            if self.scanner is not None:
                n = self.scanner.take(self.text[self.pos :])
                self.pos += n
                if self.scanner.done:
                    self._element(self.text[self.element_start : self.pos], deltas)
                    self.scanner = None
                continue
            ch = self.text[self.pos]
            if not self.opened:
                if ch == "[":
                    self.opened = True
                elif not ch.isspace():
                    self.pos = len(self.text)  # not an array: nothing here is a call
                    break
            elif ch == "{":
                self.scanner, self.element_start = ValueScanner(), self.pos
                continue
            self.pos += 1
        if final and not self.calls:  # the engine did not hold the output to the array
            log.info("tool_choice required: the output is not an array of calls, returned as content")
            return self.text, []
        return "", deltas


class NamedToolParser:
    """The output is the arguments of a call to ``name``."""

    def __init__(self, name: str):
        self.call = {"id": tool_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls = [self.call]
        self.started = False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        deltas = []
        if not self.started:
            self.started = True
            deltas.append({"index": 0, **self.call, "function": dict(self.call["function"])})
        if text:
            self.call["function"]["arguments"] += text
            deltas.append({"index": 0, "function": {"arguments": text}})
        return "", merge_deltas(deltas)

