"""What a JSON schema costs: decode tokens/s with `response_format: json_schema` against the
same request without it, side by side through a running `mesh serve` (1 stream, then 8 at
once), alternating the two so the machine's noise falls on both.

Decode speed is (completion tokens - 1) / (time of the last token - time of the first), read
from the stream, so the prompt's prefill and the grammar's one-off compile are not in it (the
first constrained request of a server also builds llguidance's view of the vocabulary: printed
separately).

    python benchmarks/structured.py [--model smollm2-135m] [--rounds 3] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.concurrency import _port, start  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "facts": {"type": "array", "minItems": 12, "maxItems": 12,
              "items": {"type": "string", "minLength": 30, "maxLength": 60}}},
    "required": ["facts"], "additionalProperties": False}
PROMPT = "Write twelve facts about rivers, as a JSON object with a list of facts."


def one(url: str, model: str, tokens: int, constrained: bool) -> tuple[float, int]:
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": tokens,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": PROMPT}]}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "facts", "schema": SCHEMA}}
    times, n = [], 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
            for c in event.get("choices") or ():
                if c["delta"].get("content"):
                    times.append(time.perf_counter())
    return (n - 1) / (times[-1] - times[0]), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    port = _port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "mesh", "--log-level", "warning", "serve",
                  "--model", args.model, "--port", str(port)], url)
    try:
        t0 = time.perf_counter()
        one(url, args.model, 8, True)  # builds the vocabulary view once
        print(f"{args.model}: first constrained request (vocabulary view + compile) "
              f"{time.perf_counter() - t0:.1f} s")
        one(url, args.model, 8, False)
        for streams in args.streams:
            speeds = {False: [], True: []}
            for _ in range(args.rounds):
                for constrained in (False, True):
                    with ThreadPoolExecutor(streams) as pool:
                        got = list(pool.map(lambda _: one(url, args.model, args.tokens,
                                                          constrained), range(streams)))
                    speeds[constrained].append(sum(s for s, _ in got))
            free, json_ = statistics.median(speeds[False]), statistics.median(speeds[True])
            print(f"{streams} stream(s), {args.tokens} tokens: plain {free:.1f} tok/s, "
                  f"json_schema {json_:.1f} tok/s, ratio {json_ / free:.3f} "
                  f"(cost {100 * (1 - json_ / free):.1f}%)")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
