"""Pick with and without scoring each member's own candidate from its proposal, interleaved
in one process (both members in it, on the same cores): greedy tokens/s of each.

    python benchmarks/pick_own.py [--rounds 2] [--tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mesh.ensemble.engine as ee  # noqa: E402
from mesh.engine.base import GenerationRequest  # noqa: E402
from mesh.engine.sampling import SamplingParams  # noqa: E402
from mesh.ensemble.coordinator import build_ensemble_engine  # noqa: E402

PROMPTS = ["Name three famous rivers.", "Why is the sky blue?",
           "Give two tips for sleeping well."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    shortcut = ee._own_logprobs
    ens = build_ensemble_engine(["smollm2-135m", "gemma3-270m"], "pick",
                                backend="onnxruntime", context_length=1024)

    def generate(text: str) -> int:
        msgs = [{"role": "user", "content": text}]

        async def go():
            req = GenerationRequest("r", ens.tokenizer.chat_prompt(msgs), args.tokens,
                                    SamplingParams(temperature=0.0),
                                    frozenset(ens.tokenizer.eos_token_ids), messages=msgs)
            gen = ens.generate(req)
            n = len([s async for s in gen])
            await gen.aclose()
            return n

        return asyncio.run(go())

    totals = {"own candidate from its proposal": [0, 0.0], "every candidate by a pass": [0, 0.0]}
    for _ in range(args.rounds):
        for mode in totals:
            ee._own_logprobs = shortcut if mode.startswith("own") else (lambda *a: None)
            for text in PROMPTS:
                t = time.perf_counter()
                totals[mode][0] += generate(text)
                totals[mode][1] += time.perf_counter() - t
    ee._own_logprobs = shortcut
    asyncio.run(ens.close())
    for mode, (n, secs) in totals.items():
        print(f"pick, {mode:<32} {n} tokens in {secs:.1f} s = {n / secs:.2f} tok/s")


if __name__ == "__main__":
    main()
