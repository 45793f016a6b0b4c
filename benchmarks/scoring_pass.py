"""What a scoring pass costs against a decode step, on one core: the bound it sets on pick.

A pick round has each member write its chunk (a forward a token) and then score the other
members' candidates (a pass over each, log-probs at every position). With every member on a
core of its own, the slowest member's round is its chunk's decode plus that pass, so where
the candidates differ (sampled, nearly always) pick cannot pass
``chunk x decode / (chunk x decode + pass)`` of that member's speed alone, whatever the
rest of the code does. On a CPU a decode step is mostly reading the weights and a pass adds
compute, a few milliseconds a row; on a GPU a pass over a few tokens costs about one decode
step.

Each model's shard runs in this process with ONNX Runtime on one thread (pin the process
with ``taskset`` to time one core), at a context of ``--context`` tokens:

    taskset -c 1 python benchmarks/scoring_pass.py [--models smollm2-135m gemma3-270m]
        [--chunk 8] [--context 120] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MESH_ORT_THREADS", "1")

import numpy as np  # noqa: E402

from mesh.backends.base import StepItem, load_shard  # noqa: E402
from mesh.layers import LayerRange  # noqa: E402
from mesh.models.source import resolve  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def measure(model: str, chunk: int, context: int, repeats: int) -> dict[str, float]:
    source = resolve(model)
    shard = load_shard("onnxruntime", source, LayerRange.full(source.num_layers))
    rng = np.random.default_rng(0)
    cache = shard.new_cache()
    shard.forward([StepItem("ctx", rng.integers(0, 1000, context).astype(np.int32), cache)])

    def on_a_copy(tokens: np.ndarray, all_logits: bool):
        def run():
            copy = cache.fork()
            shard.forward([StepItem("copy", tokens, copy, all_logits=all_logits)])
            copy.release()
        return run

    one = np.array([5], dtype=np.int32)
    many = rng.integers(0, 1000, chunk).astype(np.int32)
    return {"decode": timed(on_a_copy(one, False), repeats),
            "pass": timed(on_a_copy(many, True), repeats),
            "last": timed(on_a_copy(many, False), repeats)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--chunk", type=int, default=8, help="tokens a candidate holds")
    ap.add_argument("--context", type=int, default=120, help="tokens already in the cache")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    print(f"ONNX Runtime, {os.environ['MESH_ORT_THREADS']} thread(s); a cache of "
          f"{args.context} tokens; a candidate of {args.chunk} tokens; medians of "
          f"{args.repeats}")
    for model in args.models:
        t = measure(model, args.chunk, args.context, args.repeats)
        chunk = args.chunk * t["decode"]
        print(f"  {model:14s} decode step {t['decode']:5.1f} ms   scoring pass "
              f"{t['pass']:5.1f} ms ({t['pass'] / t['decode']:.1f} decode steps; "
              f"{t['last']:.1f} ms with the last position's logits only)   "
              f"a sampled pick round at most {chunk / (chunk + t['pass']):.2f}x this "
              f"member alone")


if __name__ == "__main__":
    main()
