"""A Llama-3.2-1B-shaped GGUF with random weights, for measuring memory and speed where a
135M model's fixed overheads would hide them.

Shape of Llama 3.2 1B (16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads, vocabulary
128,256, tied embedding) in llama.cpp's Q4_K_M type mix: Q4_K for q/k/o/gate/up, Q6_K for v
and down on every other layer (Q4_K on the rest), Q6_K for the embedding; norms in F32. The
blocks are random bytes with scales that give weights of a trained model's size (std
~0.02, mean 0), written with the ``gguf`` package (~0.8 GB).
It has no tokenizer: nodes, which only run layers, do not need one.

``--shape smollm2-1.7b`` writes SmolLM2 1.7B's shape instead (24 layers, hidden 2048, MLP
8192, 32 heads and 32 KV heads, vocabulary 49,152; ~1.0 GB), and ``--tokenizer-from GGUF``
copies another file's tokenizer (its ``tokenizer.*`` metadata: SmolLM2 135M's fits the 1.7B
shape), so ``mesh serve`` can serve the file through the API (random weights: the text is
noise, the speed is real).

    python benchmarks/synthetic.py [folder] [--shape S] [--tokenizer-from GGUF]
                                   # prints the file's path (built once)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SHAPES = {
    "llama-1b": dict(layers=16, hidden=2048, ffn=8192, heads=32, kv_heads=8, vocab=128256,
                     rope=500000.0),
    "smollm2-1.7b": dict(layers=24, hidden=2048, ffn=8192, heads=32, kv_heads=32,
                         vocab=49152, rope=130000.0),
}
VERSION = 2  # 2: weights of a trained model's size (1's overflowed float16)


def _blocks(rng, qtype: str, rows: int, cols: int) -> tuple[np.ndarray, object]:
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    per, size = gguf.GGML_QUANT_SIZES[t]
    b = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    # Scales that give weights of a trained model's size (std ~0.02, mean 0): random scale
    # bytes made weights up to ~2 with a mean per block, whose sums overflow float16
    if qtype == "Q4_K":  # d, dmin (fp16), then 12 bytes of 6-bit scales and mins
        b[..., 0:2] = np.array([2.6e-4], np.float16).view(np.uint8)
        b[..., 2:4] = np.array([7.5 * 2.6e-4], np.float16).view(np.uint8)
        b[..., 4:16] = 0x11  # scale = min = 17 (sub-blocks 0-3) or 1 (4-7): centred
    elif qtype == "Q6_K":  # 16 int8 scales before d (fp16), last; q - 32 is centred
        b[..., size - 18:size - 2] = 8
        b[..., size - 2:] = np.array([1.35e-4], np.float16).view(np.uint8)
    else:
        raise ValueError(qtype)
    return b.reshape(rows, -1), t


def copy_tokenizer(src: str, w) -> int:
    """Add ``src``'s tokenizer (every ``tokenizer.*`` field) to the writer ``w``; returns its
    vocabulary's size."""
    import gguf

    r = gguf.GGUFReader(src)
    n = 0
    for key, f in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub)
        if key == "tokenizer.ggml.tokens":
            n = len(f.data)
    return n


def tokenizer_only(src: str, dst: Path) -> Path:
    """A GGUF that holds nothing but ``src``'s tokenizer (~2 MB for SmolLM2's), to carry to a
    machine that has no model files: ``build(..., tokenizer_from=dst)`` reads it there."""
    import gguf

    w = gguf.GGUFWriter(str(dst), "llama")
    copy_tokenizer(src, w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def build(folder: Path, shape: str = "llama-1b", tokenizer_from: str | None = None) -> Path:
    """The file in ``folder`` (written once; a finished file is reused)."""
    import gguf

    s = SHAPES[shape]
    tag = "-tok" if tokenizer_from else ""
    path = Path(folder) / f"{shape}-shaped-q4_k_m{tag}-v{VERSION}.gguf"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_block_count(s["layers"])
    w.add_context_length(8192)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(s["rope"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s["vocab"])
    if tokenizer_from and copy_tokenizer(tokenizer_from, w) != s["vocab"]:
        raise ValueError(f"{tokenizer_from}'s tokenizer does not have {s['vocab']} tokens")
    hd = s["hidden"] // s["heads"]

    def add(name, qtype, rows, cols):
        blocks, t = _blocks(rng, qtype, rows, cols)
        w.add_tensor(name, blocks, raw_dtype=t)

    add("token_embd.weight", "Q6_K", s["vocab"], s["hidden"])
    w.add_tensor("output_norm.weight", np.ones(s["hidden"], np.float32))
    for i in range(s["layers"]):
        more = "Q6_K" if i % 2 == 0 else "Q4_K"
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(s["hidden"], np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(s["hidden"], np.float32))
        add(p + "attn_q.weight", "Q4_K", s["hidden"], s["hidden"])
        add(p + "attn_k.weight", "Q4_K", s["kv_heads"] * hd, s["hidden"])
        add(p + "attn_v.weight", more, s["kv_heads"] * hd, s["hidden"])
        add(p + "attn_output.weight", "Q4_K", s["hidden"], s["hidden"])
        add(p + "ffn_gate.weight", "Q4_K", s["ffn"], s["hidden"])
        add(p + "ffn_up.weight", "Q4_K", s["ffn"], s["hidden"])
        add(p + "ffn_down.weight", more, s["hidden"], s["ffn"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def source(folder: Path):
    """A ``ModelSource`` for the synthetic file."""
    from mesh.models.source import resolve

    return resolve(str(build(folder)), progress=False)


if __name__ == "__main__":
    import argparse

    from mesh.models import registry

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", nargs="?", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--tokenizer-from", default=None, metavar="GGUF")
    ap.add_argument("--tokenizer-only", default=None, metavar="OUT",
                    help="write only --tokenizer-from's tokenizer to OUT and stop")
    a = ap.parse_args()
    if a.tokenizer_only:
        print(tokenizer_only(a.tokenizer_from, Path(a.tokenizer_only)))
        sys.exit(0)
    print(build(Path(a.folder) if a.folder else registry.mesh_home() / "synthetic", a.shape,
                a.tokenizer_from))
