"""Tokenizer, chat template and incremental detokenizer, on small SentencePiece models trained here."""

import io
import json

import pytest
import sentencepiece as spm

from actors.frontend.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerError,
)

BOS, EOS_SENT = "<|begin_of_sentence|>", "<|end_of_sentence|>"
CORPUS = [
    "Hello world, this is a small test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.\nAnd then it runs away.",
    "你好，请介绍一下自己。",
    "我是一个语言模型，可以回答问题。",
    "今天天气很好，我们去公园散步吧。",
] * 10


def _train(**overrides) -> bytes:
    buf = io.BytesIO()
    options = dict(
        vocab_size=420, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        user_defined_symbols=[BOS, EOS_SENT], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, hard_vocab_limit=False, minloglevel=2,
    )
    options.update(overrides)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, **options)
    return buf.getvalue()


CONFIG = {
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
    "cls_token": BOS, "sep_token": EOS_SENT, "add_bos_token": False, "add_eos_token": False,
}


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {
        "tokenizer.model": _train(),
        "tokenizer_config.json": json.dumps(CONFIG).encode(),
        "special_tokens_map.json": json.dumps({"cls_token": BOS, "sep_token": EOS_SENT}).encode(),
    }


@pytest.fixture(scope="module")
def tok(files) -> Tokenizer:
    return Tokenizer.from_files(files)


@pytest.mark.parametrize("text", [
    "Hello world, this is a test.",
    "  leading and trailing spaces  ",
    "line one\nline two\n",
    "你好，请介绍一下自己。",
    "龘靐齉：不在词表里的汉字 and English 混合 🙂",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_no_bos_or_dummy_prefix_by_default(tok):
    ids = tok.encode("Hello")
    assert tok.bos_token_id == 1 and ids[0] != 1
    assert not tok.convert_ids_to_tokens(ids)[0].startswith("\u2581")
    assert tok.encode("Hello", add_special_tokens=True) == [1, *ids]


def test_special_tokens_are_single_ids(tok):
    bos_id, sep_id = tok.token_to_id(BOS), tok.token_to_id(EOS_SENT)
    assert bos_id is not None and sep_id is not None
    assert tok.encode(BOS) == [bos_id]
    assert tok.encode(EOS_SENT) == [sep_id]
    assert tok.encode("</s>") == [2]
    ids = tok.encode(f"{BOS}User: hi{EOS_SENT}User")
    assert ids[0] == bos_id and ids.count(sep_id) == 1
    assert ids[1:ids.index(sep_id)] == tok.encode("User: hi")
    assert tok.decode(ids) == "User: hiUser"
    assert tok.decode(ids, skip_special_tokens=False) == f"{BOS}User: hi{EOS_SENT}User"


def test_eos_ids_cover_both_end_tokens(tok):
    assert tok.eos_token_ids == {2, tok.token_to_id(EOS_SENT)}
    assert tok.eos_token_id == 2
    assert tok.vocab_size == 420


def test_ids_beyond_vocab_decode_to_nothing(tok):
    assert tok.decode([*tok.encode("ok"), tok.vocab_size + 7]) == "ok"


def test_chat_template_default(tok):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "你好"}]},
    ]
    assert tok.apply_chat_template(messages) == (
        f"{BOS}You are helpful.\nUser: Hi\nAssistant: Hello!{EOS_SENT}User: 你好\nAssistant: "
    )
    assert tok.apply_chat_template(messages[1:2], add_generation_prompt=False) == f"{BOS}User: Hi\n"
    ids = tok.encode_chat(messages)
    assert ids[0] == tok.token_to_id(BOS)
    assert ids.count(tok.token_to_id(BOS)) == 1 and ids.count(tok.token_to_id(EOS_SENT)) == 1
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(messages)


def test_chat_template_from_config(files):
    config = dict(CONFIG, chat_template="{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                  "{% if add_generation_prompt %}[assistant]{% endif %}")
    tok = Tokenizer.from_files(dict(files, **{"tokenizer_config.json": json.dumps(config).encode()}))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x[assistant]"


# the shape of ERNIE-4.5 thinking models' templates: a flag the request sets through chat_template_kwargs
THINKING_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>{% endif %}{% endif %}{{ greeting | default('') }}"
)


def test_chat_template_kwargs_reach_the_template(files):
    config = dict(CONFIG, chat_template=THINKING_TEMPLATE)
    tok = Tokenizer.from_files(dict(files, **{"tokenizer_config.json": json.dumps(config).encode()}))
    user = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(user) == "[user]x[assistant]"
    assert tok.apply_chat_template(user, enable_thinking=True) == "[user]x[assistant]"
    assert tok.apply_chat_template(user, enable_thinking=False) == "[user]x[assistant]<think>\n\n</think>"
    assert tok.apply_chat_template(user, greeting="!") == "[user]x[assistant]!"  # unknown kwargs pass through
    assert tok.apply_chat_template(user, add_generation_prompt=False) == "[user]x"
    with pytest.raises(TokenizerError, match="'messages'"):
        tok.apply_chat_template(user, messages=[])


def test_chat_template_is_sandboxed(files):
    config = dict(CONFIG, chat_template="{{ messages.append(1) }}")
    tok = Tokenizer.from_files(dict(files, **{"tokenizer_config.json": json.dumps(config).encode()}))
    with pytest.raises(TokenizerError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError):
        Tokenizer.from_files(files).apply_chat_template([{"role": "robot", "content": "x"}])


def _stream(tok, ids, prompt_ids=None, **kwargs):
    detok = IncrementalDetokenizer(tok, prompt_ids, **kwargs)
    deltas = [detok.add([i]) for i in ids]
    deltas.append(detok.flush())
    return deltas


def test_streaming_chinese_never_splits_a_character(tok):
    text = "龘靐齉是罕见字，你好，请介绍一下自己。最后一个字：鬱"
    ids = tok.encode(text)
    byte_pieces = [p for p in tok.convert_ids_to_tokens(ids) if p.startswith("<0x")]
    assert len(byte_pieces) >= 6  # the test exercises byte fallback
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= len(byte_pieces) // 2  # held while a character is incomplete


def test_streaming_after_prompt_and_specials(tok):
    prompt = tok.encode_chat([{"role": "user", "content": "你好"}])
    answer = tok.encode("我是一个语言模型。龘") + [tok.token_to_id(EOS_SENT)]
    deltas = _stream(tok, answer, prompt_ids=prompt)
    assert "".join(deltas) == "我是一个语言模型。龘"
    assert all("\ufffd" not in d for d in deltas)
    kept = _stream(tok, answer, prompt_ids=prompt, skip_special_tokens=False)
    assert "".join(kept) == "我是一个语言模型。龘" + EOS_SENT


def test_streaming_multi_token_chunks(tok):
    ids = tok.encode("Hello world, 龘靐 and 你好!")
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.add(ids[i:i + 3]) for i in range(0, len(ids), 3)) + detok.flush()
    assert out == detok.text == "Hello world, 龘靐 and 你好!"


def test_flush_emits_incomplete_tail(tok):
    ids = tok.encode("龘")
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[:-1]) == ""
    tail = detok.flush()
    assert tail and set(tail) == {"\ufffd"}  # SentencePiece gives one U+FFFD per stray byte


def test_files_round_trip(tok, files, tmp_path):
    assert tok.files() == files
    again = Tokenizer.from_files(tok.files())
    text = f"{BOS}User: 你好 world\nAssistant: "
    assert again.encode(text) == tok.encode(text)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "unrelated.bin").write_bytes(b"x")
    from_dir = Tokenizer(tmp_path)
    assert from_dir.files() == files
    assert from_dir.encode(text) == tok.encode(text)
    assert from_dir.eos_token_ids == tok.eos_token_ids


def test_added_tokens_json_and_decoder(files):
    config = dict(CONFIG, added_tokens_decoder={"500": {"content": "<tool>", "special": True}})
    tok = Tokenizer.from_files(dict(files, **{
        "tokenizer_config.json": json.dumps(config).encode(),
        "added_tokens.json": json.dumps({"<extra>": 501}).encode(),
    }))
    assert tok.encode("a<tool>b<extra>") == [*tok.encode("a"), 500, *tok.encode("b"), 501]
    assert tok.vocab_size == 502
    assert tok.decode([500, 501]) == "<extra>"


def test_model_with_dummy_prefix_is_encoded_without_it():
    tok = Tokenizer.from_files({"tokenizer.model": _train(add_dummy_prefix=True)})
    raw = spm.SentencePieceProcessor(model_proto=tok.files()["tokenizer.model"])
    assert raw.encode("Hello", out_type=str)[0].startswith("\u2581")
    assert not tok.convert_ids_to_tokens(tok.encode("Hello"))[0].startswith("\u2581")
    for text in ("Hello world", " spaced", "你好"):
        assert tok.decode(tok.encode(text)) == text


def test_bad_files_raise():
    with pytest.raises(TokenizerError):
        Tokenizer.from_files({"tokenizer_config.json": b"{}"})
    with pytest.raises(TokenizerError):
        Tokenizer.from_files({"tokenizer.model": b"not a model"})
    with pytest.raises(TokenizerError):
        Tokenizer.from_files({"tokenizer.model": _train(), "tokenizer_config.json": b"[1, 2"})
