"""Shared fixtures: tiny random models in Hugging Face format, the real shipped models, and
a real uvicorn server on port 0."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm")
BACKENDS = [b for b, ok in (("torch", HAS_TORCH), ("mlx", HAS_MLX)) if ok]

_CORPUS = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
           "Héllo wörld, naïve café! 東京 is big. 1234567890 + - * / = ( ) [ ] { } ") * 20

TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                  tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                    tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
                  tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=256, tie_word_embeddings=True),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128,
                        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
                        rope_local_base_freq=10000.0, query_pre_attn_scalar=16,
                        sliding_window=8, sliding_window_pattern=3,
                        max_position_embeddings=256, tie_word_embeddings=True),
}


def _tiny_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(str(folder))
    return len(fast)


def make_tiny_model(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A random-weight model in Hugging Face format, written with transformers itself."""
    import torch
    from transformers import AutoModelForCausalLM

    from mesh.backends.torch import hf_config
    from mesh.models.arch import layer_types

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _tiny_tokenizer(folder)
    cfg = dict(TINY_CONFIGS[model_type], vocab_size=vocab, eos_token_id=2, bos_token_id=0)
    full = dict(cfg)
    if full["model_type"] == "gemma3_text":
        layer_types(full)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(full), dtype=torch.float32)
    mt = full["model_type"]
    with torch.no_grad():  # random init is tiny; widen it so logits are far from uniform
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if mt == "gemma3_text" else 1.0, 0.1)
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(folder))
    # our config.json is the plain one (legacy rope keys), as HF repos in the wild have it
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    if not HAS_TORCH:
        pytest.skip("tiny models are written with transformers + torch, which is not installed")
    root = tmp_path_factory.mktemp("tiny")
    return {mt: make_tiny_model(root / mt, mt) for mt in TINY_CONFIGS}


@pytest.fixture(scope="session")
def smollm2():
    from mesh.models.source import resolve

    return resolve("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def gemma3():
    from mesh.models.source import resolve

    return resolve("gemma3-270m", progress=False)


@pytest.fixture(scope="session")
def fp32_logits(request):
    """``fp32_logits(model)``: torch's float32 logits for the first 256 WikiText tokens of a
    shipped model, computed once per session: the reference the quantized paths of every
    backend are checked against (Gemma 3's fp32 load alone takes ~30 s here)."""
    if not HAS_TORCH:
        pytest.skip("the float32 reference is computed with torch, which is not installed")
    from mesh.backends import load_shard
    from mesh.layers import LayerRange
    from tests.test_real_models import all_logits, ids_of

    cache: dict = {}

    def logits(model: str):
        if model not in cache:
            source = request.getfixturevalue(model)
            shard = load_shard("torch", source, LayerRange.full(source.num_layers), "float32")
            cache[model] = all_logits([shard], ids_of(source, 256))
        return cache[model]

    return logits


class ServerThread:
    """A real uvicorn server on 127.0.0.1, port 0, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)


def resident_kb_under(prefix: str) -> int:
    """This process's resident kB of file mappings under ``prefix`` (from smaps)."""
    total, ours = 0, False
    for line in open("/proc/self/smaps"):
        parts = line.split(maxsplit=5)
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            ours = len(parts) == 6 and parts[5].startswith(prefix)
        elif ours and parts[0] == "Rss:":
            total += int(parts[1])
    return total
