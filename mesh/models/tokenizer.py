"""Tokenizer, chat template and incremental detokenization."""

from __future__ import annotations

import logging
from pathlib import Path

from mesh.heap import trim as trim_heap
from mesh.models.arch import ARCHITECTURES

log = logging.getLogger(__name__)

_GENERIC_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class FastTokenizer:
    """What mesh uses of a transformers tokenizer, on the ``tokenizers`` library and jinja2
    alone: loading a tokenizer through transformers imports torch (~270 MB resident in every
    process, for nothing). Encoding, decoding and the chat template render as transformers
    renders them (``tests/test_text.py`` checks both shipped models against it)."""

    def __init__(self, folder: Path):
        import json

        from tokenizers import Tokenizer as Backend

        self.backend_tokenizer = Backend.from_file(str(folder / "tokenizer.json"))
        cfg_file = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        special_file = folder / "special_tokens_map.json"
        if special_file.exists():
            cfg = {**json.loads(special_file.read_text()), **cfg}
        self.special = {k: _content(cfg.get(k)) for k in
                        ("bos_token", "eos_token", "unk_token", "pad_token")
                        if _content(cfg.get(k)) is not None}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"),
                            None)
        jinja_file = folder / "chat_template.jinja"
        self.chat_template = jinja_file.read_text() if jinja_file.exists() else template

    def _id(self, key: str) -> int | None:
        tok = self.special.get(key)
        return None if tok is None else self.backend_tokenizer.token_to_id(tok)

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk_token")

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 16_384:  # encode_batch releases the GIL (encode does not): a long
            # prompt tokenized on a worker thread leaves the event loop running
            return self.backend_tokenizer.encode_batch(
                [text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend_tokenizer.token_to_id(token)

    def convert_ids_to_tokens(self, token_id: int) -> str | None:
        return self.backend_tokenizer.id_to_token(int(token_id))

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True, tools: list | None = None) -> str:
        """Rendered as transformers does: a sandboxed jinja2 environment with trimmed blocks,
        loop controls, ``tojson``, ``raise_exception`` and ``strftime_now``."""
        extra = {"tools": tools} if tools else {}
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **extra,
            **self.special)


def _content(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


_TEMPLATES: dict = {}


def _compile(source: str):
    if source not in _TEMPLATES:
        import json
        from datetime import datetime

        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


class Tokenizer:
    """A transformers fast tokenizer plus what generation needs from it."""

    def __init__(self, hf_tokenizer, model_type: str, eos_token_ids: set[int]):
        self.hf = hf_tokenizer
        if not getattr(hf_tokenizer, "chat_template", None):
            known = ARCHITECTURES.get(model_type)
            hf_tokenizer.chat_template = (known and known.chat_template) or _GENERIC_TEMPLATE
        self.eos_token_ids = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(hf_tokenizer.eos_token_id)
        # Chat models end a turn with a token other than the base EOS (<end_of_turn>, <|im_end|>).
        for tok in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
            tid = hf_tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != hf_tokenizer.unk_token_id:
                self.eos_token_ids.add(tid)

    @classmethod
    def load(cls, folder: Path, model_type: str, eos_token_ids: set[int]) -> "Tokenizer":
        folder = Path(folder)
        if (folder / "tokenizer.json").exists():
            tok = cls(FastTokenizer(folder), model_type, eos_token_ids)
            trim_heap()  # parsing Gemma 3's 33 MB tokenizer.json leaves ~200 MB freed
            return tok
        from transformers import AutoTokenizer  # sentencepiece-only folders

        return cls(AutoTokenizer.from_pretrained(str(folder)), model_type, eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        extra = {"tools": tools} if tools else {}
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           **extra)
        return self.encode(text, add_special_tokens=False)

    def info(self) -> dict:
        """Special tokens and the chat template (``GET /tokenizer_info``)."""
        special = getattr(self.hf, "special", {})
        return {"eos_token": special.get("eos_token"), "bos_token": special.get("bos_token"),
                "pad_token": special.get("pad_token"), "unk_token": special.get("unk_token"),
                "chat_template": getattr(self.hf, "chat_template", None),
                "vocab_size": self.vocab_size}

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template renders a ``tools`` list itself (Qwen 2.5, Hermes,
        SmolLM3, Llama 3.1 do; SmolLM2's and Gemma 3's do not)."""
        import re

        return bool(re.search(r"\btools\b", self.hf.chat_template or ""))

    def token_text(self, token_id: int) -> str:
        return self.hf.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, even when it holds part of a UTF-8 character
        (decoding such a token alone gives U+FFFD): byte-level BPE pieces map back through
        GPT-2's byte alphabet, SentencePiece byte-fallback pieces are ``<0xNN>``."""
        piece = self.hf.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        decoder = type(self.hf.backend_tokenizer.decoder).__name__
        if decoder == "ByteLevel" and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return self.token_text(token_id).encode()


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas that never split a UTF-8 character.

    Decodes a small window of recent tokens (so byte-level BPE merges and SentencePiece
    leading spaces come out right) and holds back output while it ends in U+FFFD, which is
    how an incomplete multi-byte character decodes.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.tokens.append(token_id)
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        return delta

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full[len(prefix):] if len(full) > len(prefix) else ""


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable bytes map to themselves, the rest to
    code points from 256 up (the mapping every byte-level BPE tokenizer shares)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_alphabet()
