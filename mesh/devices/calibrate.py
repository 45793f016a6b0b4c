"""``mesh devices calibrate``: measure a machine mesh has never seen and write its profile.

Three measurements, each the best of several runs: memory bandwidth (streaming a 256 MiB
array), matmul throughput with the selected backend, and the forward time of one real decoder
layer of SmolLM2 (decode step and 128-token prefill) with the selected backend.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from mesh.devices.detect import match, probe_local
from mesh.devices.profiles import GB, DeviceProfile, load_profiles


@dataclass
class Calibration:
    bandwidth_gbps: float
    matmul_tflops: float
    layer_decode_ms: float
    layer_prefill_ms: float


def measure_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """GB/s reading a float32 array once (NumPy sum streams it from memory)."""
    a = np.ones(mib * 1024 * 1024 // 4, dtype=np.float32)
    a.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def measure_matmul(backend: str, n: int = 1024, repeats: int = 5) -> float:
    """TFLOPS of an n x n float32 matmul with the backend's own kernels."""
    if backend == "torch":
        import torch

        a, b = torch.randn(n, n), torch.randn(n, n)
        run = lambda: torch.mm(a, b)  # noqa: E731
    elif backend == "mlx":
        import mlx.core as mx

        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        run = lambda: mx.eval(a @ b)  # noqa: E731
    else:
        a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
        run = lambda: a @ b  # noqa: E731
    run()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def measure_layer(backend: str, repeats: int = 10) -> tuple[float, float]:
    """ms for one SmolLM2 decoder layer: one decode step, and a 128-token prefill."""
    from mesh.backends import StepItem, load_shard
    from mesh.layers import LayerRange
    from mesh.models.source import resolve

    source = resolve("smollm2-135m", progress=False)
    shard = load_shard(backend, source, LayerRange(10, 11, source.num_layers), "float32")
    h = np.random.default_rng(0).standard_normal((128, source.hidden_size)).astype(np.float32)
    prefill, decode = float("inf"), float("inf")
    for _ in range(3):
        cache = shard.new_cache()
        t = time.perf_counter()
        shard.forward([StepItem("cal", h, cache)])
        prefill = min(prefill, time.perf_counter() - t)
        for _ in range(repeats):
            t = time.perf_counter()
            shard.forward([StepItem("cal", h[:1], cache)])
            decode = min(decode, time.perf_counter() - t)
    return decode * 1e3, prefill * 1e3


def calibrate(backend: str, name: str | None = None, progress: bool = True):
    steps = tqdm(total=3, desc="calibrating", disable=not progress, unit="step")
    with steps:
        steps.set_postfix_str("memory bandwidth")
        bw = measure_bandwidth()
        steps.update()
        steps.set_postfix_str(f"{backend} matmul")
        tf = measure_matmul(backend)
        steps.update()
        steps.set_postfix_str("one decoder layer")
        dec, pre = measure_layer(backend)
        steps.update()
    cal = Calibration(bw, tf, dec, pre)
    probe = probe_local()
    known = match(probe, load_profiles()).profile
    kind = known.kind if known else ("apple" if probe.system == "Darwin" else "cpu")
    today = datetime.date.today().isoformat()
    chip = probe.chip or f"{probe.system} {probe.arch}"
    profile = DeviceProfile(
        name=name or f"{chip} (calibrated)", kind=kind, backend=backend,
        memory_gb=round(probe.memory_bytes / GB, 2) or 8.0, usable_fraction=0.6,
        bandwidth_gbps=round(bw, 2), fp16_tflops=round(tf, 4), int8_tops=0.0,
        execution_provider="", preferred_dtypes=("float32",),
        source=(f"measured by mesh devices calibrate on {today} with {backend}: "
                f"{bw:.1f} GB/s streaming read, {tf * 1e3:.0f} GFLOPS fp32 matmul, one "
                f"SmolLM2 layer {dec:.2f} ms decode / {pre:.1f} ms 128-token prefill"),
        match={"system": probe.system, "arch": [probe.arch],
               **({"chip_contains": [probe.chip]} if probe.chip else {})})
    return profile, cal
