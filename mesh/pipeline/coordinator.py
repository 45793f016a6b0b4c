"""Assemble a pipeline: find nodes, plan layer ranges, load shards, return a PipelineEngine.

Nodes come from four places: this process (unless ``include_self=False``), ``--local-nodes``
child processes on loopback, static ``--peer host:port`` addresses, and zeroconf on the chosen
interfaces.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from mesh.backends.base import default_backend
from mesh.devices import GB, detect_local
from mesh.errors import MeshError
from mesh.layers import LayerRange
from mesh.pipeline import mesh_pb2, mesh_pb2_grpc
from mesh.pipeline.auth import call_metadata
from mesh.pipeline.engine import LocalStage, PipelineEngine, RemoteStage
from mesh.pipeline.planner import Assignment, NodeCapacity, format_plan, model_cost, plan
from mesh.pipeline.stage import StageRunner

log = logging.getLogger(__name__)

READY = "MESH_NODE_READY"
LOCAL_NODE_SPINCOUNT = "30000"  # ~1.5 ms of spinning: covers gaps between ops, not stages
_DTYPE_BYTES = {"float32": 4, "auto": 4, "float16": 2, "bfloat16": 2, "gguf": 1}


@dataclass
class Candidate:
    name: str
    address: str | None  # None: this process
    capacity: NodeCapacity
    backend: str


def _stub(address: str):
    return mesh_pb2_grpc.NodeStub(grpc.insecure_channel(address))


def node_info(address: str, secret: str | None, timeout: float = 10.0) -> mesh_pb2.NodeInfo:
    try:
        return _stub(address).Info(mesh_pb2.InfoRequest(), timeout=timeout,
                                   metadata=call_metadata(secret, "/mesh.Node/Info"))
    except grpc.RpcError as exc:
        raise MeshError(f"node {address} did not answer: {exc.code().name}: {exc.details()}")


def spawn_local_nodes(n: int, secret: str | None, backend: str | None,
                      timeout: float = 120.0) -> list[tuple[subprocess.Popen, str]]:
    """Start ``n`` ``mesh node`` processes on loopback, port 0; wait until each is ready.

    They share this machine's cores, so their OpenMP threads must not spin long after a step:
    libgomp's default spin (~15 ms here) steals the cores the next stage is computing on.
    """
    env = dict(os.environ)
    env.setdefault("GOMP_SPINCOUNT", LOCAL_NODE_SPINCOUNT)
    env.setdefault("KMP_BLOCKTIME", "1")
    if secret:
        env["MESH_SECRET"] = secret
    procs = []
    try:
        for i in range(n):
            cmd = [sys.executable, "-m", "mesh", "node", "--host", "127.0.0.1", "--port", "0",
                   "--no-discovery", "--node-id", f"local-{i + 1}"]
            if backend:
                cmd += ["--backend", backend]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
        out = []
        for p in procs:
            out.append((p, f"127.0.0.1:{_wait_ready(p, timeout)}"))
        return out
    except BaseException:
        for p in procs:
            p.kill()
        raise


def _wait_ready(proc: subprocess.Popen, timeout: float) -> int:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                raise MeshError(f"local node exited with status {proc.wait()}")
            if line.startswith(READY):
                return int(line.split()[1])
        raise MeshError("local node did not start in time")
    finally:
        sel.close()


def gather_candidates(peers: list[str], secret: str | None, include_self: bool,
                      backend: str, memory_gb: float | None, discovered=()) -> list[Candidate]:
    out: list[Candidate] = []
    if include_self:
        prof = detect_local(backend, memory_gb)
        out.append(Candidate("coordinator", None,
                             NodeCapacity("coordinator", prof.usable_bytes, prof.bandwidth_gbps,
                                          prof.name, prof.tflops), backend))
    seen = set()
    for address in list(peers) + [p.address for p in discovered]:
        if address in seen:
            continue
        seen.add(address)
        info = node_info(address, secret)
        name = info.node_id or address
        if any(c.name == name for c in out):
            name = f"{name}@{address}"
        out.append(Candidate(name, address,
                             NodeCapacity(name, int(info.memory_gb * GB), info.bandwidth_gbps,
                                          info.profile, info.tflops), info.backend))
    return out


def plan_for(source, candidates: list[Candidate], dtype: str, context: int) -> list[Assignment]:
    cost = model_cost(source, _DTYPE_BYTES.get(dtype, 4), context)
    return plan(cost, [c.capacity for c in candidates])


def build_pipeline_engine(model: str, *, peers: list[str] = (), local_nodes: int = 0,
                          discovery_interfaces: list[str] = (), discover_seconds: float = 3.0,
                          include_self: bool = True, backend: str | None = None,
                          dtype: str = "auto", secret: str | None = None,
                          memory_gb: float | None = None, context_length: int | None = None,
                          wire_dtype: str = "float32") -> PipelineEngine:
    from mesh.models.source import resolve

    backend = backend or default_backend()
    source = resolve(model)
    context = min(context_length or source.context_length, source.context_length)
    procs = spawn_local_nodes(local_nodes, secret, backend) if local_nodes else []

    def cleanup():
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    try:
        discovered = []
        if discovery_interfaces:
            from mesh.pipeline.discovery import browse

            discovered = browse(list(discovery_interfaces), discover_seconds)
            log.info("discovered %d node(s): %s", len(discovered),
                     ", ".join(p.address for p in discovered) or "none")
        candidates = gather_candidates([a for _, a in procs] + list(peers), secret,
                                       include_self, backend, memory_gb, discovered)
        assignments = plan_for(source, candidates, dtype, context)
        log.info("pipeline plan for %s:\n%s", model, format_plan(assignments))
        by_name = {c.name: c for c in candidates}
        stages = _load_stages(model, source, assignments, by_name, backend, dtype, secret,
                              wire_dtype)
    except BaseException:
        cleanup()
        raise
    return PipelineEngine(source.name, stages, source.tokenizer, context, cleanup=cleanup)


def _load_stages(model, source, assignments, by_name, backend, dtype, secret, wire_dtype):
    def load(a: Assignment):
        c = by_name[a.node]
        if c.address is None:
            runner = StageRunner(backend)
            runner._sources[model] = source  # already resolved here
            runner.load(model, a.layers.start, a.layers.end, backend, dtype)
            return LocalStage(a.node, runner)
        try:
            _stub(c.address).Load(
                mesh_pb2.LoadRequest(model=model, start=a.layers.start, end=a.layers.end,
                                     dtype=dtype),
                timeout=600, metadata=call_metadata(secret, "/mesh.Node/Load"))
        except grpc.RpcError as exc:
            raise MeshError(f"node {a.node} ({c.address}) could not load layers {a.layers}: "
                            f"{exc.details()}")
        return RemoteStage(a.node, c.address, secret,
                           LayerRange(a.layers.start, a.layers.end, a.layers.total), wire_dtype)

    with ThreadPoolExecutor(max_workers=max(1, len(assignments))) as pool:
        return list(pool.map(load, assignments))
