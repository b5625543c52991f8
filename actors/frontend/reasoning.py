"""The reasoning split (``--reasoning-parser ernie_x1``, FastDeploy's ``ernie-x1``): a chat choice's
text into ``reasoning_content`` and ``content``, incrementally (a stream and a whole answer are
one code path; the whole answer is the stream fed at once).

ERNIE's thinking models write ``reasoning</think>\\n\\n<response>\\nanswer\\n</response>`` or
``reasoning</think>\\n\\n<tool_call>...``; the ``<think>`` that opens the reasoning is usually
the end of the prompt (the chat template's), sometimes the model's first words. So a choice
starts in the reasoning when the rendered prompt ends with ``<think>`` (a template told
``enable_thinking: false`` does not open it), or when the output begins with ``<think>``;
otherwise all of it is content (a model that does not think, the built-in one). ``</think>``
ends the reasoning; the newline before it, the newlines after it, and a ``<response>`` /
``</response>`` pair around the answer with the newline inside each are markup, not content
(``reasoning_content`` "reasoning", ``content`` "answer"). A tag split across two deltas is held back until it is whole.
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
        self.lead = False  # at the start of a <response>: its first newline is still to drop

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
                done, text = self._until(THINK_END, final)
                reasoning.append(text)
                if not done:
                    break
                self.state = "after"
                continue
            if self.state == "after":  # between </think> and the answer: newlines, maybe <response>
                head = self.buf.lstrip("\n")
                if head.startswith(RESPONSE_START):
                    self.buf, self.state, self.lead = head[len(RESPONSE_START) :], "response", True
                    continue
                self.buf = head
                if not final and RESPONSE_START.startswith(head):
                    break
                self.state = "content"
                continue
            if self.state == "response":
                if self.lead:  # the newline that opens the answer is markup
                    if not self.buf and not final:
                        break
                    self.buf, self.lead = self.buf.removeprefix("\n"), False
                done, text = self._until(RESPONSE_END, final)
                content.append(text)
                if not done:
                    break
                self.state = "tail"
                continue
            if self.state == "tail":  # after </response>: its newlines are markup too
                self.buf = self.buf.lstrip("\n")
                if not self.buf:
                    break
                self.state = "content"
                continue
            content.append(self.buf)
            self.buf = ""
            break
        return "".join(reasoning), "".join(content)

    def _until(self, tag: str, final: bool) -> tuple[bool, str]:
        """The text before ``tag`` (the newline just before it dropped: markup), and whether the
        tag was reached (the buffer then continues after it). Held back until it is known: a
        partial tag at the end, and a newline that the tag may follow."""
        at = self.buf.find(tag)
        if at >= 0:
            text = self.buf[:at]
            self.buf = self.buf[at + len(tag) :]
            return True, text.removesuffix("\n")
        cut = len(self.buf) if final else len(self.buf) - partial_tag(self.buf, tag)
        if not final and cut > 0 and self.buf[cut - 1] == "\n":
            cut -= 1
        text, self.buf = self.buf[:cut], self.buf[cut:]
        return False, text
