"""Admission: how many requests an engine runs at once, how many wait, and a 429 past that.

Nodes hold one KV cache per running request and refuse more than they can hold; the engine
admits no more than that, so a running request's cache is never evicted to make room. With a
KV budget, a request is also admitted only when the caches of every running request, each at
its longest (its prompt plus its ``max_tokens``), fit in the budget beside its own: the cache
memory never grows past it, whatever the requests write, and a request that could not fit even
alone is refused at once (400). Waiting requests are admitted in arrival order: the first in
line waits for room, the others behind it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable

from mesh.errors import InvalidRequest, Overloaded

KV_AUTO_SHARE = 0.5  # --kv-memory auto: this share of the memory available after loading


def kv_budget_from(kv_memory: int | str | None) -> int | None:
    """``--kv-memory`` in bytes: ``"auto"`` is KV_AUTO_SHARE of the memory available now
    (call it once the model is loaded), None no budget."""
    if kv_memory == "auto":
        import psutil

        return int(psutil.virtual_memory().available * KV_AUTO_SHARE)
    return None if kv_memory is None else int(kv_memory)


@dataclass(frozen=True)
class KVLimit:
    """Bytes of KV cache one place may hold (``where``: this server, a pipeline's node, an
    ensemble's member), and how to count them there: ``cost(needs)`` is what the caches of
    those requests take together (each request's need is what its engine reserves: the
    most positions its cache can hold, or for an ensemble each member's caches)."""

    where: str
    budget: int
    cost: Callable[[list], int]


class KVBudget:
    """The KV limits a request must fit under, every one of them (``limits()``: those of
    now; a pipeline's change with its plan); ``kept()`` lists the lengths of caches kept
    for prefix reuse, which ``drop_kept()`` frees one at a time (least recently used first;
    False when none is left)."""

    def __init__(self, limits: Callable[[], list[KVLimit]],
                 kept: Callable[[], list[int]] = list, drop_kept: Callable[[], bool] = bool):
        self.limits, self.kept, self.drop_kept = limits, kept, drop_kept

    def excess(self, positions: list[int]) -> KVLimit | None:
        """The first limit that caches of ``positions`` would pass, None when they fit."""
        for limit in self.limits():
            if limit.cost(positions) > limit.budget:
                return limit
        return None


class Admission:
    def __init__(self, max_running: int, max_queued: int, kv: KVBudget | None = None):
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.kv = kv
        self._reserved: dict[object, int] = {}  # running request -> its positions at most
        self._waiting: deque = deque()  # (positions, future) in arrival order
        self._loop = None

    @property
    def running(self) -> int:
        return len(self._reserved)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests run several)
            self._loop = loop
            self._reserved, self._waiting = {}, deque()

    def reserved(self) -> dict[str, int]:
        """Under each KV limit, the bytes the running requests may come to, kept caches
        included."""
        if self.kv is None:
            return {}
        held = list(self._reserved.values()) + self.kv.kept()
        return {limit.where: limit.cost(held) for limit in self.kv.limits()}

    def over_budget(self, leaving: int | None = None) -> bool:
        """Whether the running requests at their longest and the kept caches pass a KV
        limit (a cache kept as a request ends must fit beside the others); ``leaving``: the
        positions of a running request that is ending (its cache counts as kept now)."""
        if self.kv is None:
            return False
        live = list(self._reserved.values())
        if leaving in live:
            live.remove(leaving)
        return self.kv.excess(live + self.kv.kept()) is not None

    def _fits(self, positions: int) -> bool:
        if self.running >= self.max_running:
            return False
        if self.kv is None:
            return True
        mine = list(self._reserved.values()) + [positions]
        if self.kv.excess(mine) is not None:
            return False
        while self.kv.excess(mine + self.kv.kept()) is not None:
            if not self.kv.drop_kept():  # kept caches make room: they are only a shortcut
                break
        return True

    def _admit_waiting(self) -> None:
        while self._waiting:
            positions, fut = self._waiting[0]
            if fut.done():  # its caller went away
                self._waiting.popleft()
                continue
            if not self._fits(positions):
                return
            self._waiting.popleft()
            fut.set_result(None)
            self._reserved[fut] = positions

    def _give_back(self, key) -> None:
        self._reserved.pop(key, None)
        self._admit_waiting()

    @asynccontextmanager
    async def slot(self, positions=0):
        """Hold one running slot (and room for a KV cache of ``positions`` positions, or
        whatever need the engine's limits count) for the body; raise ``Overloaded`` when
        the queue is full, ``InvalidRequest`` when the cache could never fit."""
        self._check_loop()
        over = None if self.kv is None else self.kv.excess([positions])
        if over is not None:
            raise InvalidRequest(
                f"this request may need {_mb(over.cost([positions]))} of KV cache on "
                f"{over.where} (its prompt and max_tokens), more than its budget of "
                f"{_mb(over.budget)} (--kv-memory); lower max_tokens or shorten the prompt",
                param="max_tokens")
        fut = asyncio.get_running_loop().create_future()
        if not self._waiting and self._fits(positions):
            self._reserved[fut] = positions
        else:
            if len(self._waiting) >= self.max_queued:
                raise Overloaded(f"{self.running} requests running and {self.queued} waiting,"
                                 f" the most this server admits; retry shortly")
            self._waiting.append((positions, fut))
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():  # admitted as it was cancelled
                    self._give_back(fut)
                else:
                    fut.cancel()
                    try:
                        self._waiting.remove((positions, fut))
                    except ValueError:
                        pass
                    self._admit_waiting()  # the next in line may fit now
                raise
        try:
            yield
        finally:
            self._give_back(fut)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
