"""A chat choice's text as an assistant message: the reasoning split (``reasoning.py``), then tool
calls out of what is content (``tool_parsers.py``). The server feeds each detokenized delta
(after stop strings) and gets the pieces of the next chunk; a whole answer is the same feeding,
so a stream and a whole answer always agree.

Which parsers a request gets: the reasoning split when the server has ``--reasoning-parser`` and
the output is not constrained (a grammar holds the output from its first token, so there is no
reasoning to split); a tool parser by ``tool_choice`` (``tools.ToolSpec``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .reasoning import MARKUP as REASONING_MARKUP
from .reasoning import ErnieX1ReasoningParser
from .tool_parsers import (
    TOOL_END,
    TOOL_START,
    ErnieX1ToolParser,
    NamedToolParser,
    RequiredToolParser,
    merge_deltas,
)

MARKUP = (*REASONING_MARKUP, TOOL_START, TOOL_END)  # tags the parsers must see even when special tokens


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ChatOutput:
    def __init__(self, reasoning: ErnieX1ReasoningParser | None = None, tools=None, named: bool = False):
        self.reasoning = reasoning
        self.tools = tools
        self.named = named  # a forced function: OpenAI finishes it with "stop", not "tool_calls"
        self._reasoning: list[str] = []
        self._content: list[str] = []

    def feed(self, text: str, final: bool = False) -> Delta:
        reasoning, content = self.reasoning.feed(text, final) if self.reasoning is not None else ("", text)
        deltas: list[dict] = []
        if self.tools is not None:
            content, deltas = self.tools.feed(content, final)
        self._reasoning.append(reasoning)
        self._content.append(content)
        return Delta(reasoning, content, merge_deltas(deltas))

    @property
    def tool_calls(self) -> list[dict]:
        return list(self.tools.calls) if self.tools is not None else []

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.tool_calls and not self.named else reason

    def message(self) -> dict:
        """``content`` (null when calls were made and nothing else was said), ``reasoning_content``
        (when the choice reasoned) and ``tool_calls`` (when it made any)."""
        content: str | None = "".join(self._content)
        calls = self.tool_calls
        if calls and not content.strip():
            content = None
        out: dict = {"content": content}
        if self.reasoning is not None and self.reasoning.thought:
            out["reasoning_content"] = "".join(self._reasoning)
        if calls:
            out["tool_calls"] = calls
        return out


def chat_output(req, reasoning_parser: str | None) -> ChatOutput | None:
    """The parsers of one chat request (``protocol.ChatRequest``); None when its text is all content."""
    reasoning = None
    if reasoning_parser and req.sampling.structured is None:
        reasoning = ErnieX1ReasoningParser(req.prompt_text)
    spec = req.tools
    tools = None
    if spec is not None:
        if spec.choice == "auto":
            tools = ErnieX1ToolParser(spec.parallel)
        elif spec.choice == "required":
            tools = RequiredToolParser()
        elif spec.choice == "function":
            tools = NamedToolParser(spec.name)
    if reasoning is None and tools is None:
        return None
    return ChatOutput(reasoning, tools, named=spec is not None and spec.choice == "function")
