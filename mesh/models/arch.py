"""What mesh knows about each model architecture, in one place.

The readers, the three backends, the ONNX exporter and the planner all ask this module, so a
new architecture (or a quirk of a known one) is added here and nowhere else:

- how a GGUF file names it and its tensors, and which llama.cpp conventions to undo (Llama's
  Q/K rows permuted for llama.cpp's rotary layout; Gemma's RMSNorm weights stored with +1);
- how a Hugging Face config.json of it is normalised (Gemma 3's multimodal wrapper, Mistral
  read as Llama, the two spellings of Gemma 3's local/global layer pattern);
- its computation's shape: head size, KV heads, which layers attend through a sliding window,
  the attention scale, the activation, the norm placement, the embedding scale, biases;
- a chat template for base checkpoints that ship without one.

Everything is keyed by the Hugging Face ``model_type`` a source's config carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.errors import UnsupportedModel

# GGUF block tensor -> Hugging Face module path inside ``model.layers.{i}``
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 has four norms per block; llama.cpp's "ffn_norm" is its pre-feedforward norm.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class Architecture:
    model_type: str  # Hugging Face model_type, as a normalised config carries it
    gguf: tuple[str, ...] = ()  # GGUF general.architecture values read as this one
    permute_qk: bool = False  # llama.cpp's converter permuted Q/K rows (undone on read)
    norm_shift: float = 0.0  # GGUF stores RMSNorm weights as w + shift
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + w) (Gemma)
    sandwich_norms: bool = False  # norms after attention and MLP too (Gemma 3)
    embed_scale: bool = False  # embeddings scaled by sqrt(hidden size) (Gemma)
    activation: str = "silu"  # the gated MLP's: "silu" or "gelu_tanh"
    attention_bias: bool = False  # q/k/v carry biases (Qwen2)
    two_rope_bases: bool = False  # sliding layers rotate with rope_local_base_freq (Gemma 3)
    onnx: bool = True  # the ONNX Runtime backend builds graphs for it
    layer_names: dict = field(default_factory=lambda: dict(_LAYER_NAMES))
    chat_template: str | None = None  # for base checkpoints without one


ARCHITECTURES = {a.model_type: a for a in (
    Architecture("llama", gguf=("llama", "mistral"), permute_qk=True),
    Architecture("mistral"),
    Architecture("qwen2", gguf=("qwen2",), attention_bias=True),
    Architecture("qwen3", gguf=("qwen3",)),
    Architecture("gemma3_text", gguf=("gemma3",), norm_shift=1.0, norm_plus_one=True,
                 sandwich_norms=True, embed_scale=True, activation="gelu_tanh",
                 two_rope_bases=True, layer_names=dict(_GEMMA3_LAYER_NAMES),
                 chat_template=_GEMMA_TEMPLATE),
)}
GGUF_ARCHITECTURES = {g: a for a in ARCHITECTURES.values() for g in a.gguf}
GEMMA3_PATTERN = 6  # llama.cpp hard-codes Gemma 3's 5 local : 1 global layer pattern


def of(cfg_or_type: dict | str) -> Architecture:
    """The architecture of a config (or a model_type); ``UnsupportedModel`` for others."""
    t = cfg_or_type if isinstance(cfg_or_type, str) else cfg_or_type.get("model_type")
    if t not in ARCHITECTURES:
        raise UnsupportedModel(f"architecture {t!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[t]


def check(cfg: dict, name: str) -> None:
    """``UnsupportedModel``, naming the model ``name``, for an architecture mesh cannot run."""
    if cfg.get("model_type") not in ARCHITECTURES:
        raise UnsupportedModel(f"{name}: architecture {cfg.get('model_type')!r} is not "
                               f"supported (supported: {', '.join(ARCHITECTURES)})",
                               param="model")


def by_gguf(name: str | None) -> Architecture:
    if name not in GGUF_ARCHITECTURES:
        raise UnsupportedModel(f"GGUF architecture {name!r} is not supported "
                               f"(supported: {', '.join(sorted(GGUF_ARCHITECTURES))})")
    return GGUF_ARCHITECTURES[name]


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def kv_heads(cfg: dict) -> int:
    return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]


def window(cfg: dict, i: int) -> int | None:
    """Layer ``i``'s sliding attention window (None: it attends to everything)."""
    types = cfg.get("layer_types")
    if types:
        return cfg.get("sliding_window") if types[i] == "sliding_attention" else None
    if cfg["model_type"] == "gemma3_text":
        pattern = cfg.get("sliding_window_pattern", GEMMA3_PATTERN)
        return None if i % pattern == pattern - 1 else cfg.get("sliding_window")
    return cfg.get("sliding_window") if cfg["model_type"] == "mistral" else None


def attention_scale(cfg: dict) -> float:
    """The factor on q·k: Gemma 3 divides by sqrt(query_pre_attn_scalar)."""
    if cfg["model_type"] == "gemma3_text":
        return (cfg.get("query_pre_attn_scalar") or head_dim(cfg)) ** -0.5
    return head_dim(cfg) ** -0.5


def layer_types(cfg: dict) -> None:
    """Gemma 3 configs name their local/global pattern either as ``sliding_window_pattern``
    (older) or as ``layer_types`` (newer); mlx-lm reads the first, transformers the second:
    fill in whichever is missing."""
    n = cfg["num_hidden_layers"]
    if not cfg.get("layer_types"):
        pattern = cfg.get("sliding_window_pattern", GEMMA3_PATTERN)
        cfg["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                              for i in range(n)]
    if "sliding_window_pattern" not in cfg:
        types = cfg["layer_types"]
        cfg["sliding_window_pattern"] = (types.index("full_attention") + 1
                                         if "full_attention" in types else n + 1)


def normalise_hf_config(cfg: dict, name: str) -> dict:
    """A Hugging Face config.json as mesh uses it: Gemma 3's multimodal wrapper unwrapped to
    its text model, Mistral read as Llama, tied embeddings and layer types made explicit.
    ``UnsupportedModel`` (naming ``name``) for an architecture mesh cannot run."""
    if cfg.get("model_type") == "gemma3":  # multimodal wrapper: use its text part
        cfg = {**cfg.get("text_config", {}), "model_type": "gemma3_text"}
    if cfg.get("model_type") == "mistral":
        cfg["model_type"] = "llama"
    check(cfg, name)
    cfg.setdefault("tie_word_embeddings", cfg["model_type"] == "gemma3_text")
    if cfg["model_type"] == "gemma3_text":
        layer_types(cfg)
    return cfg


def gguf_config_extras(model_type: str, n_layers: int, head: int, meta) -> dict:
    """What a GGUF's metadata leaves implicit for this architecture, as config.json keys
    (``meta(key)``: the file's ``{arch}.{key}``)."""
    if model_type == "qwen2":
        return {"attention_bias": True}
    if model_type != "gemma3_text":
        return {}
    cfg = {
        "sliding_window": meta("attention.sliding_window"),
        "sliding_window_pattern": GEMMA3_PATTERN,
        "num_hidden_layers": n_layers,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": head,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }
    layer_types(cfg)
    factor = meta("rope.scaling.factor")
    if factor:
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    return cfg
