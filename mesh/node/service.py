"""``mesh node``: a gRPC server that loads a shard on request and runs steps against
per-request KV caches. Status codes, not exception texts, carry failures to the caller."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent import futures

import grpc
import numpy as np

from mesh import __version__
from mesh.backends.base import available_backends
from mesh.devices import DeviceProfile, resident_bytes
from mesh.engine.sampling import SamplingParams
from mesh.node import mesh_pb2, mesh_pb2_grpc
from mesh.node import tls
from mesh.node.auth import AuthInterceptor, ForgedReply, call, check_secret
from mesh.node.codec import CodecError, from_tensor, to_tensor
from mesh.node.link import CALLS
from mesh.engine.base import TokenStep
from mesh.errors import MeshError
from mesh.node.runner import MAX_REQUESTS, ChunkScores, Proposal, StageError, StageRunner

log = logging.getLogger(__name__)

MAX_MESSAGE = 256 * 1024 * 1024
# for the channels that call a node (a coordinator's stages and ensemble members)
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE)]


def sampling_from_proto(s: mesh_pb2.Sampling) -> SamplingParams:
    return SamplingParams(
        temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k, min_p=s.min_p,
        seed=s.seed if s.has_seed else None, repetition_penalty=s.repetition_penalty or 1.0,
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
        logprobs=None if s.logprobs < 0 else s.logprobs,
        logit_bias=tuple(zip(s.bias_ids, s.bias_values)))


def sampling_to_proto(p: SamplingParams) -> mesh_pb2.Sampling:
    return mesh_pb2.Sampling(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        has_seed=p.seed is not None, seed=p.seed or 0,
        repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        logprobs=-1 if p.logprobs is None else p.logprobs,
        bias_ids=[t for t, _ in p.logit_bias], bias_values=[b for _, b in p.logit_bias])


def choice_to_proto(c: TokenStep) -> mesh_pb2.TokenChoice:
    top = c.top_logprobs or []
    return mesh_pb2.TokenChoice(token_id=c.token_id, logprob=c.logprob or 0.0,
                                has_logprob=c.logprob is not None,
                                top_ids=[t for t, _ in top], top_logprobs=[v for _, v in top])


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _FrameContext:
    """What a unary handler sees of its call when it runs as a Session frame: ``abort``
    ends the frame (with its status), not the stream."""

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Refused(code, details)


class NodeService(mesh_pb2_grpc.NodeServicer):
    def __init__(self, runner: StageRunner, profile: DeviceProfile, node_id: str | None = None,
                 wire_dtype: str = "float32", standby: bool = False):
        self.runner = runner
        # each open Session holds one of the server's worker threads while it lasts: at most
        # this many, so unary calls (the heartbeat's Info) always find a free worker
        self.max_sessions = max(4, runner.max_requests // 2)
        self.sessions = 0
        self._sessions_lock = threading.Lock()
        self.standby = standby
        self.profile = profile
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.wire_dtype = wire_dtype

    def _abort(self, context, err: StageError):
        context.abort(getattr(grpc.StatusCode, err.status), err.message)

    def Info(self, request, context):
        shard = self.runner.shard
        return mesh_pb2.NodeInfo(
            node_id=self.node_id, backend=self.runner.default_backend,
            memory_gb=self.profile.usable_bytes / 1024 ** 3,
            bandwidth_gbps=self.profile.bandwidth_gbps, tflops=self.profile.tflops,
            profile=self.profile.name, version=__version__, model=self.runner.model,
            start=shard.layers.start if shard else 0, end=shard.layers.end if shard else 0,
            active_requests=self.runner.active(), backends=available_backends(),
            standby=self.standby and shard is None, rss_bytes=resident_bytes(),
            kv_bytes=self.runner.kv_bytes(), kv_budget_bytes=self.runner.kv_budget or 0,
            kv_reserved_bytes=self.runner.kv_reserved())

    def Load(self, request, context):
        try:
            shard, source, seconds = self.runner.load(request.model, request.start, request.end,
                                                      request.backend, request.dtype or "auto",
                                                      words=request.words)
        except StageError as err:
            self._abort(context, err)
        return mesh_pb2.LoadReply(seconds=seconds, hidden_size=shard.hidden_size,
                                  vocab_size=shard.vocab_size, total_layers=source.num_layers,
                                  split_invariant=shard.split_invariant, fresh_copies=True,
                                  word_lead=True, kv_budget_bytes=self.runner.kv_budget or 0,
                                  kv_layout=json.dumps(shard.kv_layout()))

    @staticmethod
    def _step_args(request) -> dict:
        """A StepRequest as ``StageRunner.step``'s arguments (StageError when malformed)."""
        try:
            hidden = from_tensor(request.hidden) if request.HasField("hidden") else None
        except CodecError as exc:
            raise StageError("INVALID_ARGUMENT", str(exc)) from exc
        return dict(request_id=request.request_id, position=request.position,
                    tokens=list(request.tokens), hidden=hidden,
                    sampling=sampling_from_proto(request.sampling)
                    if request.HasField("sampling") else None,
                    n_prompt=request.n_prompt, prefill_only=request.prefill_only,
                    allowed=request.allowed,
                    score_top=request.score_top if request.score else -1,
                    batched=request.batched, draws=request.draws,
                    reuse=request.reuse, copy=request.copy,
                    max_positions=request.max_positions, replay=request.replay)

    def _reply(self, args: dict, out, ms: float) -> mesh_pb2.StepReply:
        hidden = args["hidden"]
        n = len(args["tokens"]) if hidden is None else hidden.shape[0]
        reply = mesh_pb2.StepReply(position=args["position"] + n, compute_ms=ms)
        scores = out.prompt_scores if isinstance(out, TokenStep) else \
            out.scores if isinstance(out, ChunkScores) else None
        if scores is not None:
            reply.scored = True
            reply.score_logprobs.extend(s.logprob for s in scores)
            for s in scores:
                reply.score_top_ids.extend(t for t, _ in s.top)
                reply.score_top_logprobs.extend(v for _, v in s.top)
        if isinstance(out, TokenStep):
            reply.token.CopyFrom(choice_to_proto(out))
        elif isinstance(out, np.ndarray):
            reply.hidden.CopyFrom(to_tensor(out, self.wire_dtype if out.dtype == np.float32
                                            else None))
        return reply

    def Step(self, request, context):
        t0 = time.perf_counter()
        try:
            args = self._step_args(request)
            out = self.runner.step(**args)
        except StageError as err:
            self._abort(context, err)
        return self._reply(args, out, (time.perf_counter() - t0) * 1e3)

    def StepMany(self, request, context):
        """A coordinator's micro-batch: every item's step in one forward; an item refused
        (its cache gone, say) carries its status, the others run."""
        if not request.items:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an empty batch")
        if len(request.items) > self.runner.max_requests:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"at most {self.runner.max_requests} steps in one batch")
        t0 = time.perf_counter()
        args: list = []
        for item in request.items:
            try:
                args.append(self._step_args(item))
            except StageError as err:
                args.append(err)
        good = [a for a in args if isinstance(a, dict)]
        try:
            outs = iter(self.runner.step_many(good))
        except StageError as err:
            self._abort(context, err)
        ms = (time.perf_counter() - t0) * 1e3
        reply = mesh_pb2.StepBatchReply()
        for a in args:
            out = a if isinstance(a, StageError) else next(outs)
            if isinstance(out, StageError):
                reply.replies.add(status=out.status, message=out.message, compute_ms=ms)
            else:
                reply.replies.append(self._reply(a, out, ms))
        return reply

    @staticmethod
    def _member_args(request) -> dict:
        args = dict(request_id=request.request_id, position=request.position,
                    tokens=list(request.tokens), top_k=request.top_k, score=request.score,
                    want_dist=not request.no_distribution, score_top=request.score_top)
        if request.propose:
            args.update(propose=request.propose, sampling=sampling_from_proto(request.sampling),
                        stop_ids=list(request.stop_ids), until_word=request.until_word)
            if request.words:
                args["words"] = request.words
            if request.open_top:
                args["open_top"] = request.open_top
            if request.lead:
                args["lead"] = request.lead
        if request.copy_from:
            args["copy_from"] = request.copy_from
            if request.fresh:
                args["fresh"] = True
        if request.speculate:
            args["speculate"] = True
        if request.score_dense:
            args["score_dense"] = True
        return args

    @staticmethod
    def _member_reply(request, out) -> mesh_pb2.MemberReply:
        if isinstance(out, Proposal):
            return mesh_pb2.MemberReply(
                position=out.position, proposed=out.tokens, proposed_logprobs=out.logprobs,
                ended=out.ended, end_logprob=out.end_logprob or 0.0,
                open_top_ids=[t for t, _ in out.opening],
                open_top_logprobs=[lp for _, lp in out.opening])
        dist, token_lps = out
        reply = mesh_pb2.MemberReply(position=request.position + len(request.tokens))
        if dist is not None and dist.full is not None:
            reply.logprobs.CopyFrom(to_tensor(dist.full))
        elif dist is not None:
            reply.top_ids.extend(dist.top_ids.tolist())
            reply.top_logprobs.extend(dist.top_logprobs.tolist())
            reply.rest_logprob = dist.rest_logprob
        if token_lps is not None and request.score_dense:
            reply.score_rows.CopyFrom(to_tensor(token_lps))
        elif token_lps is not None and request.score_top:
            reply.token_logprobs.extend(s.logprob for s in token_lps)
            for s in token_lps:
                reply.score_top_ids.extend(t for t, _ in s.top)
                reply.score_top_logprobs.extend(v for _, v in s.top)
        elif token_lps is not None:
            reply.token_logprobs.extend(token_lps)
        return reply

    def Member(self, request, context):
        try:
            out = self.runner.member_step(**self._member_args(request))
        except StageError as err:
            self._abort(context, err)
        return self._member_reply(request, out)

    def MemberMany(self, request, context):
        """An ensemble coordinator's batch: every item's member step in one forward; an
        item refused (a bad position, say) carries its status, the others run."""
        if not request.items:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an empty batch")
        if len(request.items) > MAX_REQUESTS:  # past the cache limit, items are refused
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,  # one by one
                          f"at most {MAX_REQUESTS} steps in one batch")
        try:
            outs = self.runner.member_step_many([self._member_args(r) for r in request.items])
        except StageError as err:
            self._abort(context, err)
        reply = mesh_pb2.MemberBatchReply()
        for item, out in zip(request.items, outs):
            if isinstance(out, StageError):
                reply.replies.add(status=out.status, message=out.message)
            else:
                reply.replies.append(self._member_reply(item, out))
        return reply

    def End(self, request, context):
        return mesh_pb2.EndReply(existed=self.runner.end(request.request_id))

    def Session(self, request_iterator, context):
        """Calls as frames on one open stream, answered in order (see mesh.proto's Frame)."""
        with self._sessions_lock:
            if self.sessions >= self.max_sessions:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"this node has {self.sessions} sessions open, its most; "
                              f"call without one")
            self.sessions += 1
        try:
            ctx = _FrameContext()
            for frame in request_iterator:
                yield self._frame(frame, ctx)
        finally:
            with self._sessions_lock:
                self.sessions -= 1

    def _frame(self, frame: mesh_pb2.Frame, ctx: _FrameContext) -> mesh_pb2.Frame:
        reply = mesh_pb2.Frame(seq=frame.seq, method=frame.method)
        kinds = CALLS.get(frame.method)
        try:
            if kinds is None:
                raise _Refused(grpc.StatusCode.UNIMPLEMENTED,
                               f"a Session carries no {frame.method!r} calls")
            try:
                request = kinds[0].FromString(frame.body)
            except Exception:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the frame's body is not a valid {frame.method} request")
            reply.body = getattr(self, frame.method)(request, ctx).SerializeToString()
        except _Refused as r:
            reply.status, reply.message = r.code.name, r.details
        except Exception as exc:  # what gRPC answers for a unary handler that raised
            log.exception("%s on a session failed", frame.method)
            reply.status, reply.message = "UNKNOWN", f"Exception calling application: {exc}"
        return reply


def create_server(service: NodeService, host: str, port: int, secret: str | None,
                  max_workers: int | None = None):
    """Start a node server; returns ``(server, bound_port)``. Port 0 picks a free port.

    Every running request can have one Step waiting for the compute thread; the pool is
    larger than that, so Info (the heartbeat) always finds a free worker and a busy node is
    never mistaken for a lost one.
    """
    if max_workers is None:
        max_workers = service.runner.max_requests + 16
    check_secret(secret)
    interceptors = [AuthInterceptor(secret or None)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=interceptors,
                         options=CHANNEL_OPTIONS)
    mesh_pb2_grpc.add_NodeServicer_to_server(service, server)
    try:
        bound = tls.add_port(server, f"{host}:{port}")
    except RuntimeError:  # gRPC's "Failed to bind" (older versions returned 0)
        bound = 0
    if bound == 0:
        raise MeshError(f"cannot listen on {host}:{port} (a port in use, or an address this "
                        f"machine does not have)")
    server.start()
    return server, bound


class IdleReaper:
    """Frees caches of requests idle past the runner's timeout, and cuts the KV buffers
    once the node is quiet (``StageRunner.settle``), in the background."""

    def __init__(self, runner: StageRunner, period: float = 2.0):
        self.runner = runner
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-reaper", daemon=True)

    def start(self) -> "IdleReaper":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.runner.evict_idle()
            self.runner.settle()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def kv_terms(loaded: mesh_pb2.LoadReply) -> dict:
    """A node's KV budget and layout as its Load reply says them (``kv_budget``,
    ``kv_layout``: None where it sets no budget or says nothing of it)."""
    layout = json.loads(loaded.kv_layout) if loaded.kv_layout else None
    return {"kv_budget": (loaded.kv_budget_bytes or None) if layout else None,
            "kv_layout": layout}


def node_stub(address: str) -> mesh_pb2_grpc.NodeStub:
    """A blocking stub for the node at ``address`` (TLS when MESH_TLS_* is set)."""
    from mesh.node import tls

    return mesh_pb2_grpc.NodeStub(tls.channel(address))


class NodeUnreachable(MeshError):
    """Nothing answers at a node's address (yet)."""


def node_info(address: str, secret: str | None, timeout: float = 10.0) -> mesh_pb2.NodeInfo:
    """The node's Info, or MeshError (NodeUnreachable where nothing answers there)."""
    try:
        return call(node_stub(address).Info, mesh_pb2.InfoRequest(), secret, "/mesh.Node/Info",
                    timeout)
    except grpc.RpcError as exc:
        kind = NodeUnreachable if exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                                 grpc.StatusCode.DEADLINE_EXCEEDED) else MeshError
        raise kind(f"node {address} did not answer: {exc.code().name}: {exc.details()}")
    except ForgedReply as exc:
        raise MeshError(f"node {address} does not hold the cluster secret: {exc.message}")
