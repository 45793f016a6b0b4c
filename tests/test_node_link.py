"""Calls to a node as frames on open Session streams (mesh.node.link): the same answers as
unary calls, signed frames only, a status per frame, unary calls where a node has no
Session or no room for one, a frame that is not answered in time, streams that end with
their caller."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time

import grpc
import numpy as np
import pytest

from mesh.devices import detect_local
from mesh.engine.sampling import SamplingParams
from mesh.layers import LayerRange
from mesh.node import mesh_pb2, mesh_pb2_grpc
from mesh.node.auth import HEADER, frame_mac, sign
from mesh.node.link import MAX_STREAMS, NodeLink
from mesh.node.runner import StageRunner
from mesh.node.service import NodeService, create_server
from mesh.pipeline.engine import RemoteStage, StageLost
from tests.conftest import BACKENDS
from tests.test_node_security import _status
from tests.test_pipeline import SECRET, load_remote

GREEDY = SamplingParams(temperature=0.0)
LAST = LayerRange(2, 4, 4)  # of the tiny llama: hidden states in, a sampled token out


class OldNode(NodeService):
    """A node from before Session: gRPC answers UNIMPLEMENTED for it."""
    Session = mesh_pb2_grpc.NodeServicer.Session


@contextlib.contextmanager
def node(tiny_models, service_type=NodeService):
    runner = StageRunner(BACKENDS[0], idle_timeout=60)
    service = service_type(runner, detect_local(BACKENDS[0]), "linked")
    server, port = create_server(service, "127.0.0.1", 0, SECRET)
    addr = f"127.0.0.1:{port}"
    try:
        load_remote(addr, str(tiny_models["llama"]), LAST)
        yield addr, service
    finally:
        server.stop(grace=None)


def hidden(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


def steps(stage: RemoteStage, rid: str, n: int) -> list[int]:
    """A prompt of 3 positions, then n - 1 one-position steps: the sampled tokens."""
    async def go():
        out = [await stage.step(rid, 0, [1, 2, 3], hidden(0), GREEDY, 3, False)]
        for i in range(1, n):
            out.append(await stage.step(rid, 2 + i, [5], hidden(i, 1), None, 3, False))
        await stage.end(rid)
        return [t.token_id for t in out]
    return asyncio.run(go())


def wait_for(cond, what: str, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_frames_answer_as_unary_calls_do(tiny_models):
    with node(tiny_models) as (addr, service):
        framed = RemoteStage("framed", addr, SECRET, LAST)
        plain = RemoteStage("plain", addr, SECRET, LAST)
        plain.link.sessions = False
        assert steps(framed, "a", 6) == steps(plain, "b", 6)
        # six steps and the End, each a frame on one stream (the End after the last reply)
        assert (framed.link.frames, framed.link.unary) == (7, 0)
        assert (plain.link.frames, plain.link.unary) == (0, 7)
        # the stream ended with the asyncio.run that opened it
        wait_for(lambda: service.sessions == 0, "the node to see the session end")


def test_refusals_come_back_per_frame_and_the_stream_stays(tiny_models):
    with node(tiny_models) as (addr, service):
        stage = RemoteStage("s", addr, SECRET, LAST)

        async def go():
            with pytest.raises(Exception, match="hidden states must have shape"):
                await stage.step("bad", 0, [1, 2], hidden(0, 2)[:, :10], None, 2, False)
            ok = await stage.step("good", 0, [1, 2, 3], hidden(0), None, 3, False)
            return ok, len(stage.link._streams)

        ok, streams = asyncio.run(go())
        assert ok.token_id >= 0 and streams == 1
        assert stage.link.frames == 2 and stage.link.unary == 0


def _session(addr: str, secret: str | None = SECRET, nonce: str = "n" * 24):
    stub = mesh_pb2_grpc.NodeStub(grpc.insecure_channel(addr))
    metadata = ((HEADER, sign(secret, "/mesh.Node/Session", b"", nonce=nonce)),) \
        if secret else ()
    return stub, metadata


def _frame(seq: int, method: str = "End", body: bytes | None = None, secret=SECRET,
           nonce: str = "n" * 24) -> mesh_pb2.Frame:
    if body is None:
        body = mesh_pb2.EndRequest(request_id="x").SerializeToString()
    return mesh_pb2.Frame(seq=seq, method=method, body=body,
                          mac=frame_mac(secret, nonce, seq, method, body))


def test_a_session_takes_only_signed_rising_frames(tiny_models):
    with node(tiny_models) as (addr, service):
        stub, md = _session(addr, None)  # no secret
        assert _status(lambda: list(stub.Session(iter([_frame(1)]), metadata=md))) == \
            grpc.StatusCode.UNAUTHENTICATED
        stub, md = _session(addr, nonce="a" * 24)
        forged = _frame(1, secret="not-the-cluster-secret", nonce="a" * 24)
        assert _status(lambda: list(stub.Session(iter([forged]), metadata=md))) == \
            grpc.StatusCode.UNAUTHENTICATED
        stub, md = _session(addr, nonce="b" * 24)
        replayed = [_frame(1, nonce="b" * 24), _frame(1, nonce="b" * 24)]
        seen = []
        assert _status(lambda: seen.extend(stub.Session(iter(replayed), metadata=md))) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert len(seen) == 1 and not seen[0].status  # the first ran, its copy did not
        assert seen[0].mac == frame_mac(SECRET, "b" * 24, 1, "End", seen[0].body, "", "")
        stub, md = _session(addr, nonce="b" * 24)  # the header again: a replayed stream
        assert _status(lambda: list(stub.Session(iter([_frame(2, nonce="b" * 24)]),
                                               metadata=md))) == \
            grpc.StatusCode.UNAUTHENTICATED
        # per-frame refusals, and the stream carries on after each
        stub, md = _session(addr, nonce="c" * 24)
        frames = [_frame(1, "Load", b"", nonce="c" * 24),
                  _frame(2, "Step", b"\xff\xff\xff", nonce="c" * 24),
                  _frame(3, nonce="c" * 24)]
        replies = list(stub.Session(iter(frames), metadata=md))
        assert [r.status for r in replies] == ["UNIMPLEMENTED", "INVALID_ARGUMENT", ""]
        assert [r.seq for r in replies] == [1, 2, 3]
        wait_for(lambda: service.sessions == 0, "every session to end")


def test_a_node_without_session_is_called_unary(tiny_models):
    with node(tiny_models, OldNode) as (addr, _):
        old = RemoteStage("old", addr, SECRET, LAST)
        with node(tiny_models) as (addr2, _):
            new_tokens = steps(RemoteStage("new", addr2, SECRET, LAST), "n", 4)
        assert steps(old, "o", 4) == new_tokens
        assert old.link.sessions is False
        assert (old.link.frames, old.link.unary) == (0, 5)


def test_a_node_with_every_session_taken_is_called_unary(tiny_models):
    with node(tiny_models) as (addr, service):
        service.max_sessions = 0
        stage = RemoteStage("busy", addr, SECRET, LAST)
        steps(stage, "b", 3)
        assert stage.link.sessions is True  # it may have room later
        assert (stage.link.frames, stage.link.unary) == (0, 4)


def test_more_concurrent_calls_than_streams_go_unary(tiny_models):
    with node(tiny_models) as (addr, service):
        stage = RemoteStage("wide", addr, SECRET, LAST)
        n = MAX_STREAMS + 3

        async def go():
            out = await asyncio.gather(*(stage.step(f"w{i}", 0, [1, 2, 3], hidden(i), None,
                                                    3, False) for i in range(n)))
            return out, len(stage.link._streams)

        out, streams = asyncio.run(go())
        assert len(out) == n and streams == MAX_STREAMS
        assert stage.link.frames == MAX_STREAMS and stage.link.unary == 3


def test_a_frame_not_answered_in_time_fails_its_call_and_the_next_opens_a_stream(
        tiny_models, monkeypatch):
    with node(tiny_models) as (addr, service):
        link = NodeLink(addr, SECRET)
        held = threading.Event()
        real = service.End

        def stuck(request, context):
            held.wait(20)
            return real(request, context)

        monkeypatch.setattr(service, "End", stuck)

        async def go():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await link.call("End", mesh_pb2.EndRequest(request_id="x"), 0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            held.set()
            monkeypatch.setattr(service, "End", real)
            reply = await link.call("End", mesh_pb2.EndRequest(request_id="x"), 5.0)
            return reply, len(link._streams)

        reply, streams = asyncio.run(go())
        assert not reply.existed and streams == 1 and link.frames == 1


def test_a_lost_node_fails_the_call_on_its_stream(tiny_models):
    with node(tiny_models) as (addr, service):
        stage = RemoteStage("doomed", addr, SECRET, LAST)

        async def first():
            return await stage.step("d", 0, [1, 2, 3], hidden(0), None, 3, False)

        loop = asyncio.new_event_loop()
        loop.run_until_complete(first())
        assert len(stage.link._idle) == 1
    # the node is gone (its server stopped); the idle stream ended with it
    try:
        with pytest.raises(StageLost):
            loop.run_until_complete(stage.step("d", 3, [5], hidden(1, 1), None, 3, False))
    finally:
        loop.run_until_complete(stage.close())
        loop.close()


def test_a_call_to_a_node_that_is_gone_fails_at_once(tiny_models):
    """A new stream to a node that went away after the channel reached it fails its call as
    a lost stage at once, not after the step's 30 s timeout. (gRPC's stream write waits for
    the stream to open without looking at its end; after two nodes were killed, End calls
    on new streams hung there: tests/test_chaos.py's "two" fault. This test did not catch
    that race on its own; it checks that the guard against it fails fast.)"""
    stage = None
    loop = asyncio.new_event_loop()
    try:
        with node(tiny_models) as (addr, _):
            stage = RemoteStage("gone", addr, SECRET, LAST)
            stage.link.sessions = False  # the channel connects, no stream is open
            loop.run_until_complete(stage.step("g", 0, [1, 2, 3], hidden(0), GREEDY, 3,
                                               False))
        stage.link.sessions = True

        async def go():
            t0 = time.monotonic()
            with pytest.raises(StageLost):
                await stage.step("g", 3, [5], hidden(1, 1), None, 3, False)
            return time.monotonic() - t0

        unretrieved = []
        loop.set_exception_handler(lambda _, ctx: unretrieved.append(ctx["message"]))
        assert loop.run_until_complete(go()) < 10.0
        loop.run_until_complete(asyncio.sleep(0.05))
        gc.collect()  # a task whose exception nobody retrieved says so when it is freed
        assert unretrieved == []  # it did once, as an ERROR on every lost node
    finally:
        if stage is not None:
            loop.run_until_complete(stage.close())
        loop.close()
