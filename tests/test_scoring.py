"""Text scoring through the API (/v1/completions with echo, logprobs and max_tokens 0, what
lm-evaluation-harness sends): the prompt's log-probs equal the model's log-softmax at every
position in local and pipeline mode, a merge ensemble's equal its mixture's, and the bad
combinations are 400s naming the field."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import openai
import pytest

from mesh.backends import load_shard
from mesh.backends.base import StepItem
from mesh.engine.local import LocalEngine
from mesh.engine.sampling import log_softmax
from mesh.layers import LayerRange
from mesh.models.source import resolve
from mesh.server.app import build_app
from tests.conftest import ServerThread, make_tiny_model

pytestmark = pytest.mark.real

TEXT = "The capital of France is Paris, and the capital of Italy is Rome. " * 30  # > 256 tok


def _reference(source, ids, backend="onnxruntime", dtype="auto"):
    shard = load_shard(backend, source, LayerRange.full(source.num_layers), dtype)
    logits = shard.forward([StepItem("ref", np.asarray(ids, np.int32), shard.new_cache(),
                                     all_logits=True)])[0]
    return log_softmax(logits)


def _score(base_url, model, prompt, logprobs=2, **extra):
    r = httpx.post(base_url + "/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": 0, "echo": True,
        "logprobs": logprobs, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def _check_against(body, ids, lp, text, atol):
    choice = body["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                             "total_tokens": len(ids),
                             "prompt_tokens_details": {"cached_tokens": 0}}
    got = choice["logprobs"]
    assert len(got["tokens"]) == len(ids) and got["token_logprobs"][0] is None
    want = [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    np.testing.assert_allclose(got["token_logprobs"][1:], want, atol=atol)
    # the top alternatives are the row's own: its best token and value
    for i in (1, len(ids) // 2, len(ids) - 1):
        top = got["top_logprobs"][i]
        assert len(top) == 2
        assert max(top.values()) == pytest.approx(float(lp[i - 1].max()), abs=atol)
    offsets = got["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)


@pytest.fixture(scope="module")
def smollm2_server(smollm2):
    shard = load_shard("onnxruntime", smollm2, LayerRange.full(smollm2.num_layers))
    engine = LocalEngine("smollm2-135m", [shard], smollm2.tokenizer, 2048)
    with ServerThread(build_app(engine)) as srv:
        yield srv


def test_local_echo_scores_equal_the_models_log_softmax(smollm2, smollm2_server):
    ids = smollm2.tokenizer.encode(TEXT)
    assert len(ids) > 256  # two prefill chunks
    body = _score(smollm2_server.base_url, "smollm2-135m", TEXT)
    _check_against(body, ids, _reference(smollm2, ids), TEXT, 1e-4)
    # token ids in, the same scores out; the official client parses the shape
    client = openai.OpenAI(base_url=smollm2_server.base_url + "/v1", api_key="x",
                           max_retries=0)
    c = client.completions.create(model="smollm2-135m", prompt=ids[:20], echo=True,
                                  logprobs=1, max_tokens=0)
    np.testing.assert_allclose(c.choices[0].logprobs.token_logprobs[1:],
                               body["choices"][0]["logprobs"]["token_logprobs"][1:20],
                               atol=1e-4)


def test_echo_with_a_completion_is_prompt_then_answer(smollm2_server):
    plain = httpx.post(smollm2_server.base_url + "/v1/completions", timeout=120, json={
        "model": "smollm2-135m", "prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0,
        "logprobs": 1}).json()["choices"][0]
    echo = httpx.post(smollm2_server.base_url + "/v1/completions", timeout=120, json={
        "model": "smollm2-135m", "prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0,
        "logprobs": 1, "echo": True}).json()["choices"][0]
    assert echo["text"] == "1, 2, 3," + plain["text"]
    lp = echo["logprobs"]
    n = len(lp["tokens"]) - len(plain["logprobs"]["tokens"])
    assert lp["tokens"][n:] == plain["logprobs"]["tokens"]
    np.testing.assert_allclose(lp["token_logprobs"][n:], plain["logprobs"]["token_logprobs"],
                               atol=1e-4)
    assert lp["text_offset"][n] == len("1, 2, 3,")


def test_bad_combinations_are_400s_naming_the_field(smollm2_server):
    for body, param in (
            ({"echo": True, "stream": True, "max_tokens": 0, "logprobs": 1}, "echo"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"max_tokens": -1}, "max_tokens"),
            ({"echo": True, "logprobs": 21, "max_tokens": 0}, "logprobs")):
        r = httpx.post(smollm2_server.base_url + "/v1/completions", timeout=60,
                       json={"model": "smollm2-135m", "prompt": "hello there", **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)


def test_pipeline_echo_scores_equal_the_models(smollm2):
    from mesh.pipeline.coordinator import build_pipeline_engine

    engine = build_pipeline_engine("smollm2-135m", local_nodes=1, secret="s" * 16,
                                   context_length=2048)
    try:
        assert engine.stages[-1].name == "local-1"  # the remote node scores
        with ServerThread(build_app(engine)) as srv:
            body = _score(srv.base_url, engine.model_id, TEXT)
    finally:
        asyncio.run(engine.close())
    ids = smollm2.tokenizer.encode(TEXT)
    _check_against(body, ids, _reference(smollm2, ids), TEXT, 1e-3)


def test_merge_ensemble_echo_scores_are_the_mixtures(tiny_models, tmp_path):
    from mesh.ensemble.coordinator import build_ensemble_engine

    a = str(tiny_models["llama"])
    b = str(make_tiny_model(tmp_path / "twin", "llama", seed=1))  # same vocabulary
    ens = build_ensemble_engine([f"{a}:1", f"{b}:3"], "merge", backend="torch",
                                dtype="float32")
    ids = list(range(5, 45))
    with ServerThread(build_app(ens)) as srv:
        body = _score(srv.base_url, ens.model_id, ids, logprobs=3)
    la = _reference(resolve(a), ids, "torch", "float32")
    lb = _reference(resolve(b), ids, "torch", "float32")
    mixture = np.logaddexp(np.log(0.25) + la, np.log(0.75) + lb)
    got = body["choices"][0]["logprobs"]
    want = [float(mixture[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    np.testing.assert_allclose(got["token_logprobs"][1:], want, atol=1e-4)
    # the alternatives: each value is the mixture's own, or a lower bound where a member did
    # not list the candidate among its top 20 (the two tiny models' flat distributions over
    # 320 tokens barely overlap there)
    text_of = resolve(a).tokenizer.token_text
    best_by_text = [{} for _ in ids]
    for i in range(1, len(ids)):
        for t, v in enumerate(mixture[i - 1]):
            key = text_of(t)
            best_by_text[i][key] = max(best_by_text[i].get(key, -1e9), float(v))
        for tok, value in got["top_logprobs"][i].items():
            assert value <= best_by_text[i][tok] + 1e-4


@pytest.mark.parametrize("where,weighting", [("here", "fixed"), ("nodes", "fixed"),
                                              ("here", "perplexity")])
def test_product_of_experts_echo_scores_are_the_normalised_product(tiny_models, tmp_path,
                                                                   monkeypatch, where,
                                                                   weighting):
    """``--mix logprob``: each prompt position's score is log softmax(sum_i w_i log p_i), from
    every member's whole rows, sent a piece of the prompt at a time (7 positions a piece
    here), exact to the top alternatives; with ``--weighting perplexity`` the weights are
    PackLLM's from each member's log-likelihood of the whole prompt."""
    from mesh.ensemble import engine as ensemble_engine
    from mesh.ensemble.coordinator import build_ensemble_engine
    from mesh.ensemble.mixing import perplexity_weights
    from tests.test_pipeline import node_servers

    a = str(tiny_models["llama"])
    b = str(make_tiny_model(tmp_path / "twin", "llama", seed=1))  # same vocabulary
    vocab = resolve(a).vocab_size
    monkeypatch.setattr(ensemble_engine, "DENSE_BYTES", 4 * vocab * 2 * 7)
    ids = list(range(5, 45))
    la = _reference(resolve(a), ids, "torch", "float32")
    lb = _reference(resolve(b), ids, "torch", "float32")
    if weighting == "perplexity":
        w = perplexity_weights([-float(np.mean([lp[i, ids[i + 1]] for i in range(len(ids) - 1)]))
                                for lp in (la, lb)])
    else:
        w = [0.25, 0.75]
    product = w[0] * la + w[1] * lb
    product -= np.logaddexp.reduce(product, axis=-1, keepdims=True)

    def score(members, secret=None):
        ens = build_ensemble_engine(members, "merge", backend="torch", dtype="float32",
                                    mix_mode="logprob", weighting=weighting, secret=secret)
        with ServerThread(build_app(ens)) as srv:
            return _score(srv.base_url, ens.model_id, ids, logprobs=3)

    if where == "here":
        body = score([f"{a}:1", f"{b}:3"])
    else:
        with node_servers(2, "torch", secret="s" * 16) as nodes:
            body = score([f"{a}@{nodes[0][0]}:1", f"{b}@{nodes[1][0]}:3"], secret="s" * 16)
    got = body["choices"][0]["logprobs"]
    assert got["token_logprobs"][0] is None and len(got["token_logprobs"]) == len(ids)
    np.testing.assert_allclose(got["token_logprobs"][1:],
                               [float(product[i, ids[i + 1]]) for i in range(len(ids) - 1)],
                               atol=1e-4)
    text_of = resolve(a).tokenizer.token_text
    for i in range(1, len(ids)):  # the row's own best candidates, values and all
        row = product[i - 1]
        top = got["top_logprobs"][i]
        assert max(top.values()) == pytest.approx(float(row.max()), abs=1e-4)
        third = float(np.sort(row)[-3])
        for tok, value in top.items():  # (ids of one text share a key)
            assert value >= third - 1e-4
            assert value == pytest.approx(max(float(row[t]) for t in range(len(row))
                                              if text_of(t) == tok), abs=1e-4)


def test_a_product_of_experts_weighted_by_perplexity_refuses_a_prompt_too_long_to_keep(
        tiny_models, monkeypatch):
    from mesh.ensemble import engine as ensemble_engine
    from mesh.ensemble.coordinator import build_ensemble_engine

    a = str(tiny_models["llama"])
    monkeypatch.setattr(ensemble_engine, "DENSE_KEPT", 4 * resolve(a).vocab_size * 2 * 30)
    ens = build_ensemble_engine([a, a], "merge", backend="torch", dtype="float32",
                                mix_mode="logprob", weighting="perplexity")
    with ServerThread(build_app(ens)) as srv:
        r = httpx.post(srv.base_url + "/v1/completions", timeout=60, json={
            "model": ens.model_id, "prompt": list(range(5, 45)), "max_tokens": 0,
            "echo": True, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "30 tokens" in r.json()["error"]["message"]


def test_merge_of_one_model_twice_scores_exactly_as_the_model(tiny_models):
    from mesh.ensemble.coordinator import build_ensemble_engine

    a = str(tiny_models["llama"])
    ens = build_ensemble_engine([f"{a}:1", f"{a}:3"], "merge", backend="torch",
                                dtype="float32")
    ids = list(range(5, 45))
    with ServerThread(build_app(ens)) as srv:
        body = _score(srv.base_url, ens.model_id, ids, logprobs=3)
    lp = _reference(resolve(a), ids, "torch", "float32")
    got = body["choices"][0]["logprobs"]
    np.testing.assert_allclose(got["token_logprobs"][1:],
                               [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)],
                               atol=1e-4)
    for i in range(1, len(ids)):  # every member lists the same candidates: exact
        np.testing.assert_allclose(sorted(got["top_logprobs"][i].values(), reverse=True)[0],
                                   float(lp[i - 1].max()), atol=1e-4)


# ---- a words ensemble: the word-level mixture across vocabularies --------------------------

WORDS_TEXT = "\n\nThe river flows through the old town, past the mill and under two bridges."


def _member_word_lps(source, text, words, ends):
    """A member's log-prob of each word of ``text`` (its own tokens, as the API sends them),
    and the set of words holding its unscored first token."""
    tok = source.tokenizer
    ids = tok.encode(text)
    lp = _reference(source, ids)
    offsets = tok.hf.backend_tokenizer.encode(text, add_special_tokens=False).offsets
    lead = len(ids) - len(offsets)
    word_lp, unscored = np.zeros(len(words)), set()
    for k, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        last = e - 1
        while last > s and text[last].isspace():
            last -= 1
        wd = min(int(np.searchsorted(ends, last, side="right")), len(words) - 1)
        pos = lead + k
        if pos == 0:
            unscored.add(wd)
        else:
            word_lp[wd] += float(lp[pos - 1, ids[pos]])
    return word_lp, unscored


def test_words_ensemble_scores_are_the_word_level_mixture(smollm2, gemma3):
    import re

    from mesh.ensemble.coordinator import build_ensemble_engine

    ens = build_ensemble_engine(["smollm2-135m:1", "gemma3-270m:3"], "words",
                                backend="onnxruntime", context_length=512)
    with ServerThread(build_app(ens)) as srv:
        body = _score(srv.base_url, ens.model_id, WORDS_TEXT, logprobs=1)
        # one member: the mixture is that member, every score its own
        one = build_ensemble_engine(["smollm2-135m"], "words", backend="onnxruntime",
                                    context_length=512)
        with ServerThread(build_app(one)) as srv1:
            alone = _score(srv1.base_url, one.model_id, WORDS_TEXT, logprobs=2)
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", WORDS_TEXT)]
    ends = np.array([e for _, e in words])
    a, skip_a = _member_word_lps(smollm2, WORDS_TEXT, words, ends)
    b, skip_b = _member_word_lps(gemma3, WORDS_TEXT, words, ends)
    skip = skip_a | skip_b
    mixed = np.logaddexp(np.log(0.25) + a, np.log(0.75) + b)
    want = sum(float(mixed[w]) if w not in skip else float(a[w]) for w in range(len(words)))
    got = body["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None
    assert sum(got[1:]) == pytest.approx(want, abs=2e-3)
    # the one-member ensemble reports SmolLM2's own log-softmax at every position
    ids = smollm2.tokenizer.encode(WORDS_TEXT)
    _check_against(alone, ids, _reference(smollm2, ids), WORDS_TEXT, 1e-4)


def test_words_ensemble_with_perplexity_weights_mixes_by_each_members_nll_per_byte(
        smollm2, gemma3):
    """``--weighting perplexity`` across vocabularies: each member's weight comes from its
    NLL per byte of the prompt (PackLLM's rule on a unit both tokenizers share), and the
    echo scores are the word-level mixture under those weights, not the fixed ones."""
    import re

    from mesh.ensemble.coordinator import build_ensemble_engine
    from mesh.ensemble.mixing import perplexity_weights

    ens = build_ensemble_engine(["smollm2-135m:1", "gemma3-270m:3"], "words",
                                backend="onnxruntime", context_length=512,
                                weighting="perplexity")
    with ServerThread(build_app(ens)) as srv:
        body = _score(srv.base_url, ens.model_id, WORDS_TEXT, logprobs=1)
        r = httpx.post(srv.base_url + "/v1/completions", timeout=120, json={
            "model": ens.model_id, "prompt": WORDS_TEXT[:80], "max_tokens": 6,
            "temperature": 0.7, "seed": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0

    def nll_per_byte(source):
        ids = source.tokenizer.encode(WORDS_TEXT)
        lp = _reference(source, ids)
        total = -sum(float(lp[p - 1, ids[p]]) for p in range(1, len(ids)))
        return total / len(source.tokenizer.decode(ids[1:], skip_special_tokens=False)
                           .encode())

    w = perplexity_weights([nll_per_byte(smollm2), nll_per_byte(gemma3)])
    assert w[1] > w[0]  # Gemma 3 predicts WikiText better than SmolLM2
    assert abs(w[1] - 0.75) > 0.01  # and the weights are not the fixed 1:3
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", WORDS_TEXT)]
    ends = np.array([e for _, e in words])
    a, skip_a = _member_word_lps(smollm2, WORDS_TEXT, words, ends)
    b, skip_b = _member_word_lps(gemma3, WORDS_TEXT, words, ends)
    skip = skip_a | skip_b
    mixed = np.logaddexp(np.log(w[0]) + a, np.log(w[1]) + b)
    want = sum(float(mixed[i]) if i not in skip else float(a[i]) for i in range(len(words)))
    got = body["choices"][0]["logprobs"]["token_logprobs"]
    assert sum(got[1:]) == pytest.approx(want, abs=5e-3)
