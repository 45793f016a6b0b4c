"""The backend interface: a ``Shard`` is layers ``[start, end)`` of one model, callable.

Backends are adapters and nothing more: they turn a ``ModelSource`` and a ``LayerRange`` into a
shard with a forward step. They never run the generation loop, never import gRPC, and exchange
activations as NumPy (float32/float16) so stages on different backends can be chained.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from mesh.layers import LayerRange

# seconds a burst's KV buffers keep their size once it ends, before they are cut to the
# caches left open: the next burst would grow them again, a copy of every cache while its
# streams wait (ONNX Runtime's pool; engines and nodes cut it once quiet this long)
SETTLE = 2.0


class ShardCache(abc.ABC):
    """One request's KV cache for one shard's layers, owned by the caller."""

    # trim() never fails here (no sliding window that forgets): a step fed ahead on a guess
    # can always be taken back
    rewinds = False

    @property
    @abc.abstractmethod
    def offset(self) -> int:
        """Number of positions already in the cache."""

    @abc.abstractmethod
    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions; return how many were dropped."""

    @property
    def nbytes(self) -> int:
        return 0

    def release(self) -> None:
        """Give the cache's memory back now (a backend with a shared pool frees the slot)."""

    def fork(self) -> "ShardCache":
        """A new cache holding a copy of these positions (a prompt computed once for several
        completions of it). NotImplementedError where a backend cannot."""
        raise NotImplementedError


@dataclass
class StepItem:
    """One request's part of a batched forward step.

    ``data`` is int32 token ids of shape (T,) for a first shard, else hidden states (T, H).
    The cache's offset is the position of ``data[0]``.
    """

    request_id: str
    data: np.ndarray
    cache: ShardCache
    all_logits: bool = False
    # a lone decode step computed as one row of a batch: backends whose kernels round one
    # row differently from several (ONNX Runtime's int8-activation MatMulNBits) take the
    # batch path, so a replay repeats the numbers of a step that first ran batched
    batched: bool = False


def batch_rows(items: Sequence[StepItem], forward_rows, forward_one,
               batch_invariant: bool = False) -> list:
    """A backend's forward over ``items``: the decode steps (one position each, no prompt
    scoring) of several requests go to ``forward_rows`` as one batch, unless
    ``batch_invariant``; every other item (a prompt piece) to ``forward_one`` alone.
    Outputs in the items' order."""
    outs: list = [None] * len(items)
    rows = [i for i, item in enumerate(items) if item.data.shape[0] == 1 and not item.all_logits]
    if len(rows) > 1 and not batch_invariant:
        for i, out in zip(rows, forward_rows([items[i] for i in rows])):
            outs[i] = out
    for i, item in enumerate(items):
        if outs[i] is None:
            outs[i] = forward_one(item)
    return outs


def position_kv_bytes(cfg: dict, itemsize: int) -> int:
    """KV bytes of one position in one layer of a model with config ``cfg``."""
    from mesh.models import arch

    return 2 * arch.kv_heads(cfg) * arch.head_dim(cfg) * itemsize


def kv_layout_bytes(layout: dict | None, positions: Sequence[int]) -> int:
    """What caches of ``positions`` positions each take together under ``layout`` (a
    ``Shard.kv_layout``): ``layers``: each layer holds a cache's positions, rounded up to
    ``step`` and cut at its sliding window; ``pool``: every cache a slot of one buffer,
    slots a power of two (at least two) as long as the longest cache (plus the one position
    a batched step writes past it), grown by doubling from ``first`` to at most ``most``.
    No layout (a node that said none): 0."""
    if not positions or not layout:
        return 0
    kind = layout.get("kind")
    if kind == "layers":
        step = max(1, int(layout["step"]))
        held = [-(-p // step) * step for p in positions]
        return sum(int(layout["layer_bytes"]) * min(h, w or h)
                   for h in held for w in layout["windows"])
    if kind == "pool":
        need, capacity = max(positions) + 1, int(layout["first"])
        while capacity < need:
            capacity = min(2 * capacity, max(need, int(layout["most"])))
        slots = max(2, 1 << (len(positions) - 1).bit_length())
        return int(layout["position_bytes"]) * slots * capacity
    raise ValueError(f"unknown KV layout {kind!r}")


class Shard(abc.ABC):
    layers: LayerRange
    hidden_size: int
    vocab_size: int
    # a prompt row comes out bit for bit the same however the prompt is cut into pieces of
    # two rows or more: a scheduler may then reuse any prefix a request fed, to the token
    split_invariant: bool = False

    # KV bytes one position takes in one of this shard's layers, and each layer's sliding
    # window (None: it keeps every position); what ``kv_bytes`` counts (0: not said)
    kv_layer_bytes: int = 0
    kv_windows: tuple = ()
    kv_step: int = 1  # caches grow by this many positions at a time

    @abc.abstractmethod
    def new_cache(self) -> ShardCache: ...

    def kv_layout(self) -> dict:
        """How this shard's caches take memory, as plain data (``kv_layout_bytes`` counts
        it; a node sends it to its coordinator in the Load reply). A backend whose caches
        share a layout (ONNX Runtime's pool) says so here."""
        return {"kind": "layers", "layer_bytes": self.kv_layer_bytes, "step": self.kv_step,
                "windows": list(self.kv_windows or (None,) * len(self.layers))}

    def kv_bytes(self, positions: Sequence[int]) -> int:
        """The most that caches of ``positions`` positions each take together: what an
        engine admits requests against (each one's prompt plus its max_tokens)."""
        return kv_layout_bytes(self.kv_layout(), positions)

    @abc.abstractmethod
    def forward(self, items: Sequence[StepItem]) -> list[np.ndarray]:
        """Run one step for several requests.

        Returns per item: for a last shard float32 logits, (V,) for the last position or
        (T, V) with ``all_logits``; otherwise hidden states (T, H) for the next shard.
        """

    def stoppable(self) -> object | None:
        """A handle for ``forward(items, stop=handle)`` that ``stop(handle)``, from another
        thread, makes end early with an exception (the caches keep their offsets; what the
        step wrote past them is garbage the next step overwrites). None where a backend's
        forwards always run to the end."""
        return None

    def stop(self, handle) -> None:
        """End the forward run with ``handle`` now, if it still runs (see ``stoppable``)."""


BACKENDS = ("mlx", "torch", "onnxruntime")
DTYPES = ("auto", "float32", "float16", "bfloat16", "gguf", "int8", "int4")


def available_backends() -> list[str]:
    import importlib.util

    out = []
    if importlib.util.find_spec("mlx") and importlib.util.find_spec("mlx_lm"):
        out.append("mlx")
    if importlib.util.find_spec("torch"):
        out.append("torch")
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        out.append("onnxruntime")  # graphs are built with onnx.helper: no torch needed
    return out


# Preference per kind of machine (device profile "kind"). On a plain CPU, ONNX Runtime is the
# fastest here (benchmarks/backends.py: SmolLM2 Q4_1 decode ~100 tok/s with the file's own
# blocks in MatMulNBits, vs torch fp32 14, MLX ~15) and builds any layer range in seconds, so
# it is the default for whole models and pipeline stages alike.
_PREFERENCE = {
    "apple": ("mlx", "torch"),
    "jetson": ("onnxruntime", "torch"),
    "nvidia": ("torch", "onnxruntime"),
    "cpu": ("onnxruntime", "torch", "mlx"),
}


def _onnx_builds(model_type: str) -> bool:
    from mesh.models.arch import ARCHITECTURES

    return model_type in ARCHITECTURES and ARCHITECTURES[model_type].onnx


def choose_backend(kind: str, available: list[str], model_type: str | None = None,
                   whole_model: bool = True) -> str:
    """The backend for a machine of ``kind`` (pure: tested with fake inputs)."""
    from mesh.errors import BackendUnavailable

    for b in _PREFERENCE.get(kind, _PREFERENCE["cpu"]):
        if b not in available:
            continue
        if b == "onnxruntime" and model_type is not None and not _onnx_builds(model_type):
            continue
        return b
    if available:
        return available[0]
    raise BackendUnavailable(
        "no backend installed: pip install 'mesh[torch]' (after torch), 'mesh[mlx]' or "
        "'mesh[onnx]'")


def default_backend(model_type: str | None = None, whole_model: bool = True) -> str:
    """This machine's backend, from its device profile (Mac: mlx, Jetson: onnxruntime,
    NVIDIA GPU: torch, plain CPU: the fastest measured here)."""
    import platform

    kind = "apple" if platform.system() == "Darwin" else "cpu"
    try:
        from mesh.devices.detect import match, probe_local
        from mesh.devices.profiles import load_profiles

        found = match(probe_local(), load_profiles()).profile
        if found is not None:
            kind = found.kind
    except Exception:  # profiles unreadable: fall back on the platform guess
        pass
    return choose_backend(kind, available_backends(), model_type, whole_model)


# backend -> (module, shard class, what to install when the import fails)
_SHARD_CLASSES = {
    "mlx": ("mesh.backends.mlx", "MLXShard", "'mesh[mlx]'"),
    "torch": ("mesh.backends.torch", "TorchShard", "torch 'mesh[torch]'"),
    "onnxruntime": ("mesh.backends.onnxruntime", "ORTShard", "'mesh[onnx]'"),
}


def load_shard(backend: str, source: Any, layers: LayerRange, dtype: str = "auto",
               **options) -> Shard:
    """Build the shard for ``layers`` of ``source`` with the named backend."""
    from mesh.errors import BackendUnavailable, InvalidRequest
    from mesh.heap import trim as trim_heap

    if dtype not in DTYPES:
        raise InvalidRequest(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}",
                             param="dtype")
    if backend in _SHARD_CLASSES:
        import importlib

        module, cls, extra = _SHARD_CLASSES[backend]
        try:
            shard_cls = getattr(importlib.import_module(module), cls)
        except ImportError as exc:
            raise BackendUnavailable(f"{backend} backend unavailable: {exc}; "
                                     f"pip install {extra}") from exc
        shard = shard_cls(source, layers, dtype, **options)
        release = getattr(getattr(source, "reader", None), "release_pages", None)
        if release is not None:  # the build read the whole file; the shard holds its own
            release()
        trim_heap()  # and the build's temporaries go back to the system
        return shard
    raise InvalidRequest(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}",
                         param="backend")
