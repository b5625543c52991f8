"""Stop strings on a detokenized text stream."""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """Cuts a detokenized text stream at the first stop string.

    ``feed(delta)`` returns the text that is safe to emit and whether a stop string was hit.
    A tail that could still grow into a stop string is held back (at most the longest stop minus
    one character); ``flush()`` releases it when the sequence ends for another reason. The stop
    string itself is dropped, as OpenAI does, unless ``include_stop``. Matching is eager: the first
    stop string completed wins, even if a longer one starting earlier might have completed later.
    """

    def __init__(self, stops: Sequence[str], include_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.max_hold = max((len(s) for s in self.stops), default=1) - 1
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._held + delta
        hit, at = None, -1
        for stop in self.stops:
            pos = text.find(stop)
            if pos != -1 and (hit is None or pos < at or (pos == at and len(stop) > len(hit))):
                hit, at = stop, pos
        if hit is not None:
            self.stopped, self.matched, self._held = True, hit, ""
            return text[: at + len(hit)] if self.include_stop else text[:at], True
        hold = self._partial_suffix(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held-back tail, at the end of a sequence that no stop string ended."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        for k in range(min(self.max_hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(stop.startswith(tail) for stop in self.stops):
                return k
        return 0
