"""StageRunner: one node's shard, its per-request caches and (on the last stage) sampling.

The gRPC node service and the coordinator's in-process stage both wrap this class, so a
remote stage and a local one behave the same. Errors are ``StageError`` with a status name
that the node service maps to a gRPC status once.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mesh.backends.base import SETTLE, Shard, ShardCache, StepItem, load_shard
from mesh.engine.admission import kv_budget_from
from mesh.engine.base import TokenStep
from mesh.engine.sampling import SamplingParams, choose
from mesh.ensemble.mixing import first_words
from mesh.errors import MeshError
from mesh.layers import LayerRange

log = logging.getLogger(__name__)

MAX_STEP_TOKENS = 8192
MAX_PROPOSE = 256  # tokens one member step may write (an ensemble's chunk)
MAX_WORDS = 64  # words one proposal may write (a words ensemble's run of one member)
MAX_OPEN_TOP = 256  # a proposal's opening distribution: at most this many tokens back
MAX_REQUESTS = 64  # caches one node holds at once; the coordinator admits no more
SETTLE_QUIET = SETTLE  # seconds without a step before a node cuts its KV buffers (``settle``)


class StageError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status  # a grpc.StatusCode name
        self.message = message


@dataclass
class ChunkScores:
    """What a scored prompt chunk before the last returns from the last stage."""

    scores: list


@dataclass
class _Job:
    """One step waiting for the compute thread."""

    shard: Shard
    req: "_Request"
    request_id: str
    position: int
    tokens: list[int]
    data: np.ndarray
    sampling: SamplingParams | None
    n_prompt: int
    prefill_only: bool
    mask: np.ndarray | None
    score_top: int
    batched: bool = False
    draws: int = 0
    future: Future = field(default_factory=Future)


@dataclass
class Proposal:
    """What a member wrote in one step: its tokens, each one's log-prob under the model's
    own distribution, whether a stop token ended it (and that stop token's log-prob), and
    the position its cache holds after (the last token written is not fed). ``opening``:
    when asked (``open_top``), the most likely tokens of the distribution it opened with
    (its first token's) and their log-probs, most likely first."""

    tokens: list[int]
    logprobs: list[float]
    ended: bool
    end_logprob: float | None
    position: int
    opening: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class _Request:
    cache: ShardCache
    last_used: float
    history: list[int] = field(default_factory=list)
    n_prompt: int = 0
    sampling: SamplingParams | None = None
    rng: np.random.Generator | None = None
    pending: np.ndarray | None = None  # a scored chunk's last row, until its next token comes
    reserve: int = 0  # the most positions its caller said its cache will hold (0: not said)
    # an ensemble member's logits after the last position its cache holds: a proposal
    # that starts there (``tokens`` empty) needs no forward
    last_logits: np.ndarray | None = None
    # a member's speculated next step: (position, token, logits) after feeding its own
    # top token while the coordinator mixed (``member_step_many``'s ``speculate``)
    guess: tuple | None = None
    guessing: bool = False  # a speculated step is queued or running on the compute thread
    guess_at: tuple | None = None  # (position, (token,)) the running guess feeds
    guess_stop: object | None = None  # the backend's handle to end it early
    guess_cancel: bool = False  # a step that does not want it came: do not start it / stop
    guess_want: tuple | None = None  # the step that came before the guess began


class StageRunner:
    def __init__(self, default_backend: str, idle_timeout: float = 300.0,
                 max_requests: int = MAX_REQUESTS, default_dtype: str = "auto",
                 shares_cores: bool = False, threads: int | None = None,
                 kv_memory: int | str | None = None):
        """``kv_memory``: the most bytes the request caches may take, ``"auto"``
        (``kv_budget_from``: a share of the memory available once a shard is loaded) or None
        (no budget, only ``max_requests``)."""
        self.default_backend = default_backend
        self.kv_memory = kv_memory
        self.kv_budget: int | None = None  # kv_memory in bytes, set as a shard loads
        # other compute runs on this machine's cores at the same time (an ensemble's other
        # members, a pipeline's local nodes): ONNX Runtime's threads then must not spin
        self.shares_cores = shares_cores
        self.threads = threads  # ONNX Runtime's threads for this runner's shard (None: all)
        self.default_dtype = default_dtype  # this node's precision when the caller says auto
        self.idle_timeout = idle_timeout
        self.max_requests = max_requests
        self.shard: Shard | None = None
        self.model: str = ""
        self.context_length = 0  # of the loaded model: no cache grows past it
        self._sources: dict[str, object] = {}
        self._requests: dict[str, _Request] = {}
        # All compute on one thread: one forward at a time, and torch's OpenMP team (one per
        # calling thread) stays warm instead of one team per gRPC worker thread.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-compute")
        self._lock = threading.Lock()
        self._meta = threading.Lock()
        # groups of steps waiting for the compute thread, each group one forward
        self._queue: list[list[_Job]] = []
        self._queued = threading.Lock()
        self._draining = False
        self.batched_steps = 0  # steps that ran beside another in one forward
        self._settled: float | None = None  # the newest step ``settle`` compacted after
        self.guesses = self.guesses_right = 0  # member steps speculated / used as they were
        self._guess_lock = threading.Lock()  # never held while waiting on the compute thread

    # ---- loading -------------------------------------------------------------------------

    def load(self, model: str, start: int, end: int, backend: str = "", dtype: str = "auto",
             words: bool = False):
        """``words``: a words ensemble's member, whose word proposals decode text here: its
        tokenizer loads beside the weights instead of in the first request."""
        from mesh.models.source import resolve

        if dtype in ("", "auto"):
            dtype = self.default_dtype
        t0 = time.perf_counter()
        try:
            source = self._sources.get(model) or resolve(model, progress=False)
            self._sources[model] = source
            layers = LayerRange(start, end, source.num_layers)
        except MeshError as exc:
            raise StageError("INVALID_ARGUMENT", exc.message) from exc
        except ValueError as exc:
            raise StageError("INVALID_ARGUMENT", str(exc)) from exc
        with self._lock:
            self.shard = None  # free the old shard before loading the new one
            with self._meta:
                self._requests.clear()
            self._settled = None
            backend = backend or self.default_backend
            options = {}
            if backend == "onnxruntime":
                if self.shares_cores:
                    options["spin"] = False
                if self.threads:
                    options["threads"] = self.threads
            building = self._compute.submit(load_shard, backend, source, layers, dtype,
                                            **options)
            if words and layers.is_first and layers.is_last and \
                    source.tokenizer_dir is not None:
                self._load_tokenizer(source)  # here, while the compute thread builds
            try:
                self.shard = building.result()
            except MeshError as exc:
                raise StageError("INVALID_ARGUMENT", exc.message) from exc
            self.model = model
            self.context_length = source.context_length
            self.kv_budget = kv_budget_from(self.kv_memory)
        log.info("loaded %s layers %s with %s in %.1fs", model, layers, backend,
                 time.perf_counter() - t0)
        return self.shard, source, time.perf_counter() - t0

    # ---- steps -----------------------------------------------------------------------------

    def _request(self, request_id: str, position: int, reuse: str = "",
                 copy: bool = False, need: int = 0, replay: bool = False) -> _Request:
        """The request's entry, made at its first step (position 0, or a ``reuse``), where
        ``need`` is the most positions its cache will hold: RESOURCE_EXHAUSTED when the
        node's KV budget cannot hold that beside the open caches (never for a ``replay``:
        a running request's own)."""
        shard = self.shard
        with self._meta:
            req = self._requests.get(request_id)
            if req is None and reuse and position > 0:
                if not replay:
                    self._check_kv(need, request_id, "" if copy else reuse)
                req = (self._copy if copy else self._adopt)(request_id, position, reuse)
                req.reserve = need
            if position == 0:
                if req is None:
                    self._make_room()
                if not replay:
                    self._check_kv(need, request_id)
                req = _Request(shard.new_cache(), time.monotonic(), reserve=need)
                self._requests[request_id] = req
            elif req is None:
                raise StageError("NOT_FOUND", f"unknown request id {request_id!r} "
                                 f"(position {position}; start at position 0)")
            req.last_used = time.monotonic()
            return req

    def _adopt(self, request_id: str, position: int, reuse: str) -> _Request:
        """``request_id`` takes over the cache kept from request ``reuse``, cut back to
        ``position`` (holds _meta). ABORTED when it is gone (reaped, or another request took
        it) or cannot be cut back: the coordinator then feeds the prompt from 0."""
        old = self._requests.pop(reuse, None)
        if old is None:
            raise StageError("ABORTED", f"no kept cache {reuse!r} to reuse")

        def cut():  # on the compute thread: a speculated step may still be feeding it
            old.guess = None
            behind = old.cache.offset - position
            if behind < 0:
                raise ValueError(f"it holds {old.cache.offset} positions, not {position}")
            old.cache.trim(behind)

        try:
            if old.guessing:
                self._compute.submit(cut).result()
            else:
                cut()
        except ValueError as exc:
            raise StageError("ABORTED", f"the kept cache {reuse!r} cannot be reused: "
                             f"{exc}") from exc
        del old.history[position:]
        old.sampling, old.rng, old.pending = None, None, None  # set by this request's step
        self._requests[request_id] = old
        return old

    def _make_room(self) -> None:
        """Room for one more request cache (holds _meta): idle ones are evicted, a running
        request's never; RESOURCE_EXHAUSTED when there is none."""
        if len(self._requests) >= self.max_requests:
            self._evict_idle()
            if len(self._requests) >= self.max_requests:
                raise StageError("RESOURCE_EXHAUSTED",
                                 f"this node holds {len(self._requests)} request caches, "
                                 f"its limit; retry when one ends")

    def kv_reserved(self) -> int:
        """What the open caches may come to, each at the most positions its caller said
        (or what it holds, where more or not said)."""
        shard = self.shard
        if shard is None:
            return 0
        with self._meta:
            return shard.kv_bytes(self._held())

    def _held(self, skip: tuple = ()) -> list[int]:
        """Each open cache's positions at most, but those of ``skip`` (holds _meta)."""
        return [max(r.reserve, r.cache.offset) for rid, r in self._requests.items()
                if rid not in skip]

    def _check_kv(self, need: int, *skip: str) -> None:
        """Room in the KV budget for a new cache of ``need`` positions beside the open ones
        (holds _meta; ``skip``: entries it replaces): caches idle past the timeout are
        evicted for it, a running request's never; RESOURCE_EXHAUSTED when there is none."""
        budget = self.kv_budget
        if budget is None:
            return
        if self.shard.kv_bytes(self._held(skip) + [need]) > budget:
            self._evict_idle()
            if self.shard.kv_bytes(self._held(skip) + [need]) > budget:
                raise StageError(
                    "RESOURCE_EXHAUSTED",
                    f"this node's KV budget ({budget / 2 ** 20:,.0f} MiB, --kv-memory) cannot "
                    f"hold a cache of {need} positions beside the {len(self._requests)} open;"
                    f" retry when one ends")

    def _copy(self, request_id: str, position: int, source: str) -> _Request:
        """``request_id`` starts from a copy of running request ``source``'s cache, cut back
        to ``position`` (holds _meta); ``source`` keeps its own. The copy is made on the
        compute thread, between forwards. ABORTED when ``source`` is gone or its cache
        cannot be copied or cut back: the coordinator then feeds the prompt from 0."""
        old = self._requests.get(source)
        if old is None or old.cache.offset < position:
            raise StageError("ABORTED", f"no cache {source!r} holding {position} positions "
                             f"to copy")
        self._make_room()

        def fork():
            cache = old.cache.fork()
            try:
                cache.trim(cache.offset - position)
            except ValueError:
                cache.release()
                raise
            return cache

        try:
            cache = self._compute.submit(fork).result()
        except (NotImplementedError, ValueError) as exc:
            raise StageError("ABORTED", f"the cache of {source!r} cannot be copied: "
                             f"{exc or type(exc).__name__}") from exc
        req = _Request(cache, time.monotonic(), history=old.history[:position])
        self._requests[request_id] = req
        return req

    def step(self, request_id: str, position: int, tokens: list[int],
             hidden: np.ndarray | None, sampling: SamplingParams | None = None,
             n_prompt: int = 0, prefill_only: bool = False, allowed: bytes = b"",
             score_top: int = -1, batched: bool = False, draws: int = 0, reuse: str = "",
             copy: bool = False, max_positions: int = 0, replay: bool = False):
        """Run one step; returns hidden states (T, H), a TokenStep, or None (prefill).
        ``allowed`` is a grammar's mask for this sample (see mesh.proto). ``score_top`` >= 0
        on a last stage scores the prompt tokens (echo): the TokenStep carries the scores,
        a prefill chunk returns ChunkScores. ``batched``: compute a lone decode step as in a
        batch; ``draws``: random draws this request already made; ``reuse``: a kept cache
        this request's first step takes over, or with ``copy`` a running request's cache it
        starts from a copy of (see mesh.proto); ``max_positions``: at a request's first step,
        the most positions its cache will hold (checked against the KV budget, unless it is
        a ``replay`` of a running request on a new plan)."""
        job = self._prepare(request_id, position, tokens, hidden, sampling, n_prompt,
                            prefill_only, allowed, score_top, batched, draws, reuse, copy,
                            max_positions, replay)
        self._submit([job])
        return job.future.result()

    def step_many(self, steps: list[dict]) -> list:
        """Several requests' steps (each the keyword arguments of ``step``) as one forward.
        Returns, per step, its result or the StageError that refused it; a request appears
        at most once."""
        ids = [s["request_id"] for s in steps]
        if len(set(ids)) != len(ids):
            raise StageError("INVALID_ARGUMENT", "a request appears twice in one batch")
        jobs: list = []
        for s in steps:
            try:
                jobs.append(self._prepare(**s))
            except StageError as err:
                jobs.append(err)
        self._submit([j for j in jobs if isinstance(j, _Job)])
        out = []
        for j in jobs:
            if isinstance(j, StageError):
                out.append(j)
                continue
            try:
                out.append(j.future.result())
            except StageError as err:
                out.append(err)
        return out

    def _prepare(self, request_id: str, position: int, tokens: list[int],
                 hidden: np.ndarray | None, sampling: SamplingParams | None = None,
                 n_prompt: int = 0, prefill_only: bool = False, allowed: bytes = b"",
                 score_top: int = -1, batched: bool = False, draws: int = 0,
                 reuse: str = "", copy: bool = False, max_positions: int = 0,
                 replay: bool = False) -> "_Job":
        """Check one step and make it a job (its request's cache made or found)."""
        if not -1 <= score_top <= 20:
            raise StageError("INVALID_ARGUMENT", f"score_top must be in [0, 20], got "
                             f"{score_top}")
        if draws < 0:
            raise StageError("INVALID_ARGUMENT", f"draws must be >= 0, got {draws}")
        shard = self.shard
        if shard is None:
            raise StageError("FAILED_PRECONDITION", "no shard loaded on this node")
        if not request_id:
            raise StageError("INVALID_ARGUMENT", "request_id is empty")
        if position < 0:
            raise StageError("INVALID_ARGUMENT", f"negative position {position}")
        layers = shard.layers
        if layers.is_first:
            if not tokens or len(tokens) > MAX_STEP_TOKENS:
                raise StageError("INVALID_ARGUMENT",
                                 f"the first stage needs 1..{MAX_STEP_TOKENS} token ids")
            if min(tokens) < 0 or max(tokens) >= shard.vocab_size:
                raise StageError("INVALID_ARGUMENT",
                                 f"token ids must be in [0, {shard.vocab_size})")
            data = np.asarray(tokens, dtype=np.int32)
        else:
            if hidden is None:
                raise StageError("INVALID_ARGUMENT", "this stage needs hidden states")
            if hidden.ndim != 2 or hidden.shape[1] != shard.hidden_size or not (
                    0 < hidden.shape[0] <= MAX_STEP_TOKENS):
                raise StageError("INVALID_ARGUMENT",
                                 f"hidden states must have shape (T, {shard.hidden_size}), "
                                 f"got {tuple(hidden.shape)}")
            if hidden.dtype not in (np.float32, np.float16):
                raise StageError("INVALID_ARGUMENT", f"hidden dtype {hidden.dtype} unsupported")
            if not np.isfinite(hidden).all():
                raise StageError("INVALID_ARGUMENT", "hidden states hold NaN or infinity")
            data = hidden
        if position + data.shape[0] > self.context_length:
            raise StageError("INVALID_ARGUMENT", f"positions up to {position + data.shape[0]} "
                             f"are past the model's context of {self.context_length}")
        if layers.is_last and len(tokens) != data.shape[0]:
            raise StageError("INVALID_ARGUMENT",
                             "the last stage needs the step's token ids (one per position)")
        mask = None
        if allowed:
            words = (shard.vocab_size + 31) // 32
            if len(allowed) % 4 or len(allowed) > 4 * words:
                raise StageError("INVALID_ARGUMENT", f"the allowed-token mask must be at most "
                                 f"{words} 32-bit words, got {len(allowed)} bytes")
            from mesh.engine.constraint import allowed_from_bitmask

            mask = allowed_from_bitmask(allowed, shard.vocab_size)
            if not mask.any():
                raise StageError("INVALID_ARGUMENT", "the allowed-token mask allows no token")
        if max_positions < 0:
            raise StageError("INVALID_ARGUMENT", f"max_positions must be >= 0, got "
                             f"{max_positions}")
        need = min(max(max_positions, position + data.shape[0]), self.context_length)
        req = self._request(request_id, position, reuse, copy, need, replay)
        return _Job(shard, req, request_id, position, tokens, data, sampling, n_prompt,
                    prefill_only, mask, score_top, batched, draws)

    def _submit(self, group: list["_Job"]) -> None:
        """Queue one group of jobs (one forward) for the compute thread."""
        if not group:
            return
        with self._queued:
            self._queue.append(group)
            start, self._draining = not self._draining, True
        if start:
            self._compute.submit(self._drain)

    def _drain(self) -> None:
        """On the compute thread: run queued groups in arrival order, each as one forward,
        until none is left. The coordinator forms the groups (its micro-batches), so a
        step's company, and with it its numbers, is what the coordinator recorded; groups
        are never merged here."""
        while True:
            with self._queued:
                if not self._queue:
                    self._draining = False
                    return
                jobs = self._queue.pop(0)
            try:
                self._run_jobs(jobs)
            except BaseException as exc:  # never leave a caller waiting
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)

    def _run_jobs(self, jobs: list[_Job]) -> None:
        ready = []
        for j in jobs:  # one step per request (step_many checks)
            if j.shard is not self.shard:
                j.future.set_exception(StageError("FAILED_PRECONDITION",
                                                  "the shard was reloaded under this step"))
            elif j.req.cache.offset != j.position:
                j.future.set_exception(StageError(
                    "FAILED_PRECONDITION", f"position {j.position} does not match this node's "
                    f"cache position {j.req.cache.offset} for request {j.request_id!r}"))
            else:
                ready.append(j)
        if not ready:
            return
        shard = ready[0].shard
        last = shard.layers.is_last
        try:
            outs = shard.forward([StepItem(j.request_id, j.data, j.req.cache,
                                           all_logits=last and j.score_top >= 0,
                                           batched=j.batched)
                                  for j in ready])
        except Exception as exc:
            for j in ready:
                j.future.set_exception(exc)
            return
        if len(ready) > 1:
            self.batched_steps += len(ready)
        for j, out in zip(ready, outs):
            try:
                j.future.set_result(self._finish(
                    shard, j.req, j.tokens, out, j.sampling, j.position, j.n_prompt,
                    j.prefill_only, j.mask, j.score_top, j.draws))
            except Exception as exc:
                j.future.set_exception(exc)

    def _finish(self, shard, req, tokens, out, sampling, position, n_prompt, prefill_only,
                mask=None, score_top=-1, draws=0):
        """After the forward: a middle stage's hidden states, or the last stage's sample."""
        scoring = score_top >= 0 and shard.layers.is_last
        if not shard.layers.is_last:
            return out
        if position == 0 or req.sampling is None:  # the request's first step (or reuse)
            req.sampling = sampling or SamplingParams()
            req.n_prompt = n_prompt or len(tokens)
            req.rng = np.random.default_rng(req.sampling.seed)
            if draws and not req.sampling.greedy:
                req.rng.random(draws)  # each sampled token draws one double (sample())
            req.pending = None
        req.history.extend(int(t) for t in tokens)
        scores = None
        if scoring:
            scores, out = self._score(req, tokens, out, score_top, prefill_only)
        if prefill_only:
            return ChunkScores(scores) if scores is not None else None
        token, lp, top = choose(out, np.asarray(req.history, dtype=np.int32), req.n_prompt,
                                req.sampling, req.rng, mask)
        return TokenStep(token, lp, top, prompt_scores=scores)

    @staticmethod
    def _score(req: _Request, tokens: list[int], logits: np.ndarray, top_n: int,
               more: bool):
        """Scores for the prompt tokens this chunk makes known: the previous chunk's last
        row's next token is ``tokens[0]``; this chunk's rows score ``tokens[1:]``; its last
        row waits for the next chunk (``more``) or is the one sampled from."""
        from mesh.engine.base import SCORE_ROWS, score_rows
        from mesh.engine.sampling import log_softmax

        scores = []
        if req.pending is not None:
            scores += score_rows(req.pending, tokens[:1], top_n)
            req.pending = None
        for i in range(0, len(tokens) - 1, SCORE_ROWS):  # row blocks: bounded memory
            j = min(len(tokens) - 1, i + SCORE_ROWS)
            scores += score_rows(log_softmax(logits[i:j]), tokens[i + 1:j + 1], top_n)
        if more:
            req.pending = log_softmax(logits[-1:])
        return scores, logits[-1]

    # ---- ensemble members ------------------------------------------------------------------

    def member_step(self, request_id: str, position: int, tokens: list[int], top_k: int = 0,
                    score: bool = False, want_dist: bool = True, score_top: int = 0,
                    **proposing):
        """Feed ``tokens`` at ``position`` (rewinding the cache if it is ahead) on a whole
        model; returns ``(next-token Dist or None, token logprobs for tokens[1:] or None)``;
        with ``score_top`` > 0 the second is a list of PromptScores (each position's top
        alternatives too). With ``propose`` (and ``sampling``, ``stop_ids``): a Proposal
        (``member_step_many``)."""
        out, = self.member_step_many([dict(request_id=request_id, position=position,
                                           tokens=tokens, top_k=top_k, score=score,
                                           want_dist=want_dist, score_top=score_top,
                                           **proposing)])
        if isinstance(out, StageError):
            raise out
        return out

    def member_step_many(self, steps: list[dict]) -> list:
        """Several requests' member steps (each the keyword arguments of ``member_step``)
        as one forward: the decode steps run as one batch on a backend that batches. Returns,
        per step, its result or the StageError that refused it; a request appears at most
        once. (A step's numbers may depend on its company, as in ``step_many``.)

        A step with ``propose`` > 0 goes on writing: after its tokens it samples up to that
        many tokens (``sampling``, with the request's own RNG, from the full distribution),
        each fed back before the next, stopping after one of ``stop_ids``; the proposing
        steps of one call decode as one batch. Its result is a ``Proposal``. A step with
        ``copy_from`` starts a new request from a copy of that request's cache cut back to
        ``position`` (a candidate scored beside the proposal it must not overwrite; with
        ``fresh``, a new request taking a finished one's prompt, not its sampling state).

        A call of one decode step with ``speculate`` goes on after its reply, where the cache
        can always be cut back: it feeds the member's own top token while the coordinator
        mixes, and a next step that brings that token takes the result as it is (the same
        forward, run earlier); a next step with another token stops the guess (where the
        backend can) and rewinds it. A greedy merge's members mostly agree with the mixture,
        so the coordinator's round trip (the replies, the mixing, the next call) is hidden."""
        shard = self.shard
        if shard is None:
            raise StageError("FAILED_PRECONDITION", "no model loaded on this node")
        if not (shard.layers.is_first and shard.layers.is_last):
            raise StageError("FAILED_PRECONDITION", "an ensemble member needs the whole model")
        ids = [s["request_id"] for s in steps]
        if len(set(ids)) != len(ids):
            raise StageError("INVALID_ARGUMENT", "a request appears twice in one batch")
        ready: list = []
        for s in steps:
            try:
                ready.append((s, self._member_check(shard, **s)))
            except StageError as err:
                ready.append((s, err))
        for s, req in ready:  # a guess this step does not take is not waited for
            if not isinstance(req, StageError) and req.guessing:
                want = (s["position"], tuple(s["tokens"]))
                with self._guess_lock:
                    if s.get("score") or s.get("propose") or \
                            req.guess_at not in (None, want):
                        req.guess_cancel = True
                        if req.guess_stop is not None:
                            shard.stop(req.guess_stop)
                    elif req.guess_at is None:  # not begun: it decides once it knows
                        req.guess_want = want

        def run():
            items, live, kept, guessed = [], [], {}, {}
            for i, (s, req) in enumerate(ready):
                if isinstance(req, StageError):
                    continue
                guess, req.guess = req.guess, None
                if guess is not None and guess[:2] == (s["position"], tuple(s["tokens"])) \
                        and req.cache.offset == s["position"] + 1 and not s.get("score") \
                        and not s.get("propose"):
                    self.guesses_right += 1
                    guessed[i] = req.last_logits = guess[2]
                    continue
                behind = req.cache.offset - s["position"]
                try:
                    if behind < 0:
                        raise StageError("FAILED_PRECONDITION",
                                         f"position {s['position']} is past this node's cache "
                                         f"position {req.cache.offset}")
                    if behind:
                        try:
                            req.cache.trim(behind)
                        except ValueError as exc:
                            raise StageError("FAILED_PRECONDITION",
                                             f"cannot rewind: {exc}") from exc
                except StageError as err:
                    ready[i] = (s, err)
                    continue
                del req.history[s["position"]:]  # what the cache holds (penalties read it)
                tokens = list(s["tokens"])
                if not tokens:  # a proposal from where the cache stands
                    if req.last_logits is not None and not behind:
                        kept[i] = req.last_logits
                        continue
                    try:  # no logits kept: the last position again
                        req.cache.trim(1)
                    except ValueError as exc:
                        ready[i] = (s, StageError("FAILED_PRECONDITION",
                                                  f"cannot rewind: {exc}"))
                        continue
                    tokens = [req.history.pop()]
                req.history.extend(tokens)
                req.last_logits = None
                items.append(StepItem(s["request_id"], np.asarray(tokens, np.int32),
                                      req.cache, all_logits=s.get("score", False)))
                live.append(i)
            if not items and not kept and not guessed:
                return [r if isinstance(r, StageError) else None for _, r in ready]
            outs = shard.forward(items) if items else []
            if len(items) > 1:
                self.batched_steps += len(items)
            results: list = [r if isinstance(r, StageError) else None for _, r in ready]
            for i, logits in guessed.items():
                results[i] = self._member_result(logits, **ready[i][0])
            proposing = dict(kept)
            for i, out in zip(live, outs):
                last = out[-1] if ready[i][0].get("score") else out
                ready[i][1].last_logits = last
                if ready[i][0].get("propose"):
                    proposing[i] = last
                else:
                    results[i] = self._member_result(out, **ready[i][0])
            if proposing:
                for i, prop in self._propose({i: (ready[i][0], ready[i][1], logits)
                                              for i, logits in proposing.items()}).items():
                    results[i] = prop
            if len(steps) == 1 and steps[0].get("speculate") and results[0] is not None \
                    and not isinstance(results[0], StageError) and not steps[0].get("score") \
                    and not steps[0].get("propose") and ready[0][1].cache.rewinds:
                req = ready[0][1]
                with self._guess_lock:
                    req.guessing, req.guess_cancel = True, False
                    req.guess_at = req.guess_stop = req.guess_want = None
                self._compute.submit(self._guess, steps[0]["request_id"], req)
            return results

        return self._compute.submit(run).result()

    def _guess(self, request_id: str, req: _Request) -> None:
        """On the compute thread, after a speculating member step's reply: feed the top
        token of the logits it returned, and keep what follows for the next step."""
        try:
            self._guess_next(request_id, req)
        finally:
            req.guessing = False

    def _guess_next(self, request_id: str, req: _Request) -> None:
        if self._requests.get(request_id) is not req:  # (no lock: _meta's holders may
            return  # wait on this thread) ended meanwhile
        logits = req.last_logits
        position = req.cache.offset
        if logits is None or position + 1 > self.context_length or req.guess is not None:
            return
        stop = self.shard.stoppable()
        with self._guess_lock:
            if req.guess_cancel:
                return
            token = int(np.argmax(logits))
            if req.guess_want not in (None, (position, (token,))):
                return  # the next step came first, with another token
            req.guess_at, req.guess_stop = (position, (token,)), stop
        req.history.append(token)
        req.last_logits = None
        item = [StepItem(request_id, np.asarray([token], np.int32), req.cache)]
        try:
            out = (self.shard.forward(item, stop=stop) if stop is not None
                   else self.shard.forward(item))[0]
        except Exception:  # stopped for another token, or failed: the cache holds what it
            if not req.guess_cancel:  # did before (its offset); the next step feeds its own
                log.debug("a speculated step failed", exc_info=True)
            req.history.pop()
            req.last_logits = logits
            return
        self.guesses += 1
        req.guess = (position, (token,), out)

    def _propose(self, todo: dict) -> dict:
        """On the compute thread: each entry (step, _Request, next-token logits) samples
        tokens until its ``propose`` count or a stop token, the live ones fed back as one
        batch per token. The last token sampled is not fed (nothing needs what follows it
        yet): the cache ends one token short of the proposal, or at it when a stop token
        ended it (which is not fed either)."""
        from mesh.engine.sampling import log_softmax, top_logprobs

        state, start = {}, {}
        for i, (s, req, logits) in todo.items():
            params = s.get("sampling") or SamplingParams()
            if req.rng is None or req.sampling != params:
                req.sampling, req.rng = params, np.random.default_rng(params.seed)
            state[i] = Proposal([], [], False, None, 0)
            start[i] = len(req.history)  # the penalties see what follows as generated
        live = dict(todo)
        while live:
            feed = []
            for i, (s, req, logits) in live.items():
                p = state[i]
                lp = log_softmax(logits)
                if not p.tokens and s.get("open_top"):  # the distribution it opens with
                    p.opening = top_logprobs(lp, s["open_top"])
                token, _, _ = choose(logits, np.asarray(req.history, dtype=np.int32),
                                     start[i], req.sampling, req.rng)
                stops = s.get("stop_ids") or ()
                req.last_logits = logits  # where the cache ends, unless fed on below
                if token in stops:
                    p.ended, p.end_logprob = True, float(lp[min(stops)])
                    continue
                p.tokens.append(token)
                p.logprobs.append(float(lp[token]))
                lead = s["tokens"][len(s["tokens"]) - s.get("lead", 0):]  # a word begun
                if s.get("until_word") and first_words(s.get("words") or 1).match(
                        self._tokenizer().decode(lead + p.tokens)):
                    continue  # the words, and the next one begun: its first token is not fed
                if len(p.tokens) < s["propose"]:
                    feed.append(i)
            if not feed:
                break
            # the previous token goes into the cache with this step: history follows
            items = []
            for i in feed:
                s, req, _ = live[i]
                req.history.append(state[i].tokens[-1])
                req.last_logits = None
                items.append(StepItem(s["request_id"],
                                      np.asarray(state[i].tokens[-1:], np.int32), req.cache))
            outs = self.shard.forward(items)
            if len(items) > 1:
                self.batched_steps += len(items)
            live = {i: (live[i][0], live[i][1], out) for i, out in zip(feed, outs)}
        for i, (_, req, _) in todo.items():
            state[i].position = req.cache.offset
        return state

    def _tokenizer(self):
        return self._sources[self.model].tokenizer

    @staticmethod
    def _load_tokenizer(source) -> None:
        try:
            source.tokenizer
        except Exception as exc:  # the first proposal that needs it will say why
            log.warning("%s: no tokenizer (%s)", source.name, exc)

    def _member_check(self, shard, request_id: str, position: int, tokens: list[int],
                      top_k: int = 0, score: bool = False, want_dist: bool = True,
                      score_top: int = 0, propose: int = 0, sampling=None,
                      stop_ids=(), copy_from: str = "", until_word: bool = False,
                      words: int = 0, fresh: bool = False, speculate: bool = False,
                      score_dense: bool = False, open_top: int = 0, lead: int = 0
                      ) -> _Request:
        if score_dense and not score:
            raise StageError("INVALID_ARGUMENT", "score_dense needs score")
        if not 0 <= score_top <= 20:
            raise StageError("INVALID_ARGUMENT", f"score_top must be in [0, 20], got "
                             f"{score_top}")
        if not tokens and propose and not score and position > 0:
            pass  # a proposal from where the cache stands
        elif not 0 < len(tokens) <= MAX_STEP_TOKENS or min(tokens) < 0 or \
                max(tokens) >= shard.vocab_size:
            raise StageError("INVALID_ARGUMENT",
                             f"token ids must be 1..{MAX_STEP_TOKENS} ids in "
                             f"[0, {shard.vocab_size})")
        if not 0 <= words <= MAX_WORDS:
            raise StageError("INVALID_ARGUMENT", f"words must be in [0, {MAX_WORDS}], got "
                             f"{words}")
        if not 0 <= lead <= len(tokens) or (lead and not until_word):
            raise StageError("INVALID_ARGUMENT", f"lead must be in [0, {len(tokens)}] (the "
                             f"tokens fed) and comes with until_word, got {lead}")
        if not 0 <= open_top <= MAX_OPEN_TOP:
            raise StageError("INVALID_ARGUMENT", f"open_top must be in [0, {MAX_OPEN_TOP}], "
                             f"got {open_top}")
        if not 0 <= propose <= MAX_PROPOSE:
            raise StageError("INVALID_ARGUMENT", f"propose must be in [0, {MAX_PROPOSE}], "
                             f"got {propose}")
        if position + len(tokens) + propose > self.context_length:
            raise StageError("INVALID_ARGUMENT", f"positions up to "
                             f"{position + len(tokens) + propose} are past the model's "
                             f"context of {self.context_length}")
        # a copy of a running request's cache (an ensemble's scoring pass) belongs to that
        # request: counted, never refused for room; a fresh start from a kept one may be
        req = self._request(request_id, position, reuse=copy_from, copy=bool(copy_from),
                            need=position + len(tokens) + propose,
                            replay=bool(copy_from) and not fresh)
        with self._meta:
            src = self._requests.get(copy_from) if copy_from else None
        if src is not None and not fresh and req.rng is None and src.rng is not None:
            # a copy that may take over from its source goes on with the source's draws
            req.sampling, req.rng = src.sampling, copy.deepcopy(src.rng)
        return req

    @staticmethod
    def _member_result(out: np.ndarray, request_id: str, position: int, tokens: list[int],
                       top_k: int = 0, score: bool = False, want_dist: bool = True,
                       score_top: int = 0, score_dense: bool = False, **_):
        from mesh.engine.base import score_rows
        from mesh.engine.sampling import log_softmax, picked_logprobs
        from mesh.ensemble.mixing import compress

        token_lps = None
        if score and not (score_dense or score_top):  # one entry a row: no (T, V) array
            token_lps = picked_logprobs(out[:-1], tokens[1:]).tolist()
            last = log_softmax(out[-1]) if want_dist else None
        else:
            lp = log_softmax(out)  # (T, V) or (V,)
            last = lp[-1] if score else lp
            if score and score_dense:  # the rows themselves: (T - 1, V)
                token_lps = lp[:-1]
            elif score and score_top:
                token_lps = score_rows(lp[:-1], tokens[1:], score_top)
        return (compress(last, top_k) if want_dist else None), token_lps

    def end(self, request_id: str) -> bool:
        with self._meta:
            gone = self._requests.pop(request_id, None)
            idle = not self._requests
        found = gone is not None
        del gone  # its cache is freed here (ONNX Runtime's pool shrinks as caches go)
        compact = getattr(self.shard, "compact", None)
        if idle and compact is not None:  # nothing open: cut shared buffers to nothing
            compact()
        return found

    def active(self) -> int:
        return len(self._requests)

    def kv_bytes(self) -> int:
        """Bytes held by the request caches now (ONNX Runtime: its pool, free slots too)."""
        pool = getattr(self.shard, "pool", None)
        if pool is not None:
            return pool.nbytes
        with self._meta:
            caches = [r.cache for r in self._requests.values()]
        return sum(c.nbytes for c in caches)

    def settle(self, quiet: float = SETTLE_QUIET) -> bool:
        """Once no step has come for ``quiet`` seconds (what is open then is idle: caches
        a coordinator keeps for a chat's next turn), cut buffers that caches share (ONNX
        Runtime's pool) to what the open ones need and give the pages back. True when it
        compacted."""
        compact = getattr(self.shard, "compact", None)
        if compact is None:
            return False
        with self._meta:
            last = max((r.last_used for r in self._requests.values()), default=0.0)
        with self._queued:
            busy = self._draining
        if busy or time.monotonic() - last < quiet or last == self._settled:
            return False
        compact()
        self._settled = last  # until a step comes or a cache goes
        return True

    def _evict_idle(self) -> int:
        """Drop caches idle past the timeout (abandoned by their caller). Holds _meta."""
        now = time.monotonic()
        stale = [rid for rid, r in self._requests.items()
                 if now - r.last_used > self.idle_timeout]
        for rid in stale:
            del self._requests[rid]
            log.info("evicted the cache of idle request %s", rid)
        return len(stale)

    def evict_idle(self) -> int:
        with self._meta:
            return self._evict_idle()
