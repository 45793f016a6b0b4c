"""Incremental detokenization and stop sequences, with real tokenizers."""

from __future__ import annotations

import asyncio

import pytest

from mesh.engine.base import Engine, GenerationRequest, TokenStep
from mesh.engine.text import _held_back, stream_text
from mesh.models.tokenizer import IncrementalDetokenizer

TEXT = "Héllo wörld, naïve café! 東京 is big 🎉🎉 ok."


class ScriptedEngine(Engine):
    """Replays fixed token ids: exercises the text layer without a model."""

    def __init__(self, tokenizer, ids, eos=None):
        self.model_id, self.tokenizer, self.context_length = "scripted", tokenizer, 1000
        self.ids, self.closed = ids, False

    async def generate(self, req):
        try:
            for i, t in enumerate(self.ids[: req.max_tokens]):
                last = i == min(len(self.ids), req.max_tokens) - 1
                finish = "stop" if t in req.stop_token_ids else ("length" if last else None)
                yield TokenStep(t, finish_reason=finish)
                if finish:
                    return
        finally:
            self.closed = True


def _tokenizers(smollm2, gemma3):
    return [smollm2.tokenizer, gemma3.tokenizer]


@pytest.mark.real
def test_detokenizer_never_splits_characters(smollm2, gemma3):
    for tok in _tokenizers(smollm2, gemma3):
        ids = tok.encode(TEXT, add_special_tokens=False)
        d = IncrementalDetokenizer(tok)
        pieces = [d.add(t) for t in ids] + [d.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)


def test_held_back_prefixes():
    assert _held_back("abc EN", ["END"]) == 2
    assert _held_back("abc", ["xyz"]) == 0
    assert _held_back("a <|", ["<|end|>", "|e"]) == 2


@pytest.mark.real
def test_stop_sequences_cut_text_and_close_generation(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("one two three STOP four five", add_special_tokens=False)
    eng = ScriptedEngine(tok, ids)

    async def run(stop):
        req = GenerationRequest("r", [1], 100, stop_token_ids=frozenset(tok.eos_token_ids))
        return [d async for d in stream_text(eng, req, stop)]

    deltas = asyncio.run(run(["STOP"]))
    assert "".join(d.text for d in deltas) == "one two three "
    assert deltas[-1].finish_reason == "stop" and eng.closed
    deltas = asyncio.run(run(["nothing"]))
    assert "".join(d.text for d in deltas) == "one two three STOP four five"
    assert deltas[-1].finish_reason == "length"


@pytest.mark.real
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_tokenizer_matches_transformers_without_importing_torch(request, model):
    """mesh's tokenizer runs on `tokenizers` + jinja2 (transformers' loader imports torch);
    it must encode, decode and render chat templates exactly as transformers does."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from mesh.models.tokenizer import Tokenizer

    source = request.getfixturevalue(model)
    ours = source.tokenizer
    theirs = Tokenizer(AutoTokenizer.from_pretrained(str(source.tokenizer_dir)),
                       source.model_type, set())
    convs = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "more "}]]
    texts = ["Hello world, café 😀 <end_of_turn> test", " leading space", "<|im_start|>x", ""]
    for c in convs:
        assert ours.chat_prompt(c) == theirs.chat_prompt(c)
    for t in texts:
        assert ours.encode(t) == theirs.encode(t)
        assert ours.decode(ours.encode(t)) == theirs.decode(theirs.encode(t))
    assert ours.eos_token_ids == theirs.eos_token_ids and ours.vocab_size == theirs.vocab_size
    probe = ("import sys; from mesh.models.source import resolve; "
             f"resolve({source.name!r}, progress=False).tokenizer.encode('x'); "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-500:]
