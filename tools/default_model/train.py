"""Train pdbus's built-in default model on this machine's CPU: tokenizer, tiny ERNIE-4.5-MoE, export.

    .venv/bin/python -m tools.default_model.train            # writes native/default_model/

Steps, all deterministic from --seed:
1. the corpus (tools/default_model/corpus.py) and a byte-fallback BPE SentencePiece tokenizer
   trained on its chat-rendered dialogues (tokenizer.model, tokenizer_config.json with the ERNIE
   chat template that opens ``<think>`` under ``enable_thinking``, special_tokens_map.json);
2. a small ERNIE-4.5-MoE (layer 0 dense, MoE layers with a shared expert), fp32, AdamW, loss on
   the assistant tokens only (prompt ids exactly as the server builds them), plus a small
   load-balancing loss so every expert gets used (the correction bias stays zero);
3. export in the ERNIE -Paddle layout, bf16 (config.json, generation_config.json,
   model.safetensors) and the fixed eval prompts (eval_prompts.json), then greedy evaluation in
   bf16 of the exported checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import time

import sentencepiece as spm
import torch
import torch.nn.functional as F

from actors.frontend.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from native.model.config import ErnieConfig
from native.model.ernie import ErnieForCausalLM, MoE
from native.model.export import save_paddle

from . import corpus as corpus_mod
from .eval import evaluate, load_default_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO, "native", "default_model")

CLS, SEP, MASK = "<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>"
SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: CLS, 4: SEP, 5: MASK}

ARCH = dict(
    hidden_size=128,
    intermediate_size=512,  # dense layer 0
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,  # nh*hd = 256 != hidden, as in ERNIE-4.5-0.3B
    moe_num_experts=8,
    moe_k=2,
    moe_intermediate_size=128,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    moe_layer_interval=1,
)


# --- tokenizer -----------------------------------------------------------------------------------

# The ERNIE-4.5 template (shared/ERNIE.md §4) whose generation prompt opens the reasoning with
# "<think>\n" when the request asks for it (chat_template_kwargs {"enable_thinking": true}), as a
# thinking model's template does; without it (the default) the model answers directly.
_GENERATION_PROMPT = "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
assert DEFAULT_CHAT_TEMPLATE.endswith(_GENERATION_PROMPT)
THINK_OPEN = "<think>\n"
CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE[: -len(_GENERATION_PROMPT)] + (
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{- '" + THINK_OPEN + "' -}}{%- endif -%}"
    "{%- endif -%}"
)


def render(messages, thinking: bool = False) -> str:
    """The ERNIE chat format (shared/ERNIE.md §4), for the SentencePiece training text; a thinking
    answer follows the prompt's <think>."""
    parts = [CLS]
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"] + "\n")
        elif m["role"] == "user":
            parts.append("User: " + m["content"] + "\n")
        else:
            parts.append("Assistant: " + (THINK_OPEN if thinking else "") + m["content"] + SEP)
    return "".join(parts)


def train_tokenizer(dialogues, vocab_size: int) -> dict[str, bytes]:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([render(ex.messages, ex.thinking) for ex in dialogues]),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        user_defined_symbols=[CLS, SEP, MASK],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
              "cls_token": CLS, "sep_token": SEP, "mask_token": MASK}
    config = {
        **tokens,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                     "normalized": False, "single_word": False}
            for i, t in SPECIALS.items()
        },
        "chat_template": CHAT_TEMPLATE,
    }
    files = {
        "tokenizer.model": buf.getvalue(),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(tokens),
    }
    tok = Tokenizer.from_files(files)
    for idx, piece in SPECIALS.items():
        if tok.token_to_id(piece) != idx:
            raise RuntimeError(f"special token {piece!r} got id {tok.token_to_id(piece)}, expected {idx}")
    return files


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


# --- data ----------------------------------------------------------------------------------------

def encode_dialogue(tok: Tokenizer, messages, template_kwargs=None) -> tuple[list[int], int]:
    """Token ids of the whole dialogue and where the answer starts.

    The prompt is tokenized exactly as the server does it (template with the generation prompt and
    the request's chat_template_kwargs, then encode), and the answer separately, followed by
    <|end_of_sentence|>.
    """
    prompt = tok.encode(tok.apply_chat_template(messages[:-1], add_generation_prompt=True, **(template_kwargs or {})))
    answer = tok.encode(messages[-1]["content"]) + [tok.token_to_id(SEP)]
    return prompt + answer, len(prompt)


def make_batches(examples, batch_tokens: int, gen: torch.Generator, pad_id: int):
    """One epoch: shuffle, sort windows by length (less padding), shuffle the batches."""
    order = torch.randperm(len(examples), generator=gen).tolist()
    batches = []
    window = 512
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: len(examples[i][0]))
        start = 0
        while start < len(chunk):
            longest = len(examples[chunk[start]][0])
            end = start + 1
            while end < len(chunk) and (end - start + 1) * max(longest, len(examples[chunk[end]][0])) <= batch_tokens:
                longest = max(longest, len(examples[chunk[end]][0]))
                end += 1
            batches.append(_collate([examples[i] for i in chunk[start:end]], pad_id))
            start = end
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def _collate(items, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    for row, (ids, answer_start) in enumerate(items):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        # position t predicts ids[t+1]; only answer tokens (and the closing SEP) are targets
        labels[row, answer_start - 1:len(ids) - 1] = torch.tensor(ids[answer_start:])
    return input_ids, labels


# --- model ---------------------------------------------------------------------------------------

def model_config(vocab_size: int) -> dict:
    return ErnieConfig.from_dict(dict(
        model_type="ernie4_5_moe",
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        moe_layer_end_index=ARCH["num_hidden_layers"] - 1,
        max_position_embeddings=4096,
        torch_dtype="bfloat16",
        **ARCH,
    )).to_dict()


class BalanceLoss:
    """Switch-style load-balancing loss over every MoE layer's router (fp32, from hooks)."""

    def __init__(self, model: torch.nn.Module):
        self.terms: list[torch.Tensor] = []
        self.loads: list[torch.Tensor] = []
        for m in model.modules():
            if isinstance(m, MoE):
                m.register_forward_hook(self._hook)

    def _hook(self, module: MoE, inputs, output) -> None:
        if not torch.is_grad_enabled():  # evaluation
            return
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        probs = torch.softmax(F.linear(x, module.gate.weight.float()), dim=-1)
        idx = torch.topk(probs.detach() + module.e_score_correction_bias, module.top_k, dim=-1).indices
        load = torch.bincount(idx.flatten(), minlength=module.num_experts).float() / idx.numel()
        self.terms.append(module.num_experts * (load * probs.mean(0)).sum())
        self.loads.append(load)

    def pop(self) -> tuple[torch.Tensor, torch.Tensor]:
        loss = torch.stack(self.terms).mean()
        loads = torch.stack(self.loads).detach()
        self.terms, self.loads = [], []
        return loss, loads


def train_model(cfg_dict: dict, examples, args, device: str = "cpu", on_epoch=None) -> ErnieForCausalLM:
    cfg = ErnieConfig.from_dict(cfg_dict)
    gen = torch.Generator().manual_seed(args.seed)
    model = ErnieForCausalLM(cfg, dtype=torch.float32)
    model.init_weights(std=0.02, generator=gen)
    model.to(device)
    balance = BalanceLoss(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    pad_id = cfg.pad_token_id
    steps_per_epoch = len(make_batches(examples, args.batch_tokens, torch.Generator().manual_seed(0), pad_id))
    total = steps_per_epoch * args.epochs
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
          f"{len(examples)} dialogues, ~{steps_per_epoch} steps/epoch, {total} steps")

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, total - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    step, start = 0, time.time()
    model.train()
    for epoch in range(args.epochs):
        epoch_loss, epoch_tokens, correct = 0.0, 0, 0
        loads = []
        for input_ids, labels in make_batches(examples, args.batch_tokens, gen, pad_id):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            input_ids, labels = input_ids.to(device), labels.to(device)
            logits = model.forward_train(input_ids)
            mask = labels != -100
            ce = F.cross_entropy(logits[mask], labels[mask])
            aux, load = balance.pop()
            loss = ce + args.balance_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            n = int(mask.sum())
            epoch_loss += float(ce.detach()) * n
            epoch_tokens += n
            correct += int((logits[mask].argmax(-1) == labels[mask]).sum())
            loads.append(load)
            step += 1
        load = torch.stack(loads).mean(0)
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {epoch_loss / epoch_tokens:.4f}  "
              f"token acc {correct / epoch_tokens:.4f}  lr {lr_at(step - 1):.2e}  "
              f"expert load min/max {float(load.min()):.3f}/{float(load.max()):.3f}  "
              f"{time.time() - start:.0f}s", flush=True)
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
            model.train()
    return model.cpu()


# --- export --------------------------------------------------------------------------------------

def save_checkpoint(model: ErnieForCausalLM, tok_files: dict[str, bytes], out_dir: str,
                    eos_ids: list[int]) -> None:
    """-Paddle layout in bf16 (router fp32), plus generation config and tokenizer files."""
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # no stale shards or index from an earlier export
        if name.startswith("model") and name.endswith((".safetensors", ".json")):
            os.remove(os.path.join(out_dir, name))
    save_paddle(model, model.cfg, out_dir, dtype=torch.bfloat16)
    generation = {"bos_token_id": 1, "eos_token_id": eos_ids, "pad_token_id": 0,
                  "do_sample": False, "temperature": 1.0, "top_p": 1.0}
    with open(os.path.join(out_dir, "generation_config.json"), "wb") as f:
        f.write(_json_bytes(generation))
    for name, data in tok_files.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)


# --- main ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--balance-coef", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer-only", action="store_true", help="write the tokenizer files and stop")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    dialogues = corpus_mod.build(args.seed)
    tok_files = train_tokenizer(dialogues, args.vocab_size)
    tok = Tokenizer.from_files(tok_files)
    if args.tokenizer_only:
        os.makedirs(args.out, exist_ok=True)
        for name, data in tok_files.items():
            with open(os.path.join(args.out, name), "wb") as f:
                f.write(data)
        print(f"tokenizer: {tok.vocab_size} pieces -> {args.out}")
        return
    examples = [encode_dialogue(tok, ex.messages, ex.template_kwargs) for ex in dialogues]
    print(f"tokenizer: {tok.vocab_size} pieces; corpus: {len(dialogues)} dialogues, "
          f"{sum(len(ids) for ids, _ in examples)} tokens, "
          f"{sum(len(ids) - s for ids, s in examples)} answer tokens, longest {max(len(i) for i, _ in examples)}")

    cfg_dict = model_config(tok.vocab_size)
    model = train_model(cfg_dict, examples, args)
    train_s = time.time() - t0
    save_checkpoint(model, tok_files, args.out, eos_ids=sorted(tok.eos_token_ids))
    prompts = corpus_mod.eval_set(args.seed)
    with open(os.path.join(args.out, "eval_prompts.json"), "wb") as f:
        f.write(_json_bytes(prompts))
    print(f"trained in {train_s:.0f}s; wrote {args.out}:")
    for name in sorted(os.listdir(args.out)):
        print(f"  {name:28s} {os.path.getsize(os.path.join(args.out, name)):>10,d} bytes")

    served, served_tok = load_default_model(args.out)
    passed = evaluate(served, served_tok, prompts, verbose=True)
    print(f"eval (bf16, greedy): {passed}/{len(prompts)} exact ({passed / len(prompts):.1%}); "
          f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
