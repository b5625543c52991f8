import json

import openai.types as oa
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from actors.frontend import protocol as p
from pdbus.messages import FinishReason

MODELS = ["ernie", "other"]
MAX_LEN = 1024


def completion(**body):
    body.setdefault("prompt", "hello")
    return p.parse_completion_request(body, model_names=MODELS, max_model_len=MAX_LEN, vocab_size=1000)


def chat(**body):
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return p.parse_chat_request(body, model_names=MODELS, max_model_len=MAX_LEN)


def error_of(fn, **body) -> p.OpenAIError:
    with pytest.raises(p.OpenAIError) as info:
        fn(**body)
    return info.value


# --------------------------------------------------------------------------- errors


def test_error_shape_is_openai():
    err = p.OpenAIError("bad", param="temperature")
    assert err.status == 400
    assert err.to_dict() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "temperature", "code": None},
    }
    assert json.loads(p.dumps(err.to_dict()))["error"]["message"] == "bad"


def test_body_must_be_object():
    for body in ([], "x", None, 3):
        with pytest.raises(p.OpenAIError) as info:
            p.parse_completion_request(body, model_names=MODELS, max_model_len=MAX_LEN)
        assert info.value.status == 400 and "JSON object" in info.value.message


def test_unknown_model_is_404():
    err = error_of(completion, model="gpt-4")
    assert err.status == 404 and err.code == "model_not_found" and err.param == "model"
    assert "gpt-4" in err.message
    assert error_of(chat, model="gpt-4").status == 404


def test_model_defaults_to_first_and_accepts_others():
    assert completion().model == "ernie"
    assert completion(model=None).model == "ernie"
    assert chat(model="other").model == "other"


def test_no_model_served_is_503():
    with pytest.raises(p.OpenAIError) as info:
        p.parse_chat_request({"messages": []}, model_names=[], max_model_len=MAX_LEN)
    assert info.value.status == 503


# (field, bad value, words expected in the message); each must be a 400 naming the field.
COMMON_BAD = [
    ("model", 3, "string"),
    ("temperature", -0.1, "at least 0"),
    ("temperature", 2.5, "at most 2"),
    ("temperature", "1", "number"),
    ("temperature", True, "number"),
    ("temperature", float("nan"), "finite"),
    ("top_p", 0, "greater than 0"),
    ("top_p", 1.01, "at most 1"),
    ("top_k", -2, "at least -1"),
    ("top_k", 1.5, "integer"),
    ("min_p", 1.5, "at most 1"),
    ("n", 0, "between 1 and 16"),
    ("n", 17, "between 1 and 16"),
    ("n", True, "integer"),
    ("max_tokens", 0, "at least 1"),
    ("max_tokens", "10", "integer"),
    ("max_tokens", MAX_LEN, "maximum context length"),
    ("presence_penalty", 2.5, "at most 2"),
    ("frequency_penalty", -3, "at least -2"),
    ("repetition_penalty", 0, "greater than 0"),
    ("repetition_penalty", float("inf"), "finite"),
    ("seed", 1.5, "integer"),
    ("seed", 1 << 70, "between"),
    ("stop", 3, "string or a list"),
    ("stop", ["a", 3], "string or a list"),
    ("stop", [""], "empty"),
    ("stop", ["s"] * 17, "at most 16"),
    ("stop_token_ids", [1, "a"], "token ids"),
    ("stop_token_ids", [-1], "out of range"),
    ("stop_token_ids", 5, "token ids"),
    ("ignore_eos", 1, "boolean"),
    ("min_tokens", -1, "at least 0"),
    ("stream", "yes", "boolean"),
    ("return_token_ids", "yes", "boolean"),
    ("include_stop_str_in_output", 1, "boolean"),
    ("skip_special_tokens", 0, "boolean"),
    ("user", 5, "string"),
    ("best_of", 3, "not supported"),
    ("logit_bias", {"5": 10}, "not supported"),
]


@pytest.mark.parametrize("fn", [completion, chat], ids=["completion", "chat"])
@pytest.mark.parametrize(
    ("name", "value", "words"), COMMON_BAD, ids=[f"{n}={v!r}"[:40] for n, v, _ in COMMON_BAD]
)
def test_common_field_errors(fn, name, value, words):
    err = error_of(fn, **{name: value})
    assert err.status == 400
    assert err.param == name
    assert name in err.message and words in err.message


COMPLETION_BAD = [
    ("prompt", None, "required"),
    ("prompt", "", "empty"),
    ("prompt", [], "empty"),
    ("prompt", 5, "string or a list"),
    ("prompt", [1, "a"], "token ids"),
    ("prompt", [1, 5000], "out of range"),
    ("prompt", [-3], "out of range"),
    ("prompt", ["a", "b"], "batch of 2 prompts"),
    ("prompt", [[1], [2]], "batch of 2 prompts"),
    ("logprobs", 21, "between 0 and 20"),
    ("logprobs", True, "integer"),
    ("echo", True, "not supported"),
    ("echo", "x", "boolean"),
    ("suffix", "tail", "not supported"),
]


@pytest.mark.parametrize(
    ("name", "value", "words"), COMPLETION_BAD, ids=[f"{n}={v!r}" for n, v, _ in COMPLETION_BAD]
)
def test_completion_field_errors(name, value, words):
    err = error_of(completion, **{name: value})
    assert err.status == 400 and err.param == name
    assert name in err.message or "prompt" in err.message
    assert words in err.message


CHAT_BAD = [
    ("messages", None, "messages", "required"),
    ("messages", [], "messages", "non-empty"),
    ("messages", "hi", "messages", "non-empty"),
    ("messages", ["hi"], "messages[0]", "object"),
    ("messages", [{"role": "robot", "content": "x"}], "messages[0].role", "one of"),
    ("messages", [{"role": "tool", "content": "x"}], "messages[0].tool_call_id", "required"),
    ("messages", [{"role": "function", "content": "x"}], "messages[0].role", "not supported"),
    ("messages", [{"role": "user", "content": 3}], "messages[0].content", "string or a list"),
    ("messages", [{"role": "user"}], "messages[0].content", "string or a list"),
    (
        "messages",
        [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url"}]}],
        "messages[1].content[0].type",
        "not supported",
    ),
    (
        "messages",
        [{"role": "user", "content": [{"type": "text", "text": 1}]}],
        "messages[0].content[0].text",
        "string",
    ),
    ("messages", [{"role": "user", "content": ["x"]}], "messages[0].content[0]", "object"),
    ("messages", [{"role": "user", "content": "x", "name": 1}], "messages[0].name", "string"),
    (
        "messages",
        [{"role": "assistant", "content": None, "tool_calls": [{}]}],
        "messages[0].tool_calls[0].function",
        "name",
    ),
    ("logprobs", 3, "logprobs", "boolean"),
    ("top_logprobs", 3, "top_logprobs", "logprobs"),
    ("max_completion_tokens", 0, "max_completion_tokens", "at least 1"),
    ("tools", [{"type": "function"}], "tools[0].function", "object"),
    ("tools", {"type": "function"}, "tools", "list"),
    ("tool_choice", "required", "tool_choice", "non-empty"),
    ("response_format", {"type": "yaml"}, "response_format", "not supported"),
    ("response_format", "json", "response_format", "object"),
    ("chat_template_kwargs", [], "chat_template_kwargs", "object"),
    ("add_generation_prompt", "no", "add_generation_prompt", "boolean"),
]


@pytest.mark.parametrize(
    ("name", "value", "param", "words"), CHAT_BAD, ids=[f"{p_}:{w}" for _, _, p_, w in CHAT_BAD]
)
def test_chat_field_errors(name, value, param, words):
    err = error_of(chat, **{name: value})
    assert err.status == 400 and err.param == param
    assert param in err.message or words in err.message
    assert words in err.message


def test_top_logprobs_range():
    err = error_of(chat, logprobs=True, top_logprobs=21)
    assert err.param == "top_logprobs" and "between 0 and 20" in err.message


def test_stream_options_need_stream():
    err = error_of(completion, stream_options={"include_usage": True})
    assert err.param == "stream_options" and "stream" in err.message
    err = error_of(chat, stream=True, stream_options={"include_usage": "yes"})
    assert err.param == "stream_options.include_usage"
    assert error_of(chat, stream=True, stream_options=[]).param == "stream_options"


def test_min_tokens_above_max_tokens():
    err = error_of(completion, max_tokens=5, min_tokens=6)
    assert err.param == "min_tokens" and "max_tokens" in err.message


# --------------------------------------------------------------------------- defaults and values


def test_completion_defaults():
    req = completion()
    assert req.prompt == "hello" and req.prompt_token_ids is None
    assert req.max_tokens is None and req.sampling.max_tokens == 16
    assert req.n == 1 and req.stop == [] and not req.stream and not req.include_usage
    assert req.logprobs is None and req.sampling.logprobs is None
    assert not req.return_token_ids and req.skip_special_tokens and not req.include_stop_str_in_output
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (1.0, 1.0, 0, 0.0, None)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.0, 0.0, 1.0)
    assert not s.greedy and req.ignored_fields == []


def test_chat_defaults():
    req = chat()
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.max_tokens is None and req.logprobs is False and req.top_logprobs == 0
    assert req.sampling.logprobs is None and req.add_generation_prompt and req.chat_template_kwargs == {}


def test_nulls_mean_defaults():
    req = chat(temperature=None, top_p=None, n=None, stop=None, max_tokens=None, seed=None, stream=None)
    assert req.sampling.temperature == 1.0 and req.n == 1 and req.stop == [] and req.sampling.seed is None


def test_sampling_built_from_body():
    req = completion(
        prompt=[1, 2, 3],
        max_tokens=100,
        min_tokens=4,
        temperature=0,
        top_p=0.9,
        top_k=-1,
        min_p=0.05,
        seed=-7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        stop="END",
        stop_token_ids=[7, 7, 8],
        ignore_eos=True,
        logprobs=5,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
        return_token_ids=True,
        user="u1",
        some_extension=1,
    )
    s = req.sampling
    assert req.prompt_token_ids == [1, 2, 3] and req.prompt is None
    assert s.greedy and s.top_k == 0 and s.max_tokens == 100 and s.min_tokens == 4
    assert (s.top_p, s.min_p, s.seed) == (0.9, 0.05, -7)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.2)
    assert s.stop_token_ids == [7, 8] and s.ignore_eos and s.logprobs == 5
    assert req.stop == ["END"] and req.n == 3 and req.stream and req.include_usage
    assert req.return_token_ids and req.user == "u1" and req.ignored_fields == ["some_extension"]


def test_prompt_forms():
    assert completion(prompt=["only"]).prompt == "only"
    assert completion(prompt=[[5, 6]]).prompt_token_ids == [5, 6]
    assert completion(prompt="中文提示").prompt == "中文提示"


def test_chat_messages_normalized():
    req = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                "name": "x",
            },
            {"role": "assistant", "content": None},
            {"role": "user", "content": "你好"},
        ]
    )
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb", "name": "x"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "你好"},
    ]


def test_chat_options():
    req = chat(
        max_tokens=50,
        max_completion_tokens=20,
        logprobs=True,
        top_logprobs=3,
        enable_thinking=False,
        chat_template_kwargs={"x": 1},
        tool_choice="none",
        tools=[],
        response_format={"type": "text"},
        parallel_tool_calls=False,
    )
    assert req.max_tokens == 20 and req.sampling.max_tokens == 20
    assert req.logprobs and req.top_logprobs == 3 and req.sampling.logprobs == 3
    assert req.chat_template_kwargs == {"enable_thinking": False, "x": 1}
    assert req.ignored_fields == []
    assert chat(logprobs=True).sampling.logprobs == 0


def test_stop_list_deduplicated():
    assert completion(stop=["a", "b", "a"]).stop == ["a", "b"]


def test_choice_sampling_seeds():
    req = completion(seed=10, n=3)
    assert [p.choice_sampling(req, i).seed for i in range(3)] == [10, 11, 12]
    assert req.sampling.seed == 10
    unseeded = completion(n=2)
    assert p.choice_sampling(unseeded, 1) is unseeded.sampling


# --------------------------------------------------------------------------- max tokens


def test_resolve_max_tokens_defaults():
    req = completion()
    assert p.resolve_max_tokens(req, 10, MAX_LEN) == 16 and req.sampling.max_tokens == 16
    assert p.resolve_max_tokens(completion(), MAX_LEN - 5, MAX_LEN) == 5  # default clamps
    req = chat(min_tokens=50)
    assert p.resolve_max_tokens(req, 1000, MAX_LEN) == 24
    assert req.sampling.max_tokens == 24 and req.sampling.min_tokens == 24
    assert p.resolve_max_tokens(chat(max_tokens=24), 1000, MAX_LEN) == 24


def test_resolve_max_tokens_errors():
    with pytest.raises(p.OpenAIError) as info:
        p.resolve_max_tokens(completion(max_tokens=100), 1000, MAX_LEN)
    err = info.value
    assert err.status == 400 and err.code == "context_length_exceeded" and err.param == "max_tokens"
    assert err.message.startswith(
        "This model's maximum context length is 1024 tokens. However, you requested 1100 tokens "
        "(1000 in the prompt, 100 for the completion)."
    )
    with pytest.raises(p.OpenAIError) as info:
        p.resolve_max_tokens(chat(), MAX_LEN, MAX_LEN)
    assert info.value.param == "messages" and "1024 tokens" in info.value.message
    with pytest.raises(p.OpenAIError) as info:
        p.resolve_max_tokens(completion(max_tokens=10), 2000, MAX_LEN)
    assert info.value.param == "prompt" and "2010 tokens" in info.value.message


# --------------------------------------------------------------------------- responses


def _finished(chunk: dict) -> dict:
    """The openai SDK types a completion choice's finish_reason as required; stream chunks carry null."""
    chunk = json.loads(json.dumps(chunk))
    for choice in chunk["choices"]:
        choice["finish_reason"] = choice["finish_reason"] or "stop"
    return chunk


def test_completion_response_validates():
    lp = p.completion_logprobs(
        ["你", "好"], [-0.1, float("-inf")], [[("你", -0.1), ("我", -2.0)], [("好", -0.2)]], 3
    )
    assert lp["text_offset"] == [3, 4] and lp["token_logprobs"] == [-0.1, -9999.0]
    choice = p.completion_choice(
        0,
        "你好",
        p.finish_reason(FinishReason.LENGTH),
        logprobs=lp,
        prompt_token_ids=[1],
        completion_token_ids=[2, 3],
    )
    body = p.completion_response(
        id=p.random_id("cmpl"), model="ernie", created=p.now(), choices=[choice], usage=p.usage(1, 2)
    )
    parsed = oa.Completion.model_validate(json.loads(p.dumps(body)))
    assert parsed.choices[0].finish_reason == "length" and parsed.usage.total_tokens == 3
    assert parsed.choices[0].logprobs.top_logprobs[0] == {"你": -0.1, "我": -2.0}
    assert body["choices"][0]["prompt_token_ids"] == [1] and body["choices"][0]["completion_token_ids"] == [
        2,
        3,
    ]
    assert "prompt_token_ids" not in p.completion_choice(0, "x", "stop")


def test_completion_chunks_validate():
    first = p.completion_chunk(id="cmpl-1", model="ernie", created=1, index=0, text="he")
    assert first["choices"][0]["finish_reason"] is None and "usage" not in first
    oa.Completion.model_validate(_finished(first))
    last = p.completion_chunk(
        id="cmpl-1",
        model="ernie",
        created=1,
        index=1,
        text="",
        finish_reason="stop",
        completion_token_ids=[9],
    )
    parsed = oa.Completion.model_validate(last)
    assert parsed.choices[0].index == 1 and parsed.object == "text_completion"
    usage = p.completion_usage_chunk(
        id="cmpl-1", model="ernie", created=1, usage=p.usage(3, 4, cached_tokens=2)
    )
    parsed = oa.Completion.model_validate(usage)
    assert parsed.choices == [] and parsed.usage.prompt_tokens_details.cached_tokens == 2


def test_chat_response_validates():
    lp = p.chat_logprobs(["你", b"\xe5"], [-0.5, -1.0], [[("你", -0.5), ("我", -3.0)], [(b"\xe5", -1.0)]])
    assert lp["content"][0]["bytes"] == list("你".encode())
    assert lp["content"][1]["bytes"] == [0xE5] and lp["content"][1]["token"] == "\ufffd"
    choice = p.chat_choice(0, "你好", "stop", logprobs=lp, prompt_token_ids=[1, 2], completion_token_ids=[3])
    body = p.chat_response(id="chatcmpl-1", model="ernie", created=5, choices=[choice], usage=p.usage(2, 1))
    parsed = ChatCompletion.model_validate(json.loads(p.dumps(body)))
    assert parsed.choices[0].message.content == "你好" and parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].logprobs.content[0].top_logprobs[1].token == "我"
    assert body["choices"][0]["message"]["completion_token_ids"] == [3]
    no_top = p.chat_logprobs(["a"], [-1.0])
    assert no_top["content"][0]["top_logprobs"] == []


def test_chat_chunks_validate():
    first = p.chat_chunk(id="chatcmpl-1", model="ernie", created=1, index=0, first=True, prompt_token_ids=[1])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "prompt_token_ids": [1]}
    parsed = ChatCompletionChunk.model_validate(first)
    assert parsed.choices[0].delta.role == "assistant"
    mid = p.chat_chunk(
        id="chatcmpl-1",
        model="ernie",
        created=1,
        index=0,
        content="好",
        logprobs=p.chat_logprobs(["好"], [-0.3]),
        completion_token_ids=[5],
    )
    assert "role" not in mid["choices"][0]["delta"]
    ChatCompletionChunk.model_validate(mid)
    last = p.chat_chunk(id="chatcmpl-1", model="ernie", created=1, index=0, finish_reason="length")
    assert last["choices"][0]["delta"] == {}
    assert ChatCompletionChunk.model_validate(last).choices[0].finish_reason == "length"
    usage = ChatCompletionChunk.model_validate(
        p.chat_usage_chunk(id="c", model="ernie", created=1, usage=p.usage(1, 1))
    )
    assert usage.choices == [] and usage.usage.total_tokens == 2


def test_finish_reason_mapping():
    assert p.finish_reason(None) is None
    assert p.finish_reason(FinishReason.STOP) == "stop" and p.finish_reason("eos") == "stop"
    assert p.finish_reason("length") == "length" and p.finish_reason(FinishReason.ABORT) == "abort"


def test_sse_framing():
    assert p.sse({"a": "中"}) == 'data: {"a":"中"}\n\n'.encode()
    assert p.SSE_DONE == b"data: [DONE]\n\n"
    assert p.dumps({"x": [1, 2]}) == '{"x":[1,2]}'


# --------------------------------------------------------------------------- stop strings


def _stream(checker: p.StopChecker, deltas: list[str]) -> tuple[str, bool]:
    out = []
    for delta in deltas:
        text, stopped = checker.feed(delta)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(checker.flush())
    return "".join(out), False


def test_stop_in_one_delta():
    assert _stream(p.StopChecker(["END"]), ["abc END tail"]) == ("abc ", True)


def test_stop_split_across_deltas_is_held_then_cut():
    checker = p.StopChecker(["</s>"])
    assert checker.feed("hello <") == ("hello ", False)
    assert checker.feed("/") == ("", False)
    assert checker.feed("s> more") == ("", True)
    assert checker.matched == "</s>" and checker.feed("x") == ("", True) and checker.flush() == ""


def test_false_start_is_released():
    checker = p.StopChecker(["</s>"])
    assert checker.feed("a <") == ("a ", False)
    assert checker.feed("b") == ("<b", False)


def test_only_possible_prefixes_are_held():
    checker = p.StopChecker(["xyz"])
    assert checker.feed("abcd") == ("abcd", False)
    assert checker.feed("ax") == ("a", False)
    assert checker.feed("y") == ("", False)
    assert checker.flush() == "xy"


def test_earliest_of_several_stops_wins():
    assert _stream(p.StopChecker(["b", "abc"]), ["xabc"]) == ("x", True)
    # Eager: "b" completes before "abc" could, so it wins across deltas.
    assert _stream(p.StopChecker(["b", "abc"]), ["xab", "c"]) == ("xa", True)
    assert _stream(p.StopChecker(["cd", "b"]), ["abcd"]) == ("a", True)
    checker = p.StopChecker(["ab", "abc"])
    assert checker.feed("zabcq") == ("z", True) and checker.matched == "abc"


def test_flush_releases_hold_at_finish():
    assert _stream(p.StopChecker(["STOP"]), ["go ST"]) == ("go ST", False)
    assert _stream(p.StopChecker([]), ["a", "b"]) == ("ab", False)


def test_include_stop_keeps_the_stop_string():
    assert _stream(p.StopChecker(["。"], include_stop=True), ["你好", "。再见"]) == ("你好。", True)


def test_chinese_stop_split_across_deltas():
    checker = p.StopChecker(["结束了"])
    out, stopped = _stream(checker, ["今天", "天气很好结", "束", "了吗"])
    assert (out, stopped) == ("今天天气很好", True)
    assert _stream(p.StopChecker(["结束了"]), ["结束", "吧"]) == ("结束吧", False)


def test_roles_and_finish_reasons_are_enums_on_the_wire():
    """They travel as their values (the wire is unchanged) and decode as enum members; a value
    outside the enum is refused by the decoder."""
    import msgspec

    from pdbus import messages as m
    from pdbus import wire

    hello = m.Hello(protocol=m.PROTOCOL_VERSION, instance_id="d0", role=m.Role.DECODE, host="h", http_port=1, model="x", config_hash="")
    assert b"\xa4role\xa6decode" in wire.encode(hello)  # msgpack: the string, as before
    assert wire.decode(wire.encode(hello)).role is m.Role.DECODE
    out = wire.decode(wire.encode(m.Tokens(items=[m.TokenOut("r", [1], finish_reason=m.FinishReason.LENGTH)])))
    assert out.items[0].finish_reason is m.FinishReason.LENGTH and out.items[0].finish_reason == "length"
    text = wire.decode(wire.encode(m.TextOut(req_id="r", text="", token_ids=[], finish_reason=m.FinishReason.STOP)))
    assert text.finish_reason is m.FinishReason.STOP
    with pytest.raises(wire.WireError):
        wire.decode(wire.encode(m.Tokens(items=[m.TokenOut("r", [1], finish_reason="eos")])))
    with pytest.raises(wire.WireError):
        wire.decode(wire.encode(msgspec.structs.replace(hello, role="router")))
