"""Structured output, tool calls and the reasoning split through the real OpenAI frontend over
HTTP, with the official ``openai`` client: ``response_format`` and vLLM's guided fields mapped to
``SamplingParams.structured`` (checked on what the backend is asked), bad schemas a 400, and
model text (the built-in tokenizer's real tokens, one per event) parsed into ``tool_calls`` and
``reasoning_content`` — streamed and whole alike. The backend is a small fake neighbour that
streams a scripted text; everything in front of it is the server as it runs in the router."""

from __future__ import annotations

import asyncio
import json

import msgspec
import openai
import pytest
from test_bad_input import Served

from actors.frontend import protocol as P
from actors.frontend.server import OpenAIServer
from actors.frontend.tokenizer import Tokenizer
from pdbus.messages import Generate, SamplingParams, StructuredOutput, TokenOut

MODEL = "m"
MAX_LEN = 4096
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}}},
    "required": ["name", "age"],
    "$defs": {"tag": {"type": "string", "enum": ["a", "b"]}},
}  # fmt: skip
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
USER = [{"role": "user", "content": "北京天气怎么样？"}]


def completion(**body):
    return P.parse_completion_request(dict({"prompt": "x"}, **body), model_names=[MODEL], max_model_len=64)


def chat(**body):
    return P.parse_chat_request(dict({"messages": USER}, **body), model_names=[MODEL], max_model_len=64, auto_tools=True)


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("body", "want"),
    [
        (dict(response_format={"type": "text"}), None),
        (dict(response_format={"type": "json_object"}), StructuredOutput("json_object")),
        (
            dict(response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}),
            StructuredOutput("json_schema", json.dumps(SCHEMA, ensure_ascii=False)),
        ),
        (dict(guided_json=SCHEMA), StructuredOutput("json_schema", json.dumps(SCHEMA, ensure_ascii=False))),
        (dict(guided_json=json.dumps(SCHEMA)), StructuredOutput("json_schema", json.dumps(SCHEMA, ensure_ascii=False))),
        (dict(guided_regex=r"\d{3}-[a-z]+"), StructuredOutput("regex", r"\d{3}-[a-z]+")),
        (dict(guided_choice=["是", "否", "是"]), StructuredOutput("choice", '["是", "否"]')),
        (dict(guided_grammar='root ::= "yes" | "no"'), StructuredOutput("ebnf", 'root ::= "yes" | "no"')),
        (dict(structured_outputs={"json": SCHEMA}), StructuredOutput("json_schema", json.dumps(SCHEMA, ensure_ascii=False))),
        (dict(structured_outputs={"regex": "a+"}), StructuredOutput("regex", "a+")),
        (dict(structured_outputs={"choice": ["x"]}), StructuredOutput("choice", '["x"]')),
        (dict(structured_outputs={"grammar": 'root ::= "a"'}), StructuredOutput("ebnf", 'root ::= "a"')),
        (dict(structured_outputs={"json_object": True}), StructuredOutput("json_object")),
    ],
)
def test_request_fields_map_to_one_structured_output(body, want):
    assert chat(**body).sampling.structured == want
    if "response_format" not in body:  # vLLM's fields work on /v1/completions too
        assert completion(**body).sampling.structured == want
    # and the constraint crosses the bus as it is
    sampling = chat(**body).sampling
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(sampling), type=SamplingParams).structured == want


def test_a_bus_clients_constraint_takes_the_same_checks():
    frontend = OpenAIServer(None, None, MODEL, 64)
    for so in [StructuredOutput("json_schema", json.dumps(SCHEMA)), StructuredOutput("regex", "a+"), StructuredOutput("json_object")]:
        req, _ = frontend.prepare(*P.generate_body(Generate(req_id="r", prompt_token_ids=[5], sampling=SamplingParams(structured=so))))
        assert req.sampling.structured.kind == so.kind
        assert (json.loads(req.sampling.structured.spec) if so.kind == "json_schema" else req.sampling.structured.spec) == (
            json.loads(so.spec) if so.kind == "json_schema" else so.spec
        )
    bad = Generate(req_id="r", prompt_token_ids=[5], sampling=SamplingParams(structured=StructuredOutput("json_schema", '{"type": "nope"}')))
    with pytest.raises(P.OpenAIError, match="unknown type"):
        frontend.prepare(*P.generate_body(bad))


BAD = [
    (dict(response_format="json"), "response_format", "object"),
    (dict(response_format={"type": "yaml"}), "response_format", "not supported"),
    (dict(response_format={"type": "structural_tag"}), "response_format", "not supported"),
    (dict(response_format={"type": "json_schema"}), "response_format.json_schema", "object"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema", "required"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "yes"}}), "response_format.json_schema.strict", "boolean"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": [1]}}), "response_format.json_schema.schema", "object or a boolean"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}), "response_format.json_schema.schema", "unknown type"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}), "response_format.json_schema.schema", "points to nothing"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"$ref": "https://x/y.json"}}}), "response_format.json_schema.schema", "inside the schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"properties": []}}}), "response_format.json_schema.schema", "object of schemas"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"anyOf": []}}}), "response_format.json_schema.schema", "non-empty list"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "string", "minLength": -1}}}), "response_format.json_schema.schema", "non-negative"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"required": "name"}}}), "response_format.json_schema.schema", "list of strings"),
    (dict(guided_json="{not json"), "guided_json", "not JSON"),
    (dict(guided_regex="a(b"), "guided_regex", "regular expression"),
    (dict(guided_regex=""), "guided_regex", "non-empty"),
    (dict(guided_choice=[]), "guided_choice", "non-empty list"),
    (dict(guided_choice=["a", 1]), "guided_choice", "strings"),
    (dict(guided_grammar="root ::= "), "guided_grammar", "EBNF"),
    (dict(guided_grammar="start ::= \"a\""), "guided_grammar", "EBNF"),
    (dict(structured_outputs="json"), "structured_outputs", "object"),
    (dict(structured_outputs={"xml": "x"}), "structured_outputs.xml", "not supported"),
    (dict(structured_outputs={"json_object": "yes"}), "structured_outputs.json_object", "boolean"),
    (dict(guided_regex="a", guided_choice=["a"]), "guided_choice", "Only one"),
    (dict(guided_regex="a", response_format={"type": "json_object"}), "response_format", "Only one"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param", "words"), BAD, ids=[f"{p}:{w}" for _, p, w in BAD])
def test_bad_structured_output_is_a_400_naming_the_field(body, param, words):
    with pytest.raises(P.OpenAIError) as info:
        chat(**body)
    err = info.value
    assert err.status == 400 and err.param == param and words in err.message, (err.param, err.message)
    assert set(err.to_dict()["error"]) == {"message", "type", "param", "code"}


# --------------------------------------------------------------------------- HTTP, a scripted backend


class ScriptedBackend:
    """Streams ``script`` as the built-in tokenizer's tokens, one per event; remembers what it was asked."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.script = "好的。"
        self.asked: list[SamplingParams] = []

    def ready(self) -> bool:
        return True

    def stats(self) -> dict:
        return {}

    async def generate(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams):
        self.asked.append(sampling)
        ids = self.tokenizer.encode(self.script)[: sampling.max_tokens]
        for i, t in enumerate(ids):
            await asyncio.sleep(0)
            yield TokenOut(req_id, [t], finish_reason="stop" if i == len(ids) - 1 else None)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer(default_model_dir)


@pytest.fixture
def served(tokenizer):
    frontend = OpenAIServer(
        ScriptedBackend(tokenizer), tokenizer, MODEL, MAX_LEN, vocab_size=1024, tool_call_parser="ernie_x1", reasoning_parser="ernie_x1"
    )
    s = Served(frontend)
    yield s
    s.close()


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="unused", max_retries=0, timeout=30)


def streamed(client, **kw) -> tuple[list, dict]:
    """The chunks, and the message a client assembles from them."""
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kw))
    content, reasoning, calls, finish = "", "", {}, None
    for ch in chunks:
        for c in ch.choices:
            d = c.delta
            assert "<tool_call>" not in (d.content or "") and "</think>" not in (d.content or "") + (getattr(d, "reasoning_content", None) or "")
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            for t in d.tool_calls or []:
                if t.index not in calls:
                    assert t.id and t.type == "function" and t.function.name, t
                    calls[t.index] = {"id": t.id, "name": t.function.name, "arguments": t.function.arguments or ""}
                else:
                    assert t.id is None and t.function.name is None, t
                    calls[t.index]["arguments"] += t.function.arguments or ""
            finish = c.finish_reason or finish
    return chunks, {"content": content, "reasoning": reasoning, "calls": [calls[i] for i in sorted(calls)], "finish": finish}


def test_response_format_reaches_the_backend(served, client):
    resp = client.chat.completions.create(
        model=MODEL, messages=USER, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    )
    assert resp.choices[0].message.content == "好的。"
    assert served.frontend.backend.asked[-1].structured == StructuredOutput("json_schema", json.dumps(SCHEMA, ensure_ascii=False))
    client.completions.create(model=MODEL, prompt="x", extra_body={"guided_regex": "[0-9]+"})
    assert served.frontend.backend.asked[-1].structured == StructuredOutput("regex", "[0-9]+")
    client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"}, n=2)
    assert [s.structured for s in served.frontend.backend.asked[-2:]] == [StructuredOutput("json_object")] * 2


def test_bad_input_through_the_openai_client_is_a_400_and_asks_nothing(served, client):
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "bogus"}}}), "response_format.json_schema.schema"),
        (dict(response_format={"type": "xml"}), "response_format"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(extra_body={"tools": {"type": "function"}}), "tools"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}}]), "tools[0].function.parameters"),
        (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id"),
    ]  # fmt: skip
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, **dict({"messages": USER}, **kw))
        assert info.value.status_code == 400 and info.value.body["param"] == param, (kw, info.value.body)
    assert served.frontend.backend.asked == []


TOOL_TEXT = '我来查。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'


def test_tool_calls_parsed_from_text_whole_and_streamed(served, client):
    served.frontend.backend.script = TOOL_TEXT
    whole = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER])
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content == "我来查。"
    (call,) = message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "北京"})
    assert served.frontend.backend.asked[-1].structured is None  # auto: the text is parsed, not constrained
    chunks, got = streamed(client, messages=USER, tools=[WEATHER])
    assert got["finish"] == "tool_calls" and got["content"] == "我来查。"
    assert [(c["name"], c["arguments"]) for c in got["calls"]] == [("get_weather", call.function.arguments)]
    assert sum(1 for ch in chunks for c in ch.choices if c.delta.tool_calls) >= 3  # name, then argument fragments
    # tool_choice none: the same text is content, markup and all
    plain = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="none")
    assert plain.choices[0].message.content == TOOL_TEXT and not plain.choices[0].message.tool_calls


def test_a_tool_round_trip(served, client):
    served.frontend.backend.script = TOOL_TEXT
    first = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER]).choices[0].message
    served.frontend.backend.script = "北京今天晴。"
    history = [*USER, first.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "晴，25度"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])
    assert answer.choices[0].message.content == "北京今天晴。" and answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens > len(served.frontend.tokenizer.encode("晴，25度"))


def test_required_and_named_choices_are_constrained_and_wrapped(served, client):
    served.frontend.backend.script = '[{"name": "get_weather", "parameters": {"city": "上海"}}]'
    req = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(served.frontend.backend.asked[-1].structured.spec)
    assert schema["maxItems"] == 1 and schema["items"]["anyOf"][0]["properties"]["name"]["enum"] == ["get_weather"]
    assert req.choices[0].finish_reason == "tool_calls" and req.choices[0].message.content is None
    assert json.loads(req.choices[0].message.tool_calls[0].function.arguments) == {"city": "上海"}
    _, got = streamed(client, messages=USER, tools=[WEATHER], tool_choice="required")
    assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == [("get_weather", {"city": "上海"})]

    served.frontend.backend.script = '{"city": "广州"}'
    named = {"type": "function", "function": {"name": "get_weather"}}
    resp = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice=named)
    assert json.loads(served.frontend.backend.asked[-1].structured.spec) == WEATHER["function"]["parameters"]
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].message.tool_calls[0].function.arguments == '{"city": "广州"}'
    _, got = streamed(client, messages=USER, tools=[WEATHER], tool_choice=named)
    assert got["calls"][0]["arguments"] == '{"city": "广州"}' and got["content"] == ""


def test_reasoning_split_whole_and_streamed(served, client):
    served.frontend.backend.script = "<think>用户问天气。</think>\n\n<response>\n北京晴。\n</response>"
    whole = client.chat.completions.create(model=MODEL, messages=USER).choices[0].message
    assert (whole.reasoning_content, whole.content) == ("用户问天气。", "北京晴。")
    _, got = streamed(client, messages=USER)
    assert (got["reasoning"], got["content"]) == ("用户问天气。", "北京晴。")
    served.frontend.backend.script = "不用想。"  # no <think>: all content, no reasoning_content
    plain = client.chat.completions.create(model=MODEL, messages=USER).choices[0].message
    assert plain.content == "不用想。" and getattr(plain, "reasoning_content", None) is None
    # a constrained output has no reasoning to split
    served.frontend.backend.script = "<think>x</think>y"
    constrained = client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"})
    assert constrained.choices[0].message.content == "<think>x</think>y"


def test_reasoning_then_tool_call_streamed(served, client):
    served.frontend.backend.script = "<think>要查天气。</think>\n\n" + TOOL_TEXT.split("\n", 1)[1]
    _, got = streamed(client, messages=USER, tools=[WEATHER])
    assert got["reasoning"] == "要查天气。" and got["content"] == "" and got["finish"] == "tool_calls"
    assert json.loads(got["calls"][0]["arguments"]) == {"city": "北京"}
