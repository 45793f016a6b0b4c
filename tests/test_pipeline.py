"""Pipeline mode: node servers on loopback port 0, bad input on the wire, and parity with
LocalEngine on tiny and real models."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
import pytest

from mesh.backends import load_shard
from mesh.devices import detect_local
from mesh.engine.base import GenerationRequest
from mesh.engine.local import LocalEngine
from mesh.engine.sampling import SamplingParams
from mesh.layers import LayerRange
from mesh.models.source import resolve
from mesh.node import mesh_pb2, mesh_pb2_grpc
from mesh.node.auth import call
from mesh.node.codec import to_tensor
from mesh.node.runner import StageRunner
from mesh.node.service import NodeService, create_server
from mesh.pipeline.engine import LocalStage, PipelineEngine, RemoteStage
from tests.conftest import BACKENDS

SECRET = "test-secret-of-the-mesh"


@contextlib.contextmanager
def node_servers(n: int, backend: str, secret: str | None = SECRET):
    servers = []
    try:
        for i in range(n):
            runner = StageRunner(backend, idle_timeout=60)
            service = NodeService(runner, detect_local(backend), f"node{i}")
            server, port = create_server(service, "127.0.0.1", 0, secret)
            servers.append((server, f"127.0.0.1:{port}", runner))
        yield [(addr, runner) for _, addr, runner in servers]
    finally:
        for server, _, _ in servers:
            server.stop(grace=None)


def load(addr, model, rng, secret=SECRET):
    """(the node's stub, its Load reply)."""
    stub = mesh_pb2_grpc.NodeStub(grpc.insecure_channel(addr))
    return stub, call(stub.Load, mesh_pb2.LoadRequest(model=model, start=rng.start,
                                                      end=rng.end), secret, "/mesh.Node/Load", 300)


def load_remote(addr, model, rng, secret=SECRET):
    return load(addr, model, rng, secret)[0]


def build_pipeline(model_ref, source, cuts, addresses, backend, local_first=True):
    """Stages at ``cuts``: the first in process (like the coordinator), the rest remote."""
    n = source.num_layers
    bounds = [0, *cuts, n]
    ranges = [LayerRange(a, b, n) for a, b in zip(bounds, bounds[1:])]
    stages = []
    for i, r in enumerate(ranges):
        if i == 0 and local_first:
            runner = StageRunner(backend)
            runner._sources[model_ref] = source
            runner.load(model_ref, r.start, r.end)
            stages.append(LocalStage("self", runner))
        else:
            addr = addresses[i - (1 if local_first else 0)]
            _, loaded = load(addr, model_ref, r)
            stages.append(RemoteStage(f"node{i}", addr, SECRET, r,
                                      split_invariant=loaded.split_invariant))
    return PipelineEngine(source.name, stages, source.tokenizer, 2048)


def tokens_of(engine, prompt_ids, n, sampling=SamplingParams(temperature=0.0)):
    async def go():
        req = GenerationRequest("r", prompt_ids, n, sampling)
        out = []
        gen = engine.generate(req)
        async for step in gen:
            out.append(step)
        await gen.aclose()
        return out

    return asyncio.run(go())


# ---- bad input on the wire ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_node(tiny_models):
    backend = BACKENDS[0]
    with node_servers(1, backend) as [(addr, runner)]:
        ref = str(tiny_models["llama"])
        load_remote(addr, ref, LayerRange(2, 4, 4))  # a last stage: samples
        yield addr, runner


def _step(addr, secret=SECRET, **kw):
    stub = mesh_pb2_grpc.NodeStub(grpc.insecure_channel(addr))
    return call(stub.Step, mesh_pb2.StepRequest(**kw), secret, "/mesh.Node/Step", 30)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


def test_wire_errors_are_statuses_and_node_keeps_serving(tiny_node):
    addr, runner = tiny_node
    h = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    ok = dict(request_id="a", position=0, tokens=[1, 2, 3], hidden=to_tensor(h))
    assert _code(lambda: _step(addr, secret="wrong", **ok)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: _step(addr, secret=None, **ok)) == grpc.StatusCode.UNAUTHENTICATED
    bad_dtype = mesh_pb2.Tensor(data=h.astype(np.float64).tobytes(), shape=[3, 64],
                                dtype="float64")
    assert _code(lambda: _step(addr, **{**ok, "hidden": bad_dtype})) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: _step(addr, **{**ok, "hidden": to_tensor(h[:, :32])})) == \
        grpc.StatusCode.INVALID_ARGUMENT
    short = mesh_pb2.Tensor(data=b"\0" * 12, shape=[3, 64], dtype="float32")
    assert _code(lambda: _step(addr, **{**ok, "hidden": short})) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: _step(addr, request_id="ghost", position=5, tokens=[1],
                               hidden=to_tensor(h[:1]))) == grpc.StatusCode.NOT_FOUND
    # a good step, then one out of order
    reply = _step(addr, **ok)
    assert reply.WhichOneof("out") == "token" and reply.position == 3
    assert _code(lambda: _step(addr, request_id="a", position=7, tokens=[4],
                               hidden=to_tensor(h[:1]))) == grpc.StatusCode.FAILED_PRECONDITION
    # still serving: the next in-order step works, and End frees the cache
    assert _step(addr, request_id="a", position=3, tokens=[4],
                 hidden=to_tensor(h[:1])).position == 4
    stub = mesh_pb2_grpc.NodeStub(grpc.insecure_channel(addr))
    assert call(stub.End, mesh_pb2.EndRequest(request_id="a"), SECRET, "/mesh.Node/End",
                10).existed
    assert runner.active() == 0


def test_idle_caches_are_evicted(tiny_node):
    addr, runner = tiny_node
    h = np.zeros((1, 64), np.float32)
    _step(addr, request_id="idle", position=0, tokens=[1], hidden=to_tensor(h))
    assert runner.active() == 1
    runner.idle_timeout = 0.0
    try:
        assert runner.evict_idle() == 1 and runner.active() == 0
    finally:
        runner.idle_timeout = 60


def test_load_errors_are_statuses(tiny_models):
    with node_servers(1, BACKENDS[0]) as [(addr, _)]:
        stub = mesh_pb2_grpc.NodeStub(grpc.insecure_channel(addr))
        with pytest.raises(grpc.RpcError) as info:
            call(stub.Load, mesh_pb2.LoadRequest(model="no-such-model", start=0, end=1), SECRET,
                 "/mesh.Node/Load", 60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            call(stub.Load, mesh_pb2.LoadRequest(model=str(tiny_models["llama"]), start=3, end=9),
                 SECRET, "/mesh.Node/Load", 60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            _step(addr, request_id="x", position=0, tokens=[1])
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# ---- parity ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_pipeline_logprobs_match_local(tiny_models, backend):
    ref = str(tiny_models["gemma3_text"])
    source = resolve(ref)
    local = LocalEngine("m", [load_shard(backend, source, LayerRange.full(6))],
                        source.tokenizer, 2048)
    params = SamplingParams(temperature=0.0, logprobs=5)
    prompt = list(range(3, 23))
    want = tokens_of(local, prompt, 12, params)
    with node_servers(2, backend) as nodes:
        pipe = build_pipeline(ref, source, [2, 4], [a for a, _ in nodes], backend)
        got = tokens_of(pipe, prompt, 12, params)
        asyncio.run(pipe.close())
    assert [s.token_id for s in got] == [s.token_id for s in want]
    for g, w in zip(got, want):
        assert [t for t, _ in g.top_logprobs] == [t for t, _ in w.top_logprobs]
        np.testing.assert_allclose([v for _, v in g.top_logprobs],
                                   [v for _, v in w.top_logprobs], atol=1e-4)


@pytest.mark.real
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_smollm2_greedy_tokens_equal_local(smollm2, stages):
    backend = BACKENDS[0]
    n = smollm2.num_layers
    prompt = smollm2.tokenizer.chat_prompt(
        [{"role": "user", "content": "Write a haiku about the sea."}])
    local = LocalEngine("smollm2-135m", [load_shard(backend, smollm2, LayerRange.full(n))],
                        smollm2.tokenizer, 2048)
    want = [s.token_id for s in tokens_of(local, prompt, 40)]
    cuts = {1: [], 2: [13], 3: [7, 22]}[stages]
    with node_servers(stages, backend) as nodes:
        addrs = [a for a, _ in nodes]
        pipe = build_pipeline("smollm2-135m", smollm2, cuts, addrs, backend,
                              local_first=stages > 1)
        got = [s.token_id for s in tokens_of(pipe, prompt, 40)]
        # seeded sampling through the pipeline matches too
        sp = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
        sampled = [s.token_id for s in tokens_of(pipe, prompt, 20, sp)]
        asyncio.run(pipe.close())
    assert got == want
    assert sampled == [s.token_id for s in tokens_of(local, prompt, 20, sp)]
