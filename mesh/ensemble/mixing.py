"""Ensemble arithmetic as pure functions: mixing distributions, weights from perplexity,
top-k compression, candidate chunks and their per-byte scores."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from mesh.engine.sampling import top_ids

# a word: its leading whitespace, then non-space characters
WORD = re.compile(r"\s*\S+")


@functools.lru_cache(maxsize=64)
def first_words(n: int) -> re.Pattern:
    """Matches a text's first ``n`` words once they are whole: the next one has begun."""
    return re.compile(r"\s*\S+(?:\s+\S+){%d}(?=\s)" % (max(n, 1) - 1))


@dataclass
class Dist:
    """A member's next-token log-probabilities: full, or top-k plus the remaining mass."""

    full: np.ndarray | None = None  # (V,) float32
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    rest_logprob: float = -math.inf

    def dense(self, vocab: int) -> np.ndarray:
        """(V,) log-probabilities; outside the top-k the rest mass is spread evenly."""
        if self.full is not None:
            return self.full
        out = np.full(vocab, -np.inf, dtype=np.float32)
        others = vocab - len(self.top_ids)
        if others > 0 and np.isfinite(self.rest_logprob):
            out[:] = self.rest_logprob - math.log(others)
        out[self.top_ids] = self.top_logprobs
        return out


def compress(logprobs: np.ndarray, k: int) -> Dist:
    """Top-k of a full distribution plus the log of the mass left out."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return Dist(full=logprobs.astype(np.float32, copy=False))
    idx = top_ids(logprobs, k)
    top = logprobs[idx]
    kept = float(np.exp(top.astype(np.float64)).sum())
    rest = math.log(max(1.0 - kept, 1e-30))
    return Dist(top_ids=idx.astype(np.int32), top_logprobs=top.astype(np.float32),
                rest_logprob=rest)


def mix(dists: list[np.ndarray], weights: list[float], mode: str = "prob") -> np.ndarray:
    """Mixture log-probabilities (V,): ``prob`` = log sum_i w_i p_i (a true mixture);
    ``logprob`` = normalised sum_i w_i log p_i (a product of experts).

    In float32, the members' own precision: it runs on every token of a merge, between the
    members' replies and the next step, and float64 took ~4x as long (1.5 vs 0.4 ms for two
    49,152-entry distributions); the two agree within 1e-5 (``tests/test_ensemble.py``)."""
    w = np.asarray(weights, dtype=np.float64)
    w = (w / w.sum()).astype(np.float32)
    stack = np.stack([np.asarray(d, dtype=np.float32) for d in dists])  # (M, V), a copy
    if mode == "prob":
        m = stack.max(axis=0)
        m[~np.isfinite(m)] = 0.0  # ruled out by every member: stays -inf below
        stack -= m
        np.exp(stack, out=stack)
        out = w @ stack
        with np.errstate(divide="ignore"):
            np.log(out, out=out)
        out += m
        return out
    if mode == "logprob":
        stack[np.isneginf(stack)] = -1e30  # ruled out by one member: ruled out
        s = w @ stack
        top = s.max()
        return s - (top + np.float32(np.log(np.exp(s - top).sum(dtype=np.float64))))
    raise ValueError(f"unknown mixing mode {mode!r}")


def perplexity_weights(mean_nlls: list[float], temperature: float = 1.0) -> list[float]:
    """PackLLM-style test-time weights: softmax of -log(perplexity) / temperature, i.e. a
    member that predicts the prompt better gets more weight."""
    x = -np.asarray(mean_nlls, dtype=np.float64) / max(temperature, 1e-6)
    x -= x.max()
    w = np.exp(x)
    return (w / w.sum()).tolist()


def cut_at_word_boundary(text: str, complete: bool) -> str:
    """A proposed chunk ends at a word boundary where possible: drop a trailing partial word
    unless the proposal is complete (it ended with a stop token) or is one word."""
    if complete:
        return text
    cut = max(text.rfind(" "), text.rfind("\n"))
    return text[:cut] if cut > 0 else text


def nll_per_byte(token_logprobs: list[float], text: str, extra_bytes: int = 0) -> float:
    """Negative log-likelihood per UTF-8 byte: comparable across tokenizers. ``extra_bytes``
    counts what has no text (an end-of-turn token counts as one byte)."""
    n = len(text.encode("utf-8")) + extra_bytes
    return -sum(token_logprobs) / max(n, 1)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
