"""The reasoning split (``--reasoning-parser ernie_x1``, FastDeploy's ``ernie-x1``): a chat choice's
text into ``reasoning_content`` and ``content``, incrementally (a stream and a whole answer are
one code path; the whole answer is the stream fed at once).

ERNIE's thinking models write ``reasoning</think>\\n\\n<response>\\nanswer\\n</response>`` or
``reasoning</think>\\n\\n<tool_call>...``; the ``<think>`` that opens the reasoning is usually
the end of the prompt (the chat template's), sometimes the model's first words. So a choice
starts in the reasoning when the rendered prompt ends with ``<think>`` (a template told
``enable_thinking: false`` does not open it), or when the output begins with ``<think>``;
otherwise all of it is content (a model that does not think, the built-in one). ``</think>``
ends the reasoning; the newlines after it and a ``<response>`` / ``</response>`` pair around the
answer are markup, not content. A tag split across two deltas is held back until it is whole.
"""

from __future__ import annotations

from .tool_parsers import partial_tag

THINK_START, THINK_END = "<think>", "</think>"
RESPONSE_START, RESPONSE_END = "<response>", "</response>"
MARKUP = (THINK_START, THINK_END, RESPONSE_START, RESPONSE_END)


def prompt_opens_thinking(prompt_text: str) -> bool:
    return prompt_text.rstrip().endswith(THINK_START)


class ErnieX1ReasoningParser:
    def __init__(self, prompt_text: str = ""):
        self.state = "think" if prompt_opens_thinking(prompt_text) else "start"
        self.buf = ""
        self.thought = self.state == "think"  # the choice reasoned (its message gets reasoning_content)

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """``(reasoning, content)`` that ``text`` adds."""
        self.buf += text
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self.state == "start":  # undecided: does the output open with <think>?
                head = self.buf.lstrip()
                if head.startswith(THINK_START):
                    self.buf, self.state, self.thought = head[len(THINK_START) :], "think", True
                    continue
                if not final and THINK_START.startswith(head):
                    break
                self.state = "content"
                continue
            if self.state == "think":
                at = self.buf.find(THINK_END)
                keep = 0 if final or at >= 0 else partial_tag(self.buf, THINK_END)
                cut = at if at >= 0 else len(self.buf) - keep
                reasoning.append(self.buf[:cut])
                if at < 0:
                    self.buf = self.buf[cut:]
                    break
                self.buf, self.state = self.buf[at + len(THINK_END) :], "after"
                continue
            if self.state == "after":  # between </think> and the answer: newlines, maybe <response>
                head = self.buf.lstrip("\n")
                if head.startswith(RESPONSE_START):
                    self.buf, self.state = head[len(RESPONSE_START) :], "response"
                    continue
                self.buf = head
                if not final and RESPONSE_START.startswith(head):
                    break
                self.state = "content"
                continue
            if self.state == "response":
                at = self.buf.find(RESPONSE_END)
                keep = 0 if final or at >= 0 else partial_tag(self.buf, RESPONSE_END)
                cut = at if at >= 0 else len(self.buf) - keep
                content.append(self.buf[:cut])
                if at < 0:
                    self.buf = self.buf[cut:]
                    break
                self.buf, self.state = self.buf[at + len(RESPONSE_END) :].lstrip("\n"), "content"
                continue
            content.append(self.buf)
            self.buf = ""
            break
        return "".join(reasoning), "".join(content)
