"""torch's own weight-only quantized matmuls against its fp32 GEMV, on this machine's CPU,
at SmolLM2-135M's decode shapes (one token: x is 1 x K).

The torch backend would hold a GGUF's 4-bit blocks exactly in ``_weight_int4pack_mm_for_cpu``'s
layout (group 32, w = (q - 8) * scale + zero) and 5/6/8-bit ones in ``_weight_int8pack_mm``
(per-channel int8) if these kernels were faster than dequantized fp32 here; this prints
whether they are, and checks the int4 layout reproduces the affine weights.

    python benchmarks/torch_quant.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def bench(f, n: int = 300) -> float:
    for _ in range(20):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(ap.parse_args().threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'N x K':>12} {'fp32 us':>9} {'int8 us':>9} {'int4 us':>9} {'int4 max err':>13}")
    for n, k in ((1536, 576), (576, 1536), (576, 576), (49152, 576)):
        w, x = torch.randn(n, k), torch.randn(1, k)
        scale = w.abs().amax(1) / 127
        w8 = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        g = 32
        wg = w.reshape(n, k // g, g)
        lo, hi = wg.amin(-1), wg.amax(-1)
        sc = (hi - lo) / 15
        q = torch.round((wg - lo[..., None]) / sc[..., None]).clamp(0, 15).to(torch.int32)
        affine = (q.float() * sc[..., None] + lo[..., None]).reshape(n, k)
        packed = torch._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 2)
        sz = torch.stack([sc.T, (lo + 8 * sc).T], -1).contiguous()
        with torch.inference_mode():
            err = (torch._weight_int4pack_mm_for_cpu(x, packed, g, sz) - x @ affine.T).abs()
            f32 = bench(lambda: torch.nn.functional.linear(x, w))
            i8 = bench(lambda: torch._weight_int8pack_mm(x, w8, scale))
            i4 = bench(lambda: torch._weight_int4pack_mm_for_cpu(x, packed, g, sz))
        print(f"{n:>6} x {k:<5} {f32:>9.0f} {i8:>9.0f} {i4:>9.0f} {err.max().item():>13.2e}")


if __name__ == "__main__":
    main()
