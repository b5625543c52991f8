"""transformers' Ernie4_5_MoeForCausalLM on the GPU with ERNIE-4.5-21B-A3B shapes: the baseline
GPU.md measured. Random bf16 weights built on the GPU; greedy; ms per decode step and the prefill
of a 2,048-token prompt. Prints one JSON line."""

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    cfg = Ernie4_5_MoeConfig(
        hidden_size=2560, intermediate_size=12288, num_hidden_layers=args.layers, num_attention_heads=20,
        num_key_value_heads=4, vocab_size=103424, moe_num_experts=64, moe_k=6, moe_intermediate_size=1536,
        moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_interval=1, tie_word_embeddings=True,
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Ernie4_5_MoeForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    for batch in (1, 16):
        ids = torch.randint(3, 100000, (batch, 128), device="cuda")
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens)
        torch.cuda.synchronize()
        step = (time.perf_counter() - t0) / args.new_tokens
        out[f"decode_b{batch}_ms"] = round(step * 1e3, 2)
        out[f"decode_b{batch}_tok_s"] = round(batch / step, 1)
    ids = torch.randint(3, 100000, (1, 2048), device="cuda")
    with torch.inference_mode():
        model(ids)
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out["prefill_2048_ms"] = round(sorted(times)[1] * 1e3, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
