"""Hostile and unusual input over HTTP: OpenAI-shaped errors for everything, no 5xx from
input, limits that hold, API keys, nothing OpenAI defines silently ignored, logit_bias."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from mesh.backends import load_shard
from mesh.engine.local import LocalEngine
from mesh.layers import LayerRange
from mesh.models.source import resolve
from mesh.server.app import build_app
from tests.conftest import ServerThread

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def server(tiny_models):
    source = resolve(str(tiny_models["llama"]))
    shard = load_shard("onnxruntime", source, LayerRange.full(source.num_layers), "float32")
    engine = LocalEngine("tiny", [shard], source.tokenizer, 256)
    with ServerThread(build_app(engine, api_keys=["sk-good"], max_body=1024 * 1024)) as srv:
        yield srv


def _post(srv, body, path="/v1/completions", key="sk-good", headers=None):
    headers = dict(headers or {}, **({"Authorization": f"Bearer {key}"} if key else {}))
    return httpx.post(srv.base_url + path, json=body, headers=headers, timeout=60)


def _openai_error(r, status, param="unset"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param != "unset":
        assert err["param"] == param
    return err


ASK = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0}


def test_api_keys(server):
    _openai_error(_post(server, ASK, key=None), 401)
    _openai_error(_post(server, ASK, key="sk-bad"), 401)
    assert _post(server, ASK).status_code == 200
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200  # open


def test_request_id_is_echoed_or_made(server):
    r = _post(server, ASK, headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(_post(server, ASK).headers["x-request-id"]) >= 16


@pytest.mark.parametrize("body,param", [
    ({**ASK, "seed": -1}, None),  # llama-server's "random": accepted
    ({**ASK, "seed": 2 ** 63 + 5}, None),
])
def test_type_valid_input_is_never_a_5xx(server, body, param):
    r = _post(server, body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body,param", [
    ({**ASK, "repetition_penalty": 1e-300}, "repetition_penalty"),
    ({**ASK, "temperature": 5}, "temperature"),
    ({**ASK, "logit_bias": {"5": 300}}, "logit_bias"),
    ({**ASK, "logit_bias": {"x": 1}}, "logit_bias"),
    ({**ASK, "best_of": 2, "n": 3}, "best_of"),
    ({**ASK, "best_of": 3, "stream": True}, "best_of"),
    ({**ASK, "n": 17}, "n"),
    ({**ASK, "response_format": {"type": "json_schema", "json_schema": {}}},
     "response_format"),
    ({**ASK, "response_format": {"type": "xml"}}, "response_format"),
    ({**ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format"),
    ({**ASK, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({**ASK, "tool_choice": "required"}, "tool_choice"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(server, body, param):
    _openai_error(_post(server, body), 400, param)


def test_image_parts_are_refused_on_a_text_model(server):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    _openai_error(_post(server, body, "/v1/chat/completions"), 400, "messages[0].content")


def test_unknown_paths_methods_and_broken_bodies_are_openai_errors(server):
    headers = {"Authorization": "Bearer sk-good"}
    _openai_error(httpx.get(server.base_url + "/v1/nothing", headers=headers), 404)
    _openai_error(httpx.get(server.base_url + "/v1/completions", headers=headers), 405)
    r = httpx.post(server.base_url + "/v1/completions", content=b'{"model": "tiny", "pro',
                   headers={**headers, "Content-Type": "application/json"})
    assert _openai_error(r, 400)["param"] is None
    r = httpx.post(server.base_url + "/v1/completions", content=b'{"model": "\xff\xfe"}',
                   headers={**headers, "Content-Type": "application/json"})
    _openai_error(r, 400)


def test_big_body_is_refused_and_health_stays_quick(server):
    huge = {"model": "tiny", "prompt": "word " * (2 * 1024 * 1024), "max_tokens": 1}
    done = {}

    def send():
        done["r"] = _post(server, huge)

    t = threading.Thread(target=send)
    t.start()
    t0 = time.perf_counter()
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    assert time.perf_counter() - t0 < 1.0
    t.join(60)
    _openai_error(done["r"], 413)


def test_logit_bias_removes_and_forces_tokens(server, tiny_models):
    tok = resolve(str(tiny_models["llama"])).tokenizer
    r = _post(server, {**ASK, "max_tokens": 1, "logprobs": 5}).json()
    top = set(r["choices"][0]["logprobs"]["top_logprobs"][0])
    assert r["choices"][0]["logprobs"]["tokens"][0] in top
    # -100 on every top-5 candidate: greedy decoding picks a token outside them
    banned = {str(i): -100 for i in range(tok.vocab_size) if tok.token_text(i) in top}
    out = _post(server, {**ASK, "max_tokens": 1, "logprobs": 0, "logit_bias": banned}).json()
    assert out["choices"][0]["logprobs"]["tokens"][0] not in top
    # +100 on one token forces it
    forced = _post(server, {**ASK, "max_tokens": 3, "logprobs": 0,
                            "logit_bias": {"42": 100}}).json()
    assert forced["choices"][0]["logprobs"]["tokens"] == [tok.token_text(42)] * 3


@pytest.mark.real
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_token_bytes_rebuild_the_text(request, model):
    tok = request.getfixturevalue(model).tokenizer
    text = "Emoji 😀🎉, accents café naïve, 東京."
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids).decode() == text
    if model == "smollm2":  # byte-level BPE splits the emoji: decoded alone, a piece is U+FFFD
        assert any(tok.token_text(i) == "\ufffd" for i in ids)


@pytest.fixture(scope="module")
def open_server(tiny_models):
    """A long context (so long prompts are tokenized, not refused by length alone), a 16 MB
    body limit, /metrics open, one CORS origin."""
    source = resolve(str(tiny_models["llama"]))
    shard = load_shard("onnxruntime", source, LayerRange.full(source.num_layers), "float32")
    engine = LocalEngine("tiny", [shard], source.tokenizer, 32768)
    app = build_app(engine, api_keys=["sk-good"], max_body=16 * 1024 * 1024,
                    cors_origins=["http://lan.example"], open_paths=("/health", "/metrics"))
    with ServerThread(app) as srv:
        yield srv


def test_long_prompts_are_tokenized_off_the_event_loop(open_server):
    # 2 MB, ~1.5 s to tokenize here: tokenized on a worker thread, then refused as past
    # the context (inline, /health would wait that long)
    long = {"model": "tiny", "prompt": "word " * 400_000, "max_tokens": 1}
    # 5 MB: past 64 characters per token of context, refused without tokenizing at all
    huge = {"model": "tiny", "prompt": "word " * (1024 * 1024), "max_tokens": 1}
    for body in (long, huge):
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("r", _post(open_server, body)))
        t.start()
        slowest = 0.0
        while t.is_alive():
            t0 = time.perf_counter()
            assert httpx.get(open_server.base_url + "/health", timeout=10).status_code == 200
            slowest = max(slowest, time.perf_counter() - t0)
        t.join()
        err = _openai_error(done["r"], 400, "prompt")
        assert err["code"] == "context_length_exceeded", err
        assert slowest < 1.0, slowest


def test_open_paths_and_cors(server, open_server):
    assert httpx.get(server.base_url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(open_server.base_url + "/metrics", timeout=10).status_code == 200
    # no CORS headers unless an origin was allowed
    r = httpx.get(server.base_url + "/health", headers={"Origin": "http://lan.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = httpx.options(open_server.base_url + "/v1/chat/completions", headers={
        "Origin": "http://lan.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://lan.example"
    other = httpx.options(open_server.base_url + "/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.headers.get("access-control-allow-origin") != "http://evil.example"
    r = _post(open_server, ASK, headers={"Origin": "http://lan.example"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://lan.example"
