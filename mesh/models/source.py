"""Resolve a model reference to a ``ModelSource``: config, tokenizer, chat template, tensors.

References: an alias from the catalog (``smollm2-135m``), a path to a ``.gguf`` file, a path to
a Hugging Face folder (config.json + safetensors + tokenizer), or ``hf:org/name`` (downloaded
through huggingface_hub where a hub is reachable).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from mesh.errors import HubUnavailable, ModelSourceError
from mesh.layers import LayerRange
from mesh.models import arch as archs
from mesh.models import registry
from mesh.models.gguf_file import GGUFFile, file_key, hf_config
from mesh.models.safetensors_dir import SafetensorsDir
from mesh.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class TensorReader(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str) -> np.ndarray: ...
    def read_quantized(self, name: str): ...


@dataclass
class ModelSource:
    """Everything needed to build any shard of one model, read lazily."""

    name: str
    config: dict  # Hugging Face config.json keys
    reader: TensorReader
    tokenizer_dir: Path | None
    _tokenizer: Tokenizer | None = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings") or 2048)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_dir is None:
                raise ModelSourceError(f"{self.name} has no tokenizer")
            eos = self.config.get("eos_token_id")
            eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            self._tokenizer = Tokenizer.load(self.tokenizer_dir, self.model_type, eos_ids)
        return self._tokenizer

    def tensor_names(self, layers: LayerRange) -> list[str]:
        """Only the tensors a shard for ``layers`` needs (embedding first, norm + head last)."""
        wanted = []
        prefixes = tuple(f"model.layers.{i}." for i in layers)
        tied = self.config.get("tie_word_embeddings", False)
        for name in self.reader.names():
            if name.startswith(prefixes):
                wanted.append(name)
            elif name == "model.embed_tokens.weight" and (layers.is_first or
                                                          (layers.is_last and tied)):
                wanted.append(name)
            elif name in ("model.norm.weight", "lm_head.weight") and layers.is_last:
                wanted.append(name)
        return wanted


def resolve(ref: str, *, progress: bool = True) -> ModelSource:
    """Turn a user's model reference into a ``ModelSource``."""
    if ref.startswith("hf:"):
        return _from_hf_folder(_hub_download(ref[3:]), name=ref[3:])
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix == ".gguf" or _is_gguf(path):
            return _from_gguf(path, name=path.stem)
        raise ModelSourceError(f"{ref} is not a GGUF file (mesh loads a .gguf file, a Hugging "
                               "Face folder, an alias or hf:org/name)", param="model")
    if path.is_dir():
        return _from_hf_folder(path, name=path.name)
    if ref in registry.catalog():
        return _from_gguf(registry.pull(ref, progress=progress), name=ref)
    if path.suffix == ".gguf" or os.sep in ref:
        raise ModelSourceError(f"model path not found: {ref}", param="model")
    raise ModelSourceError(
        f"unknown model {ref!r}: use an alias ({', '.join(registry.catalog())}), "
        "a .gguf file, a Hugging Face folder or hf:org/name", param="model")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _from_gguf(path: Path, name: str) -> ModelSource:
    home = registry.mesh_home()
    g = GGUFFile(path, home / "index")
    cfg = hf_config(g)
    archs.check(cfg, name)
    # a file without a tokenizer still serves layers (a pipeline node needs none)
    tok = _gguf_tokenizer(path, home) if "tokenizer.ggml.model" in g.metadata else None
    return ModelSource(name=name, config=cfg, reader=g, tokenizer_dir=tok)


def _gguf_tokenizer(path: Path, home: Path) -> Path:
    """Convert the GGUF's tokenizer once (5-21 s) and keep it as tokenizer.json."""
    folder = home / "tokenizers" / file_key(path)
    if (folder / "tokenizer.json").exists():
        return folder
    from transformers import AutoTokenizer

    log.info("converting the tokenizer of %s (once)", path.name)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    if folder.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(folder)
    return folder


def _from_hf_folder(folder: Path, name: str) -> ModelSource:
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise ModelSourceError(f"{folder} has no config.json", param="model")
    cfg = json.loads(cfg_file.read_text())
    cfg = archs.normalise_hf_config(cfg, name)
    qcfg = cfg.get("quantization")  # mlx-lm's own entry
    hf_q = cfg.get("quantization_config")
    if qcfg is None and isinstance(hf_q, dict) and "quant_method" not in hf_q:
        qcfg = hf_q  # mlx-lm writes both; GPTQ/AWQ entries name their quant_method
    reader = SafetensorsDir(folder, qcfg)
    has_tok = (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()
    return ModelSource(name=name, config=cfg, reader=reader,
                       tokenizer_dir=folder if has_tok else None)


def _hub_download(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            repo, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))
    except Exception as exc:  # offline, unknown repo, gated, ...
        raise HubUnavailable(
            f"cannot fetch hf:{repo} from the Hugging Face hub ({type(exc).__name__}): "
            "download it elsewhere and pass the folder, or use a bundled alias",
            param="model") from exc
