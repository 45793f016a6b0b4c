"""From token steps to text: incremental detokenization and stop sequences.

Layered like mlx-lm's generate: ``Engine.generate`` yields tokens, ``stream_text`` yields text
deltas with stop handling, the server turns those into OpenAI chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator

from mesh.engine.base import Engine, GenerationRequest, TokenStep
from mesh.models.tokenizer import IncrementalDetokenizer


@dataclass
class TextDelta:
    text: str
    steps: list[TokenStep] = field(default_factory=list)  # tokens whose text this carries
    finish_reason: str | None = None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could still start a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


async def stream_text(engine: Engine, req: GenerationRequest,
                      stop: list[str] | None = None) -> AsyncIterator[TextDelta]:
    """Text deltas for a request; the last delta carries the finish reason.

    A stop string ends generation: its text and anything after it are not returned.
    """
    stops = [s for s in (stop or []) if s]
    detok = IncrementalDetokenizer(engine.tokenizer)
    pending = ""  # decoded text not yet sent (might be the start of a stop string)
    steps: list[TokenStep] = []
    gen = engine.generate(req)
    try:
        async for step in gen:
            steps.append(step)
            if step.finish_reason == "stop" and step.token_id in req.stop_token_ids:
                pending += detok.flush()
            else:
                pending += detok.add(step.token_id)
                if step.finish_reason:
                    pending += detok.flush()
            if stops:
                hits = [(pending.find(s), s) for s in stops if s in pending]
                if hits:
                    yield TextDelta(pending[:min(hits)[0]], steps, "stop")
                    return
            if step.finish_reason:
                yield TextDelta(pending, steps, step.finish_reason)
                return
            keep = _held_back(pending, stops) if stops else 0
            if len(pending) > keep:
                yield TextDelta(pending[:len(pending) - keep], steps)
                pending, steps = pending[len(pending) - keep:], []
    finally:
        await gen.aclose()
