"""ONNX Runtime shards: the Jetson path (TensorRT / CUDA execution providers), and a CPU
backend. The graph comes from ``onnx_export`` (exported once, cached on disk by model, layer
range and precision); caches stay in ONNX Runtime as OrtValues bound with IO binding, so a
decode step does not copy the KV cache through NumPy.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from mesh.backends import onnx_export
from mesh.backends.base import Shard, ShardCache, StepItem
from mesh.errors import BackendUnavailable, InvalidRequest
from mesh.layers import LayerRange

log = logging.getLogger(__name__)

PRECISIONS = {"auto": "float32", "float32": "float32", "int8": "int8", "int4": "int4",
              "gguf": "int4"}
QUANT_VERSION = 4  # bump when the quantization recipe changes
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(available: list[str], requested: str | None = None) -> list[str]:
    """TensorRT, then CUDA, then CPU, among what this onnxruntime build has; ``requested``
    (a provider name, or 'tensorrt' / 'cuda' / 'cpu') overrides the order."""
    aliases = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
               "cpu": "CPUExecutionProvider"}
    if requested:
        name = aliases.get(requested.lower(), requested)
        if name not in available:
            raise BackendUnavailable(f"execution provider {name} is not available here "
                                     f"(have: {', '.join(available)})")
        return [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
    chosen = [p for p in PROVIDER_ORDER if p in available]
    return chosen or list(available)


class ORTCache(ShardCache):
    def __init__(self, k: ort.OrtValue, v: ort.OrtValue):
        self.k, self.v = k, v

    @property
    def offset(self) -> int:
        return self.k.shape()[2]

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        if n:
            keep = self.offset - n
            self.k = ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(self.k.numpy()[:, :, :keep]))
            self.v = ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(self.v.numpy()[:, :, :keep]))
        return n

    @property
    def nbytes(self) -> int:
        return 2 * int(np.prod(self.k.shape())) * 4


class ORTShard(Shard):
    def __init__(self, source, layers: LayerRange, dtype: str = "auto",
                 provider: str | None = None, cache_dir: Path | None = None):
        if dtype not in PRECISIONS:
            raise InvalidRequest(f"the onnxruntime backend takes dtype "
                                 f"{', '.join(PRECISIONS)}; got {dtype!r}", param="dtype")
        self.layers = layers
        self.cfg = source.config
        self.hidden_size = source.hidden_size
        self.vocab_size = source.vocab_size
        self.precision = PRECISIONS[dtype]
        from mesh.models.registry import mesh_home

        root = cache_dir or (mesh_home() / "onnx")
        key = onnx_export.cache_key(source, layers, "float32")  # + QUANT_VERSION below
        base = root / key / "model.onnx"
        if not base.exists():
            t0 = time.perf_counter()
            log.info("exporting %s layers %s to ONNX (once)", source.name, layers)
            tmp = root / f"{key}.tmp{os.getpid()}" / "model.onnx"
            onnx_export.export(source, layers, tmp)
            try:
                tmp.parent.rename(base.parent)
            except OSError:  # another process finished the same export first
                import shutil

                shutil.rmtree(tmp.parent, ignore_errors=True)
            log.info("exported in %.1fs", time.perf_counter() - t0)
        path = base
        if self.precision != "float32":
            path = base.with_name(f"model.{self.precision}.v{QUANT_VERSION}.onnx")
            if not path.exists():
                # quantize into a private folder under the final file names (external data
                # is referenced by relative name), then move the files into place
                tmpdir = base.parent / f"tmp{os.getpid()}-{self.precision}"
                tmpdir.mkdir(exist_ok=True)
                onnx_export.quantize(base, tmpdir / path.name, self.precision, self.vocab_size)
                for f in sorted(tmpdir.iterdir(), key=lambda f: f.suffix != ".data"):
                    f.rename(base.parent / f.name)  # data first, the model file last
                tmpdir.rmdir()
        self.path = path
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = os.environ.get("MESH_ORT_THREADS")
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.providers = choose_providers(ort.get_available_providers(),
                                          provider or os.environ.get("MESH_ORT_PROVIDER"))
        self.session = ort.InferenceSession(str(path), opts, providers=self.providers)
        self._device = "cuda" if self.providers[0] != "CPUExecutionProvider" else "cpu"

    def new_cache(self) -> ORTCache:
        z = onnx_export.zeros_cache(self.cfg, len(self.layers))
        return ORTCache(ort.OrtValue.ortvalue_from_numpy(z), ort.OrtValue.ortvalue_from_numpy(z))

    def _run(self, item: StepItem) -> np.ndarray:
        cache: ORTCache = item.cache
        t = item.data.shape[0]
        p = cache.offset
        x = (item.data.astype(np.int64) if self.layers.is_first
             else np.ascontiguousarray(item.data, dtype=np.float32))
        out_index = np.arange(t, dtype=np.int64) if item.all_logits else \
            np.array([t - 1], dtype=np.int64)
        b = self.session.io_binding()
        b.bind_cpu_input("x", x)
        b.bind_cpu_input("positions", np.arange(p, p + t, dtype=np.int64))
        b.bind_cpu_input("out_index", out_index)
        b.bind_ortvalue_input("past_k", cache.k)
        b.bind_ortvalue_input("past_v", cache.v)
        b.bind_output("out")
        b.bind_output("present_k", self._device)
        b.bind_output("present_v", self._device)
        self.session.run_with_iobinding(b)
        out, k, v = b.get_outputs()
        cache.k, cache.v = k, v  # stays in onnxruntime: no copy through NumPy
        res = out.numpy()
        if self.layers.is_last and not item.all_logits:
            return res[-1]
        return res

    def forward(self, items: Sequence[StepItem]) -> list[np.ndarray]:
        return [self._run(item) for item in items]
