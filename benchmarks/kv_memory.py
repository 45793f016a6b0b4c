"""KV cache memory as served: a burst of long chats through `mesh serve`'s API, the server's
resident memory before, at its peak and after, and how many requests ran at once.

Each server starts fresh; ``--kv-memory`` values run as separate servers (``default`` is the
server's own default, ``auto``); ``--checkout DIR`` runs another checkout's server beside
this one (before/after in one run: its flags must exist there, so only ``default``).
``--mode pipeline`` serves two stages, the coordinator's and one ``--local-nodes`` node (the
budget is each one's); memory is then the two processes' together, KV the stages' sum.

    python benchmarks/kv_memory.py [--model smollm2-135m] [--streams 8] [--mode pipeline]
        [--kv-memory default 256MiB] [--checkout /path/to/an/older/checkout]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.concurrency import _port, checkouts, start  # noqa: E402


def _rss(pid: int) -> int:
    """The server's resident memory, its node processes' included."""
    import psutil

    total = 0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _meta(url: str) -> dict:
    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0].get("meta", {})


def _memory(meta: dict, key: str) -> int:
    """``key`` of the server's memory (local) or summed over its stages (pipeline)."""
    if "stages" in meta and isinstance(meta["stages"][0], dict):
        return sum(s.get(key) or 0 for s in meta["stages"])
    return meta.get("memory", {}).get(key) or 0


def burst(url: str, model: str, pid: int, streams: int, tokens: int) -> dict:
    """``streams`` chats with ~1,400-token prompts at once, no two alike."""
    text = (ROOT / "tests" / "data" / "wikitext2-slice.txt").read_text()[:7000]
    peak = {"rss": _rss(pid), "running": 0, "kv": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak["rss"] = max(peak["rss"], _rss(pid))
            try:
                meta = _meta(url)
                peak["running"] = max(peak["running"], meta.get("running", 0))
                peak["kv"] = max(peak["kv"], _memory(meta, "kv_bytes"))
            except httpx.HTTPError:
                pass
            time.sleep(0.05)

    def ask(i: int):
        msgs = [{"role": "user", "content": f"Reader {i}: summarise this.\n{text}"}]
        r = httpx.post(url + "/v1/chat/completions", timeout=900, json={
            "model": model, "messages": msgs, "max_tokens": tokens, "temperature": 0})
        codes.append(r.status_code)

    codes: list[int] = []
    w = threading.Thread(target=watch)
    w.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    w.join()
    return {**peak, "wall": wall, "codes": codes}


def run_one(name: str, root: Path, model: str, kv: str, streams: int, tokens: int,
            mode: str = "local") -> None:
    port = _port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mesh", "serve", "--model", model, "--port", str(port)]
    if mode == "pipeline":
        cmd += ["--mode", "pipeline", "--local-nodes", "1", "--no-discovery"]
    if kv != "default":
        cmd += ["--kv-memory", kv]
    env_root = os.getcwd()
    os.chdir(root)  # `python -m mesh` imports the checkout it runs in
    try:
        proc = start(cmd, url)
    finally:
        os.chdir(env_root)
    try:
        idle = _rss(proc.pid)
        got = burst(url, model, proc.pid, streams, tokens)
        deadline = time.monotonic() + 60
        while _meta(url).get("running") and time.monotonic() < deadline:
            time.sleep(0.1)
        # a benchmark's settling time, not a test (a node cuts its pool once quiet 2 s)
        time.sleep(6.0 if mode == "pipeline" else 1.0)
        meta = _meta(url)
        after = _rss(proc.pid)
        budget = _memory(meta, "kv_budget_bytes")
        print(f"{name:<28} {kv:>9} {idle / 2**20:>9.0f} {got['rss'] / 2**20:>9.0f} "
              f"{after / 2**20:>9.0f} {got['kv'] / 2**20:>10.0f} "
              f"{_memory(meta, 'kv_bytes') / 2**20:>9.0f} "
              f"{budget / 2**20:>9.0f} {got['running']:>7} {got['wall']:>7.1f} "
              f"{','.join(str(c) for c in sorted(set(got['codes'])))}", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--kv-memory", nargs="*", default=["default", "256MiB"])
    ap.add_argument("--checkout", default=None)
    ap.add_argument("--mode", choices=["local", "pipeline"], default="local")
    args = ap.parse_args()
    print(f"{args.model} ({args.mode}): {args.streams} chats at once, ~1,400-token prompts, "
          f"{args.tokens} tokens each; MiB")
    print(f"{'server':<28} {'kv-memory':>9} {'idle RSS':>9} {'peak RSS':>9} {'RSS after':>9} "
          f"{'peak KV':>10} {'KV after':>9} {'budget':>9} {'at once':>7} {'wall s':>7} HTTP")
    for name, root in checkouts(args.checkout):
        for kv in (args.kv_memory if name == "this checkout" else ["default"]):
            run_one(name, root, args.model, kv, args.streams, args.tokens, args.mode)


if __name__ == "__main__":
    main()
