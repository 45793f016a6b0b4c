"""A node cannot be talked into anything, and a coordinator trusts no node that lacks the
secret: signed bodies, no replays, signed replies, malformed frames answered with a status
(hypothesis-generated), garbage from a node with the secret treated as a fault."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import MeshError
from mesh.layers import LayerRange
from mesh.node import mesh_pb2, mesh_pb2_grpc
from mesh.node.auth import HEADER, call, sign
from mesh.node.codec import to_tensor
from mesh.engine.base import TokenStep
from mesh.pipeline.coordinator import node_info
from mesh.pipeline.engine import RemoteStage, StageLost
from tests.test_pipeline import BACKENDS, SECRET, load_remote, node_servers

STEP = "/mesh.Node/Step"


@pytest.fixture(scope="module")
def last_stage(tiny_models):
    with node_servers(1, BACKENDS[0]) as [(addr, runner)]:
        load_remote(addr, str(tiny_models["llama"]), LayerRange(2, 4, 4))  # samples
        yield addr, runner


def _raw(addr, method=STEP):
    """A call that sends bytes as they are (no serializer): what an attacker can send."""
    return grpc.insecure_channel(addr).unary_unary(method, request_serializer=None,
                                                   response_deserializer=None)


def _good(request_id="g", position=0):
    h = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    return mesh_pb2.StepRequest(request_id=request_id, position=position, tokens=[1, 2, 3],
                                hidden=to_tensor(h))


def _status(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_a_captured_token_is_good_for_one_call_with_one_body(last_stage):
    addr, runner = last_stage
    body = _good("replay").SerializeToString()
    token = sign(SECRET, STEP, body)
    rpc = _raw(addr)
    assert _status(lambda: rpc(body, metadata=((HEADER, token),), timeout=30)) == \
        grpc.StatusCode.OK
    # the same call again (a replay), and the token on another body
    assert _status(lambda: rpc(body, metadata=((HEADER, token),), timeout=30)) == \
        grpc.StatusCode.UNAUTHENTICATED
    other = _good("replay-2").SerializeToString()
    assert _status(lambda: rpc(other, metadata=((HEADER, token),), timeout=30)) == \
        grpc.StatusCode.UNAUTHENTICATED
    runner.end("replay")


def test_malformed_frames_get_invalid_argument(last_stage):
    addr, runner = last_stage
    rpc = _raw(addr)
    junk = b"\xff\xff\xff\xff\x0f garbage"
    assert _status(lambda: rpc(junk, metadata=((HEADER, sign(SECRET, STEP, junk)),),
                               timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
    stub = mesh_pb2_grpc.NodeStub(grpc.insecure_channel(addr))
    huge = mesh_pb2.Tensor(data=b"", shape=[1 << 32, 1 << 32], dtype="float32")  # 2^64
    empty = mesh_pb2.Tensor(data=b"", shape=[0, 1 << 40], dtype="float32")  # 0 bytes
    nan = np.full((3, 64), np.nan, np.float32)
    for req in (mesh_pb2.StepRequest(request_id="h", position=0, tokens=[1, 2, 3], hidden=huge),
                mesh_pb2.StepRequest(request_id="e", position=0, tokens=[1, 2, 3],
                                     hidden=empty),  # found by the generated frames below
                mesh_pb2.StepRequest(request_id="n", position=0, tokens=[1, 2, 3],
                                     hidden=to_tensor(nan)),
                _good("far", position=10_000_000)):  # past the model's context
        assert _status(lambda: call(stub.Step, req, SECRET, STEP, 30)) == \
            grpc.StatusCode.INVALID_ARGUMENT, req.request_id
    assert runner.active() == 0  # nothing was allocated for any of them


_fields = st.fixed_dictionaries({
    "request_id": st.text(max_size=8),
    "position": st.integers(-2 ** 31, 2 ** 31 - 1),
    "tokens": st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), max_size=6),
    "shape": st.lists(st.integers(0, 2 ** 40), max_size=5),
    "dtype": st.sampled_from(["float32", "float16", "int32", "bfloat16", "float64", "", "x"]),
    "data": st.binary(max_size=1024),
    "n_prompt": st.integers(-2 ** 31, 2 ** 31 - 1),
    "allowed": st.binary(max_size=64),
})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=st.one_of(st.binary(max_size=512), _fields))
def test_generated_frames_are_each_answered_with_a_status(last_stage, frame):
    addr, _ = last_stage
    if isinstance(frame, bytes):
        body = frame
    else:
        body = mesh_pb2.StepRequest(
            request_id=frame["request_id"], position=frame["position"], tokens=frame["tokens"],
            n_prompt=frame["n_prompt"], allowed=frame["allowed"],
            hidden=mesh_pb2.Tensor(data=frame["data"], shape=frame["shape"],
                                   dtype=frame["dtype"])).SerializeToString()
    code = _status(lambda: _raw(addr)(body, metadata=((HEADER, sign(SECRET, STEP, body)),),
                                      timeout=30))
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.UNAVAILABLE), code


def test_the_node_still_serves_after_the_frames(last_stage):
    addr, runner = last_stage
    stub = mesh_pb2_grpc.NodeStub(grpc.insecure_channel(addr))
    reply = call(stub.Step, _good("after"), SECRET, STEP, 30)
    assert reply.WhichOneof("out") == "token"
    runner.end("after")


def test_a_node_without_the_secret_never_joins(tiny_models):
    with node_servers(1, BACKENDS[0], secret=None) as [(addr, _)]:
        with pytest.raises(MeshError, match="does not hold the cluster secret"):
            node_info(addr, SECRET)
    with node_servers(1, BACKENDS[0], secret="another-secret-of-16") as [(addr, _)]:
        with pytest.raises(MeshError, match="UNAUTHENTICATED"):
            node_info(addr, SECRET)


@pytest.mark.parametrize("garbage", ["token", "nan"])
def test_garbage_from_a_node_with_the_secret_is_a_fault(last_stage, tiny_models, garbage):
    """A node that holds the secret but returns an impossible token id or non-finite
    activations is treated as lost (re-planned away), never passed on to a client."""
    addr, runner = last_stage
    real = runner.step

    def lying(*args, **kwargs):
        real(*args, **kwargs)  # the honest work happens; only the answer is a lie
        if garbage == "token":
            return TokenStep(-5, None, None)
        return np.full((3, 64), np.inf, np.float32)

    runner.step = lying
    try:
        stage = RemoteStage("liar", addr, SECRET, LayerRange(2, 4, 4), vocab_size=320)
        h = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)

        async def go():
            try:
                return await stage.step("lie-" + garbage, 0, [1, 2, 3], h, None, 3, False)
            finally:
                await stage.close()

        with pytest.raises(StageLost, match="faulty"):
            asyncio.run(go())
    finally:
        runner.step = real
        runner.end("lie-" + garbage)


def test_a_short_secret_is_one_line_at_the_cli():
    out = subprocess.run([sys.executable, "-m", "mesh", "node", "--secret", "abc",
                          "--no-discovery"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "at least 16 characters" in lines[0], out.stderr


@pytest.mark.parametrize("way", ["session", "unary"])
def test_a_reply_changed_in_transit_is_caught(tiny_models, monkeypatch, way):
    """A relay that alters a reply's bytes (here: one byte of the activations, after the node
    signed them) is caught by the reply's HMAC, as a frame on a Session stream or as a unary
    call's reply; the stage is treated as faulty."""
    from mesh.node import auth

    signed = auth.AuthInterceptor.intercept_service

    def flip(body: bytes) -> bytes:
        return body[:-50] + bytes([body[-50] ^ 0x55]) + body[-49:] if len(body) > 100 \
            else body

    def tampering(self, continuation, details):
        handler = signed(self, continuation, details)
        if handler.stream_stream is not None:
            frames = handler.stream_stream

            def stream(raws, context):
                for body in frames(raws, context):
                    yield flip(body)
            return grpc.stream_stream_rpc_method_handler(stream)
        inner = handler.unary_unary

        def run(raw, context):
            body = inner(raw, context)
            return flip(body) if details.method == STEP else body
        return grpc.unary_unary_rpc_method_handler(run)

    monkeypatch.setattr(auth.AuthInterceptor, "intercept_service", tampering)
    with node_servers(1, BACKENDS[0]) as [(addr, runner)]:
        load_remote(addr, str(tiny_models["llama"]), LayerRange(0, 2, 4))  # sends hidden states
        stage = RemoteStage("relayed", addr, SECRET, LayerRange(0, 2, 4))
        stage.link.sessions = way == "session"

        async def go():
            try:
                return await stage.step("t", 0, [1, 2, 3], None, None, 3, False)
            finally:
                await stage.close()

        with pytest.raises(StageLost, match="not signed with the cluster secret"):
            asyncio.run(go())
        assert (stage.link.unary, stage.link.frames) == ((0, 0) if way == "session" else (1, 0))


def test_a_thousand_abandoned_requests_stay_within_the_cap(last_stage):
    addr, runner = last_stage
    stub = mesh_pb2_grpc.NodeStub(grpc.insecure_channel(addr))
    codes = [_status(lambda i=i: call(stub.Step, _good(f"abandoned-{i}"), SECRET, STEP, 30))
             for i in range(1000)]
    assert codes.count(grpc.StatusCode.OK) == runner.max_requests
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert runner.active() == runner.max_requests
    held = runner.kv_bytes()
    runner.idle_timeout = 0.0  # abandoned: the reaper frees them
    try:
        assert runner.evict_idle() == runner.max_requests and runner.active() == 0
    finally:
        runner.idle_timeout = 60
    # a legitimate client is served after all that
    assert call(stub.Step, _good("legit"), SECRET, STEP, 30).WhichOneof("out") == "token"
    runner.end("legit")
    assert held > 0  # the 64 caches were real, and counted (what /metrics reports as kv)
