"""What filling grammar bitmasks costs the host: 16 rows of the json_schema of grammar_bench.py,
walked token by token (each row takes its first allowed token), against the mask width.

    PYTHONPATH=. python bench/grammar_fill.py [--rows 16] [--steps 40]

Prints the median ``Grammars.fill`` (the fill thread, as a step that overlaps its forward uses it)
and the batch fill called inline (as a grammar row run ahead uses it), at the tokenizer's width
(what the engine fills) and padded to the 21B-A3B logits' 103,424 ids (what it filled before).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import xgrammar as xgr  # noqa: E402
from grammar_bench import SCHEMA  # noqa: E402

from actors.engine.grammar import Grammars, tokenizer_info  # noqa: E402
from actors.frontend.tokenizer import Tokenizer  # noqa: E402
from pdbus.config import default_model_dir  # noqa: E402
from pdbus.messages import StructuredOutput  # noqa: E402


class _Row:
    def __init__(self, matcher):
        self.grammar = type("G", (), {"matcher": matcher})()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    tok = Tokenizer(default_model_dir())
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    grammars = Grammars(tok, tok.eos_token_ids)
    compiled = grammars.compile(spec).result()
    info = tokenizer_info(tok, tok.eos_token_ids)
    padded = xgr.TokenizerInfo(info.decoded_vocab, info.vocab_type, vocab_size=103424,
                               stop_token_ids=info.stop_token_ids, add_prefix_space=False)  # fmt: skip
    padded_compiled = xgr.GrammarCompiler(padded, cache_enabled=False).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    for name, grammar, width in (("tokenizer width", compiled, grammars.vocab_size), ("padded to 103,424", padded_compiled, 103424)):
        rows = [_Row(xgr.GrammarMatcher(grammar)) for _ in range(args.rows)]
        batch = xgr.BatchGrammarMatcher(1)
        bitmask = xgr.allocate_token_bitmask(args.rows, width)
        pool, inline = [], []
        for _ in range(args.steps):
            t = time.perf_counter()
            if width == grammars.vocab_size:
                grammars.fill(rows).done.result()
                pool.append(time.perf_counter() - t)
                t = time.perf_counter()
            batch.batch_fill_next_token_bitmask([r.grammar.matcher for r in rows], bitmask, list(range(args.rows)))
            inline.append(time.perf_counter() - t)
            for i, r in enumerate(rows):  # the first allowed token of each row
                allowed = xgr.testing._get_masked_tokens_from_bitmask(bitmask[i : i + 1], width)
                first = next(t for t in range(width) if t not in set(allowed))
                if not r.grammar.matcher.accept_token(first):
                    raise SystemExit(f"token {first} refused")
        line = f"{name}: inline fill of {args.rows} rows median {statistics.median(inline) * 1e6:.1f} us"
        if pool:
            line += f", through the fill thread {statistics.median(pool) * 1e6:.1f} us"
        print(line, flush=True)
    grammars.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
