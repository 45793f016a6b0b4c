"""Aggregate decode speed and time to first token at 1, 4, 8, 16 concurrent streams, through
the servers' own APIs, side by side: `mesh serve` (local), `mesh serve --mode pipeline
--local-nodes 1` (two stages: this process and one node), llama-server (`-np 8`) and
llama.cpp's own two stages (llama-server `--rpc` with half the layers on a ggml-rpc-server) on
the same GGUF and cores. Then a ~1,400-token prompt arriving while 8 streams run, against its
time alone.
``--checkout DIR`` runs the local and 2-stage servers of another checkout beside these
(before/after in one run). ``--ensemble STRATEGY`` adds `mesh serve --mode ensemble` with two
members in this process (merge: SmolLM2 twice, weights 1 and 0.5, since only SmolLM2 has its
vocabulary here; words and pick: SmolLM2 and Gemma 3): streams and the multi-turn chat;
``--ensemble-checkout DIR`` runs the same ensembles from another checkout beside them
(before/after in one run).

Unique chat prompts, greedy, 64 completion tokens each (counted from `usage`). With
``--pin``, the two-stage servers (mesh's and llama.cpp's RPC) put each stage on a core of its
own with one compute thread, as if each were on a machine of its own.

    python benchmarks/concurrency.py [--levels 1 4 8 16] [--tokens 64]
        [--skip local pipeline llama.cpp llama.cpp-rpc long turns] [--backend torch]
        [--dtype float32]
        [--checkout /path/to/an/older/checkout]
        [--pipeline-env 'MESH_MICRO_BATCHES=1' ...] [--ensemble merge words]
        [--ensemble-checkout /path/to/an/older/checkout] [--pin]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.backends import gguf_path, llama_cpp_bin  # noqa: E402

MODEL = "smollm2-135m"
TOPICS = ["rivers", "volcanoes", "bread", "chess", "the moon", "bicycles", "coffee", "whales",
          "glass", "trains", "bees", "castles", "clouds", "paper", "salt", "maps", "owls",
          "bridges", "tea", "deserts"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, timeout: float = 900, log=None,
          env: dict | None = None) -> subprocess.Popen:
    """Start a server and wait for its /health; ``log``: a file for its output."""
    out = log if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if log else out, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def pin(on: bool, core: int) -> list[str]:
    """A command prefix that runs a process (and what it starts) on ``core`` alone."""
    return ["taskset", "-c", str(core)] if on else []


def repin_children(pid: int, core: int) -> None:
    """Move every thread of ``pid``'s child processes to ``core``."""
    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(child.pid)],
                       stdout=subprocess.DEVNULL, check=True)


def _num_layers(model: str) -> int:
    from mesh.models.source import resolve

    return resolve(model, progress=False).num_layers


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def checkouts(other: str | None) -> list[tuple[str, Path]]:
    """(name, root) of this checkout and, when given, another one to run beside it."""
    trees = [("this checkout", ROOT)]
    if other:
        trees.append((Path(other).name, Path(other).resolve()))
    return trees


def chat_stream(url: str, model: str, messages: list[dict], tokens: int
                ) -> tuple[float, float, str, dict]:
    """One greedy streamed chat: (seconds to first token, seconds to last, text, usage)."""
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": tokens,
            "stream_options": {"include_usage": True}, "messages": messages}
    t0 = time.perf_counter()
    first, text, usage = None, "", {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                text += chunk["choices"][0]["delta"]["content"]
            usage = chunk.get("usage") or usage
    return (first or time.perf_counter()) - t0, time.perf_counter() - t0, text, usage


def one_stream(url: str, model: str, content: str, tokens: int) -> tuple[float, float, int]:
    """(seconds to first token, seconds to last, completion tokens)."""
    ttft, total, _, usage = chat_stream(url, model, [{"role": "user", "content": content}],
                                        tokens)
    return ttft, total, usage.get("completion_tokens", 0)


def level(url: str, model: str, n: int, tokens: int, offset: int) -> dict:
    results: list = [None] * n

    def run(i):
        topic = TOPICS[(offset + i) % len(TOPICS)]
        results[i] = one_stream(url, model, f"Write a long essay about {topic} (#{offset + i}).",
                                tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    total = sum(r[2] for r in results)
    # decode throughput: tokens after each stream's first, over the time the batch decoded
    decode_time = max(r[1] for r in results) - min(r[0] for r in results)
    return {"agg": (total - n) / decode_time if decode_time > 0 else 0.0, "wall": wall,
            "ttft_med": statistics.median(ttft) * 1e3,
            "ttft_p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] * 1e3, "tokens": total}


def long_prompt_ttft(url: str, model: str, tokens: int) -> tuple[float, float]:
    """TTFT of a ~1,400-token prompt alone, and while 8 streams are running. Each long
    prompt starts differently, so no server reuses an earlier one's cache (that is
    measured apart, in follow_up_ttft)."""
    text = (ROOT / "tests" / "data" / "wikitext2-slice.txt").read_text()[:8000]

    def ask(tag):
        return f"Request {tag}: summarise this:\n{text}"

    one_stream(url, model, ask("warm-up"), 4)  # the first long prompt sizes the buffers
    alone = one_stream(url, model, ask("alone"), 4)[0]
    bg = [threading.Thread(target=one_stream, args=(url, model, f"Essay on {t}.", tokens * 2))
          for t in TOPICS[:8]]
    for t in bg:
        t.start()
    time.sleep(1.0)  # a benchmark's staging, not a test: the streams are under way
    loaded = one_stream(url, model, ask("loaded"), 4)[0]
    for t in bg:
        t.join()
    return alone * 1e3, loaded * 1e3


def follow_up_ttft(url: str, model: str) -> tuple[float, float, int | None]:
    """Multi-turn chat: a ~1,400-token first turn, then a follow-up that repeats it with the
    answer (what a chat client sends). -> (first turn TTFT ms, follow-up TTFT ms, the
    follow-up's cached prompt tokens as the server reports them)."""
    text = (ROOT / "tests" / "data" / "wikitext2-slice.txt").read_text()
    msgs = [{"role": "user", "content": f"Read this:\n{text}\nWhat is it about?"}]
    cold, _, answer, _ = chat_stream(url, model, msgs, 16)
    warm, _, _, usage = chat_stream(url, model, msgs + [
        {"role": "assistant", "content": answer}, {"role": "user", "content": "Say more."}], 16)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return cold * 1e3, warm * 1e3, cached


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", type=int, nargs="*", default=[1, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip", nargs="*", default=[],
                    help="servers (local pipeline llama.cpp llama.cpp-rpc) or parts "
                         "(long turns) to leave out")
    ap.add_argument("--backend", default=None,
                    help="mesh's backend (onnxruntime, torch, mlx; default: the machine's)")
    ap.add_argument("--dtype", default=None, help="mesh's --dtype (default: auto)")
    ap.add_argument("--pipeline-env", action="append", default=[],
                    help="also run the 2-stage pipeline with these environment settings "
                         "(repeatable; e.g. 'MESH_MICRO_BATCHES=1')")
    ap.add_argument("--ensemble", nargs="*", default=[], choices=["merge", "words", "pick"])
    ap.add_argument("--ensemble-checkout", default=None)
    ap.add_argument("--checkout", default=None,
                    help="also run the local and 2-stage servers of this checkout")
    ap.add_argument("--pin", action="store_true",
                    help="two-stage servers: each stage on a core of its own with one "
                         "compute thread (the first stage on core 0, the other on core 1), "
                         "as if on machines of their own; the client is not pinned")
    args = ap.parse_args()
    if args.pin:
        os.environ["MESH_ORT_THREADS"] = "1"  # mesh's stages (the nodes inherit it)
    servers = []
    streams_only = set()
    for strategy in args.ensemble:
        members = ["smollm2-135m", "smollm2-135m:0.5"] if strategy == "merge" else \
            ["smollm2-135m", "gemma3-270m"]
        cmd = ["-m", "mesh", "--log-level", "warning", "serve", "--mode", "ensemble",
               "--strategy", strategy, *(x for m in members for x in ("--member", m))]
        servers.append((f"ensemble {strategy}", [sys.executable, *cmd], "mesh-ensemble"))
        streams_only.add(f"ensemble {strategy}")
        if args.ensemble_checkout:  # the same server from another checkout
            name = f"ensemble {strategy}, {Path(args.ensemble_checkout).name}"
            servers.append((name, ["env", "-C", args.ensemble_checkout, sys.executable, *cmd],
                            "mesh-ensemble"))
            streams_only.add(name)
    backend = (["--backend", args.backend] if args.backend else []) + \
        (["--dtype", args.dtype] if args.dtype else [])
    for tree, root in checkouts(args.checkout):
        here = [] if root == ROOT else ["env", "-C", str(root)]
        tag = "" if root == ROOT else f", {tree}"
        if "local" not in args.skip:
            servers.append((f"mesh serve (local){tag}", [
                *here, sys.executable, "-m", "mesh", "--log-level", "warning", "serve",
                *backend], MODEL))
        if "pipeline" not in args.skip:
            servers.append((f"mesh serve, 2 stages{tag}", [
                *here, *pin(args.pin, 0), sys.executable, "-m", "mesh", "--log-level",
                "warning", "serve", *backend, "--mode", "pipeline", "--local-nodes", "1",
                "--no-discovery"], MODEL))
    for env in args.pipeline_env:  # variants, e.g. MESH_MICRO_BATCHES=1 MESH_ORT_THREADS=1
        servers.append((f"2 stages, {env}", [
            "env", *env.split(), sys.executable, "-m", "mesh", "--log-level", "warning",
            "serve", "--mode", "pipeline", "--local-nodes", "1", "--no-discovery"], MODEL))
    bin_dir = llama_cpp_bin() if "llama.cpp" not in args.skip else None
    # a server's other process, started before it: (its command, the port it listens on)
    helpers: dict[str, tuple[list[str], int]] = {}
    if bin_dir is not None:
        # -c is shared by the slots: 4K each, room for the 2K-token prompt
        llama_base = [str(bin_dir / "llama-server"), "-m", gguf_path(MODEL), "-np", "8", "-c",
                      "32768"]
        llama = [*llama_base, "-t", str(os.cpu_count())]
        servers.append(("llama-server -np 8", llama, MODEL))
        rpc = bin_dir / "ggml-rpc-server"
        if "llama.cpp-rpc" not in args.skip and rpc.exists():
            # llama.cpp's own two stages: half the layers (and the output layer) on a
            # ggml-rpc-server, the rest in llama-server, on the same cores
            rpc_port = _port()
            name = "llama-server --rpc, 2 stages"
            threads = "1" if args.pin else str(os.cpu_count())
            helpers[name] = ([*pin(args.pin, 1), str(rpc), "-H", "127.0.0.1", "-p",
                              str(rpc_port), "-t", threads], rpc_port)
            layers = _num_layers(MODEL)
            servers.append((name, [*pin(args.pin, 0), *llama_base, "-t", threads, "--rpc",
                                   f"127.0.0.1:{rpc_port}", "-ngl",
                                   str(layers - layers // 2)], MODEL))
    table = {}
    for name, cmd, model in servers:
        port = _port()
        helper = None
        if name in helpers:
            cmd_h, port_h = helpers[name]
            helper = subprocess.Popen(cmd_h, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            _wait_port(port_h)
        try:
            proc = start(cmd + ["--port", str(port)], f"http://127.0.0.1:{port}")
        except BaseException:
            if helper is not None:
                helper.kill()
            raise
        if args.pin and name.startswith("mesh serve, 2 stages"):
            repin_children(proc.pid, 1)  # its node: the second stage, on core 1
        try:
            url = f"http://127.0.0.1:{port}"
            one_stream(url, model, "Hello", 8)  # warm up
            table[name] = {n: level(url, model, n, args.tokens, 100 * n) for n in args.levels}
            if name not in streams_only and "long" not in args.skip:
                table[name]["long"] = long_prompt_ttft(url, model, args.tokens)
            if "turns" not in args.skip:
                table[name]["turns"] = follow_up_ttft(url, model)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            if helper is not None:
                helper.terminate()
                helper.wait(timeout=30)
    print(f"\n{MODEL}, {args.tokens} greedy tokens per stream, unique chat prompts, "
          f"{os.cpu_count()} cores shared by client and server")
    print(f"{'server':<40} {'streams':>7} {'aggregate tok/s':>16} {'x its 1 stream':>14} "
          f"{'TTFT median ms':>15} {'TTFT p95 ms':>12}")
    for name, rows in table.items():
        base = rows[args.levels[0]]["agg"]
        for n in args.levels:
            r = rows[n]
            print(f"{name:<40} {n:>7} {r['agg']:>16.1f} {r['agg'] / base:>14.2f} "
                  f"{r['ttft_med']:>15.0f} {r['ttft_p95']:>12.0f}")
    print("\n~1,400-token prompt: time to first token alone / while 8 streams run")
    for name, rows in table.items():
        if "long" not in rows:
            continue
        alone, loaded = rows["long"]
        print(f"{name:<40} {alone:>8.0f} ms / {loaded:>8.0f} ms  ({loaded / alone:.2f}x)")
    print("\nMulti-turn chat: first turn (~1,400 tokens) / its follow-up, time to first token")
    for name, rows in table.items():
        if "turns" not in rows:
            continue
        cold, warm, cached = rows["turns"]
        print(f"{name:<40} {cold:>8.0f} ms / {warm:>8.0f} ms  (cached prompt tokens: {cached})")
    llama = table.get("llama-server -np 8")
    local = table.get("mesh serve (local)")
    if llama and local and 8 in args.levels:
        print(f"\nmesh local / llama-server aggregate at 8 streams: "
              f"{local[8]['agg'] / llama[8]['agg']:.2f}x")
    rpc, two = table.get("llama-server --rpc, 2 stages"), table.get("mesh serve, 2 stages")
    if rpc and two:
        print("mesh 2 stages / llama.cpp RPC 2 stages, aggregate: " + ", ".join(
            f"{n} streams {two[n]['agg'] / rpc[n]['agg']:.2f}x" for n in args.levels))


if __name__ == "__main__":
    main()
