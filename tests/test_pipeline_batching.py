"""The pipeline's micro-batches: concurrent requests share each stage's forward (one StepMany
per stage), a request's numbers in a batch are those it gets alone when batch-invariant, a
lone step marked ``batched`` repeats a batched step bit for bit (what a replay relies on), a
refused item in a batch leaves the others running, and a seeded request rescued onto a new
plan continues its random draws where they stopped."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from mesh.engine.base import GenerationRequest, TokenStep
from mesh.engine.sampling import SamplingParams
from mesh.layers import LayerRange
from mesh.node import mesh_pb2
from mesh.node.auth import call
from mesh.node.codec import to_tensor
from mesh.node.runner import StageRunner
from mesh.pipeline.engine import LocalStage, PipelineEngine

pytest.importorskip("onnxruntime")

MODEL = "smollm2-135m"


def _stage(name: str, source, start: int, end: int) -> LocalStage:
    runner = StageRunner("onnxruntime")
    runner._sources[MODEL] = source
    runner.load(MODEL, start, end, "onnxruntime", "auto")  # the file's own 4-bit blocks
    return LocalStage(name, runner)


def _stages(source):
    half = source.num_layers // 2
    return [_stage("a", source, 0, half), _stage("b", source, half, source.num_layers)]


class _Replanner:
    def __init__(self, make):
        self.make = make

    async def replan(self, lost):
        return self.make()

    def close(self):
        return None


def _req(prompt, n, seed=None, temperature=0.0, logprobs=0):
    return GenerationRequest(request_id=os.urandom(8).hex(), prompt_ids=list(prompt),
                             max_tokens=n, sampling=SamplingParams(
                                 temperature=temperature, seed=seed, logprobs=logprobs))


async def _collect(engine, req, delay=0.0):
    await asyncio.sleep(delay)  # join at a different step: not a wait for a condition
    return [(s.token_id, s.logprob) async for s in engine.generate(req)]


def test_micro_batches_give_each_request_its_numbers_alone(smollm2, monkeypatch):
    monkeypatch.setenv("MESH_BATCH_INVARIANT", "1")
    engine = PipelineEngine(MODEL, _stages(smollm2), smollm2.tokenizer, 2048)
    prompts = [smollm2.tokenizer.encode(t) for t in (
        "The capital of France is", "Once upon a time, in a small village by the sea,",
        "def fibonacci(n):", "Water boils at", "List three colours:")]

    async def run():
        alone = [await _collect(engine, _req(p, 10)) for p in prompts]
        together = await asyncio.gather(*(_collect(engine, _req(p, 10), 0.01 * i)
                                          for i, p in enumerate(prompts)))
        seeded = [await _collect(engine, _req(p, 8, seed=3, temperature=0.9)) for p in prompts]
        seeded_together = await asyncio.gather(*(
            _collect(engine, _req(p, 8, seed=3, temperature=0.9)) for p in prompts))
        return alone, together, seeded, seeded_together

    try:
        alone, together, seeded, seeded_together = asyncio.run(run())
        assert engine._batcher.batched_steps > 0, "the requests never shared a forward"
    finally:
        asyncio.run(engine.close())
    assert together == alone  # tokens and log-probs, bit for bit
    assert seeded_together == seeded


def test_a_lone_step_marked_batched_repeats_a_batched_step(smollm2):
    """ONNX Runtime's int8-activation MatMulNBits rounds a one-row product differently from
    a many-row one; a replay marks the steps that first ran batched and gets their bits."""
    runner = StageRunner("onnxruntime")
    runner._sources[MODEL] = smollm2
    runner.load(MODEL, 0, smollm2.num_layers, "onnxruntime", "auto")
    prompts = [[1, 500, 600, 700], [1, 42, 43], [1, 9000, 9001, 9002, 9003, 9004]]
    sampling = SamplingParams(temperature=0.0, logprobs=0)

    def prefill(tag):
        for i, p in enumerate(prompts):
            runner.step(f"{tag}{i}", 0, p, None, sampling, len(p), True)

    prefill("x")
    batch = runner.step_many([dict(request_id=f"x{i}", position=len(p), tokens=[7],
                                   hidden=None, batched=True) for i, p in enumerate(prompts)])
    prefill("y")
    lone = [runner.step(f"y{i}", len(p), [7], None, batched=True)
            for i, p in enumerate(prompts)]
    assert all(isinstance(c, TokenStep) for c in batch + lone)
    assert [(c.token_id, c.logprob) for c in lone] == [(c.token_id, c.logprob) for c in batch]


def test_a_refused_item_leaves_the_rest_of_the_batch_running(tiny_models):
    import grpc

    from tests.test_pipeline import BACKENDS, SECRET, load_remote, node_servers

    with node_servers(1, BACKENDS[0]) as [(addr, runner)]:
        stub = load_remote(addr, str(tiny_models["llama"]), LayerRange(2, 4, 4))  # last stage
        h = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
        for rid in ("p", "q"):
            call(stub.Step, mesh_pb2.StepRequest(request_id=rid, position=0, tokens=[1, 2, 3],
                                                 hidden=to_tensor(h), n_prompt=3),
                 SECRET, "/mesh.Node/Step", 30)

        def item(rid, pos):
            return mesh_pb2.StepRequest(request_id=rid, position=pos, tokens=[4],
                                        hidden=to_tensor(h[:1]))

        reply = call(stub.StepMany, mesh_pb2.StepBatch(items=[
            item("p", 3), item("nobody", 3), item("q", 9)]),
            SECRET, "/mesh.Node/StepMany", 30)
        assert [r.status for r in reply.replies] == ["", "NOT_FOUND", "FAILED_PRECONDITION"]
        assert reply.replies[0].WhichOneof("out") == "token"
        assert reply.replies[0].position == 4
        # q's cache is untouched by its refused step: its right step still runs
        again = call(stub.StepMany, mesh_pb2.StepBatch(items=[item("q", 3), item("p", 4)]),
                     SECRET, "/mesh.Node/StepMany", 30)
        assert [r.status for r in again.replies] == ["", ""]
        for bad in ([item("p", 5), item("p", 5)], []):  # one request twice; nothing
            with pytest.raises(grpc.RpcError) as err:
                call(stub.StepMany, mesh_pb2.StepBatch(items=bad), SECRET,
                     "/mesh.Node/StepMany", 30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert runner.active() == 2


@pytest.mark.parametrize("invariant", [False, True])
def test_seeded_requests_rescued_continue_their_random_draws(smollm2, monkeypatch, invariant):
    """A re-plan mid-stream: each request replays its history on the new stages, every step
    as it first ran, and samples on from where its draws stopped, so its text is the text of
    an undisturbed run (one request alone, or several batch-invariant)."""
    if invariant:
        monkeypatch.setenv("MESH_BATCH_INVARIANT", "1")
    prompts = [smollm2.tokenizer.encode(t) for t in (
        "Tell me a story about a dragon.", "My favourite food is", "The weather today")]
    prompts = prompts if invariant else prompts[:1]
    engine = PipelineEngine(MODEL, _stages(smollm2), smollm2.tokenizer, 2048,
                            replanner=_Replanner(lambda: _stages(smollm2)))
    n = 24

    async def run():
        want = await asyncio.gather(*(_collect(engine, _req(p, n, seed=11, temperature=1.0))
                                      for p in prompts))
        seen = [0]

        async def watched(p):
            out = []
            async for s in engine.generate(_req(p, n, seed=11, temperature=1.0)):
                out.append((s.token_id, s.logprob))
                seen[0] += 1
            return out

        tasks = [asyncio.create_task(watched(p)) for p in prompts]
        deadline = asyncio.get_running_loop().time() + 120
        while seen[0] < 8 * len(prompts):
            assert asyncio.get_running_loop().time() < deadline, "no tokens"
            await asyncio.sleep(0.005)
        await engine._rescue(engine.epoch, "b")  # the pipeline changes under the streams
        got = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return want, got

    try:
        want, got = asyncio.run(run())
        assert engine.epoch == 1
    finally:
        asyncio.run(engine.close())
    assert [[t for t, _ in g] for g in got] == [[t for t, _ in w] for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose([lp for _, lp in g], [lp for _, lp in w], atol=1e-5)


def test_micro_batches_move_caches_together_without_changing_them(smollm2):
    """Each micro-batch computes only its own rows: the KV pool moves caches so that a
    group's slots are contiguous. A cache moved (swapped) keeps its contents."""
    from mesh.backends import load_shard
    from mesh.backends.base import StepItem

    full = LayerRange.full(smollm2.num_layers)
    moved, fixed = (load_shard("onnxruntime", smollm2, full, "auto") for _ in range(2))
    prompts = [np.arange(3 + 4 * i, 9 + 7 * i, dtype=np.int32) for i in range(6)]

    def prefill(shard):
        caches = [shard.new_cache() for _ in prompts]
        for c, p in zip(caches, prompts):
            shard.forward([StepItem("p", p, c)])
        return caches

    a, b = prefill(moved), prefill(fixed)
    tok = np.array([11], dtype=np.int32)
    for _ in range(3):
        for group in ([1, 4], [0, 5, 3], [2]):
            got = moved.forward([StepItem(str(i), tok, a[i], batched=True) for i in group])
            want = [fixed.forward([StepItem(str(i), tok, b[i], batched=True)])[0]
                    for i in group]
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
    assert sorted(c.slot for c in a) == list(range(6))
    assert {c.slot for c in (a[1], a[4])} in ({0, 1}, {1, 2}, {2, 3}, {3, 4}, {4, 5})


def test_streams_abandoned_mid_micro_batch_leave_nothing_behind(smollm2):
    """Clients that go away while their steps wait for, or ride in, a micro-batch: every
    stage frees their caches, the batcher forgets them, and the pipeline serves on."""
    import concurrent.futures
    import time

    import httpx

    from mesh.server.app import build_app
    from tests.conftest import ServerThread

    stages = _stages(smollm2)
    engine = PipelineEngine(MODEL, stages, smollm2.tokenizer, 2048)
    body = {"model": MODEL, "max_tokens": 200, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Count slowly from one to a hundred."}]}

    def open_and_abandon(i):
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body,
                          timeout=120) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen > i % 4:  # leave after 1 to 4 chunks: at different steps
                        break

    try:
        with ServerThread(build_app(engine)) as srv:
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(open_and_abandon, range(40)))
            deadline = time.monotonic() + 60
            while (engine.admission.running or engine._batcher.running
                   or any(s.runner.active() for s in stages)):
                assert time.monotonic() < deadline, (
                    f"left behind: {engine.admission.running} running, "
                    f"{len(engine._batcher.running)} in the batcher, "
                    f"{[s.runner.active() for s in stages]} caches")
                time.sleep(0.05)
            r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=120,
                           json={**body, "stream": False, "max_tokens": 5})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
            assert engine._batcher.batched_steps > 0
    finally:
        asyncio.run(engine.close())


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_follow_up_prompt_reuses_the_caches_the_nodes_kept(tiny_models, monkeypatch,
                                                             backend):
    """A finished request's fed prompt stays on every stage (an in-process one and a real
    gRPC node); a prompt that starts the same way starts from a copy of it (cut back to what
    it shares: to the token where every stage is split-invariant, else whole chunks) and
    gets the numbers of a fresh pipeline; a kept cache the node no longer holds falls back
    to feeding the prompt from 0."""
    from mesh.engine.base import longest_kept_prefix
    from mesh.models.source import resolve
    from mesh.pipeline import engine as pe
    from tests.test_pipeline import build_pipeline, node_servers

    monkeypatch.setattr(pe, "PREFILL_CHUNK", 8)
    ref = str(tiny_models["llama"])
    src = resolve(ref)
    first = list(range(5, 35))  # 30 tokens: chunks [0, 8) [8, 16) [16, 24) and a partial one
    second = first[:20] + list(range(100, 105))  # shares 20 tokens: two whole chunks
    third = second[:22] + [7, 8, 9]
    reqs = {}

    async def run(eng, prompt, key):
        reqs[key] = _req(prompt, 6, logprobs=2)
        out, gen = [], eng.generate(reqs[key])
        async for s in gen:  # stop at the finish and close, as the server does
            out.append((s.token_id, s.logprob, s.top_logprobs))
            if s.finish_reason:
                break
        await gen.aclose()
        return out

    any_split = backend == "onnxruntime"  # on the CPU; torch's sums depend on the cut
    with node_servers(2, backend) as nodes:
        engine = build_pipeline(ref, src, [2], [nodes[0][0]], backend)
        fresh = build_pipeline(ref, src, [2], [nodes[1][0]], backend)
        assert [s.split_invariant for s in engine.stages] == [any_split] * 2  # the node says
        remote = nodes[0][1]
        try:
            asyncio.run(run(engine, first, "first"))
            assert remote.active() == 1  # kept, not ended
            reused = asyncio.run(run(engine, second, "second"))
            want = asyncio.run(run(fresh, second, "fresh"))
            assert remote.active() == len(engine._kept) == 2  # the first's stays: copied
            # the node lost the kept cache the third would copy (reaped): fed from 0
            key, _ = longest_kept_prefix(engine._kept, third, pe.cuts_for(engine.stages))
            assert remote.end(engine._kept[key][0])
            missed = asyncio.run(run(engine, third, "third"))
            want_third = asyncio.run(run(fresh, third, "fresh third"))
        finally:
            asyncio.run(engine.close())
            asyncio.run(fresh.close())
        shared = 20 if any_split else 16
        assert reqs["second"].cached_tokens == shared and reqs["fresh"].cached_tokens == 0
        assert reused == want  # token ids, log-probs and alternatives
        assert reqs["third"].cached_tokens == 0 and missed == want_third
        assert engine.reused_tokens == shared
        # what the engine keeps is all the nodes hold: no cache leaked by the miss
        assert remote.active() == len(engine._kept) == 2


def test_a_request_id_used_again_is_not_a_lost_node(tiny_models):
    """A caller that gives two requests one id (the server never does; a library user or a
    benchmark may): the first's caches are kept on the nodes under that id, and the second
    must not be taken for it. Before, its first step met the kept cache at another position:
    the request failed on an in-process stage, and on a node (FAILED_PRECONDITION) the
    coordinator re-planned as if the node was lost (benchmarks/pipeline.py did so)."""
    from mesh.models.source import resolve
    from tests.test_pipeline import build_pipeline, node_servers

    ref = str(tiny_models["llama"])
    src = resolve(ref)
    prompt = list(range(5, 40))

    async def run(eng, key):
        req = GenerationRequest(request_id=key, prompt_ids=prompt, max_tokens=6,
                                sampling=SamplingParams(temperature=0.0))
        return [s.token_id async for s in eng.generate(req)]

    with node_servers(1, "onnxruntime") as nodes:
        engine = build_pipeline(ref, src, [2], [nodes[0][0]], "onnxruntime")
        try:
            first = asyncio.run(run(engine, "same"))
            assert any(e[0] == "same" for e in engine._kept.values())  # kept under its id
            again = asyncio.run(run(engine, "same"))
        finally:
            asyncio.run(engine.close())
    assert again == first
    assert engine.epoch == 0, "a re-plan: the second request was taken for a lost node"
    assert engine.reused_tokens > 0  # and it still started from the kept prompt


def test_prompts_arriving_together_feed_their_shared_start_once_on_every_stage(
        tiny_models, monkeypatch):
    """Users of one system prompt arriving at once: the second waits for the first's prompt
    to be in and copies the start they share on every stage (an in-process one and a gRPC
    node), to the token on ONNX Runtime, and gets the text of a fresh pipeline."""
    from mesh.models.source import resolve
    from mesh.pipeline import engine as pe
    from tests.test_pipeline import build_pipeline, node_servers

    monkeypatch.setattr(pe, "PREFILL_CHUNK", 8)
    ref = str(tiny_models["llama"])
    src = resolve(ref)
    first = list(range(5, 35))
    second = first[:20] + list(range(100, 105))
    reqs = [_req(first, 6, logprobs=2), _req(second, 6, logprobs=2)]

    async def run(eng, req):
        out, gen = [], eng.generate(req)
        async for s in gen:
            out.append((s.token_id, s.logprob, s.top_logprobs))
            if s.finish_reason:
                break
        await gen.aclose()
        return out

    async def together(eng):
        return await asyncio.gather(*(run(eng, r) for r in reqs))

    with node_servers(2, "onnxruntime") as nodes:
        engine = build_pipeline(ref, src, [2], [nodes[0][0]], "onnxruntime")
        fresh = build_pipeline(ref, src, [2], [nodes[1][0]], "onnxruntime")
        try:
            got = asyncio.run(together(engine))
            want = [asyncio.run(run(fresh, _req(r.prompt_ids, 6, logprobs=2))) for r in reqs]
        finally:
            asyncio.run(engine.close())
            asyncio.run(fresh.close())
        assert [r.cached_tokens for r in reqs] == [0, 20] and engine.shared_tokens == 20
        for a, b in zip(got, want):  # their decode steps ran batched beside each other
            assert [t for t, _, _ in a] == [t for t, _, _ in b]
            np.testing.assert_allclose([lp for _, lp, _ in a], [lp for _, lp, _ in b],
                                       atol=1e-4)
        assert nodes[0][1].active() == len(engine._kept)  # nothing left behind


def test_the_choices_of_one_prompt_copy_its_chunks_on_every_stage(tiny_models, monkeypatch):
    """Requests for one prompt running together (``n`` > 1): the first feeds it, the others
    wait and copy its whole chunks on every stage (an in-process one and a gRPC node), then
    feed the last chunk and sample from their own seeds: each gets its text alone."""
    from mesh.models.source import resolve
    from mesh.pipeline import engine as pe
    from tests.test_pipeline import BACKENDS, build_pipeline, node_servers

    monkeypatch.setattr(pe, "PREFILL_CHUNK", 8)
    ref = str(tiny_models["llama"])
    src = resolve(ref)
    prompt = list(range(5, 35))  # 30 tokens: 3 whole chunks copied, the last 6 fed by each
    seeds = (1, 2, 3)

    async def one(eng, seed):
        out, gen = [], eng.generate(_req(prompt, 8, seed=seed, temperature=0.9))
        async for s in gen:  # stop at the finish and close, as the server does
            out.append((s.token_id, s.logprob))
            if s.finish_reason:
                break
        await gen.aclose()
        return out

    async def together(eng):
        return await asyncio.gather(*(one(eng, s) for s in seeds))

    with node_servers(2, BACKENDS[0]) as nodes:
        engine = build_pipeline(ref, src, [2], [nodes[0][0]], BACKENDS[0])
        fresh = build_pipeline(ref, src, [2], [nodes[1][0]], BACKENDS[0])
        try:
            shared = asyncio.run(together(engine))
            alone = [asyncio.run(one(fresh, s)) for s in seeds]
        finally:
            asyncio.run(engine.close())
            asyncio.run(fresh.close())
        assert engine.shared_tokens == 2 * 24
        for a, b in zip(alone, shared):
            assert [t for t, _ in a] == [t for t, _ in b]
            np.testing.assert_allclose([lp for _, lp in a], [lp for _, lp in b], atol=1e-4)
        assert len({tuple(t for t, _ in a) for a in alone}) > 1, "the seeds gave one text"
        assert nodes[0][1].active() == len(engine._kept)  # nothing left behind


def test_a_prompt_copies_the_chunks_a_running_request_shares_with_it(tiny_models,
                                                                     monkeypatch):
    """A prompt that starts with whole chunks a running request has fed (one long system
    prompt, many users) copies them on every stage (an in-process one and a gRPC node)
    instead of computing them, and gets the numbers of a fresh pipeline."""
    from mesh.models.source import resolve
    from mesh.pipeline import engine as pe
    from tests.test_pipeline import BACKENDS, build_pipeline, node_servers

    monkeypatch.setattr(pe, "PREFILL_CHUNK", 8)
    ref = str(tiny_models["llama"])
    src = resolve(ref)
    first = list(range(5, 45))  # 40 tokens: five whole chunks
    second = first[:20] + list(range(100, 106))  # shares two whole chunks (16 tokens)
    reqs = {}

    async def run(eng, prompt, key, n, until=None):
        reqs[key] = _req(prompt, n, logprobs=2)
        out, gen = [], eng.generate(reqs[key])
        async for s in gen:
            out.append((s.token_id, s.logprob, s.top_logprobs))
            if s.finish_reason or (until is not None and until.done()):
                break
        await gen.aclose()
        return out

    async def together(eng):
        done = asyncio.get_running_loop().create_future()
        long = asyncio.ensure_future(run(eng, first, "first", 180, until=done))
        deadline = asyncio.get_running_loop().time() + 60
        while "first" not in reqs or \
                eng._prompt_fed.get(reqs["first"].request_id, ((), 0))[1] < 16:
            assert asyncio.get_running_loop().time() < deadline, "the first prompt stalled"
            assert not long.done(), "the first request ended before its prompt was fed"
            await asyncio.sleep(0.001)
        try:
            return await run(eng, second, "second", 6)
        finally:
            done.set_result(True)
            await long

    with node_servers(2, BACKENDS[0]) as nodes:
        engine = build_pipeline(ref, src, [2], [nodes[0][0]], BACKENDS[0])
        fresh = build_pipeline(ref, src, [2], [nodes[1][0]], BACKENDS[0])
        try:
            copied = asyncio.run(together(engine))
            want = asyncio.run(run(fresh, second, "fresh", 6))
        finally:
            asyncio.run(engine.close())
            asyncio.run(fresh.close())
        assert reqs["second"].cached_tokens == 16 and engine.shared_tokens == 16
        assert [t for t, _, _ in copied] == [t for t, _, _ in want]
        np.testing.assert_allclose([lp for _, lp, _ in copied], [lp for _, lp, _ in want],
                                   atol=1e-4)
        assert not engine._prompt_fed  # nothing noted for requests that ended
        assert nodes[0][1].active() == len(engine._kept)  # nothing left behind
