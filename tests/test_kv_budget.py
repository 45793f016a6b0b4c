"""KV cache memory: what each backend's caches take is what admission counts, ONNX Runtime's
pool gives memory back as requests end, and a local server with a KV budget admits only the
requests whose caches fit (the rest wait their turn, a 429 past the queue, a 400 for one
that could never fit)."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import httpx
import numpy as np
import pytest

from mesh.backends import StepItem, load_shard
from mesh.engine.local import LocalEngine
from mesh.layers import LayerRange
from mesh.models.source import resolve
from mesh.server.app import build_app
from tests.conftest import ServerThread

pytest.importorskip("onnxruntime")


def _shard(path, backend="onnxruntime"):
    source = resolve(str(path))
    return source, load_shard(backend, source, LayerRange.full(source.num_layers), "float32")


@pytest.mark.parametrize("backend,model", [
    ("onnxruntime", "llama"), ("onnxruntime", "gemma3_text"), ("torch", "llama"),
    ("torch", "gemma3_text"), ("mlx", "llama"), ("mlx", "gemma3_text")])
def test_kv_bytes_bound_what_caches_hold(tiny_models, backend, model):
    """``Shard.kv_bytes`` is what admission counts: never less than the caches hold. A
    coordinator counts a node's caches from the layout in its Load reply (JSON), and gets
    the same."""
    import json

    from mesh.backends.base import kv_layout_bytes

    if backend != "onnxruntime":
        pytest.importorskip(backend)
    _, shard = _shard(tiny_models[model], backend)
    rng = np.random.default_rng(0)
    lengths = [3, 40, 200]
    caches = [shard.new_cache() for _ in lengths]
    for cache, n in zip(caches, lengths):
        shard.forward([StepItem("r", rng.integers(5, 200, n).astype(np.int32), cache)])
    held = (shard.pool.nbytes if backend == "onnxruntime"
            else sum(c.nbytes for c in caches))
    counted = shard.kv_bytes(lengths)
    assert 0 < held <= counted, (held, counted)
    sent = json.loads(json.dumps(shard.kv_layout()))  # as the Load reply carries it
    assert kv_layout_bytes(sent, lengths) == counted
    if backend == "torch" and model == "llama":  # no window, no rounding: to the byte
        assert held == counted
    # a sliding window caps what a layer keeps: Gemma's windowed layers count less
    if model == "gemma3_text" and backend == "torch":
        assert shard.kv_bytes([4000]) < shard.kv_layer_bytes * 4000 * len(shard.layers)


def test_the_onnx_pool_gives_memory_back_as_requests_end(tiny_models, monkeypatch):
    from mesh.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "FIRST_CAPACITY", 16)  # the tiny model stops at 256
    monkeypatch.setattr(ort_backend, "SETTLE", 0.5)
    source, shard = _shard(tiny_models["llama"])
    _, alone = _shard(tiny_models["llama"])  # the same request with nobody beside it
    rng = np.random.default_rng(1)
    prompt = rng.integers(5, 200, 12).astype(np.int32)
    keep, ref = shard.new_cache(), alone.new_cache()
    shard.forward([StepItem("keep", prompt, keep)])
    alone.forward([StepItem("keep", prompt, ref)])
    others = [shard.new_cache() for _ in range(7)]
    for i, c in enumerate(others):  # one long prompt makes every slot long
        n = 200 if i == 3 else 20
        shard.forward([StepItem(f"o{i}", rng.integers(5, 200, n).astype(np.int32), c)])
    big = shard.pool.nbytes
    assert shard.pool.slots == 8 and shard.pool.capacity >= 200
    slot_before = keep.slot
    for c in others:
        c.release()
    # it grew just now: it keeps the burst's size for the next burst (no copy of every cache)
    assert shard.pool.slots == 8 and shard.pool.nbytes == big
    deadline = time.monotonic() + 30
    while time.monotonic() - shard.pool._grown_at < ort_backend.SETTLE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # the cache that stayed open goes on with the numbers it would have had alone; its
    # first step, SETTLE seconds after the pool grew, cuts the pool
    for token in (7, 9, 11):
        got = shard.forward([StepItem("keep", np.array([token], np.int32), keep)])[0]
        want = alone.forward([StepItem("keep", np.array([token], np.int32), ref)])[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert shard.pool.slots == 2 and shard.pool.capacity <= 32  # a quarter in use at most
        assert shard.pool.nbytes * 8 <= big, (shard.pool.nbytes, big)
        assert keep.slot < 2 and keep.offset == len(prompt) + 1 + (7, 9, 11).index(token), \
            slot_before
    keep.release()
    assert shard.pool.nbytes == 0 and shard.pool.slots == 0
    c = shard.new_cache()  # and it grows again from nothing
    shard.forward([StepItem("again", prompt, c)])
    assert c.offset == len(prompt) and shard.pool.slots >= 1


def _engine(path, backend="onnxruntime", **kw) -> LocalEngine:
    source, shard = _shard(path, backend)
    return LocalEngine("tiny", [shard], source.tokenizer, 256, **kw)


def _gate(shard):
    """Make ``shard.forward`` wait on the returned event while ``hold['on']``."""
    gate, hold = threading.Event(), {"on": False}
    forward = shard.forward

    def gated(items, **kw):
        if hold["on"]:
            gate.wait(30)
        return forward(items, **kw)

    shard.forward = gated
    return gate, hold


def test_a_kv_budget_admits_what_fits_queues_the_rest_and_refuses_the_impossible(tiny_models):
    pytest.importorskip("torch")  # its caches count to the position (ONNX Runtime's pool
    # counts whole doublings, too coarse for a 256-position model)
    prompt, max_tokens = [5, 6, 7, 8], 40
    positions = len(prompt) + max_tokens
    probe = _engine(tiny_models["llama"], "torch")
    budget = probe._kv_cost([positions] * 2)  # two such requests, not three
    assert probe._kv_cost([positions] * 3) > budget
    engine = _engine(tiny_models["llama"], "torch", kv_budget=budget, max_queued=1)
    gate, hold = _gate(engine.shards[0])
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0}
    with ServerThread(build_app(engine)) as srv:
        url = srv.base_url + "/v1/completions"
        too_long = httpx.post(url, json={**body, "stream": False, "max_tokens": 100})
        assert too_long.status_code == 400, too_long.text
        err = too_long.json()["error"]
        assert err["param"] == "max_tokens" and "--kv-memory" in err["message"]
        with httpx.Client(timeout=60) as client, \
                concurrent.futures.ThreadPoolExecutor(3) as pool:
            with client.stream("POST", url, json=body) as first:
                assert first.status_code == 200
                hold["on"] = True  # the running requests' next steps wait
                second = pool.submit(httpx.post, url, json={**body, "stream": False},
                                     timeout=60)
                deadline = time.monotonic() + 30
                while engine.admission.running < 2:
                    assert time.monotonic() < deadline, "the second request never ran"
                    time.sleep(0.01)
                third = pool.submit(httpx.post, url, json={**body, "stream": False},
                                    timeout=60)
                while engine.admission.queued < 1:  # room for two caches, not three
                    assert time.monotonic() < deadline, "the third request never queued"
                    time.sleep(0.01)
                assert engine.admission.running == 2
                assert engine.info()["memory"]["kv_reserved_bytes"] <= budget
                over = client.post(url, json={**body, "stream": False})
                hold["on"] = False
                gate.set()
                first.read()
                texts = [f.result(timeout=60).json()["choices"][0]["text"]
                         for f in (second, third)]
        assert over.status_code == 429 and over.json()["error"]["code"] == "server_overloaded"
        assert texts[0] == texts[1] and texts[0]  # greedy, the same prompt: the same text
        deadline = time.monotonic() + 30
        while engine.admission.running:
            assert time.monotonic() < deadline, "a slot was never given back"
            time.sleep(0.01)


def test_kept_caches_make_room_for_a_new_request(tiny_models):
    max_tokens = 8
    probe = _engine(tiny_models["llama"])
    budget = probe._kv_cost([12 + max_tokens] * 2)  # one running request + one kept cache
    engine = _engine(tiny_models["llama"], kv_budget=budget)
    rng = np.random.default_rng(2)
    with ServerThread(build_app(engine)) as srv:
        url = srv.base_url + "/v1/completions"
        for _ in range(4):  # four different prompts, one after the other
            prompt = [int(t) for t in rng.integers(5, 200, 12)]
            r = httpx.post(url, json={"model": "tiny", "prompt": prompt,
                                      "max_tokens": max_tokens}, timeout=60)
            assert r.status_code == 200, r.text
        # each new request dropped the oldest kept cache to fit: two stay (the last two
        # prompts), not four, and the pool never grew past two slots
        assert len(engine._kept) == 2, len(engine._kept)
        assert engine.shards[0].pool.slots <= 2
        assert engine.admission.reserved()["this server"] <= budget


def test_an_idle_local_engine_keeps_only_what_its_kept_caches_need(tiny_models):
    import asyncio

    from mesh.engine.base import GenerationRequest
    from mesh.engine.sampling import SamplingParams

    engine = _engine(tiny_models["llama"])
    pool = engine.shards[0].pool
    rng = np.random.default_rng(3)

    async def one(i):
        prompt = [int(t) for t in rng.integers(5, 200, 30 + 20 * i)]
        req = GenerationRequest(f"r{i}", prompt, 6, SamplingParams(temperature=0.0))
        return [s async for s in engine.generate(req)]

    async def burst():
        got = await asyncio.gather(*(one(i) for i in range(8)))
        assert all(len(steps) == 6 for steps in got)
        deadline = time.monotonic() + 30
        while engine._running or pool.slots > 4:  # the scheduler compacts once idle
            assert time.monotonic() < deadline, (len(engine._running), pool.slots)
            await asyncio.sleep(0.01)
        return pool.slots

    assert asyncio.run(burst()) <= 4  # eight slots while the burst ran
    kept = engine._kept_positions()
    assert 0 < len(kept) <= 4 and pool.slots == max(2, 1 << (len(kept) - 1).bit_length())
    assert pool.nbytes == engine.shards[0].kv_bytes(kept)


def _count_growth(pool) -> list[tuple[int, int]]:
    """Every time ``pool`` grows from now on, as (slots, capacity), in a list kept current."""
    grown = []
    resize = pool._resize

    def counting(slots, capacity):
        if slots > pool.slots or capacity > pool.capacity:
            grown.append((slots, capacity))
        resize(slots, capacity)

    pool._resize = counting
    return grown


async def _burst(engine, tag: str, lengths: list[int], max_tokens: int, rng) -> None:
    """Greedy requests with random prompts of ``lengths`` all at once through ``engine``;
    each must give ``max_tokens`` tokens."""
    import asyncio

    from mesh.engine.base import GenerationRequest
    from mesh.engine.sampling import SamplingParams

    async def one(i, n):
        prompt = [int(t) for t in rng.integers(5, 200, n)]
        req = GenerationRequest(f"{tag}{i}", prompt, max_tokens, SamplingParams(temperature=0.0))
        return [s async for s in engine.generate(req)]

    got = await asyncio.gather(*(one(i, n) for i, n in enumerate(lengths)))
    assert all(len(steps) == max_tokens for steps in got)


def test_a_burst_right_after_another_finds_the_pool_grown(tiny_models, monkeypatch):
    """Bursts of requests one after the other (users of one chat service): the pool keeps
    a burst's size, so the next never waits for it to grow (a copy of every
    cache each time it doubles); once nothing has run for SETTLE seconds, it is cut to the
    kept caches."""
    import asyncio

    from mesh.backends import onnxruntime as ort_backend
    from mesh.engine import local

    monkeypatch.setattr(local, "SETTLE", 1.0)
    monkeypatch.setattr(ort_backend, "SETTLE", 1.0)
    engine = _engine(tiny_models["llama"])
    pool = engine.shards[0].pool
    grown = _count_growth(pool)
    rng = np.random.default_rng(4)

    async def burst(tag):
        await _burst(engine, tag, [30 + 7 * i for i in range(8)], 6, rng)

    async def bursts():
        await burst("a")  # 8 slots, then 16 for these 8 beside the 4 caches kept
        await burst("b")
        before = list(grown)
        await burst("c")
        assert before and grown == before, (before, grown)  # the third grew nothing
        deadline = time.monotonic() + 30
        while pool.slots > 4:  # quiet for SETTLE seconds: cut to the kept caches
            assert time.monotonic() < deadline, pool.slots
            await asyncio.sleep(0.05)

    asyncio.run(bursts())
    kept = engine._kept_positions()
    assert 0 < len(kept) <= 4 and pool.nbytes == engine.shards[0].kv_bytes(kept)


def test_a_late_finalizer_never_frees_the_slot_another_cache_took(tiny_models, monkeypatch):
    """A cache collected while another thread holds the pool: its weak entry is gone at
    once, a new cache may take its slot, and only then does its finalizer run. That must
    not free the new cache's slot (a shrink would then leave it pointing past the pool)."""
    from mesh.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "SETTLE", 0.0)  # the pool shrinks as caches end
    _, shard = _shard(tiny_models["llama"])
    pool = shard.pool
    old = shard.new_cache()
    slot, serial = old.slot, old.serial
    old._finalizer.detach()  # run it by hand, late
    del old
    new = shard.new_cache()
    assert new.slot == slot  # the dead cache's slot went to the new one
    pool.free(slot, serial)  # the late finalizer
    assert pool.used.get(new.slot) is new
    others = [shard.new_cache() for _ in range(7)]
    for c in others:
        c.release()  # the pool shrinks: the new cache is moved with it, not left behind
    assert pool.used.get(new.slot) is new and new.slot < pool.slots
    shard.forward([StepItem("new", np.array([5, 6, 7], np.int32), new)])
    assert new.offset == 3


# ---- pipeline nodes -------------------------------------------------------------------------


async def _all(steps) -> list[int]:
    return [s.token_id async for s in steps]


async def _two_run_a_third_waits(engine, req):
    """Two requests run (each stopped after its first token, holding its slot and caches)
    and a third, started then, waits for room: (the first's first token, the first, the
    second, the third's task)."""
    import asyncio

    first, second = engine.generate(req()), engine.generate(req())
    head = [(await first.__anext__()).token_id]
    await second.__anext__()
    third = asyncio.ensure_future(_all(engine.generate(req())))
    deadline = time.monotonic() + 30
    while engine.admission.queued < 1:
        assert time.monotonic() < deadline, "the third request never queued"
        await asyncio.sleep(0.01)
    assert engine.admission.running == 2 and not third.done()
    return head, first, second, third


async def _first_ends_second_goes(head, first, second, third) -> list[list[int]]:
    """The first request runs to its end, the second goes early (its room to the third):
    the first's tokens and the third's."""
    import asyncio

    texts = [head + await _all(first)]
    await second.aclose()
    texts.append(await asyncio.wait_for(third, 60))
    return texts


def test_a_node_refuses_a_cache_its_kv_budget_cannot_hold(tiny_models):
    """The node is the last guard: a first step whose cache (at the ``max_positions`` its
    caller says) would not fit beside the open ones is RESOURCE_EXHAUSTED, a running
    request is never evicted for it, and room comes back as a request ends."""
    pytest.importorskip("torch")
    from mesh.node.runner import StageError, StageRunner

    model = str(tiny_models["llama"])
    probe = StageRunner("torch")
    probe.load(model, 0, 2)
    budget = probe.shard.kv_bytes([50, 50])  # two caches of 50 positions, not three
    runner = StageRunner("torch", kv_memory=budget)
    runner.load(model, 0, 2)
    assert runner.kv_budget == budget

    def first(rid, max_positions):
        return runner.step(rid, 0, [5, 6, 7], None, max_positions=max_positions)

    first("a", 50)
    first("b", 50)
    assert runner.kv_reserved() == budget
    with pytest.raises(StageError) as err:
        first("c", 50)
    assert err.value.status == "RESOURCE_EXHAUSTED" and "--kv-memory" in err.value.message
    assert runner.active() == 2 and runner.step("a", 3, [8], None) is not None  # a runs on
    runner.end("b")
    first("c", 50)  # b's room
    # a caller that says nothing is counted at what it gives: three positions fit
    runner.end("c")
    runner.step("d", 0, [5, 6, 7], None)
    assert runner.kv_reserved() == probe.shard.kv_bytes([50, 3])


def test_a_pipeline_queues_by_its_nodes_kv_budgets(tiny_models):
    """``mesh node --kv-memory``: the node says its budget and layout in its Load reply,
    and the coordinator admits a request only when its caches fit there beside the running
    ones; the next waits its turn, one that never could fit gets a 400."""
    import asyncio

    pytest.importorskip("torch")
    from mesh.engine.base import GenerationRequest
    from mesh.engine.sampling import SamplingParams
    from mesh.errors import InvalidRequest, Overloaded
    from mesh.node.runner import StageRunner
    from mesh.pipeline.coordinator import build_pipeline_engine

    model = str(tiny_models["llama"])
    prompt, max_tokens = [5, 6, 7, 8], 40
    positions = len(prompt) + max_tokens
    probe = StageRunner("torch")
    source = probe.load(model, 0, 2)[1]
    probe.load(model, 0, source.num_layers)
    budget = probe.shard.kv_bytes([positions] * 2)  # the whole model on one node: two
    engine = build_pipeline_engine(model, local_nodes=1, include_self=False, backend="torch",
                                   secret="s" * 16, kv_memory=budget)

    def req(n=max_tokens):
        return GenerationRequest(f"r{os.urandom(4).hex()}", list(prompt), n,
                                 SamplingParams(temperature=0.0))

    async def run():
        [stage] = engine.stages
        assert stage.kv_budget == budget and stage.kv_cost([positions]) > 0
        with pytest.raises(InvalidRequest) as err:
            async for _ in engine.generate(req(200)):
                pass
        assert err.value.param == "max_tokens" and "node local-1" in err.value.message
        head, first, second, third = await _two_run_a_third_waits(engine, req)
        deadline = time.monotonic() + 30  # the heartbeat brings the node's own figures: it
        while stage.memory().get("kv_reserved_bytes") != budget:  # counts both at their
            assert time.monotonic() < deadline, stage.memory()  # longest, as said to it
            await asyncio.sleep(0.05)
        assert stage.memory()["kv_budget_bytes"] == budget
        with pytest.raises(Overloaded) as full:  # the node itself refuses a third cache
            await stage.step("intruder", 0, list(prompt), None, None, len(prompt), False,
                             max_positions=positions)
        assert "--kv-memory" in full.value.message
        return await _first_ends_second_goes(head, first, second, third)

    try:
        texts = asyncio.run(run())
    finally:
        asyncio.run(engine.close())
    # greedy, one prompt: the queued one's text is the same
    assert texts[0] == texts[1] and len(texts[0]) == max_tokens


def test_a_quiet_node_cuts_its_kv_pool_to_the_caches_left_open(tiny_models):
    """A node cannot tell a kept cache from a running request's, so its pool keeps the
    burst's size while any stays open; once no step has come for a while (``settle``, the
    node's reaper) it is cut to what the open caches need, and they go on as before."""
    from mesh.node.runner import StageRunner

    runner = StageRunner("onnxruntime")
    runner.load(str(tiny_models["llama"]), 0, 2)
    pool = runner.shard.pool
    for i in range(8):
        runner.step(f"r{i}", 0, [5 + i, 6, 7, 8], None)
    assert pool.slots == 8
    for i in range(4, 8):
        runner.end(f"r{i}")
    assert pool.slots == 8 and runner.kv_bytes() == pool.nbytes  # half in use: no shrink
    assert not runner.settle(quiet=60.0)  # steps came just now
    assert runner.settle(quiet=0.0) and pool.slots == 4
    assert runner.kv_bytes() == pool.nbytes == runner.shard.kv_bytes([4] * 4)
    assert not runner.settle(quiet=0.0)  # nothing came since: nothing to do
    out = runner.step("r0", 4, [9], None)  # the caches left open go on
    assert out.shape == (1, runner.shard.hidden_size)


def test_a_request_replayed_on_a_new_plan_is_never_refused_for_the_budget(tiny_models):
    """After a node loss, the running requests replay on the new stages: a stream is never
    cut for room (a new request then waits until the caches fit), even where the new nodes'
    budgets could not admit it afresh."""
    import asyncio

    pytest.importorskip("torch")
    from mesh.engine.base import GenerationRequest
    from mesh.engine.sampling import SamplingParams
    from mesh.errors import InvalidRequest
    from mesh.node.runner import StageRunner
    from mesh.pipeline.engine import LocalStage, PipelineEngine

    model = str(tiny_models["llama"])
    source = StageRunner("torch").load(model, 0, 1)[1]
    half, n = source.num_layers // 2, source.num_layers

    def stages(kv_memory):
        out = []
        for name, a, b in (("a", 0, half), ("b", half, n)):
            runner = StageRunner("torch", kv_memory=kv_memory)
            runner.load(model, a, b)
            out.append(LocalStage(name, runner))
        return out

    class Replanner:
        async def replan(self, lost):
            return stages(1024)  # room for a few positions, not for this request afresh

        def close(self):
            return None

    prompt, max_tokens = [5, 6, 7, 8, 9], 30

    def req():
        return GenerationRequest(f"r{os.urandom(4).hex()}", list(prompt), max_tokens,
                                 SamplingParams(temperature=0.0))

    engine = PipelineEngine("tiny", stages(2 ** 30), source.tokenizer, 256,
                            replanner=Replanner())

    async def run():
        want = [s.token_id async for s in engine.generate(req())]
        got = []
        async for s in engine.generate(req()):
            got.append(s.token_id)
            if len(got) == 10:
                await engine._rescue(engine.epoch, "b")  # the plan changes under the stream
        assert engine.stages[0].kv_budget == 1024
        with pytest.raises(InvalidRequest):  # afresh, it could not fit the new nodes
            async for _ in engine.generate(req()):
                pass
        return want, got

    try:
        want, got = asyncio.run(run())
        assert engine.epoch == 1
    finally:
        asyncio.run(engine.close())
    assert got == want and len(got) == max_tokens


def test_a_pipelines_own_stage_cuts_its_pool_once_quiet_not_at_once(tiny_models,
                                                                     monkeypatch):
    """The coordinator's own stage (ONNX Runtime) keeps a burst's pool when its last request
    ends, so a burst right after finds it grown; once nothing has run for SETTLE_QUIET
    seconds it is cut to the caches kept for prefix reuse."""
    import asyncio

    from mesh.backends import onnxruntime as ort_backend
    from mesh.node.runner import StageRunner
    from mesh.pipeline import engine as pipeline_engine
    from mesh.pipeline.engine import LocalStage, PipelineEngine

    monkeypatch.setattr(pipeline_engine, "SETTLE_QUIET", 1.0)
    monkeypatch.setattr(ort_backend, "SETTLE", 1.0)
    model = str(tiny_models["llama"])
    runner = StageRunner("onnxruntime")
    source = runner.load(model, 0, 2)[1]
    last = StageRunner("onnxruntime")
    last.load(model, 2, source.num_layers)
    engine = PipelineEngine("tiny", [LocalStage("a", runner), LocalStage("b", last)],
                            source.tokenizer, 256)
    pool = runner.shard.pool
    grown = _count_growth(pool)
    rng = np.random.default_rng(5)

    async def burst(tag):
        await _burst(engine, tag, [12 + 5 * i for i in range(8)], 4, rng)

    async def run():
        await burst("a")  # 8 slots, then 16 for these 8 beside the 4 caches kept
        await burst("b")
        before = list(grown)
        await burst("c")  # at once: the pool is as the last burst left it
        assert before and grown == before, (before, grown)
        deadline = time.monotonic() + 30
        while pool.slots > 4:  # then, quiet: cut to the (at most 4) kept caches
            assert time.monotonic() < deadline, pool.slots
            await asyncio.sleep(0.05)
        return len(engine._kept)

    try:
        kept = asyncio.run(run())
    finally:
        asyncio.run(engine.close())
    assert 0 < kept <= 4 and len(pool.used) == kept
    assert pool.nbytes == runner.shard.kv_bytes([c.offset for c in pool.used.values()])


def test_a_member_node_refuses_new_requests_not_a_running_ones_copies(tiny_models):
    """An ensemble member's node: a new request that would not fit its budget is refused
    (the ensemble frees kept caches and retries, else a 429), but a copy of a running
    request's cache (pick's scoring pass) is that request's own and never refused."""
    pytest.importorskip("torch")
    from mesh.node.runner import StageError, StageRunner

    model = str(tiny_models["llama"])
    probe = StageRunner("torch")
    source = probe.load(model, 0, 1)[1]
    probe.load(model, 0, source.num_layers)
    runner = StageRunner("torch", kv_memory=probe.shard.kv_bytes([12]))
    runner.load(model, 0, source.num_layers)

    def step(rid, position, tokens, **kw):
        [out] = runner.member_step_many([dict(request_id=rid, position=position,
                                              tokens=tokens, want_dist=False, **kw)])
        return out

    assert not isinstance(step("a", 0, [5, 6, 7, 8, 9, 10]), StageError)
    copy = step("a~1", 3, [11, 12, 13, 14], copy_from="a", score=True)
    assert not isinstance(copy, StageError), copy  # over the budget: a's own
    refused = step("b", 0, [5, 6, 7])
    assert isinstance(refused, StageError) and refused.status == "RESOURCE_EXHAUSTED"
    fresh = step("c", 3, [11], copy_from="a", fresh=True)  # a new request from a's prompt
    assert isinstance(fresh, StageError) and fresh.status == "RESOURCE_EXHAUSTED"


def test_an_ensemble_queues_by_its_members_kv_budgets(tiny_models):
    """``mesh serve --mode ensemble --kv-memory``: a request is admitted when its caches fit
    every member's budget beside the running ones; the next waits, one that never could
    fit gets a 400 naming the member."""
    import asyncio

    pytest.importorskip("torch")
    from mesh.engine.base import GenerationRequest
    from mesh.engine.sampling import SamplingParams
    from mesh.ensemble.coordinator import build_ensemble_engine
    from mesh.errors import InvalidRequest
    from mesh.node.runner import StageRunner

    model = str(tiny_models["llama"])
    prompt, max_tokens = [5, 6, 7, 8], 40
    probe = StageRunner("torch")
    source = probe.load(model, 0, 1)[1]
    probe.load(model, 0, source.num_layers)
    budget = probe.shard.kv_bytes([len(prompt) + max_tokens] * 2)  # two requests a member
    engine = build_ensemble_engine([model, model], "merge", backend="torch",
                                   kv_memory=budget)

    def req(n=max_tokens):
        return GenerationRequest(f"r{os.urandom(4).hex()}", list(prompt), n,
                                 SamplingParams(temperature=0.0))

    async def run():
        assert [m.kv_budget for m in engine.members] == [budget, budget]
        with pytest.raises(InvalidRequest) as err:
            await _all(engine.generate(req(200)))
        assert err.value.param == "max_tokens" and "member 1:" in err.value.message
        head, first, second, third = await _two_run_a_third_waits(engine, req)
        assert [m["kv_reserved_bytes"] for m in engine.info()["members"]] == [budget] * 2
        return await _first_ends_second_goes(head, first, second, third)

    try:
        texts = asyncio.run(run())
    finally:
        asyncio.run(engine.close())
    assert texts[0] == texts[1] and len(texts[0]) == max_tokens
