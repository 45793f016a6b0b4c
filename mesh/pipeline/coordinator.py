"""Assemble a pipeline: find nodes, plan layer ranges, load shards, return a PipelineEngine.

Nodes come from four places: this process (unless ``include_self=False``), ``--local-nodes``
child processes on loopback, static ``--peer host:port`` addresses, and zeroconf on the chosen
interfaces.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import selectors
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import grpc

from mesh.backends.base import default_backend
from mesh.devices import GB, detect_local
from mesh.errors import MeshError
from mesh.layers import LayerRange
from mesh.node import mesh_pb2
from mesh.node.auth import ForgedReply, call, check_secret
from mesh.node.runner import StageRunner
from mesh.node.service import NodeUnreachable, kv_terms, node_info, node_stub
from mesh.pipeline.engine import LocalStage, PipelineEngine, RemoteStage
from mesh.pipeline.planner import Assignment, NodeCapacity, format_plan, model_cost, plan

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
    standby: bool = False


def spawn_local_nodes(n: int, secret: str | None, backend: str | None,
                      timeout: float = 120.0, memory_gb: float | None = None,
                      standby: int = 0, kv_memory: int | str = "auto"
                      ) -> list[tuple[subprocess.Popen, str]]:
    """Start ``n`` ``mesh node`` processes on loopback, port 0; wait until each is ready.

    They share this machine's cores, so their threads must not spin long after a step:
    libgomp's default spin (~15 ms here) steals the cores the next stage is computing on,
    and so does ONNX Runtime's (off for them).
    """
    env = dict(os.environ)
    env.setdefault("GOMP_SPINCOUNT", LOCAL_NODE_SPINCOUNT)
    env.setdefault("MESH_ORT_SPIN", "0")
    env.setdefault("KMP_BLOCKTIME", "1")
    if secret:
        env["MESH_SECRET"] = secret
    env.update(_die_with_parent_env())
    procs = []
    try:
        for i in range(n):
            standby_node = i >= n - standby
            cmd = [sys.executable, "-m", "mesh", "node", "--host", "127.0.0.1", "--port", "0",
                   "--no-discovery", "--node-id",
                   f"standby-{i + 1}" if standby_node else f"local-{i + 1}"]
            if backend:
                cmd += ["--backend", backend]
            if memory_gb is not None:
                cmd += ["--memory-gb", str(memory_gb)]
            if standby_node:
                cmd += ["--standby"]
            cmd += ["--kv-memory", str(kv_memory)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
        out = []
        for p in procs:
            out.append((p, f"127.0.0.1:{_wait_ready(p, timeout)}"))
        return out
    except BaseException:
        for p in procs:
            p.kill()
        raise


PARENT_ENV = "MESH_DIE_WITH_PARENT"


def _die_with_parent_env() -> dict:
    """Ask a spawned node to take SIGTERM when this process dies, even by SIGKILL (Linux's
    parent-death signal, which the node sets on itself at start: ``die_with_parent``). The
    signal follows the thread that spawned the child, so only from the main thread, which
    lives as long as the process. Set in the child rather than in a preexec_fn: Python code
    between fork and exec ran gRPC's fork handlers in the child, which now and then aborted
    it (SIGABRT, "epoll_wait error: Bad file descriptor"); without a preexec_fn the child is
    spawned by vfork/exec and runs nothing of this process."""
    import threading

    if not sys.platform.startswith("linux") or \
            threading.current_thread() is not threading.main_thread():
        return {}
    return {PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """In a spawned node: SIGTERM when the spawning process dies (see above); exit now if it
    already has."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before prctl took effect
        os._exit(1)


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
                      backend: str, memory_gb: float | None, discovered=(),
                      waiting: list[str] | None = None, may_wait=()) -> list[Candidate]:
    """The coordinator (``include_self``) and every node at ``peers`` and ``discovered``.
    A peer in ``may_wait`` that cannot be reached is added to ``waiting`` (it joins once it
    answers: ``Replanner.rejoin``) instead of being an error."""
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
        try:
            info = node_info(address, secret)
        except NodeUnreachable as exc:  # (a refusal, a wrong secret say, is no node starting)
            if waiting is None or address not in may_wait:
                raise
            log.warning("%s; serving without it until it answers", exc.message)
            waiting.append(address)
            continue
        out.append(_candidate(address, info, out))
    return out


def _candidate(address: str, info, others: list[Candidate]) -> Candidate:
    name = info.node_id or address
    if any(c.name == name for c in others):
        name = f"{name}@{address}"
    return Candidate(name, address,
                     NodeCapacity(name, int(info.memory_gb * GB), info.bandwidth_gbps,
                                  info.profile, info.tflops), info.backend,
                     standby=info.standby)


# What a backend holds per byte of a quantized file's layers and head, measured on the
# Llama-3.2-1B-shaped Q4_K_M file (benchmarks/node_memory.py, bounded in test_real_models):
# ONNX Runtime's MatMulNBits keeps fp32 scales and int8-compute block sums (1.59x), MLX fp16
# scales and biases with Q6_K in 8 bits (1.19x). A backend not known here counts as the
# largest.
HELD_PER_FILE_BYTE = {"onnxruntime": 1.6, "mlx": 1.2}


def cost_for(source, dtype: str, context: int, backends=(), torch_gpu: bool = False):
    """What a node holding layers will hold, for the most demanding of ``backends`` (those
    of the nodes planned for). With dtype auto (or gguf) mlx and onnxruntime hold the file's
    own quantized blocks times what each keeps beside them (a backend not known here: the
    largest such factor); torch holds the blocks, to the byte, with auto, gguf and int4 (on
    CUDA, ``torch_gpu``, gguf and auto hold the 4-bit ones in int4, as int4 does)."""
    backends = set(backends) - {None} or {""}  # "": a backend not known here
    costs = [_backend_cost(source, dtype, context, b, torch_gpu) for b in sorted(backends)]
    worst = max(costs, key=lambda c: c.per_layer)
    return replace(worst, embed_bytes=max(c.embed_bytes for c in costs),
                   head_bytes=max(c.head_bytes for c in costs))


def _backend_cost(source, dtype: str, context: int, backend: str, torch_gpu: bool):
    if backend == "torch":
        if dtype in ("int4", "gguf", "auto"):
            return model_cost(source, 4, context, tensor_bytes=_torch_block_bytes(
                source, int4=dtype == "int4" or torch_gpu))
        return model_cost(source, _DTYPE_BYTES.get(dtype, 4), context)
    if dtype not in ("auto", "gguf"):
        return model_cost(source, _DTYPE_BYTES.get(dtype, 4), context)
    cost = model_cost(source, 4, context, quantized=True)
    held = HELD_PER_FILE_BYTE.get(backend, max(HELD_PER_FILE_BYTE.values()))
    return replace(cost, layer_bytes=int(cost.layer_bytes * held),
                   head_bytes=int(cost.head_bytes * held))


def torch_on_gpu(candidates) -> bool:
    """Whether a torch node among ``candidates`` computes on an NVIDIA GPU (its device
    profile's kind; a profile not known here counts as a GPU, the larger holding)."""
    from mesh.devices.profiles import ProfileError, load_profiles

    names = {c.capacity.device for c in candidates if c.backend == "torch"}
    if not names:
        return False
    try:
        profiles = load_profiles()
    except ProfileError:
        return True
    kinds = {p.name: p.kind for p in profiles.values()}
    kinds.update((stem, p.kind) for stem, p in profiles.items())
    return any(kinds.get(n, "nvidia") in ("nvidia", "jetson") for n in names)


def _torch_block_bytes(source, int4: bool):
    """What torch ``--dtype gguf`` / ``int4`` holds per tensor on a CPU (``TorchShard``): a
    layer projection, the embedding or the head in an 8-bit container (a byte a weight, a
    4-byte scale a group and, for the asymmetric types, a 4-byte bias) or, with ``int4``, a
    projection stored in 4 bits in torch's int4 layout (half a byte a weight, 8 bytes a
    group); the rest in fp32 (None: ``model_cost``'s own count, 4 bytes a weight). (On CUDA
    the scales and the float tensors take 2 bytes: less than counted here.)"""
    from mesh.models.ggml import FORMATS, SYMMETRIC

    reader = source.reader

    def stored(name: str) -> tuple[int, int, bool] | None:
        """(bits, group, symmetric) of a quantized tensor, else None."""
        info = reader.info(name) if hasattr(reader, "info") else None
        if hasattr(info, "qtype"):  # a GGUF: its type, without reading the blocks
            import gguf

            qtype = gguf.GGMLQuantizationType(info.qtype).name
            if qtype not in FORMATS:
                return None
            bits, group = FORMATS[qtype][:2]
            return bits, group, qtype in SYMMETRIC
        q = reader.read_quantized(name) if hasattr(reader, "read_quantized") else None
        bits = getattr(q, "bits", None)  # an mlx-lm folder's: affine, with biases
        return (bits, q.group, False) if bits else None

    def cost(name: str, numel: int) -> int | None:
        table = name in ("model.embed_tokens.weight", "lm_head.weight")
        if not (table or name.startswith("model.layers.") and name.endswith("_proj.weight")):
            return None
        held = stored(name)
        if held is None or held[0] > 8:
            return None
        bits, group, symmetric = held
        if int4 and not table and bits == 4 and group in (32, 64, 128):
            return numel // 2 + numel // group * 8
        return numel + numel // group * (4 if symmetric else 8)
    return cost


def plan_for(source, candidates: list[Candidate], dtype: str, context: int) -> list[Assignment]:
    cost = cost_for(source, dtype, context, {c.backend for c in candidates},
                    torch_on_gpu(candidates))
    return plan(cost, [c.capacity for c in candidates])


def build_pipeline_engine(model: str, *, peers: list[str] = (), local_nodes: int = 0,
                          discovery_interfaces: list[str] = (), discover_seconds: float = 3.0,
                          include_self: bool = True, backend: str | None = None,
                          dtype: str = "auto", secret: str | None = None,
                          memory_gb: float | None = None, context_length: int | None = None,
                          wire_dtype: str = "float32", heartbeat_interval: float = 1.0,
                          lost_after: float = 3.0, standby_nodes: int = 0,
                          node_memory_gb: float | None = None,
                          kv_memory: int | str | None = "auto") -> PipelineEngine:
    """``kv_memory`` (bytes, "auto" or None): the KV budget of this process's stage and of
    the nodes spawned here (``local_nodes``); other nodes set their own."""
    from mesh.models.source import resolve

    check_secret(secret)
    if local_nodes and not secret:  # nodes spawned here authenticate even on loopback
        secret = secrets.token_urlsafe(24)
    source = resolve(model)
    backend = backend or default_backend(source.model_type, whole_model=False)
    context = min(context_length or source.context_length, source.context_length)
    if local_nodes and include_self:
        # this process's stage computes beside its nodes' on the same cores: libgomp's threads
        # (torch) must not spin after a forward either (set before torch loads libgomp; the
        # nodes inherit it). Torch, 2 stages, 8 streams: 32-50 tok/s against 16 spinning
        os.environ.setdefault("GOMP_SPINCOUNT", "0")
    procs = (spawn_local_nodes(local_nodes, secret, backend, memory_gb=node_memory_gb,
                               standby=standby_nodes, kv_memory=kv_memory or "auto")
             if local_nodes else [])

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
        waiting: list[str] = []  # --peer nodes not up yet: they join when they answer
        candidates = gather_candidates([a for _, a in procs] + list(peers), secret,
                                       include_self, backend, memory_gb, discovered,
                                       waiting=waiting, may_wait=set(peers))
        replanner = Replanner(model, source, candidates, backend, dtype, secret, wire_dtype,
                              context, shares_cores=bool(local_nodes), kv_memory=kv_memory)
        replanner.waiting = waiting
        stages = replanner.initial()
    except BaseException:
        cleanup()
        raise
    engine = PipelineEngine(source.name, stages, source.tokenizer, context, cleanup=cleanup,
                            replanner=replanner, heartbeat_interval=heartbeat_interval,
                            lost_after=lost_after)
    engine.node_processes = {name: p for (p, _), name in
                             zip(procs, [c.name for c in candidates if c.address in
                                         {a for _, a in procs}])}
    return engine


class Replanner:
    """Owns the cluster's candidates and turns "these nodes are lost" into new stages.

    A hot standby that can hold a lost node's range takes it over and only it loads anything;
    otherwise every surviving node (standbys and returning nodes included) is re-planned.
    """

    def __init__(self, model, source, candidates: list[Candidate], backend, dtype, secret,
                 wire_dtype, context, shares_cores: bool = False,
                 kv_memory: int | str | None = None):
        self.model, self.source, self.candidates = model, source, candidates
        self.kv_memory = kv_memory  # this process's stage's KV budget
        self.shares_cores = shares_cores  # this process's stage runs beside local nodes
        self.backend, self.dtype, self.secret = backend, dtype, secret
        self.wire_dtype, self.context = wire_dtype, context
        self.assignments: list[Assignment] = []
        self.stages: dict[str, object] = {}
        self.waiting: list[str] = []  # peers named at the start that have not answered yet

    def initial(self):
        active = [c for c in self.candidates if not c.standby]
        late = f" ({', '.join(self.waiting)} did not answer)" if self.waiting else ""
        if not active:
            raise MeshError(("every node is a standby" if self.candidates else "no node")
                            + f": nothing to run the model on{late}")
        try:
            return self._apply(plan_for(self.source, active, self.dtype, self.context))
        except MeshError as exc:
            exc.message += late
            exc.args = (exc.message,)
            raise

    def _apply(self, assignments, reuse=()):
        log.info("pipeline plan for %s:\n%s", self.model, format_plan(assignments))
        by_name = {c.name: c for c in self.candidates}
        fresh = [a for a in assignments if a.node not in reuse]
        loaded = dict(zip([a.node for a in fresh],
                          _load_stages(self.model, self.source, fresh, by_name, self.backend,
                                       self.dtype, self.secret, self.wire_dtype,
                                       self.shares_cores, self.kv_memory)))
        stages = [self.stages[a.node] if a.node in reuse else loaded[a.node]
                  for a in assignments]
        self.assignments = list(assignments)
        self.stages = {a.node: s for a, s in zip(assignments, stages)}
        return stages

    def _alive(self, lost: set[str]) -> list[Candidate]:
        alive = []
        for c in self.candidates:
            if c.address is None:
                alive.append(c)
                continue
            try:
                info = node_info(c.address, self.secret, timeout=2.0)
            except MeshError:
                continue
            # answering now is what counts: a node that was lost and came back rejoins here
            c.standby = info.standby
            alive.append(c)
        return alive

    async def replan(self, lost: set[str]):
        return await asyncio.to_thread(self._replan, lost)

    async def answering(self, lost: set[str]) -> dict[str, object]:
        """Of the ``lost`` nodes and the ``waiting`` peers, those that answer now: address
        -> its Info. Asks only (a second each at most); changes nothing."""
        return await asyncio.to_thread(self._answering, lost)

    def _answering(self, lost: set[str]) -> dict[str, object]:
        addresses = list(self.waiting) + [c.address for c in self.candidates
                                          if c.address is not None and c.name in lost]
        out = {}
        for address in addresses:
            try:
                out[address] = node_info(address, self.secret, timeout=1.0)
            except MeshError:
                continue
        return out

    async def rejoin(self, answered: dict[str, object], lost: set[str]):
        """``(names, stages)`` for the nodes that answered (``answering``): their names, and
        new stages that put them to work beside the nodes in use, or None where the plan
        would not change (the planner leaves them out, or they are standbys: spares for the
        next loss)."""
        return await asyncio.to_thread(self._rejoin, answered, lost)

    def joining(self) -> bool:
        """Whether peers named at the start have not answered yet."""
        return bool(self.waiting)

    def _rejoin(self, answered: dict[str, object], lost: set[str]):
        back = []
        by_address = {c.address: c for c in self.candidates if c.address is not None}
        for address, info in answered.items():
            c = by_address.get(address)
            if c is None:  # a waiting peer: a candidate from now on
                if address not in self.waiting:
                    continue
                self.waiting.remove(address)
                c = _candidate(address, info, self.candidates)
                self.candidates.append(c)
                log.info("node %s (%s) answers: it joins", c.name, address)
            else:
                c.standby = info.standby
            back.append(c)
        names = [c.name for c in back]
        active = [c for c in back if not c.standby]
        if not active:
            return names, None
        self._learn_speeds()
        used = {a.node for a in self.assignments}
        pool = [c for c in self.candidates
                if (c.name in used and c.name not in lost) or c in active]
        try:
            new = plan_for(self.source, pool, self.dtype, self.context)
        except MeshError:
            return names, None
        # a returning node still in the plan (the re-plan after its loss failed) holds
        # nothing now: load it again even where the plan stays the same
        same = [(a.node, a.layers) for a in new] == [(a.node, a.layers)
                                                      for a in self.assignments]
        if same and not any(c.name in used for c in active):
            return names, None
        return names, self._apply(new)

    def _learn_speeds(self) -> None:
        """Blend each stage's measured decode time into its node's bandwidth figure, so the
        next plan uses what the node really does rather than its profile alone."""
        from mesh.pipeline.planner import observed_bandwidth

        cost = cost_for(self.source, self.dtype, self.context,
                        {c.backend for c in self.candidates}, torch_on_gpu(self.candidates))
        by_name = {c.name: c for c in self.candidates}
        for a in self.assignments:
            stage = self.stages.get(a.node)
            steps = getattr(stage, "decode_steps", 0)
            if steps >= 8 and a.node in by_name:
                c = by_name[a.node]
                bw = observed_bandwidth(cost, len(a.layers), stage.decode_ms / steps,
                                        c.capacity.bandwidth_gbps)
                log.info("node %s: measured %.1f GB/s effective (profile %.1f)", a.node, bw,
                         c.capacity.bandwidth_gbps)
                c.capacity = replace(c.capacity, bandwidth_gbps=bw)

    def _replan(self, lost: set[str]):
        self._learn_speeds()
        alive = self._alive(lost)
        names = {c.name for c in alive}
        used = {a.node for a in self.assignments}
        gone = [a for a in self.assignments if a.node not in names]
        standbys = [c for c in alive if c.standby and c.name not in used]
        if gone and len(standbys) >= len(gone):
            swap, ok = {}, True
            for a in gone:
                fit = [c for c in standbys if c.name not in swap.values()
                       and c.capacity.usable_bytes >= a.bytes_used]
                if not fit:
                    ok = False
                    break
                swap[a.node] = max(fit, key=lambda c: c.capacity.bandwidth_gbps).name
            if ok:
                log.warning("hot standby: %s", ", ".join(f"{k} -> {v}" for k, v in swap.items()))
                new = [replace(a, node=swap.get(a.node, a.node)) for a in self.assignments]
                return self._apply(new, reuse=used - set(swap))
        return self._apply(plan_for(self.source, alive, self.dtype, self.context))

    def close(self) -> None:
        return None


def _load_stages(model, source, assignments, by_name, backend, dtype, secret, wire_dtype,
                 shares_cores=False, kv_memory=None):
    def load(a: Assignment):
        c = by_name[a.node]
        if c.address is None:
            runner = StageRunner(backend, shares_cores=shares_cores, kv_memory=kv_memory)
            runner._sources[model] = source  # already resolved here
            runner.load(model, a.layers.start, a.layers.end, backend, dtype)
            return LocalStage(a.node, runner)
        try:
            loaded = call(node_stub(c.address).Load,
                 mesh_pb2.LoadRequest(model=model, start=a.layers.start, end=a.layers.end,
                                      dtype=dtype), secret, "/mesh.Node/Load", 600)
        except ForgedReply as exc:
            raise MeshError(f"node {a.node} ({c.address}): {exc.message}") from exc
        except grpc.RpcError as exc:
            raise MeshError(f"node {a.node} ({c.address}) could not load layers {a.layers}: "
                            f"{exc.details()}")
        return RemoteStage(a.node, c.address, secret,
                           LayerRange(a.layers.start, a.layers.end, a.layers.total), wire_dtype,
                           vocab_size=loaded.vocab_size,
                           split_invariant=loaded.split_invariant, **kv_terms(loaded))

    with ThreadPoolExecutor(max_workers=max(1, len(assignments))) as pool:
        return list(pool.map(load, assignments))
