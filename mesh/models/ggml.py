"""GGML block formats -> group-wise affine form ``w = scale * q + bias``, exactly.

Every quantized matmul kernel the backends use (MLX's ``quantized_matmul``, ONNX Runtime's
``MatMulNBits``, torch's int4 pack) stores unsigned ``q`` with one scale and one bias (or zero
point) per group of consecutive weights in a row. The GGML types that real GGUF files use are
all of that form at group 32 (Q6_K: group 16), so the conversion loses nothing:

  Q4_0  w = d * (q - 8)                       4 bits, group 32
  Q4_1  w = d * q + m                         4 bits, group 32
  Q5_0  w = d * (q - 16)                      5 bits, group 32 (fifth bit in ``qh``)
  Q5_1  w = d * q + m                         5 bits, group 32
  Q8_0  w = d * q, q signed                   8 bits, group 32
  Q4_K  w = d*sc_j * q - dmin*m_j             4 bits, 8 sub-blocks of 32 per 256
  Q5_K  w = d*sc_j * q - dmin*m_j             5 bits, 8 sub-blocks of 32 per 256
  Q6_K  w = d*sc_j * (q - 32), sc_j int8      6 bits, 16 sub-blocks of 16 per 256

Block layouts follow ``ggml-quants.c`` (``dequantize_row_*``); ``tests/test_ggml.py`` checks
every type block by block against the ``gguf`` package's own dequantization. Scales and biases
are exact in float32 (a product of an fp16 and a 6-bit integer); a backend that keeps them in
fp16 rounds them, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256
# type -> (bits, group, bytes per block, weights per block)
FORMATS = {
    "Q4_0": (4, 32, 18, 32),
    "Q4_1": (4, 32, 20, 32),
    "Q5_0": (5, 32, 22, 32),
    "Q5_1": (5, 32, 24, 32),
    "Q8_0": (8, 32, 34, 32),
    "Q4_K": (4, 32, 144, QK_K),
    "Q5_K": (5, 32, 176, QK_K),
    "Q6_K": (6, 16, 210, QK_K),
}
# the types whose offset is a fixed multiple of the scale (w = d * (q - 2^(bits-1))): held
# in a signed container, they need no bias
SYMMETRIC = frozenset({"Q4_0", "Q5_0", "Q8_0", "Q6_K"})


@dataclass
class Affine:
    """``w[r, c] = scales[r, c // group] * q[r, c] + biases[r, c // group]``."""

    q: np.ndarray  # uint8 (rows, cols), values < 2 ** bits
    scales: np.ndarray  # float32 (rows, cols // group)
    biases: np.ndarray  # float32 (rows, cols // group)
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        rows, cols = self.q.shape
        g = self.q.reshape(rows, -1, self.group).astype(np.float32)
        return (g * self.scales[..., None] + self.biases[..., None]).reshape(rows, cols)

    @property
    def nbytes(self) -> int:
        """What the backends hold: packed q plus one scale and one bias per group."""
        return self.q.size * self.bits // 8 + (self.scales.size + self.biases.size) * 2


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float32 from little-endian fp16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K packed 6-bit scales and mins: (n, 12) uint8 -> two (n, 8) arrays."""
    sc = sc.astype(np.uint8)
    d = np.empty(sc.shape[:-1] + (8,), np.uint8)
    m = np.empty_like(d)
    d[..., :4] = sc[..., 0:4] & 63
    m[..., :4] = sc[..., 4:8] & 63
    d[..., 4:] = (sc[..., 8:12] & 0x0F) | ((sc[..., 0:4] >> 6) << 4)
    m[..., 4:] = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    return d.astype(np.float32), m.astype(np.float32)


def to_affine(qtype: str, blocks: np.ndarray, cols: int, chunk: int = 8192) -> Affine:
    """GGUF block rows ``(rows, bytes per row)`` of a ``(rows, cols)`` tensor -> ``Affine``,
    a chunk of rows at a time: the unpacking's temporaries are several times the tensor's
    size, and a 262,144-row embedding at once raised a load's peak memory by ~1 GB."""
    if qtype not in FORMATS:
        raise ValueError(f"no exact affine form for GGML type {qtype}")
    rows = blocks.shape[0]
    if rows <= chunk:
        return _to_affine(qtype, blocks, cols)
    bits, group = FORMATS[qtype][:2]
    q = np.empty((rows, cols), np.uint8)
    scales = np.empty((rows, cols // group), np.float32)
    biases = np.empty_like(scales)
    for r in range(0, rows, chunk):
        part = _to_affine(qtype, blocks[r:r + chunk], cols)
        q[r:r + chunk], scales[r:r + chunk], biases[r:r + chunk] = \
            part.q, part.scales, part.biases
    return Affine(q, scales, biases, bits, group)


def _to_affine(qtype: str, blocks: np.ndarray, cols: int) -> Affine:
    bits, group, size, per = FORMATS[qtype]
    rows = blocks.shape[0]
    nb = cols // per
    b = np.asarray(blocks, dtype=np.uint8).reshape(rows, nb, size)
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        d = _f16(b[..., 0:2])
        if qtype in ("Q4_1", "Q5_1"):
            m, at = _f16(b[..., 2:4]), 4
        else:
            m, at = None, 2
        if qtype == "Q8_0":
            q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            bias = -128.0 * d
        else:
            if qtype in ("Q5_0", "Q5_1"):
                qh = np.ascontiguousarray(b[..., at:at + 4]).view(np.uint32)[..., 0]
                at += 4
            qs = b[..., at:at + 16]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # weights 0..15, 16..31
            if qtype in ("Q5_0", "Q5_1"):
                high = (qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1
                q = q | (high.astype(np.uint8) << 4)
            offset = {"Q4_0": 8.0, "Q5_0": 16.0}.get(qtype)
            bias = m if offset is None else -offset * d
        scales = d
        return Affine(q.reshape(rows, cols), scales.astype(np.float32),
                      bias.astype(np.float32), bits, group)
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _scale_min_k4(b[..., 4:16])  # (rows, nb, 8)
        if qtype == "Q4_K":
            qs = b[..., 16:144].reshape(rows, nb, 4, 32)
        else:
            qh = b[..., 16:48]  # (rows, nb, 32)
            qs = b[..., 48:176].reshape(rows, nb, 4, 32)
        lo, hi = qs & 0x0F, qs >> 4  # sub-blocks 2j and 2j + 1
        q = np.stack([lo, hi], axis=3).reshape(rows, nb, 8, 32)
        if qtype == "Q5_K":
            shifts = np.arange(8, dtype=np.uint8)  # sub-block j takes bit j of qh
            q = q | (((qh[:, :, None, :] >> shifts[None, None, :, None]) & 1) << 4)
        scales = d[..., None] * sc
        bias = -(dmin[..., None] * mn)
        return Affine(q.reshape(rows, cols), scales.reshape(rows, -1).astype(np.float32),
                      bias.reshape(rows, -1).astype(np.float32), bits, group)
    # Q6_K: ql[128], qh[64], scales[16] int8, d fp16
    ql = b[..., 0:128].reshape(rows, nb, 2, 64)
    qh = b[..., 128:192].reshape(rows, nb, 2, 32)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)  # (rows, nb, 16)
    d = _f16(b[..., 208:210])
    q1 = (ql[..., :32] & 0x0F) | ((qh & 3) << 4)
    q2 = (ql[..., 32:] & 0x0F) | (((qh >> 2) & 3) << 4)
    q3 = (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4)
    q4 = (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)
    q = np.stack([q1, q2, q3, q4], axis=3)  # (rows, nb, half, 4, 32): 128 weights per half
    scales = (d[..., None] * sc).reshape(rows, -1)
    return Affine(q.reshape(rows, cols), scales.astype(np.float32),
                  (-32.0 * scales).astype(np.float32), bits, group)


def quantize_affine(w: np.ndarray, bits: int, group: int) -> Affine:
    """Round-to-nearest asymmetric quantization (min/max per group): for types a backend
    cannot hold exactly, re-quantized to at least their own bits."""
    rows, cols = w.shape
    levels = (1 << bits) - 1
    q = np.empty((rows, cols), dtype=np.uint8)
    scale = np.empty((rows, cols // group), dtype=np.float32)
    lo = np.empty_like(scale)
    step = max(1, (1 << 20) // cols)  # ~4 MB of float32 temporaries per chunk, not the matrix
    for r in range(0, rows, step):
        g = w[r:r + step].reshape(-1, cols // group, group).astype(np.float32)
        gl, gh = g.min(-1), g.max(-1)
        s = np.where(gh > gl, (gh - gl) / levels, 1.0).astype(np.float32)
        g -= gl[..., None]
        g /= s[..., None]
        np.rint(g, out=g)
        np.clip(g, 0, levels, out=g)
        q[r:r + step] = g.reshape(-1, cols)
        scale[r:r + step], lo[r:r + step] = s, gl
    return Affine(q, scale, lo, bits, group)


def pack_bitstream(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) values < 2**bits -> (rows, n * bits / 32) uint32, value i at bits
    [i*bits, (i+1)*bits) of the row's little-endian bit stream (MLX's layout)."""
    rows, n = q.shape
    if (n * bits) % 32:
        raise ValueError("a row must fill whole 32-bit words")
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if bits == 8:  # the bytes are the stream: a view (a copy doubled an 8-bit embedding)
        return q.view(np.uint32)
    if bits == 4:
        return (q[:, 0::2] | (q[:, 1::2] << 4)).view(np.uint32)
    out = np.empty((rows, n * bits // 32), dtype=np.uint32)
    step = max(1, (1 << 22) // max(1, n * bits))  # bound the bit matrix to ~4M entries
    shifts = np.arange(bits, dtype=np.uint8)
    for r in range(0, rows, step):
        bitmat = (q[r:r + step, :, None] >> shifts) & 1  # (rows, n, bits)
        stream = bitmat.reshape(bitmat.shape[0], -1)
        out[r:r + step] = np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)
    return out


def unpack_bitstream(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of ``pack_bitstream``: (rows, w) uint32 -> (rows, w * 32 / bits) uint8."""
    words = np.ascontiguousarray(words, dtype=np.uint32)
    b = words.view(np.uint8)  # little-endian words: the bit stream in byte order
    if bits == 8:
        return b.copy()
    if bits == 4:
        out = np.empty((b.shape[0], b.shape[1] * 2), dtype=np.uint8)
        out[:, 0::2], out[:, 1::2] = b & 0xF, b >> 4
        return out
    stream = np.unpackbits(b, axis=-1, bitorder="little")  # (rows, w * 32)
    vals = stream.reshape(b.shape[0], -1, bits)
    return (vals << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint16).astype(np.uint8)


def affine_of(q, rows=None) -> Affine:
    """A quantized tensor from a reader (``read_quantized``) in affine form, optionally only
    some of its rows: GGML blocks convert exactly (``to_affine``); MLX's own layout (packed
    words with per-group scales and biases) already is affine. Raises ``ValueError`` for a
    type with no affine form."""
    blocks = q.blocks if rows is None else q.blocks[rows]
    if q.qtype.startswith("MLX"):
        scales = q.scales if rows is None else q.scales[rows]
        biases = q.biases if rows is None else q.biases[rows]
        return Affine(unpack_bitstream(blocks, q.bits), np.asarray(scales, np.float32),
                      np.asarray(biases, np.float32), q.bits, q.group)
    return to_affine(q.qtype, blocks, q.shape[1])


def dequantize(qtype: str, blocks: np.ndarray, cols: int, chunk: int = 4096) -> np.ndarray:
    """GGUF block rows -> float32 ``(rows, cols)`` through the exact affine form, a chunk of
    rows at a time (bounded temporaries). Several times faster than ``gguf.quants.dequantize``
    on the K types (Gemma 3's fp32 load: 33 s -> a few)."""
    rows = blocks.shape[0]
    out = np.empty((rows, cols), dtype=np.float32)
    for r in range(0, rows, chunk):
        out[r:r + chunk] = to_affine(qtype, blocks[r:r + chunk], cols).dequantize()
    return out
