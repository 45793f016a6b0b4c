"""A stream whose tokens are slow to come keeps its connection alive: SSE comments while it
waits, and a first token that takes longer than ``keepalive`` is waited for inside a 200
stream, so that clients' read timeouts never fire on a request that is only waiting (behind
long prompts, on a re-plan)."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest

from mesh.engine.base import Engine, TokenStep
from mesh.errors import EngineUnavailable
from mesh.server.app import build_app
from tests.conftest import ServerThread

KEEPALIVE = 0.2


class _GatedEngine(Engine):
    """Writes "Hello world" once ``gate`` opens (or after ``delay`` seconds); with ``fail``,
    raises it instead."""

    model_id = "gated"
    context_length = 64

    def __init__(self, tokenizer, gate: threading.Event | None = None, delay: float = 0.0,
                 fail: Exception | None = None):
        self.tokenizer, self.gate, self.delay, self.fail = tokenizer, gate, delay, fail
        self.ids = tokenizer.encode("Hello world", add_special_tokens=False)
        self.ended = threading.Event()  # a request's generation ended (finished or not)

    async def generate(self, request):
        self.ended.clear()
        try:
            if self.gate is not None and not await asyncio.to_thread(self.gate.wait, 60):
                raise RuntimeError("the test never opened the gate")
            await asyncio.sleep(self.delay)  # a slow first token: the scenario, not a wait
            if self.fail is not None:
                raise self.fail
            for i, t in enumerate(self.ids):
                yield TokenStep(t, finish_reason="stop" if i == len(self.ids) - 1 else None)
        finally:
            self.ended.set()


def _lines_until_gate(srv, gate: threading.Event, comments: int = 2) -> tuple[int, list[str]]:
    """Stream a chat; open ``gate`` once ``comments`` keep-alive comments have come. Returns
    the status (received before the gate opened) and every line."""
    body = {"model": "gated", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}]}
    lines = []
    try:
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body,
                          timeout=30) as r:
            status = r.status_code
            assert not gate.is_set(), "the response started only after the first token"
            for line in r.iter_lines():
                lines.append(line)
                if sum(x.startswith(":") for x in lines) >= comments:
                    gate.set()
    finally:
        gate.set()
    return status, lines


def test_a_slow_first_token_is_waited_for_inside_a_kept_alive_stream(smollm2):
    gate = threading.Event()
    with ServerThread(build_app(_GatedEngine(smollm2.tokenizer, gate),
                                keepalive=KEEPALIVE)) as srv:
        status, lines = _lines_until_gate(srv, gate)
        assert status == 200
        events = [x[6:] for x in lines if x.startswith("data: ")]
        assert sum(x == ": keep-alive" for x in lines) >= 2
        content = next(i for i, x in enumerate(lines) if '"content": "Hello' in x)
        assert ": keep-alive" in lines[:content]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                       for e in events[:-1])
        assert text == "Hello world"

        # the official client skips the comments and reads the same text
        slow = _GatedEngine(smollm2.tokenizer, delay=3 * KEEPALIVE)
        srv.server.config.app.state.serving.engine = slow
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(model="gated", stream=True, messages=[
            {"role": "user", "content": "hi"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream
                       if c.choices) == "Hello world"


def test_an_error_after_the_stream_started_is_an_error_event(smollm2):
    gate = threading.Event()
    fail = EngineUnavailable("every stage is lost", retry_after=5.0)
    with ServerThread(build_app(_GatedEngine(smollm2.tokenizer, gate, fail=fail),
                                keepalive=KEEPALIVE)) as srv:
        status, lines = _lines_until_gate(srv, gate, comments=1)
        assert status == 200
        events = [x[6:] for x in lines if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"]


def test_an_error_before_the_patience_keeps_its_status(smollm2):
    gate = threading.Event()
    gate.set()
    fail = EngineUnavailable("every stage is lost", retry_after=5.0)
    with ServerThread(build_app(_GatedEngine(smollm2.tokenizer, gate, fail=fail))) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=30, json={
            "model": "gated", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["message"] == "every stage is lost"


def test_a_client_gone_while_waiting_ends_the_request(smollm2):
    """A client that gives up on a slow first token ends its request (the kept-alive stream
    notices the closed connection), and the server goes on serving."""
    gate = threading.Event()
    engine = _GatedEngine(smollm2.tokenizer, gate)
    with ServerThread(build_app(engine, keepalive=KEEPALIVE)) as srv:
        try:
            with httpx.stream("POST", srv.base_url + "/v1/chat/completions", timeout=30,
                              json={"model": "gated", "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert ": keep-alive" in r.iter_lines()  # the stream started without a token
            assert engine.ended.wait(30), "the request went on after its client left"
        finally:
            gate.set()
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=30, json={
            "model": "gated", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "Hello world"


@pytest.mark.real
@pytest.mark.parametrize("mode", ["local", "pipeline"])
def test_a_real_model_streams_the_same_text_when_the_stream_starts_before_its_first_token(
        smollm2, mode):
    """The real schedulers behind a stream that starts before its first token (a keep-alive
    shorter than any forward): the same text and usage as the answer in one piece."""
    from mesh.backends.base import default_backend, load_shard
    from mesh.engine.local import LocalEngine
    from mesh.layers import LayerRange
    from tests.test_pipeline_batching import _stages

    if mode == "local":
        shard = load_shard(default_backend(), smollm2, LayerRange.full(smollm2.num_layers))
        engine = LocalEngine("smollm2-135m", [shard], smollm2.tokenizer, context_length=1024)
    else:  # two stages, in process
        from mesh.pipeline.engine import PipelineEngine

        engine = PipelineEngine("smollm2-135m", _stages(smollm2), smollm2.tokenizer, 1024)
    with ServerThread(build_app(engine, keepalive=0.001)) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        ask = dict(model="smollm2-135m", temperature=0, max_tokens=24,
                   messages=[{"role": "user", "content": "Name three rivers."}])
        whole = client.chat.completions.create(**ask)
        chunks = list(client.chat.completions.create(
            **ask, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content and text
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
