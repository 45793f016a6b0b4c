"""Export a shard of a Llama-family model to ONNX with the KV cache as explicit inputs and
outputs, so ONNX Runtime (CPU, CUDA, TensorRT on Jetson) runs it without Python in the loop.

The module mirrors transformers' Llama / Qwen2 / Qwen3 decoder (RMSNorm in fp32, rotate-half
RoPE, grouped-query attention, SwiGLU), with batch 1 and the shard's layers stacked so the
graph has two cache tensors (layers, kv_heads, positions, head_dim) rather than one per layer.
Exported once per (model, layer range, precision) and cached under MESH_HOME/onnx.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mesh.errors import UnsupportedModel
from mesh.layers import LayerRange

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
EXPORT_VERSION = 2


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _lin(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T as a MatMul (nn.Linear on 2-D input exports as Gemm, which ONNX Runtime's
    4-bit MatMulNBits quantizer does not take)."""
    y = torch.matmul(x, mod.weight.T)
    return y + mod.bias if mod.bias is not None else y


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class _Layer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        kvh = cfg.get("num_key_value_heads") or nh
        hd = cfg.get("head_dim") or h // nh
        bias = bool(cfg.get("attention_bias")) or cfg["model_type"] == "qwen2"
        self.nh, self.kvh, self.hd, self.eps = nh, kvh, hd, cfg["rms_norm_eps"]
        self.q_proj = nn.Linear(h, nh * hd, bias=bias)
        self.k_proj = nn.Linear(h, kvh * hd, bias=bias)
        self.v_proj = nn.Linear(h, kvh * hd, bias=bias)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)
        self.qk_norm = cfg["model_type"] == "qwen3"
        if self.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(hd))
            self.k_norm = nn.Parameter(torch.ones(hd))
        inter = cfg["intermediate_size"]
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))

    def forward(self, x, cos, sin, mask, past_k, past_v):
        t = x.shape[0]
        hs = _rms(x, self.input_layernorm, self.eps)
        q = _lin(self.q_proj, hs).view(t, self.nh, self.hd).transpose(0, 1)  # (nh, T, hd)
        k = _lin(self.k_proj, hs).view(t, self.kvh, self.hd).transpose(0, 1)  # (kvh, T, hd)
        v = _lin(self.v_proj, hs).view(t, self.kvh, self.hd).transpose(0, 1)
        if self.qk_norm:
            q = _rms(q, self.q_norm, self.eps)
            k = _rms(k, self.k_norm, self.eps)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=1)  # (kvh, P + T, hd)
        v = torch.cat([past_v, v], dim=1)
        rep = self.nh // self.kvh
        kk = k.repeat_interleave(rep, dim=0)
        vv = v.repeat_interleave(rep, dim=0)
        att = (q @ kk.transpose(1, 2)) / math.sqrt(self.hd) + mask  # (nh, T, P + T)
        out = torch.softmax(att.float(), dim=-1).to(q.dtype) @ vv  # (nh, T, hd)
        x = x + _lin(self.o_proj, out.transpose(0, 1).reshape(t, self.nh * self.hd))
        hs = _rms(x, self.post_attention_layernorm, self.eps)
        x = x + _lin(self.down_proj, nn.functional.silu(_lin(self.gate_proj, hs)) * _lin(self.up_proj, hs))
        return x, k, v


class ShardModule(nn.Module):
    """Layers [start, end) with stacked KV: forward(x, positions, out_index, past_k, past_v)
    -> (out, present_k, present_v); ``out`` is hidden (T, H) or logits (len(out_index), V)."""

    def __init__(self, cfg: dict, layers: LayerRange):
        super().__init__()
        if cfg["model_type"] not in SUPPORTED:
            raise UnsupportedModel(f"the onnxruntime backend exports {', '.join(SUPPORTED)}; "
                                   f"not {cfg['model_type']}")
        self.cfg, self.range = cfg, layers
        h = cfg["hidden_size"]
        hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
        self.layers = nn.ModuleList(_Layer(cfg) for _ in layers)
        self.first, self.last = layers.is_first, layers.is_last
        if self.first:
            self.embed = nn.Parameter(torch.zeros(cfg["vocab_size"], h))
        if self.last:
            self.norm = nn.Parameter(torch.ones(h))
            self.head = nn.Parameter(torch.zeros(cfg["vocab_size"], h))
        theta = float(cfg.get("rope_theta", 10000.0))
        inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x, positions, out_index, past_k, past_v):
        h = self.embed[x] if self.first else x  # (T, H)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None], emb.sin()[None]  # (1, T, hd)
        t, p = h.shape[0], past_k.shape[2]
        kpos = torch.arange(p + t, device=h.device)
        qpos = kpos[p:]
        mask = torch.where(kpos[None, :] <= qpos[:, None], 0.0, -1e9)[None]  # (1, T, P+T)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, cos, sin, mask, past_k[i], past_v[i])
            ks.append(k)
            vs.append(v)
        present_k, present_v = torch.stack(ks), torch.stack(vs)
        if self.last:
            h = _rms(h[out_index], self.norm, self.cfg["rms_norm_eps"]) @ self.head.T
        return h, present_k, present_v

    def load(self, source) -> None:
        tied = bool(source.config.get("tie_word_embeddings"))
        names = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
                 "self_attn.v_proj": "v_proj", "self_attn.o_proj": "o_proj",
                 "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj",
                 "mlp.down_proj": "down_proj"}
        with torch.no_grad():
            for name in source.tensor_names(self.range):
                t = torch.from_numpy(source.reader.read(name))
                if name.startswith("model.layers."):
                    _, _, idx, rest = name.split(".", 3)
                    layer = self.layers[int(idx) - self.range.start]
                    mod, attr = rest.rsplit(".", 1)
                    if mod in names:
                        getattr(getattr(layer, names[mod]), attr).copy_(t)
                    elif mod in ("self_attn.q_norm", "self_attn.k_norm"):
                        getattr(layer, mod.split(".")[1]).copy_(t)
                    else:
                        getattr(layer, mod).copy_(t)
                elif name == "model.embed_tokens.weight":
                    if self.first:
                        self.embed.copy_(t)
                    if self.last and tied:
                        self.head.copy_(t)
                elif name == "model.norm.weight":
                    self.norm.copy_(t)
                elif name == "lm_head.weight":
                    self.head.copy_(t)


def cache_key(source, layers: LayerRange, precision: str) -> str:
    ident = json.dumps([EXPORT_VERSION, source.name, getattr(source.reader, "path", ""),
                        sorted(source.config.items(), key=str).__repr__(), layers.start,
                        layers.end, layers.total, precision], default=str)
    return hashlib.sha1(ident.encode()).hexdigest()[:20]


def export(source, layers: LayerRange, path: Path) -> None:
    """Write the fp32 graph of ``layers`` to ``path`` (weights in a side file)."""
    module = ShardModule(source.config, layers)
    module.load(source)
    module.eval()
    cfg = source.config
    n = len(layers)
    kvh = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    t, p = 3, 4
    x = (torch.tensor([1, 2, 3], dtype=torch.int64) if layers.is_first
         else torch.zeros(t, cfg["hidden_size"]))
    args = (x, torch.arange(p, p + t), torch.tensor([t - 1]),
            torch.zeros(n, kvh, p, hd), torch.zeros(n, kvh, p, hd))
    T, P, K = torch.export.Dim("T", min=1, max=8192), torch.export.Dim("P", min=0, max=65536), \
        torch.export.Dim("K", min=1, max=8192)
    dyn = ({0: T}, {0: T}, {0: K}, {2: P}, {2: P})
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=True, dynamic_shapes=dyn,
                          input_names=["x", "positions", "out_index", "past_k", "past_v"],
                          output_names=["out", "present_k", "present_v"], external_data=True,
                          optimize=True, verbose=False)


def _head_nodes(model, vocab: int) -> list[str]:
    """MatMuls whose weight has a vocabulary-sized output: the LM head stays in fp32
    (quantizing it costs most of the accuracy and little of the time)."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul"
            and any(shapes.get(i, [None])[-1] == vocab for i in n.input)]


def quantize(src: Path, dst: Path, precision: str, vocab: int = 0) -> None:
    """int8: dynamic per-channel quantization of MatMuls; int4: MatMulNBits (block 32)."""
    import onnx

    model = onnx.load(str(src))
    keep = _head_nodes(model, vocab) if vocab else []
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        del model
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=keep,
                         use_external_data_format=True)
    elif precision == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=False, accuracy_level=1,
                                 nodes_to_exclude=keep)
        q.process()
        onnx.save_model(q.model.model, str(dst), save_as_external_data=True,
                        location=dst.name + ".data")
    else:
        raise ValueError(f"unknown precision {precision}")


def zeros_cache(cfg: dict, n: int) -> np.ndarray:
    kvh = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return np.zeros((n, kvh, 0, hd), dtype=np.float32)
