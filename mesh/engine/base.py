"""The engine interface the server and generation loop see, whatever runs the model."""

from __future__ import annotations

import abc
import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from mesh.engine.sampling import SamplingParams, top_ids
from mesh.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    # the request as text, for engines whose members tokenize differently (ensemble pick)
    messages: list[dict] | None = None
    prompt_text: str | None = None
    # a grammar the output must follow (structured outputs, tool calls): the sampler masks
    # every token it does not allow; a mesh.engine.constraint.Constraint
    constraint: object | None = None
    # score the prompt: each position's next prompt token's log-prob and this many of the
    # most likely alternatives, returned on the first step (None: no scoring)
    score_prompt: int | None = None
    # set by the engine: prompt tokens whose KV it took from an earlier request's cache
    # (OpenAI's usage.prompt_tokens_details.cached_tokens)
    cached_tokens: int = 0

    def allowed(self, n_logits: int):
        """The grammar's mask for the next token, or None when unconstrained."""
        if self.constraint is None:
            return None
        from mesh.engine.constraint import allowed_from_bitmask

        return allowed_from_bitmask(self.constraint.bitmask(), n_logits)

    def advance(self, token: int) -> None:
        if self.constraint is not None:
            self.constraint.advance(token)

    def longest(self, context_length: int) -> int:
        """The most positions this request's cache can come to: its prompt plus its
        ``max_tokens``, within the context (what a KV budget reserves for it)."""
        return min(context_length, len(self.prompt_ids) + max(self.max_tokens, 1))


@dataclass
class TokenStep:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" for a stop token, "length" at max_tokens
    # on the first step of a request with ``score_prompt``: for prompt tokens 1..n-1, the
    # token's log-prob given the tokens before it and the top alternatives there
    prompt_scores: list[PromptScore] | None = None


@dataclass
class PromptScore:
    logprob: float
    top: list[tuple[int, float]]


# prompt rows log-softmaxed at a time: 8 rows of a 262K vocabulary are 8 MB, which malloc
# reuses from block to block; 32 (32 MB, past its mmap threshold) came as fresh memory
# every block and took 1.2-1.5x as long a row (Gemma 3, in a process holding the model)
SCORE_ROWS = 8


def score_rows(logprobs, targets, top_n: int) -> list[PromptScore]:
    """``PromptScore``s from log-softmaxed rows (T, V) and each row's next token."""
    import numpy as np

    out = []
    for row, target in zip(logprobs, targets):
        top = []
        if top_n:
            idx = top_ids(row, top_n)
            idx = idx[np.argsort(-row[idx], kind="stable")]
            top = [(int(i), float(row[i])) for i in idx]
        out.append(PromptScore(float(row[int(target)]), top))
    return out


def mark_finish(step: TokenStep, n_generated: int, req: GenerationRequest) -> TokenStep:
    """Set ``finish_reason`` on the ``n_generated``-th token (1-based) of ``req``."""
    if step.token_id in req.stop_token_ids:
        step.finish_reason = "stop"
    elif n_generated >= req.max_tokens:
        step.finish_reason = "length"
    return step


class Engine(abc.ABC):
    """LocalEngine, PipelineEngine and EnsembleEngine all look like this."""

    model_id: str
    tokenizer: Tokenizer
    context_length: int
    # whether a grammar (structured outputs, tool calls) can mask this engine's sampling
    supports_constraints: bool = True
    # whether GenerationRequest.score_prompt is honoured (echo + logprobs on completions)
    supports_scoring: bool = False

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenStep]:
        """Yield one step per generated token; the last one carries a finish_reason.

        Closing the iterator early (client gone, stop string) frees the request's caches.
        """

    def info(self) -> dict:
        """Extra metadata for /v1/models."""
        return {}

    async def start(self) -> None:
        """Called once the server's event loop runs (before the first request)."""
        return None

    async def close(self) -> None:
        return None


_CLEANUPS: set = set()


def detach(*aws) -> asyncio.Task:
    """Run ``aws`` (coroutines) to their end, in order, in a task of its own that nothing
    waits for (a cache a request no longer needs, freed off its way); a failed one is
    logged at debug level and the next still runs."""
    async def run():
        for aw in aws:
            try:
                await aw
            except Exception:  # one failed cleanup must not skip the next
                log.debug("cleanup step failed", exc_info=True)

    task = asyncio.ensure_future(run())
    _CLEANUPS.add(task)  # a reference until it is done
    task.add_done_callback(_CLEANUPS.discard)
    return task


async def cleanup(*aws) -> None:
    """Run ``aws`` (coroutines) to their end, in order, even from a task being cancelled.

    A client that goes away cancels Starlette's streaming task through an anyio cancel scope,
    and a cancelled scope cancels every later ``await`` in it again, so a plain ``await`` in
    a ``finally`` never gets to free a node's cache (they leaked until the idle reaper). The
    work runs in a task of its own (``detach``); the caller waits for it unless it is
    cancelled itself."""
    await asyncio.shield(detach(*aws))


class Pending:
    """Cleanups started from synchronous code (a kept cache freed for room while a request
    is admitted), which a request waits for before its first step (so a node has freed the
    room before the step that needs it comes)."""

    def __init__(self):
        self._tasks: set[asyncio.Task] = set()

    def start(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, timeout: float) -> None:
        if self._tasks:  # asyncio.wait: a caller cancelled meanwhile cancels none of them
            await asyncio.wait(set(self._tasks), timeout=timeout)


@dataclass(frozen=True)
class PromptCuts:
    """How a scheduler cuts prompts into forward steps, and how much of a prompt that one
    request fed another may take over without changing its own numbers.

    Where every shard is ``split_invariant`` (a prompt row comes out bit for bit the same
    however the prompt is split, as long as no piece is a single row: ONNX Runtime on the
    CPU, measured), any fed prefix is reused to the token, and no prompt piece is ever one
    row (a one-row matmul rounds differently). Elsewhere only whole ``chunk`` pieces from
    position 0 are reused: the pieces a fresh request computes itself."""

    chunk: int
    any_split: bool = False

    def piece_end(self, fed: int, n: int) -> int:
        """Where the prompt piece that starts at ``fed`` (of ``n`` prompt tokens) ends."""
        end = min(n, fed + self.chunk)
        if self.any_split and n - end == 1 and end - fed > 2:
            end -= 1  # leave two rows, not one, for the last piece
        return end

    def shareable(self, fed: int) -> int:
        """Of the first ``fed`` prompt tokens a request has computed, how many another
        request may take."""
        if self.any_split:
            return fed if fed >= 2 else 0  # a one-token prompt was a one-row piece
        return fed // self.chunk * self.chunk

    def limit(self, n: int) -> int:
        """The most of an ``n``-token prompt taken from elsewhere: at least one token is
        left to feed (its logits give the first token), two where a piece must not be one
        row."""
        if self.any_split:
            return max(0, n - 2)
        return (n - 1) // self.chunk * self.chunk


def longest_kept_prefix(kept, prompt: list[int], cuts: PromptCuts
                        ) -> tuple[tuple | None, int]:
    """Among ``kept`` (token tuples: the prompt starts of requests whose caches can be
    taken), the one sharing the most of ``prompt`` that ``cuts`` lets a request take over,
    and how many tokens that is."""
    import numpy as np

    prompt_arr = np.asarray(prompt, dtype=np.int64)
    limit = cuts.limit(len(prompt_arr))
    best, best_n = None, 0
    for key in kept:
        n = min(len(key), limit)
        if n <= best_n:
            continue
        differ = np.flatnonzero(np.asarray(key[:n], dtype=np.int64) != prompt_arr[:n])
        n = cuts.shareable(int(differ[0]) if differ.size else n)
        if n > best_n:
            best, best_n = key, n
    return best, best_n
