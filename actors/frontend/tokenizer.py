"""SentencePiece tokenizer, ERNIE chat template and incremental detokenizer for the router.

The router has no model directory: an instance sends its tokenizer files over the bus
(`Tokenizer.files()` there, `Tokenizer.from_files()` here). Behaviour follows the HF ERNIE
tokenizer (shared/ERNIE.md §4): no BOS/EOS added on encode, no SentencePiece dummy prefix,
special tokens are atomic (the text is split on them before SentencePiece sees it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import sentencepiece as spm

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
OPTIONAL_FILES = ("special_tokens_map.json", "added_tokens.json")

# Token-valued keys of tokenizer_config.json / special_tokens_map.json.
_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "cls_token",
    "sep_token",
    "mask_token",
    "sys_start_token",
    "sys_end_token",
    "header_start_token",
    "header_end_token",
)
_LIST_KEYS = ("additional_special_tokens", "extra_special_tokens")
_EOS_CANDIDATES = ("</s>", "<|end_of_sentence|>")

# The ERNIE-4.5 template of shared/ERNIE.md §4, used when tokenizer_config.json has none.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if add_generation_prompt is not defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}"
    "{{- cls_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' + message['content'] + sep_token -}}"
    "{%- else -%}{{- raise_exception('unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)

_REPLACEMENT_CHAR = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, only a lone one: SentencePiece cannot take it


class TokenizerError(ValueError):
    """The tokenizer files are missing or malformed, or a chat template failed."""


def _token_content(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# --- minimal protobuf surgery: switch off NormalizerSpec.add_dummy_prefix -----------------------
# ModelProto field 3 is normalizer_spec; NormalizerSpec field 3 is add_dummy_prefix (bool).
# Appending a second occurrence of a scalar field overrides the first when parsed.


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise TokenizerError("truncated varint in tokenizer.model")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _write_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _without_dummy_prefix(proto: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(proto):
        start = pos
        tag, pos = _read_varint(proto, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _read_varint(proto, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, body = _read_varint(proto, pos)
            pos = body + length
            if field == 3:
                spec = proto[body:pos] + b"\x18\x00"  # field 3, varint, value 0
                out += _write_varint(tag) + _write_varint(len(spec)) + spec
                continue
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire} in tokenizer.model")
        out += proto[start:pos]
    if pos != len(proto):
        raise TokenizerError("truncated tokenizer.model")
    return bytes(out)


class Tokenizer:
    """SentencePiece tokenizer plus the special tokens and chat template of a model directory."""

    def __init__(self, model_dir: str | os.PathLike):
        files: dict[str, bytes] = {}
        for name in (MODEL_FILE, CONFIG_FILE, *OPTIONAL_FILES):
            path = os.path.join(model_dir, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = f.read()
        self._load(files)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> Tokenizer:
        """Build from the files an instance sent over the bus (name -> contents)."""
        tok = cls.__new__(cls)
        tok._load(files)
        return tok

    def files(self) -> dict[str, bytes]:
        """The files needed to rebuild this tokenizer elsewhere (see `from_files`)."""
        return dict(self._files)

    # --- loading ---------------------------------------------------------------------------------

    def _load(self, files: Mapping[str, bytes]) -> None:
        if MODEL_FILE not in files:
            raise TokenizerError(f"{MODEL_FILE} missing from the tokenizer files")
        wanted = (MODEL_FILE, CONFIG_FILE, *OPTIONAL_FILES)
        self._files = {name: bytes(files[name]) for name in wanted if name in files}
        config = self._json(CONFIG_FILE)
        special_map = self._json("special_tokens_map.json")
        added_json = self._json("added_tokens.json")

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(_without_dummy_prefix(self._files[MODEL_FILE]))
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"cannot load {MODEL_FILE}: {exc}") from exc
        self._sp_size = self._sp.get_piece_size()

        # Atomic tokens: content -> id. Special ones are dropped by decode(skip_special_tokens).
        self._added: dict[str, int] = {}
        self._special_ids: set[int] = set()
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            content = _token_content(entry)
            if content is not None:
                self._added[content] = int(key)
                if not isinstance(entry, Mapping) or entry.get("special", True):
                    self._special_ids.add(int(key))
        for content, idx in added_json.items():
            self._added.setdefault(content, int(idx))

        self.special_tokens: dict[str, str] = {}
        for source in (special_map, config):
            for key in _SPECIAL_KEYS:
                content = _token_content(source.get(key))
                if content is not None:
                    self.special_tokens.setdefault(key, content)
        names = list(self.special_tokens.values())
        for source in (special_map, config):
            for key in _LIST_KEYS:
                for value in source.get(key) or ():
                    content = _token_content(value)
                    if content is not None:
                        names.append(content)
        names.extend(t for t in _EOS_CANDIDATES if self._piece_id(t) is not None)
        for content in names:
            idx = self._added.get(content, self._piece_id(content))
            if idx is not None:
                self._added[content] = idx
                self._special_ids.add(idx)
        self._id_to_added = {idx: content for content, idx in self._added.items()}
        self._split_re = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True)) + ")")
            if self._added
            else None
        )

        self.vocab_size = max([self._sp_size, *(i + 1 for i in self._id_to_added)])
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token", "<s>"))
        self.pad_token_id = self.token_to_id(self.special_tokens.get("pad_token", "<unk>"))
        self.eos_token_ids: set[int] = {
            idx
            for idx in (self.token_to_id(t) for t in (*_EOS_CANDIDATES, self.special_tokens.get("eos_token")))
            if idx is not None
        }
        template = config.get("chat_template")
        if isinstance(template, list):  # HF's named-template form
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        self.chat_template: str = template if isinstance(template, str) else DEFAULT_CHAT_TEMPLATE
        self._compiled_template = None

    def _json(self, name: str) -> dict:
        raw = self._files.get(name)
        if raw is None:
            return {}
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"{name} is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise TokenizerError(f"{name} must hold a JSON object")
        return value

    def _piece_id(self, piece: str) -> int | None:
        idx = self._sp.piece_to_id(piece)
        return idx if self._sp.id_to_piece(idx) == piece else None

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        return self._added.get(token, self._piece_id(token))

    @property
    def eos_token_id(self) -> int | None:
        eos = self.token_to_id(self.special_tokens.get("eos_token"))
        return eos if eos is not None else min(self.eos_token_ids, default=None)

    @property
    def all_special_ids(self) -> set[int]:
        return set(self._special_ids)

    # --- encode / decode -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens in the text become their single ids."""
        bad = _SURROGATE.search(text)
        if bad is not None:
            raise TokenizerError(f"text holds a lone UTF-16 surrogate (U+{ord(bad.group()):04X}) at position {bad.start()}")
        ids: list[int] = []
        if add_special_tokens and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        parts = self._split_re.split(text) if self._split_re is not None else [text]
        for i, part in enumerate(parts):
            if i % 2:  # odd entries are the captured special tokens
                ids.append(self._added[part])
            elif part:
                ids.extend(self._sp.encode(part, out_type=int))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()) -> str:
        """Text of ``ids``; ``keep``: special tokens written out even when skipping the others
        (markup a parser reads, such as ``<think>`` or ``<tool_call>``, where those are tokens)."""
        out: list[str] = []
        run: list[int] = []
        for raw in ids:
            idx = int(raw)
            if idx in self._id_to_added or idx in self._special_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not (skip_special_tokens and idx in self._special_ids and idx not in keep):
                    out.append(self._id_to_added.get(idx, ""))
            elif 0 <= idx < self._sp_size:
                run.append(idx)
            # ids past the tokenizer (model vocab padding) decode to nothing
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [
            self._id_to_added[i]
            if i in self._id_to_added
            else self._sp.id_to_piece(i)
            if 0 <= i < self._sp_size
            else ""
            for i in map(int, ids)
        ]

    # --- chat template ---------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping], /, add_generation_prompt: bool = True, **template_kwargs) -> str:
        """Render OpenAI-style messages with the model's chat template (a sandboxed jinja2).

        ``template_kwargs`` (a request's ``chat_template_kwargs``, e.g. ``enable_thinking``) are
        template variables, passed through whatever their names (as vLLM and HF do); they may
        override a special token's variable but not ``messages``.
        """
        if "messages" in template_kwargs:
            raise TokenizerError("chat template: 'messages' cannot be a template keyword argument")
        template = self._template()
        context = dict(self.special_tokens)
        context.setdefault("cls_token", "<|begin_of_sentence|>")
        context.setdefault("sep_token", "<|end_of_sentence|>")
        context.setdefault("bos_token", "<s>")
        context.setdefault("eos_token", "</s>")
        context.update(template_kwargs)
        context["messages"] = [_plain_message(m) for m in messages]
        context["add_generation_prompt"] = add_generation_prompt
        try:
            return template.render(**context)
        except TokenizerError:
            raise
        except Exception as exc:  # jinja2 raises many types; all mean "bad template or input"
            raise TokenizerError(f"chat template failed: {exc}") from exc

    @property
    def supports_tools(self) -> bool:
        """The template renders ``tools`` itself (HF's convention: a variable of that name)."""
        return "tools" in self.chat_template

    def special_ids_of(self, tokens: Iterable[str]) -> frozenset[int]:
        """The ids of those of ``tokens`` that are special tokens of this tokenizer."""
        return frozenset(i for i in map(self.token_to_id, tokens) if i is not None and i in self._special_ids)

    def encode_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def _template(self):
        if self._compiled_template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TokenizerError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = raise_exception
            try:
                self._compiled_template = env.from_string(self.chat_template)
            except Exception as exc:
                raise TokenizerError(f"chat template does not compile: {exc}") from exc
        return self._compiled_template


def _plain_message(message: Mapping) -> dict:
    """OpenAI messages may carry content as a list of parts; templates expect a string."""
    if not isinstance(message, Mapping) or "role" not in message:
        raise TokenizerError("each message needs a role")
    out = dict(message)
    content = out.get("content")
    if content is None:
        out["content"] = ""
    elif isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                raise TokenizerError("only text content parts are supported")
        out["content"] = "".join(texts)
    elif not isinstance(content, str):
        raise TokenizerError("message content must be a string or a list of text parts")
    return out


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, never emitting half a UTF-8 character.

    Keeps two offsets into the ids: text is decoded over the window [prefix_offset:], and what
    the window [prefix_offset:read_offset] already produced is cut off. A delta ending in U+FFFD
    means a byte-fallback character is incomplete; it is held back until more ids arrive.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        keep: frozenset[int] = frozenset(),
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.keep = keep
        self.ids: list[int] = [int(i) for i in prompt_ids or ()]
        # A few prompt ids of context so the first delta joins the prompt as decode() would.
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - 5, 0)
        self.text = ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens, keep=self.keep)

    def add(self, token_ids: Iterable[int] | int) -> str:
        """Append ids; return the newly completed text (possibly empty)."""
        if isinstance(token_ids, int):
            token_ids = (token_ids,)
        self.ids.extend(int(i) for i in token_ids)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character comes out as U+FFFD)."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
