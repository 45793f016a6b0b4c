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
SECRET = "netns-secret"

CLIENT = r"""
import json, sys, openai
url = sys.argv[1]
c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
r = c.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=24,
    messages=[{"role": "user", "content": "What is the capital of France?"}])
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
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
