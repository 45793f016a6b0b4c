"""/metrics (parsed with prometheus-client's own parser; its numbers move with requests),
`mesh status` against a running 2-node pipeline, one log line per request."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.server.app import build_app
from tests.conftest import ServerThread

pytestmark = pytest.mark.real


def _scrape(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                            + "}" if s.labels else "")
            out[key] = s.value
    return out


def test_metrics_move_and_status_lists_both_nodes(caplog):
    from mesh.pipeline.coordinator import build_pipeline_engine

    engine = build_pipeline_engine("smollm2-135m", local_nodes=1, secret="s" * 16,
                                   context_length=1024)
    try:
        with ServerThread(build_app(engine)) as srv:
            before = _scrape(srv.base_url)
            assert before["mesh_generated_tokens_total"] == 0
            assert before["mesh_node_up{node=coordinator}"] == 1
            assert before["mesh_node_up{node=local-1}"] == 1
            with caplog.at_level(logging.INFO, logger="mesh.server.serving"):
                for stream in (False, True):
                    r = httpx.post(srv.base_url + "/v1/completions", timeout=120, json={
                        "model": engine.model_id, "prompt": "1, 2, 3,", "max_tokens": 5,
                        "temperature": 0, "stream": stream})
                    assert r.status_code == 200
                bad = httpx.post(srv.base_url + "/v1/completions", timeout=60,
                                 json={"model": "nope", "prompt": "x"})
                assert bad.status_code == 404
            after = _scrape(srv.base_url)
            assert after["mesh_generated_tokens_total"] == 10
            assert after["mesh_prompt_tokens_total"] > 0
            assert after["mesh_requests_total{endpoint=/v1/completions,finish=length}"] == 2
            assert after["mesh_http_responses_total{code=200}"] >= 2
            assert after["mesh_http_responses_total{code=404}"] == 1
            assert after["mesh_time_to_first_token_seconds_count"] == 2
            assert after["mesh_inter_token_latency_seconds_count"] == 8
            assert after["mesh_stage_wire_bytes_total{direction=sent,node=local-1}"] > 0
            assert after["mesh_stage_end_layer{node=local-1}"] == 30
            # the coordinator's stage's KV budget (default auto) and what it may come to
            assert after["mesh_node_memory_bytes{kind=kv_budget,node=coordinator}"] > \
                after["mesh_node_memory_bytes{kind=kv_reserved,node=coordinator}"] >= 0
            # the coordinator's own stage shares its cores with the local node: no spinning
            own = next(s for s in engine.stages if hasattr(s, "runner"))
            assert own.runner.shares_cores
            assert own.runner.shard.session.get_session_options().get_session_config_entry(
                "session.intra_op.allow_spinning") == "0"
            lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(
                "request ")]
            assert len(lines) == 2 and all("completion=5" in x for x in lines), lines

            out = subprocess.run([sys.executable, "-m", "mesh", "status", "--url",
                                  srv.base_url], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            rows = out.stdout.splitlines()
            assert "mode pipeline" in rows[0]
            coordinator = next(x for x in rows if x.startswith("coordinator"))
            node = next(x for x in rows if x.startswith("local-1"))
            assert "[0," in coordinator and ", 30)" in node and "up" in node
            assert re.search(r"\d+/[\d,]+ MiB", coordinator), coordinator  # its KV budget
    finally:
        asyncio.run(engine.close())


def test_status_of_nothing_is_one_line():
    out = subprocess.run([sys.executable, "-m", "mesh", "status", "--url",
                          "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("mesh: error: cannot reach a mesh server")
    assert len(out.stderr.strip().splitlines()) == 1
