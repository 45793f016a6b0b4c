"""PipelineEngine: stages on several nodes, each owning a layer range, behind ``Engine``.

The coordinator relays: it sends token ids to the first stage, passes each stage's hidden
states to the next, and gets back only the sampled token (and log-probs) from the last stage.
Measured on loopback, a relay hop costs ~0.5 ms against ~70 ms of compute per token, and it
keeps every failure visible to the one process that can re-plan (see the closing note of the
pipeline issue for the figures).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import time
import uuid
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
import numpy as np

from mesh.backends.base import kv_layout_bytes
from mesh.engine.admission import Admission, KVBudget, KVLimit
from mesh.engine.base import (Engine, GenerationRequest, Pending, PromptCuts, PromptScore,
                              TokenStep, cleanup, longest_kept_prefix, mark_finish)
from mesh.engine.sampling import SamplingParams
from mesh.errors import EngineUnavailable, InvalidRequest, MeshError, ModelTooLarge, Overloaded
from mesh.layers import LayerRange, check_covering
from mesh.node import mesh_pb2
from mesh.node.auth import ForgedReply, acall
from mesh.node.codec import CodecError, from_tensor, to_tensor
from mesh.node.link import NodeLink
from mesh.node.runner import (MAX_REQUESTS, SETTLE_QUIET, ChunkScores, StageError,
                              StageRunner)
from mesh.node.service import CHANNEL_OPTIONS, sampling_to_proto

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # as LocalEngine: the same chunks give the same numbers
KEEP_CACHES = 4  # finished requests' caches the nodes keep for a prompt that starts the same
STEP_TIMEOUT = 120.0  # seconds: a prefill chunk on a slow node, never forever
DECODE_TIMEOUT = 30.0  # one token; the heartbeat usually notices a dead node long before
MAX_RESCUES = 3  # re-plans one request may ride through before it gives up with a 503
MAX_QUEUED = 256  # requests waiting for a running slot before new ones get a 429
REJOIN_EVERY = 5.0  # seconds between asking lost nodes whether they answer again


class StageLost(EngineUnavailable):
    """A stage failed in a way a re-plan can fix (gone, unreachable, lost its caches)."""

    def __init__(self, message: str, stage: str, **kwargs):
        super().__init__(message, **kwargs)
        self.stage = stage


class ReuseMissed(MeshError):
    """A stage no longer holds the kept cache a request asked to reuse: feed from 0."""


def stage_error(name: str, err: StageError) -> MeshError:
    """A node's refusal as the caller sees it: full is a 429, never a reason to re-plan."""
    msg = f"stage {name}: {err.message}"
    if err.status == "RESOURCE_EXHAUSTED":
        return Overloaded(msg)
    if err.status == "ABORTED":
        return ReuseMissed(msg)
    if err.status == "INVALID_ARGUMENT":
        return InvalidRequest(msg)
    return MeshError(msg)


class Stage(abc.ABC):
    name: str
    layers: LayerRange
    split_invariant = False  # its backend's prompt rows are the same however cut (Shard's)

    @abc.abstractmethod
    async def step(self, request_id: str, position: int, tokens: list[int],
                   hidden: np.ndarray | None, sampling: SamplingParams | None, n_prompt: int,
                   prefill_only: bool, allowed: bytes = b"", score_top: int = -1,
                   batched: bool = False, draws: int = 0, reuse: str = "", copy: bool = False,
                   max_positions: int = 0, replay: bool = False
                   ) -> np.ndarray | TokenStep | ChunkScores | None:
        """``allowed``: a grammar's mask for the token sampled at this step (last stage);
        ``score_top`` >= 0: score the prompt tokens; ``batched``, ``draws``, ``reuse``,
        ``copy``, ``max_positions``, ``replay``: see StageRunner.step."""

    @abc.abstractmethod
    async def step_many(self, steps: list[dict]) -> list:
        """Several requests' decode steps (``step``'s keyword arguments each) as one forward;
        per step its result or the MeshError that refused it. A failure of the stage itself
        raises."""

    @abc.abstractmethod
    async def end(self, request_id: str) -> None: ...

    async def settle(self) -> None:
        """No request has run on this stage for SETTLE_QUIET seconds: cut shared KV buffers
        to what its kept caches need (a node does this itself once quiet)."""
        return None

    async def close(self) -> None:
        return None

    # recent decode-step figures (exponential moving averages), for /health and the dashboard
    recent_compute_ms: float | None = None
    recent_step_ms: float | None = None  # as the coordinator saw it: compute + network

    def _note_decode(self, compute_ms: float, step_ms: float) -> None:
        a = 0.2
        self.recent_compute_ms = compute_ms if self.recent_compute_ms is None else (
            (1 - a) * self.recent_compute_ms + a * compute_ms)
        self.recent_step_ms = step_ms if self.recent_step_ms is None else (
            (1 - a) * self.recent_step_ms + a * step_ms)

    def memory(self) -> dict:
        """What the stage's process holds: ``rss_bytes``, ``kv_bytes``, ``capacity_bytes``
        (None where not known yet)."""
        return {"rss_bytes": None, "kv_bytes": None, "capacity_bytes": None}

    # the most bytes the stage's request caches may take (its node's --kv-memory; None: no
    # budget), and what caches of some lengths cost there (``Shard.kv_bytes``)
    kv_budget: int | None = None

    def kv_cost(self, positions: list[int]) -> int:
        return 0


class LocalStage(Stage):
    """A stage in the coordinator's own process: no network hop."""

    def __init__(self, name: str, runner: StageRunner):
        self.name = name
        self.runner = runner
        self.layers = runner.shard.layers
        self.split_invariant = runner.shard.split_invariant
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-stage")

    @property
    def kv_budget(self):
        return self.runner.kv_budget

    def kv_cost(self, positions):
        return self.runner.shard.kv_bytes(positions)

    async def step(self, request_id, position, tokens, hidden, sampling, n_prompt, prefill_only,
                   allowed=b"", score_top=-1, batched=False, draws=0, reuse="", copy=False,
                   max_positions=0, replay=False):
        t0 = time.perf_counter()
        out = await self._run(self.runner.step, request_id, position, tokens, hidden,
                              sampling, n_prompt, prefill_only, allowed, score_top, batched,
                              draws, reuse, copy, max_positions, replay)
        if len(tokens) == 1 and not prefill_only:
            ms = (time.perf_counter() - t0) * 1e3
            self._note_decode(ms, ms)
        return out

    async def step_many(self, steps):
        t0 = time.perf_counter()
        outs = await self._run(self.runner.step_many, steps)
        ms = (time.perf_counter() - t0) * 1e3
        self._note_decode(ms, ms)
        return [stage_error(self.name, o) if isinstance(o, StageError) else o for o in outs]

    async def _run(self, fn, *args):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except StageError as err:
            raise stage_error(self.name, err) from err
        except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
            raise StageLost(f"stage {self.name} was closed", "") from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this request itself is being cancelled (client gone)
            # the executor dropped our queued step (the stage was closed): not the caller's
            # cancellation, so it must not end the stream as one
            raise StageLost(f"stage {self.name} was closed", "") from None

    async def end(self, request_id):
        self.runner.end(request_id)

    async def settle(self):
        await self._run(self.runner.settle, SETTLE_QUIET)

    async def close(self):
        self._executor.shutdown(wait=False, cancel_futures=True)

    def memory(self) -> dict:
        import psutil

        from mesh.devices import resident_bytes

        return {"rss_bytes": resident_bytes(), "kv_bytes": self.runner.kv_bytes(),
                "capacity_bytes": psutil.virtual_memory().total,
                "kv_budget_bytes": self.kv_budget, "kv_reserved_bytes": self.runner.kv_reserved()}


class RemoteStage(Stage):
    """A stage on a ``mesh node`` reached over gRPC, with the cluster secret on every call."""

    def __init__(self, name: str, address: str, secret: str | None, layers: LayerRange,
                 wire_dtype: str = "float32", vocab_size: int | None = None,
                 split_invariant: bool = False, kv_budget: int | None = None,
                 kv_layout: dict | None = None):
        """``kv_budget`` and ``kv_layout``: as the node's Load reply says (None: a node
        that sets no budget, or says nothing of it)."""
        self.name = name
        self.kv_budget, self.kv_layout = kv_budget, kv_layout
        self.split_invariant = split_invariant  # as the node's Load reply says
        self.vocab_size = vocab_size  # a sampled token id outside it marks the node faulty
        self.address = address
        self.secret = secret
        self.layers = layers
        self.wire_dtype = wire_dtype
        self.bytes_sent = 0
        self.bytes_received = 0
        self.compute_ms = 0.0  # node-side forward time, to tell compute from network
        self.decode_steps = 0
        self.decode_ms = 0.0
        self.aborted = False
        self.node_info = None  # the node's last Info reply (heartbeat): memory, backend
        self.last_reply = 0.0  # loop time of the last successful call: progress is liveness
        self.link = NodeLink(address, secret, CHANNEL_OPTIONS)

    def kv_cost(self, positions):
        return kv_layout_bytes(self.kv_layout, positions)

    async def ping(self, timeout: float) -> bool:
        try:
            self.node_info = await acall(self.link.stub().Info, mesh_pb2.InfoRequest(),
                                         self.secret, "/mesh.Node/Info", timeout)
        except asyncio.CancelledError:
            raise
        except Exception:  # AioRpcError, or UsageError on a channel closed by abort()
            return False
        self.last_reply = asyncio.get_running_loop().time()
        return True

    def memory(self) -> dict:
        i = self.node_info
        if i is None:
            return super().memory()
        return {"rss_bytes": i.rss_bytes, "kv_bytes": i.kv_bytes,
                "capacity_bytes": int(i.memory_gb * 1024 ** 3),
                "kv_budget_bytes": i.kv_budget_bytes or None,
                "kv_reserved_bytes": i.kv_reserved_bytes}

    async def abort(self) -> None:
        """Fail every call in flight to this node now (it was declared lost)."""
        self.aborted = True
        await self.link.close()

    def _request(self, request_id, position, tokens, hidden, sampling, n_prompt, prefill_only,
                 allowed=b"", score_top=-1, batched=False, draws=0,
                 reuse="", copy=False, max_positions=0, replay=False) -> mesh_pb2.StepRequest:
        req = mesh_pb2.StepRequest(request_id=request_id, position=position, tokens=tokens,
                                   n_prompt=n_prompt, prefill_only=prefill_only, allowed=allowed,
                                   score=score_top >= 0, score_top=max(score_top, 0),
                                   batched=batched, draws=draws, reuse=reuse, copy=copy,
                                   max_positions=max_positions, replay=replay)
        if hidden is not None:
            req.hidden.CopyFrom(to_tensor(hidden, self.wire_dtype if hidden.dtype == np.float32
                                          else None))
        if sampling is not None:
            req.sampling.CopyFrom(sampling_to_proto(sampling))
        return req

    async def _call(self, method: str, req, timeout: float):
        self.bytes_sent += req.ByteSize()
        try:
            reply = await self.link.call(method, req, timeout)
        except ForgedReply as exc:
            raise self._faulty(exc.message) from exc
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(self, exc) from exc
        except grpc.aio.UsageError as exc:  # the channel was closed (lost, or retired)
            raise StageLost(f"stage {self.name} ({self.address}) was lost", self.name) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.aborted and not (task is not None and task.cancelling()):
                # the heartbeat declared this node lost and closed the channel
                raise StageLost(f"stage {self.name} ({self.address}) was lost", self.name)
            raise
        self.last_reply = asyncio.get_running_loop().time()
        self.bytes_received += reply.ByteSize()
        return reply

    async def step(self, request_id, position, tokens, hidden, sampling, n_prompt, prefill_only,
                   allowed=b"", score_top=-1, batched=False, draws=0, reuse="", copy=False,
                   max_positions=0, replay=False):
        req = self._request(request_id, position, tokens, hidden, sampling, n_prompt,
                            prefill_only, allowed, score_top, batched, draws, reuse, copy,
                            max_positions, replay)
        timeout = DECODE_TIMEOUT if len(tokens) == 1 else STEP_TIMEOUT
        t0 = time.perf_counter()
        reply = await self._call("Step", req, timeout)
        self.compute_ms += reply.compute_ms
        if len(tokens) == 1 and not prefill_only:  # a decode step: the planner's unit
            self.decode_steps += 1
            self.decode_ms += reply.compute_ms
            self._note_decode(reply.compute_ms, (time.perf_counter() - t0) * 1e3)
        return self._parse(reply, tokens, hidden, score_top)

    async def step_many(self, steps):
        batch = mesh_pb2.StepBatch(items=[self._request(**st) for st in steps])
        t0 = time.perf_counter()
        reply = await self._call("StepMany", batch, DECODE_TIMEOUT)
        if len(reply.replies) != len(steps):
            raise self._faulty(f"{len(reply.replies)} replies to a batch of {len(steps)}")
        ms = reply.replies[0].compute_ms
        self.compute_ms += ms
        self.decode_steps += 1
        self.decode_ms += ms
        self._note_decode(ms, (time.perf_counter() - t0) * 1e3)
        out = []
        for st, r in zip(steps, reply.replies):
            if r.status:
                out.append(_status_error(self, r.status, r.message))
            else:
                out.append(self._parse(r, st["tokens"], st["hidden"], st.get("score_top", -1)))
        return out

    def _parse(self, reply, tokens, hidden, score_top):
        kind = reply.WhichOneof("out")
        if kind == "hidden":
            try:
                out = from_tensor(reply.hidden)
            except CodecError as exc:
                raise self._faulty(f"a malformed tensor: {exc}") from exc
            if out.shape != (len(tokens) if hidden is None else hidden.shape[0],
                             *out.shape[1:]) or not np.isfinite(out).all():
                raise self._faulty(f"hidden states of shape {out.shape} with non-finite "
                                   f"values or the wrong length")
            return out
        scores = self._scores(reply, score_top) if reply.scored else None
        if kind == "token":
            t = reply.token
            if t.token_id < 0 or (self.vocab_size and t.token_id >= self.vocab_size):
                raise self._faulty(f"token id {t.token_id} outside the vocabulary")
            return TokenStep(t.token_id, t.logprob if t.has_logprob else None,
                             list(zip(t.top_ids, t.top_logprobs)) if t.has_logprob else None,
                             prompt_scores=scores)
        return ChunkScores(scores) if scores is not None else None

    def _scores(self, reply, top_n: int) -> list[PromptScore]:
        n = len(reply.score_logprobs)
        if len(reply.score_top_ids) != n * top_n or len(reply.score_top_logprobs) != n * top_n:
            raise self._faulty("prompt scores of the wrong length")
        ids, lps = list(reply.score_top_ids), list(reply.score_top_logprobs)
        return [PromptScore(lp, list(zip(ids[i * top_n:(i + 1) * top_n],
                                         lps[i * top_n:(i + 1) * top_n])))
                for i, lp in enumerate(reply.score_logprobs)]

    def _faulty(self, what: str) -> StageLost:
        """The node answered with something no honest node sends: treat it as lost."""
        log.warning("stage %s (%s) sent %s; treating it as faulty", self.name, self.address,
                    what)
        return StageLost(f"stage {self.name} ({self.address}) is faulty: it sent {what}",
                         self.name)

    async def end(self, request_id):
        if self.aborted:
            return
        try:
            await self.link.call("End", mesh_pb2.EndRequest(request_id=request_id), 5.0)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, ForgedReply) as exc:
            log.debug("End on %s failed: %s", self.name, exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # a re-plan closed this stage's channel, which cancels the calls on it: the
            # request is gone from that node's plan anyway (a kept cache forgotten after it)
            log.debug("End on %s: its channel was closed", self.name)

    async def close(self):
        await self.link.close()


def _rpc_error(stage: RemoteStage, exc: grpc.aio.AioRpcError) -> MeshError:
    return _status_error(stage, exc.code(), exc.details())


def _status_error(stage: RemoteStage, code, details: str) -> MeshError:
    """A node's refusal (a grpc.StatusCode or its name) as the caller sees it."""
    if isinstance(code, str):
        code = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
    msg = f"stage {stage.name} ({stage.address}): {code.name}: {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the node holds all it can: not lost
        return Overloaded(msg)
    if code == grpc.StatusCode.ABORTED:  # a kept cache to reuse is gone: not lost either
        return ReuseMissed(msg)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION):
        # NOT_FOUND / FAILED_PRECONDITION: the node restarted or was re-planned under us
        return StageLost(msg, stage.name, retry_after=5.0)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(msg)
    return MeshError(msg)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def cuts_for(stages: list) -> PromptCuts:
    """How prompts are cut on ``stages``: to the token where every one is split-invariant."""
    return PromptCuts(PREFILL_CHUNK, bool(stages) and all(s.split_invariant for s in stages))


def _chunks(tokens: list[int], start: int, n_prompt: int, cuts: PromptCuts):
    """(position, tokens, is_last) steps that feed ``tokens`` from ``start``: the prompt in
    pieces (``cuts``), generated tokens one at a time. A replay after a re-plan so runs the
    very computations the undisturbed request ran (a quantized kernel's sums can differ
    between a many-row and a one-row matmul), and gives the same text."""
    steps = []
    off = 0
    while off < len(tokens):
        pos = start + off
        n = cuts.piece_end(pos, n_prompt) - pos if pos < n_prompt else 1
        steps.append((pos, tokens[off:off + n], off + n >= len(tokens)))
        off += n
    return steps


@dataclass
class _Decode:
    """One request's decode step waiting for a micro-batch."""

    rid: str
    position: int
    token: int
    req: GenerationRequest
    n_prompt: int
    epoch: int
    stages: list
    future: asyncio.Future


class MicroBatcher:
    """The coordinator's decode scheduler: running requests' next steps go through the
    stages as micro-batches, one StepMany call per stage each, and with N stages up to N
    micro-batches are in flight, so every stage works on one while the others work on the
    rest (each stage takes one micro-batch at a time, in order).

    A micro-batch leaves when every running request not already in flight has its step in,
    or GATHER seconds after the first, and holds at most ceil(running / N) steps, which
    spreads the requests over the N micro-batches. Whether a step ran batched is returned,
    so a replay after a re-plan can repeat it the same way (``StepRequest.batched``).
    """

    GATHER = 0.003

    def __init__(self, engine: "PipelineEngine"):
        self.engine = engine
        self.running: set[str] = set()  # requests in their decode phase
        self._pending: list[_Decode] = []
        self._inflight: dict[asyncio.Task, int] = {}  # micro-batch -> its size
        self._wake = asyncio.Event()
        self._locks: dict[int, asyncio.Lock] = {}
        self._override = int(os.environ.get("MESH_MICRO_BATCHES", "0") or 0)  # benchmarks
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="mesh-batcher")
        self._task.add_done_callback(self._ended)
        self.batches = 0
        self.batched_steps = 0

    async def decode(self, rid: str, position: int, token: int, req: GenerationRequest,
                     n_prompt: int, epoch: int, stages: list) -> tuple[TokenStep, bool]:
        if self._task.done():
            raise EngineUnavailable("the pipeline's scheduler stopped", retry_after=1.0)
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Decode(rid, position, token, req, n_prompt, epoch, stages, fut))
        self._wake.set()
        return await fut

    def _ended(self, task: asyncio.Task) -> None:
        """Whatever ended the dispatcher, no step is left waiting for it forever (the next
        request starts a new one)."""
        if not task.cancelled() and task.exception() is not None:
            log.error("the micro-batcher died (%r)", task.exception())
        for d in self._pending:
            if not d.future.done():
                d.future.set_exception(EngineUnavailable("the pipeline's scheduler stopped",
                                                         retry_after=1.0))
        self._pending = []

    def _slots(self) -> int:
        n = self._override
        return n if n > 0 else max(1, len(self.engine.stages))

    def _expected(self) -> int:
        return len(self.running) - sum(self._inflight.values())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending or len(self._inflight) >= self._slots():
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = loop.time() + self.GATHER
            while len(self._pending) < self._expected() and loop.time() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            self._dispatch()

    def _dispatch(self) -> None:
        engine = self.engine
        live = []
        for d in self._pending:
            if d.future.done():
                continue  # its request was cancelled
            if d.epoch != engine.epoch:  # re-planned since: the request replays first
                d.future.set_exception(StageLost("pipeline changed", ""))
                continue
            live.append(d)
        cap = max(1, -(-len(self.running) // self._slots()))
        group, self._pending = live[:cap], live[cap:]
        if not group:
            return
        task = asyncio.get_running_loop().create_task(self._run(group))
        self._inflight[task] = len(group)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._inflight.pop(task, None)
        self._wake.set()

    async def _run(self, group: list[_Decode]) -> None:
        batched = len(group) > 1
        self.batches += 1
        if batched:
            self.batched_steps += len(group)
        x: np.ndarray | None = None  # hidden states of the items still going, (k, H)
        try:
            for stage in group[0].stages:
                last = stage is group[0].stages[-1]
                steps = []
                for i, d in enumerate(group):
                    steps.append(dict(
                        request_id=d.rid, position=d.position, tokens=[d.token],
                        hidden=None if x is None else x[i:i + 1], sampling=None,
                        n_prompt=d.n_prompt, prefill_only=False,
                        allowed=d.req.constraint.bitmask()
                        if last and d.req.constraint is not None else b"",
                        batched=batched))
                lock = self._locks.setdefault(id(stage), asyncio.Lock())
                async with lock:
                    outs = await stage.step_many(steps)
                keep, rows = [], []
                for d, out in zip(group, outs):
                    if isinstance(out, BaseException):
                        if not d.future.done():
                            d.future.set_exception(out)
                    elif last:
                        if not d.future.done():
                            d.future.set_result((out, batched))
                    else:
                        keep.append(d)
                        rows.append(out)
                group = keep
                if not group:
                    return
                x = np.concatenate(rows, axis=0)
        except BaseException as exc:
            for d in group:
                if not d.future.done():
                    d.future.set_exception(exc if isinstance(exc, Exception)
                                           else StageLost("the micro-batch was cancelled", ""))
            if not isinstance(exc, Exception):
                raise

    def close(self) -> None:
        self._task.cancel()
        for t in list(self._inflight):
            t.cancel()


class PipelineEngine(Engine):
    """Stages in order; with a ``replanner`` it survives losing a node.

    Every request keeps its token history. When a stage fails (gone, unreachable, or declared
    lost by the heartbeat after ``lost_after`` seconds of silence), the first request to notice
    asks the replanner for a new pipeline (a hot standby taking over the lost range, or a full
    re-plan over the survivors); every request in flight then replays its history on the new
    stages and continues where it stopped. If the survivors cannot hold the model, requests end
    with a 503 carrying ``model_too_large_for_remaining_capacity``.
    """

    supports_scoring = True


    def __init__(self, model_id: str, stages: list[Stage], tokenizer, context_length: int,
                 cleanup=None, replanner=None, heartbeat_interval: float = 1.0,
                 lost_after: float = 3.0, max_running: int = MAX_REQUESTS,
                 max_queued: int = MAX_QUEUED):
        check_covering([s.layers for s in stages])
        self.model_id = model_id
        self.stages = stages
        self.tokenizer = tokenizer
        self.context_length = context_length
        self._cleanup = cleanup
        self.replanner = replanner
        self.heartbeat_interval = heartbeat_interval
        self.lost_after = lost_after
        self.epoch = 0  # bumped by every re-plan
        self.lost: dict[str, float] = {}  # node -> when it was declared lost
        self.rescue_seconds = 0.0  # total time spent re-planning (metrics)
        self.events: list[str] = []  # what happened, for /v1/models and the logs
        self._lock: asyncio.Lock | None = None
        self._lock_loop = None
        self._monitor: asyncio.Task | None = None
        self._replan_task: asyncio.Task | None = None
        self._last_ok: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        # Stages stay open while any request still runs on them: a re-plan retires the old
        # ones, and the last request to leave a retired stage closes it.
        self._users: Counter = Counter()
        self._retired: set = set()
        # a request is admitted when its cache, at its prompt plus max_tokens, fits beside
        # the running requests' and the kept caches under every node's KV budget
        self.admission = Admission(max_running, max_queued, KVBudget(
            self._kv_limits, self._kept_positions, self._drop_oldest_kept))
        self._freeing = Pending()  # kept caches being freed for room
        self._batcher: MicroBatcher | None = None
        # prefix reuse: finished requests whose caches the nodes still hold, by the whole
        # prompt chunks they computed -> (request id, epoch, stages, the positions the
        # nodes count it at: its prompt plus max_tokens)
        self._kept: OrderedDict[tuple, tuple[str, int, list, int]] = OrderedDict()
        self.reused_tokens = 0
        # prompts being fed now, by their tokens: (request id, epoch, a future set True once
        # the prompt is in its caches), so the other choices of one prompt copy them
        self._feeding: dict[tuple, tuple[str, int, asyncio.Future]] = {}
        # running requests' prompts: request id -> (its tokens, how many of them its caches
        # hold in whole chunks from position 0, the stages), so that a prompt starting the
        # same way (one long system prompt, many users) copies those chunks
        self._prompt_fed: dict[str, tuple[list[int], int, list]] = {}
        self.shared_tokens = 0
        self._rids: set[str] = set()  # the ids running requests have on the nodes
        # requests replaying on a new plan: their caches are never refused for a KV budget
        self._replaying: set[str] = set()
        self.monitor_restarts = 0
        self._rejoin_at = 0.0  # when lost nodes are next asked whether they are back
        self._closing = False
        self._settler: asyncio.Task | None = None

    # ---- membership -------------------------------------------------------------------

    async def start(self) -> None:
        self._ensure_monitor()  # a node lost while no request runs shows up at once

    def _ensure_monitor(self) -> None:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:  # a new event loop
            self._lock, self._lock_loop = asyncio.Lock(), loop
            self._monitor = None
        if self._monitor is None or self._monitor.done():
            if self.replanner is not None:
                self._monitor = loop.create_task(self._heartbeat(), name="mesh-heartbeat")
                self._monitor.add_done_callback(self._monitor_done)

    def _monitor_done(self, task: asyncio.Task) -> None:
        """Supervision: a heartbeat that died is logged and started again."""
        if self._closing or task.cancelled():
            return
        exc = task.exception()
        log.error("the heartbeat task died (%r); restarting it", exc)
        self.monitor_restarts += 1
        self._event(f"heartbeat restarted after {exc!r}")
        self._monitor = None
        try:
            self._ensure_monitor()
        except RuntimeError:  # the loop is gone
            pass

    async def _heartbeat(self) -> None:
        """Ping every remote stage; one that neither answers nor makes progress for
        ``lost_after`` seconds is lost. A reply to any call counts: a node busy with
        queued steps is alive even when its ping waits behind them."""
        while True:
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad round must not end membership
                log.exception("heartbeat round failed")
            await asyncio.sleep(self.heartbeat_interval)

    async def _beat(self) -> None:
        stages = [s for s in self.stages if isinstance(s, RemoteStage)]
        oks = await asyncio.gather(*(s.ping(self.heartbeat_interval) for s in stages))
        now = asyncio.get_running_loop().time()
        for s, ok in zip(stages, oks):
            last = max(self._last_ok.setdefault(s.name, now), s.last_reply)
            if ok:
                last = now
            self._last_ok[s.name] = last
            silent = now - last
            if silent >= self.lost_after and s.name not in self.lost and s in self.stages:
                self._declare_lost(s, f"silent for {silent:.1f}s")
        self._maybe_rejoin(now)

    def _maybe_rejoin(self, now: float) -> None:
        """Every REJOIN_EVERY seconds while nodes are lost and no request runs, ask them
        whether they answer again (a machine rebooted, a cable back in): one that does is no
        longer lost, and where the plan would use it the pipeline re-plans onto it. Not while
        requests run: a re-plan makes each of them replay its history."""
        if not hasattr(self.replanner, "rejoin") or not (self.lost or self.replanner.joining()):
            return
        if (now < self._rejoin_at or self.admission.running or self.admission.queued
                or self._lock.locked()
                or (self._replan_task is not None and not self._replan_task.done())):
            return
        self._rejoin_at = now + REJOIN_EVERY
        self._replan_task = asyncio.get_running_loop().create_task(self._rejoin(),
                                                                   name="mesh-rejoin")

    async def _rejoin(self) -> None:
        # asked outside the lock: a request that comes meanwhile does not wait on the
        # questions (up to a second each for a node that is unreachable, not refused)
        answered = await self.replanner.answering(set(self.lost))
        if not answered:
            return
        async with self._lock:
            t0 = time.perf_counter()
            try:
                back, stages = await self.replanner.rejoin(answered, set(self.lost))
            except MeshError as exc:
                log.warning("re-plan onto returning nodes failed: %s", exc.message)
                return
            for name in back:
                self._event(f"{name} answers again" if self.lost.pop(name, None) is not None
                            else f"{name} joins")
            if stages is not None:
                await self._install(stages, t0)

    def _acquire(self, stages: list[Stage]) -> None:
        self._users.update(stages)

    def _release(self, stages: list[Stage]) -> None:
        self._users.subtract(stages)
        for s in stages:
            if self._users[s] <= 0:
                del self._users[s]
                if s in self._retired:
                    self._retired.discard(s)
                    self._spawn(s.close())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    def _event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")

    def _note_lost(self, name: str, why: str) -> None:
        if name not in self.lost:
            self.lost[name] = time.time()
            self._event(f"lost {name}: {why}")
            log.warning("node %s lost (%s); re-planning", name, why)

    def _declare_lost(self, stage: Stage, why: str) -> None:
        """The heartbeat's verdict: fail the node's calls in flight and re-plan now."""
        self._note_lost(stage.name, why)
        if isinstance(stage, RemoteStage):
            self._spawn(stage.abort())
        if self._replan_task is None or self._replan_task.done():
            epoch = self.epoch
            self._replan_task = asyncio.get_running_loop().create_task(
                self._rescue(epoch, stage.name, proactive=True), name="mesh-replan")

    async def _rescue(self, epoch: int, failed: str, proactive: bool = False) -> None:
        """Re-plan once per failure, however many requests noticed it."""
        async with self._lock:
            if self.epoch != epoch:
                return  # someone already re-planned
            lost = set(self.lost) | {failed}
            t0 = time.perf_counter()
            try:
                stages = await self.replanner.replan(lost)
            except ModelTooLarge as exc:
                self._event(f"re-plan failed: {exc.message}")
                if proactive:
                    return
                raise EngineUnavailable(
                    f"a node was lost and the rest cannot hold the model: {exc.message}",
                    code="model_too_large_for_remaining_capacity", retry_after=30.0) from exc
            except MeshError as exc:
                if proactive:
                    log.warning("re-plan failed: %s", exc.message)
                    return
                raise EngineUnavailable(f"re-plan failed: {exc.message}",
                                        retry_after=10.0) from exc
            await self._install(stages, t0)

    async def _install(self, stages: list[Stage], t0: float) -> None:
        """Run on ``stages`` from now (under ``_lock``): requests on the old ones replay."""
        old, self.stages = self.stages, stages
        self.epoch += 1
        for s in old:
            if s not in stages:
                if self._users[s] > 0:
                    self._retired.add(s)  # closed by the last request to leave it
                else:
                    await s.close()
        for s in stages:
            self.lost.pop(s.name, None)
            self._last_ok.pop(s.name, None)  # a node back from the lost: silent from now
        self.rescue_seconds += time.perf_counter() - t0
        self._event(f"re-planned in {time.perf_counter() - t0:.1f}s: "
                    + ", ".join(f"{s.name} {s.layers}" for s in stages))
        log.warning("new pipeline: %s", self.events[-1])

    def info(self) -> dict:
        return {"mode": "pipeline",
                "total_layers": self.stages[0].layers.total if self.stages else None,
                "stages": [{"node": s.name, "layers": str(s.layers),
                            "start": s.layers.start, "end": s.layers.end,
                            "address": getattr(s, "address", "local"),
                            "decode_ms_per_token": round(s.decode_ms / s.decode_steps, 2)
                            if getattr(s, "decode_steps", 0) else None,
                            "recent_compute_ms": _round(s.recent_compute_ms),
                            "recent_step_ms": _round(s.recent_step_ms), **s.memory()}
                           for s in self.stages],
                "lost": sorted(self.lost), "epoch": self.epoch, "events": self.events[-10:],
                "waiting_for": list(getattr(self.replanner, "waiting", [])),
                "running": self.admission.running, "queued": self.admission.queued,
                "heartbeat": {"running": self._monitor is not None and not self._monitor.done(),
                              "restarts": self.monitor_restarts}}

    async def _feed(self, rid: str, stages: list[Stage], tokens: list[int],
                    req: GenerationRequest, n_prompt: int, scores: list | None = None,
                    sample: bool = True, classes: list[bool] = (), draws: int = 0,
                    start: int = 0, reuse: str = "", copy: bool = False,
                    track: bool = False) -> TokenStep | None:
        """Feed ``tokens[start:]`` from position ``start`` through ``stages``, one request
        alone: the prompt in chunks, generated tokens one by one, each computed as it first
        was (``classes``: whether the step feeding generated token j ran batched). With
        ``sample`` the last stage samples after the last chunk; ``draws``: random draws the
        request already made; ``reuse``: the kept request whose cache, cut to ``start``,
        the stages take over (ReuseMissed if one no longer holds it); with ``copy``, a
        running request whose cache they copy. With ``track``, what every stage's cache holds
        of the prompt (as much as ``cuts_for(stages)`` lets another take) is noted for other
        prompts to copy."""
        choice = None
        cuts = cuts_for(stages)
        for pos, chunk, last in _chunks(tokens[start:], start, n_prompt, cuts):
            x = None
            score = -1
            if scores is not None and pos < n_prompt:
                score = req.score_prompt
            j = pos - n_prompt
            batched = bool(0 <= j < len(classes) and classes[j])
            for stage in stages:
                allowed = b""
                if sample and last and stage is stages[-1] and req.constraint is not None:
                    allowed = req.constraint.bitmask()  # the grammar travels with the step
                first = pos == start
                x = await stage.step(rid, pos, chunk, x, req.sampling if first else None,
                                     n_prompt, not (last and sample), allowed,
                                     score if stage is stages[-1] else -1, batched,
                                     draws if first else 0, reuse if first else "",
                                     copy and first, self._positions(req) if first else 0,
                                     first and rid in self._replaying)
            if score >= 0:
                got = x.prompt_scores if isinstance(x, TokenStep) else \
                    x.scores if isinstance(x, ChunkScores) else None
                if got is None:
                    raise MeshError(f"stage {stages[-1].name} did not score the prompt")
                scores.extend(got)
            if track and pos < n_prompt:
                whole = cuts.shareable(pos + len(chunk))
                if whole:
                    self._prompt_fed[rid] = (tokens, whole, stages)
            choice = x
        return choice

    def _micro_batcher(self) -> MicroBatcher:
        loop = asyncio.get_running_loop()
        b = self._batcher
        if b is None or b._task.get_loop() is not loop or b._task.done():
            b = self._batcher = MicroBatcher(self)
        return b

    # ---- the KV budget (Admission's KVBudget) ---------------------------------------------

    def _kv_limits(self) -> list[KVLimit]:
        return [KVLimit(f"node {s.name}", s.kv_budget, s.kv_cost) for s in self.stages
                if s.kv_budget is not None]

    def _kept_positions(self) -> list[int]:
        return [e[3] for e in self._kept.values()]

    def _drop_oldest_kept(self) -> bool:
        """Free the least recently used kept cache for a request being admitted (its
        first step waits until the nodes have freed it: ``_freeing``)."""
        if not self._kept:
            return False
        self._freeing.start(self._forget(self._kept.popitem(last=False)[1]))
        return True

    def _positions(self, req: GenerationRequest) -> int:
        return req.longest(self.context_length)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenStep]:
        self._ensure_monitor()
        async with self.admission.slot(self._positions(req)):
            await self._freeing.wait(STEP_TIMEOUT)
            steps = self._generate(req)
            try:
                async for step in steps:
                    yield step
            finally:
                await cleanup(steps.aclose())  # the nodes' caches are freed before the slot
                if self.admission.running == 1 and not self.admission.queued:  # the last
                    self._settle_later()

    def _settle_later(self) -> None:
        """Once no request has run for SETTLE_QUIET seconds, stages cut their shared KV
        buffers to the kept caches (not at once: the next burst would grow them again, a
        copy of every cache while its streams wait)."""
        if self._settler is not None and not self._settler.done():
            self._settler.cancel()

        async def later():
            await asyncio.sleep(SETTLE_QUIET)
            await asyncio.gather(*(s.settle() for s in self.stages), return_exceptions=True)

        self._settler = asyncio.get_running_loop().create_task(later(), name="mesh-settle")

    async def _generate(self, req: GenerationRequest) -> AsyncIterator[TokenStep]:
        """One request: its prompt fed alone (in chunks), then each decode step in the
        micro-batcher's company. On a lost stage it replays its history on the new stages,
        every step as it first ran, and samples on from where its random draws stopped."""
        rid = req.request_id
        if rid in self._rids or any(e[0] == rid for e in self._kept.values()):
            # an id the nodes hold already (a caller reusing one): a cache under it is not
            # this request's, and a position it does not match reads as a lost node
            rid = f"{rid}~{uuid.uuid4().hex[:8]}"
        self._rids.add(rid)
        history = list(req.prompt_ids)
        n_prompt = len(history)
        produced, rescues = 0, 0
        finished = False  # ended normally: its caches may be kept for prefix reuse
        fed = 0  # positions the current stages hold
        classes: list[bool] = []  # classes[j]: the step feeding generated token j ran batched
        batcher = self._micro_batcher()
        if self._lock.locked():  # a re-plan is under way: wait for its stages (bounded)
            try:
                await asyncio.wait_for(self._wait_replan(), timeout=STEP_TIMEOUT)
            except BaseException as exc:
                self._rids.discard(rid)
                if isinstance(exc, asyncio.TimeoutError):
                    raise EngineUnavailable("the pipeline is being re-planned",
                                            retry_after=5.0) from None
                raise
        epoch, stages = self.epoch, self.stages
        self._acquire(stages)
        try:
            while True:
                scores = None
                try:
                    if epoch != self.epoch:  # re-planned under us: replay on the new stages
                        raise StageLost("pipeline changed", "")
                    if produced == 0:
                        # the prompt's scores (echo) are collected while it is fed, before the
                        # first token; a replay of the prompt collects them afresh
                        scores = [] if req.score_prompt is not None else None
                        choice = await self._feed_prompt(rid, stages, history, req, epoch,
                                                         scores)
                    else:
                        if fed < len(history) - 1:  # a replay: all but the newest token
                            await self._feed(rid, stages, history[:-1], req, n_prompt,
                                             sample=False, classes=classes, draws=produced)
                            fed = len(history) - 1
                        batcher = self._micro_batcher()  # a new one if it stopped
                        batcher.running.add(rid)
                        choice, batched = await batcher.decode(rid, fed, history[-1], req,
                                                               n_prompt, epoch, stages)
                        classes.append(batched)
                except StageLost as exc:
                    if self.replanner is None or rescues >= MAX_RESCUES:
                        raise
                    rescues += 1
                    self._replaying.add(rid)
                    batcher.running.discard(rid)
                    self._prompt_fed.pop(rid, None)
                    if exc.stage and epoch == self.epoch:
                        self._note_lost(exc.stage, exc.message)
                        await self._rescue(epoch, exc.stage)
                    elif epoch == self.epoch:  # closed under us with no re-plan: wait for it
                        await self._wait_replan()
                    await asyncio.gather(*(s.end(rid) for s in stages), return_exceptions=True)
                    self._release(stages)
                    epoch, stages, fed = self.epoch, self.stages, 0
                    self._acquire(stages)
                    log.info("request %s: replaying %d tokens on the new pipeline", rid[:8],
                             len(history))
                    continue
                fed = len(history)
                req.advance(choice.token_id)
                produced += 1
                step = mark_finish(choice, produced, req)
                step.prompt_scores = scores  # every chunk's (the node's are its last chunk's)
                # set before the yield: a consumer that stops at the finish closes the
                # generator at the yield, and nothing after it runs
                finished = bool(step.finish_reason) and epoch == self.epoch
                yield step
                if step.finish_reason:
                    return
                history.append(step.token_id)
        finally:
            self._rids.discard(rid)
            self._replaying.discard(rid)
            batcher.running.discard(rid)
            self._prompt_fed.pop(rid, None)
            try:
                if not (finished and await self._keep(rid, req, history, stages)):
                    await cleanup(*(s.end(rid) for s in stages))
            finally:
                self._release(stages)

    async def _feed_prompt(self, rid: str, stages: list[Stage], history: list[int],
                           req: GenerationRequest, epoch: int, scores: list | None):
        """A request's prompt. When another running request is feeding the very same prompt
        (the ``n`` > 1 choices of one request), it waits for that one and its stages copy
        what it fed (``StepRequest.copy``), feeding only the last piece itself: the same
        pieces from the same positions, so the same numbers. When another is feeding more
        of this prompt's start than the nodes hold now (users of one system prompt arriving
        together), it waits for that prompt to be in, then starts from a copy of it."""
        key = tuple(history)
        cuts = cuts_for(stages)
        whole = cuts.limit(len(history))
        if req.score_prompt is not None or whole == 0:
            return await self._feed_prompt_alone(rid, stages, history, req, epoch, scores)
        lead = self._feeding.get(key)
        if lead is None:
            feeding = {k: e for k, e in self._feeding.items() if e[1] == epoch}
            k, n = longest_kept_prefix(feeding, history, cuts)
            if k is not None and n > max(h[1] for h in self._held(history, stages, epoch)):
                await asyncio.shield(feeding[k][2])  # then it is a donor, or kept
        if lead is not None and lead[1] == epoch:
            if await asyncio.shield(lead[2]) and self.epoch == epoch:
                try:
                    choice = await self._feed(rid, stages, history, req, len(history),
                                              scores, start=whole, reuse=lead[0], copy=True,
                                              track=True)
                    req.cached_tokens = whole
                    self.shared_tokens += whole
                    return choice
                except ReuseMissed as exc:  # the leader's cache went: feed it all
                    log.info("request %s: no copy (%s)", rid[:8], exc.message)
                    await cleanup(*(s.end(rid) for s in stages))
            return await self._feed_prompt_alone(rid, stages, history, req, epoch, scores)
        mine = (rid, epoch, asyncio.get_running_loop().create_future())
        self._feeding.setdefault(key, mine)
        fed = False
        try:
            choice = await self._feed_prompt_alone(rid, stages, history, req, epoch, scores)
            fed = True
            return choice
        finally:
            if not mine[2].done():
                mine[2].set_result(fed)
            if self._feeding.get(key) is mine:
                del self._feeding[key]

    def _held(self, history: list[int], stages: list[Stage], epoch: int, rid: str = ""):
        """What the nodes hold now of ``history``'s start for another request to copy, as
        much as ``cuts_for(stages)`` lets it take: (the kept cache's key, how many tokens)
        and (the running request other than ``rid`` that fed it, how many tokens)."""
        cuts = cuts_for(stages)
        kept = {k: e for k, e in self._kept.items() if e[1] == epoch}
        donors: dict[tuple, str] = {}
        for other, (tokens, n, where) in list(self._prompt_fed.items()):
            if other != rid and where is stages:
                donors.setdefault(tuple(tokens[:n]), other)
        key, shared = longest_kept_prefix(donors, history, cuts)
        return longest_kept_prefix(kept, history, cuts), (donors.get(key), shared)

    async def _feed_prompt_alone(self, rid: str, stages: list[Stage], history: list[int],
                                 req: GenerationRequest, epoch: int, scores: list | None):
        """A request's prompt, from a copy of the kept cache of a finished request that
        started the same way when the nodes hold one (what it fed of its prompt is not
        computed again: a chat's next turn, the next user with the same system prompt), or
        from a copy of a running request's fed prompt when that reaches further (one long
        system prompt, many users at once), else from position 0. How much may be taken is
        ``cuts_for(stages)``'s: to the token, or whole chunks."""
        (best, start), (donor, shared) = (None, 0), (None, 0)
        while self._kept and (self.admission.running + len(self._kept)
                              > self.admission.max_running):  # the nodes' slots go to requests
            await self._forget(self._kept.popitem(last=False)[1])
        if req.score_prompt is None:
            if self._kept:
                await self._drop_kept(lambda e: e[1] != epoch)  # re-planned: not these nodes
            (best, start), (donor, shared) = self._held(history, stages, epoch, rid)
        if donor is not None and shared > start:
            try:
                choice = await self._feed(rid, stages, history, req, len(history), scores,
                                          start=shared, reuse=donor, copy=True, track=True)
                req.cached_tokens = shared
                self.shared_tokens += shared
                return choice
            except ReuseMissed as exc:  # the donor ended meanwhile: feed it all
                log.info("request %s: no copy (%s)", rid[:8], exc.message)
                await cleanup(*(s.end(rid) for s in stages))
        elif best is not None:
            entry = self._kept[best]
            self._kept.move_to_end(best)  # a copy: the kept cache stays for the next prompt
            try:
                choice = await self._feed(rid, stages, history, req, len(history), scores,
                                          start=start, reuse=entry[0], copy=True, track=True)
                req.cached_tokens = start
                self.reused_tokens += start
                return choice
            except ReuseMissed as exc:  # reaped on a node: feed it all
                log.info("request %s: no reuse (%s)", rid[:8], exc.message)
                if self._kept.get(best) is entry:
                    del self._kept[best]
                await cleanup(*(s.end(i) for s in stages for i in (rid, entry[0])))
        return await self._feed(rid, stages, history, req, len(history), scores, track=True)

    async def _keep(self, rid: str, req: GenerationRequest, history: list[int],
                    stages: list[Stage]) -> bool:
        """Leave a finished request's caches on the nodes for a later prompt that starts the
        same way (the next turn of a chat): up to KEEP_CACHES, and never so many that the
        nodes' request limit could refuse a running request."""
        n = cuts_for(stages).shareable(len(req.prompt_ids))
        if n == 0 or req.score_prompt is not None or stages is not self.stages:
            return False
        key = tuple(history[:n])
        for k in [k for k in self._kept if key[:len(k)] == k]:  # a chat's earlier turns:
            old = self._kept.pop(k, None)  # this key gives whatever they would
            if old is not None:
                await self._forget(old)
        self._kept[key] = (rid, self.epoch, stages, self._positions(req))
        room = max(0, min(KEEP_CACHES, self.admission.max_running - self.admission.running))
        while self._kept and (len(self._kept) > room or
                              self.admission.over_budget(leaving=self._positions(req))):
            await self._forget(self._kept.popitem(last=False)[1])
        return key in self._kept

    async def _drop_kept(self, which) -> None:
        for key in [k for k, e in self._kept.items() if which(e)]:
            entry = self._kept.pop(key, None)  # another request may be dropping it too
            if entry is not None:
                await self._forget(entry)

    @staticmethod
    async def _forget(entry: tuple[str, int, list]) -> None:
        """Free a kept cache (``_kept``'s entry) on its nodes."""
        rid, stages = entry[0], entry[2]
        await cleanup(*(s.end(rid) for s in stages))

    async def _wait_replan(self) -> None:
        async with self._lock:
            pass

    async def close(self) -> None:
        self._closing = True
        if self._batcher is not None:
            self._batcher.close()
        for task in (self._monitor, self._replan_task, self._settler):
            if task is not None and not task.done():
                task.cancel()
        for s in self.stages:
            await s.close()
        if self.replanner is not None:
            self.replanner.close()
        if self._cleanup is not None:
            self._cleanup()
