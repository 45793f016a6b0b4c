"""Per-token cost of a grammar's mask: llguidance (what mesh uses) against xgrammar, on the
shipped models' tokenizers, for one JSON schema, following a valid document token by token.

    python benchmarks/grammar_masks.py [smollm2-135m|gemma3-270m]   # xgrammar: pip install xgrammar
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.engine.constraint import Constraint, json_schema_grammar  # noqa: E402
from mesh.models.source import resolve  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb", "ccc"]}},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"type": "string"}},
                "required": ["city"]}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
DOC = json.dumps({"name": "Ada Lovelace, the first programmer", "age": 36,
                  "tags": ["a", "ccc", "bb"], "address": {"city": "London", "zip": "W1"}})


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    tok = resolve(name).tokenizer
    ids = tok.encode(DOC, add_special_tokens=False)
    grammar = json_schema_grammar(SCHEMA)
    t0 = time.perf_counter()
    Constraint(tok, grammar)  # builds llguidance's vocabulary view once
    setup = time.perf_counter() - t0
    c, times = Constraint(tok, grammar), []
    for t in ids:
        a = time.perf_counter()
        c.bitmask()
        times.append(time.perf_counter() - a)
        c.advance(t)
    print(f"{name} (vocabulary {tok.vocab_size}) llguidance: setup {setup:.1f} s, mask mean "
          f"{np.mean(times) * 1e6:.0f} us, p99 {np.percentile(times, 99) * 1e6:.0f} us "
          f"over {len(ids)} tokens")
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        print("xgrammar: not installed (pip install xgrammar)")
        return
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.hf.backend_tokenizer)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size,
                                              stop_token_ids=sorted(tok.eos_token_ids))
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False)
    matcher, mask, times = (xgr.GrammarMatcher(compiled),
                            xgr.allocate_token_bitmask(1, tok.vocab_size), [])
    for t in ids:
        a = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - a)
        assert matcher.accept_token(t)
    print(f"{name} xgrammar: mask mean {np.mean(times) * 1e6:.0f} us, "
          f"p99 {np.percentile(times, 99) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
