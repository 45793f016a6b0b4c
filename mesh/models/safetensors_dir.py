"""Read a Hugging Face model folder (config.json + *.safetensors) one tensor at a time.

The safetensors header gives each tensor's byte range, so a memory map reads only the tensors
asked for. (safetensors' own NumPy loader cannot return bfloat16, which most HF checkpoints use.)
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from mesh.errors import ModelSourceError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "U8": np.uint8, "I8": np.int8}


class SafetensorsDir:
    def __init__(self, folder: str | Path):
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

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def read(self, name: str) -> np.ndarray:
        f, entry, base = self._where[name]
        if f not in self._maps:
            self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        start, end = entry["data_offsets"]
        dtype = entry["dtype"]
        if dtype not in _DTYPES:
            raise ModelSourceError(f"{f.name}: tensor {name} has unsupported dtype {dtype}")
        raw = self._maps[f][base + start: base + end].view(_DTYPES[dtype])
        if dtype == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(raw.reshape(entry["shape"]), dtype=np.float32)

    def read_quantized(self, name: str):
        return None
