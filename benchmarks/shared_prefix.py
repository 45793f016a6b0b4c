"""One long system prompt, two users: the second asks while the first is still answering
(with ``--together``: right after the first asked, while its prompt is being computed).
Time to the second user's first token, and the prompt tokens the server reports it reused
(`usage.prompt_tokens_details.cached_tokens`), for `mesh serve` (local) and a 2-stage
pipeline (`--local-nodes 1`); with ``--checkout DIR`` the same servers from another checkout
run beside them (before/after in one run).

    python benchmarks/shared_prefix.py [--rounds 2] [--checkout DIR] [--together]
        [--modes local "pipeline, 2 stages" "ensemble merge"]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.concurrency import _port, chat_stream, checkouts, start  # noqa: E402

MODEL = "smollm2-135m"
# mode -> (server arguments, the model name its API serves)
MODES = {"local": ([], MODEL),
         "pipeline, 2 stages": (["--mode", "pipeline", "--local-nodes", "1"], MODEL),
         # SmolLM2 twice (one vocabulary), members in the server's process
         "ensemble merge": (["--mode", "ensemble", "--strategy", "merge",
                             "--member", MODEL, "--member", f"{MODEL}:0.5"], "mesh-ensemble")}


def system_prompt() -> str:
    text = (ROOT / "tests" / "data" / "wikitext2-slice.txt").read_text()[:6000]
    return f"You answer questions about this article.\n{text}"


def _stream(url: str, model: str, messages: list[dict], tokens: int, on_first=None) -> None:
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": tokens,
            "messages": messages}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if on_first is not None and line.startswith("data: {") and '"content"' in line:
                on_first.set()
                on_first = None


def second_user(url: str, system: str, tag: str, model: str = MODEL, together: bool = False
                ) -> tuple[float, float, int]:
    """(the second user's TTFT in ms, the same question's TTFT with a system prompt nobody
    shares, tokens reused); ``together``: the second asks as soon as the first has asked."""
    if together:  # a system prompt no earlier round left in a cache
        system = f"Shared {tag}. {system}"

    def ask(q, sys_text=system):
        return [{"role": "system", "content": sys_text}, {"role": "user", "content": q}]

    chat_stream(url, model, ask(f"Warm-up {tag}: what is it about?", f"{tag} {system}"), 4)
    alone = chat_stream(url, model, ask("Who is it about?", f"Alone {tag}. {system}"), 4)[0]
    answering = threading.Event()
    first = threading.Thread(target=_stream, args=(url, model, ask(f"{tag}: summarise it."), 96,
                                                   answering))
    first.start()
    if together:  # once the server runs the first request (it came first), not its answer
        deadline = time.monotonic() + 60
        while not httpx.get(url + "/health", timeout=10).json().get("running", 1):
            if time.monotonic() > deadline:
                raise RuntimeError("the first user's request never ran")
            time.sleep(0.005)
    elif not answering.wait(300):
        raise RuntimeError("the first user got no token")
    ttft, _, _, usage = chat_stream(url, model, ask(f"{tag}: who is it about?"), 8)
    first.join()
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return ttft * 1e3, alone * 1e3, cached


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--checkout", default=None, help="another checkout to run beside this one")
    ap.add_argument("--modes", nargs="*", default=["local", "pipeline, 2 stages"],
                    choices=list(MODES))
    ap.add_argument("--together", action="store_true",
                    help="the second user asks right after the first, not once it answers")
    args = ap.parse_args()
    trees = checkouts(args.checkout)
    system = system_prompt()
    rows = []
    for mode in args.modes:
        extra, served = MODES[mode]
        for name, root in trees:
            port = _port()
            url = f"http://127.0.0.1:{port}"
            proc = start(["env", "-C", str(root), sys.executable, "-m", "mesh", "--log-level",
                          "warning", "serve", "--model", MODEL, "--port", str(port),
                          "--context-length", "4096", *extra], url)
            try:
                for r in range(args.rounds):
                    rows.append((mode, name, *second_user(url, system, f"r{r}", served,
                                                          args.together)))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    when = "right after the first asked" if args.together else "once the first is answering"
    print(f"{MODEL}: a ~{len(system) // 4}-token system prompt; the second user asks {when} "
          f"(96 tokens)")
    for mode, name, ttft, alone, cached in rows:
        print(f"  {mode:<20} {name:<16} second user's first token {ttft:7.0f} ms "
              f"(a new system prompt alone: {alone:6.0f} ms), {cached} prompt tokens reused")


if __name__ == "__main__":
    main()
