"""Greedy evaluation of the built-in default model on its fixed prompts (bf16, as served).

    .venv/bin/python -m tools.default_model.eval [--model native/default_model]

Prints pass/fail per prompt of eval_prompts.json; exits non-zero if any prompt fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from actors.frontend.tokenizer import Tokenizer
from native.model.ernie import ErnieForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL = os.path.join(REPO, "native", "default_model")


def load_default_model(model_dir: str, dtype: torch.dtype = torch.bfloat16) -> tuple[ErnieForCausalLM, Tokenizer]:
    from native.model.loader import load_model

    model, _ = load_model(model_dir, dtype=dtype, device="cpu")
    model.eval()
    return model, Tokenizer(model_dir)


@torch.inference_mode()
def generate(model: ErnieForCausalLM, prompts: list[list[int]], eos_ids: set[int],
             max_new_tokens: list[int] | int = 160) -> list[list[int]]:
    """Greedy decoding with full recomputation (forward_train on the growing sequences).

    Prompts of equal length run as one batch, so no padding is needed.
    """
    device = model.model.embed_tokens.weight.device
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    outs: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for rows in by_len.values():
        x = torch.tensor([prompts[i] for i in rows], device=device)
        live = set(range(len(rows)))
        for _ in range(max(limits[i] for i in rows)):
            nxt = model.forward_train(x)[:, -1].argmax(-1)
            for r, tok in enumerate(nxt.tolist()):
                if r in live:
                    if tok in eos_ids or len(outs[rows[r]]) >= limits[rows[r]]:
                        live.discard(r)
                    else:
                        outs[rows[r]].append(tok)
            if not live:
                break
            x = torch.cat([x, nxt[:, None]], dim=1)
    return outs


def evaluate(model: ErnieForCausalLM, tok: Tokenizer, prompts: list[dict], verbose: bool = False) -> int:
    """Number of prompts answered exactly (greedy); prints PASS/FAIL lines when verbose."""
    ids = [tok.encode(tok.apply_chat_template(p["messages"], add_generation_prompt=True, **p.get("chat_template_kwargs", {})))
           for p in prompts]
    limits = [len(tok.encode(p["expected"])) + 8 for p in prompts]
    answers = [tok.decode(out) for out in generate(model, ids, tok.eos_token_ids, limits)]
    passed = 0
    for p, got in zip(prompts, answers):
        ok = got == p["expected"]
        passed += ok
        if verbose:
            line = f"[{'PASS' if ok else 'FAIL'}] {p['task']:8s} {p['prompt']!r} -> {got!r}"
            if not ok:
                line += f" (expected {p['expected']!r})"
            print(line, flush=True)
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_default_model(args.model, getattr(torch, args.dtype))
    with open(os.path.join(args.model, "eval_prompts.json"), encoding="utf-8") as f:
        prompts = json.load(f)
    passed = evaluate(model, tok, prompts, verbose=True)
    print(f"{passed}/{len(prompts)} exact ({passed / len(prompts):.1%})")
    sys.exit(0 if passed == len(prompts) else 1)


if __name__ == "__main__":
    main()
