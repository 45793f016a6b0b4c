"""EnsembleEngine: several whole models, combined per token (merge) or per chunk (pick).

merge: every member computes next-token log-probabilities for the same context in parallel;
the mixture (weighted mean of probabilities, or of log-probabilities) is sampled once and the
token goes to every member. Needs one shared vocabulary.

pick: every member writes a short continuation itself, in one call (cut at a word boundary
where possible); every member scores the others' candidates on copies of its cache; the
candidate with the lowest weighted negative log-likelihood per UTF-8 byte wins
(tokenizer-neutral) and is appended, as text, to every member's context. A member goes on
from its own cache or from the copy that holds the winner, rewinding only to the last token
it shares with the new context.

words: a word-level mixture across vocabularies; each member writes its next word in one
call, and the members score each other's words when they disagree (greedy). Tokens reach the
client in the first member's tokenizer; pick reports no log-probabilities (a chunk's tokens
come from different models' tokenizations).

Every strategy: a member keeps a finished request's prompt cache, and a new request whose
prompt starts the same way (a chat's next turn, a shared system prompt) starts from a copy of
it, where the member's backend computes a prompt row the same however the prompt is cut.

A member that fails mid-request is dropped from the ensemble (logged, and listed in
/v1/models); with none left the request ends with a 503. Past its running and queued limits
the ensemble answers 429: every running request holds a cache on every member, and a member
that refuses one more (its node's limit) is busy, not lost.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import re
import time
from collections import OrderedDict
from typing import AsyncIterator, Callable

import numpy as np

from mesh.engine.admission import Admission, KVBudget, KVLimit
from mesh.engine.base import (Engine, GenerationRequest, Pending, PromptCuts, PromptScore,
                              TokenStep, cleanup, detach, longest_kept_prefix, mark_finish)
from mesh.engine.sampling import choose, top_ids
from mesh.ensemble.member import Member, RewindUnsupported
from mesh.ensemble.mixing import (WORD, common_prefix, cut_at_word_boundary, first_words,
                                  mix, nll_per_byte, perplexity_weights)
from mesh.errors import EngineUnavailable, InvalidRequest, MeshError
from mesh.pipeline.engine import REJOIN_EVERY, STEP_TIMEOUT, StageLost

log = logging.getLogger(__name__)

# each member's top alternatives per prompt position when a merge scores a prompt: the
# mixture's top-N is taken over their union
SCORE_CANDIDATES = 20
# a product of experts' prompt scores: members' whole rows per call, all members together,
# and what may be kept for a whole prompt (perplexity weights need all of it first)
DENSE_BYTES = 64 * 1024 * 1024
DENSE_KEPT = 512 * 1024 * 1024

STRATEGIES = ("merge", "words", "pick")
WORD_TOKENS = 24  # the most tokens one proposed word may take
RUN_WORDS = 8  # the most words a sampled words ensemble's member writes in one call
# the most words a greedy words ensemble's members each propose in one round: twice the last
# round's once they agreed on all of it, one where they parted
GREEDY_RUN = 8
HAND_OVER = True  # sampled words: the next run's writer begins during the last word's
# a greedy words proposal also brings its opening distribution's top tokens: another
# member's word that is one of them, as one token, is scored from it without a pass
OPEN_TOP = 64
MAX_RUNNING = 16  # requests generating at once (each holds a cache on every member)
MAX_QUEUED = 256
KEEP_CACHES = 4  # finished requests' caches each member keeps for a prompt that starts the same
# a member whose backend is split-invariant takes a kept prompt to the token, leaving at least
# two rows to feed (a one-row piece rounds otherwise); the chunk plays no part here
REUSE = PromptCuts(256, any_split=True)
# the longest a request waits for an earlier one to feed the prompt start they share (it
# feeds its own past it; the earlier one's prompt went first anyway)
DONOR_WAIT = 120.0


def check_shared_vocabulary(members: list[Member]) -> None:
    first = members[0]
    v0 = first.tokenizer.hf.get_vocab()
    for m in members[1:]:
        if m.tokenizer.hf.get_vocab() != v0:
            raise InvalidRequest(
                f"strategy 'merge' needs one shared vocabulary, but {first.model} "
                f"({type(first.tokenizer.hf).__name__}, {len(v0)} tokens) and {m.model} "
                f"({type(m.tokenizer.hf).__name__}, {len(m.tokenizer.hf.get_vocab())} tokens) "
                "tokenize differently; use --strategy words or pick", param="strategy",
                code="vocabulary_mismatch")


class EnsembleEngine(Engine):
    def __init__(self, model_id: str, members: list[Member], strategy: str = "merge", *,
                 context_length: int, weighting: str = "fixed", mix_mode: str = "prob",
                 top_k: int = 0, chunk_tokens: int = 8, ppl_temperature: float = 1.0,
                 cleanup=None, max_running: int = MAX_RUNNING, max_queued: int = MAX_QUEUED):
        if strategy not in STRATEGIES:
            raise InvalidRequest(f"unknown strategy {strategy!r}", param="strategy")
        if not members:
            raise InvalidRequest("an ensemble needs at least one member", param="member")
        if strategy == "merge":
            check_shared_vocabulary(members)
        self.model_id = model_id
        self.members = list(members)
        self.strategy = strategy
        # a grammar masks one vocabulary; pick compares texts from several tokenizers
        self.supports_constraints = strategy == "merge"
        self.weighting = weighting
        self.mix_mode = mix_mode
        self.top_k = top_k
        self.chunk_tokens = chunk_tokens
        self.ppl_temperature = ppl_temperature
        self.context_length = context_length
        self.tokenizer = members[0].tokenizer
        # the member whose tokens the API speaks (the request's prompt, the reported tokens):
        # the first, lost or not
        self._first = members[0].name
        self.lost: list[str] = []
        self.events: list[str] = []
        self._copy_ids = itertools.count(1)  # names the copies candidates are scored on
        self._request_ids = itertools.count(1)
        self._cleanup = cleanup
        # per member: prompt tokens -> the member's request id whose cache holds them (a
        # finished request's, kept for the next request that starts the same way)
        self._kept: dict[str, OrderedDict[tuple, str]] = {}
        # running requests: id -> (each member's prompt, who holds each member's cache)
        self._running: dict[str, tuple[dict, dict]] = {}
        # a request is admitted when its caches fit every member's KV budget beside the
        # running requests' and the kept ones (``_need``)
        self.admission = Admission(max_running, max_queued, KVBudget(
            self._kv_limits, self._kept_needs, self._drop_oldest_kept))
        self._freeing = Pending()  # kept caches being ended for room
        self._waiters: list[asyncio.Future] = []  # requests waiting for a donor's prompt
        for m in self.members:
            self._attach(m)
        # members lost (or not up at the start) come back: name -> a function that loads the
        # member again (on a node: once it answers), and the members' order (the first's
        # tokens are the API's); set by build_ensemble_engine
        self.rebuild: dict[str, Callable[[], Member]] = {}
        self.order: list[str] = [m.name for m in self.members]
        self._dropped: dict[str, Member] = {}  # lost members, closed once they come back
        self._rejoiner: asyncio.Task | None = None

    def _attach(self, m: Member) -> None:
        m.expect(lambda: self.admission.running)  # it batches the running requests' steps
        m.make_room = functools.partial(self._end_kept, m)
        m.on_held = self._notify

    async def start(self) -> None:
        if self.rebuild and (self._rejoiner is None or self._rejoiner.done()):
            self._rejoiner = asyncio.get_running_loop().create_task(self._rejoin_loop(),
                                                                    name="mesh-rejoin")

    async def _rejoin_loop(self) -> None:
        while True:
            await asyncio.sleep(REJOIN_EVERY)
            try:
                await self.rejoin()
            except Exception:  # one bad round must not end it
                log.exception("asking lost members failed")

    async def rejoin(self) -> list[str]:
        """Load again each lost member whose node answers (a machine rebooted, a node
        started after the coordinator); new requests use it, running ones go on without.
        Returns the names that came back."""
        back = []
        for name in [n for n in self.lost if n in self.rebuild]:
            try:
                m = await asyncio.to_thread(self.rebuild[name])
            except MeshError:
                continue  # still away
            if self.strategy == "merge":
                try:
                    check_shared_vocabulary([*self.members, m])
                except MeshError as exc:
                    log.error("member %s cannot rejoin: %s", name, exc.message)
                    del self.rebuild[name]
                    await m.close()
                    continue
            old = self._dropped.pop(name, None)
            if old is not None:  # its connection, which requests no longer use
                await old.close()
            self._attach(m)
            self.members.append(m)
            self.members.sort(key=lambda x: self.order.index(x.name))
            self.lost.remove(name)
            self.events.append(f"{time.strftime('%H:%M:%S')} member {name} answers again")
            log.warning("ensemble member %s is back; %d members", name, len(self.members))
            back.append(name)
        return back

    def info(self) -> dict:
        reserved = self.admission.reserved()  # under each member's KV budget
        return {"mode": "ensemble", "strategy": self.strategy, "weighting": self.weighting,
                "running": self.admission.running, "queued": self.admission.queued,
                "members": [{"name": m.name, "model": m.model, "weight": m.weight,
                             "batched_steps": m.batched_steps,
                             "reused_tokens": m.reused_tokens, "kv_budget_bytes": m.kv_budget,
                             "kv_reserved_bytes": reserved.get(f"member {m.name}")}
                            for m in self.members],
                "lost": self.lost, "events": self.events[-10:]}

    def _drop(self, member: Member, why: str) -> None:
        self._kept.pop(member.name, None)
        if member in self.members:
            self.members.remove(member)
            self.lost.append(member.name)
            self._dropped[member.name] = member
            self.events.append(f"{time.strftime('%H:%M:%S')} lost member {member.name}: "
                               f"{why}")
            log.warning("ensemble member %s lost (%s); %d left", member.name, why,
                        len(self.members))

    async def _all(self, members: list[Member], fn, some: bool = True) -> list:
        """Run ``fn(member)`` on every member; drop those that fail with a lost node. With
        ``some``, none left answering is an EngineUnavailable; without, an empty list (the
        caller asked some of the members, and the others may go on)."""
        results = await asyncio.gather(*(fn(m) for m in members), return_exceptions=True)
        out = []
        for m, r in zip(members, results):
            if isinstance(r, StageLost):
                self._drop(m, r.message)
            elif isinstance(r, BaseException):
                raise r
            else:
                out.append((m, r))
        if not out and some:
            raise EngineUnavailable("every ensemble member is lost", retry_after=30.0)
        return out

    # ---- the KV budget (Admission's KVBudget) ---------------------------------------------

    def _kv_limits(self) -> list[KVLimit]:
        return [KVLimit(f"member {m.name}", m.kv_budget, functools.partial(_member_cost, m))
                for m in self.members if m.kv_budget is not None]

    def _need(self, req: GenerationRequest, prompts: dict) -> dict[str, list[int]]:
        """Per member, the lengths its caches for ``req`` can come to: its prompt plus
        ``max_tokens`` in its own tokens (as many more per token as its prompt takes), and
        for pick a chunk more, on its own cache and a copy per other candidate; sampled
        words that may hand over (``_sampled_run``), a copy beside its own cache."""
        n = max(1, len(req.prompt_ids))
        pick = self.strategy == "pick"
        hands_over = self.strategy == "words" and req.sampling.temperature > 0 and \
            HAND_OVER and not all(m.in_process for m in self.members)
        need = {}
        for name, p in prompts.items():
            out = math.ceil(max(req.max_tokens, 1) * max(1.0, len(p) / n))
            longest = min(self.context_length, len(p) + out + (self.chunk_tokens if pick else 0))
            need[name] = [longest] * (len(prompts) if pick else 2 if hands_over else 1)
        return need

    def _kept_needs(self) -> list[dict]:
        return [{name: [len(key)]} for name, kept in self._kept.items() for key in kept]

    def _drop_oldest_kept(self) -> bool:
        """End a kept cache for a request being admitted (its first call waits until the
        member has ended it: ``_freeing``)."""
        for m in self.members:
            kept = self._kept.get(m.name)
            if kept:
                self._freeing.start(m.end(kept.popitem(last=False)[1]))
                return True
        return False

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenStep]:
        members = list(self.members)
        if not members:
            raise EngineUnavailable("every ensemble member is lost", retry_after=30.0)
        prompts = self._prompts(req, members)
        async with self.admission.slot(self._need(req, prompts)):
            await self._freeing.wait(STEP_TIMEOUT)
            members = [m for m in members if m in self.members]  # lost while it queued
            if not members:
                raise EngineUnavailable("every ensemble member is lost", retry_after=30.0)
            if len(members) < len(prompts):
                prompts = self._prompts(req, members)
            # the request's id on the members: unique, so that a kept cache is never mistaken
            # for a later request's of the same id
            rid = f"{req.request_id}@{next(self._request_ids)}"
            ids = {m.name: rid for m in members}  # who holds each member's cache
            self._running[rid] = (prompts, ids)
            gen = None
            try:
                have = self._start_from_kept(req, rid, members, prompts)
                if await self._await_donors(rid, members, prompts, have):
                    self._start_from_kept(req, rid, members, prompts)
                gen = {"merge": self._merge, "words": self._words,
                       "pick": self._pick}[self.strategy](req, members, prompts, ids)
                async for step in gen:
                    yield step
            finally:
                self._running.pop(rid, None)
                self._notify()
                await cleanup(*([gen.aclose()] if gen is not None else []),
                              self._keep_or_end(rid, members, prompts, ids))

    def _prompts(self, req: GenerationRequest, members: list[Member]) -> dict[str, list[int]]:
        """Each member's prompt in its own tokens (merge: the request's, one vocabulary)."""
        if self.strategy == "merge":
            return {m.name: list(req.prompt_ids) for m in members}
        prompts = {m.name: self._prompt_for(m, req) for m in members}
        if self.strategy == "words" and self._first in prompts:  # the request's are its
            prompts[self._first] = list(req.prompt_ids)
        return prompts

    # ---- prompts reused across requests ------------------------------------------------

    def _start_from_kept(self, req: GenerationRequest, rid: str, members: list[Member],
                         prompts: dict) -> dict[str, int]:
        """Each member whose kept caches, or running requests that have fed their prompts,
        hold a start of its prompt begins from a copy of the longest (a chat's next turn,
        another user's request with the same system prompt); the source keeps its cache.
        Only on a split-invariant member, and only where the first call feeds the prompt
        without scoring it (``Member.start_from``), so no number changes. The usage reports
        the first member's tokens taken. Returns the tokens each member will take."""
        have = {}
        for m in members:
            if not m.split_invariant:
                continue
            kept = self._kept.get(m.name) or {}
            pool = dict(kept)
            for r_prompts, r_ids in self._running.values():  # prompts already fed
                held = r_ids.get(m.name)
                if held is not None and m.holds(held):
                    p = r_prompts[m.name]
                    pool.setdefault(tuple(p[:REUSE.shareable(len(p))]), held)
            key, n = longest_kept_prefix(pool, prompts[m.name], REUSE)
            if key is None:
                continue
            if key in kept:
                kept.move_to_end(key)
            taken = None
            if m.name == self._first:
                def taken(k):
                    req.cached_tokens = k
            m.start_from(rid, pool[key], prompts[m.name][:n], taken)
            have[m.name] = n
        return have

    async def _await_donors(self, rid: str, members: list[Member], prompts: dict,
                            have: dict[str, int]) -> bool:
        """Users of one system prompt arriving together (an agent's parallel calls): while
        an earlier request is still feeding, on a member, a longer start of this request's
        prompt than any cache there holds (``have``), this one waits for it, then takes a
        copy (``_start_from_kept``) instead of computing that start again. It costs little:
        a member's prompts are fed oldest first. True when it waited."""
        loop = asyncio.get_running_loop()
        order = list(self._running)
        earlier = order[:order.index(rid)] if rid in order else order
        deadline = loop.time() + DONOR_WAIT

        def feeding() -> bool:
            for m in members:
                if not m.split_invariant or m not in self.members:
                    continue
                donors = {}
                for other in earlier:
                    entry = self._running.get(other)
                    held = entry[1].get(m.name) if entry is not None else None
                    if held is None or m.holds(held):
                        continue
                    p = entry[0][m.name]
                    donors.setdefault(tuple(p[:REUSE.shareable(len(p))]), other)
                key, n = longest_kept_prefix(donors, prompts[m.name], REUSE)
                if key is not None and n > have.get(m.name, 0):
                    return True
            return False

        waited = False
        while feeding() and loop.time() < deadline:
            fut = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, deadline - loop.time())
            except asyncio.TimeoutError:
                break
            waited = True
        return waited

    def _notify(self) -> None:
        """A member now holds a request's cache, or a request ended: donors' waiters look."""
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def _end_kept(self, m: Member) -> bool:
        """End every cache kept on ``m`` (it refused a request for want of room)."""
        kept = self._kept.pop(m.name, None)
        if not kept:
            return False
        await asyncio.gather(*(m.end(i) for i in kept.values()), return_exceptions=True)
        return True

    async def _keep_or_end(self, request: str, members: list[Member], prompts: dict,
                           ids: dict) -> None:
        """At a request's end, each member keeps the cache holding the request's prompt
        (``ids``), up to KEEP_CACHES per member and never so many that the running requests
        lack room; a kept prompt that the new one extends (a chat's earlier turn) gives
        way. Only the prompt's positions are ever taken from it (generated tokens were
        computed a row at a time). The other caches end."""
        ends = []
        room = max(0, min(KEEP_CACHES, self.admission.max_running - self.admission.running))
        for m in members:
            rid, prompt = ids[m.name], prompts[m.name]
            held = m.holds(rid)
            m.forget(request)  # (a start_from the request did not use)
            m.forget(rid)
            n = REUSE.shareable(len(prompt))
            if not (m.split_invariant and n and held and m in self.members):
                ends.append((m, rid))
                continue
            key = tuple(prompt[:n])
            kept = self._kept.setdefault(m.name, OrderedDict())
            for k in [k for k in kept if key[:len(k)] == k]:
                ends.append((m, kept.pop(k)))
            kept[key] = rid
            while len(kept) > room:
                ends.append((m, kept.popitem(last=False)[1]))
        if ends:
            await asyncio.gather(*(m.end(i) for m, i in ends), return_exceptions=True)

    # ---- merge ---------------------------------------------------------------------------

    @property
    def supports_scoring(self) -> bool:
        """Prompt scores of a mixture: a ``merge`` (a product of experts takes every member's
        whole distribution at every position, to normalise) or ``words``."""
        return self.strategy in ("merge", "words")

    async def _merge(self, req: GenerationRequest, members: list[Member], prompts: dict,
                     ids: dict):
        rid, history = ids[members[0].name], np.array(req.prompt_ids, dtype=np.int32)
        echo = req.score_prompt is not None and len(history) > 1
        score = (self.weighting == "perplexity" or echo) and len(history) > 1
        top = max(req.score_prompt or 0, SCORE_CANDIDATES) if echo else 0
        # members on nodes compute their own top token's step while this mixes: greedy, the
        # mixture's choice is mostly every member's own. Sampled, it is often not, and
        # guessing made a sampled merge slower (a member's one core computed the wrong
        # guess beside its reply: 54-55 vs 61-65 tok/s on pinned nodes, docs/ensemble.md)
        guess = req.sampling.greedy and req.constraint is None
        prompt_scores = None
        if echo and self.mix_mode == "logprob":
            results, weights, prompt_scores = await self._product_prompt(members, rid, req)
        else:
            results = await self._all(members, lambda m: m.step(
                rid, 0, req.prompt_ids, self.top_k, score, score_top=top,
                speculate=guess and req.max_tokens > 1))
            lps = {m.name: [s.logprob for s in r[1]] if top else r[1] for m, r in results} \
                if score else {}
            if self.weighting == "perplexity" and score:
                nll = {m.name: -float(np.mean(lps[m.name])) for m, _ in results}
                weights = dict(zip(nll, perplexity_weights(list(nll.values()),
                                                           self.ppl_temperature)))
            else:
                weights = {m.name: m.weight for m, _ in results}
            if req.score_prompt is not None:
                prompt_scores = _mixed_scores([(weights[m.name], r[1]) for m, r in results],
                                              req.prompt_ids, req.score_prompt)
        rng = np.random.default_rng(req.sampling.seed)
        for i in range(req.max_tokens):
            vocab = max(m.vocab_size for m, _ in results)
            mixed = mix([r[0].dense(vocab) for _, r in results],
                        [weights[m.name] for m, _ in results], self.mix_mode)
            token, lp, top = choose(mixed, history, len(req.prompt_ids), req.sampling, rng,
                                    req.allowed(len(mixed)))  # the grammar masks the merge
            req.advance(token)
            step = mark_finish(TokenStep(token, lp, top), i + 1, req)
            if i == 0:
                step.prompt_scores = prompt_scores
            yield step
            if step.finish_reason:
                return
            pos = len(history)
            history = np.append(history, np.int32(token))
            alive = [m for m, _ in results if m in self.members]
            # (a guess feeds token i + 1 to compute token i + 2's distribution)
            results = await self._all(alive, lambda m: m.step(
                rid, pos, [token], self.top_k, speculate=guess and i + 2 < req.max_tokens))

    async def _product_prompt(self, members: list[Member], rid: str,
                              req: GenerationRequest) -> tuple[list, dict, list[PromptScore]]:
        """A product of experts' prompt scores: every member sends its whole log-probability
        row for every prompt position, a piece of the prompt at a time (at most
        ``DENSE_BYTES`` of rows a piece, all members together); each position's rows are
        mixed as the decode steps mix them. -> (the last piece's results, the weights, the
        scores). With ``--weighting perplexity`` the weights come from the whole prompt, so
        its rows are all kept until the end (at most ``DENSE_KEPT`` bytes: a longer prompt
        is refused)."""
        ids = req.prompt_ids
        vocab = max(m.vocab_size for m in members)
        keep = self.weighting == "perplexity"
        if keep and 4 * vocab * len(members) * len(ids) > DENSE_KEPT:
            raise InvalidRequest(
                f"a product of experts weighted by perplexity scores prompts of up to "
                f"{DENSE_KEPT // (4 * vocab * len(members))} tokens with these members; "
                f"this one has {len(ids)}", param="prompt")
        piece = max(2, DENSE_BYTES // (4 * vocab * len(members)))
        kept: dict[str, list[np.ndarray]] = {m.name: [] for m in members}
        scores: list[PromptScore] = []
        weights = {m.name: m.weight for m in members}
        pos, results, alive = 0, [], list(members)
        while pos < len(ids):
            chunk = ids[pos:pos + piece]
            results = await self._all(alive, lambda m: m.step(
                rid, pos, chunk, 0, True, dense=True))
            alive = [m for m, _ in results]  # a member lost meanwhile is dropped
            # each member's rows for the chunk's positions: the last one is its distribution
            rows = [(m, np.concatenate([_padded(r[1], vocab), r[0].dense(vocab)[None]]))
                    for m, r in results]
            targets = ids[pos + 1:pos + len(chunk) + 1]
            if keep:
                for m, x in rows:
                    kept[m.name].append(x[:len(targets)])
            else:
                scores += _product_scores([(weights[m.name], x[:len(targets)]) for m, x in rows],
                                          targets, req.score_prompt)
            pos += len(chunk)
        if keep:
            target = np.asarray(ids[1:], dtype=np.int64)
            nll = {m.name: -float(np.concatenate(kept[m.name])[np.arange(len(target)),
                                                                target].mean())
                   for m in alive}
            weights = dict(zip(nll, perplexity_weights(list(nll.values()),
                                                       self.ppl_temperature)))
            scores = _product_scores([(weights[m.name], np.concatenate(kept[m.name]))
                                      for m, _ in results], ids[1:], req.score_prompt)
        return results, weights, scores

    # ---- pick ------------------------------------------------------------------------------

    def _prompt_for(self, m: Member, req: GenerationRequest) -> list[int]:
        if req.messages is not None:
            return m.tokenizer.chat_prompt(req.messages)
        text = req.prompt_text
        if text is None:
            text = self.tokenizer.decode(req.prompt_ids, skip_special_tokens=False)
        return m.tokenizer.encode(text)

    async def _weights(self, members: list[Member], prompts: dict, rid: str,
                       fed: dict) -> dict[str, float]:
        """Each member's weight for this request: its own (``--weighting fixed``), or
        PackLLM's from how well each member predicts the prompt. Members that tokenize
        differently compare per byte: a member's negative log-likelihood of its prompt's
        tokens after the first, over the UTF-8 bytes of their text. Leaves every member's
        cache holding its prompt."""
        if self.weighting != "perplexity":
            return {m.name: m.weight for m in members}
        results = await self._all(members, lambda m: m.step(
            rid, 0, prompts[m.name], 0, True, want_dist=False))
        nll = {}
        for m, (_, lps) in results:
            ids = prompts[m.name]
            fed[m.name] = list(ids)
            text = m.tokenizer.decode(ids[1:], skip_special_tokens=False)
            nll[m.name] = -float(np.sum(lps)) / max(len(text.encode()), 1)
        weights = dict(zip(nll, perplexity_weights(list(nll.values()), self.ppl_temperature)))
        log.debug("perplexity weights (NLL per byte): %s", ", ".join(
            f"{k}={weights[k]:.3f} ({v:.3f})" for k, v in nll.items()))
        return weights

    async def _sync(self, m: Member, rid: str, fed: dict, tokens: list[int],
                    score_from: int) -> list[float]:
        """Bring ``m``'s cache to ``tokens``, rewinding only to the prefix it shares with
        what it holds; returns the log-probs of ``tokens[score_from:]``."""
        start = max(min(common_prefix(fed.get(m.name, []), tokens), score_from) - 1, 0)
        try:
            _, lps = await m.step(rid, start, tokens[start:], 0, True, False)
        except RewindUnsupported:  # a rotated sliding window: replay from the start
            start = 0
            _, lps = await m.step(rid, 0, tokens, 0, True, False)
        fed[m.name] = list(tokens)
        return lps[score_from - (start + 1):]

    async def _propose(self, m: Member, rid: str, fed: dict, base: list[int], req,
                       own: dict, tail: tuple[list[int], list[float]] | None = None):
        """``m``'s next chunk (cut at a word boundary), written by the member itself in one
        call: it samples each token from its full distribution with its own RNG for the
        request. Records in ``own`` the log-prob of each token it chose, so that scoring its
        own candidate needs no pass.

        ``tail``: the tokens ``m`` wrote past its last candidate's cut, with their log-probs,
        when that candidate won. Where its cache still holds them after ``base`` they open
        this chunk as written (a draw from the member's own distribution, as a new one
        would be; greedy, the very tokens it would write again) and the member writes only
        the rest: the cut costs no forwards twice."""
        n = max(1, min(self.chunk_tokens, self.context_length - len(base)))  # near the end
        kept, kept_lps = tail or ([], [])
        held = fed.get(m.name, [])
        if not kept or len(kept) >= n or held != (base + kept)[:-1]:
            kept, kept_lps = [], []
        full = base + kept
        start = _chunk_start(held, full)
        stops = m.tokenizer.eos_token_ids
        try:
            p = await m.propose(rid, start, full[start:], n - len(kept), req.sampling, stops)
        except RewindUnsupported:  # a rotated sliding window: replay from the start
            p = await m.propose(rid, 0, full, n - len(kept), req.sampling, stops)
        fed[m.name] = (full + p.tokens)[:p.position]  # the last token written is not fed
        tokens, lps = kept + list(p.tokens), list(kept_lps) + list(p.logprobs)
        text = cut_at_word_boundary(m.tokenizer.decode(tokens), p.ended)
        own[m.name] = (text, p.ended, base, tokens, lps, p.end_logprob)
        return text, p.ended

    async def _score(self, m: Member, rid: str, fed: dict, base: list[int], prompt: list[int],
                     done: str, cands: list[tuple[str, bool]], own, copies: dict
                     ) -> list[float]:
        """Per-byte NLL of each candidate under ``m`` (an ending counts as one byte). ``m``'s
        own candidate, where it re-tokenizes to the tokens ``m`` chose (``own``, recorded by
        ``_propose``), is scored from the log-probs it was sampled with: one pass fewer per
        member and round. (Those came one token at a time, a scoring pass computes them
        together: the same function, rounded differently by ONNX Runtime's int8 activations,
        measured up to 0.15 nats on one token and under 0.01 nats per byte of a score.)

        The others are scored on copies of ``m``'s cache, made on the member, which keeps its
        own proposal: whichever candidate wins, the member then holds it, and nobody feeds a
        chunk again. Their passes go to the member together (one call, whatever the number
        of members). ``copies`` gets candidate index -> (copy's request id, its tokens)."""
        out: list = [None] * len(cands)
        passes = []
        for j, (text, complete) in enumerate(cands):
            tokens = prompt + m.tokenizer.encode(done + text, add_special_tokens=False)
            if complete:
                tokens = tokens + [min(m.tokenizer.eos_token_ids)]
            start = common_prefix(base, tokens)  # re-tokenisation may reach back into done
            covered = m.tokenizer.decode(tokens[start:], skip_special_tokens=True)
            lps = _own_logprobs(own, text, complete, base, tokens, start)
            if lps is not None:
                out[j] = nll_per_byte(lps, covered, 1 if complete else 0)
                continue
            # the tokens it shares with m's own proposal: their log-probs are the proposal's
            shared = _shared_with_own(own, base, tokens, start, fed.get(m.name, []))
            sid = f"{rid}~{next(self._copy_ids)}"
            at = max(min(common_prefix(fed.get(m.name, []), tokens), start + len(shared))
                     - 1, 0)
            copies[j] = (sid, tokens)
            passes.append((j, start, at, covered, complete, shared,
                           m.step(sid, at, tokens[at:], 0, True, False,
                                  copy_from=rid if at else "")))
        results = await asyncio.gather(*(p[-1] for p in passes), return_exceptions=True)
        for (j, start, at, covered, complete, shared, _), res in zip(passes, results):
            if isinstance(res, BaseException):
                raise res
            lps = shared + res[1][start + len(shared) - (at + 1):]
            out[j] = nll_per_byte(lps, covered, 1 if complete else 0)
        return out

    async def _pick(self, req: GenerationRequest, members: list[Member], prompts: dict,
                    ids: dict):
        """``ids``: each member's request holding its proposal (a copy, once it scored the
        winner on one)."""
        rid = ids[members[0].name]
        fed: dict[str, list[int]] = {}
        done, produced = "", 0
        primary = self.tokenizer
        tails: dict = {}  # member -> the tokens it wrote past its winning candidate's cut
        weights = await self._weights(members, prompts, rid, fed)
        while True:
            alive = [m for m in members if m in self.members]
            if not alive:
                raise EngineUnavailable("every ensemble member is lost", retry_after=30.0)
            bases = {m.name: prompts[m.name] + (m.tokenizer.encode(
                done, add_special_tokens=False) if done else []) for m in alive}
            own: dict = {}
            proposals = await self._all(alive, lambda m: self._propose(
                m, ids[m.name], fed, bases[m.name], req, own, tails.get(m.name)))
            cands = list(dict.fromkeys(p for _, p in proposals))  # unique, member order
            alive = [m for m, _ in proposals]
            copies: dict = {m.name: {} for m in alive}
            win = None
            try:
                scores = await self._all(alive, lambda m: self._score(
                    m, ids[m.name], fed, bases[m.name], prompts[m.name], done, cands,
                    own.get(m.name), copies[m.name]))
                total = sum(weights[m.name] for m, _ in scores)
                nll = [sum(weights[m.name] * s[j] for m, s in scores) / total
                       for j in range(len(cands))]
                win = int(np.argmin(nll))
            finally:
                mine = {m.name: cands.index(own[m.name][:2]) for m in alive
                        if m.name in own and own[m.name][:2] in cands}
                await self._keep_winner(alive, ids, fed, copies, win, mine)
            text, complete = cands[win]
            log.debug("pick: %s", ", ".join(f"{c[0]!r}={v:.3f}"
                                            for c, v in zip(cands, nll)))
            done += text
            tails = {m.name: _past_cut(own[m.name], m.tokenizer) for m in alive
                     if mine.get(m.name) == win}
            toks = primary.encode(text, add_special_tokens=False) if text else []
            for t in toks:
                produced += 1
                last = produced >= req.max_tokens
                yield TokenStep(t, finish_reason="length" if last else None)
                if last:
                    return
            if complete or not text:
                yield TokenStep(min(primary.eos_token_ids), finish_reason="stop")
                return

    async def _keep_winner(self, alive: list[Member], ids: dict, fed: dict, copies: dict,
                           win: int | None, mine: dict) -> None:
        """After a round: a member that scored the winning candidate on a copy of its cache
        goes on from that copy (its old request ends), unless the winner is its own proposal,
        which its cache holds already; every other copy ends."""
        ends = []
        for m in alive:
            for j, (sid, tokens) in copies.get(m.name, {}).items():
                if j == win and mine.get(m.name) != win:
                    ends.append((m, ids[m.name]))
                    ids[m.name], fed[m.name] = sid, list(tokens)
                else:
                    ends.append((m, sid))
        if ends:
            await asyncio.gather(*(m.end(i) for m, i in ends), return_exceptions=True)

    # ---- words: a word-level mixture across vocabularies ---------------------------------

    async def _propose_word(self, m: Member, rid: str, fed: dict, base: list[int], req,
                            words: int = 1, openings: dict | None = None):
        """``m``'s next ``words`` words (each its leading space, then non-space characters),
        sampled from ``m`` alone and written by the member in one call: ``(text, complete,
        tokens, logprob, n)``; complete when ``m`` ended the text instead; ``tokens`` are
        ``m``'s own for exactly that text (None when it ends inside one of its tokens) and
        ``logprob`` their log-probability under ``m`` (None then too); ``n`` the words in
        ``text`` (fewer than asked where ``m`` ended, or reached the token cap); the call is
        ``_open_run``'s (a member whose word, or scored word, won goes on from its kept
        logits). ``openings`` gets ``m``'s opening distribution's most likely tokens
        (``OPEN_TOP``), token -> log-prob."""
        p, fed[m.name] = await self._open_run(m, rid, fed.get(m.name) or [], base, req,
                                              words, False,
                                              open_top=OPEN_TOP if openings is not None else 0)
        if openings is not None:
            openings[m.name] = dict(p.opening)
        return _written_words(m.tokenizer, p.tokens, p.logprobs, p.ended, words)

    async def _propose_run(self, m: Member, rid: str, fed: dict, base: list[int], req,
                           words: int, openings: dict) -> list[tuple]:
        """Greedy: ``m``'s next ``words`` words, written in one call, as the proposals that
        one call a word would have brought: ``(text, complete, tokens, logprob)`` each (see
        ``_propose_word``; ``_run_words``). ``openings`` as there (the first word's)."""
        if words == 1:
            return [(await self._propose_word(m, rid, fed, base, req, 1, openings))[:4]]
        p, fed[m.name] = await self._open_run(m, rid, fed.get(m.name) or [], base, req,
                                              words, False, open_top=OPEN_TOP)
        openings[m.name] = dict(p.opening)
        return _run_words(m.tokenizer, p.tokens, p.logprobs, p.ended)

    def _run_of(self, drawn: list[str], req, produced: int, by_name: dict
                ) -> tuple[int, bool]:
        """The run of words the first member drawn writes next, and whether it hands over:
        another member follows it, and begins during the run's last word (not when both
        are in this process, where they would share the cores: 4-7% slower, measured)."""
        run = next((i for i, n in enumerate(drawn) if n != drawn[0]), len(drawn))
        whole = run < len(drawn) and run <= RUN_WORDS and \
            run <= req.max_tokens - produced  # (a word: a token at least)
        writer, follower = by_name.get(drawn[0]), by_name.get(drawn[run]) if whole else None
        run = min(run, RUN_WORDS, max(req.max_tokens - produced, 1))
        return run, HAND_OVER and writer is not None and follower is not None and \
            writer.word_lead and not (writer.in_process and follower.in_process)

    async def _open_run(self, m: Member, rid: str, held: list[int], base: list[int], req,
                        words: int, split: bool, copy_from: str = "", open_top: int = 0):
        """A run's first call to ``m``: its ``words`` words from ``base`` or, ``split``, the
        first ``words - 1`` and the first token of the last one (written, not fed). With
        ``copy_from``, on a new request ``rid`` copied from that one's cache. Returns the
        proposal and the tokens ``m``'s cache holds after it. A member whose cache ends at
        ``base`` starts from the logits it kept there, without a forward; one whose cache
        holds another continuation feeds the tokens it lacks in the first forward."""
        if held == base and not copy_from:
            start, feed = len(base), []
        else:
            start = min(common_prefix(held, base), len(base) - 1)
            feed = base[start:]
        stops = m.tokenizer.eos_token_ids
        asked = words - 1 if split else words
        room = self.context_length - len(base)
        kw = dict(word=True, words=asked) if asked else {}
        if open_top:
            kw["open_top"] = open_top
        cap = max(1, min(WORD_TOKENS * asked, room)) if asked else 1  # never past the end
        try:
            p = await m.propose(rid, start, feed, cap, req.sampling, stops, copy_from=copy_from,
                                **kw)
        except RewindUnsupported:  # a rotated sliding window: replay from the start
            if copy_from:
                raise
            p = await m.propose(rid, 0, base, cap, req.sampling, stops, **kw)
        return p, (base + p.tokens)[:p.position]

    async def _sampled_run(self, req, alive: list[Member], drawn: list[str], ids: dict,
                           fed: dict, hist: dict, produced: int, ahead: dict):
        """The next run of sampled words: ``(member, (text, complete, tokens, logprob, n))``
        for the member drawn first, or None when it was lost.

        A run that another member's follows is a hand-over: its writer first writes all but
        its last word and that word's first token (not fed); then, together, it finishes
        the word (``lead``: the token it was given begins it) while the next writer begins
        its own run as if the word were that one token (most are), on a copy of its cache.
        When the word was that token, the next run has begun (``ahead`` holds it) and the
        last word's forward and the next writer's first one ran at once instead of one
        after the other; when it went on, the copy is dropped, and its draws with it (it
        drew from a copy of its member's random state): the text is the same either way."""
        by_name = {m.name: m for m in alive}
        m = by_name[drawn[0]]
        run, split = self._run_of(drawn, req, produced, by_name)
        base = hist[m.name]
        opened = None
        nxt = ahead.get("next")
        if nxt is not None:  # the next run, begun during the last one
            mine = (nxt["name"], nxt["words"], nxt["split"], nxt["base"]) == \
                (m.name, run, split, base)
            try:
                got = await nxt["task"]
            except Exception:  # (it was a guess: the run begins again below)
                log.debug("a hand-over's next run failed", exc_info=True)
                got = None
            # taken off only now: a request ended while it waited (its client gone) still
            # finds it there, and ends the copy it made (``_drop_ahead``)
            del ahead["next"]
            if mine and got:
                (_, (opened, held)), = got
                old, ids[m.name], fed[m.name] = ids[m.name], nxt["sid"], held
                _later(ahead, m.end(old))  # (not on the way: the next call goes now)
            else:
                _later(ahead, nxt["member"].end(nxt["sid"]))
        if opened is None:
            got = await self._all([m], lambda m: self._open_run(
                m, ids[m.name], fed.get(m.name) or [], base, req, run, split), some=False)
            if not got:
                return None
            (_, (opened, fed[m.name])), = got
        tokens, lps = list(opened.tokens), list(opened.logprobs)
        written = m.tokenizer.decode(tokens)
        begun = split and tokens and not opened.ended and \
            len(fed[m.name]) + 2 <= self.context_length and (
                run == 1 or first_words(run - 1).match(written) is not None)
        if not begun:  # the whole run (or it ended, or reached the token cap)
            return m, _written_words(m.tokenizer, tokens, lps, opened.ended,
                                     run - 1 if split and run > 1 else run)
        # the last word: its writer finishes it while the next writer begins from it
        after = drawn[run:]
        follower = by_name.get(after[0])
        later = produced + len(self.tokenizer.encode(written, add_special_tokens=False))
        if follower is not None and len(WORD.findall(written)) == run and \
                later < req.max_tokens:
            frun, fsplit = self._run_of(after, req, later, by_name)
            fbase = hist[follower.name] + follower.tokenizer.encode(written,
                                                                    add_special_tokens=False)
            sid = f"{ids[follower.name]}~{next(self._copy_ids)}"
            held, src = list(fed.get(follower.name) or []), ids[follower.name]
            ahead["next"] = {
                "name": follower.name, "member": follower, "words": frun, "split": fsplit,
                "base": fbase, "sid": sid, "assumed": written,
                "task": asyncio.ensure_future(self._all([follower], lambda f: self._open_run(
                    f, sid, held, fbase, req, frun, fsplit, copy_from=src), some=False))}
        pos = len(fed[m.name])
        cap = max(1, min(WORD_TOKENS, self.context_length - pos - 1))
        got = await self._all([m], lambda m: m.propose(
            ids[m.name], pos, tokens[-1:], cap, req.sampling, m.tokenizer.eos_token_ids,
            word=True, lead=1), some=False)
        if not got:
            _later(ahead, _drop_ahead(ahead))
            return None
        (_, rest), = got
        fed[m.name] = (fed[m.name] + tokens[-1:] + rest.tokens)[:rest.position]
        out = _written_words(m.tokenizer, tokens + rest.tokens, lps + rest.logprobs,
                             rest.ended, run)
        if ahead.get("next") is not None and (out[0] != ahead["next"]["assumed"] or out[1]):
            # the word went on: the next writer begins again (its copy ends once it is back)
            _later(ahead, _drop_ahead(ahead))
        return m, out

    async def _word_logprobs(self, m: Member, rid: str, fed: dict, hist: list[int],
                             cands, known: dict, opening: dict | None = None) -> list[float]:
        """log P_m(candidate | its history) for each candidate (an ending is a token too).
        ``known``: candidates whose log-prob ``m`` already has (the word it proposed, along
        the tokens it wrote). ``opening``: the most likely first tokens of ``m``'s proposal
        from ``hist``, token -> log-prob: a candidate that is one of them, as one token in
        ``m``'s tokens, is scored from it, without a pass, and the cache stays on ``m``'s own
        word (the next proposal feeds the candidate, should it win, in its first forward).
        Otherwise a pass scores it, and the member keeps the logits after the word it scored
        last, for the next word should that one win."""
        out = []
        for text, complete in cands:
            if (text, complete) in known:
                out.append(known[(text, complete)])
                continue
            tokens = hist + m.tokenizer.encode(text, add_special_tokens=False)
            if complete:
                tokens = tokens + [min(m.tokenizer.eos_token_ids)]
            if len(tokens) == len(hist):  # nothing new (an empty candidate): certain
                out.append(0.0)
                continue
            if len(tokens) == len(hist) + 1 and opening and tokens[-1] in opening:
                out.append(opening[tokens[-1]])
                continue
            lps = await self._sync(m, rid, fed, tokens, score_from=len(hist))
            out.append(float(sum(lps)))
        return out

    async def _words(self, req: GenerationRequest, members: list[Member], prompts: dict,
                     ids: dict):
        # sampled: the next run, begun on a copy (``_sampled_run``), and the caches being
        # ended off the request's way, which its end waits for
        ahead: dict = {}
        steps = self._word_steps(req, members, prompts, ids, ahead)
        try:
            async for step in steps:
                yield step
        finally:
            await cleanup(steps.aclose(), _drop_ahead(ahead), _ended(ahead))

    async def _word_steps(self, req: GenerationRequest, members: list[Member], prompts: dict,
                          ids: dict, ahead: dict):
        """Each step adds one word from the mixture sum_i w_i P_i(word | text). Sampled: a
        member is drawn by weight and its own next word taken, which is exactly a draw from
        the mixture; the draws are made ahead, and a member drawn for several words in a row
        writes them in one call (a run; the next run's writer begins during the last word,
        ``_sampled_run``). Greedy: every member proposes its likeliest word and the
        candidate with the highest mixture probability wins (the argmax over the members'
        proposals).
        Each member keeps its own token history: the proposer of the chosen word keeps the
        tokens it wrote, the others append their tokenization of the word."""
        rid = ids[members[0].name]
        hist = {m.name: list(prompts[m.name]) for m in members}
        fed: dict[str, list[int]] = {}
        draw = np.random.default_rng(req.sampling.seed)
        drawn: list[str] = []  # sampled: the members drawn for the next words, in order
        produced = 0
        ahead_words = 1  # greedy: the words each member proposes in the next round
        eos = min(self.tokenizer.eos_token_ids)
        scores = None
        weights = await self._weights(members, prompts, rid, fed)
        if req.score_prompt is not None:
            scores = await self._word_prompt_scores(req, members, prompts, rid, weights)
            fed.update({m.name: list(prompts[m.name]) for m in members})
        while True:
            alive = [m for m in members if m in self.members]
            if not alive:
                raise EngineUnavailable("every ensemble member is lost", retry_after=30.0)
            w = np.asarray([weights[m.name] for m in alive], dtype=np.float64)
            w = w / w.sum()
            if req.sampling.temperature > 0:
                # the members of the next words, drawn ahead in order (a draw does not
                # depend on the text): a run of one member's draws is one call that writes
                # that many words, each word still taking one draw
                names = [m.name for m in alive]
                drawn = [n for n in drawn if n in names]  # a lost member's draws go
                while len(drawn) < 2 * RUN_WORDS:  # (the next run's too)
                    drawn.append(names[int(draw.choice(len(alive), p=w))])
                got = await self._sampled_run(req, alive, drawn, ids, fed, hist, produced,
                                              ahead)
                if got is None:  # that member was lost: its draws go, the rest's stay
                    continue
                m, (text, complete, _, _, n) = got
                proposals = [got]
                del drawn[:n]
            else:
                openings: dict = {}
                run = min(ahead_words, max(req.max_tokens - produced, 1))
                runs = await self._all(alive, lambda m: self._propose_run(
                    m, rid, fed, hist[m.name], req, run, openings))
                if not all(units for _, units in runs):
                    ahead_words = 1  # a run cut by the context's end before a word ended
                    continue
                agreed = 0  # the first words every member wrote the same
                while all(len(u) > agreed for _, u in runs) and \
                        len({u[agreed][:2] for _, u in runs}) == 1:
                    agreed += 1
                if agreed:  # each member's own tokens for them, as word-by-word
                    first = runs[0][1][:agreed]
                    text, complete = "".join(u[0] for u in first), first[-1][1]
                    proposals = [(m, (text, complete, _joined(m.tokenizer, u[:agreed]),
                                      None, agreed)) for m, u in runs]
                else:  # they part at the first word: scored from here
                    proposals = [(m, u[0] + (1,)) for m, u in runs]
                # a whole run taken: the next goes further; else the next round is one word
                # (where they parted after some agreed words, that word, proposed again so
                # that its proposal brings the opening that scores it)
                ahead_words = min(2 * run, GREEDY_RUN) if agreed >= run else 1
                cands = list(dict.fromkeys((t, c) for _, (t, c, _, _, _) in proposals))
                if len(cands) == 1:  # every member wants the same words
                    text, complete = cands[0]
                else:
                    alive = [m for m, _ in proposals]
                    w = np.asarray([weights[m.name] for m in alive], dtype=np.float64)
                    w = w / w.sum()
                    known = {m.name: {(t, c): lp} for m, (t, c, _, lp, _) in proposals
                             if lp is not None}
                    lps = await self._all(alive, lambda m: self._word_logprobs(
                        m, rid, fed, hist[m.name], cands, known.get(m.name, {}),
                        openings.get(m.name)))
                    by = {m.name: s for m, s in lps}
                    mixed = [float(np.logaddexp.reduce(
                        np.log(w) + np.array([by[m.name][j] for m in alive])))
                        for j in range(len(cands))]
                    text, complete = cands[int(np.argmax(mixed))]
            own = {m.name: toks for m, (t, c, toks, _, _) in proposals
                   if (t, c) == (text, complete) and toks is not None}
            new = {}
            for m in members:
                new[m.name] = own.get(m.name)
                if new[m.name] is None:
                    new[m.name] = m.tokenizer.encode(text, add_special_tokens=False)
                hist[m.name] += new[m.name]
            # the API's tokens: the first member's, or, once it is lost, the text in them
            said = new[self._first] if self._first in new else \
                self.tokenizer.encode(text, add_special_tokens=False)
            for t in said:
                produced += 1
                last = produced >= req.max_tokens
                step = TokenStep(t, finish_reason="length" if last else None)
                if scores is not None:
                    step.prompt_scores, scores = scores, None
                yield step
                if last:
                    return
            if complete or not text:
                step = TokenStep(eos, finish_reason="stop")
                if scores is not None:
                    step.prompt_scores = scores
                yield step
                return

    async def _word_prompt_scores(self, req: GenerationRequest, members: list[Member],
                                  prompts: dict, rid: str,
                                  weights: dict[str, float]) -> list[PromptScore]:
        """The prompt scored by the word-level mixture, reported in the first member's tokens.

        Each member scores its own tokenization of the prompt; a token belongs to the
        whitespace-delimited word holding its last non-space character. A word all members
        scored (none of its tokens is a member's first, which has no context) gets the
        mixture's log sum_i w_i P_i(word); its first-member tokens keep their own log-probs,
        the last of them carrying the difference, so a word's tokens sum to the mixture's.
        Top alternatives are the first member's own."""
        text = req.prompt_text
        if text is None:
            text = self.tokenizer.decode(req.prompt_ids, skip_special_tokens=True)
        specials = len(req.prompt_ids) - len(self.tokenizer.encode(
            text, add_special_tokens=False))
        if self.tokenizer.encode(text, add_special_tokens=False) != \
                list(req.prompt_ids)[max(specials, 0):]:
            raise InvalidRequest("a words ensemble scores text: send the prompt as a string "
                                 "(or as its own canonical tokens)", param="prompt")
        words = [(mt.start(), mt.end()) for mt in re.finditer(r"\S+", text)]
        ends = np.array([e for _, e in words] or [0])
        first = members[0]
        if first.name != self._first:
            raise EngineUnavailable("the ensemble's first member, whose tokens a words "
                                    "ensemble scores prompts in, is lost", retry_after=30.0)
        top = req.score_prompt or 0
        results = await self._all(members, lambda m: m.step(
            rid, 0, prompts[m.name], 0, True, want_dist=False,
            score_top=top if m is first else 0))
        per: dict[str, tuple] = {}
        for m, (_, lps) in results:
            ids = prompts[m.name]
            offsets = m.tokenizer.hf.backend_tokenizer.encode(
                text, add_special_tokens=False).offsets
            # the member's prompt may start with special tokens (BOS) that have no text
            lead = len(ids) - len(offsets)
            word_of = [None] * len(ids)
            for k, (s, e) in enumerate(offsets):
                if e > s:
                    last = e - 1
                    while last > s and text[last].isspace():
                        last -= 1
                    word_of[lead + k] = min(int(np.searchsorted(ends, last, side="right")),
                                            len(words) - 1)
            token_lps = [None] + [s.logprob if isinstance(s, PromptScore) else s for s in lps]
            word_lp = np.zeros(len(words))
            unscored = set()
            for k, wd in enumerate(word_of):
                if wd is None:
                    continue
                if token_lps[k] is None:
                    unscored.add(wd)
                else:
                    word_lp[wd] += token_lps[k]
            per[m.name] = (word_of, word_lp, unscored, lps)
        alive = [m for m, _ in results]
        w = np.asarray([weights[m.name] for m in alive], dtype=np.float64)
        w = np.log(w / w.sum())
        word_of, own, _, first_lps = per[first.name]
        skip = set().union(*(per[m.name][2] for m in alive))
        out = [PromptScore(s.logprob, list(s.top)) if isinstance(s, PromptScore)
               else PromptScore(float(s), []) for s in first_lps]
        last_token = {}
        for k, wd in enumerate(word_of):
            if wd is not None and k >= 1:
                last_token[wd] = k
        for wd, k in last_token.items():
            if wd in skip:
                continue
            mixed = float(np.logaddexp.reduce(w + np.array([per[m.name][1][wd]
                                                            for m in alive])))
            out[k - 1].logprob += mixed - float(own[wd])
        return out

    async def close(self) -> None:
        if self._rejoiner is not None:
            self._rejoiner.cancel()
        for m in self.members:
            await m.close()
        if self._cleanup is not None:
            self._cleanup()


def _written_words(tokenizer, out: list[int], lps: list[float], ended: bool, words: int):
    """A words proposal's tokens (the last one begins the next word, unless ``ended``) as
    ``(text, complete, tokens, logprob, n)``: see ``EnsembleEngine._propose_word``."""
    written = tokenizer.decode(out)
    n = max(1, min(words, len(WORD.findall(written))))  # each word took one draw
    if ended:
        return written, True, list(out), None, n
    for k in range(words, 0, -1):  # the next word has begun: these are whole
        whole = first_words(k).match(written)
        if whole:  # (the extra token is dropped)
            text = whole.group(0)
            own = out[:-1] if tokenizer.decode(out[:-1]) == text else None
            return text, False, own, (sum(lps[:-1]) if own is not None else None), k
    return written, False, list(out), sum(lps), n  # the token cap, mid-word


def _run_words(tokenizer, out: list[int], lps: list[float], ended: bool) -> list[tuple]:
    """A greedy run's tokens (several words written in one call) cut where one call a word
    would have stopped: each word's call writes from where the last one's word ends, until
    a token begins the next word (``_written_words``), ``WORD_TOKENS`` tokens, or the end.
    Greedy, those calls write the very tokens the run wrote, so each word is the proposal
    such a call brings: ``(text, complete, tokens, logprob)``. The list stops after a word
    whose tokens do not end where it does (the next call would go on from its
    re-tokenization, not from the tokens the run wrote) and before a word the run did not
    finish."""
    units, s = [], 0
    while s < len(out):
        for i in range(s, min(s + WORD_TOKENS, len(out))):
            if first_words(1).match(tokenizer.decode(out[s:i + 1])):
                u = _written_words(tokenizer, out[s:i + 1], lps[s:i + 1], False, 1)
                break
        else:
            if s + WORD_TOKENS <= len(out):  # a word's cap, mid-word
                i = s + WORD_TOKENS
                u = _written_words(tokenizer, out[s:i], lps[s:i], False, 1)
            elif ended:
                return units + [_written_words(tokenizer, out[s:], lps[s:], True, 1)[:4]]
            else:
                return units  # the run's own cap, mid-word
        units.append(u[:4])
        if u[2] is None:
            return units
        s += len(u[2])
    if ended:  # the text ended where a word did
        units.append(_written_words(tokenizer, [], [], True, 1)[:4])
    return units


def _joined(tokenizer, units: list[tuple]) -> list[int]:
    """The tokens a member appends for the words ``units`` (``_run_words``): its own, and
    the last word's re-tokenization where its own do not end with it."""
    *whole, last = units
    return [t for u in whole for t in u[2]] + (
        last[2] if last[2] is not None else tokenizer.encode(last[0], add_special_tokens=False))


def _chunk_start(held: list[int], full: list[int]) -> int:
    """Where a pick member's chunk starts feeding ``full``, its cache holding ``held``: at
    ``full``'s end where the cache ends there (the copy that scored the winning candidate
    keeps the logits after it, and the chunk starts from them: a member whose candidate
    lost fed the winner's last token again, a forward a round, before), else where they
    part, or at the last token (written, not fed)."""
    if held == full:
        return len(full)
    return min(common_prefix(held, full), len(full) - 1)


def _drop_ahead(ahead: dict):
    """End a hand-over's next run, begun on a copy, once its call is back (a coroutine)."""
    nxt = ahead.pop("next", None)

    async def drop():
        if nxt is not None:
            await asyncio.gather(nxt["task"], return_exceptions=True)
            await nxt["member"].end(nxt["sid"])

    return drop()


def _later(ahead: dict, *aws) -> None:
    """Run ``aws`` off the request's way (ending a cache it no longer needs); the request's
    end waits for them (``_ended``)."""
    ahead["ending"] = [t for t in ahead.get("ending", ()) if not t.done()] + [detach(*aws)]


async def _ended(ahead: dict) -> None:
    await asyncio.gather(*ahead.pop("ending", []), return_exceptions=True)


def _shared_with_own(own, base: list[int], tokens: list[int], start: int,
                     held: list[int]) -> list[float]:
    """The log-probs of the first tokens of ``tokens[start:]`` that a member's own proposal
    (``own``, from ``base``) wrote too, as it wrote them: a candidate that starts as the
    member's own does is scored only from where they part. At most up to where the member's
    cache holds the proposal (``held``), so that a copy cut back there can score the rest,
    and never the candidate's last token (the pass scores at least one)."""
    if own is None or start != len(base) or own[2] != base:
        return []
    o_out, o_lps = own[3], own[4]
    k = common_prefix(o_out[:len(o_lps)], tokens[start:])
    k = min(k, len(held) - start, len(tokens) - start - 1)
    return list(o_lps[:k]) if k > 0 else []


def _past_cut(own, tokenizer) -> tuple[list[int], list[float]] | None:
    """The tokens of a member's proposal (``own``) past its candidate's cut, with their
    log-probs; None where the candidate ended it or is not a prefix of its tokens."""
    text, complete, _, tokens, lps = own[:5]
    if complete:
        return None
    for j in range(len(tokens) - 1, 0, -1):
        if tokenizer.decode(tokens[:j]) == text:
            return tokens[j:], lps[j:]
    return None


def _own_logprobs(own, text: str, complete: bool, base: list[int], tokens: list[int],
                  start: int) -> list[float] | None:
    """The log-probs of ``tokens[start:]`` from a member's own proposal, when the candidate
    is that proposal and re-tokenizes to the tokens it chose; None otherwise."""
    if own is None:
        return None
    o_text, o_complete, o_base, o_out, o_lps, o_end = own
    if (text, complete) != (o_text, o_complete) or start != len(base) or base != o_base:
        return None
    body = tokens[start:len(tokens) - 1] if complete else tokens[start:]
    if body != o_out[:len(body)] or (complete and len(body) != len(o_out)):
        return None
    lps = o_lps[:len(body)] + ([o_end] if complete else [])
    return None if any(lp is None for lp in lps) else lps


def _padded(rows: np.ndarray, vocab: int) -> np.ndarray:
    """A member's rows widened to ``vocab`` (ids past its own vocabulary: impossible)."""
    if rows.shape[1] >= vocab:
        return rows
    return np.pad(rows, [(0, 0), (0, vocab - rows.shape[1])], constant_values=-np.inf)


def _product_scores(members: list[tuple[float, np.ndarray]], targets: list[int],
                    top_n: int) -> list[PromptScore]:
    """A product of experts' scores of ``targets`` from each member's (weight, log-prob rows
    (len(targets), V)): every row mixed as ``mix(..., "logprob")`` mixes a decode step's."""
    weights = [w for w, _ in members]
    out = []
    for j, target in enumerate(targets):
        row = mix([x[j] for _, x in members], weights, "logprob")
        best = []
        if top_n:
            best = top_ids(row, top_n)
            best = best[np.argsort(-row[best], kind="stable")]
        out.append(PromptScore(float(row[target]), [(int(t), float(row[t])) for t in best]))
    return out


def _mixed_scores(members: list[tuple[float, list[PromptScore]]], prompt_ids: list[int],
                  top_n: int) -> list[PromptScore]:
    """A probability mixture's prompt scores from its members' (weight, PromptScores).

    The prompt token's mixture log-prob is exact: log sum_i w_i p_i(token). The top
    alternatives are ranked over the union of the members' own top candidates, a member's
    probability of a candidate outside its list counted as 0 (a lower bound, exact for a
    candidate every member lists)."""
    w = np.asarray([x for x, _ in members], dtype=np.float64)
    w = w / w.sum()
    out = []
    if len(prompt_ids) < 2:
        return out
    for j, target in enumerate(prompt_ids[1:]):
        rows = [s[j] for _, s in members]
        lp = float(np.logaddexp.reduce(np.log(w) + np.array([r.logprob for r in rows])))
        probs: dict[int, float] = {}
        for wi, r in zip(w, rows):
            seen = dict(r.top)
            seen.setdefault(int(target), r.logprob)
            for t, v in seen.items():
                probs[t] = probs.get(t, 0.0) + wi * float(np.exp(v))
        best = sorted(probs.items(), key=lambda kv: -kv[1])[:top_n]
        top = [(t, lp if t == int(target) else float(np.log(p))) for t, p in best]
        out.append(PromptScore(lp, top))
    return out


def _member_cost(m: Member, needs: list[dict]) -> int:
    """What the caches of requests with ``needs`` (``EnsembleEngine._need``) take on ``m``."""
    return m.kv_cost([n for need in needs for n in need.get(m.name, ())])
