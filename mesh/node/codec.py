"""The one place arrays become wire tensors and back: raw bytes + shape + dtype, no pickle.

bfloat16 has no NumPy dtype; it travels as its 16-bit patterns (uint16) labelled "bfloat16" and
arrives as float32, so a receiver never needs a bf16-aware library.
"""

from __future__ import annotations

import math

import numpy as np

from mesh.node import mesh_pb2

_TO_NUMPY = {"float32": np.float32, "float16": np.float16, "int32": np.int32,
             "bfloat16": np.uint16}
MAX_ELEMENTS = 1 << 28  # refuse absurd shapes before allocating


class CodecError(ValueError):
    pass


def to_tensor(arr: np.ndarray, dtype: str | None = None) -> mesh_pb2.Tensor:
    """Encode ``arr``; ``dtype="bfloat16"`` sends float32 input as bf16 (round to nearest)."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return mesh_pb2.Tensor(data=rounded.tobytes(), shape=list(arr.shape), dtype="bfloat16")
    name = dtype or np.dtype(arr.dtype).name
    if name not in _TO_NUMPY or name == "bfloat16":
        raise CodecError(f"cannot send dtype {name}")
    data = np.ascontiguousarray(arr, dtype=_TO_NUMPY[name])
    return mesh_pb2.Tensor(data=data.tobytes(), shape=list(arr.shape), dtype=name)


def from_tensor(t: mesh_pb2.Tensor) -> np.ndarray:
    """Decode a wire tensor; raises CodecError on an unknown dtype or a size mismatch."""
    if t.dtype not in _TO_NUMPY:
        raise CodecError(f"unknown tensor dtype {t.dtype!r}")
    shape = tuple(int(d) for d in t.shape)
    if len(shape) > 4 or any(d < 0 or d > MAX_ELEMENTS for d in shape):
        raise CodecError(f"bad tensor shape {shape}")  # (0, 2^40) is 0 bytes, yet no array
    n = math.prod(shape)  # Python ints: a 2^64-element shape cannot wrap around to 0
    np_dtype = np.dtype(_TO_NUMPY[t.dtype])
    if n > MAX_ELEMENTS or len(t.data) != n * np_dtype.itemsize:
        raise CodecError(f"tensor of shape {shape} and dtype {t.dtype} needs "
                         f"{n * np_dtype.itemsize} bytes, got {len(t.data)}")
    try:
        arr = np.frombuffer(t.data, dtype=np_dtype).reshape(shape)
    except ValueError as exc:
        raise CodecError(f"tensor of shape {shape}: {exc}") from exc
    if t.dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr
