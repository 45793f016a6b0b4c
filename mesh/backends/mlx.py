"""MLX shards built from mlx-lm's architecture classes.

The full mlx-lm ``Model`` is constructed (MLX initialises lazily, so unused layers cost no
memory), then only layers ``[start, end)`` are kept, with their original indices so Gemma 3's
local/global pattern stays right. Weights come from the ``ModelSource`` reader, never from
``mx.load`` on a GGUF (it mis-reads Q4_K and fails on Q5_0 in mlx 0.32). With dtype ``auto``
(or ``gguf``) a GGUF file's quantized tensors stay quantized: every GGML type converts exactly
into MLX's affine layout (``mesh.models.ggml``) at 4, 5, 6 or 8 bits, group 32, embedding and
head included; Q6_K's group of 16 is below MLX's smallest group, so it is re-quantized to
8 bits at group 32 (``MESH_MLX_REQUANT_BITS=6``: 6 bits, less memory, further from the
file) and the shard says so.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.utils import _get_classes

from mesh.backends.base import Shard, ShardCache, StepItem, batch_rows, position_kv_bytes
from mesh.layers import LayerRange
from mesh.models import arch
from mesh.models.ggml import Affine, affine_of, pack_bitstream, quantize_affine

log = logging.getLogger(__name__)

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_GROUPS = (32, 64, 128)  # what mx.quantized_matmul takes
# bits for a type MLX cannot hold exactly (Q6_K): 8 by default; 6 holds a Q6_K layer in
# 1.14x its file bytes instead of 1.19x but agrees with float32 on 97.2% of Gemma 3's next
# tokens instead of 99.7% (benchmarks/node_memory.py, benchmarks/fidelity.py; docs/benchmarks.md)
REQUANT_BITS = os.environ.get("MESH_MLX_REQUANT_BITS", "8")


class MLXCache(ShardCache):
    def __init__(self, caches: list):
        self.caches = caches

    @property
    def offset(self) -> int:
        return self.caches[0].offset if self.caches else 0

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        if n and not all(c.is_trimmable() for c in self.caches):
            raise ValueError("this cache cannot be trimmed (a sliding window has rotated)")
        return min((c.trim(n) for c in self.caches), default=0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches if hasattr(c, "nbytes"))

    def fork(self) -> "MLXCache":
        import copy

        out = []
        for c in self.caches:
            n = copy.copy(c)  # offsets and a rotating window's index are plain ints
            for attr in ("keys", "values"):
                v = getattr(c, attr, None)
                if v is not None:  # a new array object: a slice update rebinds only its own
                    setattr(n, attr, mx.array(v))
            out.append(n)
        return MLXCache(out)


class MLXShard(Shard):
    def __init__(self, source, layers: LayerRange, dtype: str = "auto"):
        if dtype not in ("auto", "gguf", *_DTYPES):
            from mesh.errors import InvalidRequest

            raise InvalidRequest(f"the mlx backend takes dtype auto, gguf, float32, float16 or "
                                 f"bfloat16; not {dtype!r}", param="dtype")
        # a row's sums depend on how many rows its matmuls hold: batch-invariant, every
        # request's decode step runs alone (its numbers never depend on its company)
        self.batch_invariant = os.environ.get("MESH_BATCH_INVARIANT", "0") == "1"
        self.layers = layers
        self.model_type = source.model_type
        cfg = dict(source.config)
        model_cls, args_cls = _get_classes(cfg)
        self.args = args_cls.from_dict(cfg)
        self.hidden_size = source.hidden_size
        self.vocab_size = source.vocab_size
        # Without a GPU, fp32 is the fast float path (OpenBLAS); on Apple silicon fp16.
        default = "float16" if mx.default_device() == mx.gpu else "float32"
        self.quantized = dtype in ("auto", "gguf")
        self.requantized: dict[str, str] = {}  # GGML type -> what it became, when not exact
        self.dtype = _DTYPES[default if dtype in ("auto", "gguf") else dtype]

        model = model_cls(self.args)
        inner = model.model
        all_blocks = list(inner.layers)
        self.blocks = all_blocks[layers.start:layers.end]
        self.windows = [arch.window(cfg, i) for i in layers]  # as every backend has them
        # (kv_windows stays unset: a rotating cache keeps a whole prompt piece beside its
        # window until the next step, so every layer is counted at full length)
        self.kv_layer_bytes = position_kv_bytes(cfg, self.dtype.size)
        self.kv_step = KVCache.step  # mlx-lm's caches grow 256 positions at a time
        self.embed = inner.embed_tokens if layers.is_first else None
        self.norm = inner.norm if layers.is_last else None
        self.tied = bool(cfg.get("tie_word_embeddings")) or "lm_head" not in model
        self.lm_head = None
        if layers.is_last:
            self.lm_head = inner.embed_tokens if self.tied else model.lm_head
        self._load(source)
        # Gemma scales embeddings by sqrt(hidden). mlx-lm rounds the factor to bf16 first;
        # transformers keeps it in the weight dtype. Follow transformers so MLX and torch
        # stages agree in a mixed pipeline.
        self._embed_scale = (mx.array(self.hidden_size ** 0.5, self.dtype)
                             if arch.of(cfg).embed_scale else None)

    def _modules(self) -> dict[str, nn.Module]:
        """HF module paths owned by this shard -> module objects."""
        mods: dict[str, nn.Module] = {}
        for i, block in zip(self.layers, self.blocks):
            for name, mod in block.named_modules():
                mods[f"model.layers.{i}.{name}" if name else f"model.layers.{i}"] = mod
        if self.embed is not None or (self.tied and self.lm_head is not None):
            mods["model.embed_tokens"] = self.lm_head if self.embed is None else self.embed
        if self.norm is not None:
            mods["model.norm"] = self.norm
        if self.lm_head is not None and not self.tied:
            mods["lm_head"] = self.lm_head
        return mods

    def _load(self, source) -> None:
        mods = self._modules()
        replace: dict[str, nn.Module] = {}
        # each tensor is materialized, and the file's pages it read dropped, before the next:
        # left lazy, every fp32 scale and bias converted so far stayed alive until the end,
        # beside every page of the file read (Gemma 3: a 1,068 MB peak to hold 597 MB)
        release = getattr(source.reader, "release_pages", lambda: None)
        for name in source.tensor_names(self.layers):
            mod_path, attr = name.rsplit(".", 1)
            mod = mods.get(mod_path)
            if mod is None:
                continue
            q = (source.reader.read_quantized(name)
                 if self.quantized and attr == "weight" else None)
            aff = self._affine(q, name, source) if q is not None else None
            if aff is not None:
                release()  # converted: the file's pages are not needed for it
                new = _quantized_like(mod, aff.bits, aff.group)
                new.weight = mx.array(pack_bitstream(aff.q, aff.bits))
                # an mlx-lm folder's scales stay in the file's dtype (exact); GGUF's in fp16:
                # exact for the legacy types (fp16 d and m), a 2^-11 relative rounding for
                # K-quant sub-block scales; half the bytes of fp32
                sdt = getattr(mx, getattr(q, "scale_dtype", "float16"))
                new.scales = mx.array(aff.scales).astype(sdt)
                new.biases = mx.array(aff.biases).astype(sdt)
                replace[mod_path] = new
                mx.eval(new.weight, new.scales, new.biases)
            else:
                setattr(mod, attr, mx.array(source.reader.read(name)).astype(self.dtype))
                mx.eval(getattr(mod, attr))
                release()
        for path, new in replace.items():
            self._swap(path, new)
        params = [b.parameters() for b in self.blocks]
        for m in (self.embed, self.norm, self.lm_head):
            if m is not None:
                params.append(m.parameters())
        mx.eval(params)
        mx.clear_cache()  # the conversion's temporaries, kept by MLX's buffer cache

    def _affine(self, q, name: str, source) -> Affine | None:
        """The tensor in MLX's affine form: exact where the GGML type allows, else
        re-quantized to ``REQUANT_BITS`` (8) bits at group 32 (logged once per type)."""
        try:
            aff = affine_of(q)
        except ValueError:  # a type with no affine form (IQ*, Q2_K, Q3_K): 8-bit, said so
            aff = None
        if aff is not None and aff.group in _GROUPS:
            return aff
        w = aff.dequantize() if aff is not None else source.reader.read(name)
        if w.shape[1] % 32:
            return None
        if REQUANT_BITS not in ("4", "5", "6", "8"):
            from mesh.errors import InvalidRequest

            raise InvalidRequest(f"MESH_MLX_REQUANT_BITS must be 4, 5, 6 or 8, not "
                                 f"{REQUANT_BITS!r}")
        bits = int(REQUANT_BITS)
        if q.qtype not in self.requantized:
            self.requantized[q.qtype] = f"{bits}-bit, group 32"
            log.warning("mlx: %s has no exact MLX form; re-quantized to %d bits, group 32",
                        q.qtype, bits)
        return quantize_affine(w, bits, 32)

    def _swap(self, path: str, new: nn.Module) -> None:
        if path == "model.embed_tokens":
            if self.embed is not None:
                self.embed = new
            if self.tied and self.lm_head is not None:
                self.lm_head = new
            return
        if path == "lm_head":
            self.lm_head = new
            return
        parts = path.split(".")
        block = self.blocks[int(parts[2]) - self.layers.start]
        parent = block
        for p in parts[3:-1]:
            parent = getattr(parent, p)
        setattr(parent, parts[-1], new)

    def new_cache(self) -> MLXCache:
        # the cache kinds mlx-lm's make_cache would choose: rotating for sliding-window layers
        return MLXCache([KVCache() if w is None else RotatingKVCache(max_size=w)
                         for w in self.windows])

    def _head(self, h: mx.array) -> mx.array:
        if self.tied:
            return self.lm_head.as_linear(h)
        return self.lm_head(h)

    def _forward_one(self, item: StepItem) -> mx.array:
        if self.embed is not None:
            h = self.embed(mx.array(item.data.astype(np.int32))[None])  # (1, T, H)
            if self._embed_scale is not None:
                h = h * self._embed_scale
        else:
            h = mx.array(item.data)[None].astype(self.dtype)  # (1, T, H)
        caches = item.cache.caches
        masks: dict = {}
        for block, cache, window in zip(self.blocks, caches, self.windows):
            if window not in masks:
                masks[window] = create_attention_mask(h, cache, window_size=window)
            h = block(h, masks[window], cache=cache)
        if self.norm is None:
            return h[0] if h.dtype in (mx.float32, mx.float16) else h[0].astype(mx.float32)
        h = self.norm(h if item.all_logits else h[:, -1:])
        return self._head(h)[0].astype(mx.float32)  # (T or 1, V)

    def _forward_rows(self, items: Sequence[StepItem]) -> list[mx.array]:
        """Decode steps of several requests (one position each) as one forward: every weight
        is read once for all of them instead of once per request."""
        if self.embed is not None:
            h = self.embed(mx.array(np.array([[int(it.data[0])] for it in items], np.int32)))
            if self._embed_scale is not None:
                h = h * self._embed_scale
        else:
            h = mx.array(np.stack([np.asarray(it.data) for it in items])).astype(self.dtype)
        masks: dict = {}
        for layer, (block, window) in enumerate(zip(self.blocks, self.windows)):
            rows = _Rows([it.cache.caches[layer] for it in items])
            if window not in masks:  # each row sees its own keys, not the padding after them
                lengths = rows.lengths()
                span = mx.arange(max(lengths))
                masks[window] = (span[None, :] < mx.array(lengths)[:, None])[:, None, None, :]
            h = block(h, masks[window], cache=rows)
        if self.norm is None:
            return list(h if h.dtype in (mx.float32, mx.float16) else h.astype(mx.float32))
        return list(self._head(self.norm(h)).astype(mx.float32))  # (B, 1, V)

    def forward(self, items: Sequence[StepItem]) -> list[np.ndarray]:
        outs = batch_rows(items, self._forward_rows, self._forward_one, self.batch_invariant)
        mx.eval(outs)
        res = []
        for item, out in zip(items, outs):
            arr = np.array(out, copy=False)
            if self.norm is not None and not item.all_logits:
                arr = arr[-1]
            res.append(arr)
        return res


class _Rows:
    """One layer's caches of several requests, seen by mlx-lm's attention as one batch: each
    row's rotary offset is its own, ``update_and_fetch`` appends each row's new key and value
    to that row's cache and returns every row's keys and values right-padded to the longest
    (the mask hides the padding). The requests' caches stay theirs."""

    def __init__(self, caches: list):
        self.caches = caches

    @property
    def offset(self) -> mx.array:
        return mx.array([c.offset for c in self.caches])

    def lengths(self) -> list[int]:
        """Keys each row attends to after this step (a rotating cache: at most its window)."""
        return [min(c.offset + 1, c.max_size) if isinstance(c, RotatingKVCache)
                else c.offset + 1 for c in self.caches]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        outs = [c.update_and_fetch(keys[b:b + 1], values[b:b + 1])
                for b, c in enumerate(self.caches)]
        n = max(k.shape[2] for k, _ in outs)

        def pad(x):
            return x if x.shape[2] == n else mx.pad(x, [(0, 0), (0, 0), (0, n - x.shape[2]),
                                                        (0, 0)])
        return (mx.concatenate([pad(k) for k, _ in outs]),
                mx.concatenate([pad(v) for _, v in outs]))


def _quantized_like(mod: nn.Module, bits: int, group: int) -> nn.Module:
    if isinstance(mod, nn.Embedding):
        n, dims = mod.weight.shape
        return nn.QuantizedEmbedding(n, dims, group_size=group, bits=bits)
    out_dims, in_dims = mod.weight.shape
    return nn.QuantizedLinear(in_dims, out_dims, bias="bias" in mod, group_size=group,
                              bits=bits)
