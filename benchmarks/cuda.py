"""The CUDA paths on an NVIDIA GPU: torch holding a GGUF's quantized blocks against float16 and
against the CPU, served through the API, and a pipeline whose coordinator computes on the CPU
while a node computes on the GPU.

1. ``kernels``: ``Int4Linear`` (tinygemm's int4 matmul on the file's 4-bit blocks) against a
   float16 matmul of the same dequantized weight, at the model's shapes: largest error and
   microseconds a call, 1 and 8 rows.
2. ``shards``: the whole model as one torch shard on the GPU in float16 and in gguf (4-bit
   projections in int4, the rest of the blocks in 8-bit containers), each against the CPU's
   gguf shard (the file's weights exactly, fp32 arithmetic): last-position logits, greedy
   tokens over a decode, weight memory on the GPU, decode tokens/s at 1 and 8 rows, and four
   requests decoding as one batch against each alone (largest logit difference).
3. ``served``: ``mesh serve`` (local, torch, each dtype) through its OpenAI API: aggregate
   decode tok/s and median time to first token at 1 and 8 streams (benchmarks/concurrency.py).
4. ``pipeline``: ``mesh serve --mode pipeline`` with ``CUDA_VISIBLE_DEVICES=""`` (a CPU
   coordinator, onnxruntime) and one ``mesh node`` on the GPU (torch), the plan as /health
   reports it, and the same streams.

The model: a SmolLM2-1.7B-shaped GGUF with random Q4_K_M blocks and SmolLM2's tokenizer
(``benchmarks/synthetic.py --shape smollm2-1.7b``), built on the spot; or ``--model``.

    python benchmarks/cuda.py [--model GGUF] [--tokenizer-from GGUF]
        [--dtypes float16 bfloat16 gguf] [--served-dtypes D ...] [--profile] [--logs DIR]
        [--skip kernels shards served pipeline] [--tokens 64] [--streams 1 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def say(*parts) -> None:
    print(*parts, flush=True)


def environment() -> None:
    import torch

    say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        say(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
    try:
        import onnxruntime as ort

        say(f"onnxruntime {ort.__version__}: providers {ort.get_available_providers()}")
    except ImportError as exc:
        say(f"onnxruntime: not installed ({exc})")
    from mesh.devices import detect, profiles

    d = detect.match(detect.probe_local(), profiles.load_profiles())
    say(f"mesh devices detect: {d.profile.name if d.profile else None} ({d.reason})")


def _time(f, n: int, sync) -> float:
    for _ in range(5):
        f()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        f()
    sync()
    return (time.perf_counter() - t) / n


def kernels(device: str) -> None:
    """Int4Linear against fp16 on its dequantized weight, random affine 4-bit blocks."""
    import torch

    from mesh.backends.torch import Int4Linear
    from mesh.models.ggml import Affine

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    say("\n== kernels: Int4Linear vs float16 on the same weight ==")
    say(f"{'n x k':>13} {'rows':>4} {'max |err|':>10} {'rel':>8} {'int4 us':>8} {'fp16 us':>8}")
    for n, k in ((1536, 576), (576, 1536), (2048, 2048), (8192, 2048), (2048, 8192),
                 (49152, 2048)):
        g = 32
        aff = Affine(rng.integers(0, 16, (n, k), dtype=np.uint8),
                     rng.uniform(1e-3, 3e-3, (n, k // g)).astype(np.float32),
                     rng.uniform(-2e-2, 0, (n, k // g)).astype(np.float32), 4, g)
        if not Int4Linear.fits((n, k), dev):
            say(f"{n:>6} x {k:<6} does not fit the int4 layout here")
            continue
        lin = Int4Linear(aff, dev, torch.float16)
        w = torch.from_numpy(aff.dequantize()).to(dev, torch.float16)
        for rows in (1, 8):
            x = torch.randn(rows, k, device=dev, dtype=torch.float16)
            with torch.inference_mode():
                ref = (x.float() @ w.float().T)
                got = lin(x).float()
                err = (got - ref).abs().max().item()
                rel = err / ref.abs().max().item()
                t4 = _time(lambda: lin(x), 200, sync)
                t16 = _time(lambda: torch.nn.functional.linear(x, w), 200, sync)
            say(f"{n:>6} x {k:<6} {rows:>4} {err:>10.2e} {rel:>8.1e} {t4 * 1e6:>8.1f} "
                f"{t16 * 1e6:>8.1f}")


def _greedy(shard, ids, steps: int, rid: str = "a") -> tuple[list[np.ndarray], list[int]]:
    """A request alone: the logits after its prompt and after each of ``steps`` greedy
    tokens (steps + 1 of them), and those tokens."""
    from mesh.backends import StepItem

    cache = shard.new_cache()
    logits = [shard.forward([StepItem(rid, np.asarray(ids, np.int32), cache)])[0]]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(shard.forward([StepItem(rid, np.array(tokens[-1:], np.int32),
                                              cache)])[0])
    cache.release()
    return logits, tokens


def _decode_speed(shard, rows: int, steps: int, sync) -> float:
    """Decode tokens/s of ``rows`` requests stepping together after a 32-token prompt."""
    from mesh.backends import StepItem

    caches = [shard.new_cache() for _ in range(rows)]
    for i, c in enumerate(caches):
        shard.forward([StepItem(f"r{i}", np.arange(1 + i, 33 + i, dtype=np.int32), c)])
    step = [StepItem(f"r{i}", np.array([7 + i], np.int32), c) for i, c in enumerate(caches)]
    for _ in range(3):
        shard.forward(step)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        shard.forward(step)
    sync()
    dt = time.perf_counter() - t
    for c in caches:
        c.release()
    return rows * steps / dt


def _rows_agree(shard, steps: int = 8) -> float:
    """Largest |logit| difference between four requests (prompts of 8, 13, 21 and 34
    tokens) decoding together as one batch and each decoding alone, fed the same tokens."""
    from mesh.backends import StepItem

    prompts = [np.arange(5 + i, 5 + i + n, dtype=np.int32) for i, n in
               enumerate((8, 13, 21, 34))]
    alone, fed = zip(*(_greedy(shard, ids, steps, f"a{i}") for i, ids in enumerate(prompts)))
    caches = [shard.new_cache() for _ in prompts]
    for i, (ids, c) in enumerate(zip(prompts, caches)):
        shard.forward([StepItem(f"b{i}", ids, c)])
    worst = 0.0
    for t in range(steps):
        outs = shard.forward([StepItem(f"b{i}", np.array([fed[i][t]], np.int32), c)
                              for i, c in enumerate(caches)])
        worst = max(worst, *(float(np.abs(o - alone[i][t + 1]).max())
                             for i, o in enumerate(outs)))
    for c in caches:
        c.release()
    return worst


def _profile(shard, folder: Path, tag: str) -> None:
    """torch.profiler over 16 one-row decode steps: the table of ops, to a file."""
    import torch

    from mesh.backends import StepItem

    cache = shard.new_cache()
    shard.forward([StepItem("p", np.arange(1, 33, dtype=np.int32), cache)])
    step = [StepItem("p", np.array([7], np.int32), cache)]
    shard.forward(step)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(16):
            shard.forward(step)
    cache.release()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                      max_name_column_width=60)
    (folder / f"profile-{tag}.txt").write_text(table)
    say(f"  profile of {tag}: {folder / f'profile-{tag}.txt'}")


def shards(model: str, device: str, dtypes: list[str], folder: Path | None = None) -> None:
    import torch

    from mesh.backends import load_shard
    from mesh.layers import LayerRange
    from mesh.models.source import resolve

    src = resolve(model, progress=False)
    n = src.num_layers
    everything = LayerRange(0, n, n)
    rng = np.random.default_rng(1)
    ids = [int(i) for i in rng.integers(10, min(src.vocab_size, 30000), 48)]
    steps = 24
    t = time.perf_counter()
    cpu = load_shard("torch", src, everything, "gguf", device="cpu")
    say(f"\n== shards: {src.name}, {n} layers, against the CPU's gguf shard "
        f"(loaded in {time.perf_counter() - t:.1f} s) ==")
    t = time.perf_counter()
    (ref_first, *_), ref_tokens = _greedy(cpu, ids, steps)
    say(f"CPU gguf: {steps} greedy tokens in {time.perf_counter() - t:.1f} s")
    del cpu
    ref_p = np.exp(ref_first - ref_first.max())
    ref_p /= ref_p.sum()
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    say(f"{'dtype':>8} {'weights GiB':>11} {'max |dlogit|':>12} {'KL':>9} {'top-1':>5} "
        f"{'same greedy':>11} {'1 row tok/s':>11} {'8 rows tok/s':>12} {'rows vs alone':>13}")
    for dtype in dtypes:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
        shard = load_shard("torch", src, everything, dtype, device=device)
        held = (torch.cuda.memory_allocated() - base) / 2**30 if dev.type == "cuda" else 0.0
        (first, *_), tokens = _greedy(shard, ids, steps)
        p = np.exp(first - first.max())
        p /= p.sum()
        kl = float(np.sum(ref_p * (np.log(ref_p + 1e-30) - np.log(p + 1e-30))))
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), steps)
        one = _decode_speed(shard, 1, 64, sync)
        eight = _decode_speed(shard, 8, 32, sync)
        rows = _rows_agree(shard)
        say(f"{dtype:>8} {held:>11.2f} {np.abs(first - ref_first).max():>12.3f} {kl:>9.2e} "
            f"{'yes' if first.argmax() == ref_first.argmax() else 'no':>5} "
            f"{same:>5} of {steps:<3} {one:>11.1f} {eight:>12.1f} {rows:>13.3f}")
        if folder is not None:
            _profile(shard, folder, dtype)
        del shard
    sync()


def _streams(url: str, model: str, streams: list[int], tokens: int) -> None:
    from benchmarks.concurrency import level

    level(url, model, 1, 8, 900)  # warm-up
    for i, n in enumerate(streams):
        r = level(url, model, n, tokens, 100 * i)
        say(f"  {n:>2} streams: {r['agg']:7.1f} tok/s aggregate, first token median "
            f"{r['ttft_med']:6.0f} ms, p95 {r['ttft_p95']:6.0f} ms ({r['tokens']} tokens)")


def _stop(*procs) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.terminate()
    for p in procs:
        if p is None:
            continue
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _served(args, dtype: str, log: Path) -> None:
    from benchmarks.concurrency import _port, start

    port = _port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mesh", "serve", "--model", args.model, "--backend", "torch",
           "--dtype", dtype, "--port", str(port)]
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = start(cmd, url, 600, log=f)
        try:
            say(f"\n== served: mesh serve --backend torch --dtype {dtype} "
                f"(up in {time.perf_counter() - t:.0f} s) ==")
            _streams(url, _served_name(url), args.streams, args.tokens)
        finally:
            _stop(proc)


def _served_name(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


def _pipeline(args, out: Path) -> None:
    import httpx

    from benchmarks.concurrency import _port, _wait_port, start

    node_port, port = _port(), _port()
    url = f"http://127.0.0.1:{port}"
    cpu_env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    with open(out / "node.log", "w") as nf, open(out / "coordinator.log", "w") as cf:
        node = subprocess.Popen([sys.executable, "-m", "mesh", "node", "--port", str(node_port),
                                 "--no-discovery", "--dtype", args.node_dtype],
                                stdout=nf, stderr=subprocess.STDOUT)
        coord = None
        try:
            _wait_port(node_port, 120)
            t = time.perf_counter()
            coord = start([sys.executable, "-m", "mesh", "serve", "--mode", "pipeline",
                           "--model", args.model, "--peer", f"127.0.0.1:{node_port}",
                           "--no-discovery", "--port", str(port)], url, 600, log=cf,
                          env=cpu_env)
            health = httpx.get(url + "/health", timeout=10).json()
            say(f"\n== pipeline: a CPU coordinator (CUDA_VISIBLE_DEVICES=\"\") and a GPU node "
                f"(--dtype {args.node_dtype}), up in {time.perf_counter() - t:.0f} s ==")
            say("  plan: " + json.dumps(health.get("plan") or health.get("stages") or health)
                [:1500])
            _streams(url, _served_name(url), args.streams, args.tokens)
        finally:
            _stop(coord, node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a GGUF (default: the synthetic SmolLM2-1.7B "
                    "shape, built here)")
    ap.add_argument("--tokenizer-from", default=None, metavar="GGUF",
                    help="the synthetic model's tokenizer (default: smollm2-135m's file)")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "gguf"])
    ap.add_argument("--served-dtypes", nargs="+", default=None,
                    help="the dtypes to serve (default: --dtypes)")
    ap.add_argument("--profile", action="store_true",
                    help="write torch.profiler's table of a decode step per dtype to --logs")
    ap.add_argument("--node-dtype", default="gguf")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["kernels", "shards", "served", "pipeline"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--logs", default=".", help="folder for the servers' logs")
    args = ap.parse_args()
    out = Path(args.logs)
    out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from benchmarks.synthetic import build
        from mesh.models import registry

        tok = args.tokenizer_from or str(registry.pull("smollm2-135m", progress=False))
        t = time.perf_counter()
        args.model = str(build(registry.mesh_home() / "synthetic", "smollm2-1.7b", tok))
        say(f"model: {args.model} (ready in {time.perf_counter() - t:.0f} s)")
    environment()
    if "kernels" not in args.skip:
        kernels(args.device)
    if "shards" not in args.skip:
        shards(args.model, args.device, args.dtypes, out if args.profile else None)
    if "served" not in args.skip:
        for dtype in args.served_dtypes or args.dtypes:
            try:
                _served(args, dtype, out / f"serve-{dtype}.log")
            except Exception as exc:  # the next configuration still runs
                say(f"served {dtype}: failed: {exc!r}")
    if "pipeline" not in args.skip:
        try:
            _pipeline(args, out)
        except Exception as exc:
            say(f"pipeline: failed: {exc!r}")


if __name__ == "__main__":
    main()
