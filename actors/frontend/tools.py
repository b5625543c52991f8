"""Tool calling, the request side: ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` checked into
a ``ToolSpec``, the constraint a forced choice puts on the output, the tool messages of a
conversation, and how tools reach the chat template.

``tool_choice`` decides how the output becomes ``message.tool_calls`` (``tool_parsers.py``):

- ``none``: no tool calls; the tools are not shown to the model.
- ``auto`` (the default when tools are given and the server has ``--tool-call-parser``; without
  one the default is ``none`` and an explicit ``auto`` is a 400, as vLLM answers): the model may
  write ``<tool_call>{"name", "arguments"}</tool_call>`` blocks (ERNIE's format), parsed out of the text.
- ``required``: the output is constrained to a JSON array of ``{"name", "parameters"}`` objects,
  one schema per tool (``anyOf``; ``maxItems`` 1 unless ``parallel_tool_calls``), as vLLM does.
- ``{"type": "function", "function": {"name"}}``: the output is constrained to that function's
  parameters schema; it is the arguments of the one call.

Templates: one that names ``tools`` (HF's ``apply_chat_template(tools=...)`` convention) gets the
tools as the variable ``tools`` and the messages as they are (assistant ``tool_calls``, ``tool``
messages with ``tool_call_id``). Any other template — the built-in model's has no tool support —
gets them rendered into plain messages first (``fallback_messages``): the tools as a system
section, an assistant's calls as ``<tool_call>`` blocks, a tool result as a user turn holding
``<tool_response>...</tool_response>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pdbus.messages import StructuredOutput

from .errors import OpenAIError, check_text, invalid, short, type_name, unsupported
from .structured import check_schema_structure, json_schema_output

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's function names (a dot too, as vLLM takes)
CHOICES = ("none", "auto", "required")


@dataclass
class ToolSpec:
    tools: list[dict] = field(default_factory=list)  # [{"name", "description"?, "parameters"?}]
    choice: str = "none"  # none | auto | required | function
    name: str | None = None  # the function tool_choice names
    parallel: bool = True

    def parameters(self, name: str) -> dict:
        tool = next(t for t in self.tools if t["name"] == name)
        return tool.get("parameters") or {"type": "object"}


def _function(i: int, tool: Any) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise invalid(where, f"'{where}' must be an object, got {type_name(tool)}.")
    if tool.get("type", "function") != "function":
        raise unsupported(f"{where}.type", f"Tool type {short(tool.get('type'))} (only 'function' is)")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise invalid(f"{where}.function", f"'{where}.function' must be an object.")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid(
            f"{where}.function.name",
            f"'{where}.function.name' must be 1 to 64 letters, digits, '_', '-' or '.', got {short(name)}.",
        )
    out: dict = {"name": name}
    description = fn.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise invalid(f"{where}.function.description", f"'{where}.function.description' must be a string.")
        out["description"] = check_text(f"{where}.function.description", description)
    parameters = fn.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise invalid(f"{where}.function.parameters", f"'{where}.function.parameters' must be a JSON schema object.")
        json_schema_output(parameters, f"{where}.function.parameters")  # a bad schema is a 400 whatever the choice
        out["parameters"] = parameters
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid(f"{where}.function.strict", f"'{where}.function.strict' must be a boolean.")
    return out


def parse_tools(tools: Any, tool_choice: Any, parallel: Any, *, auto_tools: bool) -> ToolSpec | None:
    """The three fields (each None when absent or null); None when no tools are involved."""
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "'parallel_tool_calls' must be a boolean.")
    if tools is not None and not isinstance(tools, list):
        raise invalid("tools", f"'tools' must be a list of tools, got {type_name(tools)}.")
    if tools is not None and len(tools) > MAX_TOOLS:
        raise invalid("tools", f"'tools' must hold at most {MAX_TOOLS} tools, got {len(tools)}.")
    functions = [_function(i, t) for i, t in enumerate(tools or [])]
    names = [f["name"] for f in functions]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise invalid("tools", f"'tools' names the function {short(duplicate)} more than once.")

    name = None
    if tool_choice is None:
        choice = "auto" if functions and auto_tools else "none"
    elif isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise invalid("tool_choice", f"'tool_choice' must be one of none, auto, required or a function, got {short(tool_choice)}.")
        choice = tool_choice
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid("tool_choice", "'tool_choice' as an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}.")
        choice, name = "function", fn["name"]
        if name not in names:
            given = ", ".join(names) if names else "none"
            raise invalid("tool_choice", f"'tool_choice' names the function {short(name)}, which is not in 'tools' (given: {given}).")
    else:
        raise invalid("tool_choice", f"'tool_choice' must be a string or an object, got {type_name(tool_choice)}.")
    if choice in ("auto", "required") and not functions:
        raise invalid("tool_choice", f"'tool_choice' {choice!r} needs a non-empty 'tools'.")
    if choice == "auto" and not auto_tools:
        raise OpenAIError(
            "'tool_choice' 'auto' needs a server started with --tool-call-parser (e.g. ernie_x1).",
            param="tool_choice",
            code="unsupported_parameter",
        )
    if not functions and choice == "none":
        return None
    return ToolSpec(functions, choice, name, True if parallel is None else parallel)


def tool_structured(spec: ToolSpec | None) -> StructuredOutput | None:
    """The constraint of a forced choice: the named function's parameters, or (``required``) an
    array of ``{"name": one of the tools, "parameters": its schema}``."""
    if spec is None or spec.choice not in ("required", "function"):
        return None
    if spec.choice == "function":
        return StructuredOutput("json_schema", json.dumps(spec.parameters(spec.name), ensure_ascii=False))
    items = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t["name"]]}, "parameters": spec.parameters(t["name"])},
            "required": ["name", "parameters"],
        }
        for t in spec.tools
    ]
    schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not spec.parallel:
        schema["maxItems"] = 1
    check_schema_structure(schema, "tools")
    return StructuredOutput("json_schema", json.dumps(schema, ensure_ascii=False))


# --------------------------------------------------------------------------- messages


def parse_tool_calls_field(where: str, value: Any) -> list[dict]:
    """An assistant message's ``tool_calls``: ``[{id, type: function, function: {name, arguments}}]``."""
    if not isinstance(value, list):
        raise invalid(where, f"'{where}' must be a list of tool calls.")
    out = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise invalid(at, f"'{at}' must be an object.")
        if call.get("type", "function") != "function":
            raise unsupported(f"{at}.type", f"Tool call type {short(call.get('type'))} (only 'function' is)")
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{at}.function", f"'{at}.function' must be an object with a string 'name'.")
        arguments = fn.get("arguments", "")
        if isinstance(arguments, dict):  # some clients send the object itself
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str):
            raise invalid(f"{at}.function.arguments", f"'{at}.function.arguments' must be a JSON string.")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise invalid(f"{at}.id", f"'{at}.id' must be a string.")
        check_text(f"{at}.function", fn["name"] + arguments + (call_id or ""))
        item = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
        if call_id is not None:
            item["id"] = call_id
        out.append(item)
    return out


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return arguments


def call_block(name: str, arguments: Any) -> str:
    """One call in the model's own format (ERNIE's ``<tool_call>`` block)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def tools_section(spec: ToolSpec) -> str:
    lines = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in spec.tools)
    return (
        "# Tools\n\nThese functions are available. To call one or more of them, answer with one block per call:\n"
        '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>\n\n'
        f"<tools>\n{lines}\n</tools>"
    )


def fallback_messages(messages: list[dict], spec: ToolSpec | None) -> list[dict]:
    """Messages for a template without tool support: tools, calls and results as plain text."""
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        elif role == "assistant" and m.get("tool_calls"):
            blocks = [call_block(c["function"]["name"], _arguments_value(c["function"]["arguments"])) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join([content, *blocks] if content else blocks)})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if spec is not None and spec.tools and spec.choice != "none":
        section = tools_section(spec)
        if out and out[0]["role"] == "system":
            out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{section}" if out[0]["content"] else section)
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def template_inputs(messages: list[dict], spec: ToolSpec | None, native: bool) -> tuple[list[dict], dict]:
    """The messages and extra template variables for this request's template (``native``: it
    handles ``tools`` itself)."""
    if not native:
        return fallback_messages(messages, spec), {}
    if spec is None or not spec.tools or spec.choice == "none":
        return messages, {}
    return messages, {"tools": [{"type": "function", "function": t} for t in spec.tools]}
