"""Structured output, tools and the reasoning split on real processes with the built-in model and
with a random-weight MoE checkpoint (its tokenizer the built-in one's), in both paths: mixed (``pdbus serve`` starting its router, the parser flags passed on to it) and PD
(router, prefill and decode). Requests go through the official ``openai`` client.

The engine enforces ``SamplingParams.structured`` (actors/engine/grammar.py), so every output asked
for under a schema — response_format, a required or named tool call — parses and fits it, with a
model that never saw JSON; fields are accepted and mapped, tool messages rendered, bad input
refused, and a stream equals the whole answer. The built-in model, trained on its weather tool and
on a few additions asked with thinking on, calls the tool and answers from its result, and thinks
when asked (reasoning_content, then the answer as content).
"""

from __future__ import annotations

import json
import os
import shutil

import openai
import pytest
from test_pd import start_pd

from pdbus.procs import Cluster, http_json

FLAGS = ("--tool-call-parser", "ernie_x1", "--enable-auto-tool-choice", "--reasoning-parser", "ernie-x1")
TIMEOUT_S = 120
SCHEMA = {
    "type": "object",
    # bounded: the built-in model never closes a free string, so only the grammar ends one
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "查询城市天气", "parameters": SCHEMA},
}
USER = [{"role": "user", "content": "北京天气怎么样？"}]


@pytest.fixture(scope="session")
def random_model_dir(default_model_dir, tmp_path_factory) -> str:
    """A random-weight ERNIE-4.5 MoE checkpoint (transformers ``save_pretrained``) with the
    built-in model's tokenizer, its vocabulary wider than the tokenizer's (as ERNIE's is)."""
    from conftest_model import TINY_CONFIGS, build_hf, save_hf

    kind, kw = TINY_CONFIGS["moe_shared"]
    out = str(tmp_path_factory.mktemp("random-moe-tok"))
    save_hf(build_hf("random", configs={"random": (kind, dict(kw, vocab_size=1056))}), out)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(default_model_dir, name), out)
    return out


@pytest.fixture(
    scope="module",
    params=["mixed", pytest.param("pd", marks=pytest.mark.slow), "random-mixed", pytest.param("random-pd", marks=pytest.mark.slow)],
)
def system(request, default_model_dir, random_model_dir, tmp_path_factory):
    """The API URL of a running system of the given kind (the built-in model, or a random
    checkpoint with its tokenizer), with the parsers on."""
    model = random_model_dir if request.param.startswith("random") else default_model_dir
    with Cluster(tmp_path_factory.mktemp(f"tools-{request.param}")) as c:
        if request.param.endswith("mixed"):
            proc = c.serve(model, "mixed", None, "--max-model-len", "1024", "--device", "cpu", *FLAGS)
            c.wait_health(proc.url, timeout=180)
        else:
            proc = start_pd(c, model, "tcp", *FLAGS, serve_extra=("--max-model-len", "1024"))
        yield proc.url


@pytest.fixture(scope="module")
def client(system) -> openai.OpenAI:
    return openai.OpenAI(base_url=system + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def create(client, **kw):
    return client.chat.completions.create(model=client.models.list().data[0].id, **dict({"messages": USER, "temperature": 0, "max_tokens": 48}, **kw))


def test_response_format_and_guided_fields_are_accepted(client):
    for fmt in [{"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}]:
        resp = create(client, response_format=fmt)
        assert resp.choices[0].finish_reason in ("stop", "length") and isinstance(resp.choices[0].message.content, str)
    model = client.models.list().data[0].id
    done = client.completions.create(model=model, prompt="北京", max_tokens=8, extra_body={"guided_regex": "[0-9]{3}"})
    assert done.choices[0].finish_reason in ("stop", "length")


def test_bad_input_is_a_400_and_the_system_keeps_serving(client):
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "bogus"}}}), "response_format.json_schema.schema"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {"$ref": "#/$defs/none"}}}), "response_format.json_schema.schema"),
        (dict(response_format={"type": "yaml"}), "response_format"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice"),
        (dict(extra_body={"tools": "get_weather"}), "tools"),
        (dict(extra_body={"guided_regex": "a("}), "guided_regex"),
    ]  # fmt: skip
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            create(client, **kw)
        assert info.value.status_code == 400 and info.value.body["param"] == param, (kw, info.value.body)
    assert create(client).choices[0].message.content


def test_a_tool_round_trip_is_rendered_and_answered(client):
    plain = create(client, max_tokens=1).usage.prompt_tokens
    offered = create(client, tools=[WEATHER], max_tokens=1).usage.prompt_tokens
    assert offered > plain  # the tools reached the prompt (the built-in template's fallback rendering)
    assert create(client, tools=[WEATHER], tool_choice="none", max_tokens=1).usage.prompt_tokens == plain
    call = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 1}'}}
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_abc", "content": "晴，25度"}]
    answer = create(client, messages=history, tools=[WEATHER])
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > offered


def test_stream_equals_whole_with_the_parsers_on(client):
    whole = create(client, tools=[WEATHER], max_tokens=32)
    chunks = list(client.chat.completions.create(
        model=whole.model, messages=USER, tools=[WEATHER], temperature=0, max_tokens=32, stream=True
    ))  # fmt: skip
    content = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
    message = whole.choices[0].message
    assert content == (message.content or "")
    streamed_calls = [t for ch in chunks for c in ch.choices for t in c.delta.tool_calls or []]
    assert bool(streamed_calls) == bool(message.tool_calls)
    assert getattr(message, "reasoning_content", None) is None  # the built-in model does not think: all content


def test_enable_thinking_reaches_the_template(system):
    """The built-in template (both systems' tokenizer) opens <think> at the end of the prompt when
    asked, so the choice starts in the reasoning; off (FastDeploy's shortcut field) it does not."""
    body = {"messages": USER, "max_tokens": 1, "temperature": 0}
    status, on = http_json(system + "/v1/chat/completions", dict(body, chat_template_kwargs={"enable_thinking": True}), timeout=TIMEOUT_S)
    assert status == 200 and "reasoning_content" in on["choices"][0]["message"], on
    status, off = http_json(system + "/v1/chat/completions", dict(body, enable_thinking=False), timeout=TIMEOUT_S)
    assert status == 200 and "reasoning_content" not in off["choices"][0]["message"], off
    assert on["usage"]["prompt_tokens"] > off["usage"]["prompt_tokens"]


def test_json_schema_output_validates(client):
    text = create(client, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}, max_tokens=64)
    assert text.choices[0].finish_reason == "stop"
    value = json.loads(text.choices[0].message.content)
    assert set(value) == {"city", "days"} and isinstance(value["city"], str) and isinstance(value["days"], int)


def test_a_schema_that_cannot_finish_in_max_tokens_ends_with_length(client):
    text = create(client, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}, max_tokens=3)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 3


def test_json_object_output_is_an_object(client):
    """Any object: its keys are free strings, which the built-in model may never close — then the
    answer ends by length as a prefix of an object, never as broken JSON marked stop."""
    choice = create(client, response_format={"type": "json_object"}, max_tokens=64).choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"])
def test_forced_tool_calls_have_valid_arguments(client, choice):
    # one call (with parallel calls allowed the array's length is the model's to choose); the
    # built-in model spells JSON a character a token, so the whole array takes ~80 tokens
    resp = create(client, tools=[WEATHER], tool_choice=choice, max_tokens=160, parallel_tool_calls=False)
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "days"} and isinstance(arguments["days"], int)


def test_the_built_in_model_calls_its_tool_and_answers_from_the_result(request, client):
    """tool_choice auto with the built-in model, which was trained on its weather tool: the call
    is parsed into tool_calls (finish_reason tool_calls), streamed the same, and the tool's result
    sent back is answered in words (its weather and temperature)."""
    if request.node.callspec.params["system"].startswith("random"):
        pytest.skip("a random checkpoint calls no tool of its own accord")
    from tools.default_model.corpus import WEATHER_TOOL

    tools = [{"type": "function", "function": WEATHER_TOOL}]
    ask = [{"role": "user", "content": "上海天气怎么样？"}]
    resp = create(client, messages=ask, tools=tools, max_tokens=64)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "上海", "days": 1}
    chunks = list(create(client, messages=ask, tools=tools, max_tokens=64, stream=True))
    streamed = "".join(t.function.arguments or "" for ch in chunks for c in ch.choices for t in c.delta.tool_calls or [])
    assert json.loads(streamed) == json.loads(call.function.arguments)
    result = json.dumps({"city": "上海", "weather": "晴", "temp_c": 21}, ensure_ascii=False)
    follow = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    answer = create(client, messages=follow, tools=tools, max_tokens=64).choices[0]
    # the result's weather and temperature in a sentence (the 2M-parameter model's grip on the
    # city's name is looser: it is not asserted)
    assert answer.finish_reason == "stop" and not answer.message.tool_calls, answer
    assert "晴" in answer.message.content and "21°C" in answer.message.content, answer


THINK = {"chat_template_kwargs": {"enable_thinking": True}}


@pytest.mark.parametrize(("question", "answer"), [("What is 12 + 7?", "12 + 7 = 19."), ("12 加 7 等于多少？", "12 + 7 = 19。")])
def test_the_built_in_model_thinks_when_asked(request, client, question, answer):
    """enable_thinking with the built-in model, trained on a few additions asked that way: the
    template ends the prompt with <think>, the model reasons, writes </think> and the answer in
    <response>; the reasoning parser makes that reasoning_content and content, a stream carries
    the reasoning first and then the content, and thinking off gives the answer alone."""
    if request.node.callspec.params["system"].startswith("random"):
        pytest.skip("a random checkpoint does not think")
    ask = [{"role": "user", "content": question}]
    choice = create(client, messages=ask, max_tokens=64, extra_body=THINK).choices[0]
    reasoning, content = getattr(choice.message, "reasoning_content", None), choice.message.content
    assert choice.finish_reason == "stop" and reasoning and "19" in reasoning, choice
    assert content == answer and not reasoning.endswith("\n"), choice  # the tags' newlines are markup
    assert not any(tag in reasoning + content for tag in ("<think>", "</think>", "<response>", "</response>"))

    deltas = [c.delta for ch in create(client, messages=ask, max_tokens=64, extra_body=THINK, stream=True) for c in ch.choices]
    kinds = [kind for d in deltas for kind, text in (("r", getattr(d, "reasoning_content", None)), ("c", d.content)) if text]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == content
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds, kinds  # r... then c...

    for off in ({"chat_template_kwargs": {"enable_thinking": False}}, {}):
        plain = create(client, messages=ask, max_tokens=64, extra_body=off).choices[0]
        assert plain.message.content == answer and getattr(plain.message, "reasoning_content", None) is None, plain
