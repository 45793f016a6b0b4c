"""Prometheus metrics at ``/metrics`` (prometheus-client's text format).

Counters and histograms are updated as requests run; gauges and per-node figures are read from
the engine at scrape time, so a scrape always shows the current plan. One registry per app:
several servers in one process (the tests) do not share numbers.
"""

from __future__ import annotations

import time
from typing import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_TTFT = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("mesh_prompt_tokens", "Prompt tokens of started requests",
                                     registry=r)
        self.generated_tokens = Counter("mesh_generated_tokens", "Tokens generated",
                                        registry=r)
        self.requests = Counter("mesh_requests", "Generation requests that ended, by endpoint "
                                "and how (stop, length, tool_calls, error, cancelled)",
                                ["endpoint", "finish"], registry=r)
        self.responses = Counter("mesh_http_responses", "HTTP responses by status code",
                                 ["code"], registry=r)
        self.ttft = Histogram("mesh_time_to_first_token_seconds",
                              "From a request's arrival to its first token", buckets=_TTFT,
                              registry=r)
        self.itl = Histogram("mesh_inter_token_latency_seconds",
                             "Between consecutive tokens of one request", buckets=_LATENCY,
                             registry=r)
        r.register(_EngineCollector(engine))
        self.generated = 0  # plain count of generated_tokens, for the dashboard

    async def observe(self, deltas: AsyncIterator, endpoint: str, started: float,
                      prompt_tokens: int, on_end=None):
        """Pass ``deltas`` through, timing tokens and counting them; ``on_end(tokens,
        finish)`` once it ends (the request log line)."""
        self.prompt_tokens.inc(prompt_tokens)
        last, tokens, finish = None, 0, "cancelled"
        try:
            async for d in deltas:
                now = time.perf_counter()
                n = len(d.steps)
                if n:
                    if last is None:
                        self.ttft.observe(now - started)
                    else:
                        self.itl.observe((now - last) / n)
                    last = now
                    tokens += n
                    self.generated_tokens.inc(n)
                    self.generated += n
                finish = d.finish_reason or finish
                yield d
        except Exception:
            finish = "error"
            raise
        finally:
            self.requests.labels(endpoint, finish).inc()
            if on_end is not None:
                on_end(tokens, finish)


class _EngineCollector:
    """What the engine knows now: load, the plan, each node's traffic and speed."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        info = self.engine.info()
        running = GaugeMetricFamily("mesh_requests_running", "Requests generating now")
        running.add_metric([], info.get("running", 0))
        yield running
        queued = GaugeMetricFamily("mesh_requests_queued", "Requests waiting for a slot")
        queued.add_metric([], info.get("queued", 0))
        yield queued
        stages = getattr(self.engine, "stages", None)
        if info.get("mode") == "pipeline" and stages is not None:
            up = GaugeMetricFamily("mesh_node_up", "1 for a node in the current plan, 0 for "
                                   "one declared lost", labels=["node"])
            first = GaugeMetricFamily("mesh_stage_first_layer", "A node's first layer",
                                      labels=["node"])
            last = GaugeMetricFamily("mesh_stage_end_layer", "A node's end layer (exclusive)",
                                     labels=["node"])
            compute = CounterMetricFamily("mesh_stage_compute_seconds",
                                          "Compute time a node reported for its steps",
                                          labels=["node"])
            wire = CounterMetricFamily("mesh_stage_wire_bytes", "Bytes to and from a node",
                                       labels=["node", "direction"])
            decode = GaugeMetricFamily("mesh_stage_decode_seconds_per_token",
                                       "A node's mean compute per decoded token",
                                       labels=["node"])
            for s in stages:
                up.add_metric([s.name], 1)
                first.add_metric([s.name], s.layers.start)
                last.add_metric([s.name], s.layers.end)
                if hasattr(s, "compute_ms"):
                    compute.add_metric([s.name], s.compute_ms / 1e3)
                    wire.add_metric([s.name, "sent"], s.bytes_sent)
                    wire.add_metric([s.name, "received"], s.bytes_received)
                    if s.decode_steps:
                        decode.add_metric([s.name], s.decode_ms / s.decode_steps / 1e3)
            for name in info.get("lost", ()):
                up.add_metric([name], 0)
            memory = _memory_family()
            for s in stages:
                _add_memory(memory, s.name, s.memory())
            yield from (up, first, last, compute, wire, decode, memory)
            rescues = CounterMetricFamily("mesh_rescues", "Re-plans after a lost node")
            rescues.add_metric([], info.get("epoch", 0))
            yield rescues
            took = CounterMetricFamily("mesh_rescue_seconds", "Time spent re-planning")
            took.add_metric([], getattr(self.engine, "rescue_seconds", 0.0))
            yield took
        if info.get("mode") == "local" and "memory" in info:
            memory = _memory_family()
            _add_memory(memory, "local", info["memory"])
            yield memory
        if info.get("mode") == "ensemble":
            weight = GaugeMetricFamily("mesh_ensemble_member_weight", "A member's weight",
                                       labels=["member", "model"])
            for m in info.get("members", ()):
                weight.add_metric([m["name"], m["model"]], m["weight"])
            yield weight
            wire = CounterMetricFamily("mesh_member_wire_bytes", "Bytes to and from a member "
                                       "on a node (0 for one in this process)",
                                       labels=["member", "direction"])
            for m in getattr(self.engine, "members", ()):
                wire.add_metric([m.name, "sent"], m.bytes_sent)
                wire.add_metric([m.name, "received"], m.bytes_received)
            yield wire


def _memory_family() -> GaugeMetricFamily:
    return GaugeMetricFamily("mesh_node_memory_bytes", "A node process's memory: resident "
                             "(weights, runtime, caches), its request caches' share (kv), "
                             "its KV budget (kv_budget) and what its open caches may come to "
                             "(kv_reserved)", labels=["node", "kind"])


def _add_memory(family: GaugeMetricFamily, node: str, memory: dict) -> None:
    for kind, key in (("resident", "rss_bytes"), ("kv", "kv_bytes"),
                      ("kv_budget", "kv_budget_bytes"), ("kv_reserved", "kv_reserved_bytes")):
        if memory.get(key) is not None:
            family.add_metric([node, kind], memory[key])
