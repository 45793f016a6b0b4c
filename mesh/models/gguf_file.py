"""Read a GGUF file one layer at a time, under Hugging Face tensor names.

Opening a GGUF with ``gguf.GGUFReader`` parses every tensor record (2-11 s here), so the first
open writes a small JSON index (metadata + tensor offsets) under MESH_HOME and later opens read
that instead. Tensor bytes are memory-mapped: reading layers 10-19 touches only their pages.

Two llama.cpp conventions are undone so that every backend sees Hugging Face weights:
- Llama's Q/K projection rows are permuted for llama.cpp's rotary layout
  (``convert_hf_to_gguf.py``, ``LlamaModel.permute``);
- Gemma stores RMSNorm weights with +1 folded in (``norm_shift``).
Which architecture has which (and its tensor names): ``mesh.models.arch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mesh.errors import ModelSourceError, UnsupportedModel
from mesh.models import arch as archs
from mesh.models import ggml

log = logging.getLogger(__name__)

INDEX_VERSION = 1

_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class TensorInfo:
    gguf_name: str
    qtype: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # numpy order: (rows, cols) for matrices
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor still in its GGUF block format, rows already in Hugging Face order."""

    qtype: str  # "Q4_0", "Q4_1", "Q8_0", ...
    shape: tuple[int, int]
    blocks: np.ndarray  # uint8, (rows, bytes_per_row)


def file_key(path: Path) -> str:
    """Names a file's caches: changes when the file is replaced or edited."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def _index_path(path: Path, cache_dir: Path) -> Path:
    return cache_dir / f"{file_key(path)}.json"


def _build_index(path: Path) -> dict:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct.error/... on a bad file
        raise ModelSourceError(f"{path} is not a readable GGUF file: {exc}") from exc
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if len(field.data) > 1024:  # token lists, merges, scores: the tokenizer cache keeps them
            continue
        try:
            metadata[key] = field.contents()
        except Exception:  # an exotic field type we do not need
            continue
    tensors = {
        t.name: {
            "qtype": int(t.tensor_type),
            "shape": [int(d) for d in reversed(t.shape.tolist())],
            "offset": int(t.data_offset),
            "n_bytes": int(t.n_bytes),
        }
        for t in reader.tensors
    }
    return {"version": INDEX_VERSION, "metadata": metadata, "tensors": tensors}


class GGUFFile:
    """A GGUF file's metadata and tensors, with tensors addressed by Hugging Face names."""

    def __init__(self, path: str | Path, cache_dir: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelSourceError(f"no such GGUF file: {self.path}")
        index_file = _index_path(self.path, cache_dir)
        index = None
        if index_file.exists():
            index = json.loads(index_file.read_text())
            if index.get("version") != INDEX_VERSION:
                index = None
        if index is None:
            index = _build_index(self.path)
            index_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = index_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(index))
            tmp.replace(index_file)
        self.metadata: dict = index["metadata"]
        arch = self.metadata.get("general.architecture")
        try:
            self.architecture = archs.by_gguf(arch)
        except UnsupportedModel as e:
            raise UnsupportedModel(f"{self.path.name}: {e}") from None
        self.arch = arch
        self.model_type = self.architecture.model_type
        self._permute_qk = self.architecture.permute_qk
        self._norm_shift = self.architecture.norm_shift
        self._tensors: dict[str, TensorInfo] = {}
        names = self.architecture.layer_names
        for gname, t in index["tensors"].items():
            hf = _hf_name(gname, names)
            if hf is not None:
                self._tensors[hf] = TensorInfo(gname, t["qtype"], tuple(t["shape"]),
                                               t["offset"], t["n_bytes"])
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def release_pages(self) -> None:
        """Drop this process's resident pages of the file. Building a shard reads every
        tensor through the mapping, and those pages would stay counted in the process's
        memory beside the backend's own copy; later reads (embedding rows) fault back in
        from the page cache. The data never changes: the mapping is read-only."""
        mm = getattr(self._mmap, "_mmap", None)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if mm is not None and advice is not None:
            try:
                mm.madvise(advice)
            except (OSError, ValueError):
                pass

    def meta(self, key: str, default=None):
        return self.metadata.get(f"{self.arch}.{key}", default)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def _raw(self, info: TensorInfo) -> np.ndarray:
        return self._mmap[info.offset: info.offset + info.n_bytes]

    def _fix_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's Q/K row permutation (works on float rows and block rows alike)."""
        if not self._permute_qk:
            return rows
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            heads = self.meta("attention.head_count")
        elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            heads = self.meta("attention.head_count_kv") or self.meta("attention.head_count")
        else:
            return rows
        n = rows.shape[0]
        tail = rows.shape[1:]
        return (rows.reshape(heads, n // heads // 2, 2, *tail)
                .swapaxes(1, 2).reshape(n, *tail))

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32, Hugging Face layout and conventions."""
        import gguf

        info = self._tensors[name]
        qtype = gguf.GGMLQuantizationType(info.qtype)
        raw = self._raw(info)
        fresh = qtype != gguf.GGMLQuantizationType.F32  # decoding made a new array
        if qtype == gguf.GGMLQuantizationType.F32:
            arr = raw.view(np.float32).reshape(info.shape)
        elif qtype == gguf.GGMLQuantizationType.F16:
            arr = raw.view(np.float16).reshape(info.shape).astype(np.float32)
        elif qtype == gguf.GGMLQuantizationType.BF16:
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            arr = arr.reshape(info.shape)
        else:
            rows = info.shape[0] if len(info.shape) > 1 else 1
            blocks = raw.reshape(rows, -1)
            if qtype.name in ggml.FORMATS:
                arr = ggml.dequantize(qtype.name, blocks, int(np.prod(info.shape)) // rows)
            else:
                arr = gguf.quants.dequantize(blocks, qtype)
            arr = arr.reshape(info.shape)
        arr = self._fix_rows(name, arr)
        if self._norm_shift and name.endswith("norm.weight"):
            arr = arr - np.float32(self._norm_shift)
        if fresh and arr.flags.c_contiguous and arr.dtype == np.float32:
            return arr  # already a new array (copying 1 GB again costs seconds of page faults)
        return np.array(arr, dtype=np.float32, order="C")  # a writable copy, not the map

    def read_quantized(self, name: str) -> QuantizedTensor | None:
        """The tensor's GGUF blocks (rows in HF order), or None for unquantized tensors."""
        import gguf

        info = self._tensors[name]
        qtype = gguf.GGMLQuantizationType(info.qtype)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                     gguf.GGMLQuantizationType.BF16) or len(info.shape) != 2:
            return None
        blocks = self._raw(info).reshape(info.shape[0], -1)
        return QuantizedTensor(qtype.name, info.shape, self._fix_rows(name, blocks))


def _hf_name(gname: str, names: dict[str, str]) -> str | None:
    if gname in archs.GLOBAL_NAMES:
        return archs.GLOBAL_NAMES[gname]
    m = _BLOCK.match(gname)
    if not m or m.group(2) not in names:
        return None
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


def hf_config(g: GGUFFile) -> dict:
    """A Hugging Face config.json equivalent built from GGUF metadata."""
    heads = g.meta("attention.head_count")
    hidden = g.meta("embedding_length")
    head_dim = g.meta("attention.key_length") or g.meta("rope.dimension_count") or hidden // heads
    vocab = g.meta("vocab_size") or g.info("model.embed_tokens.weight").shape[0]
    cfg = {
        "model_type": g.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": g.meta("block_count"),
        "intermediate_size": g.meta("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": g.meta("attention.head_count_kv") or heads,
        "head_dim": head_dim,
        "rms_norm_eps": g.meta("attention.layer_norm_rms_epsilon"),
        "rope_theta": g.meta("rope.freq_base", 10000.0),
        "max_position_embeddings": g.meta("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": "lm_head.weight" not in g.names(),
        "bos_token_id": g.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.metadata.get("tokenizer.ggml.eos_token_id"),
    }
    cfg.update(archs.gguf_config_extras(g.model_type, cfg["num_hidden_layers"], head_dim,
                                        g.meta))
    return cfg
