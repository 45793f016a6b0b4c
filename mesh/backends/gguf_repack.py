"""Repack GGUF Q4_0 / Q4_1 / Q8_0 blocks into MLX's affine quantized layout, exactly.

GGUF blocks hold 32 weights with one fp16 scale ``d`` (and for Q4_1 a minimum ``m``):
  Q4_0: w = d * (q - 8)      Q4_1: w = d * q + m      Q8_0: w = d * q  (q signed)
MLX's affine format stores unsigned ``q`` packed little-endian into uint32 words with one
scale and one bias per group: w = scale * q + bias. With group size 32 the two forms are the
same numbers, so the repack loses nothing (see ggml-quants.c for the block layouts).
"""

from __future__ import annotations

import numpy as np

GROUP_SIZE = 32
REPACKABLE = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(rows, blocks, 16) bytes -> (rows, blocks, 32) values in weight order."""
    lo = qs & 0x0F  # weights 0..15 of the block
    hi = qs >> 4  # weights 16..31
    return np.concatenate([lo, hi], axis=-1)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) unsigned values < 2**bits -> (rows, n * bits / 32) uint32, low bits first."""
    per_word = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0], -1, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(q << shifts, axis=-1)


def repack(qtype: str, blocks: np.ndarray, cols: int):
    """GGUF block rows (rows, bytes) -> (weight uint32, scales f32, biases f32, bits)."""
    rows = blocks.shape[0]
    nb = cols // GROUP_SIZE
    if qtype == "Q4_0":
        b = blocks.reshape(rows, nb, 18)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = _nibbles(b[..., 2:])
        scales, biases = d, -8.0 * d
    elif qtype == "Q4_1":
        b = blocks.reshape(rows, nb, 20)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        q = _nibbles(b[..., 4:])
        scales, biases = d, m
    elif qtype == "Q8_0":
        b = blocks.reshape(rows, nb, 34)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        scales, biases = d, -128.0 * d
    else:
        raise ValueError(f"{qtype} cannot be repacked exactly; dequantize it instead")
    bits = REPACKABLE[qtype]
    weight = _pack(q.reshape(rows, cols), bits)
    return weight, scales.astype(np.float32), biases.astype(np.float32), bits


def unpack(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    """MLX affine layout back to float32, for tests."""
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    q = (weight[..., None] >> shifts) & ((1 << bits) - 1)
    q = q.reshape(weight.shape[0], -1).astype(np.float32)
    g = q.reshape(q.shape[0], -1, GROUP_SIZE)
    return (g * scales[..., None] + biases[..., None]).reshape(q.shape)
