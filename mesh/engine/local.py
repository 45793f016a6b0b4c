"""LocalEngine: one or more shards of a model in this process, behind one scheduler.

The scheduler alone owns every request's state (token history, sampling parameters, RNG,
caches, counters). Each tick it admits waiting requests, forms one batch of the running
requests' decode steps plus at most one prefill chunk, runs it on the compute thread (MLX and
torch both want one thread), samples each request at one point and retires finished or
cancelled ones. A backend that batches (ONNX Runtime) runs the decode steps as one call; the
others loop over them. Prefill goes in chunks, so a long prompt never freezes the streams
that are already running. Requests for one prompt that arrive while it is being fed (the
``n`` > 1 completions of one request) follow it: the prompt is computed once and each
follower starts from a copy of its caches. A new prompt that starts with whole chunks a
finished request kept, or a running one has fed, starts from (a copy of) those.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import numpy as np

from mesh.backends.base import SETTLE, Shard, StepItem
from mesh.engine.admission import Admission, KVBudget, KVLimit, kv_budget_from
from mesh.engine.base import (Engine, GenerationRequest, PromptCuts, TokenStep,
                              SCORE_ROWS, longest_kept_prefix, mark_finish, score_rows)
from mesh.engine.sampling import choose, log_softmax
from mesh.layers import check_covering

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens per tick: bounds how long running streams wait
# a prompt with at most this many tokens left to feed joins a tick beside the oldest prompt's
# chunk (up to PREFILL_CHUNK such tokens a tick), so a short question never waits behind
# other users' long prompts; the oldest prompt still gets a chunk every tick
SHORT_PROMPT = 64
MAX_RUNNING = 16  # requests decoding together (KV caches held at once)
MAX_QUEUED = 256
KEEP_CACHES = 4  # finished requests' caches kept for a later prompt that starts the same way


@dataclass
class _Request:
    """Everything about one request, owned by the scheduler."""

    gen: GenerationRequest
    out: asyncio.Queue
    history: list[int] = field(default_factory=list)
    fed: int = 0  # tokens of ``history`` already in the caches
    produced: int = 0
    rng: np.random.Generator | None = None
    caches: list | None = None
    cancelled: bool = False
    done: bool = False
    failed: bool = False  # a step raised: its caches may be half-written
    prompt_scores: list | None = None  # filled chunk by chunk when the prompt is scored
    leader: "_Request | None" = None  # a request feeding this one's prompt, copied after
    followers: list = field(default_factory=list)
    # (a running request feeding the start of this one's prompt, how many tokens of it):
    # this one waits until they are fed, then starts from a copy of its caches
    awaits: "tuple[_Request, int] | None" = None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.gen.prompt_ids)

    @property
    def prompt_left(self) -> int:
        return len(self.gen.prompt_ids) - self.fed

    @property
    def schedulable(self) -> bool:
        """Whether a tick takes its next step (not ended, not waiting on another's prompt)."""
        return not (self.cancelled or self.done or self.leader is not None
                    or self.awaits is not None)


class LocalEngine(Engine):
    supports_scoring = True
    def __init__(self, model_id: str, shards: Sequence[Shard], tokenizer, context_length: int,
                 max_running: int = MAX_RUNNING, max_queued: int = MAX_QUEUED,
                 kv_budget: int | None = None):
        """``kv_budget``: bytes the KV caches may take at most (None: no limit but
        ``max_running``); a request is admitted only when every running one's cache, at its
        longest, fits beside its own (``Admission``)."""
        check_covering([s.layers for s in shards])
        self.model_id = model_id
        self.shards = list(shards)
        self.tokenizer = tokenizer
        self.context_length = context_length
        kv = None
        self.kv_budget = kv_budget
        if kv_budget is not None:
            limit = KVLimit("this server", kv_budget, self._kv_cost)
            kv = KVBudget(lambda: [limit], self._kept_positions, self._drop_kept)
        self.admission = Admission(max_running, max_queued, kv)
        self._unkept: list = []  # kept caches dropped for room, released between ticks
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-compute")
        self._running: list[_Request] = []
        self._waiting: deque[_Request] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop = None
        self.batched_steps = 0  # decode steps that ran beside another in one tick
        # prefix reuse: finished requests' caches, trimmed to the prompt tokens another
        # request may take (``cuts``), by those tokens (least recently used first)
        self.cuts = PromptCuts(PREFILL_CHUNK, all(s.split_invariant for s in self.shards))
        self._kept: OrderedDict[tuple, list] = OrderedDict()
        self.reused_tokens = 0
        self.shared_tokens = 0  # prompt tokens a follower copied instead of computing

    def info(self) -> dict:
        import psutil

        from mesh.devices import resident_bytes

        kv = 0
        for i, shard in enumerate(self.shards):
            pool = getattr(shard, "pool", None)  # ONNX Runtime: the pool, unused slots too
            if pool is not None:
                kv += pool.nbytes
                continue
            kv += sum(r.caches[i].nbytes for r in list(self._running) if r.caches)
            kv += sum(caches[i].nbytes for caches in list(self._kept.values()))
        memory = {"rss_bytes": resident_bytes(), "kv_bytes": kv,
                  "capacity_bytes": psutil.virtual_memory().total}
        if self.kv_budget is not None:
            memory["kv_budget_bytes"] = self.kv_budget
            memory["kv_reserved_bytes"] = self.admission.reserved()["this server"]
        return {"mode": "local", "stages": [str(s.layers) for s in self.shards],
                "running": len(self._running), "queued": self.admission.queued,
                "memory": memory}

    # ---- the KV budget (Admission's KVBudget) ---------------------------------------------

    def _kv_cost(self, positions: list[int]) -> int:
        return sum(s.kv_bytes(positions) for s in self.shards)

    def _kept_positions(self) -> list[int]:
        return [len(key) for key in self._kept]

    def _drop_kept(self) -> bool:
        """Forget the least recently used kept cache (freed between ticks: a tick may be
        running over its pool now)."""
        if not self._kept:
            return False
        self._unkept.append(self._kept.popitem(last=False)[1])
        if self._wake is not None:
            self._wake.set()
        return True

    def _positions(self, req: GenerationRequest) -> int:
        return req.longest(self.context_length)

    # ---- the request side ----------------------------------------------------------------

    def _ensure_scheduler(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests run several)
            self._loop, self._wake, self._task = loop, asyncio.Event(), None
            self._running, self._waiting = [], deque()
        if self._task is None or self._task.done():
            if self._task is not None and not self._task.cancelled() and \
                    self._task.exception() is not None:
                log.error("the scheduler died (%r); restarting it", self._task.exception())
            self._task = loop.create_task(self._schedule(), name="mesh-scheduler")
            self._task.add_done_callback(self._scheduler_ended)

    def _scheduler_ended(self, task: asyncio.Task) -> None:
        """Whatever ended the scheduler, no request is left waiting for a token forever."""
        from mesh.errors import EngineUnavailable

        for r in list(self._running) + list(self._waiting):
            if not (r.cancelled or r.done):
                r.done = True
                r.out.put_nowait(EngineUnavailable("the engine is shutting down"))
        self._running, self._waiting = [], deque()

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenStep]:
        self._ensure_scheduler()
        async with self.admission.slot(self._positions(req)):
            r = _Request(req, asyncio.Queue(), list(req.prompt_ids),
                         rng=np.random.default_rng(req.sampling.seed))
            self._waiting.append(r)
            self._wake.set()
            try:
                while True:
                    item = await r.out.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if item.finish_reason:
                        return
            finally:
                r.cancelled = True  # retired (its caches freed) at the next tick
                self._wake.set()

    # ---- the scheduler -------------------------------------------------------------------

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._retire()
            while self._waiting:
                r = self._waiting.popleft()
                if not r.cancelled and not self._follow(r):
                    self._reuse(r)
                self._running.append(r)
            self._take_awaited()
            if not self._running:
                self._wake.clear()
                try:  # quiet for SETTLE seconds: cut shared buffers to the kept caches
                    async with asyncio.timeout(SETTLE):  # (wait_for can swallow a cancel)
                        await self._wake.wait()
                except TimeoutError:
                    self._idle()
                    await self._wake.wait()
                continue
            batch = self._form_batch()
            try:
                results = await loop.run_in_executor(self._executor, self._tick, batch)
            except Exception as exc:  # the whole tick failed: fail its requests, go on
                log.exception("a scheduler tick failed")
                results = [(r, exc) for r, _ in batch]
            for r, res in results:
                if r.cancelled:
                    continue
                if isinstance(res, BaseException):
                    r.done = r.failed = True
                    r.out.put_nowait(res)
                elif res is not None:
                    r.out.put_nowait(res)
                    if res.finish_reason:
                        r.done = True

    def _idle(self) -> None:
        """Nothing has run for SETTLE seconds: caches that grow in shared buffers (ONNX
        Runtime's pool) are cut to what the kept ones need. Not at once: the next burst of
        requests would grow them again, a copy of every cache while the streams wait."""
        for shard in self.shards:
            compact = getattr(shard, "compact", None)
            if compact is not None:
                compact()

    def _form_batch(self) -> list[tuple[_Request, list[int]]]:
        """Every decoding request's one token, plus the next chunk of the oldest prompt and
        the rest of any prompt with at most SHORT_PROMPT tokens left (up to PREFILL_CHUNK
        tokens of those)."""
        batch, prompts = [], []
        short = 0
        for r in self._running:
            if not r.schedulable:
                continue
            if r.prefilling:
                if not prompts:
                    prompts.append(r)
                elif r.prompt_left <= SHORT_PROMPT and short + r.prompt_left <= self.cuts.chunk:
                    prompts.append(r)
                    short += r.prompt_left
            elif r.produced and r.fed < len(r.history):
                batch.append((r, r.history[r.fed:]))
        for r in prompts:
            end = self.cuts.piece_end(r.fed, len(r.gen.prompt_ids))
            batch.append((r, r.history[r.fed:end]))
        return batch

    def _retire(self) -> None:
        for caches in self._unkept:
            for c in caches:
                c.release()
        self._unkept = []
        keep, kept = [], False
        for r in self._running:
            if r.cancelled or r.done:
                for f in r.followers:  # gone before its prompt was fed: they feed their own
                    f.leader = None
                r.followers = []
                if r.caches is not None:
                    if self._keep(r):
                        kept = True
                    else:
                        for c in r.caches:
                            c.release()
                r.caches = None
            else:
                keep.append(r)
        self._running = keep
        if kept and self.kv_budget is not None:  # a cache kept now must fit beside the others
            live = [self._positions(r.gen) for r in [*self._running, *self._waiting]]
            while self._kept and self._kv_cost(live + self._kept_positions()) > self.kv_budget:
                for c in self._kept.popitem(last=False)[1]:
                    c.release()

    def _keep(self, r: _Request) -> bool:
        """Keep a finished request's caches for prefix reuse: only the prompt tokens a new
        request with the same start would compute exactly so (``self.cuts``: any prefix
        where the shards are split-invariant, else whole chunks from position 0), so reuse
        never changes a request's numbers. Generated tokens were computed otherwise (one
        row each) and are cut."""
        n = self.cuts.shareable(min(len(r.gen.prompt_ids), r.fed))
        if r.failed or n == 0 or r.gen.score_prompt is not None:
            return False
        try:
            for c in r.caches:
                c.trim(c.offset - n)
        except ValueError:  # a cache that cannot be cut back (a rotated sliding window)
            return False
        if any(c.offset != n for c in r.caches):
            return False
        key = tuple(r.history[:n])
        for k in [k for k in self._kept if key[:len(k)] == k]:  # a chat's earlier turns:
            for c in self._kept.pop(k):  # this key gives whatever they would
                c.release()
        self._kept[key] = r.caches
        while len(self._kept) > KEEP_CACHES:
            for c in self._kept.popitem(last=False)[1]:
                c.release()
        return True

    def _follow(self, r: _Request) -> bool:
        """Make ``r`` follow a running request whose prompt is the same and still being fed
        (not yet sampled from): ``r`` waits, then takes a copy of its caches and samples its
        first token from the same logits, which are what it would have computed itself."""
        if r.gen.score_prompt is not None:
            return False
        for lead in self._running:
            if lead.leader is None and not (lead.cancelled or lead.done) and \
                    lead.prefilling and lead.gen.score_prompt is None and \
                    lead.gen.prompt_ids == r.gen.prompt_ids:
                r.leader = lead
                lead.followers.append(r)
                return True
        return False

    def _reuse(self, r: _Request) -> None:
        """Give a new request the caches that share the longest prefix with its prompt
        that it may take (``self.cuts``; at least one prompt token is left to feed: its
        logits are sampled): a copy of a finished request's kept caches, or of a running
        request's (concurrent users with one system prompt). Runs between ticks, so no step
        is using a running donor's."""
        if r.gen.score_prompt is not None:
            return
        best, best_n = longest_kept_prefix(self._kept, r.gen.prompt_ids, self.cuts)
        donors = {}
        for q in self._running:  # prompt tokens a running request has fed (from 0)
            n = self.cuts.shareable(min(q.fed, len(q.gen.prompt_ids)))
            if n > best_n and q is not r and q.caches is not None and \
                    not (q.cancelled or q.done or q.failed):
                donors.setdefault(tuple(q.history[:n]), q)
        donor, donor_n = longest_kept_prefix(donors, r.gen.prompt_ids, self.cuts)
        if self._await_prefix(r, max(best_n, donor_n)):
            return
        if donor is not None and donor_n > best_n:
            try:
                caches = [c.fork() for c in donors[donor].caches]
            except NotImplementedError:
                return
            best_n = donor_n
            self.shared_tokens += donor_n
        elif best is not None:
            try:  # a copy: the next user with the same system prompt takes it too
                caches = [c.fork() for c in self._kept[best]]
                self._kept.move_to_end(best)
            except NotImplementedError:
                caches = self._kept.pop(best)
        else:
            return
        if self._start_from(r, caches, best_n):
            self.reused_tokens += best_n

    @staticmethod
    def _start_from(r: _Request, caches: list, n: int) -> bool:
        """``r`` starts from ``caches`` (its own copies) cut back to their first ``n``
        positions; False (the copies freed) when one cannot be cut back."""
        try:
            for c in caches:
                c.trim(c.offset - n)
        except ValueError:
            for c in caches:
                c.release()
            return False
        r.caches, r.fed = caches, n
        r.gen.cached_tokens = n
        return True

    def _await_prefix(self, r: _Request, have: int) -> bool:
        """Make ``r`` wait for a running request that is still feeding more of ``r``'s
        prompt start than ``have`` (users of one system prompt arriving together; an
        agent's parallel calls): that one feeds it once and ``r`` takes a copy. Waiting
        costs ``r`` little: prompts are fed oldest first, so its own would not start
        before that one's is in. A short one (SHORT_PROMPT tokens left), which would be fed
        at once beside the oldest prompt's chunk, waits only for a prompt fed in the same
        tick (the oldest, or another short one), never behind others' long prompts."""
        short = len(r.gen.prompt_ids) - have <= SHORT_PROMPT
        oldest = next((q for q in self._running if q.prefilling and q.schedulable), None)
        pending = {}
        for q in self._running:
            if q is not r and q.prefilling and q.leader is None \
                    and not (q.cancelled or q.done or q.failed) \
                    and q.gen.score_prompt is None and (
                        not short or q is oldest
                        or q.prompt_left <= SHORT_PROMPT):
                pending.setdefault(tuple(q.gen.prompt_ids), q)
        key, n = longest_kept_prefix(pending, r.gen.prompt_ids, self.cuts)
        if key is None or n <= have:
            return False
        r.awaits = (pending[key], n)
        return True

    def _take_awaited(self) -> None:
        """Between ticks: requests whose awaited prompt start is now fed take a copy of it;
        those whose donor ended look again (its kept caches, another's) or feed it all."""
        for r in self._running:
            if r.awaits is None or r.cancelled or r.done:
                continue
            q, n = r.awaits
            if q.cancelled or q.done or q.failed:
                r.awaits = None  # a kept copy of it, another running request's, or its own
                self._reuse(r)
            elif q.fed >= n and q.caches is not None:
                r.awaits = None
                try:
                    caches = [c.fork() for c in q.caches]
                except NotImplementedError:
                    continue
                if self._start_from(r, caches, n):
                    self.shared_tokens += n

    def _tick(self, batch: list[tuple[_Request, list[int]]]):
        """On the compute thread: one forward over the batch, then sample where a step
        completes a request's input."""
        items, owners = [], []
        out: list = []
        for r, tokens in batch:
            try:
                if r.caches is None:
                    r.caches = [s.new_cache() for s in self.shards]
                items.append([r, np.asarray(tokens, dtype=np.int32)])
                owners.append(r)
            except Exception as exc:
                out.append((r, exc))
        if not items:
            return out
        if sum(1 for _, x in items if len(x) == 1) > 1:
            self.batched_steps += sum(1 for _, x in items if len(x) == 1)
        xs = [x for _, x in items]
        # a prompt being scored needs every position's logits from the last shard
        scoring = [r.gen.score_prompt is not None and r.prefilling for r, _ in items]
        last = len(self.shards) - 1
        try:
            for si, shard in enumerate(self.shards):
                xs = shard.forward([StepItem(r.gen.request_id, x, r.caches[si],
                                             all_logits=si == last and wants)
                                    for (r, _), x, wants in zip(items, xs, scoring)])
        except Exception as exc:
            return out + [(r, exc) for r in owners]
        for (r, tokens), logits, wants in zip(items, xs, scoring):
            if wants:
                try:
                    logits = self._score_chunk(r, len(tokens), logits)
                except Exception as exc:
                    out.append((r, exc))
                    continue
            r.fed += len(tokens)
            if r.fed < len(r.history):  # a prompt chunk with more to come: no sample yet
                out.append((r, None))
                continue
            try:
                step = self._sample(r, logits)
            except Exception as exc:
                out.append((r, exc))
                continue
            followers, r.followers = r.followers, []
            out.append((r, step))
            for f in followers:
                out.extend(self._start_follower(r, f, logits))
        return out

    @staticmethod
    def _sample(r: _Request, logits: np.ndarray) -> TokenStep:
        """``r``'s next token from ``logits``, its grammar advanced, its history grown."""
        token, lp, top = choose(logits, np.asarray(r.history, dtype=np.int32),
                                len(r.gen.prompt_ids), r.gen.sampling, r.rng,
                                r.gen.allowed(logits.shape[-1]))
        r.gen.advance(token)
        r.produced += 1
        step = mark_finish(TokenStep(token, lp, top), r.produced, r.gen)
        if r.produced == 1 and r.prompt_scores is not None:
            step.prompt_scores, r.prompt_scores = r.prompt_scores, None
        r.history.append(token)
        return step

    def _start_follower(self, lead: _Request, f: _Request, logits: np.ndarray) -> list:
        """On the compute thread, once ``lead`` has fed the prompt: ``f`` takes a copy of
        its caches and samples its own first token from the prompt's last logits."""
        f.leader = None
        if f.cancelled or f.done:
            return []
        try:
            f.caches = [c.fork() for c in lead.caches]
        except NotImplementedError:  # this backend cannot copy a cache: feed it alone
            return []
        f.fed = lead.fed
        self.shared_tokens += f.fed
        try:
            return [(f, self._sample(f, logits))]
        except Exception as exc:
            return [(f, exc)]

    @staticmethod
    def _score_chunk(r: _Request, n: int, logits: np.ndarray) -> np.ndarray:
        """Score the prompt tokens that follow this chunk's positions; return the last
        position's logits (what the sampler needs)."""
        start, n_prompt = r.fed, len(r.gen.prompt_ids)
        k = min(n, n_prompt - 1 - start)  # rows whose next token is in the prompt
        if r.prompt_scores is None:
            r.prompt_scores = []
        for i in range(0, max(k, 0), SCORE_ROWS):  # row blocks (a 262K vocabulary: 1 MB a row)
            j = min(k, i + SCORE_ROWS)
            r.prompt_scores.extend(score_rows(log_softmax(logits[i:j]),
                                              r.history[start + 1 + i:start + 1 + j],
                                              r.gen.score_prompt))
        return logits[-1]

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def build_local_engine(model: str, backend: str | None = None, dtype: str = "auto",
                       context_length: int | None = None, split: int = 1,
                       progress: bool = True, kv_memory: int | str | None = None
                       ) -> LocalEngine:
    """Resolve ``model``, load it with ``backend`` (as ``split`` in-process shards).
    ``kv_memory``: the KV caches' budget in bytes, ``"auto"`` (``kv_budget_from``: a share
    of the memory available once the model is loaded) or None (no budget)."""
    from mesh.backends.base import default_backend, load_shard
    from mesh.layers import LayerRange
    from mesh.models.source import resolve

    source = resolve(model, progress=progress)
    backend = backend or default_backend(source.model_type, whole_model=split == 1)
    n = source.num_layers
    bounds = [round(i * n / split) for i in range(split + 1)]
    shards = [load_shard(backend, source, LayerRange(a, b, n), dtype)
              for a, b in zip(bounds, bounds[1:])]
    ctx = min(context_length or source.context_length, source.context_length)
    return LocalEngine(source.name, shards, source.tokenizer, ctx,
                       kv_budget=kv_budget_from(kv_memory))
