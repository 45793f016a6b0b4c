"""Prompt and decode tokens/s: mesh's LocalEngine vs each backend driven directly.

Same weights (fp32, dequantized from the shipped SmolLM2 GGUF), same ~270-token chat prompt,
128 greedy tokens, runs interleaved (mesh, direct, mesh, direct, ...) so machine noise hits
both alike; the best round of each is reported, with the ratio mesh / direct.

    python benchmarks/decode.py [--backends torch mlx] [--rounds 3] [--tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.backends import load_shard  # noqa: E402
from mesh.engine.base import GenerationRequest  # noqa: E402
from mesh.engine.local import LocalEngine  # noqa: E402
from mesh.engine.sampling import SamplingParams  # noqa: E402
from mesh.layers import LayerRange  # noqa: E402
from mesh.models.source import resolve  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def chat_prompt(source) -> list[int]:
    text = (ROOT / "tests" / "data" / "wikitext2-slice.txt").read_text()[:1100]
    return source.tokenizer.chat_prompt(
        [{"role": "user", "content": f"Summarise this article:\n{text}"}])


def run_mesh(engine: LocalEngine, ids: list[int], n: int) -> tuple[float, float]:
    async def go():
        req = GenerationRequest("bench", ids, n, SamplingParams(temperature=0.0))
        t0 = time.perf_counter()
        first = None
        count = 0
        async for _ in engine.generate(req):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        return len(ids) / (first - t0), (count - 1) / (end - first)

    return asyncio.run(go())


def torch_direct(source):
    """A bare transformers loop on the whole model with the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from mesh.backends.torch import hf_config

    model = AutoModelForCausalLM.from_config(hf_config(source.config), dtype=torch.float32)
    state = {n: torch.from_numpy(source.reader.read(n)) for n in source.reader.names()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.eval()

    @torch.inference_mode()
    def run(ids, n):
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits
        tok = int(logits[0, -1].argmax())
        t1 = time.perf_counter()
        for _ in range(n - 1):
            logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits
            tok = int(logits[0, -1].argmax())
        t2 = time.perf_counter()
        return len(ids) / (t1 - t0), (n - 1) / (t2 - t1)

    return run


def mlx_direct(source):
    """mlx-lm's own stream_generate on an mlx-lm model holding the same weights."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(source.config)
    model = model_cls(args_cls.from_dict(source.config))
    weights = [(n, mx.array(source.reader.read(n))) for n in source.reader.names()]
    model.load_weights(weights, strict=False)
    mx.eval(model.parameters())
    tokenizer = source.tokenizer.hf

    def run(ids, n):
        resp = None
        for resp in stream_generate(model, tokenizer, mx.array(ids), max_tokens=n,
                                    sampler=lambda lp: mx.argmax(lp, axis=-1)):
            pass
        return resp.prompt_tps, resp.generation_tps

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["torch", "mlx"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    if ("mlx" in args.backends and os.path.exists(OPENBLAS)
            and OPENBLAS not in os.environ.get("LD_PRELOAD", "")):
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  dict(os.environ, LD_PRELOAD=OPENBLAS))

    source = resolve("smollm2-135m", progress=False)
    ids = chat_prompt(source)
    print(f"SmolLM2-135M fp32, prompt {len(ids)} tokens, {args.tokens} greedy tokens, "
          f"{args.rounds} interleaved rounds, best of each\n")
    print(f"{'backend':<8} {'path':<22} {'prompt tok/s':>12} {'decode tok/s':>12}")
    for backend in args.backends:
        shard = load_shard(backend, source, LayerRange.full(source.num_layers), "float32")
        engine = LocalEngine("smollm2-135m", [shard], source.tokenizer, 8192)
        direct = torch_direct(source) if backend == "torch" else mlx_direct(source)
        run_mesh(engine, ids, 8)  # warm up both
        direct(ids, 8)
        m, d = [], []
        for _ in range(args.rounds):
            m.append(run_mesh(engine, ids, args.tokens))
            d.append(direct(ids, args.tokens))
        mp, md = max(x[0] for x in m), max(x[1] for x in m)
        dp, dd = max(x[0] for x in d), max(x[1] for x in d)
        label = "transformers loop" if backend == "torch" else "mlx-lm stream_generate"
        print(f"{backend:<8} {'mesh LocalEngine':<22} {mp:>12.1f} {md:>12.1f}")
        print(f"{backend:<8} {label:<22} {dp:>12.1f} {dd:>12.1f}")
        print(f"{backend:<8} {'ratio mesh/direct':<22} {mp / dp:>12.3f} {md / dd:>12.3f}\n")
        asyncio.run(engine.close())


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
