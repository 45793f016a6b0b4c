"""Several choices of one prompt (`n` > 1) through the API: the prompt computed once vs once
per choice. After two warm-up requests with `n` choices (which grow the KV buffers beside the
caches kept for prefix reuse), a ~1,500-token prompt, `n` = 1 and 4, 32 sampled tokens per
choice, `mesh serve` (local) from this checkout and, with ``--checkout DIR``, from another one
beside it.

    python benchmarks/choices.py [--n 4] [--checkout /path/to/an/older/checkout] [--pipeline]

``--pipeline`` serves two stages instead (`--mode pipeline --local-nodes 1`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.concurrency import MODEL, _port, start  # noqa: E402


def ask(url: str, n: int, tag: str) -> tuple[float, dict]:
    text = (ROOT / "tests" / "data" / "wikitext2-slice.txt").read_text()[:8000]
    body = {"model": MODEL, "n": n, "max_tokens": 32, "temperature": 0.8, "seed": 1,
            "messages": [{"role": "user", "content": f"({tag}) Summarise this:\n{text}"}]}
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["usage"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--checkout", default=None)
    ap.add_argument("--pipeline", action="store_true")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "mesh", "--log-level", "warning", "serve"]
    if args.pipeline:
        cmd += ["--mode", "pipeline", "--local-nodes", "1", "--no-discovery"]
    servers = [("this checkout", cmd)]
    if args.checkout:
        servers.append((Path(args.checkout).name, ["env", "-C", args.checkout, *cmd]))
    rows = []
    for name, c in servers:
        port = _port()
        url = f"http://127.0.0.1:{port}"
        proc = start(c + ["--port", str(port)], url)
        try:
            for i in range(2):  # grows the KV buffers to n requests beside the kept caches
                ask(url, args.n, f"warm-up {i}")
            one, usage = ask(url, 1, "one")
            many, usage_n = ask(url, args.n, "many")
            rows.append((name, usage["prompt_tokens"], one, many))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\n{MODEL}, 32 sampled tokens per choice, seconds for the whole response")
    print(f"{'server':<20} {'prompt tokens':>13} {'n=1 s':>8} {f'n={args.n} s':>8} "
          f"{'ratio':>6}")
    for name, p, one, many in rows:
        print(f"{name:<20} {p:>13} {one:>8.2f} {many:>8.2f} {many / one:>6.2f}")


if __name__ == "__main__":
    main()
