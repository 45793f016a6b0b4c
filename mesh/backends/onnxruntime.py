"""ONNX Runtime shards: the Jetson path (TensorRT / CUDA execution providers), and the fastest
CPU backend here. The graph is built straight from the model's tensors (``onnx_graph``):
quantized GGUF blocks become ``MatMulNBits`` weights as they are, attention is
``GroupQueryAttention`` over one KV buffer per layer that is past and present at once. Caches
stay in ONNX Runtime as OrtValues bound with IO binding; a decode step writes its one new
position in place.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from mesh.backends import onnx_graph
from mesh.backends.base import Shard, ShardCache, StepItem
from mesh.errors import BackendUnavailable, InvalidRequest
from mesh.layers import LayerRange

log = logging.getLogger(__name__)

# --dtype -> what the graph holds: "auto" is the file's own blocks (fp32 for float files)
PRECISIONS = {"auto": "auto", "gguf": "auto", "float32": "float32", "int8": "int8",
              "int4": "int4"}
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
FIRST_CAPACITY = 256  # KV positions allocated for a new request; doubled as it grows
INLINE_LIMIT = 1 << 30  # graphs with more weight bytes go through a file (protobuf's 2 GB cap)


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
    """Per layer one K and one V buffer (1, kv_heads, capacity, head_dim); positions past
    ``offset`` are garbage that the next step overwrites, so trimming is free."""

    def __init__(self, shard: "ORTShard"):
        self.shard = shard
        self._offset = 0
        self.capacity = 0
        self.k: list = []
        self.v: list = []
        self._arrays: list[np.ndarray] = []  # CPU buffers the OrtValues point into

    @property
    def offset(self) -> int:
        return self._offset

    def trim(self, n: int) -> int:
        n = min(n, self._offset)
        self._offset -= n
        return n

    def ensure(self, total: int) -> None:
        if total <= self.capacity:
            return
        cap = max(total, FIRST_CAPACITY, 2 * self.capacity)
        cap = min(cap, max(total, self.shard.max_positions))
        shape = (1, self.shard.kv_heads, cap, self.shard.head_dim)
        arrays, ks, vs = [], [], []
        for i in range(self.shard.n_layers):
            for old, dst in ((self.k, ks), (self.v, vs)):
                buf = np.zeros(shape, dtype=np.float32)
                if old:
                    buf[:, :, :self._offset] = old[i].numpy()[:, :, :self._offset]
                arrays.append(buf)
                dst.append(ort.OrtValue.ortvalue_from_numpy(buf, self.shard.device))
        self.k, self.v, self._arrays, self.capacity = ks, vs, arrays, cap

    @property
    def nbytes(self) -> int:
        return 2 * self.shard.n_layers * self.shard.kv_heads * self.capacity * \
            self.shard.head_dim * 4


class ORTShard(Shard):
    def __init__(self, source, layers: LayerRange, dtype: str = "auto",
                 provider: str | None = None, cache_dir: Path | None = None,
                 max_positions: int = onnx_graph.MAX_POSITIONS):
        if dtype not in PRECISIONS:
            raise InvalidRequest(f"the onnxruntime backend takes dtype "
                                 f"{', '.join(PRECISIONS)}; got {dtype!r}", param="dtype")
        cfg = source.config
        self.layers = layers
        self.cfg = cfg
        self.hidden_size = source.hidden_size
        self.vocab_size = source.vocab_size
        self.precision = PRECISIONS[dtype]
        self.n_layers = len(layers)
        self.kv_heads = onnx_graph.kv_heads(cfg)
        self.head_dim = onnx_graph.head_dim(cfg)
        self.max_positions = min(max_positions, source.context_length)
        t0 = time.perf_counter()
        model, self.requantized = onnx_graph.build(source, layers, self.precision,
                                                   self.max_positions)
        self.embed = (onnx_graph.QuantizedEmbedding(source, self.precision)
                      if layers.is_first else None)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = os.environ.get("MESH_ORT_THREADS")
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.providers = choose_providers(ort.get_available_providers(),
                                          provider or os.environ.get("MESH_ORT_PROVIDER"))
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        if weight_bytes < INLINE_LIMIT:
            data = model.SerializeToString()
            del model
            self.session = ort.InferenceSession(data, opts, providers=self.providers)
        else:  # too big for one protobuf: weights in a side file, read by onnxruntime
            import onnx

            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
                path = Path(tmp) / "shard.onnx"
                onnx.save_model(model, str(path), save_as_external_data=True,
                                location="shard.onnx.data")
                del model
                self.session = ort.InferenceSession(str(path), opts, providers=self.providers)
        self.device = "cuda" if self.providers[0] != "CPUExecutionProvider" else "cpu"
        log.info("onnxruntime shard %s built in %.1fs (%s, %.0f MB of weights)", layers,
                 time.perf_counter() - t0, self.precision, weight_bytes / 1e6)

    def new_cache(self) -> ORTCache:
        return ORTCache(self)

    def _run(self, item: StepItem) -> np.ndarray:
        cache: ORTCache = item.cache
        t = item.data.shape[0]
        p = cache.offset
        total = p + t
        if total > self.max_positions:
            raise InvalidRequest(f"position {total} is past this shard's limit of "
                                 f"{self.max_positions}")
        cache.ensure(total)
        if self.embed is not None:
            x = self.embed(np.asarray(item.data, dtype=np.int64))
        else:
            x = np.asarray(item.data, dtype=np.float32)
        b = self.session.io_binding()
        b.bind_cpu_input("hidden", np.ascontiguousarray(x[None], dtype=np.float32))
        b.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        b.bind_cpu_input("total_len", np.array(total, dtype=np.int32))
        if self.layers.is_last:
            out_index = (np.arange(t, dtype=np.int64) if item.all_logits
                         else np.array([t - 1], dtype=np.int64))
            b.bind_cpu_input("out_index", out_index)
        b.bind_output("out")  # first: get_outputs() follows the binding order
        for j, i in enumerate(self.layers):
            b.bind_ortvalue_input(f"past_k_{i}", cache.k[j])
            b.bind_ortvalue_input(f"past_v_{i}", cache.v[j])
            b.bind_ortvalue_output(f"present_k_{i}", cache.k[j])  # the same buffer: in place
            b.bind_ortvalue_output(f"present_v_{i}", cache.v[j])
        self.session.run_with_iobinding(b)
        cache._offset = total
        res = b.get_outputs()[0].numpy()[0]
        if self.layers.is_last and not item.all_logits:
            return res[-1]
        return res

    def forward(self, items: Sequence[StepItem]) -> list[np.ndarray]:
        return [self._run(item) for item in items]
