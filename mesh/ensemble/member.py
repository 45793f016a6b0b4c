"""Ensemble members: a whole model in this process or on a ``mesh node``, one interface.

Concurrent requests' steps on one member are coalesced (``_Batcher``): the steps that the
ensemble's running requests want next go to the member as one call, which runs them as one
forward (``StageRunner.member_step_many``; ``MemberMany`` on a node), so eight users of an
ensemble share its forwards instead of queueing one forward each.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from mesh.backends.base import kv_layout_bytes
from mesh.engine.base import PromptScore
from mesh.engine.sampling import SamplingParams
from mesh.ensemble.mixing import Dist
from mesh.errors import EngineUnavailable, MeshError, Overloaded
from mesh.node import mesh_pb2
from mesh.node.auth import ForgedReply
from mesh.node.codec import from_tensor
from mesh.node.link import NodeLink
from mesh.node.runner import Proposal, StageError, StageRunner
from mesh.node.service import CHANNEL_OPTIONS, sampling_to_proto
from mesh.pipeline.engine import STEP_TIMEOUT, StageLost

log = logging.getLogger(__name__)


class RewindUnsupported(MeshError):
    """The member's cache cannot go back (a rotated sliding window): replay from 0."""


class CacheGone(MeshError):
    """A kept cache a new request was to copy is gone (evicted, ended) or cannot be cut
    back: the member feeds the prompt from 0 instead."""


MAX_BATCH = 64  # steps in one call: a node's request limit (StageRunner.MAX_REQUESTS)


class _Batcher:
    """One member's step queue. A call leaves when every request the engine runs that is
    not already in it has its step in (``expected``), or GATHER seconds after the first
    step arrived; one call is in flight at a time (the member computes one forward at a
    time anyway), and the steps arriving meanwhile form the next. A lone request's step
    leaves at once. Steps of several tokens (a prompt, a scored candidate) join a call up to
    PROMPT_TOKENS tokens in all (the oldest first, always at least one), so running
    requests' one-token steps never wait for several long prompts, and requests that arrive
    together get their first tokens one after another rather than all after every prompt."""

    GATHER = 0.003
    PROMPT_TOKENS = 256

    def __init__(self, run_many, expected):
        self._run_many = run_many  # async (list of step kwargs) -> list of result | exception
        self.expected = expected  # () -> how many requests may want a step soon
        self._loop = None
        self._pending: list = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.calls = 0
        self.batched_steps = 0  # steps that shared a call with another

    async def submit(self, args: dict):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests run several)
            self._loop, self._wake, self._pending, self._task = loop, asyncio.Event(), [], None
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._serve(), name="mesh-member-batcher")
            self._task.add_done_callback(self._ended)
        fut = loop.create_future()
        self._pending.append((args, fut))
        self._wake.set()
        return await fut

    def _ended(self, task: asyncio.Task) -> None:
        """Whatever ended the queue, no step is left waiting for it forever."""
        if not task.cancelled() and task.exception() is not None:
            log.error("a member's step queue died (%r)", task.exception())
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(EngineUnavailable("the ensemble's step queue stopped",
                                                    retry_after=1.0))
        self._pending = []

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = loop.time() + self.GATHER
            while len(self._pending) < self.expected() and loop.time() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            group, rest, fed = [], [], 0  # fed: tokens of the steps of several tokens
            for a, f in self._pending:
                if f.done():  # cancelled
                    continue
                n = len(a["tokens"])
                if len(group) < MAX_BATCH and (n == 1 or not fed or
                                               fed + n <= self.PROMPT_TOKENS):
                    group.append((a, f))
                    fed += n if n > 1 else 0
                else:
                    rest.append((a, f))
            self._pending = rest
            if not group:
                continue
            self.calls += 1
            if len(group) > 1:
                self.batched_steps += len(group)
            try:
                results = await self._run_many([a for a, _ in group])
            except Exception as exc:
                results = [exc] * len(group)
            except BaseException:  # cancelled (the loop is closing): nobody left waiting
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(EngineUnavailable("the ensemble's step queue "
                                                            "stopped", retry_after=1.0))
                raise
            for (_, fut), res in zip(group, results):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)


class Member(abc.ABC):
    name: str
    model: str
    weight: float
    tokenizer: object
    vocab_size: int
    bytes_received: int = 0  # on the wire, for a member on a node
    bytes_sent: int = 0
    # its backend's prompt rows come out the same however a prompt is cut (the Shard's):
    # a new request may then take a finished one's prompt cache to the token
    split_invariant: bool = False
    make_room = None  # async () -> whether the engine ended caches it kept on this member
    on_held = None  # () -> None: a request's call succeeded, the member holds its cache
    reused_tokens = 0  # prompt tokens taken from kept caches instead of computed
    speculates = False  # whether ``step(speculate=True)`` asks the member to guess ahead
    word_lead = True  # whether ``propose(lead=...)`` is honoured (a node says so)
    in_process = False  # computes in this process, on the coordinator's cores
    # the most bytes the member's caches may take (its node's --kv-memory; None: no budget)
    kv_budget: int | None = None

    def kv_cost(self, positions: list[int]) -> int:
        """What caches of those lengths take on the member (``Shard.kv_bytes``)."""
        return 0

    def _state(self) -> dict:
        st = self.__dict__.get("_reuse")
        if st is None:
            st = self.__dict__["_reuse"] = {"origins": {}, "holds": set()}
        return st

    def start_from(self, rid: str, source: str, prefix: list[int], on_taken=None) -> None:
        """Request ``rid``'s first call, when it feeds a prompt that starts with ``prefix``
        from position 0 (not scoring it), instead starts from a copy of request ``source``'s
        cache cut back to ``len(prefix)`` and feeds the rest; ``on_taken(n)`` once it did.
        Where that cache is gone, the call feeds the whole prompt, as without this."""
        self._state()["origins"][rid] = (source, list(prefix), on_taken)

    def holds(self, rid: str) -> bool:
        """Whether a call of ``rid`` succeeded since it began: the member holds its cache."""
        return rid in self._state()["holds"]

    def forget(self, rid: str) -> None:
        st = self._state()
        st["origins"].pop(rid, None)
        st["holds"].discard(rid)

    async def _submit(self, args: dict):
        st = self._state()
        rid = args["request_id"]
        first = rid not in st["holds"]
        origin = st["origins"].pop(rid, None)
        if origin is not None:
            source, prefix, on_taken = origin
            n, tokens = len(prefix), args["tokens"]
            if args["position"] == 0 and not args.get("score") and \
                    len(tokens) - n >= 2 and tokens[:n] == prefix:
                try:
                    out = await self._run(dict(args, position=n, tokens=tokens[n:],
                                               copy_from=source, fresh=True), first)
                except CacheGone as exc:
                    log.info("member %s: no kept cache for %s (%s); feeding the prompt",
                             self.name, rid, exc)
                else:
                    self._held(rid)
                    self.reused_tokens += n
                    if on_taken is not None:
                        on_taken(n)
                    return out
        out = await self._run(args, first)
        self._held(rid)
        return out

    def _held(self, rid: str) -> None:
        st = self._state()
        if rid not in st["holds"]:
            st["holds"].add(rid)
            if self.on_held is not None:
                self.on_held()

    async def _run(self, args: dict, first: bool):
        """A request's first call that the member refuses for want of room (its cache
        limit) runs again once the engine has ended the caches it keeps there
        (``make_room``): a kept prompt never keeps a request out."""
        try:
            return await self._batcher().submit(args)
        except Overloaded:
            if not first or self.make_room is None or not await self.make_room():
                raise
        return await self._batcher().submit(args)

    def _batcher(self) -> _Batcher:
        b = self.__dict__.get("_steps")
        if b is None:
            b = self.__dict__["_steps"] = _Batcher(self._step_many, lambda: 1)
        return b

    def expect(self, count) -> None:
        """``count()``: how many requests may want a step soon (the engine's running ones)."""
        self._batcher().expected = count

    @property
    def batched_steps(self) -> int:
        return self._batcher().batched_steps

    async def step(self, rid: str, position: int, tokens: list[int], top_k: int = 0,
                   score: bool = False, want_dist: bool = True, score_top: int = 0,
                   copy_from: str = "", speculate: bool = False, dense: bool = False
                   ) -> tuple[Dist | None, list | np.ndarray | None]:
        """The next-token distribution and, with ``score``, the log-probs of ``tokens[1:]``
        (PromptScores with their top alternatives when ``score_top`` > 0; with ``dense``,
        the whole log-probability row of every position before the last, (T - 1, V)). Concurrent
        requests' steps share one call to the member. With ``copy_from``, ``rid`` is a new
        request that starts from a copy of that one's cache, cut back to ``position``. With
        ``speculate`` a member on a node goes on to its own top token after replying
        (``StageRunner.member_step_many``); one in this process does not: it would only take
        cores from the other members, with no round trip to hide."""
        args = dict(request_id=rid, position=position, tokens=list(tokens), top_k=top_k,
                    score=score, want_dist=want_dist, score_top=score_top)
        if copy_from:
            args["copy_from"] = copy_from
        if speculate and self.speculates:
            args["speculate"] = True
        if dense:
            args["score_dense"] = True
        return await self._submit(args)

    async def propose(self, rid: str, position: int, tokens: list[int], n: int,
                      sampling: SamplingParams, stop_ids, word: bool = False,
                      words: int = 1, open_top: int = 0, lead: int = 0,
                      copy_from: str = "") -> Proposal:
        """Feed ``tokens`` at ``position``, then let the member write up to ``n`` tokens on
        its own (one call, not one per token), ending after any of ``stop_ids`` or, with
        ``word``, once ``words`` words are whole and the next has begun. ``tokens`` may be
        empty: the member goes on from where its cache stands (``position``). With
        ``open_top``, the proposal also brings that many of the most likely first tokens.
        ``lead``: the last this-many of ``tokens`` begin the words being written (with
        ``word``). ``copy_from``: ``rid`` is a new request that starts from a copy of that
        one's cache, cut back to ``position``, and goes on with its random draws."""
        args = dict(request_id=rid, position=position, tokens=list(tokens), propose=n,
                    sampling=sampling, stop_ids=sorted(stop_ids))
        if open_top:
            args["open_top"] = open_top
        if lead:
            args["lead"] = lead
        if copy_from:
            args["copy_from"] = copy_from
        if word:
            args["until_word"] = True
            if words > 1:
                args["words"] = words
        return await self._submit(args)

    @abc.abstractmethod
    async def _step_many(self, steps: list[dict]) -> list:
        """Each step's ``(Dist | None, scores | None)``, or the exception that refused it."""

    @abc.abstractmethod
    async def end(self, rid: str) -> None: ...

    async def close(self) -> None:
        return None


class LocalMember(Member):
    in_process = True

    def __init__(self, name: str, model: str, weight: float, runner: StageRunner, tokenizer):
        self.name, self.model, self.weight = name, model, weight
        self.runner, self.tokenizer = runner, tokenizer
        self.vocab_size = runner.shard.vocab_size
        self.split_invariant = runner.shard.split_invariant
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-member")

    @property
    def kv_budget(self):
        return self.runner.kv_budget

    def kv_cost(self, positions):
        return self.runner.shard.kv_bytes(positions)

    async def _step_many(self, steps):
        loop = asyncio.get_running_loop()
        try:
            outs = await loop.run_in_executor(self._executor, self.runner.member_step_many,
                                              steps)
        except StageError as err:
            outs = [err] * len(steps)
        return [self._error(o, s) if isinstance(o, StageError) else o
                for s, o in zip(steps, outs)]

    def _error(self, err: StageError, step: dict) -> Exception:
        if err.status == "ABORTED" and step.get("fresh"):
            return CacheGone(err.message)
        if "cannot rewind" in err.message:
            return RewindUnsupported(err.message)
        if err.status == "RESOURCE_EXHAUSTED":
            return Overloaded(f"member {self.name}: {err.message}")
        return MeshError(f"member {self.name}: {err.message}")

    async def end(self, rid):
        self.forget(rid)
        self.runner.end(rid)

    async def close(self):
        self._executor.shutdown(wait=False, cancel_futures=True)


class RemoteMember(Member):
    speculates = True

    def __init__(self, name: str, model: str, weight: float, address: str, secret, tokenizer,
                 vocab_size: int, split_invariant: bool = False, kv_budget: int | None = None,
                 kv_layout: dict | None = None, word_lead: bool = False):
        """``kv_budget`` and ``kv_layout``: as the node's Load reply says."""
        self.name, self.model, self.weight = name, model, weight
        self.kv_budget, self.kv_layout = kv_budget, kv_layout
        self.split_invariant = split_invariant  # as the node's Load reply says
        self.word_lead = word_lead  # (a node from before `lead` would miscount words)
        self.address, self.secret, self.tokenizer = address, secret, tokenizer
        self.vocab_size = vocab_size
        self.bytes_received = self.bytes_sent = 0
        self.link = NodeLink(address, secret, CHANNEL_OPTIONS)

    def kv_cost(self, positions):
        return kv_layout_bytes(self.kv_layout, positions)

    @staticmethod
    def _request(s: dict) -> mesh_pb2.MemberRequest:
        if s.get("propose"):
            return mesh_pb2.MemberRequest(
                request_id=s["request_id"], position=s["position"], tokens=s["tokens"],
                propose=s["propose"], sampling=sampling_to_proto(s["sampling"]),
                stop_ids=s["stop_ids"], no_distribution=True,
                until_word=s.get("until_word", False), words=s.get("words", 0),
                open_top=s.get("open_top", 0), lead=s.get("lead", 0),
                copy_from=s.get("copy_from", ""), fresh=s.get("fresh", False))
        return mesh_pb2.MemberRequest(request_id=s["request_id"], position=s["position"],
                                      tokens=s["tokens"], top_k=s["top_k"], score=s["score"],
                                      no_distribution=not s["want_dist"],
                                      score_top=s["score_top"],
                                      copy_from=s.get("copy_from", ""),
                                      fresh=s.get("fresh", False),
                                      speculate=s.get("speculate", False),
                                      score_dense=s.get("score_dense", False))

    def _lost(self, why: str) -> StageLost:
        return StageLost(f"member {self.name} ({self.address}): {why}", self.name)

    async def _step_many(self, steps):
        batch = mesh_pb2.MemberBatch(items=[self._request(s) for s in steps])
        self.bytes_sent += batch.ByteSize()
        try:
            reply = await self.link.call("MemberMany", batch, STEP_TIMEOUT)
        except ForgedReply as exc:
            raise self._lost(exc.message) from exc
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_error(exc.code(), exc.details() or "") from exc
        self.bytes_received += reply.ByteSize()
        if len(reply.replies) != len(steps):
            raise self._lost(f"{len(reply.replies)} replies to {len(steps)} steps")
        out = []
        for s, r in zip(steps, reply.replies):
            if r.status:
                if r.status == "ABORTED" and s.get("fresh"):  # a kept cache, gone
                    out.append(CacheGone(r.message))
                    continue
                code = getattr(grpc.StatusCode, r.status, grpc.StatusCode.UNKNOWN)
                out.append(self._rpc_error(code, r.message))
                continue
            try:
                out.append(self._decode(s, r))
            except StageLost as exc:
                out.append(exc)
        return out

    def _rpc_error(self, code, details: str) -> Exception:
        if "cannot rewind" in details:
            return RewindUnsupported(details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return MeshError(f"member {self.name}: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # busy (its cache limit), not lost
            return Overloaded(f"member {self.name}: {details}")
        if code == grpc.StatusCode.UNIMPLEMENTED:  # up, but older than this coordinator
            return MeshError(f"member {self.name}: its node runs an older mesh without "
                             f"batched member steps (MemberMany); upgrade it")
        return self._lost(f"{code.name}: {details}")

    def _decode(self, s: dict, reply):
        if s.get("propose"):
            if not reply.ended and not len(reply.proposed):  # it ignored `propose`
                raise MeshError(f"member {self.name}: its node runs an older mesh that "
                                f"cannot write proposals; upgrade it")
            opening = list(zip(reply.open_top_ids, reply.open_top_logprobs))
            if len(opening) > s.get("open_top", 0) or \
                    len(reply.open_top_ids) != len(reply.open_top_logprobs):
                raise self._lost("an opening distribution of the wrong length")
            return Proposal(list(reply.proposed), list(reply.proposed_logprobs), reply.ended,
                            reply.end_logprob if reply.ended else None, reply.position,
                            opening)
        dist = None
        if reply.HasField("logprobs"):
            dist = Dist(full=from_tensor(reply.logprobs))
        elif len(reply.top_ids):
            dist = Dist(top_ids=np.asarray(reply.top_ids, np.int32),
                        top_logprobs=np.asarray(reply.top_logprobs, np.float32),
                        rest_logprob=reply.rest_logprob)
        if s["score"] and s.get("score_dense"):
            want = (len(s["tokens"]) - 1, self.vocab_size)
            rows = from_tensor(reply.score_rows) if reply.HasField("score_rows") else None
            if rows is None or rows.shape != want:
                # a node from before score_dense answers with token log-probs instead
                raise MeshError(f"member {self.name}: its node did not send whole "
                                f"distributions for the prompt (an older mesh?); upgrade it")
            return dist, rows
        if s["score"] and s["score_top"]:
            lps, n = list(reply.token_logprobs), s["score_top"]
            ids, tops = list(reply.score_top_ids), list(reply.score_top_logprobs)
            if len(ids) != len(lps) * n or len(tops) != len(lps) * n:
                raise self._lost("prompt scores of the wrong length")
            return dist, [PromptScore(lp, list(zip(ids[i * n:(i + 1) * n],
                                                   tops[i * n:(i + 1) * n])))
                          for i, lp in enumerate(lps)]
        return dist, (list(reply.token_logprobs) if s["score"] else None)

    async def end(self, rid):
        self.forget(rid)
        try:
            await self.link.call("End", mesh_pb2.EndRequest(request_id=rid), 5.0)
        except (grpc.aio.AioRpcError, ForgedReply):
            pass

    async def close(self):
        await self.link.close()
