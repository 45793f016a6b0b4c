"""Build an ONNX Runtime graph for layers ``[start, end)`` straight from a model's tensors.

No torch export: the graph is written with ``onnx.helper`` in the layout onnxruntime-genai's
model builder uses, from ONNX Runtime's fused CPU/CUDA operators:

- ``MatMulNBits`` for every projection and the output head, built from the GGUF blocks as
  they are (``mesh.models.ggml``): 4-bit types stay 4-bit; 5-, 6- and 8-bit types are held in
  8-bit containers (exact: MatMulNBits has no 5/6-bit form). Where a type's per-group offset
  is not an integer zero point (Q4_1, Q4_K, Q5_K: ``w = s*q + m``), the offset's share is
  added as ``blocksum(x) @ M`` (a (T, K/32) x (K/32, N) matmul), which keeps the
  conversion exact and the fast integer kernel;
- ``GroupQueryAttention`` with rotary embedding fused and one KV buffer per layer that is
  both past and present (bound to the same OrtValue), so a decode step appends in place
  instead of concatenating the whole past;
- ``SimplifiedLayerNormalization`` (RMSNorm).

Architectures: Llama, Mistral, Qwen2, Qwen3 and Gemma 3 (sandwich norms, 1 + w norm weights,
tanh-GELU, per-layer-type RoPE base, sliding-window layers, q/k norms). The first shard's
embedding lookup runs in NumPy on the quantized rows (``QuantizedEmbedding``), so the graph
always starts from hidden states and a tied head shares nothing it would have to copy.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mesh.errors import UnsupportedModel
from mesh.layers import LayerRange
from mesh.models import arch
from mesh.models.ggml import Affine, affine_of, quantize_affine

log = logging.getLogger(__name__)

SUPPORTED = tuple(t for t, a in arch.ARCHITECTURES.items() if a.onnx)
GRAPH_VERSION = 2  # bump when the graph layout changes (names the disk cache)
ACCURACY_LEVEL = int(os.environ.get("MESH_ORT_ACCURACY", "4"))  # 4: int8 activations (see README)
HEAD_ACCURACY = int(os.environ.get("MESH_ORT_HEAD_ACCURACY", "4"))
MAX_POSITIONS = 8192  # rotary table length: positions a shard accepts


head_dim, kv_heads = arch.head_dim, arch.kv_heads


def _rope_tables(cfg: dict, base: float, scaling: dict | None, n: int):
    hd = head_dim(cfg)
    inv = 1.0 / base ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind != "default":
        raise UnsupportedModel(f"the onnxruntime backend has no RoPE scaling {kind!r}")
    freqs = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


@dataclass
class Weights:
    """How the builder gets each tensor: quantized (an ``Affine``) or float32."""

    source: object
    precision: str  # "auto" (the file's own blocks), "float32", "int8", "int4"
    requantized: dict

    def affine(self, name: str) -> Affine | None:
        if self.precision == "float32":
            return None
        if self.precision in ("int4", "int8"):  # a node asked for fewer bits: re-quantize
            bits = 4 if self.precision == "int4" else 8
            q = self.source.reader.read_quantized(name)
            if q is not None:
                try:
                    aff = affine_of(q)
                    if aff.bits <= bits:
                        return aff  # already at or below the asked bits: keep it exact
                except ValueError:
                    pass
            w = self.source.reader.read(name)
            return quantize_affine(w, bits, 32) if w.shape[1] % 32 == 0 else None
        q = self.source.reader.read_quantized(name)
        if q is None:
            return None
        try:
            return affine_of(q)
        except ValueError:  # IQ*, Q2_K, Q3_K: no affine form; 8-bit, and said so
            if q.qtype not in self.requantized:
                self.requantized[q.qtype] = "8-bit, group 32"
                log.warning("onnxruntime: %s has no exact form; re-quantized to 8 bits",
                            q.qtype)
            return quantize_affine(self.source.reader.read(name), 8, 32)

    def read(self, name: str) -> np.ndarray:
        return self.source.reader.read(name)


def _transposed(w: np.ndarray, step: int = 256) -> np.ndarray:
    """(N, K) -> C-contiguous float32 (K, N), a band of rows at a time: 3x faster than one
    whole-matrix transposing copy on a 262,144-row head (cache-sized bands)."""
    out = np.empty(w.shape[::-1], dtype=np.float32)
    for r in range(0, w.shape[0], step):
        out[:, r:r + step] = w[r:r + step].T
    return out


EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay inside the graph (as onnx.save does)
EXTERNAL_ALIGN = 4096  # each external tensor starts on a page: ONNX Runtime maps them


class _Builder:
    def __init__(self, cfg: dict, weights: Weights, data: BinaryIO | None = None):
        self.cfg = cfg
        self.w = weights
        self.nodes: list = []
        self.inits: list = []
        self.data = data  # the external data file weights stream into, as they are made
        self._release = getattr(weights.source.reader, "release_pages", lambda: None)
        self._n = 0
        self._blocksums: dict = {}
        self.names = set(weights.source.reader.names())

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        if self.data is None or arr.nbytes < EXTERNAL_MIN_BYTES:
            self.inits.append(numpy_helper.from_array(arr, name))
            return name
        # written now, so the graph never holds the weights (with them inside, building and
        # saving Gemma 3's graph peaked at ~1 GB of heap for 314 MB of weights)
        end = self.data.tell()
        offset = end + -end % EXTERNAL_ALIGN
        self.data.seek(offset)
        self.data.write(memoryview(arr).cast("B"))
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", Path(self.data.name).name), ("offset", offset),
                           ("length", arr.nbytes)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        self.inits.append(t)
        self._release()  # the file's pages this weight was made from: not needed again
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs) -> str | list[str]:
        outs = outputs or [self.name(hint) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain,
                                           name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, hint: str, arr) -> str:
        return self.init(self.name(hint), np.asarray(arr))

    # ---- building blocks -----------------------------------------------------------------

    def rms(self, x: str, tensor: str, eps: float, plus_one: bool = False) -> str:
        w = self.w.read(tensor).astype(np.float32)
        if plus_one:  # Gemma computes x * (1 + w)
            w = w + np.float32(1.0)
        return self.op("SimplifiedLayerNormalization", [x, self.init(tensor, w)], "norm",
                       axis=-1, epsilon=float(eps), stash_type=1)

    def linear(self, x: str, tensor: str, bias: str | None = None,
               accuracy: int | None = None, aff: Affine | None | bool = False) -> str:
        """``x @ tensor.T`` (+ bias); ``aff``: the tensor's affine form when the caller
        already converted it (False: convert here)."""
        if aff is False:
            aff = self.w.affine(tensor)
        if aff is None:
            y = self.op("MatMul", [x, self.init(tensor, _transposed(self.w.read(tensor)))], "mm")
        else:
            y = self._matmul_nbits(x, tensor, aff, accuracy)
        if bias is not None:
            y = self.op("Add", [y, self.init(bias, self.w.read(bias).astype(np.float32))],
                        "bias")
        return y

    def linears(self, x: str, tensors: list[str], biases: list[str | None],
                split: bool = True) -> str | list[str]:
        """Several projections of one input (q/k/v, gate/up) as one ``MatMulNBits`` where
        their blocks share a container and group size: a decode step is mostly operator
        dispatch at these sizes, so one wide product beats three narrow ones. Returns the
        outputs in order (a list), or without ``split`` the fused output itself (a str:
        GQA takes packed QKV) when the tensors could be fused."""
        affs = [self.w.affine(t) for t in tensors]
        kinds = {(4 if a.bits <= 4 else 8, a.group, a.shape[1]) if a is not None else None
                 for a in affs}
        if len(kinds) != 1 or None in kinds:
            return [self.linear(x, t, b, aff=a) for t, b, a in zip(tensors, biases, affs)]
        aff = Affine(np.concatenate([a.q for a in affs]),
                     np.concatenate([a.scales for a in affs]),
                     np.concatenate([a.biases for a in affs]),
                     max(a.bits for a in affs), affs[0].group)
        y = self._matmul_nbits(x, tensors[0] + ".fused", aff, None)
        sizes = [a.shape[0] for a in affs]
        if any(b is not None for b in biases):
            bias = np.concatenate([self.w.read(b).astype(np.float32) if b is not None
                                   else np.zeros(n, np.float32)
                                   for b, n in zip(biases, sizes)])
            y = self.op("Add", [y, self.init(tensors[0] + ".fused_bias", bias)], "bias")
        if not split:
            return y
        return self.op("Split", [y, self.const("sizes", np.array(sizes, np.int64))], "split",
                       n_out=len(sizes), axis=-1)

    def _matmul_nbits(self, x: str, tensor: str, aff: Affine, accuracy: int | None) -> str:
        n, k = aff.shape
        nbits = 4 if aff.bits <= 4 else 8
        g = aff.group
        nblk = k // g
        scales = aff.scales.astype(np.float32)
        # an integer zero point for every block that has one (Q4_0: 8, Q5_0: 16, Q8_0: 128,
        # Q6_K: 32; fused q/k/v mix them); the others (Q4_1, Q4_K, Q5_K: w = s*q + m) take
        # the middle one and their offset separately. Each block keeps its own: one shared
        # zero point far from a block's own would be cancelled by a large offset, and with
        # int8 activations the cancellation is not exact (Gemma 3's q/k/v fused with one
        # zero point agreed with fp32 on 89% of top-1 predictions instead of 98%).
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(scales != 0, -aff.biases / scales, 0.0)
        zr = np.round(z)
        exact = ((z == zr) & (zr >= 0) & (zr < 2 ** nbits)
                 & ((scales != 0) | (aff.biases == 0)))
        zp = np.where(exact, zr, 2 ** (nbits - 1)).astype(np.uint8)  # (N, nblk)
        q = aff.q
        if nbits == 4:
            blob = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, nblk, g // 2)
            zpad = np.zeros((n, (nblk + 1) // 2), dtype=np.uint8)
            zpad[:, :(nblk + 1) // 2] = zp[:, 0::2]
            zpad[:, :nblk // 2] |= zp[:, 1::2] << 4
        else:
            blob = q.reshape(n, nblk, g)
            zpad = zp
        inputs = [x, self.init(tensor + ".qweight", blob),
                  self.init(tensor + ".scales", scales.reshape(-1))]
        if np.any(zp != 2 ** (nbits - 1)):
            inputs.append(self.init(tensor + ".zp", zpad))
        y = self.op("MatMulNBits", inputs, "mmq", domain="com.microsoft", K=k, N=n,
                    bits=nbits, block_size=g,
                    accuracy_level=ACCURACY_LEVEL if accuracy is None else accuracy)
        if exact.all():
            return y
        # w = s*q + b = s*(q - zp) + (b + zp*s): the second term is blocksum(x) @ offsets
        offsets = np.where(exact, 0.0, aff.biases + zp * scales).astype(np.float32)
        sums = self._blocksum(x, g, k)
        corr = self.op("MatMul", [sums, self.init(tensor + ".offsets", offsets.T.copy())],
                       "offs")
        return self.op("Add", [y, corr], "mmq_b")

    def _blocksum(self, x: str, g: int, k: int) -> str:
        # (a MatMul by a constant 0/1 matrix, one operator instead of two, measured slower:
        # 15.8 vs 14.7 ms a SmolLM2 decode step)
        key = (x, g)
        if key not in self._blocksums:
            shape = self.const("bshape", np.array([0, 0, k // g, g], dtype=np.int64))
            r = self.op("Reshape", [x, shape], "blocks")
            axes = self.const("axes", np.array([-1], dtype=np.int64))
            self._blocksums[key] = self.op("ReduceSum", [r, axes], "bsum", keepdims=0)
        return self._blocksums[key]

    # ---- a decoder layer -----------------------------------------------------------------

    def layer(self, i: int, x: str, rope: dict) -> str:
        cfg = self.cfg
        p = f"model.layers.{i}."
        eps = cfg["rms_norm_eps"]
        a = arch.of(cfg)
        plus_one = a.norm_plus_one
        nh, kvh, hd = cfg["num_attention_heads"], kv_heads(cfg), head_dim(cfg)
        has_bias = a.attention_bias or bool(cfg.get("attention_bias"))
        names = self.names

        def b(t):
            return t if has_bias and t in names else None

        h = self.rms(x, p + "input_layernorm.weight", eps, plus_one)
        qkv = [p + f"self_attn.{t}_proj.weight" for t in "qkv"]
        qkv_b = [b(p + f"self_attn.{t}_proj.bias") for t in "qkv"]
        head_norm = p + "self_attn.q_norm.weight" in names  # Qwen3, Gemma 3: per head
        out = self.linears(h, qkv, qkv_b, split=head_norm)
        if isinstance(out, str):  # fused: GroupQueryAttention splits packed QKV itself
            q, k, v = out, "", ""
        else:
            q, k, v = out
        if head_norm:
            q = self._head_norm(q, p + "self_attn.q_norm.weight", nh, hd, eps, plus_one)
            k = self._head_norm(k, p + "self_attn.k_norm.weight", kvh, hd, eps, plus_one)
        window = arch.window(cfg, i)
        theta = "local" if (a.two_rope_bases and window) else "global"
        cos, sin = rope[theta]
        scale = arch.attention_scale(cfg)
        attn = self.op(
            "GroupQueryAttention",
            [q, k, v, f"past_k_{i}", f"past_v_{i}", "seqlens_k", "total_len", cos, sin],
            "attn", domain="com.microsoft",
            outputs=[self.name("attn"), f"present_k_{i}", f"present_v_{i}"], num_heads=nh,
            kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0, scale=float(scale),
            local_window_size=int(window) if window else -1)
        o = self.linear(attn, p + "self_attn.o_proj.weight")
        if a.sandwich_norms:
            o = self.rms(o, p + "post_attention_layernorm.weight", eps, plus_one)
            x = self.op("Add", [x, o], "res")
            h = self.rms(x, p + "pre_feedforward_layernorm.weight", eps, plus_one)
        else:
            x = self.op("Add", [x, o], "res")
            h = self.rms(x, p + "post_attention_layernorm.weight", eps, plus_one)
        gate, up = self.linears(h, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                                [None, None])
        if a.activation == "gelu_tanh":
            act = self.op("Gelu", [gate], "gelu", approximate="tanh")
        else:
            act = self.op("Mul", [gate, self.op("Sigmoid", [gate], "sig")], "silu")
        m = self.linear(self.op("Mul", [act, up], "glu"), p + "mlp.down_proj.weight")
        if a.sandwich_norms:
            m = self.rms(m, p + "post_feedforward_layernorm.weight", eps, plus_one)
        return self.op("Add", [x, m], "res")

    def _head_norm(self, x, tensor, heads, hd, eps, plus_one) -> str:
        split = self.const("hshape", np.array([0, 0, heads, hd], dtype=np.int64))
        merged = self.const("mshape", np.array([0, 0, heads * hd], dtype=np.int64))
        y = self.rms(self.op("Reshape", [x, split], "heads"), tensor, eps, plus_one)
        return self.op("Reshape", [y, merged], "merge")


def build(source, layers: LayerRange, precision: str = "auto",
          max_positions: int = MAX_POSITIONS,
          data: BinaryIO | None = None) -> tuple[onnx.ModelProto, dict]:
    """The graph for ``layers``: inputs ``hidden`` (B, T, H), ``seqlens_k`` (B,) int32,
    ``total_len`` () int32, ``out_index`` (n,) int64 on a last shard, and per layer a KV
    buffer ``past_k_i`` / ``past_v_i`` (B, kv_heads, capacity, head_dim) that is also
    ``present_k_i`` / ``present_v_i``. Output ``out``: hidden (B, T, H) or logits (B, n, V).
    With ``data`` (a file opened for writing, saved later beside the model) the weights go
    into it as external data as they are made. Returns the model and what was re-quantized."""
    cfg = source.config
    if cfg["model_type"] not in SUPPORTED:
        raise UnsupportedModel(f"the onnxruntime backend builds {', '.join(SUPPORTED)}; "
                               f"not {cfg['model_type']}")
    weights = Weights(source, precision, {})
    bld = _Builder(cfg, weights, data)
    n_pos = min(max_positions, source.context_length)
    rope = {}
    cos, sin = _rope_tables(cfg, float(cfg.get("rope_theta", 10000.0)),
                            cfg.get("rope_scaling"), n_pos)
    rope["global"] = (bld.init("cos_global", cos), bld.init("sin_global", sin))
    if arch.of(cfg).two_rope_bases:
        cos, sin = _rope_tables(cfg, float(cfg.get("rope_local_base_freq", 10000.0)), None,
                                n_pos)
        rope["local"] = (bld.init("cos_local", cos), bld.init("sin_local", sin))
    h, kvh, hd = cfg["hidden_size"], kv_heads(cfg), head_dim(cfg)
    inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["B", "T", h]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
              helper.make_tensor_value_info("total_len", TensorProto.INT32, [])]
    outputs = []
    x = "hidden"
    for i in layers:
        for kind in ("k", "v"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT,
                                                        ["B", kvh, "C", hd]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}",
                                                         TensorProto.FLOAT, ["B", kvh, "C", hd]))
        x = bld.layer(i, x, rope)
    if layers.is_last:
        inputs.append(helper.make_tensor_value_info("out_index", TensorProto.INT64, ["n"]))
        x = bld.op("Gather", [x, "out_index"], "pick", axis=1)
        x = bld.rms(x, "model.norm.weight", cfg["rms_norm_eps"], arch.of(cfg).norm_plus_one)
        head = "lm_head.weight" if "lm_head.weight" in bld.names else "model.embed_tokens.weight"
        x = bld.linear(x, head, accuracy=HEAD_ACCURACY)
        softcap = cfg.get("final_logit_softcapping")
        if softcap:
            c = bld.const("cap", np.float32(softcap))
            x = bld.op("Mul", [bld.op("Tanh", [bld.op("Div", [x, c], "d")], "t"), c], "capped")
    bld.nodes.append(helper.make_node("Identity", [x], ["out"], name="out"))
    out_dim = ["B", "n", cfg["vocab_size"]] if layers.is_last else ["B", "T", h]
    outputs.insert(0, helper.make_tensor_value_info("out", TensorProto.FLOAT, out_dim))
    graph = helper.make_graph(bld.nodes, f"mesh_{layers.start}_{layers.end}", inputs, outputs,
                              bld.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model, weights.requantized


class QuantizedEmbedding:
    """The token embedding as the file stores it; a lookup dequantizes only the rows it
    returns. With the file's own precision the rows are read from the file's mapping, as
    llama.cpp does: no copy is made, and only the pages of rows ever looked up become
    resident (a tied head keeps its own quantized copy in the graph). Re-quantized
    (``int4``/``int8``) embeddings are held in memory, float tensors as they are."""

    def __init__(self, source, precision: str):
        name = "model.embed_tokens.weight"
        self.dense = self.aff = self.raw = None
        raw = source.reader.read_quantized(name) if precision == "auto" else None
        if raw is not None and _has_affine(raw):
            self.raw = raw
        else:
            aff = Weights(source, precision, {}).affine(name)
            if aff is None:
                self.dense = source.reader.read(name).astype(np.float32)
            else:
                self.aff = aff
        self.scale = (np.float32(source.hidden_size ** 0.5)
                      if arch.of(source.config).embed_scale else None)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self.raw is not None:
            flat = np.asarray(ids).reshape(-1)
            out = affine_of(self.raw, flat).dequantize()
            out = out.reshape(*np.shape(ids), self.raw.shape[1])
        elif self.dense is not None:
            out = self.dense[ids]
        else:
            a = self.aff
            out = Affine(a.q[ids], a.scales[ids], a.biases[ids], a.bits, a.group).dequantize()
        return out * self.scale if self.scale is not None else out

    @property
    def nbytes(self) -> int:
        """What this holds in memory (rows read from the file's mapping count nothing)."""
        if self.raw is not None:
            return 0
        if self.dense is not None:
            return self.dense.nbytes
        return self.aff.q.nbytes + self.aff.scales.nbytes + self.aff.biases.nbytes


def _has_affine(q) -> bool:
    try:
        affine_of(q, np.zeros(1, dtype=np.int64))
        return True
    except ValueError:
        return False
