"""Sampling as pure functions on NumPy logits.

``SamplingParams`` carries the OpenAI-style knobs; ``apply_penalties``, ``log_softmax``,
``top_logprobs`` and ``sample`` are pure, so the coordinator, the last pipeline stage and the
ensemble mixer can all use them and tests can check them exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output
    presence_penalty: float = 0.0  # OpenAI style, over output only
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus k alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, bias in [-100, 100])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def apply_penalties(logits: np.ndarray, context_ids: np.ndarray, output_ids: np.ndarray,
                    params: SamplingParams) -> np.ndarray:
    """Logits after repetition (context), presence and frequency (output) penalties."""
    if not params.has_penalties:
        return logits
    out = logits.astype(np.float32, copy=True)
    if params.repetition_penalty != 1.0 and len(context_ids):
        seen = np.unique(context_ids)
        vals = out[seen]
        out[seen] = np.where(vals > 0, vals / params.repetition_penalty,
                             vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and len(output_ids):
        ids, counts = np.unique(output_ids, return_counts=True)
        out[ids] -= params.presence_penalty + params.frequency_penalty * counts
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of the last axis, in float32 (a new array).

    Row by row through one row-sized buffer, the same numbers to the bit as the
    whole-array formula, whose (T, V) temporaries cost more than their arithmetic where
    they come as fresh memory: 32 rows of Gemma 3's 262,144 logits (a block of prompt
    scores) took 19-23 ms that way, 12-15 this way, in a process holding the model."""
    x = np.array(logits, dtype=np.float32)
    if x.size == 0:
        return x
    rows = x.reshape(-1, x.shape[-1])
    rows -= rows.max(axis=-1, keepdims=True)
    tmp = np.empty(rows.shape[-1], dtype=np.float32)
    for row in rows:
        np.exp(row, out=tmp)
        row -= np.log(tmp.sum())
    return x


def picked_logprobs(logits: np.ndarray, ids) -> np.ndarray:
    """``log_softmax(logits)[i, ids[i]]`` for each row i of the (T, V) ``logits``, to the
    bit, without the (T, V) result (a scoring pass wants one entry a row: ~1.9 ms for 8
    rows of Gemma 3's logits, 2.5-2.8 through the whole log-softmax)."""
    x = logits.astype(np.float32, copy=False)
    out = np.empty(len(ids), dtype=np.float32)
    tmp = np.empty(x.shape[-1], dtype=np.float32)
    for i, t in enumerate(ids):
        np.subtract(x[i], x[i].max(), out=tmp)
        at = tmp[t]
        np.exp(tmp, out=tmp)
        out[i] = at - np.log(tmp.sum())
    return out


def top_ids(x: np.ndarray, k: int) -> np.ndarray:
    """The indices of the ``k`` largest entries of the 1-D ``x``, in no order (0 < k). A
    large vocabulary first drops the entries that cannot be among them: the maxima of k
    disjoint blocks are k entries, so the k-th largest is at least the least of them, and
    few entries reach it (numpy's argpartition of the top 64 of Gemma 3's 262,144 entries,
    a proposal's opening on every word, took ~3.5 ms here; this ~0.1 ms)."""
    n = x.shape[-1]
    if k >= n:
        return np.arange(n)
    if n >= 64 * k:
        least = x[:n - n % k].reshape(k, -1).max(axis=1).min()
        if least == least:  # (a NaN anywhere: the plain way)
            near = np.flatnonzero(x >= least)  # at least k: the blocks' maxima
            return near[np.argpartition(-x[near], k - 1)[:k]]
    return np.argpartition(-x, k - 1)[:k]


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens, most likely first."""
    if k <= 0:
        return []
    k = min(k, logprobs.shape[-1])
    idx = top_ids(logprobs, k)
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in idx]


def filter_probs(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Candidate token ids and their renormalised probabilities after temperature, top-k,
    top-p and min-p."""
    x = logits.astype(np.float32, copy=False) / max(params.temperature, 1e-6)
    ids = np.arange(x.shape[-1])
    if 0 < params.top_k < x.shape[-1]:
        ids = top_ids(x, params.top_k)
    vals = x[ids]
    order = np.argsort(-vals, kind="stable")
    ids, vals = ids[order], vals[order]
    probs = np.exp(vals - vals[0])
    probs /= probs.sum()
    if params.min_p > 0.0:
        keep = probs >= params.min_p * probs[0]
        ids, probs = ids[keep], probs[keep]
    if params.top_p < 1.0:
        cum = np.cumsum(probs, dtype=np.float64)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        n = int(np.searchsorted(cum, params.top_p - 1e-7)) + 1
        ids, probs = ids[:n], probs[:n]
    return ids, probs / probs.sum()


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from (already penalised) logits: a draw from ``filter_probs``'s
    distribution, most likely first, with one double from ``rng``.

    Only the head of the order is sorted, as far as the draw (and the top-p prefix) reaches:
    sorting a whole 262K-token vocabulary took ~30 ms a token, more than a forward of Gemma
    3 270M."""
    if params.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float32, copy=False) / max(params.temperature, 1e-6)
    ids = None  # candidate i is token ids[i] (None: token i)
    if 0 < params.top_k < x.shape[-1]:
        ids = top_ids(x, params.top_k)
        x = x[ids]
    w = np.exp(x - x.max())  # unnormalised, the best at 1
    nucleus = (params.top_p - 1e-7) * float(w.sum(dtype=np.float64))  # of the mass before min-p
    if params.min_p > 0.0:
        keep = np.flatnonzero(w >= params.min_p)
        ids, w = (keep if ids is None else ids[keep]), w[keep]
    total = float(w.sum(dtype=np.float64))
    u = rng.random()
    n = len(w)
    # every token within 1e-3 of the best comes before every other: usually a short head
    # that holds the draw, found without partitioning the whole vocabulary
    head = np.flatnonzero(w >= 1e-3)
    k = len(head) if len(head) <= 4096 else min(n, 64)
    if len(head) > 4096:
        head = None
    while True:
        if head is None:
            head = np.argpartition(-w, k - 1)[:k] if k < n else np.arange(n)
        head = head[np.argsort(-w[head], kind="stable")]
        cum = np.cumsum(w[head], dtype=np.float64)
        mass = total
        if params.top_p < 1.0:
            end = int(np.searchsorted(cum, nucleus)) + 1
            if end > k and k < n:  # the nucleus reaches past the head
                k, head = _grow(k, n), None
                continue
            mass = float(cum[min(end, k) - 1])
            cum = cum[:end]
        i = int(np.searchsorted(cum, u * mass, side="right"))
        if k == n or params.top_p < 1.0:  # (past the end: rounding at the very end)
            i = min(i, len(cum) - 1)
        if i < len(cum):
            return int(head[i] if ids is None else ids[head[i]])
        k, head = _grow(k, n), None


def _grow(k: int, n: int) -> int:
    """The next head size: 16x, or the whole vocabulary once that is within 16x (a flat
    distribution sorts once, not once per step of a long climb)."""
    return n if 16 * k >= n else 16 * k


def choose(logits: np.ndarray, context_ids: np.ndarray, n_prompt: int, params: SamplingParams,
           rng: np.random.Generator, allowed: np.ndarray | None = None):
    """Penalise, sample and (when asked) score one step.

    ``allowed`` (0/1 over the vocabulary, from a grammar) applies last: what is
    sampled and the reported log-probabilities are those of the constrained distribution.

    Returns ``(token_id, logprob or None, top_logprobs or None)``; log-probabilities are of
    the penalised distribution before temperature, as OpenAI reports them.
    """
    logits = apply_penalties(logits, context_ids, context_ids[n_prompt:], params)
    if params.logit_bias:
        logits = logits.astype(np.float32, copy=True)
        for tid, bias in params.logit_bias:
            if 0 <= tid < logits.shape[-1]:
                logits[tid] += bias
    if allowed is not None:
        if not allowed.any():
            raise ValueError("the grammar allows no next token")
        # logits - 1e30 where not allowed: zero probability, and ~2.5x faster than np.where
        # over a 262K vocabulary (the mask is on every constrained token's path)
        masked = allowed[: logits.shape[-1]].astype(np.float32)
        masked -= 1.0
        masked *= np.float32(1e30)
        masked += logits
        logits = masked
    token = sample(logits, params, rng)
    if params.logprobs is None:
        return token, None, None
    lp = log_softmax(logits)
    return token, float(lp[token]), top_logprobs(lp, params.logprobs)
