"""Real hosts: nodes in their own network namespaces, found by zeroconf, serving a request.

Needs root and iproute2; skips with the reason otherwise. Traffic stays on the veth links of
namespaces created here (mDNS included).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.netns import Hosts, netns_unavailable_reason

pytestmark = [pytest.mark.real]

REASON = netns_unavailable_reason()
SECRET = "netns-secret-of-the-mesh"

CLIENT = r"""
import json, sys, openai
url = sys.argv[1]
c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
r = c.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=24,
    messages=[{"role": "user",
               "content": "What is the capital of France? Answer in one word."}])
meta = c.models.list().data[0].model_extra["meta"]
print(json.dumps({"text": r.choices[0].message.content, "meta": meta}))
"""

BROWSE = r"""
import json, sys
from mesh.pipeline.discovery import browse
peers = browse([sys.argv[1]], seconds=15, want=2)
print(json.dumps([[p.node_id, p.address, p.props.get("backend")] for p in peers]))
"""


def _wait_line(proc, pattern, timeout, stream="stdout"):
    deadline, seen = time.monotonic() + timeout, []
    pipe = getattr(proc, stream)
    while time.monotonic() < deadline:
        line = pipe.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(seen[-30:]))


def _stop_all(procs) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_nodes_in_namespaces_are_discovered_and_serve():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MESH_SECRET": SECRET}
    procs = []
    with Hosts(3) as hosts:
        try:
            for i in (1, 2):
                ip = hosts.ips[i]
                p = subprocess.Popen(
                    hosts.exec_args(i) + [sys.executable, "-m", "mesh", "node", "--host", ip,
                                          "--port", "50051", "--node-id", f"ns-node-{i}",
                                          "--discovery-interface", ip],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                procs.append(p)
                _wait_line(p, r"MESH_NODE_READY", 120)
            found = subprocess.run(hosts.exec_args(0) + [sys.executable, "-c", BROWSE,
                                                         hosts.ips[0]],
                                   capture_output=True, text=True, timeout=60, env=env)
            peers = json.loads(found.stdout.strip().splitlines()[-1])
            assert sorted(p[1] for p in peers) == [f"{hosts.ips[1]}:50051",
                                                   f"{hosts.ips[2]}:50051"]
            serve = subprocess.Popen(
                hosts.exec_args(0) + [sys.executable, "-m", "mesh", "serve", "--mode",
                                      "pipeline", "--host", "127.0.0.1", "--port", "0",
                                      "--discovery-interface", hosts.ips[0],
                                      "--discover-seconds", "5"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            procs.append(serve)
            url = _wait_line(serve, r"Uvicorn running on (http://[\d.]+:\d+)", 240,
                             "stderr").group(1)
            r = subprocess.run(hosts.exec_args(0) + [sys.executable, "-c", CLIENT, url],
                               capture_output=True, text=True, timeout=180, env=env)
            assert r.returncode == 0, r.stderr[-2000:]
            out = json.loads(r.stdout.strip().splitlines()[-1])
            assert "Paris" in out["text"]
            addrs = [s["address"] for s in out["meta"]["stages"]]
            assert f"{hosts.ips[1]}:50051" in addrs and f"{hosts.ips[2]}:50051" in addrs
        finally:
            _stop_all(procs)


RESCUE = r"""
import asyncio, json, sys, time, threading, subprocess
from mesh.pipeline.coordinator import build_pipeline_engine
from mesh.engine.base import GenerationRequest
from mesh.engine.sampling import SamplingParams
from mesh.engine.text import stream_text

peers = json.loads(sys.argv[1])
cut, restore = sys.argv[2], sys.argv[3]  # shell commands run from the root namespace side
e = build_pipeline_engine("smollm2-135m", peers=peers, include_self=True, secret="netns-secret-of-the-mesh",
                          context_length=2048, lost_after=2.0)
tok = e.tokenizer
ids = tok.chat_prompt([{"role": "user", "content": "Explain why the sky is blue."}])

async def run(hook=None):
    req = GenerationRequest(str(time.time()), ids, 50, SamplingParams(temperature=0.0))
    out, n = [], 0
    async for d in stream_text(e, req):
        out.append(d.text); n += 1
        if hook and n == 6:
            hook()
    return "".join(out)

async def main():
    clean = await run()
    t = {}
    def do_cut():
        t["cut"] = time.time()
        print("CUT", flush=True)
        sys.stdout.flush()
        input()  # the test cuts the link, then answers
    text = await run(do_cut)
    alive = [c.name for c in e.replanner._alive(set())]
    print(json.dumps({"clean": clean, "text": text, "stages": [s.name for s in e.stages],
                      "events": e.events, "alive_while_cut": alive}), flush=True)
    input()  # the test restores the link
    alive = [c.name for c in e.replanner._alive(set())]
    print(json.dumps({"alive_after_restore": alive}), flush=True)
    await e.close()

asyncio.run(main())
"""


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_link_cut_mid_stream_is_rescued_and_node_rejoins():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MESH_SECRET": SECRET}
    procs = []
    with Hosts(3, net=79) as hosts:
        try:
            for i in (1, 2):
                p = subprocess.Popen(
                    hosts.exec_args(i) + [sys.executable, "-m", "mesh", "node", "--host",
                                          hosts.ips[i], "--port", "50051", "--node-id",
                                          f"ns-node-{i}", "--no-discovery"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                procs.append(p)
                _wait_line(p, r"MESH_NODE_READY", 120)
            peers = json.dumps([f"{hosts.ips[1]}:50051", f"{hosts.ips[2]}:50051"])
            coord = subprocess.Popen(
                hosts.exec_args(0) + [sys.executable, "-c", RESCUE, peers, "", ""],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, env=env)
            procs.append(coord)
            _wait_line(coord, r"^CUT", 240)
            hosts.link(1, up=False)  # pull the cable of the middle stage
            coord.stdin.write("\n")
            coord.stdin.flush()
            out = json.loads(_wait_line(coord, r"^\{.*\"clean\"", 120).string)
            assert out["text"] == out["clean"] and len(out["clean"]) > 20
            assert "ns-node-1" not in out["stages"]
            assert any("lost ns-node-1" in e for e in out["events"])
            assert "ns-node-1" not in out["alive_while_cut"]
            hosts.link(1, up=True)
            coord.stdin.write("\n")
            coord.stdin.flush()
            back = json.loads(_wait_line(coord, r"^\{.*alive_after_restore", 60).string)
            assert "ns-node-1" in back["alive_after_restore"]  # it rejoins the next plan
        finally:
            _stop_all(procs)
