"""Ensemble quality and speed, side by side in one run.

Quality: bits per byte on WikiText-2 (../shared/data) for SmolLM2-135M alone, Gemma3-270M
alone, and their mixture. The two do not share a vocabulary, so the mixture is word-level:
each member's token log-probs are summed per whitespace-delimited word, and the members'
word probabilities are mixed. Weights: equal, 0.2 on SmolLM2, and per-window perplexity
weights (PackLLM's rule, computed on the previous window so nothing peeks at the text scored).

Transport: for merge, full distributions vs top-k + remaining mass (bits per byte of a
token-level mixture of SmolLM2 with itself at different precision is trivial, so the top-k
effect is measured as KL and argmax agreement against the full mixture, with bytes/token).

Speed: decode tokens/s of a pick ensemble (SmolLM2 + Gemma) and of a merge ensemble (SmolLM2
twice) against each member alone.

    python benchmarks/ensemble.py [--kb 30] [--window 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.backends import StepItem, load_shard  # noqa: E402
from mesh.engine.base import GenerationRequest  # noqa: E402
from mesh.engine.local import LocalEngine  # noqa: E402
from mesh.engine.sampling import SamplingParams, log_softmax  # noqa: E402
from mesh.ensemble.coordinator import build_ensemble_engine  # noqa: E402
from mesh.ensemble.mixing import compress, mix, perplexity_weights  # noqa: E402
from mesh.layers import LayerRange  # noqa: E402
from mesh.models.source import resolve  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext2-test-part-a.txt"
LN2 = math.log(2)


def windows(text: str, chars: int) -> list[str]:
    """Split at paragraph/space boundaries into pieces of about ``chars`` characters."""
    out, start = [], 0
    while start < len(text):
        end = min(start + chars, len(text))
        if end < len(text):
            cut = text.rfind(" ", start, end)
            end = cut if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def word_logprobs(shard, tok, text: str) -> tuple[np.ndarray, float]:
    """Log-prob of every whitespace-delimited word of ``text`` (its tokens summed) and of
    the whole text, under one model, reading the text after a BOS/EOS token."""
    enc = tok.hf(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    start_id = tok.hf.bos_token_id if tok.hf.bos_token_id is not None else tok.hf.eos_token_id
    seq = np.array([start_id] + ids, dtype=np.int32)
    cache = shard.new_cache()
    lps = []
    for off in range(0, len(seq) - 1, 256):
        chunk = seq[off:off + 256]
        logits = shard.forward([StepItem("b", chunk, cache, all_logits=True)])[0]
        lp = log_softmax(logits)
        targets = seq[off + 1: off + 1 + len(chunk)]
        lps.append(lp[np.arange(len(targets)), targets])
    token_lp = np.concatenate(lps)[: len(ids)]
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    word_lp = np.zeros(len(words))
    ends = np.array([e for _, e in words])
    for lp, (s, e) in zip(token_lp, offsets):
        # a token belongs to the word holding its last non-space character
        last = e - 1
        while last > s and text[last].isspace():
            last -= 1
        w = int(np.searchsorted(ends, last, side="right"))
        word_lp[min(w, len(words) - 1)] += lp
    return word_lp, float(token_lp.sum())


def quality(args) -> None:
    text = DATA.read_text()[: args.kb * 1024]
    pieces = windows(text, args.window * 4)  # ~4 characters per token
    members = {}
    for alias in ("smollm2-135m", "gemma3-270m"):
        src = resolve(alias, progress=False)
        members[alias] = (load_shard("torch", src, LayerRange.full(src.num_layers), "float32"),
                          src.tokenizer)
    total_bytes = len("".join(pieces).encode())
    alone = {a: 0.0 for a in members}
    mixes = {"equal": 0.0, "0.2 SmolLM2": 0.0, "perplexity (prev. window)": 0.0}
    prev_nll = None
    t0 = time.perf_counter()
    for piece in pieces:
        per = {}
        for alias, (shard, tok) in members.items():
            wl, total = word_logprobs(shard, tok, piece)
            per[alias] = wl
            alone[alias] += -total
        a, b = per["smollm2-135m"], per["gemma3-270m"]
        for name, w in (("equal", 0.5), ("0.2 SmolLM2", 0.2)):
            mixes[name] += -np.logaddexp(np.log(w) + a, np.log(1 - w) + b).sum()
        nll = [-a.sum() / len(piece.encode()), -b.sum() / len(piece.encode())]
        w = perplexity_weights(prev_nll, 0.1) if prev_nll else [0.5, 0.5]
        mixes["perplexity (prev. window)"] += -np.logaddexp(np.log(w[0]) + a,
                                                            np.log(w[1]) + b).sum()
        prev_nll = nll
    print(f"bits per byte on {total_bytes / 1024:.0f} KB of WikiText-2 test "
          f"({len(pieces)} windows of ~{args.window} tokens, fp32 weights dequantized from "
          f"the shipped GGUFs; {time.perf_counter() - t0:.0f} s)")
    for alias, v in alone.items():
        print(f"  {alias:<28} {v / LN2 / total_bytes:.4f}")
    for name, v in mixes.items():
        print(f"  mixture, {name:<19} {v / LN2 / total_bytes:.4f}")


def transport(args) -> None:
    """Merge transport: top-k + rest vs the full distribution, on SmolLM2 predictions."""
    src = resolve("smollm2-135m", progress=False)
    shard = load_shard("torch", src, LayerRange.full(src.num_layers), "float32")
    ids = np.array(src.tokenizer.encode(DATA.read_text()[:6000])[:512], dtype=np.int32)
    lp = log_softmax(shard.forward([StepItem("t", ids, shard.new_cache(), True)])[0])
    v = lp.shape[1]
    print(f"\nmerge transport (SmolLM2, 512 positions, vocabulary {v}):")
    print(f"  {'members send':<14} {'bytes/token':>11} {'argmax same':>11} {'KL(full||k)':>12}")
    for k in (0, 256, 64, 16):
        kl, same = [], 0
        for row in lp:
            approx = compress(row, k).dense(v) if k else row
            # a two-member mixture of the same model, as the coordinator would see it
            m_full = mix([row, row], [1, 1])
            m_k = mix([approx, approx], [1, 1])
            p = np.exp(m_full.astype(np.float64))
            kl.append(float((p * (m_full - m_k)).sum()))
            same += int(np.argmax(m_full) == np.argmax(m_k))
        size = v * 4 if k == 0 else k * 8 + 4
        print(f"  {'full' if k == 0 else f'top-{k}':<14} {size:>11} "
              f"{same / len(lp):>11.3f} {np.mean(kl):>12.5f}")


def speed(args) -> None:
    def tps(engine, msgs, n=48):
        async def go():
            ids = engine.tokenizer.chat_prompt(msgs)
            req = GenerationRequest("s", ids, n, SamplingParams(temperature=0.0),
                                    frozenset(), messages=msgs)
            count, first = 0, None
            gen = engine.generate(req)
            async for _ in gen:
                count += 1
                first = first or time.perf_counter()
            await gen.aclose()
            return (count - 1) / (time.perf_counter() - first)
        return asyncio.run(go())

    msgs = [{"role": "user", "content": "Describe the water cycle in detail."}]
    res = {}
    for alias in ("smollm2-135m", "gemma3-270m"):
        src = resolve(alias, progress=False)
        e = LocalEngine(alias, [load_shard("torch", src, LayerRange.full(src.num_layers))],
                        src.tokenizer, 2048)
        tps(e, msgs, 8)
        res[alias] = tps(e, msgs)
    pick = build_ensemble_engine(["smollm2-135m", "gemma3-270m"], "pick", backend="torch")
    tps(pick, msgs, 8)
    res["pick: SmolLM2 + Gemma3"] = tps(pick, msgs)
    merge = build_ensemble_engine(["smollm2-135m", "smollm2-135m"], "merge", backend="torch")
    tps(merge, msgs, 8)
    res["merge: SmolLM2 x2"] = tps(merge, msgs)
    print("\ndecode tokens/s (48 greedy tokens, torch fp32, all members on this 2-core box):")
    for k, v in res.items():
        print(f"  {k:<28} {v:6.1f}")
    print(f"  pick / slowest member (Gemma3):   {res['pick: SmolLM2 + Gemma3'] / res['gemma3-270m']:.2f}")
    print(f"  merge / slowest member (SmolLM2): {res['merge: SmolLM2 x2'] / res['smollm2-135m']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kb", type=int, default=30)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    if not args.skip_quality:
        quality(args)
    transport(args)
    speed(args)


if __name__ == "__main__":
    main()
