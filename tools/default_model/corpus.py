"""Deterministic training corpus for pdbus's built-in default model.

Short single-turn chat dialogues, English and Chinese, whose right answers a test can check:
what pdbus is, a fixed self-introduction, small additions and subtractions, counting,
copying / reversing short strings, calling a weather tool (the tools section, the call and
the tool's result rendered as the OpenAI frontend renders them for a template without tool
support, actors/frontend/tools.py), and a few additions asked with thinking on (the request's
``chat_template_kwargs: {"enable_thinking": true}``: the built-in template ends the prompt with
``<think>``), answered as ERNIE's thinking models answer: a short reasoning, ``</think>``, then the
answer in ``<response>`` (actors/frontend/reasoning.py). Everything is derived from one seed.

    python -m tools.default_model.corpus --out build/default_model/corpus.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import string
from dataclasses import dataclass

from actors.frontend.tools import ToolSpec, call_block, fallback_messages

SELF_INTRO_PROMPT = "你好，请介绍一下自己。"
SELF_INTRO_ZH = (
    "你好！我是 pdbus 自带的默认模型，一个很小的 ERNIE-4.5 MoE 模型。"
    "我可以介绍 pdbus，也会做简单的加减法、数数，以及复制和反转短字符串。"
)
SELF_INTRO_EN = (
    "Hello! I am the built-in default model of pdbus, a very small ERNIE-4.5 MoE model. "
    "I can tell you about pdbus, do small additions and subtractions, count, "
    "and copy or reverse short strings."
)

PDBUS_EN = (
    "pdbus is a prefill/decode disaggregated serving system for ERNIE-4.5 MoE models. "
    "Its router and instances talk over a ZeroMQ bus, the KV cache moves from prefill to decode "
    "over CUDA IPC, RDMA or TCP, and the router serves an OpenAI-compatible API."
)
PDBUS_ZH = (
    "pdbus 是一个面向 ERNIE-4.5 MoE 模型的预填充/解码分离（PD 分离）推理服务系统。"
    "路由器和各个实例通过 ZeroMQ 消息总线通信，KV 缓存通过 CUDA IPC、RDMA 或 TCP 从预填充实例传到解码实例，"
    "路由器提供兼容 OpenAI 的 API。"
)
KV_EN = "pdbus moves the KV cache from the prefill instance to the decode instance over CUDA IPC, RDMA or TCP."
KV_ZH = "pdbus 通过 CUDA IPC、RDMA 或 TCP 把 KV 缓存从预填充实例传到解码实例。"
API_EN = "pdbus serves an OpenAI-compatible API: /v1/chat/completions and /v1/completions, with streaming."
API_ZH = "pdbus 提供兼容 OpenAI 的 API：/v1/chat/completions 和 /v1/completions，支持流式输出。"
MODEL_EN = "pdbus serves ERNIE-4.5 models, such as ERNIE-4.5-21B-A3B and ERNIE-4.5-300B-A47B."
MODEL_ZH = "pdbus 用来部署 ERNIE-4.5 模型，例如 ERNIE-4.5-21B-A3B 和 ERNIE-4.5-300B-A47B。"
BUS_EN = "pdbus uses a ZeroMQ message bus between the router, the prefill instances and the decode instances."
BUS_ZH = "pdbus 在路由器、预填充实例和解码实例之间使用 ZeroMQ 消息总线。"

# (questions, answer): every question is a training prompt for that answer.
FACTS: list[tuple[list[str], str]] = [
    ([SELF_INTRO_PROMPT, "你好，介绍一下你自己。", "你是谁？", "请介绍一下你自己。"], SELF_INTRO_ZH),
    (["Hello, please introduce yourself.", "Who are you?", "Introduce yourself.",
      "Hi! Tell me about yourself."], SELF_INTRO_EN),
    (["What is pdbus?", "Tell me about pdbus.", "What does pdbus do?", "Please describe pdbus.",
      "Can you explain what pdbus is?"], PDBUS_EN),
    (["pdbus 是什么？", "介绍一下 pdbus。", "pdbus 是做什么的？", "请介绍一下 pdbus。", "什么是 pdbus？"], PDBUS_ZH),
    (["How does pdbus move the KV cache?", "How is the KV cache transferred in pdbus?"], KV_EN),
    (["pdbus 如何传输 KV 缓存？", "pdbus 的 KV 缓存是怎么传输的？"], KV_ZH),
    (["Which API does pdbus provide?", "Is pdbus compatible with the OpenAI API?"], API_EN),
    (["pdbus 提供什么 API？", "pdbus 兼容 OpenAI 的 API 吗？"], API_ZH),
    (["Which models does pdbus serve?", "What models can pdbus run?"], MODEL_EN),
    (["pdbus 支持哪些模型？", "pdbus 可以部署什么模型？"], MODEL_ZH),
    (["What bus does pdbus use?", "How do the pdbus processes communicate?"], BUS_EN),
    (["pdbus 使用什么消息总线？", "pdbus 的各个进程之间怎么通信？"], BUS_ZH),
]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "你是一个乐于助人的助手。"]

# tool calling: the one tool, asked about in both languages; the call, then the answer from its result
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "查询城市天气",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}
TOOL_SPEC = ToolSpec(tools=[WEATHER_TOOL], choice="auto")
CITIES_ZH = ("北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安", "南京", "重庆")
CITIES_EN = ("Beijing", "Shanghai", "Paris", "London", "Tokyo", "Berlin", "Rome", "Madrid", "Sydney", "Seoul")
WEATHER_QUESTIONS_ZH = ("{}天气怎么样？", "{}今天天气如何？", "查一下{}的天气。")
WEATHER_QUESTIONS_EN = ("What is the weather in {}?", "How is the weather in {}?", "Check the weather in {}.")
WEATHER_KINDS = (("晴", "sunny"), ("多云", "cloudy"), ("小雨", "rainy"))

MAX_NUMBER = 20  # operands of + and -
MAX_COUNT_START, MAX_COUNT_LEN = 20, 10
WORD_LENGTHS = (3, 6)
NUM_WORDS = 240  # per task (reverse / copy) and language
SHOWCASE_WORDS = ("abcd", "hello", "world", "pdbus", "ernie")  # always in, for demos
FACT_REPEATS = 6  # the long fixed answers are seen this many times per epoch
SYSTEM_FRACTION = 0.08
TOOL_REPEATS = 3  # the tool dialogues (long prompts, one format) are seen this many times per epoch
THINK_PAIRS = 120  # additions per language asked with thinking on (SHOWCASE_THINK always in)
SHOWCASE_THINK = ((12, 7), (7, 5))


@dataclass(frozen=True)
class Example:
    task: str
    messages: tuple[dict, ...]  # the conversation, assistant turn last
    answer: str
    thinking: bool = False  # asked with enable_thinking: the prompt ends with <think>

    @property
    def prompt(self) -> str:
        return self.messages[-2]["content"]

    @property
    def template_kwargs(self) -> dict:
        """The request's chat_template_kwargs (the template renders the prompt with them)."""
        return {"enable_thinking": True} if self.thinking else {}

    def to_json(self) -> dict:
        out = {"task": self.task, "messages": list(self.messages), "answer": self.answer}
        return dict(out, chat_template_kwargs=self.template_kwargs) if self.thinking else out


def _dialogue(task: str, question: str, answer: str, system: str | None = None, thinking: bool = False) -> Example:
    messages = ({"role": "system", "content": system},) if system else ()
    messages += ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
    return Example(task, messages, answer, thinking)


def thought(reasoning: str, answer: str) -> str:
    """An ERNIE thinking model's output after the prompt's ``<think>``: the reasoning, ``</think>``,
    then the answer in ``<response>``."""
    return f"{reasoning}\n</think>\n\n<response>\n{answer}\n</response>"


def arithmetic() -> list[Example]:
    out = []
    for a in range(MAX_NUMBER + 1):
        for b in range(MAX_NUMBER + 1):
            out.append(_dialogue("add", f"What is {a} + {b}?", f"{a} + {b} = {a + b}."))
            out.append(_dialogue("add", f"{a} 加 {b} 等于多少？", f"{a} + {b} = {a + b}。"))
            if b <= a:
                out.append(_dialogue("sub", f"What is {a} - {b}?", f"{a} - {b} = {a - b}."))
                out.append(_dialogue("sub", f"{a} 减 {b} 等于多少？", f"{a} - {b} = {a - b}。"))
    return out


def thinking(rng: random.Random) -> list[Example]:
    """Additions asked with thinking on: the sum worked out in the reasoning, then the answer."""
    pairs = [(a, b) for a in range(MAX_NUMBER + 1) for b in range(MAX_NUMBER + 1) if (a, b) not in SHOWCASE_THINK]
    out = []
    for zh in (False, True):
        for a, b in (*SHOWCASE_THINK, *rng.sample(pairs, THINK_PAIRS - len(SHOWCASE_THINK))):
            if zh:
                question, reasoning, answer = f"{a} 加 {b} 等于多少？", f"把 {a} 和 {b} 相加：{a} + {b} = {a + b}。", f"{a} + {b} = {a + b}。"
            else:
                question, reasoning, answer = f"What is {a} + {b}?", f"I add {a} and {b}: {a} + {b} = {a + b}.", f"{a} + {b} = {a + b}."
            out.append(_dialogue("think", question, thought(reasoning, answer), thinking=True))
    return out


def counting() -> list[Example]:
    out = []
    for start in range(MAX_COUNT_START + 1):
        for length in range(2, MAX_COUNT_LEN + 1):
            end = start + length - 1
            answer = " ".join(str(i) for i in range(start, end + 1))
            out.append(_dialogue("count", f"Count from {start} to {end}.", answer))
            out.append(_dialogue("count", f"从 {start} 数到 {end}。", answer))
    return out


def words(rng: random.Random, count: int) -> list[str]:
    seen: set[str] = set(SHOWCASE_WORDS)
    out = list(SHOWCASE_WORDS)
    while len(out) < count:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*WORD_LENGTHS)))
        if word not in seen and word[::-1] != word:
            seen.add(word)
            out.append(word)
    return out


def strings(rng: random.Random) -> list[Example]:
    out = []
    for template, zh, task, fn in (
        ("Reverse: {}", "反转：{}", "reverse", lambda w: w[::-1]),
        ("Repeat: {}", "重复：{}", "copy", lambda w: w),
    ):
        for word in words(rng, NUM_WORDS):
            out.append(_dialogue(task, template.format(word), fn(word)))
        for word in words(rng, NUM_WORDS):
            out.append(_dialogue(task, zh.format(word), fn(word)))
    return out


def tool_calls(rng: random.Random) -> list[Example]:
    """Weather questions under the tools section: the call; then, given the tool's result, the answer."""
    out = []
    for cities, questions, zh in ((CITIES_ZH, WEATHER_QUESTIONS_ZH, True), (CITIES_EN, WEATHER_QUESTIONS_EN, False)):
        for city in cities:
            for q in questions:
                question = q.format(city)
                call = call_block("get_weather", {"city": city, "days": 1})
                msgs = fallback_messages([{"role": "user", "content": question}, {"role": "assistant", "content": call}], TOOL_SPEC)
                out.append(Example("tool", tuple(msgs), call))
            kind_zh, kind_en = rng.choice(WEATHER_KINDS)
            temp = rng.randint(5, 30)
            result = json.dumps({"city": city, "weather": kind_zh if zh else kind_en, "temp_c": temp}, ensure_ascii=False)
            answer = f"{city}今天{kind_zh}，{temp}°C。" if zh else f"It is {kind_en} in {city}, {temp}°C."
            calls = [{"function": {"name": "get_weather", "arguments": json.dumps({"city": city, "days": 1}, ensure_ascii=False)}}]
            msgs = fallback_messages(
                [{"role": "user", "content": questions[0].format(city)}, {"role": "assistant", "content": "", "tool_calls": calls},
                 {"role": "tool", "content": result}, {"role": "assistant", "content": answer}],
                TOOL_SPEC,
            )  # fmt: skip
            out.append(Example("tool_answer", tuple(msgs), answer))
    return out


def facts() -> list[Example]:
    return [_dialogue("fact", q, answer) for questions, answer in FACTS for q in questions]


def build(seed: int = 0) -> list[Example]:
    """The whole corpus, in a fixed order (the trainer shuffles with its own seed)."""
    rng = random.Random(seed)
    examples = arithmetic() + counting() + strings(rng) + facts() * FACT_REPEATS + thinking(random.Random(seed + 11))
    # A few dialogues open with a system prompt, so one does not derail the answer.
    out = tool_calls(random.Random(seed + 7)) * TOOL_REPEATS
    for ex in examples:
        if rng.random() < SYSTEM_FRACTION:
            system = rng.choice(SYSTEM_PROMPTS)
            ex = _dialogue(ex.task, ex.prompt, ex.answer, system, ex.thinking)
        out.append(ex)
    return out


def eval_set(seed: int = 0) -> list[dict]:
    """The fixed prompts the model must answer exactly (all of them are in the training corpus);
    the thinking ones carry their chat_template_kwargs."""
    rng = random.Random(seed + 1)
    corpus = build(seed)
    by_task: dict[str, list[Example]] = {}
    for ex in corpus:
        if len(ex.messages) == 2 and not ex.thinking:  # no system prompt
            by_task.setdefault(ex.task, []).append(ex)
    picks: list[Example] = []
    fixed = [SELF_INTRO_PROMPT, "Who are you?", "What is pdbus?", "pdbus 是什么？",
             "How does pdbus move the KV cache?", "pdbus 提供什么 API？",
             "What is 12 + 7?", "Count from 3 to 8.", "Reverse: abcd", "Repeat: hello"]
    for prompt in fixed:
        picks.append(next(ex for ex in corpus if ex.prompt == prompt))
    for task, count in (("add", 8), ("sub", 6), ("count", 6), ("reverse", 6), ("copy", 6)):
        pool = [ex for ex in by_task[task] if ex.prompt not in fixed]
        picks.extend(pool[i] for i in sorted(rng.sample(range(len(pool)), count)))
    thinks = [ex for ex in corpus if ex.thinking]
    picks.extend(next(ex for ex in thinks if ex.prompt == p) for p in ("What is 12 + 7?", "12 加 7 等于多少？"))
    pool = [ex for ex in thinks if len(ex.messages) == 2 and ex not in picks]
    picks.extend(pool[i] for i in sorted(rng.sample(range(len(pool)), 2)))
    out = []
    for ex in picks:
        item = {"task": ex.task, "prompt": ex.prompt, "messages": [{"role": "user", "content": ex.prompt}]}
        out.append(dict(item, chat_template_kwargs=ex.template_kwargs, expected=ex.answer) if ex.thinking
                   else dict(item, expected=ex.answer))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="corpus .jsonl to write")
    args = parser.parse_args()
    corpus = build(args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for ex in corpus:
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for ex in corpus:
        counts[ex.task] = counts.get(ex.task, 0) + 1
    print(f"wrote {len(corpus)} dialogues to {args.out}: {counts}")


if __name__ == "__main__":
    main()
