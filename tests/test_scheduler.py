"""The local scheduler: batched equals unbatched, chunked prefill interleaves with running
streams, limits answer 429, abandoned requests leave no cache behind."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import numpy as np
import pytest

from mesh.backends import load_shard
from mesh.engine import local
from mesh.engine.base import GenerationRequest
from mesh.engine.local import LocalEngine
from mesh.engine.sampling import SamplingParams
from mesh.layers import LayerRange
from mesh.models.source import resolve
from mesh.server.app import build_app
from tests.conftest import ServerThread

pytest.importorskip("onnxruntime")


def _engine(path, split_invariant=None, backend="onnxruntime", **kw) -> LocalEngine:
    source = resolve(str(path))
    shard = load_shard(backend, source, LayerRange.full(source.num_layers), "float32")
    if split_invariant is not None:  # as a backend that is not (torch, MLX) says
        shard.split_invariant = split_invariant
    return LocalEngine("tiny", [shard], source.tokenizer, 256, **kw)


def _req(prompt, n, logprobs=None, seed=None, temperature=0.0):
    return GenerationRequest(request_id=f"r{id(prompt)}-{time.monotonic_ns()}",
                             prompt_ids=list(prompt), max_tokens=n,
                             sampling=SamplingParams(temperature=temperature, logprobs=logprobs,
                                                     seed=seed))


async def _collect(engine, req, delay=0.0):
    await asyncio.sleep(delay)  # join at a different step: not a wait for a condition
    return [(s.token_id, s.logprob) async for s in engine.generate(req)]


@pytest.mark.parametrize("backend,model", [
    ("onnxruntime", "llama"), ("onnxruntime", "gemma3_text"), ("torch", "llama"),
    ("torch", "gemma3_text"), ("mlx", "llama"), ("mlx", "gemma3_text")])
def test_batched_equals_unbatched(tiny_models, backend, model):
    """Per request, the tokens and log-probs of requests decoded together in one forward are
    those each gets alone; Gemma 3's sliding layers (window 8 here) hold fewer keys than its
    global ones, so each row's mask differs per layer kind."""
    pytest.importorskip({"mlx": "mlx.core"}.get(backend, backend))
    engine = _engine(tiny_models[model], backend=backend)
    shard = engine.shards[0]
    rows = []
    if hasattr(shard, "_forward_rows"):  # torch and MLX: count the batched forwards they run
        inner = shard._forward_rows
        shard._forward_rows = lambda items: rows.append(len(items)) or inner(items)
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40, 8, 25)]

    async def run():
        alone = [await _collect(engine, _req(p, 12, logprobs=0)) for p in prompts]
        together = await asyncio.gather(*(_collect(engine, _req(p, 12, logprobs=0), 0.002 * i)
                                          for i, p in enumerate(prompts)))
        seeded = [await _collect(engine, _req(p, 8, seed=7, temperature=0.9)) for p in prompts]
        seeded_together = await asyncio.gather(*(
            _collect(engine, _req(p, 8, seed=7, temperature=0.9)) for p in prompts))
        return alone, together, seeded, seeded_together

    try:
        alone, together, seeded, seeded_together = asyncio.run(run())
    finally:
        asyncio.run(engine.close())
    for a, b in zip(alone, together):
        assert [t for t, _ in a] == [t for t, _ in b]
        np.testing.assert_allclose([lp for _, lp in a], [lp for _, lp in b], atol=1e-4)
    assert [[t for t, _ in s] for s in seeded] == [[t for t, _ in s] for s in seeded_together]
    assert engine.batched_steps > 0, "the concurrent requests never shared a forward"
    if hasattr(shard, "_forward_rows"):
        assert rows and max(rows) > 1, "the backend never ran several rows as one forward"


def test_completions_of_one_prompt_compute_it_once(tiny_models):
    """Requests for one prompt arriving together (n > 1) follow the first: the prompt is
    fed once, each follower copies its caches and samples on from its own seed; each
    gets what it gets alone."""
    engine = _engine(tiny_models["llama"])
    prompt = list(range(5, 45))
    seeds = (1, 2, 3)

    async def run():
        alone = [await _collect(engine, _req(prompt, 10, logprobs=0, seed=s, temperature=0.9))
                 for s in seeds]
        before = engine.shared_tokens
        together = await asyncio.gather(*(
            _collect(engine, _req(prompt, 10, logprobs=0, seed=s, temperature=0.9))
            for s in seeds))
        return alone, together, before

    try:
        alone, together, before = asyncio.run(run())
    finally:
        asyncio.run(engine.close())
    assert before == 0
    for a, b in zip(alone, together):
        assert [t for t, _ in a] == [t for t, _ in b]
        np.testing.assert_allclose([lp for _, lp in a], [lp for _, lp in b], atol=1e-4)
    assert len({tuple(t for t, _ in a) for a in alone}) > 1, "the seeds gave one text"
    assert engine.shared_tokens == 2 * len(prompt), "the followers fed the prompt again"


def test_long_prompt_interleaves_with_a_running_stream(tiny_models, monkeypatch):
    monkeypatch.setattr(local, "PREFILL_CHUNK", 8)
    engine = _engine(tiny_models["llama"])

    async def run():
        stream = engine.generate(_req([5, 6, 7], 200))
        seen = [await stream.__anext__()]  # the stream is running
        long_first = asyncio.get_running_loop().create_future()

        async def long_one():
            gen = engine.generate(_req(list(range(3, 203)), 2))  # 200 tokens: 25 chunks
            async for _ in gen:
                if not long_first.done():
                    long_first.set_result(len(seen))

        task = asyncio.create_task(long_one())
        while not long_first.done():
            seen.append(await stream.__anext__())
        await task
        await stream.aclose()
        return long_first.result()

    try:
        during = asyncio.run(run())
    finally:
        asyncio.run(engine.close())
    # one prompt chunk per tick and every running stream decodes in each tick
    assert during >= 20, f"the stream produced only {during} tokens during a 25-chunk prefill"


def test_a_short_prompt_does_not_wait_behind_a_long_one(tiny_models, monkeypatch):
    """A short question arriving while another user's long prompt is being fed joins the next
    tick beside that prompt's chunk: its first token comes long before the long prompt's,
    whose chunks go on one a tick."""
    monkeypatch.setattr(local, "PREFILL_CHUNK", 8)
    engine = _engine(tiny_models["llama"])
    order = []

    async def ask(name, prompt):
        async for _ in engine.generate(_req(prompt, 2)):
            order.append(name)
            return

    async def run():
        long_one = asyncio.create_task(ask("long", list(range(3, 203))))  # 25 chunks
        deadline = time.monotonic() + 30
        while not engine.info()["running"]:  # it is in first: the oldest prompt
            assert time.monotonic() < deadline, "the long prompt never started"
            await asyncio.sleep(0.001)
        await asyncio.gather(long_one, ask("short", [5, 6, 7]))

    try:
        asyncio.run(run())
    finally:
        asyncio.run(engine.close())
    assert order == ["short", "long"]


def test_over_the_limit_gets_429_and_abandoned_requests_free_their_caches(tiny_models):
    import threading

    engine = _engine(tiny_models["llama"], max_running=1, max_queued=1)
    shard = engine.shards[0]
    gate, hold = threading.Event(), {"on": False}
    forward = shard.forward

    def gated(items):
        if hold["on"]:
            gate.wait(30)
        return forward(items)

    shard.forward = gated
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 50, "stream": True}
    with ServerThread(build_app(engine)) as srv:
        url = srv.base_url + "/v1/completions"
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", url, json=body) as running:
                assert running.status_code == 200  # its first token is out
                hold["on"] = True  # its next step holds the only running slot
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    waiting = pool.submit(httpx.post, url, json=body, timeout=60)
                    deadline = time.monotonic() + 30
                    while engine.admission.queued < 1:
                        assert time.monotonic() < deadline, "second request never queued"
                        time.sleep(0.01)
                    over = client.post(url, json=body)
                    hold["on"] = False
                    gate.set()
                    assert waiting.result(timeout=60).status_code == 200
                running.read()
        assert over.status_code == 429, over.text
        assert int(over.headers["Retry-After"]) >= 1
        assert over.json()["error"]["code"] == "server_overloaded"
        engine.admission.max_queued = 200  # room for the 100 below (one running at a time)

        def open_and_abandon(_):
            with httpx.stream("POST", srv.base_url + "/v1/completions", json=body,
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # one chunk, then the client goes away

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            list(pool.map(open_and_abandon, range(100)))
        deadline = time.monotonic() + 30
        # what stays is the one cache kept for prefix reuse (the same prompt each time)
        while engine._running or len(shard.pool.used) > len(engine._kept):
            assert time.monotonic() < deadline, \
                f"{len(engine._running)} requests / {len(shard.pool.used)} caches left behind"
            time.sleep(0.05)
        assert len(engine._kept) <= 1


@pytest.mark.parametrize("any_split", [True, False], ids=["to-the-token", "whole-chunks"])
def test_a_prompt_that_starts_like_a_finished_one_reuses_its_chunks(tiny_models, monkeypatch,
                                                                    any_split):
    """Prefix reuse (multi-turn chat): the prompt a finished request computed is not
    computed again, and the numbers are those of a fresh run. A split-invariant backend
    (ONNX Runtime on the CPU) reuses it to the token; others only whole chunks from 0."""
    monkeypatch.setattr(local, "PREFILL_CHUNK", 8)
    first = list(range(5, 35))  # 30 tokens: chunks [0, 8) [8, 16) [16, 24) and a partial one
    second = first[:20] + list(range(100, 105))  # shares 20 tokens: two whole chunks
    engine = _engine(tiny_models["llama"], split_invariant=any_split)
    fresh = _engine(tiny_models["llama"], split_invariant=any_split)
    assert engine.cuts.any_split == any_split
    reqs = {}

    async def run(eng, prompt, key):
        reqs[key] = _req(prompt, 6, logprobs=2)
        return [(s.token_id, s.logprob, s.top_logprobs) async for s in eng.generate(reqs[key])]

    try:
        asyncio.run(run(engine, first, "first"))
        reused = asyncio.run(run(engine, second, "second"))
        want = asyncio.run(run(fresh, second, "fresh"))
        again = asyncio.run(run(engine, first, "again"))  # the first prompt's chunks are gone
    finally:
        asyncio.run(engine.close())
        asyncio.run(fresh.close())
    shared, again_n = (20, 28) if any_split else (16, 24)  # 28: two prompt rows left to feed
    assert reqs["second"].cached_tokens == shared and reqs["fresh"].cached_tokens == 0
    assert reused == want  # token ids, log-probs and alternatives, bit for bit
    assert reqs["again"].cached_tokens == again_n  # the second took a copy: first's stays
    assert len(again) == 6
    assert engine.reused_tokens == shared + again_n


@pytest.mark.parametrize("any_split", [True, False], ids=["to-the-token", "whole-chunks"])
def test_a_prompt_that_starts_like_a_running_one_copies_its_chunks(tiny_models, monkeypatch,
                                                                   any_split):
    """Concurrent users with one system prompt: a request whose prompt starts like a
    running request's takes a copy of what that request fed of it, and gets the numbers of
    a fresh run."""
    monkeypatch.setattr(local, "PREFILL_CHUNK", 8)
    first = list(range(5, 35))
    second = first[:20] + list(range(100, 105))  # 20 tokens (two whole chunks) shared
    engine = _engine(tiny_models["llama"], split_invariant=any_split)
    fresh = _engine(tiny_models["llama"], split_invariant=any_split)

    async def run():
        long = _req(first, 40, logprobs=2)
        gen = engine.generate(long)
        got = [await gen.__anext__()]  # the first request runs: its prompt is in
        req = _req(second, 6, logprobs=2)
        copied = [(s.token_id, s.logprob, s.top_logprobs) async for s in engine.generate(req)]
        got += [s async for s in gen]
        want = [(s.token_id, s.logprob, s.top_logprobs)
                async for s in fresh.generate(_req(second, 6, logprobs=2))]
        return req, copied, want, got

    try:
        req, copied, want, got = asyncio.run(run())
    finally:
        asyncio.run(engine.close())
        asyncio.run(fresh.close())
    shared = 20 if any_split else 16
    assert req.cached_tokens == shared and engine.shared_tokens == shared
    # its decode steps ran batched beside the donor's: the same tokens, log-probs close
    assert [t for t, _, _ in copied] == [t for t, _, _ in want]
    assert [[i for i, _ in top] for _, _, top in copied] == \
        [[i for i, _ in top] for _, _, top in want]
    np.testing.assert_allclose([lp for _, lp, _ in copied], [lp for _, lp, _ in want],
                               atol=1e-4)
    assert len(got) == 40  # the donor went on undisturbed


@pytest.mark.parametrize("any_split", [True, False], ids=["to-the-token", "whole-chunks"])
def test_prompts_arriving_together_feed_their_shared_start_once(tiny_models, monkeypatch,
                                                                any_split):
    """Users of one system prompt arriving at once (an agent's parallel calls): the first
    feeds the shared start, the others wait for it and take a copy, and each gets the text
    of a fresh run."""
    monkeypatch.setattr(local, "PREFILL_CHUNK", 8)
    first = list(range(5, 35))
    second = first[:20] + list(range(100, 105))
    third = first[:12] + list(range(200, 210))
    engine = _engine(tiny_models["llama"], split_invariant=any_split)
    fresh = _engine(tiny_models["llama"], split_invariant=any_split)
    reqs = [_req(p, 6, logprobs=2) for p in (first, second, third)]

    async def run(eng, req):
        return [(s.token_id, s.logprob, s.top_logprobs) async for s in eng.generate(req)]

    async def together():
        return await asyncio.gather(*(run(engine, r) for r in reqs))

    async def alone():
        return [await run(fresh, _req(r.prompt_ids, 6, logprobs=2)) for r in reqs]

    try:
        got = asyncio.run(together())
        want = asyncio.run(alone())
    finally:
        asyncio.run(engine.close())
        asyncio.run(fresh.close())
    shared = (20, 12) if any_split else (16, 8)
    assert [r.cached_tokens for r in reqs] == [0, *shared]
    assert engine.shared_tokens == sum(shared)
    for a, b in zip(got, want):  # decode steps ran batched beside each other
        assert [t for t, _, _ in a] == [t for t, _, _ in b]
        np.testing.assert_allclose([lp for _, lp, _ in a], [lp for _, lp, _ in b], atol=1e-4)


def test_usage_reports_cached_prompt_tokens(tiny_models, monkeypatch):
    monkeypatch.setattr(local, "PREFILL_CHUNK", 8)
    engine = _engine(tiny_models["llama"])
    body = {"model": "tiny", "prompt": list(range(5, 45)), "max_tokens": 3, "temperature": 0}
    with ServerThread(build_app(engine)) as srv:
        url = srv.base_url + "/v1/completions"
        cold = httpx.post(url, json=body, timeout=60).json()["usage"]
        warm = httpx.post(url, json=body, timeout=60).json()["usage"]
    assert cold["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm["prompt_tokens_details"]["cached_tokens"] == 38  # two prompt rows to feed
    assert warm["prompt_tokens"] == cold["prompt_tokens"] == 40
