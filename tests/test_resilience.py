"""Surviving node loss with real processes and real faults: kill -9 mid-stream, hot standby,
and a clean 503 when the survivors cannot hold the model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import time

import httpx
import openai
import pytest

from mesh.pipeline.coordinator import build_pipeline_engine
from mesh.server.app import build_app
from tests.conftest import ServerThread

pytestmark = pytest.mark.real

MODEL = "smollm2-135m"
ASK = dict(model=MODEL, temperature=0, max_tokens=60,
           messages=[{"role": "user", "content": "Explain why the sky is blue."}])


def _client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def _stream_with_kill(client, victim, after_chunks=8):
    """Stream ASK; kill -9 ``victim`` after a few chunks; return the full text."""
    pieces, killed = [], False
    for chunk in client.chat.completions.create(stream=True, **ASK):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if not killed and len(pieces) >= after_chunks:
            os.kill(victim.pid, signal.SIGKILL)
            killed = True
    assert killed, "the stream ended before the kill"
    return "".join(pieces)


def test_kill_middle_stage_mid_stream_completes_with_same_text():
    engine = build_pipeline_engine(MODEL, local_nodes=2, secret="s" * 16, context_length=2048)
    try:
        assert [s.name for s in engine.stages] == ["coordinator", "local-1", "local-2"]
        with ServerThread(build_app(engine)) as srv:
            client = _client(srv)
            clean = client.chat.completions.create(**ASK).choices[0].message.content
            text = _stream_with_kill(client, engine.node_processes["local-1"])
            assert text == clean
            meta = client.models.list().data[0].model_extra["meta"]
            assert "local-1" not in [s["node"] for s in meta["stages"]]
            assert any("lost local-1" in e for e in meta["events"])
            # new requests are served by the new plan
            again = client.chat.completions.create(**ASK).choices[0].message.content
            assert again == clean
    finally:
        asyncio.run(engine.close())


def test_hot_standby_takes_over_the_lost_range():
    engine = build_pipeline_engine(MODEL, local_nodes=3, standby_nodes=1, include_self=False,
                                   secret="s" * 16, context_length=2048)
    try:
        names = [s.name for s in engine.stages]
        assert names == ["local-1", "local-2"]
        before = {s.name: s.layers for s in engine.stages}
        with ServerThread(build_app(engine)) as srv:
            client = _client(srv)
            clean = client.chat.completions.create(**ASK).choices[0].message.content
            text = _stream_with_kill(client, engine.node_processes["local-1"])
            assert text == clean
            after = {s.name: s.layers for s in engine.stages}
            assert after == {"standby-3": before["local-1"], "local-2": before["local-2"]}
    finally:
        asyncio.run(engine.close())


def test_losing_capacity_gives_clean_503_and_no_hang():
    # three nodes of 0.3 GiB hold SmolLM2 fp32 at a 2048 context; two cannot
    engine = build_pipeline_engine(MODEL, local_nodes=3, include_self=False, secret="s" * 16,
                                   context_length=2048, node_memory_gb=0.3,
                                   dtype="float32")
    try:
        assert len(engine.stages) == 3
        with ServerThread(build_app(engine)) as srv:
            body = {**ASK, "stream": True, "max_tokens": 200}

            def stream_one(_):
                """The error as an event in the stream, or, when it came before the first
                token, as the response's own 503: never a silent end."""
                events = []
                with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body,
                                  timeout=60) as r:
                    if r.status_code != 200:
                        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
                        return [r.read().decode(), "[DONE]"]
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                return events

            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                futures = [pool.submit(stream_one, i) for i in range(3)]
                deadline = time.monotonic() + 60
                while engine.stages[0].bytes_received == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                os.kill(engine.node_processes["local-2"].pid, signal.SIGKILL)
                results = [f.result(timeout=90) for f in futures]  # none hangs
            for events in results:
                assert events[-1] == "[DONE]"
                err = json.loads(events[-2])
                assert err["error"]["code"] == "model_too_large_for_remaining_capacity"
            r = httpx.post(srv.base_url + "/v1/chat/completions", json=ASK, timeout=60)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "model_too_large_for_remaining_capacity"
    finally:
        asyncio.run(engine.close())


SECRET = "s" * 16


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(port: int, log, node_id: str = "back", *more: str):
    """``mesh node --node-id NODE_ID [MORE]`` at 127.0.0.1:``port``, once it answers."""
    import subprocess
    import sys

    from mesh.errors import MeshError
    from mesh.pipeline.coordinator import node_info

    with open(log, "a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "node", "--host", "127.0.0.1", "--port", str(port),
             "--node-id", node_id, "--no-discovery", "--secret", SECRET, *more],
            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 60
    while True:
        try:
            node_info(f"127.0.0.1:{port}", SECRET, timeout=1.0)
            return proc
        except MeshError:
            assert proc.poll() is None and time.monotonic() < deadline, open(log).read()
            time.sleep(0.1)


def _wait_for_stages(engine, names: list[str]) -> None:
    deadline = time.monotonic() + 60
    while [s.name for s in engine.stages] != names:
        assert time.monotonic() < deadline, engine.events
        time.sleep(0.1)


def test_a_lost_node_that_answers_again_rejoins_the_plan(tmp_path):
    """A node killed mid-run and started again at its address (a machine rebooted): once no
    request runs, the coordinator finds it answering and re-plans onto it, instead of
    serving on the survivors for good."""
    port = _free_port()
    node = _start_node(port, tmp_path / "node.log")
    engine = build_pipeline_engine(MODEL, peers=[f"127.0.0.1:{port}"], secret=SECRET,
                                   context_length=2048, lost_after=1.0)
    try:
        assert [s.name for s in engine.stages] == ["coordinator", "back"]
        with ServerThread(build_app(engine)) as srv:
            client = _client(srv)
            clean = client.chat.completions.create(**ASK).choices[0].message.content
            assert _stream_with_kill(client, node) == clean
            assert [s.name for s in engine.stages] == ["coordinator"]
            node = _start_node(port, tmp_path / "node.log")  # back, holding nothing
            _wait_for_stages(engine, ["coordinator", "back"])
            meta = client.models.list().data[0].model_extra["meta"]
            assert meta["lost"] == [] and any("back answers again" in e for e in meta["events"])
            assert client.chat.completions.create(**ASK).choices[0].message.content == clean
    finally:
        asyncio.run(engine.close())
        node.kill()
        node.wait()


def test_a_peer_started_after_the_coordinator_joins_when_it_answers(tmp_path):
    """``mesh serve --peer`` before the node is up (machines booting in any order): the
    coordinator serves without it, says whom it waits for, and plans it in once it answers."""
    port = _free_port()
    engine = build_pipeline_engine(MODEL, peers=[f"127.0.0.1:{port}"], secret=SECRET,
                                   context_length=2048)
    node = None
    try:
        assert [s.name for s in engine.stages] == ["coordinator"]
        with ServerThread(build_app(engine)) as srv:
            client = _client(srv)
            meta = client.models.list().data[0].model_extra["meta"]
            assert meta["waiting_for"] == [f"127.0.0.1:{port}"]
            alone = client.chat.completions.create(**ASK).choices[0].message.content
            node = _start_node(port, tmp_path / "node.log")
            _wait_for_stages(engine, ["coordinator", "back"])
            meta = client.models.list().data[0].model_extra["meta"]
            assert meta["waiting_for"] == [] and any("back joins" in e for e in meta["events"])
            assert client.chat.completions.create(**ASK).choices[0].message.content == alone
    finally:
        asyncio.run(engine.close())
        if node is not None:
            node.kill()
            node.wait()


def test_a_model_left_without_a_home_is_served_again_when_the_node_returns(tmp_path):
    """Three nodes of 0.3 GiB hold SmolLM2 fp32 and two cannot: a node killed makes the
    re-plan fail and requests get 503 ``model_too_large_for_remaining_capacity``; the node
    started again at its address is planned back in (the rejoin does not wait for the plan
    to want it: without it the model has no home), and the 503s end with the first text."""
    ports = [_free_port() for _ in range(3)]
    names = ["n1", "n2", "n3"]
    nodes = [_start_node(p, tmp_path / f"{n}.log", n, "--memory-gb", "0.3")
             for p, n in zip(ports, names)]
    engine = build_pipeline_engine(MODEL, peers=[f"127.0.0.1:{p}" for p in ports],
                                   include_self=False, secret=SECRET, context_length=2048,
                                   dtype="float32", lost_after=1.0)
    try:
        assert sorted(s.name for s in engine.stages) == names
        with ServerThread(build_app(engine)) as srv:
            client = _client(srv)
            clean = client.chat.completions.create(**ASK).choices[0].message.content
            nodes[1].kill()
            nodes[1].wait()
            deadline = time.monotonic() + 60
            while True:  # the heartbeat finds it lost; the re-plan fails: a clean 503
                r = httpx.post(srv.base_url + "/v1/chat/completions", json=ASK, timeout=60)
                if r.status_code == 503 and r.json()["error"]["code"] == \
                        "model_too_large_for_remaining_capacity":
                    assert int(r.headers["Retry-After"]) >= 1
                    break
                assert r.status_code in (200, 503) and time.monotonic() < deadline, r.text
                time.sleep(0.2)
            meta = client.models.list().data[0].model_extra["meta"]
            assert "n2" in meta["lost"] and any("re-plan failed" in e for e in meta["events"])
            nodes[1] = _start_node(ports[1], tmp_path / "n2.log", "n2", "--memory-gb", "0.3")
            deadline = time.monotonic() + 60
            while engine.lost:  # (the failed re-plan left the old stages listed)
                assert time.monotonic() < deadline, engine.events
                time.sleep(0.1)
            assert sorted(s.name for s in engine.stages) == names
            meta = client.models.list().data[0].model_extra["meta"]
            assert meta["lost"] == [] and any("n2 answers again" in e for e in meta["events"])
            assert client.chat.completions.create(**ASK).choices[0].message.content == clean
    finally:
        asyncio.run(engine.close())
        for node in nodes:
            node.kill()
            node.wait()
