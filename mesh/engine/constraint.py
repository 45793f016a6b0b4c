"""Constrained decoding: a grammar decides which tokens may come next.

``response_format`` (``json_object``, ``json_schema``) and required or named tool calls
become an llguidance grammar; a ``Constraint`` follows one request's output and, before each
sampled token, gives the set of tokens that keep the output inside the grammar. The mask is
applied where the sampling happens, after everything else has shaped the logits (penalties,
``logit_bias``, an ensemble's merge), so what is sampled always parses.

llguidance was picked over xgrammar and outlines-core: it needs no torch (Macs run mesh on
MLX alone), covers JSON Schema widely, takes Lark grammars for the tool-call format; its
masks (~55 us per token on this CPU for SmolLM2's and Gemma 3's vocabularies, xgrammar's
14-21 us) are far under 1% of a decode step (benchmarks/grammar_masks.py, docs/api.md).
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np

from mesh.errors import InvalidRequest

log = logging.getLogger(__name__)

# JSON as a person writes it on one line: ", " and ": ", no free whitespace (a small model
# given free whitespace can fill max_tokens with newlines)
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_lock = threading.Lock()


def _ll_tokenizer(tokenizer):
    """llguidance's view of a tokenizer, built once per tokenizer (~2 s for a 49K vocabulary,
    ~6 s for 262K) and kept on it."""
    cached = getattr(tokenizer, "_llguidance", None)
    if cached is not None:
        return cached
    with _lock:
        cached = getattr(tokenizer, "_llguidance", None)
        if cached is None:
            import llguidance

            backend = getattr(tokenizer.hf, "backend_tokenizer", None)
            if backend is None:
                raise InvalidRequest("structured output needs a tokenizer.json tokenizer; "
                                     "this model's tokenizer cannot be constrained")
            cached = llguidance.LLTokenizer(backend.to_str(), n_vocab=tokenizer.vocab_size,
                                            eos_token=sorted(tokenizer.eos_token_ids))
            tokenizer._llguidance = cached
    return cached


def json_schema_grammar(schema: dict | bool) -> str:
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema if isinstance(schema, dict) else {}, overrides=_JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"invalid JSON schema: {exc}",
                             param="response_format") from exc


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def lark_json(schema: dict) -> str:
    """A JSON schema as a piece of a Lark grammar (``%json {...}``), with mesh's layout."""
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_OPTIONS})


def response_format_grammar(fmt: dict | None) -> str | None:
    """The grammar for an OpenAI ``response_format``, or None for plain text."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) \
                or not spec["name"]:
            raise InvalidRequest("response_format.json_schema must be an object with a name "
                                 "and a schema", param="response_format")
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequest("response_format.json_schema.schema must be a JSON schema "
                                 "object", param="response_format")
        # strict or not, the output follows the schema: mesh constrains, it never hopes
        return json_schema_grammar(schema)
    raise InvalidRequest(f"response_format type {kind!r} is not one of text, json_object, "
                         f"json_schema", param="response_format")


class Constraint:
    """One request's grammar state: which tokens may come next, advanced token by token."""

    def __init__(self, tokenizer, grammar: str, param: str = "response_format"):
        import llguidance

        self.lltok = _ll_tokenizer(tokenizer)
        self.vocab = tokenizer.vocab_size
        self.matcher = llguidance.LLMatcher(self.lltok, grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidRequest(f"the grammar cannot be used: {self.matcher.get_error()}",
                                 param=param)
        self._words = np.zeros((self.vocab + 31) // 32, dtype=np.int32)

    def bitmask(self) -> bytes:
        """The allowed next tokens, one bit per token id (little-endian 32-bit words): what
        travels to a pipeline's last stage."""
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        return self._words.tobytes()

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            # the sampler only picks allowed tokens; an EOS after the end is fine too
            if not self.matcher.is_stopped():
                log.warning("grammar rejected token %d: %s", token, self.matcher.get_error())


def allowed_from_bitmask(mask: bytes, n: int) -> np.ndarray:
    """Bits (little-endian words) -> 0/1 (uint8) over ``n`` logits."""
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")
    if bits.size >= n:
        return bits[:n]
    return np.concatenate([bits, np.zeros(n - bits.size, dtype=np.uint8)])
