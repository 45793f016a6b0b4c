"""Chaos: 16 concurrent streaming requests, one pipeline stage killed (kill -9) mid-way.

Reports how each request ended (rescued and completed / clean 503 error event / hung /
truncated), the time from the loss to the first resumed token, and the time until a new
request succeeds. Real node processes on loopback, the real HTTP server, httpx clients.

    python benchmarks/chaos.py [--requests 16] [--tokens 48] [--standby]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.pipeline.coordinator import build_pipeline_engine  # noqa: E402
from mesh.server.app import build_app  # noqa: E402
from tests.conftest import ServerThread  # noqa: E402

MODEL = "smollm2-135m"
PROMPTS = ["Explain why the sky is blue.", "Write a short poem about rain.",
           "What is a prime number?", "Give three tips for learning to cook.",
           "Describe a cat to someone who has never seen one.", "Why do we sleep?",
           "What is the capital of Italy and why is it famous?", "How do plants grow?"]


def stream(url: str, i: int, tokens: int, started: threading.Event, record: dict):
    body = {"model": MODEL, "stream": True, "temperature": 0, "max_tokens": tokens,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
    times, outcome = [], "truncated"
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                          timeout=httpx.Timeout(10.0, read=120.0)) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    outcome = "503" if "capacity" in event["error"].get("code", "") or \
                        "unavailable" in event["error"].get("code", "") else "error"
                    continue
                choice = event["choices"][0] if event.get("choices") else {}
                if choice.get("delta", {}).get("content"):
                    times.append(time.monotonic())
                    started.set()
                if choice.get("finish_reason"):
                    outcome = "completed"
    except httpx.ReadTimeout:
        outcome = "hung"
    record[i] = (outcome, times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--standby", action="store_true", help="add a hot standby node")
    args = ap.parse_args()

    engine = build_pipeline_engine(MODEL, local_nodes=3 if args.standby else 2,
                                   standby_nodes=1 if args.standby else 0, secret="chaos",
                                   context_length=2048)
    victim = engine.node_processes["local-1"]
    print(f"pipeline: {', '.join(f'{s.name} {s.layers}' for s in engine.stages)}"
          f"{' + hot standby' if args.standby else ''}")
    with ServerThread(build_app(engine)) as srv:
        record: dict[int, tuple] = {}
        started = [threading.Event() for _ in range(args.requests)]
        with ThreadPoolExecutor(args.requests + 1) as pool:
            futures = [pool.submit(stream, srv.base_url, i, args.tokens, started[i], record)
                       for i in range(args.requests)]
            for e in started:
                e.wait(timeout=300)
            time.sleep(1.0)  # mid-way: every request is streaming
            os.kill(victim.pid, signal.SIGKILL)
            killed = time.monotonic()
            # a new request, retried until it succeeds
            new_ok = None
            while time.monotonic() - killed < 120:
                try:
                    r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=120, json={
                        "model": MODEL, "max_tokens": 4, "temperature": 0,
                        "messages": [{"role": "user", "content": "Hi"}]})
                    if r.status_code == 200:
                        new_ok = time.monotonic() - killed
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
            for f in futures:
                f.result()
        meta = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["meta"]
    asyncio.run(engine.close())

    outcomes = [record[i][0] for i in range(args.requests)]
    resumed = []
    for outcome, times in record.values():
        after = [t for t in times if t > killed]
        if after and any(t < killed for t in times):
            resumed.append(after[0] - killed)
    n = args.requests
    count = {k: outcomes.count(k) for k in ("completed", "503", "hung", "truncated", "error")}
    print(f"{n} streams, stage local-1 killed with SIGKILL mid-way")
    print(f"  rescued and completed: {count['completed']} ({count['completed'] / n:.0%})")
    print(f"  clean 503 error event: {count['503']}")
    print(f"  hung: {count['hung']}   truncated: {count['truncated']}   "
          f"other errors: {count['error']}")
    if resumed:
        print(f"  loss -> first resumed token: median {statistics.median(resumed):.2f} s, "
              f"max {max(resumed):.2f} s")
    print(f"  loss -> a new request succeeds: "
          f"{'never (within 120 s)' if new_ok is None else f'{new_ok:.2f} s'}")
    print(f"  pipeline after: {', '.join(s['node'] + ' ' + s['layers'] for s in meta['stages'])}")
    for e in meta["events"]:
        print(f"  event: {e}")


if __name__ == "__main__":
    main()
