"""Read a Hugging Face model folder (config.json + *.safetensors) one tensor at a time.

The safetensors header gives each tensor's byte range, so a memory map reads only the tensors
asked for. (safetensors' own NumPy loader cannot return bfloat16, which most HF checkpoints use.)

Folders quantized by mlx-lm (``mlx_lm.convert -q``: a ``quantization`` entry in config.json,
each quantized ``X.weight`` packed into uint32 words beside ``X.scales`` and ``X.biases``) read
as quantized tensors (``read_quantized``: MLX keeps them as they are, ONNX Runtime builds
MatMulNBits from them) or, through ``read``, dequantized. Only mlx-lm's ``affine`` mode.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mesh.errors import ModelSourceError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "U8": np.uint8, "I8": np.int8, "U32": np.uint32}


@dataclass
class MLXQuantized:
    """A tensor in mlx-lm's quantized layout (``w = scales * q + biases`` per group)."""

    qtype: str  # "MLX4", "MLX8", ...
    shape: tuple[int, int]  # the logical (rows, cols)
    blocks: np.ndarray  # uint32 words (rows, cols * bits / 32), MLX's bit stream
    scales: np.ndarray  # (rows, cols / group), float32
    biases: np.ndarray
    bits: int
    group: int
    scale_dtype: str  # the file's: "float32", "float16" or "bfloat16"


class SafetensorsDir:
    def __init__(self, folder: str | Path, quantization: dict | None = None):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelSourceError(f"{self.folder} has no *.safetensors files")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for f in files:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self._where[name] = (f, entry, 8 + n)
        self._quant: dict[str, tuple[int, int]] = {}  # "X.weight" -> (bits, group)
        if quantization:
            self._index_quantized(quantization)

    def _index_quantized(self, qcfg: dict) -> None:
        mode = qcfg.get("mode", "affine")
        if mode != "affine":
            raise ModelSourceError(f"{self.folder}: mlx-lm quantization mode {mode!r} is not "
                                   f"supported (only 'affine')", param="model")
        for name, (_, entry, _) in self._where.items():
            if not name.endswith(".weight") or entry["dtype"] != "U32":
                continue
            module = name[: -len(".weight")]
            if module + ".scales" not in self._where:
                continue
            own = qcfg.get(module)
            spec = own if isinstance(own, dict) else qcfg
            bits, group = int(spec.get("bits", 0)), int(spec.get("group_size", 0))
            rows, words = entry["shape"]
            groups = self._where[module + ".scales"][1]["shape"][-1]
            if bits <= 0 or group <= 0 or words * 32 // bits != groups * group:
                raise ModelSourceError(
                    f"{self.folder}: {name} does not match its quantization "
                    f"({bits} bits, group {group}: {words} words, {groups} groups a row)",
                    param="model")
            self._quant[name] = (bits, group)

    def names(self) -> list[str]:
        hidden = {m[: -len("weight")] + k for m in self._quant for k in ("scales", "biases")}
        return [n for n in self._where if n not in hidden]

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self._where[name][1]["shape"])
        if name in self._quant:
            return (shape[0], shape[1] * 32 // self._quant[name][0])
        return shape

    def info(self, name: str):
        """``n_bytes``: what the file stores for ``name`` (scales and biases included)."""
        from types import SimpleNamespace

        parts = [name]
        if name in self._quant:
            parts += [name[: -len("weight")] + k for k in ("scales", "biases")]
        return SimpleNamespace(n_bytes=sum(e["data_offsets"][1] - e["data_offsets"][0]
                                           for e in (self._where[p][1] for p in parts)))

    def _raw(self, name: str) -> np.ndarray:
        f, entry, base = self._where[name]
        if f not in self._maps:
            self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        start, end = entry["data_offsets"]
        dtype = entry["dtype"]
        if dtype not in _DTYPES:
            raise ModelSourceError(f"{f.name}: tensor {name} has unsupported dtype {dtype}")
        return self._maps[f][base + start: base + end].view(_DTYPES[dtype]).reshape(
            entry["shape"])

    def _float(self, name: str) -> np.ndarray:
        raw = self._raw(name)
        if self._where[name][1]["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(raw, dtype=np.float32)

    def read(self, name: str) -> np.ndarray:
        if name in self._quant:
            from mesh.models.ggml import affine_of

            return affine_of(self.read_quantized(name)).dequantize()
        return self._float(name)

    def read_quantized(self, name: str) -> MLXQuantized | None:
        if name not in self._quant:
            return None
        bits, group = self._quant[name]
        module = name[: -len("weight")]
        sdtype = {"F16": "float16", "BF16": "bfloat16"}.get(
            self._where[module + "scales"][1]["dtype"], "float32")
        return MLXQuantized(f"MLX{bits}", self.shape(name), self._raw(name),
                            self._float(module + "scales"), self._float(module + "biases"),
                            bits, group, sdtype)
