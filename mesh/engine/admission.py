"""Admission: how many requests an engine runs at once, how many wait, and a 429 past that.

Nodes hold one KV cache per running request and refuse more than they can hold; the engine
admits no more than that, so a running request's cache is never evicted to make room. Waiting
requests are admitted in arrival order (asyncio.Semaphore wakes waiters first come, first
served).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from mesh.errors import Overloaded


class Admission:
    def __init__(self, max_running: int, max_queued: int):
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.running = 0
        self.queued = 0
        self._slots: asyncio.Semaphore | None = None
        self._loop = None

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:
            self._slots, self._loop = asyncio.Semaphore(self.max_running), loop
            self.running = self.queued = 0
        return self._slots

    @asynccontextmanager
    async def slot(self):
        """Hold one running slot for the body; raise ``Overloaded`` when the queue is full."""
        slots = self._semaphore()
        if slots.locked() and self.queued >= self.max_queued:
            raise Overloaded(f"{self.running} requests running and {self.queued} waiting, the "
                             f"most this server admits; retry shortly")
        self.queued += 1
        try:
            await slots.acquire()
        finally:
            self.queued -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            slots.release()
