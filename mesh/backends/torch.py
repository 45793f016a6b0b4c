"""PyTorch shards built from transformers' own model classes.

A shard is the transformers base model (``LlamaModel``, ``Gemma3TextModel``, ...) built from a
config sliced to the shard's layers (``num_hidden_layers`` and ``layer_types`` cut to
``[start, end)``), so the library's masks, rotary embeddings and cache classes are used as is.
Parameters are created on the meta device and then assigned tensor by tensor from the reader:
the whole model is never materialised, and a middle shard holds no embedding.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Sequence

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from mesh.backends.base import Shard, ShardCache, StepItem, batch_rows, position_kv_bytes
from mesh.layers import LayerRange
from mesh.models import arch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchCache(ShardCache):
    def __init__(self, cache: DynamicCache):
        self.cache = cache
        self._offset = 0

    @property
    def offset(self) -> int:
        return self._offset

    def advance(self, n: int) -> None:
        self._offset += n

    def trim(self, n: int) -> int:
        n = min(n, self._offset)
        if n:
            if any(layer.is_sliding for layer in self.cache.layers):
                raise ValueError("this cache cannot be trimmed (sliding-window layers)")
            self.cache.crop(-n)
            self._offset -= n
        return n

    def fork(self) -> "TorchCache":
        import copy

        new = TorchCache(copy.deepcopy(self.cache))
        new._offset = self._offset
        return new

    @property
    def nbytes(self) -> int:
        total = 0
        for layer in self.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def hf_config(config: dict, layers: LayerRange | None = None):
    """A transformers config object, optionally cut down to one shard's layers."""
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    known = arch.ARCHITECTURES.get(model_type)
    if known is not None and known.two_rope_bases:
        # transformers 5 takes Gemma 3's two rope bases as per-layer-type parameters
        cfg["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": cfg.pop("rope_local_base_freq", 10000.0)},
        }
        scaling = cfg.pop("rope_scaling", None)
        if scaling:
            cfg["rope_parameters"]["full_attention"].update(scaling)
        cfg.pop("sliding_window_pattern", None)
    hf = AutoConfig.for_model(model_type, **cfg)
    if layers is not None:
        hf = copy.deepcopy(hf)
        types = getattr(hf, "layer_types", None)
        hf.num_hidden_layers = len(layers)
        if types:
            hf.layer_types = list(types[layers.start:layers.end])
    return hf


def resolve_dtype(dtype: str, device_type: str) -> tuple[str, str]:
    """(how the weights are held, the float dtype the shard computes in) for a ``--dtype``.

    gguf / int4: the layers' projections, the embedding and the head keep their file's
    blocks, exactly, in 8-bit containers (Int8Linear); with int4 (and on CUDA, where tinygemm
    computes it), the 4-bit projections in torch's int4 layout (Int4Linear). Float tensors
    and norms stay in the float dtype: fp32 on a CPU; on CUDA bf16, tinygemm's own (no casts
    around each int4 matmul). auto is gguf: the file's own precision (on a CPU ~0.6x fp32's
    memory, decode ~10-20% slower, docs/local.md; on an H200 0.36x float16's memory, decode as
    fast or faster, both bound by kernel launches there: ``python benchmarks/cuda.py``)."""
    if dtype == "auto":
        dtype = "gguf"
    if dtype in ("gguf", "int4"):
        return dtype, "bfloat16" if device_type == "cuda" else "float32"
    return dtype, dtype


class TorchShard(Shard):
    def __init__(self, source, layers: LayerRange, dtype: str = "auto", device: str | None = None):
        if dtype not in ("auto", "gguf", "int4", *_DTYPES):
            from mesh.errors import InvalidRequest

            raise InvalidRequest(f"the torch backend takes dtype auto, float32, float16, "
                                 f"bfloat16, gguf or int4; {dtype!r} is an onnxruntime "
                                 f"precision", param="dtype")
        # a row's sums depend on how many rows its matmuls hold: batch-invariant, every
        # request's decode step runs alone (its numbers never depend on its company)
        self.batch_invariant = os.environ.get("MESH_BATCH_INVARIANT", "0") == "1"
        self.layers = layers
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype, float_dtype = resolve_dtype(dtype, self.device.type)
        self.dtype = _DTYPES[float_dtype]
        self.blocks = dtype in ("gguf", "int4")
        self.int4 = dtype == "int4" or (self.blocks and self.device.type == "cuda")
        self._said: set[tuple[str, str]] = set()  # (how held, type): logged once each
        self.hidden_size = source.hidden_size
        self.vocab_size = source.vocab_size
        self.config = hf_config(source.config, layers)
        self.kv_layer_bytes = position_kv_bytes(source.config, self.dtype.itemsize)
        # transformers' DynamicCache keeps a sliding-window layer's last window positions
        self.kv_windows = tuple(arch.window(source.config, i) for i in layers)
        self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            full = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        self.model = full.model
        self.tied = bool(source.config.get("tie_word_embeddings"))
        self.lm_head = full.lm_head if layers.is_last and not self.tied else None
        if not layers.is_last:
            self.model.norm = torch.nn.Identity()
        self._load(source)
        self.model.eval()

    def _load(self, source) -> None:
        start = self.layers.start
        params = dict(self.model.named_parameters())
        if self.lm_head is not None:
            params["lm_head.weight"] = self.lm_head.weight
        embed_weight = embed_table = head_table = None
        release = getattr(source.reader, "release_pages", lambda: None)
        for name in source.tensor_names(self.layers):
            if self.blocks and name.startswith("model.layers.") and \
                    name.endswith("_proj.weight"):
                held = self._hold_blocks(source, name, start)
                if held:
                    release()  # the file's pages for it are not needed any more
                    continue
            if self.blocks and name in ("model.embed_tokens.weight", "lm_head.weight"):
                table = self._block_table(source, name)
                if table is not None:  # the embedding's rows and the head, in 8 bits
                    release()
                    if name == "lm_head.weight":
                        head_table = table
                        continue
                    embed_table = table
                    if self.layers.is_first:
                        scaled = hasattr(self.model.embed_tokens, "embed_scale")  # Gemma
                        self.model.embed_tokens = Int8Embedding(table, scaled)
                    continue
            arr = torch.from_numpy(source.reader.read(name)).to(self.device, self.dtype)
            if name.startswith("model.layers."):
                _, _, idx, rest = name.split(".", 3)
                local = f"layers.{int(idx) - start}.{rest}"
            elif name == "lm_head.weight":
                local = name
            else:
                local = name.removeprefix("model.")
            if name == "model.embed_tokens.weight":
                embed_weight = arr
                if not self.layers.is_first:
                    continue  # kept only for the tied head
            if local not in params:
                continue
            mod_path, attr = local.rsplit(".", 1)
            mod = self.lm_head if mod_path == "lm_head" else self.model.get_submodule(mod_path)
            setattr(mod, attr, torch.nn.Parameter(arr, requires_grad=False))
        # the head: a float matrix, or an Int8Linear (the file's blocks, in 8 bits)
        if self.layers.is_last and self.tied:
            self.head_weight = embed_weight if embed_table is None else embed_table
        elif self.layers.is_last:
            self.head_weight = self.lm_head.weight if head_table is None else head_table
        if not self.layers.is_first:
            self.model.embed_tokens = None
        # Buffers (rotary inv_freq, Gemma's embed_scale) were built on meta: rebuild them.
        self._rebuild_buffers()
        left = [n for n, p in self.model.named_parameters() if p.is_meta]
        if left:
            raise ValueError(f"weights missing from the model file: {', '.join(left[:5])}")

    @staticmethod
    def _blocks_of(source, name: str) -> tuple[str, object]:
        """(the tensor's type, its blocks in affine form, or None where torch keeps it in
        float: a float tensor, a type with no affine form or over 8 bits)."""
        from mesh.models.ggml import affine_of

        q = source.reader.read_quantized(name) if hasattr(source.reader,
                                                          "read_quantized") else None
        if q is None:
            return "float", None
        try:
            aff = affine_of(q)
        except ValueError:  # a type with no affine form
            return q.qtype, None
        if aff.bits > 8 or aff.q.shape[1] % aff.group:
            return q.qtype, None
        return q.qtype, aff

    def _hold_blocks(self, source, name: str, start: int) -> bool:
        """Hold projection ``name`` as its file's blocks: in an 8-bit container, or (int4)
        4-bit ones of a group torch's int4 kernel takes in its layout. False (the caller
        loads it in the float dtype) for a float tensor."""
        kind, aff = self._blocks_of(source, name)
        if aff is None:
            self._say_once("float", kind, "torch: %s projections stay in %s (no blocks to hold)",
                           kind, str(self.dtype).removeprefix("torch."))
            return False
        _, _, idx, rest = name.split(".", 3)
        path = f"layers.{int(idx) - start}.{rest.removesuffix('.weight')}"
        parent, child = path.rsplit(".", 1)
        old = self.model.get_submodule(path)
        if aff.bits == 4 and aff.group in (32, 64, 128) and self.int4 and \
                Int4Linear.fits(aff.q.shape, self.device):
            new = Int4Linear(aff, self.device, self.dtype)
        else:
            self._say_once("8-bit", kind, "torch: %s projections held in 8-bit containers "
                           "(group %d, exact)", kind, aff.group)
            new = Int8Linear(aff, self.device, self.dtype)
        if getattr(old, "bias", None) is not None:
            new.bias = old.bias  # loaded from its own tensor, in the float dtype
        setattr(self.model.get_submodule(parent), child, new)
        return True

    def _say_once(self, how: str, kind: str, *message) -> None:
        if (how, kind) not in self._said:
            self._said.add((how, kind))
            log.info(*message)

    def _block_table(self, source, name: str) -> "Int8Linear | None":
        """The embedding or head as its file's blocks in an 8-bit container (None: a float
        tensor, loaded as such)."""
        kind, aff = self._blocks_of(source, name)
        if aff is None:
            return None
        log.info("torch: %s held as its %s blocks in 8 bits", name, kind)
        return Int8Linear(aff, self.device, self.dtype)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        w = self.head_weight
        return w(h) if isinstance(w, torch.nn.Module) else torch.nn.functional.linear(h, w)

    def _rebuild_buffers(self) -> None:
        with torch.device(self.device):
            fresh = type(self.model.rotary_emb)(config=self.config)
        self.model.rotary_emb = fresh
        emb = self.model.embed_tokens
        if emb is not None and hasattr(emb, "embed_scale"):
            emb.embed_scale = torch.tensor(self.config.hidden_size ** 0.5, device=self.device,
                                           dtype=self.dtype)

    def new_cache(self) -> TorchCache:
        return TorchCache(DynamicCache(config=self.config))

    @torch.inference_mode()
    def _forward_one(self, item: StepItem) -> torch.Tensor:
        cache: TorchCache = item.cache
        n = item.data.shape[0]
        pos = torch.arange(cache.offset, cache.offset + n, device=self.device)[None]
        if self.layers.is_first:
            ids = torch.from_numpy(item.data.astype(np.int64)).to(self.device)[None]
            kwargs = {"input_ids": ids}
        else:
            data = np.require(item.data, requirements=["C", "W"])  # wire buffers are read-only
            h = torch.from_numpy(data).to(self.device, self.dtype)[None]
            kwargs = {"inputs_embeds": h}
        out = self.model(**kwargs, past_key_values=cache.cache, use_cache=True,
                         position_ids=pos).last_hidden_state  # (1, T, H)
        cache.advance(n)
        if not self.layers.is_last:
            return out[0]
        h = out[0] if item.all_logits else out[0, -1]
        return self._head(h).float()  # (T, V) or (V,)

    @torch.inference_mode()
    def _forward_rows(self, items: Sequence[StepItem]) -> list[torch.Tensor]:
        """Decode steps of several requests (one position each) as one forward: every weight
        is read once for all of them instead of once per request."""
        caches: list[TorchCache] = [item.cache for item in items]
        pos = torch.tensor([[c.offset] for c in caches], device=self.device)
        if self.layers.is_first:
            ids = np.array([[int(item.data[0])] for item in items], dtype=np.int64)
            kwargs = {"input_ids": torch.from_numpy(ids).to(self.device)}
        else:
            h = np.stack([np.asarray(item.data, dtype=np.float32) for item in items])
            kwargs = {"inputs_embeds": torch.from_numpy(h).to(self.device, self.dtype)}
        rows = _Rows([c.cache for c in caches])
        out = self.model(**kwargs, past_key_values=rows, use_cache=True, position_ids=pos,
                         attention_mask=self._row_masks(rows)).last_hidden_state  # (B, 1, H)
        for c in caches:
            c.advance(1)
        if not self.layers.is_last:
            return list(out)
        return list(self._head(out[:, -1]).float())

    def _row_masks(self, rows: "_Rows"):
        """What each row of a batched decode step attends to: its own keys, not the padding
        after them. Per layer type (a sliding layer's cache holds at most its window)."""
        types = list(getattr(self.config, "layer_types", None) or ["full_attention"])
        masks = {}
        for kind in dict.fromkeys(types):
            layer = types.index(kind)
            lengths = torch.tensor([rows.held(c, layer) + 1 for c in rows.caches],
                                   device=self.device)
            span = torch.arange(int(lengths.max()), device=self.device)
            masks[kind] = (span[None, :] < lengths[:, None])[:, None, None, :]
        # models with sliding layers take a mask per layer type (Gemma 3); others one mask
        return masks if "sliding_attention" in masks else masks[types[0]]

    def forward(self, items: Sequence[StepItem]) -> list[np.ndarray]:
        outs = batch_rows(items, self._forward_rows, self._forward_one, self.batch_invariant)
        return [(o.float() if o.dtype == torch.bfloat16 else o).cpu().numpy() for o in outs]


class Int4Linear(torch.nn.Module):
    """A projection held as its GGUF's 4-bit blocks, exactly: ``w = scale * q + bias`` per
    group (``mesh.models.ggml``) is torch's int4 layout ``w = (q - 8) * scale + zero`` with
    ``zero = bias + 8 * scale``. On the CPU ``_weight_int4pack_mm_for_cpu`` with the fp32
    scales; on CUDA tinygemm's ``_weight_int4pack_mm``, which takes bf16 scales and
    activations (on an H200 within 3-5e-3 of a float16 matmul on the same weight, relative
    to its largest output: bf16's rounding; ``python benchmarks/cuda.py``)."""

    def __init__(self, aff, device: torch.device, dtype: torch.dtype):
        super().__init__()
        n, k = aff.q.shape
        self.in_features, self.out_features, self.group = k, n, aff.group
        scales = torch.from_numpy(np.ascontiguousarray(aff.scales, np.float32))
        zeros = torch.from_numpy(np.ascontiguousarray(aff.biases + 8 * aff.scales, np.float32))
        pairs = torch.stack([scales.t(), zeros.t()], -1).contiguous()  # (k / group, n, 2)
        q = torch.from_numpy(np.ascontiguousarray(aff.q))
        self.on_cuda = device.type == "cuda"  # (nn.Module.cuda is a method)
        if self.on_cuda:
            nibbles = ((q[:, ::2] << 4) | q[:, 1::2]).to(device)  # (n, k / 2) uint8
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(
                nibbles, self.k_tiles(k)))
            self.register_buffer("pairs", pairs.to(device, torch.bfloat16))
        else:
            self.register_buffer("packed",
                                 torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2))
            self.register_buffer("pairs", pairs.to(dtype))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.on_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), self.packed,
                                                   self.group, self.pairs).to(x.dtype)
        elif x2.shape[0] > 1 and self.unpackable:
            y = torch.nn.functional.linear(x2, self.dequantized())
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.pairs)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @staticmethod
    def k_tiles(k: int) -> int | None:
        """tinygemm's inner k tiles for ``k`` input features (CUDA): the most of 8, 4, 2
        whose 16 columns each divide ``k`` (SmolLM2's 576 takes 4), None if none does."""
        return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)

    @classmethod
    def fits(cls, shape: tuple[int, int], device: torch.device) -> bool:
        """Whether an (n, k) weight packs into the int4 layout on ``device`` (CUDA: n a
        multiple of 8 and k of 32; the CPU layout takes any shape)."""
        n, k = shape
        return device.type != "cuda" or (n % 8 == 0 and cls.k_tiles(k) is not None)

    @property
    def unpackable(self) -> bool:
        """Whether ``dequantized`` reads this weight's CPU layout."""
        block = _cpu_int4_block()
        return block is not None and self.out_features % block == 0

    def dequantized(self) -> torch.Tensor:
        """The weight in the scales' dtype, unpacked from the CPU int4 layout (blocks of
        ``_cpu_int4_block()`` output rows: a byte holds row r's nibble low and row r + half's
        high, k-major). torch's CPU int4 kernel computes one activation row at a time (on
        AVX2: 1 ms per 1536 x 576 row), so a prompt piece or a batch of decode rows is
        faster through this temporary and one fp32 matmul (2 ms for 64 rows)."""
        n, k, g = self.out_features, self.in_features, self.group
        block = _cpu_int4_block()
        nb, half = n // block, block // 2
        nibbles = self.packed.view(nb, k, half).transpose(1, 2)  # (nb, half, k)
        scales = self.pairs[..., 0].t().reshape(nb, 2, half, k // g, 1)
        biases = self.pairs[..., 1].t().reshape(nb, 2, half, k // g, 1) - 8 * scales
        w = torch.empty((nb, 2, half, k // g, g), dtype=self.pairs.dtype)
        for i, q in enumerate((nibbles & 15, nibbles >> 4)):
            torch.addcmul(biases[:, i], q.reshape(nb, half, k // g, g), scales[:, i],
                          out=w[:, i])
        return w.view(n, k)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


_INT4_BLOCK: list[int | None] = []


def _cpu_int4_block() -> int | None:
    """How many output rows torch's CPU int4 layout packs together (it depends on the CPU's
    vector width), found once by packing a probe; None when the layout is not one
    ``Int4Linear.dequantized`` reads (then every row goes through torch's kernel)."""
    if not _INT4_BLOCK:
        q = torch.randint(0, 16, (256, 64), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        found = None
        for block in (32, 64, 16):
            nibbles = packed.reshape(256 // block, 64, block // 2)
            rows = torch.cat([nibbles & 15, nibbles >> 4], -1).permute(0, 2, 1)
            if torch.equal(rows.reshape(256, 64).to(torch.int32), q):
                found = block
                break
        _INT4_BLOCK.append(found)
    return _INT4_BLOCK[0]


class Int8Linear(torch.nn.Module):
    """A projection held as its GGUF's blocks (any type up to 8 bits) in an 8-bit container,
    exactly: ``w = scale * q + bias`` per group. The symmetric types (Q4_0, Q5_0, Q6_K,
    Q8_0: ``bias = -2 ** (bits - 1) * scale``) keep ``q`` centred in int8 and no bias. Every
    call unpacks the weight (one projection at a time) for one matmul in the float dtype:
    a byte a weight read instead of fp32's four, then an unpacking pass. ``python
    benchmarks/backends.py --configs torch:float32 torch:gguf torch:int4`` on this AVX2 CPU:
    SmolLM2 decodes at 14.4 / 10.5 / 6.5 tok/s (docs/local.md); torch's own int8 kernel
    takes one scale a row, not a group, and is slower than fp32 anyway (``python
    benchmarks/torch_quant.py``)."""

    def __init__(self, aff, device: torch.device, dtype: torch.dtype):
        super().__init__()
        n, k = aff.q.shape
        self.in_features, self.out_features, self.group = k, n, aff.group
        zero = 1 << (aff.bits - 1)
        scales = np.ascontiguousarray(aff.scales, np.float32)
        symmetric = np.array_equal(aff.biases, (-zero * scales).astype(np.float32))
        q = aff.q.astype(np.int16) - zero if symmetric else aff.q
        self.register_buffer("q", torch.from_numpy(
            np.ascontiguousarray(q, np.int8 if symmetric else np.uint8)).to(device))
        shape = (n, k // aff.group, 1)
        self.register_buffer("scales", torch.from_numpy(scales).reshape(shape).to(device, dtype))
        biases = None if symmetric else torch.from_numpy(
            np.ascontiguousarray(aff.biases, np.float32)).reshape(shape).to(device, dtype)
        self.register_buffer("biases", biases)
        self.bias = None

    CHUNK = 1024  # output rows unpacked at a time for a big matrix (a head)

    def dequantized(self, rows=slice(None)) -> torch.Tensor:
        """The weight's ``rows`` (a slice, or ids) in the float dtype."""
        k, g = self.in_features, self.group
        q = self.q[rows]
        w = q.view(-1, k // g, g).to(self.scales.dtype).mul_(self.scales[rows])
        if self.biases is not None:
            w.add_(self.biases[rows])  # (in place: addcmul broadcasting measured 2-10x slower)
        return w.view(-1, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.out_features
        if n <= 4 * self.CHUNK:
            y = torch.nn.functional.linear(x, self.dequantized().to(x.dtype))
        else:  # a piece at a time, so that each stays in the cache while it is used (a
            # 262,144-row head unpacked whole: 471 ms a token, fp32 71, by pieces 58; ad hoc)
            y = x.new_empty((*x.shape[:-1], n))
            for r in range(0, n, self.CHUNK):
                part = slice(r, min(r + self.CHUNK, n))
                y[..., part] = torch.nn.functional.linear(x, self.dequantized(part).to(x.dtype))
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Int8Embedding(torch.nn.Module):
    """The token embedding read from an ``Int8Linear`` (the file's blocks in 8 bits): a
    lookup unpacks only the rows it takes; the same table is the tied head. ``scaled``:
    the model multiplies embeddings by ``embed_scale`` (Gemma; set with the buffers)."""

    def __init__(self, table: Int8Linear, scaled: bool):
        super().__init__()
        self.table = table
        if scaled:
            self.embed_scale = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantized(input_ids.reshape(-1))
        rows = rows.view(*input_ids.shape, self.table.in_features)
        scale = getattr(self, "embed_scale", None)
        return rows if scale is None else rows * scale.to(rows.dtype)


class _Rows:
    """Several requests' own caches, seen by transformers' attention as one batch: a layer's
    update appends each row's new key and value to that row's cache and returns every row's
    keys and values, right-padded to the longest (``TorchShard._row_masks`` hides the
    padding). The requests' caches stay theirs: trim, fork and release work as before."""

    def __init__(self, caches: list[DynamicCache]):
        self.caches = caches

    @staticmethod
    def held(cache: DynamicCache, layer: int) -> int:
        """Positions ``layer`` of ``cache`` holds (a sliding layer: at most its window)."""
        if layer >= len(cache.layers):
            return 0
        keys = getattr(cache.layers[layer], "keys", None)
        return 0 if not isinstance(keys, torch.Tensor) or keys.dim() < 3 else keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [c.update(key_states[b:b + 1], value_states[b:b + 1], layer_idx)
                for b, c in enumerate(self.caches)]
        n = max(k.shape[-2] for k, _ in outs)
        if all(k.shape[-2] == n for k, _ in outs):
            return torch.cat([k for k, _ in outs]), torch.cat([v for _, v in outs])
        b, heads, _, dim = key_states.shape
        keys = key_states.new_zeros((b, heads, n, dim))
        values = value_states.new_zeros((b, value_states.shape[1], n, value_states.shape[-1]))
        for i, (k, v) in enumerate(outs):
            keys[i, :, :k.shape[-2]] = k[0]
            values[i, :, :v.shape[-2]] = v[0]
        return keys, values

