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
from typing import Callable

from mesh.errors import InvalidRequest, Overloaded


class KVBudget:
    """Bytes of KV cache an engine may hold, and how to count them: ``cost(positions)``
    is what caches of those lengths take together (the backends' ``Shard.kv_bytes``);
    ``kept()`` lists the lengths of caches kept for prefix reuse, which ``drop_kept()``
    frees one at a time (least recently used first; False when none is left)."""

    def __init__(self, budget: int, cost: Callable[[list[int]], int],
                 kept: Callable[[], list[int]] = list, drop_kept: Callable[[], bool] = bool):
        self.budget, self.cost, self.kept, self.drop_kept = budget, cost, kept, drop_kept


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

    def reserved_bytes(self) -> int:
        """The KV bytes the running requests may come to, kept caches included."""
        if self.kv is None:
            return 0
        return self.kv.cost(list(self._reserved.values()) + self.kv.kept())

    def _fits(self, positions: int) -> bool:
        if self.running >= self.max_running:
            return False
        if self.kv is None:
            return True
        mine = list(self._reserved.values()) + [positions]
        if self.kv.cost(mine) > self.kv.budget:
            return False
        while self.kv.cost(mine + self.kv.kept()) > self.kv.budget:
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
    async def slot(self, positions: int = 0):
        """Hold one running slot (and room for a KV cache of ``positions`` positions) for
        the body; raise ``Overloaded`` when the queue is full, ``InvalidRequest`` when the
        cache could never fit."""
        self._check_loop()
        if self.kv is not None and self.kv.cost([positions]) > self.kv.budget:
            raise InvalidRequest(
                f"this request may need {_mb(self.kv.cost([positions]))} of KV cache "
                f"({positions} positions: its prompt and max_tokens), more than this "
                f"server's budget of {_mb(self.kv.budget)} (--kv-memory); lower max_tokens "
                f"or shorten the prompt", param="max_tokens")
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
