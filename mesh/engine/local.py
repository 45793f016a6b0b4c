"""LocalEngine: one or more shards of a model in this process.

All model compute runs on one worker thread (MLX and torch both prefer that), one step at a
time; concurrent requests interleave at step granularity, each with its own caches, so they
never see each other's state. The number of requests holding caches at once is bounded.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Sequence

import numpy as np

from mesh.backends.base import Shard, StepItem
from mesh.engine.base import Engine, GenerationRequest, TokenStep, mark_finish
from mesh.engine.sampling import choose
from mesh.layers import check_covering

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # prompt tokens per forward: bounds activation memory on long prompts


class LocalEngine(Engine):
    def __init__(self, model_id: str, shards: Sequence[Shard], tokenizer, context_length: int,
                 max_concurrent: int = 8):
        check_covering([s.layers for s in shards])
        self.model_id = model_id
        self.shards = list(shards)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-compute")
        self._slots = asyncio.Semaphore(max_concurrent)

    def info(self) -> dict:
        return {"mode": "local", "stages": [str(s.layers) for s in self.shards]}

    def _forward(self, request_id: str, tokens: np.ndarray, caches, all_logits=False):
        x = tokens
        for shard, cache in zip(self.shards, caches):
            x = shard.forward([StepItem(request_id, x, cache, all_logits)])[0]
        return x

    def _step(self, req: GenerationRequest, caches, pending: np.ndarray, history: np.ndarray,
              rng) -> TokenStep:
        """Feed ``pending`` tokens (prompt chunks, then one token) and choose the next."""
        logits = None
        for start in range(0, len(pending), PREFILL_CHUNK):
            logits = self._forward(req.request_id, pending[start:start + PREFILL_CHUNK], caches)
        token, lp, top = choose(logits, history, len(req.prompt_ids), req.sampling, rng)
        return TokenStep(token, lp, top)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenStep]:
        loop = asyncio.get_running_loop()
        async with self._slots:
            caches = [s.new_cache() for s in self.shards]
            rng = np.random.default_rng(req.sampling.seed)
            history = np.array(req.prompt_ids, dtype=np.int32)
            pending = history
            try:
                for i in range(req.max_tokens):
                    step = await loop.run_in_executor(
                        self._executor, self._step, req, caches, pending, history, rng)
                    yield mark_finish(step, i + 1, req)
                    if step.finish_reason:
                        return
                    pending = np.array([step.token_id], dtype=np.int32)
                    history = np.append(history, pending)
            finally:
                caches.clear()  # the request's KV caches go with it

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def build_local_engine(model: str, backend: str | None = None, dtype: str = "auto",
                       context_length: int | None = None, split: int = 1,
                       progress: bool = True) -> LocalEngine:
    """Resolve ``model``, load it with ``backend`` (as ``split`` in-process shards)."""
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
    return LocalEngine(source.name, shards, source.tokenizer, ctx)
