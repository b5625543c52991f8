"""Grammar-constrained decoding (structured outputs) with xgrammar.

A request whose ``SamplingParams.structured`` is set (the frontend fills it from
``response_format``, ``tools``, a regex / EBNF / choice extra) walks through here:

1. when it reaches the engine (``add_request``, ``add_prefill``, a decode's ``reserve``) its
   grammar is compiled on a worker thread (:meth:`Grammars.compile`: a bounded LRU of futures keyed
   by ``(kind, spec)``, so the same schema compiles once); the sequence is queued at once and
   the chunks of its prompt before the last may compute meanwhile — only the step that would
   sample is held back until the grammar is ready (``Sequence.may_compute``: the scheduler skips
   it, others run);
2. the compiled grammar's completion is posted to the engine's inbox; there the sequence gets its
   ``GrammarMatcher``, which accepts the outputs it already has (a decode: token one and a
   re-prefill's outputs so far), so PD draws what mixed draws;
3. each step that samples grammar rows fills their token bitmasks on a worker thread while the
   forward runs (:meth:`Grammars.fill`: xgrammar's batch fill releases the GIL), then applies them
   to those rows' logits before the sampler's draw (:meth:`MaskFill.apply`), so a seeded draw under
   a grammar is deterministic;
4. the drawn token advances the matcher (:meth:`SeqGrammar.accept`); a matcher that terminated
   (it accepted an eos / stop token) ends the sequence with ``stop``; ``max_tokens`` first ends it
   with ``length``.

Rows without a grammar pay nothing but an attribute test. Under asynchronous scheduling a grammar
row still runs a step ahead: the engine lands the step in flight after launching the next
forward, then fills this step's masks (actors.engine.overlap). xgrammar
is imported on the compile thread at the first structured request: an instance that never sees
one never loads it.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

import msgspec
import torch

from actors.frontend.structured import xgrammar_message
from pdbus.log import get_logger
from pdbus.messages import StructuredOutput

log = get_logger("grammar")

KINDS = ("json_object", "json_schema", "regex", "ebnf", "choice")
CACHE_SIZE = 64  # compiled grammars kept (an LRU keyed by (kind, spec))


class GrammarError(ValueError):
    """A structured-output spec that does not compile (the request fails, alone)."""


def _xgr():
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - xgrammar is an install requirement
        raise GrammarError(f"structured output needs xgrammar (pip install xgrammar==0.2.8): {exc}") from None
    return xgrammar


def tokenizer_info(tokenizer, stop_token_ids: Iterable[int]):
    """xgrammar's view of a SentencePiece ``tokenizer`` (actors.frontend.tokenizer.Tokenizer):
    every piece as SentencePiece writes it (``▁`` for a space, ``<0x0A>`` for a byte), special
    tokens empty (never text a grammar can match; the stop ids end it); the tokenizer's ids only
    (logits wider than that are the model's padding, banned apart: :meth:`MaskFill.apply`)."""
    xgr = _xgr()
    special = tokenizer.all_special_ids
    pieces = tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))
    encoded = ["" if i in special else p for i, p in enumerate(pieces)]
    vocab_type = xgr.VocabType.BYTE_FALLBACK
    if "<0x00>" not in pieces:  # no byte pieces: a plain vocabulary, spaces written as ▁
        vocab_type = xgr.VocabType.RAW
        encoded = [p.replace("\u2581", " ") for p in encoded]
    return xgr.TokenizerInfo(
        encoded,
        vocab_type,
        vocab_size=len(encoded),
        stop_token_ids=sorted(stop_token_ids),
        add_prefix_space=False,  # the tokenizer drops SentencePiece's dummy prefix
    )


# xgrammar 0.2.8 lowers a string under minLength / maxLength to a repetition of this class, which
# lets raw control characters (U+0000-U+001F but CR and LF) into it where JSON forbids them
# (mlc-ai/xgrammar#800, open); its unbounded strings have the class that excludes them.
_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def _compile_json_schema(compiler, schema: str):
    """``schema``'s grammar; where it has a bounded string, with the JSON string class (the EBNF
    xgrammar converts the schema to, that class replaced, compiled as a grammar)."""
    text = str(_xgr().Grammar.from_json_schema(schema, any_whitespace=False))
    if _BOUNDED_STRING_CHAR not in text:
        return compiler.compile_json_schema(schema, any_whitespace=False)
    return compiler.compile_grammar(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))


def _compile(compiler, spec: StructuredOutput):
    """``spec`` as an xgrammar ``CompiledGrammar`` (compact JSON: no free whitespace, so a model
    cannot wander in blanks)."""
    kind, text = spec.kind, spec.spec
    try:
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "json_schema":
            return _compile_json_schema(compiler, text)
        if kind == "regex":
            return compiler.compile_regex(text)
        if kind == "ebnf":
            return compiler.compile_grammar(text)
        if kind == "choice":
            choices = json.loads(text)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise GrammarError("choice: spec must be a JSON list of strings, not empty")
            alternatives = " | ".join(json.dumps(c) for c in choices)  # GBNF string literals
            return compiler.compile_grammar(f"root ::= {alternatives}")
    except GrammarError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's parse errors, bad JSON
        raise GrammarError(f"{kind} does not compile: {xgrammar_message(exc)}") from None
    raise GrammarError(f"unknown structured output kind {kind!r} (one of {', '.join(KINDS)})")




class SeqGrammar:
    """One sequence's grammar: the compile future, then its matcher."""

    __slots__ = ("future", "matcher", "error")

    def __init__(self, future: cf.Future):
        self.future = future
        self.matcher = None
        self.error: str | None = None

    @property
    def ready(self) -> bool:
        """The matcher is there: the sequence may sample."""
        return self.matcher is not None

    @property
    def terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()

    def bind(self, outputs: Iterable[int]) -> str | None:
        """Engine thread, once the compile is done: make the matcher and accept ``outputs`` (the
        tokens the sequence already has). Returns an error, or None."""
        try:
            compiled = self.future.result(timeout=0)
        except GrammarError as exc:
            self.error = str(exc)
            return self.error
        except Exception as exc:  # an xgrammar failure we do not know by name: this request only
            self.error = f"grammar compilation failed: {type(exc).__name__}: {exc}"
            return self.error
        matcher = _xgr().GrammarMatcher(compiled)
        for tok in outputs:
            if not matcher.accept_token(tok):
                self.error = f"the grammar does not accept token {tok} of the outputs so far"
                return self.error
        self.matcher = matcher
        return None

    def accept(self, tok: int) -> bool:
        return self.matcher.accept_token(tok)


class MaskFill:
    """The bitmasks of one step's grammar rows, filled on the fill thread while the forward runs."""

    def __init__(self, rows: list[int], bitmask: torch.Tensor, vocab_size: int, done: cf.Future):
        self.rows = rows  # rows of the step's logits that are masked
        self.bitmask = bitmask  # [rows sampled, ceil(vocab_size / 32)] int32 on the host
        self.vocab_size = vocab_size  # the ids the mask decides: the tokenizer's
        self.done = done

    def sampling(self, params: list) -> list:
        """The step's sampling params with ``min_tokens`` off for grammar rows: the grammar decides
        where the output ends (banning eos where it allows nothing else would leave no token)."""
        for i in self.rows:
            if params[i].min_tokens:
                params[i] = msgspec.structs.replace(params[i], min_tokens=0)
        return params

    @torch.inference_mode()  # the logits are inference tensors
    def apply(self, logits: torch.Tensor) -> None:
        """Mask ``logits`` ([rows sampled, vocab], in place) once the fill is done: xgrammar's mask
        over the tokenizer's ids, and every id past them (the model's padding) banned outright."""
        self.done.result()
        xgr = _xgr()
        bitmask = self.bitmask
        backend = "cpu"
        if logits.device.type == "cuda":
            bitmask = bitmask.to(logits.device, non_blocking=True)
            backend = "triton" if _have_triton() else "torch_native"
        every_row = len(self.rows) == logits.shape[0]
        vocab = min(self.vocab_size, logits.shape[1])
        xgr.apply_token_bitmask_inplace(
            logits, bitmask, vocab_size=vocab, indices=None if every_row else self.rows, backend=backend
        )
        if logits.shape[1] > vocab:  # ids no grammar can reach
            if every_row:
                logits[:, vocab:].fill_(float("-inf"))
            else:
                logits[torch.tensor(self.rows, device=logits.device), vocab:] = float("-inf")


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class Grammars:
    """One engine's grammar compiler (TokenizerInfo built from the rank's tokenizer on the
    compile thread, at first use), the bounded cache of compiled grammars, and the fill thread."""

    def __init__(self, tokenizer, stop_token_ids: Iterable[int], *, cache_size: int = CACHE_SIZE):
        self._tokenizer = tokenizer
        # The masks cover the tokenizer's ids only; the model's padding ids past them are banned
        # by one fill (xgrammar's fill costs ~1 µs per 1,000 ids even where they are all padding:
        # 2.2 ms for 16 rows of the 103,424-wide 21B-A3B logits over the built-in 1,024 tokens).
        self.vocab_size = tokenizer.vocab_size
        self._stop_ids = sorted(stop_token_ids)
        self._compiler = None
        self._cache: OrderedDict[tuple[str, str], cf.Future] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._compile_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="pdbus-grammar")
        self._fill_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="pdbus-grammar-fill")
        self._batch = None  # xgrammar's BatchGrammarMatcher, made with the compiler
        self._bitmask: torch.Tensor | None = None  # reused: [rows, words] int32, grown as needed
        self.compiled = 0  # grammars compiled (cache misses)

    def close(self) -> None:
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self._fill_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ compile
    def compile(self, spec: StructuredOutput) -> cf.Future:
        """The future of ``spec``'s compiled grammar (one compile per distinct spec while cached)."""
        key = (spec.kind, spec.spec)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._compile_pool.submit(self._compile_one, spec)
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return future

    def _compile_one(self, spec: StructuredOutput):
        if self._compiler is None:  # only this thread builds it
            xgr = _xgr()
            info = tokenizer_info(self._tokenizer, self._stop_ids)
            threads = max(1, min(4, (os.cpu_count() or 2) // 2))
            self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
            self._batch = xgr.BatchGrammarMatcher(threads)
        self.compiled += 1
        return _compile(self._compiler, spec)

    def start(self, spec: StructuredOutput, on_done: Callable[[], None]) -> SeqGrammar:
        """A sequence's grammar; ``on_done`` is called (from any thread, once) when it compiled
        or failed to."""
        grammar = SeqGrammar(self.compile(spec))
        grammar.future.add_done_callback(lambda _f: on_done())
        return grammar

    # ------------------------------------------------------------------ per step
    def fill(self, seqs, inline: bool = False) -> MaskFill | None:
        """Start filling the bitmasks of the grammar rows among ``seqs`` (the rows a step
        samples, in order) on the fill thread, or with ``inline`` fill them here and now (for a
        caller that would wait at once: the hand-off to the thread costs ~0.1 ms, the fill of 16
        rows a few µs to tens of µs); None when none has a grammar."""
        rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return None
        matchers = [seqs[i].grammar.matcher for i in rows]
        words = (self.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < len(seqs):
            pin = torch.cuda.is_available()
            self._bitmask = torch.empty((max(len(seqs), 16), words), dtype=torch.int32, pin_memory=pin)
        bitmask = self._bitmask[: len(seqs)]  # row i masks the step's sampled row i (only grammar rows are filled)
        if inline:
            done = cf.Future()
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
            done.set_result(None)
        else:
            done = self._fill_pool.submit(self._batch.batch_fill_next_token_bitmask, matchers, bitmask, rows)
        return MaskFill(rows, bitmask, self.vocab_size, done)
