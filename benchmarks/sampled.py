"""Greedy vs sampled decode through the API: `mesh serve` on each shipped model, one chat
answer at temperature 0 and one at 0.8 (OpenAI's default is 1: most clients sample), tokens/s
of the whole request. With ``--checkout DIR`` the same servers run from another checkout
too, interleaved round by round (before/after in one run).

    python benchmarks/sampled.py [--tokens 64] [--rounds 2] [--checkout DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.concurrency import checkouts  # noqa: E402
from benchmarks.ensemble_served import decode_speed, serve  # noqa: E402

MODELS = ("smollm2-135m", "gemma3-270m")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--checkout", default=None, help="another checkout to run beside this one")
    args = ap.parse_args()
    trees = checkouts(args.checkout)
    runs: dict = {}
    here = os.getcwd()
    for _ in range(args.rounds):
        for name, root in trees:
            os.environ["PYTHONPATH"] = str(root)  # `python -m mesh` imports that tree's code
            os.chdir(root)
            try:
                for model in MODELS:
                    proc, url = serve(["--model", model])
                    try:
                        for temp in (0.0, 0.8):
                            runs.setdefault((model, name, temp), []).append(
                                decode_speed(url, model, args.tokens, temp)[0])
                    finally:
                        proc.terminate()
                        proc.wait(timeout=60)
            finally:
                os.chdir(here)
    print(f"decode through the API, {args.tokens} tokens, {os.cpu_count()} cores shared with "
          f"the client; tok/s per round")
    for model in MODELS:
        for name, _ in trees:
            g, s = runs[(model, name, 0.0)], runs[(model, name, 0.8)]
            print(f"  {model:<14} {name:<16} greedy {' '.join(f'{x:5.1f}' for x in g)}   "
                  f"sampled (0.8) {' '.join(f'{x:5.1f}' for x in s)}   "
                  f"sampled / greedy {max(s) / max(g):.2f}")


if __name__ == "__main__":
    main()
