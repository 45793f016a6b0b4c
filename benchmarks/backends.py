"""Every backend and precision side by side on SmolLM2-135M, with llama.cpp when installed.

Same chat prompt, 128 greedy tokens, interleaved rounds (best of each). MLX (with OpenBLAS
preloaded) and llama.cpp (which crashes beside torch and onnxruntime) run in their own
processes, one after the other. llama-cpp-python is
not a mesh dependency: install it in the benchmark's own environment
(`pip install llama-cpp-python`, it compiles for ~6.5 minutes) to get its column.

    python benchmarks/backends.py [--rounds 2] [--tokens 128] [--only torch:float32 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.backends import load_shard  # noqa: E402
from mesh.engine.base import GenerationRequest  # noqa: E402
from mesh.engine.local import LocalEngine  # noqa: E402
from mesh.engine.sampling import SamplingParams  # noqa: E402
from mesh.layers import LayerRange  # noqa: E402
from mesh.models.source import resolve  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
CONFIGS = ["torch:float32", "mlx:float32", "mlx:gguf", "onnxruntime:float32",
           "onnxruntime:int8", "onnxruntime:int4"]


def prompt(source) -> list[int]:
    text = (ROOT / "tests" / "data" / "wikitext2-slice.txt").read_text()[:1000]
    return source.tokenizer.chat_prompt([{"role": "user", "content": f"Summarise:\n{text}"}])


def run_engine(engine, ids, n):
    async def go():
        req = GenerationRequest("b", ids, n, SamplingParams(temperature=0.0))
        t0, first, count = time.perf_counter(), None, 0
        gen = engine.generate(req)
        async for _ in gen:
            count += 1
            first = first or time.perf_counter()
        await gen.aclose()
        return len(ids) / (first - t0), (count - 1) / (time.perf_counter() - first)

    return asyncio.run(go())


def llama_cpp_runner(path: str):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=2048, n_threads=os.cpu_count(), verbose=False)

    def run(ids, n):
        llm.reset()
        t0 = time.perf_counter()
        first, count = None, 0
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            count += 1
            first = first or time.perf_counter()
            if count >= n:
                break
        return len(ids) / (first - t0), (count - 1) / (time.perf_counter() - first)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    configs = args.only or CONFIGS
    preloaded = OPENBLAS in os.environ.get("LD_PRELOAD", "")
    if args.only is None:
        # llama.cpp crashes when loaded beside torch and onnxruntime: its own process
        import subprocess

        r = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--tokens",
                            str(args.tokens), "--only", "llama.cpp"], check=False)
        if r.returncode:
            print(f"llama.cpp run failed (exit {r.returncode}); FACTS.md's figures for this "
                  "machine: 270-310 prompt, 109 decode tok/s")
        print()
    mlx_cfgs = [c for c in configs if c.startswith("mlx")]
    if args.only == ["llama.cpp"]:
        mlx_cfgs = []
    if args.only is None and mlx_cfgs and os.path.exists(OPENBLAS) and not preloaded:
        # MLX wants OpenBLAS preloaded; torch is slower with it (it displaces MKL's BLAS), so
        # MLX runs in its own process with the preload and everything else here without it
        import subprocess

        subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--tokens",
                        str(args.tokens), "--only", *mlx_cfgs],
                       env=dict(os.environ, LD_PRELOAD=OPENBLAS), check=False)
        print()
        configs = [c for c in configs if not c.startswith("mlx")]
    source = resolve("smollm2-135m", progress=False)
    ids = prompt(source)
    runners = {}
    for cfg in configs:
        if cfg == "llama.cpp":
            continue
        backend, dtype = cfg.split(":")
        try:
            shard = load_shard(backend, source, LayerRange.full(source.num_layers), dtype)
        except Exception as exc:  # a backend missing here: say so, keep going
            print(f"{cfg}: unavailable ({exc})")
            continue
        engine = LocalEngine("smollm2-135m", [shard], source.tokenizer, 8192)
        runners[f"mesh {cfg}"] = lambda i, n, e=engine: run_engine(e, i, n)
    from mesh.models.registry import catalog, cached_path

    cpp = (llama_cpp_runner(str(cached_path(catalog()["smollm2-135m"])))
           if "llama.cpp" in configs else None)
    if cpp:
        runners["llama.cpp Q4_1 (llama-cpp-python)"] = cpp
    for run in runners.values():
        run(ids, 4)
    results = {k: [] for k in runners}
    for _ in range(args.rounds):
        for k, run in runners.items():
            results[k].append(run(ids, args.tokens))
    print(f"SmolLM2-135M, {len(ids)}-token chat prompt, {args.tokens} greedy tokens, "
          f"{os.cpu_count()} threads, best of {args.rounds} interleaved rounds"
          f"{' (OpenBLAS preloaded)' if OPENBLAS in os.environ.get('LD_PRELOAD', '') else ''}")
    print(f"{'path':<36} {'prompt tok/s':>12} {'decode tok/s':>12}")
    for k, r in results.items():
        print(f"{k:<36} {max(x[0] for x in r):>12.1f} {max(x[1] for x in r):>12.1f}")
    if not cpp and "llama.cpp" in configs:
        print("llama.cpp: not installed here (pip install llama-cpp-python; ~6.5 min compile)")


if __name__ == "__main__":
    main()
