"""Tool calling and the reasoning split in the OpenAI frontend, without a model: the request fields
(``tools.py``), the output parsers on strings cut at every boundary (``tool_parsers.py``,
``reasoning.py``, ``chat_output.py``) and how tools reach the chat template."""

from __future__ import annotations

import json

import pytest

from actors.frontend import protocol as P
from actors.frontend import tools as T
from actors.frontend.chat_output import ChatOutput
from actors.frontend.reasoning import ErnieX1ReasoningParser
from actors.frontend.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from actors.frontend.tool_parsers import ErnieX1ToolParser, NamedToolParser, RequiredToolParser, ValueScanner

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "北京天气怎么样？"}]


def chat(auto_tools: bool = True, **body):
    return P.parse_chat_request(dict({"messages": USER}, **body), model_names=["m"], max_model_len=64, auto_tools=auto_tools)


def refused(auto_tools: bool = True, **body) -> P.OpenAIError:
    with pytest.raises(P.OpenAIError) as info:
        chat(auto_tools, **body)
    assert info.value.status == 400
    return info.value


# --------------------------------------------------------------------------- request fields


def test_tool_choice_defaults_and_forms():
    assert chat(tools=[WEATHER]).tools.choice == "auto"
    assert chat(False, tools=[WEATHER]).tools.choice == "none"  # no parser: the tools are not offered
    assert chat(tools=[WEATHER], tool_choice="none").sampling.structured is None
    assert chat().tools is None and chat(tools=[]).tools is None
    named = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert (named.tools.choice, named.tools.name) == ("function", "get_weather")
    assert named.sampling.structured.kind == "json_schema"
    assert json.loads(named.sampling.structured.spec) == WEATHER["function"]["parameters"]
    assert chat(False, tools=[WEATHER], tool_choice="required").tools.choice == "required"  # constrained: no parser needed


@pytest.mark.parametrize("parallel", [True, False])
def test_required_is_an_array_of_calls_one_schema_per_tool(parallel):
    req = chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel)
    schema = json.loads(req.sampling.structured.spec)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert ("maxItems" in schema) is not parallel
    names = [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == WEATHER["function"]["parameters"]


BAD_TOOLS = [
    (dict(tools={"type": "function"}), "tools", "list"),
    (dict(tools="get_weather"), "tools", "list"),
    (dict(tools=[5]), "tools[0]", "object"),
    (dict(tools=[{"type": "retrieval"}]), "tools[0].type", "not supported"),
    (dict(tools=[{"type": "function"}]), "tools[0].function", "object"),
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools[0].function.name", "letters"),
    (dict(tools=[{"type": "function", "function": {"name": "x" * 65}}]), "tools[0].function.name", "64"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "description": 3}}]), "tools[0].function.description", "string"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]), "tools[0].function.parameters", "schema"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]), "tools[0].function.parameters", "unknown type"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/$defs/a"}}}]), "tools[0].function.parameters", "points to nothing"),
    (dict(tools=[WEATHER, WEATHER]), "tools", "more than once"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice", "not in 'tools'"),
    (dict(tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice", "not in 'tools'"),
    (dict(tools=[WEATHER], tool_choice={"type": "function"}), "tool_choice", "function"),
    (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice", "one of"),
    (dict(tools=[WEATHER], tool_choice=3), "tool_choice", "string or an object"),
    (dict(tool_choice="required"), "tool_choice", "non-empty 'tools'"),
    (dict(tools=[WEATHER], parallel_tool_calls="yes"), "parallel_tool_calls", "boolean"),
    (dict(functions=[{"name": "f"}]), "functions", "not supported"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice", "Only one"),
    (dict(messages=[{"role": "tool", "content": "sunny"}]), "messages[0].tool_call_id", "required"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "messages[0].tool_calls", "assistant"),
    (dict(messages=[{"role": "assistant", "content": None, "tool_calls": {}}]), "messages[0].tool_calls", "list"),
    (dict(messages=[{"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}]), "messages[0].tool_calls[0].function", "name"),
    (dict(messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}]), "messages[0].tool_calls[0].function.arguments", "JSON string"),
    (dict(messages=[{"role": "function", "content": "x"}]), "messages[0].role", "not supported"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param", "words"), BAD_TOOLS, ids=[f"{p}:{w}" for _, p, w in BAD_TOOLS])
def test_bad_tool_fields_are_a_400_naming_the_field(body, param, words):
    err = refused(**body)
    assert err.param == param and words in err.message, (err.param, err.message)


def test_auto_without_a_parser_is_a_400():
    err = refused(False, tools=[WEATHER], tool_choice="auto")
    assert err.param == "tool_choice" and "--tool-call-parser" in err.message


def test_a_tool_round_trip_conversation_is_accepted():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "晴，25度"}]},
    ]
    req = chat(messages=messages, tools=[WEATHER])
    assert req.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert req.messages[2] == {"role": "tool", "content": "晴，25度", "tool_call_id": "call_1"}


# --------------------------------------------------------------------------- templates


def test_the_builtin_template_gets_tools_calls_and_results_as_text(default_model_dir):
    tok = Tokenizer(default_model_dir)
    assert not tok.supports_tools
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        *USER,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "晴", "tool_call_id": "c"},
    ]
    spec = chat(tools=[WEATHER]).tools
    plain, extra = T.template_inputs(messages, spec, tok.supports_tools)
    assert extra == {} and [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    text = tok.apply_chat_template(plain)
    assert text.startswith(tok.special_tokens["cls_token"] + "Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert 'Assistant: <tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>' in text
    assert "User: <tool_response>\n晴\n</tool_response>\n" in text
    assert text.endswith("Assistant: ")
    none = chat(tools=[WEATHER], tool_choice="none").tools
    assert "# Tools" not in tok.apply_chat_template(T.template_inputs(USER, none, False)[0])


def test_a_template_with_tool_support_gets_them_as_hf_does(default_model_dir):
    tok = Tokenizer(default_model_dir)
    tok.chat_template = (
        "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}[{{ m.role }}{% if m.tool_call_id %} {{ m.tool_call_id }}{% endif %}]{{ m.content }}"
        "{% for c in m.tool_calls or [] %}(call {{ c.function.name }} {{ c.function.arguments }}){% endfor %}{% endfor %}"
    )
    tok._compiled_template = None
    assert tok.supports_tools
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [*USER, {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "晴", "tool_call_id": "c"}]
    plain, extra = T.template_inputs(messages, chat(tools=[WEATHER]).tools, tok.supports_tools)
    text = tok.apply_chat_template(plain, **extra)
    assert text == "[tool get_weather][user]北京天气怎么样？[assistant](call get_weather {})[tool c]晴"
    assert DEFAULT_CHAT_TEMPLATE.count("tools") == 0


# --------------------------------------------------------------------------- output parsers


def cuts(text: str):
    """The text cut into two pieces at every place, and one character at a time."""
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)


def run(parser, pieces) -> tuple[str, list[dict]]:
    content, deltas = [], []
    for i, piece in enumerate(pieces):
        c, d = parser.feed(piece, final=i == len(pieces) - 1)
        content.append(c)
        deltas += d
    return "".join(content), deltas


def assembled(deltas: list[dict]) -> list[dict]:
    """What a client builds from the deltas: one call per index, fragments joined."""
    calls: dict[int, dict] = {}
    for d in deltas:
        if d["index"] not in calls:
            assert {"id", "type", "function"} <= set(d) and d["type"] == "function" and d["id"].startswith("call_"), d
            assert d["function"]["name"], d
            calls[d["index"]] = {"name": d["function"]["name"], "arguments": d["function"].get("arguments", "")}
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}, d
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


ERNIE_OUTPUT = (
    "我来查一下。\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "北京", "note": "a } and a \\" and </tool_call>"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "get_time", "arguments": {}}\n</tool_call>\n'
)
ERNIE_CALLS = [
    {"name": "get_weather", "arguments": '{"city": "北京", "note": "a } and a \\" and </tool_call>"}'},
    {"name": "get_time", "arguments": "{}"},
]


def test_ernie_tool_calls_at_every_chunk_boundary():
    for pieces in cuts(ERNIE_OUTPUT):
        parser = ErnieX1ToolParser()
        content, deltas = run(parser, pieces)
        assert content == "我来查一下。", pieces
        assert assembled(deltas) == ERNIE_CALLS, pieces
        assert [c["function"]["arguments"] for c in parser.calls] == [c["arguments"] for c in ERNIE_CALLS]
        assert all(json.loads(c["arguments"]) is not None for c in assembled(deltas))


def test_ernie_text_without_calls_is_content_unchanged():
    for text in ["plain answer", "a < b and <tool but not a call", "ends with <tool_c", "spaces  \n\n"]:
        for pieces in cuts(text):
            content, deltas = run(ErnieX1ToolParser(), pieces)
            assert (content, deltas) == (text, []), pieces


def test_ernie_first_delta_has_the_name_then_argument_fragments():
    parser = ErnieX1ToolParser()
    assert parser.feed("<tool_call>\n{") == ("", [])
    _, first = parser.feed('"name": "get_weather", "arguments": ')
    assert first[0]["function"] == {"name": "get_weather", "arguments": ""} and first[0]["id"].startswith("call_")
    _, args = parser.feed('{"city"')
    assert args == [{"index": 0, "function": {"arguments": '{"city"'}}]
    _, more = parser.feed(': "x"}')
    assert more == [{"index": 0, "function": {"arguments": ': "x"}'}}]
    assert parser.feed("}\n</tool_call>", final=True) == ("", [])


def test_ernie_odd_blocks():
    # keys the other way round: read whole at the end tag
    content, deltas = run(ErnieX1ToolParser(), ['<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'])
    assert content == "" and assembled(deltas) == [{"name": "f", "arguments": '{"a": 1}'}]
    # not JSON: the block is content, as written
    bad = "<tool_call>not json</tool_call> after"
    assert run(ErnieX1ToolParser(), [bad]) == (bad, [])
    # cut off before the name: what it wrote is content
    assert run(ErnieX1ToolParser(), ["x <tool_call>\n{\"na"]) == ('x <tool_call>\n{"na', [])
    # cut off inside the arguments (length): the call as far as it went
    content, deltas = run(ErnieX1ToolParser(), ['<tool_call>{"name": "f", "arguments": {"a": [1, 2'])
    assert assembled(deltas) == [{"name": "f", "arguments": '{"a": [1, 2'}]
    # parallel_tool_calls false: the first call only
    content, deltas = run(ErnieX1ToolParser(parallel=False), [ERNIE_OUTPUT])
    assert content == "我来查一下。" and assembled(deltas) == ERNIE_CALLS[:1]


def test_value_scanner_ends_where_the_value_ends():
    for text, n in [('{"a": "}"} tail', 10), ("[1, [2]], x", 8), ('"s\\"x" y', 6), ("12, 3", 2), ("true}", 4)]:
        for pieces in cuts(text):
            s, used = ValueScanner(), 0
            for p in pieces:
                if not s.done:
                    used += s.take(p)
            assert used == n and s.done, (text, pieces)


def test_required_calls_at_every_chunk_boundary():
    text = '[{"name": "get_weather", "parameters": {"city": "[北京]"}}, {"name": "get_time", "parameters": {}}]'
    want = [{"name": "get_weather", "arguments": '{"city": "[北京]"}'}, {"name": "get_time", "arguments": "{}"}]
    for pieces in cuts(text):
        content, deltas = run(RequiredToolParser(), pieces)
        assert content == "" and assembled(deltas) == want, pieces
    # output the engine did not hold to the array: content, no calls
    assert run(RequiredToolParser(), ["sorry, no"]) == ("sorry, no", [])


def test_named_output_is_the_arguments():
    for pieces in cuts('{"city": "北京"}'):
        content, deltas = run(NamedToolParser("get_weather"), pieces)
        assert content == "" and assembled(deltas) == [{"name": "get_weather", "arguments": '{"city": "北京"}'}]


# --------------------------------------------------------------------------- reasoning


THINKING = "用户问天气。\n</think>\n\n<response>\n北京今天晴。\n</response>"


@pytest.mark.parametrize(
    ("prompt", "output", "reasoning", "content"),
    [
        ("Assistant: <think>\n", THINKING, "用户问天气。", "北京今天晴。"),
        ("Assistant: <think>\n", "a\n\nb\n</think>\n\n<response>\n\nx\ny\n\n</response>\n", "a\n\nb", "\nx\ny\n"),
        ("Assistant: <think>\n", "cut\n", "cut\n", ""),  # a newline no tag followed is text
        ("Assistant: ", "<think>想一想</think>\n\n答案", "想一想", "答案"),
        ("Assistant: ", "no thinking here", None, "no thinking here"),
        ("Assistant: ", "  <thin", None, "  <thin"),  # looked like a tag, was not
        ("Assistant: <think>\n", "still thinking when cut off", "still thinking when cut off", ""),
        ("Assistant: <think>", "a</think>b</think>c", "a", "b</think>c"),
    ],
)
def test_reasoning_split_at_every_chunk_boundary(prompt, output, reasoning, content):
    for pieces in cuts(output):
        parser = ErnieX1ReasoningParser(prompt)
        got_r, got_c = [], []
        for i, piece in enumerate(pieces):
            r, c = parser.feed(piece, final=i == len(pieces) - 1)
            assert "</think>" not in r and "<response>" not in c, pieces
            got_r.append(r)
            got_c.append(c)
        assert ("".join(got_r) if parser.thought else None, "".join(got_c)) == (reasoning, content), pieces


def test_reasoning_then_a_tool_call_in_one_message():
    output = '先查天气。</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    for pieces in cuts(output):
        out = ChatOutput(ErnieX1ReasoningParser("<think>"), ErnieX1ToolParser())
        reasoning, content, calls = "", "", []
        for i, piece in enumerate(pieces):
            d = out.feed(piece, final=i == len(pieces) - 1)
            reasoning, content, calls = reasoning + d.reasoning, content + d.content, calls + d.tool_calls
        assert (reasoning, content) == ("先查天气。", "")
        assert assembled(calls) == [{"name": "get_weather", "arguments": '{"city": "北京"}'}]
        message = out.message()
        assert message["content"] is None and message["reasoning_content"] == "先查天气。"
        assert out.finish_reason("stop") == "tool_calls" and out.finish_reason("length") == "length"


def test_parser_flags_reach_the_router_a_mixed_serve_starts(default_model_dir):
    from pdbus.config import ServeConfig
    from pdbus.launch import router_flags

    cfg = ServeConfig(model=default_model_dir, tool_call_parser="ernie-x1", reasoning_parser="ERNIE_X1", enable_auto_tool_choice=True)
    flags = router_flags(cfg.validate(check_port=False))
    assert flags[-5:] == ["--tool-call-parser", "ernie_x1", "--reasoning-parser", "ernie_x1", "--enable-auto-tool-choice"]
