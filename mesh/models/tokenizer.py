"""Tokenizer, chat template and incremental detokenization."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Chat formats for model families whose base checkpoints ship without a template.
_FALLBACK_TEMPLATES = {
    "gemma3_text": (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
}
_GENERIC_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class Tokenizer:
    """A transformers fast tokenizer plus what generation needs from it."""

    def __init__(self, hf_tokenizer, model_type: str, eos_token_ids: set[int]):
        self.hf = hf_tokenizer
        if not getattr(hf_tokenizer, "chat_template", None):
            hf_tokenizer.chat_template = _FALLBACK_TEMPLATES.get(model_type, _GENERIC_TEMPLATE)
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
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(folder)), model_type, eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text, add_special_tokens=False)

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
