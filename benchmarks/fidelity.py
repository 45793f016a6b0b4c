"""How closely each quantized path follows its model's own float32 numbers, beside llama.cpp.

For each model, the text's tokens go in windows of ``--ctx`` tokens (the first ``--chunks``);
each window's logits come from torch in float32 on the GGUF's dequantized weights (the
reference) and from each mesh config in ``--configs``; over the second half of every window
(what ``llama-perplexity --kl-divergence`` scores) it prints the top-1 agreement with the
reference and the mean KL(reference || config). llama.cpp, the yardstick, is measured the same
way on the same text: its own float32 conversion of the file (``llama-quantize
--allow-requantize ... F32``) is the base, the file itself the quantized model, and its
``Same top p`` and ``Mean KLD`` are printed beside mesh's. (llama.cpp tokenizes the text itself
and starts each window with BOS where the model wants one, so its windows hold the same text,
not necessarily the same tokens.)

    python benchmarks/fidelity.py [--models smollm2-135m gemma3-270m]
        [--configs onnxruntime:auto mlx:auto torch:gguf] [--ctx 512] [--chunks 4]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.backends import gguf_path, llama_cpp_bin  # noqa: E402

TEXTS = [ROOT.parent / "shared" / "data" / "wikitext2-test-part-a.txt",
         ROOT / "tests" / "data" / "wikitext2-slice.txt"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """In float64 (mesh.engine.sampling's is float32): the KLs measured here go down to 1e-7."""
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def window_logits(shard, windows: list[np.ndarray]) -> list[np.ndarray]:
    """The logits of each window's second half (the scored positions), a fresh cache per
    window."""
    from mesh.backends import StepItem

    return [shard.forward([StepItem("w", w, shard.new_cache(), all_logits=True)])[0]
            [len(w) // 2:] for w in windows]


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(ref || got), positions) over the scored positions."""
    same, kls = [], []
    for r, g in zip(ref, got):
        lr, lg = log_softmax(r), log_softmax(g)
        same.append(lr.argmax(-1) == lg.argmax(-1))
        kls.append((np.exp(lr) * (lr - lg)).sum(-1))
    same, kls = np.concatenate(same), np.concatenate(kls)
    return float(same.mean()), float(kls.mean()), int(same.size)


def llama_cpp(model: str, text: Path, ctx: int, chunks: int, bin_dir: Path
              ) -> tuple[float, float, int] | None:
    """llama.cpp's own figures: (same top-1 share, mean KLD, positions) of the file against
    its float32 conversion, from llama-perplexity's KL-divergence mode."""
    build = bin_dir.parent
    need = [bin_dir / "llama-perplexity", bin_dir / "llama-quantize"]
    if not all(p.exists() for p in need):
        r = subprocess.run(["cmake", "--build", str(build), "-j2", "--target",
                            "llama-perplexity", "llama-quantize"], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"  (could not build llama-perplexity: {r.stderr[-300:]})")
            return None
    gguf = gguf_path(model)
    with tempfile.TemporaryDirectory() as tmp:
        f32, base = Path(tmp) / "f32.gguf", Path(tmp) / "base.kld"
        subprocess.run([str(need[1]), "--allow-requantize", gguf, str(f32), "F32"],
                       check=True, capture_output=True)
        common = ["-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-t", "2",
                  "--kl-divergence-base", str(base)]
        subprocess.run([str(need[0]), "-m", str(f32), *common], check=True,
                       capture_output=True)
        out = subprocess.run([str(need[0]), "-m", gguf, *common, "--kl-divergence"],
                             check=True, capture_output=True, text=True)
    log = out.stdout + out.stderr
    top = re.search(r"Same top p:\s*([\d.]+)", log)
    kld = re.search(r"Mean\s+KLD:\s*([-\d.]+)", log)
    if not (top and kld):
        print("  (llama-perplexity printed no KL statistics)")
        return None
    return float(top.group(1)) / 100, float(kld.group(1)), chunks * (ctx - ctx // 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--configs", nargs="+",
                    default=["onnxruntime:auto", "mlx:auto", "torch:gguf"])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    args = ap.parse_args()

    from mesh.backends import load_shard
    from mesh.layers import LayerRange
    from mesh.models.source import resolve

    text = next(p for p in TEXTS if p.exists())
    bin_dir = None if args.skip_llama_cpp else llama_cpp_bin()
    rows = []
    for model in args.models:
        source = resolve(model, progress=False)
        full = LayerRange.full(source.num_layers)
        ids = np.array(source.tokenizer.encode(text.read_text()), dtype=np.int32)
        n = min(args.chunks, len(ids) // args.ctx)
        if n == 0:
            sys.exit(f"{text} holds {len(ids)} tokens: fewer than one --ctx {args.ctx} window")
        windows = [ids[i * args.ctx:(i + 1) * args.ctx] for i in range(n)]
        print(f"{model}: {n} windows of {args.ctx} tokens from {text.name}", flush=True)
        ref = window_logits(load_shard("torch", source, full, "float32"), windows)
        for cfg in args.configs:
            backend, dtype = cfg.split(":")
            t0 = time.perf_counter()
            try:
                shard = load_shard(backend, source, full, dtype)
            except Exception as e:  # a backend not installed here
                print(f"  {cfg}: skipped ({e})")
                continue
            top, kl, npos = compare(ref, window_logits(shard, windows))
            del shard
            rows.append((model, f"mesh {cfg}", top, kl, npos))
            print(f"  mesh {cfg}: top-1 {top:.2%}, mean KL {kl:.2e} over {npos} positions "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if bin_dir is not None:
            got = llama_cpp(model, text, args.ctx, n, bin_dir)
            if got:
                rows.append((model, "llama.cpp (its F32 conversion as base)", *got))
                print(f"  llama.cpp: top-1 {got[0]:.2%}, mean KL {got[1]:.2e}", flush=True)
    print("\n| model | path | top-1 agreement with float32 | mean KL | positions |")
    print("| --- | --- | --- | --- | --- |")
    for model, path, top, kl, npos in rows:
        print(f"| {model} | {path} | {top:.2%} | {kl:.2e} | {npos} |")


if __name__ == "__main__":
    main()
