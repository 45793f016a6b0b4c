"""Where an ONNX Runtime decode step spends its time: ORT's own profiler, per operator type.

SmolLM2-135M, a ~290-token context, 32 decode steps; shares of kernel time by op type.
With ``--batch N``, N requests' decode steps run as one batch (as the scheduler runs them).

    python benchmarks/ort_profile.py [--precision auto|int8|int4|float32] [--batch 8]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.backends import StepItem, load_shard  # noqa: E402
from mesh.layers import LayerRange  # noqa: E402
from mesh.models.source import resolve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    src = resolve("smollm2-135m", progress=False)
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    shard = load_shard("onnxruntime", src, LayerRange.full(src.num_layers), args.precision,
                       session_options=opts)
    caches = [shard.new_cache() for _ in range(args.batch)]
    ids = np.array(src.tokenizer.encode("The quick brown fox jumps. " * 50)[:290], np.int32)
    for i, cache in enumerate(caches):
        shard.forward([StepItem(f"p{i}", ids, cache)])
    t = time.perf_counter()
    for _ in range(args.steps):
        shard.forward([StepItem(f"p{i}", np.array([5], np.int32), cache)
                       for i, cache in enumerate(caches)])
    per_token = (time.perf_counter() - t) / args.steps * 1e3
    events = json.load(open(shard.session.end_profiling()))
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    decode_start = runs[args.batch]["ts"]  # skip the prompts
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and \
                e["ts"] >= decode_start:
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    print(f"onnxruntime {args.precision}: {per_token:.1f} ms per step of {args.batch} "
          f"token(s) over {args.steps} decode steps at a {len(ids)}-token context "
          f"(profiling on)")
    for op, d in by_op.most_common(10):
        print(f"  {op:<24} {100 * d / total:5.1f}%")


if __name__ == "__main__":
    main()
