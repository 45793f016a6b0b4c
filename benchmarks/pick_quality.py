"""How good pick's text is, against each member's own, for several chunk lengths.

Sampled continuations (temperature 0.8, seeds 1..N) of a few story and essay openings, written
through the API by SmolLM2 alone, Gemma 3 alone and `--strategy pick` ensembles of the two
with each `--chunk-tokens`; every text is then judged through the API by bits per byte of the
continuation (after the opening) under each member served alone and under the `words`
mixture of the two. Lower is better. Pick chooses, at each chunk, the candidate with the
lowest weighted NLL per byte under the members, so its text should read better to them than
either member's own; longer chunks mean fewer choices (and fewer, cheaper rounds:
`benchmarks/ensemble_served.py --pick-chunks 8 16 32` measures the speed).

    python benchmarks/pick_quality.py [--chunks 8 16 32] [--seeds 4] [--tokens 96]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ensemble_served import serve  # noqa: E402

OPENINGS = [
    "The lighthouse stood at the end of a long spit of rock, and for thirty years the same "
    "keeper had climbed its stairs every evening. On the night the storm came,",
    "The history of the city begins in the twelfth century, when a small group of merchants",
    "To make a good loaf of bread at home, you need only four ingredients:",
    "The experiment was designed to test whether plants grown under blue light",
]
PAIR = ["--member", "smollm2-135m", "--member", "gemma3-270m"]


def write(url: str, model: str, seeds: int, tokens: int) -> list[tuple[str, str]]:
    out = []
    for opening in OPENINGS:
        for seed in range(1, seeds + 1):
            r = httpx.post(url + "/v1/completions", timeout=600, json={
                "model": model, "prompt": opening, "max_tokens": tokens, "temperature": 0.8,
                "seed": seed})
            r.raise_for_status()
            out.append((opening, r.json()["choices"][0]["text"]))
    return out


def bits_per_byte(url: str, model: str, texts: list[tuple[str, str]]) -> float:
    """Of the continuations only: the tokens that start at or after the opening's end."""
    nll, nbytes = 0.0, 0
    for opening, text in texts:
        if not text.strip():
            continue
        r = httpx.post(url + "/v1/completions", timeout=600, json={
            "model": model, "prompt": opening + text, "max_tokens": 0, "echo": True,
            "logprobs": 0})
        r.raise_for_status()
        lp = r.json()["choices"][0]["logprobs"]
        nll -= sum(x for off, x in zip(lp["text_offset"], lp["token_logprobs"])
                   if off >= len(opening) and x is not None)
        nbytes += len(text.encode())
    return nll / math.log(2) / max(nbytes, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=96)
    args = ap.parse_args()
    writers = [("SmolLM2 alone", ["--model", "smollm2-135m"], "smollm2-135m"),
               ("Gemma 3 alone", ["--model", "gemma3-270m"], "gemma3-270m")]
    writers += [(f"pick, --chunk-tokens {c}",
                 ["--mode", "ensemble", "--strategy", "pick", "--chunk-tokens", str(c), *PAIR],
                 "mesh-ensemble") for c in args.chunks]
    judges = [("SmolLM2", ["--model", "smollm2-135m"], "smollm2-135m"),
              ("Gemma 3", ["--model", "gemma3-270m"], "gemma3-270m"),
              ("words mixture", ["--mode", "ensemble", "--strategy", "words", *PAIR],
               "mesh-ensemble")]
    texts = {}
    for name, cli, model in writers:
        proc, url = serve(cli)
        try:
            texts[name] = write(url, model, args.seeds, args.tokens)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    scores = {}
    for judge, cli, model in judges:
        proc, url = serve(cli)
        try:
            for name, written in texts.items():
                scores[name, judge] = bits_per_byte(url, model, written)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"{len(OPENINGS)} openings x {args.seeds} seeds, {args.tokens} tokens each, "
          f"temperature 0.8; bits per byte of the continuations, judged by:")
    print(f"  {'written by':<26}" + "".join(f"{j:>15}" for j, _, _ in judges) + "      bytes")
    for name, written in texts.items():
        print(f"  {name:<26}" + "".join(f"{scores[name, j]:15.4f}" for j, _, _ in judges)
              + f"{sum(len(t.encode()) for _, t in written):11d}")


if __name__ == "__main__":
    main()
