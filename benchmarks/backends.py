"""Every backend side by side with llama.cpp on the same GGUF, same threads: speed and memory.

For each shipped model: llama.cpp's `llama-bench` (prompt 290; decode 128 after a 290-token
context, `-d 290`, as mesh decodes after its prompt; `-t` threads) and
each mesh backend driven directly (a 290-token prompt, then 128 greedy tokens), each in its
own fresh process so its resident memory after load is its own, in interleaved rounds (best
of each). Then resident memory of the servers a user runs: `mesh serve --model M` and
`llama-server -m FILE` once each have answered /health.

llama.cpp comes from ../shared/tools/build-llama-cpp.sh (or LLAMA_CPP_BIN=folder): it builds
llama-bench and llama-server once (7-10 minutes) and prints their folder.

    python benchmarks/backends.py [--models smollm2-135m gemma3-270m] [--rounds 2]
        [--configs onnxruntime:auto mlx:auto torch:float32 ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
CONFIGS = ["onnxruntime:auto", "mlx:auto", "onnxruntime:float32", "torch:float32"]
PROMPT, DECODE = 290, 128


def llama_cpp_bin() -> Path | None:
    if os.environ.get("LLAMA_CPP_BIN"):
        return Path(os.environ["LLAMA_CPP_BIN"])
    script = ROOT.parent / "shared" / "tools" / "build-llama-cpp.sh"
    if not script.exists():
        return None
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    return Path(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None


def gguf_path(model: str) -> str:
    from mesh.models.source import resolve

    return str(resolve(model, progress=False).reader.path)


def child(model: str, cfg: str) -> None:
    """One mesh backend in this fresh process: RSS after load, prompt and decode speed."""
    import numpy as np
    import psutil

    from mesh.backends import StepItem, load_shard
    from mesh.layers import LayerRange
    from mesh.models.source import resolve

    backend, dtype = cfg.split(":")
    source = resolve(model, progress=False)
    text = (ROOT / "tests" / "data" / "wikitext2-slice.txt").read_text()
    ids = np.array(source.tokenizer.encode(text)[:PROMPT], dtype=np.int32)
    shard = load_shard(backend, source, LayerRange.full(source.num_layers), dtype)
    rss = psutil.Process().memory_info().rss
    best_p = best_d = 0.0
    for _ in range(2):
        cache = shard.new_cache()
        t0 = time.perf_counter()
        logits = shard.forward([StepItem("b", ids, cache)])[0]
        best_p = max(best_p, len(ids) / (time.perf_counter() - t0))
        tok = int(logits.argmax())
        t0 = time.perf_counter()
        for _ in range(DECODE):
            logits = shard.forward([StepItem("b", np.array([tok], np.int32), cache)])[0]
            tok = int(logits.argmax())
        best_d = max(best_d, DECODE / (time.perf_counter() - t0))
    print(json.dumps({"rss_mb": rss / 1e6, "prompt": best_p, "decode": best_d}))


def run_child(model: str, cfg: str, threads: int) -> dict | None:
    env = dict(os.environ, MESH_ORT_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    if cfg.startswith("mlx") and os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    r = subprocess.run([sys.executable, __file__, "--child", model, cfg], capture_output=True,
                       text=True, env=env)
    if r.returncode:
        print(f"  {cfg}: failed: {r.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def llama_bench(bin_dir: Path, path: str, threads: int) -> dict | None:
    """llama-bench's prompt speed from an empty context and its decode speed after a
    PROMPT-token one (``-d``): each as mesh's figure is measured (before 2026-12-03 the
    decode figure came from an empty context, ~1.35x faster than after 290 tokens on
    SmolLM2, which understated mesh's ratio)."""
    out = {}
    for key, args in (("prompt", ["-p", str(PROMPT), "-n", "0"]),
                      ("decode", ["-p", "0", "-n", str(DECODE), "-d", str(PROMPT)])):
        r = subprocess.run([str(bin_dir / "llama-bench"), "-m", path, *args, "-t",
                            str(threads), "-o", "json", "-r", "1"], capture_output=True,
                           text=True)
        if r.returncode:
            return None
        out[key] = json.loads(r.stdout)[0]["avg_ts"]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_rss(cmd: list[str], port: int, health: str, timeout: float = 600) -> float | None:
    """Start a server, wait for its health URL, return its resident MB (with children)."""
    import httpx
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None
            try:
                if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            return None
        p = psutil.Process(proc.pid)
        return (p.memory_info().rss + sum(c.memory_info().rss
                                          for c in p.children(recursive=True))) / 1e6
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--configs", nargs="*", default=CONFIGS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-serve", action="store_true", help="skip the server memory part")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    bin_dir = llama_cpp_bin()
    if bin_dir is None:
        print("llama.cpp: not built (../shared/tools/build-llama-cpp.sh failed or missing); "
              "its column is left empty")
    for model in args.models:
        path = gguf_path(model)
        size = os.path.getsize(path) / 1e6
        rows: dict[str, list[dict]] = {}
        for _ in range(args.rounds):  # interleaved: the machine's noise hits all alike
            if bin_dir is not None:
                rows.setdefault("llama.cpp (llama-bench)", []).append(
                    llama_bench(bin_dir, path, args.threads) or {})
            for cfg in args.configs:
                rows.setdefault(f"mesh {cfg}", []).append(run_child(model, cfg, args.threads)
                                                          or {})
        print(f"\n{model} ({Path(path).name}, {size:.0f} MB): {PROMPT}-token prompt, "
              f"{DECODE} greedy tokens, {args.threads} threads, best of {args.rounds} "
              f"interleaved rounds")
        ref = max((r.get("decode", 0) for r in rows.get("llama.cpp (llama-bench)", [])),
                  default=0)
        ref_p = max((r.get("prompt", 0) for r in rows.get("llama.cpp (llama-bench)", [])),
                    default=0)
        print(f"{'path':<30} {'prompt tok/s':>12} {'decode tok/s':>12} {'x llama.cpp':>16} "
              f"{'RSS after load':>15}")
        for name, rs in rows.items():
            p = max((r.get("prompt", 0) for r in rs), default=0)
            d = max((r.get("decode", 0) for r in rs), default=0)
            rss = min((r["rss_mb"] for r in rs if "rss_mb" in r), default=None)
            ratio = f"{p / ref_p:.2f} / {d / ref:.2f}" if ref and d and ref_p else "-"
            print(f"{name:<30} {p:>12.1f} {d:>12.1f} {ratio:>16} "
                  f"{f'{rss:.0f} MB' if rss else '-':>15}")
        if args.no_serve:
            continue
        port = _free_port()
        mesh_rss = server_rss([sys.executable, "-m", "mesh", "--log-level", "warning", "serve",
                               "--model", model, "--port", str(port)], port, "/health")
        line = f"served, RSS after /health answers: mesh serve {mesh_rss or 0:.0f} MB"
        if bin_dir is not None:
            port = _free_port()
            ctx = ["-np", "8", "-c", "8192"] if model.startswith("smollm2") else ["-c", "4096"]
            cpp_rss = server_rss([str(bin_dir / "llama-server"), "-m", path, "--port",
                                  str(port), "-t", str(args.threads), *ctx], port, "/health")
            line += f", llama-server ({' '.join(ctx)}) {cpp_rss or 0:.0f} MB"
            if mesh_rss and cpp_rss:
                line += f" (mesh / llama-server {mesh_rss / cpp_rss:.2f}x)"
        print(line)


if __name__ == "__main__":
    main()
