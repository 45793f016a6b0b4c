"""Streams are never cut: a re-plan retires stages only after no request uses them, any
failure inside a stream becomes an error event followed by [DONE], membership survives
re-plans, load is not mistaken for loss, and local nodes die with their coordinator."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mesh.engine.base import Engine, GenerationRequest, TokenStep
from mesh.engine.sampling import SamplingParams
from mesh.node.runner import StageRunner
from mesh.pipeline.engine import LocalStage, PipelineEngine
from mesh.server.app import build_app
from tests.conftest import ServerThread


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _local_stage(name: str, path: str, start: int, end: int) -> LocalStage:
    runner = StageRunner("torch")
    runner.load(path, start, end)
    return LocalStage(name, runner)


class _Replanner:
    def __init__(self, make):
        self.make = make
        self.calls = 0

    async def replan(self, lost):
        self.calls += 1
        return self.make()

    def close(self):
        return None


async def _tokens(engine, prompt, n=6) -> list[int]:
    req = GenerationRequest(request_id=os.urandom(8).hex(), prompt_ids=prompt, max_tokens=n,
                            sampling=SamplingParams(temperature=0.0))
    return [s.token_id async for s in engine.generate(req)]


def test_replan_does_not_cut_requests_queued_on_a_retired_local_stage(tiny_models):
    """The cause of the cut streams: a re-plan closed the coordinator's own stage while a
    request's step was queued on its executor; the queued step was cancelled and the
    CancelledError (not an Exception) ended the HTTP stream with no error and no [DONE]."""
    path = str(tiny_models["llama"])
    from mesh.models.source import resolve

    source = resolve(path, progress=False)
    old = [_local_stage("a", path, 0, 2), _local_stage("b", path, 2, 4)]
    replanner = _Replanner(lambda: [_local_stage("c", path, 0, 2),
                                    _local_stage("d", path, 2, 4)])
    engine = PipelineEngine("tiny", old, source.tokenizer, 256, replanner=replanner)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13]]

    entered, release = threading.Event(), threading.Event()
    real_step = old[0].runner.step
    armed = {"on": False}

    def gated_step(*args, **kwargs):
        if armed["on"]:
            armed["on"] = False
            entered.set()
            release.wait(30)
        return real_step(*args, **kwargs)

    old[0].runner.step = gated_step

    async def run():
        reference = [await _tokens(engine, p) for p in prompts]
        armed["on"] = True
        tasks = [asyncio.create_task(_tokens(engine, p)) for p in prompts]
        await asyncio.to_thread(entered.wait, 30)
        # the second request's step is queued behind the gated one on the same executor
        deadline = time.monotonic() + 30
        while old[0]._executor._work_queue.qsize() < 1:
            assert time.monotonic() < deadline, "second request never queued"
            await asyncio.sleep(0.01)
        await engine._rescue(engine.epoch, "b")
        assert engine.stages[0].name == "c"
        assert not old[0]._executor._shutdown, "a stage in use was closed by the re-plan"
        release.set()
        got = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return reference, got

    try:
        reference, got = asyncio.run(run())
        assert got == reference
        assert old[0]._executor._shutdown and old[1]._executor._shutdown, \
            "retired stages are closed once the last request leaves them"
    finally:
        asyncio.run(engine.close())


class _FailingEngine(Engine):
    """Yields a few tokens, then fails the way a closed executor does."""

    model_id = "fail"
    context_length = 64

    def __init__(self, tokenizer, exc):
        self.tokenizer = tokenizer
        self.exc = exc

    async def generate(self, request):
        for t in (5, 6, 7):
            yield TokenStep(t)
        fut = asyncio.get_running_loop().create_future()
        if self.exc == "cancel":
            fut.cancel()
            await fut  # CancelledError from below, not a cancellation of this task
        raise self.exc


@pytest.mark.parametrize("exc", ["cancel", RuntimeError("boom")])
def test_any_failure_in_a_stream_is_an_error_event_then_done(tiny_models, exc):
    from mesh.models.source import resolve

    tok = resolve(str(tiny_models["llama"]), progress=False).tokenizer
    with ServerThread(build_app(_FailingEngine(tok, exc))) as srv:
        body = {"model": "fail", "prompt": "hi", "max_tokens": 10, "stream": True}
        with httpx.stream("POST", srv.base_url + "/v1/completions", json=body,
                          timeout=30) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"], "error events always carry a code"
        # the server stays healthy
        assert httpx.get(srv.base_url + "/health", timeout=10).status_code == 200


# ---- real processes ---------------------------------------------------------------------

MODEL = "smollm2-135m"
PROMPTS = ["Explain why the sky is blue.", "Name three fruits.", "What is 2+2?",
           "Write a haiku about rain.", "Who wrote Hamlet?", "Describe a cat.",
           "What is the capital of Italy?", "Count to five."]


def _stream(base_url: str, prompt: str, max_tokens: int) -> tuple[str, list[str]]:
    body = {"model": MODEL, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "messages": [{"role": "user", "content": prompt}]}
    events = []
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=180) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if e != "[DONE]" and "choices" in json.loads(e)
                   and json.loads(e)["choices"])
    return text, events


def _check_streams(results, clean):
    """Every stream completed with the undisturbed text, or ended with an error event and
    [DONE]: none was cut."""
    completed = 0
    for (text, events), want in zip(results, clean):
        assert events and events[-1] == "[DONE]", f"cut stream: {events[-3:]}"
        last = json.loads(events[-2])
        if "error" in last:
            assert last["error"]["code"]
        else:
            assert text == want
            completed += 1
    return completed


@pytest.mark.real
def test_kill_neighbour_of_coordinator_stage_then_second_fault(monkeypatch):
    from mesh.pipeline.coordinator import build_pipeline_engine

    # a request's greedy text is then the same alone or in a batch: the undisturbed text is
    # one request alone, and the streams after the loss must still write it
    monkeypatch.setenv("MESH_BATCH_INVARIANT", "1")
    engine = build_pipeline_engine(MODEL, local_nodes=3, secret="s" * 16, context_length=1024,
                                   lost_after=3.0)
    try:
        assert [s.name for s in engine.stages][0] == "coordinator"
        with ServerThread(build_app(engine)) as srv:
            clean = [_stream(srv.base_url, p, 40)[0] for p in PROMPTS]
            with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
                futures = [pool.submit(_stream, srv.base_url, p, 40) for p in PROMPTS]
                _wait(lambda: engine.stages[1].bytes_received > 20_000, 120, "streams to run")
                os.kill(engine.node_processes["local-1"].pid, signal.SIGKILL)
                results = [f.result(timeout=300) for f in futures]
            completed = _check_streams(results, clean)
            assert completed >= len(PROMPTS) - 1, f"only {completed} streams completed"
            assert "local-1" not in [s.name for s in engine.stages]
            # membership keeps working after a re-plan: a second loss, with no request
            # running, is noticed by the heartbeat within lost_after + 2 s
            victim = engine.stages[-1].name
            t0 = time.monotonic()
            os.kill(engine.node_processes[victim].pid, signal.SIGKILL)
            _wait(lambda: any(f"lost {victim}" in e for e in engine.events), 5.0 + 2,
                  "the second loss to be detected")
            assert time.monotonic() - t0 <= 5.0 + 2
            health = httpx.get(srv.base_url + "/health", timeout=10).json()
            assert health["heartbeat"]["running"]
            # and a new request is served by the plan after that
            _wait(lambda: victim not in [s.name for s in engine.stages], 30, "second re-plan")
            text, events = _stream(srv.base_url, PROMPTS[0], 40)
            assert events[-1] == "[DONE]" and text == clean[0]
    finally:
        asyncio.run(engine.close())


@pytest.mark.real
def test_hundred_concurrent_streams_on_a_healthy_pipeline_lose_nothing():
    from mesh.pipeline.coordinator import build_pipeline_engine

    engine = build_pipeline_engine(MODEL, local_nodes=2, include_self=False, secret="s" * 16,
                                   context_length=512)
    try:
        with ServerThread(build_app(engine)) as srv:
            prompts = [f"Say the number {i}." for i in range(100)]
            with concurrent.futures.ThreadPoolExecutor(100) as pool:
                results = list(pool.map(lambda p: _stream(srv.base_url, p, 4), prompts))
            for text, events in results:
                assert events[-1] == "[DONE]"
                assert all("error" not in json.loads(e) for e in events[:-1]), events[-2]
            assert engine.epoch == 0 and not engine.lost, engine.events
    finally:
        asyncio.run(engine.close())


@pytest.mark.real
def test_sigkill_of_the_coordinator_leaves_no_node_behind(tmp_path):
    import psutil

    cmd = [sys.executable, "-m", "mesh", "serve", "--mode", "pipeline", "--local-nodes", "1",
           "--no-discovery", "--host", "127.0.0.1", "--port", "0", "--context-length", "512"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        me = psutil.Process(proc.pid)
        _wait(lambda: any("mesh" in " ".join(c.cmdline()) and "node" in c.cmdline()
                          for c in me.children(recursive=True)), 180, "the local node")
        nodes = [c for c in me.children(recursive=True) if "node" in c.cmdline()]
        # wait until the coordinator has loaded its stage too (it logs the endpoint)
        _wait(lambda: "OpenAI endpoint" in _drain(proc), 300, "the coordinator")
        proc.kill()
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(nodes, timeout=15)
        assert not alive, f"orphaned node processes: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()


_seen: dict[int, str] = {}


def serve_process(extra: list[str]) -> tuple[subprocess.Popen, str]:
    """A real `mesh serve --mode pipeline --local-nodes 1` on a free loopback port, waited on
    until /health answers (or the process exits: its stderr in the assertion)."""
    from benchmarks.concurrency import _port

    port = _port()
    cmd = [sys.executable, "-m", "mesh", "serve", "--mode", "pipeline", "--local-nodes", "1",
           "--no-discovery", "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(base + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None
    try:
        _wait(up, 300, "the server")
        assert proc.poll() is None, _drain(proc)
    except BaseException:
        proc.kill()
        raise
    return proc, base


def _drain(proc) -> str:
    """Read what the process has written to stderr so far (non-blocking)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    out = _seen.get(proc.pid, "")
    while sel.select(timeout=0):
        line = proc.stderr.readline()
        if not line:
            break
        out += line
    sel.close()
    _seen[proc.pid] = out
    return out


def _sse_events(url: str, body: dict, got_token: threading.Event) -> list[str]:
    events = []
    with httpx.stream("POST", url, json=body, timeout=httpx.Timeout(10.0, read=60.0)) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if events[-1] != "[DONE]" and json.loads(events[-1]).get("choices"):
                    got_token.set()
    return events


@pytest.mark.real
def test_sigterm_drains_streams_with_an_error_event_and_leaves_no_node():
    import psutil

    proc, base = serve_process(["--context-length", "1024", "--drain-seconds", "3"])
    try:
        nodes = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if "node" in c.cmdline()]
        assert nodes
        # counting never ends by itself: these streams outlast the 3 s grace
        body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 900,
                "temperature": 0, "stream": True}
        got = [threading.Event() for _ in range(3)]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(_sse_events, base + "/v1/completions", body, g) for g in got]
            _wait(lambda: all(g.is_set() for g in got), 120, "every stream's first token")
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            # during the drain a new request is refused with 503 + Retry-After (or, once the
            # listening socket is closed, not connected at all): never a 500, never a hang
            try:
                r = httpx.post(base + "/v1/completions", timeout=10, json={
                    "model": MODEL, "prompt": "Hi", "max_tokens": 2})
                assert r.status_code == 503 and r.headers.get("retry-after"), r.text
            except httpx.ConnectError:
                pass
            results = [f.result(timeout=60) for f in futures]
        for events in results:
            assert events[-1] == "[DONE]", events[-3:]
            last = json.loads(events[-2])
            assert last["error"]["code"] == "shutting_down", last
        assert time.monotonic() - t0 < 3 + 5
        # uvicorn re-raises the signal it drained for: the conventional exit status of SIGTERM
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), _drain(proc)
        _, alive = psutil.wait_procs(nodes, timeout=15)
        assert not alive, f"node processes left behind: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
