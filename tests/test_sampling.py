"""Sampling functions are pure: check them against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.engine.sampling import (SamplingParams, apply_penalties, choose, filter_probs,
                                  log_softmax, sample, top_logprobs)

LOGITS = np.array([2.0, 1.0, 0.5, -1.0, 3.0, 0.0], dtype=np.float32)


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    assert sample(LOGITS, SamplingParams(temperature=0.0), rng) == 4
    assert sample(LOGITS, SamplingParams(top_k=1), rng) == 4


def test_log_softmax_normalises():
    lp = log_softmax(LOGITS)
    assert np.isclose(np.exp(lp).sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(lp, LOGITS - np.log(np.exp(LOGITS).sum()), atol=1e-6)


def test_top_k_keeps_k_best():
    ids, probs = filter_probs(LOGITS, SamplingParams(top_k=2))
    assert ids.tolist() == [4, 0]
    p = np.exp(LOGITS[[4, 0]])
    np.testing.assert_allclose(probs, p / p.sum(), rtol=1e-6)


def test_top_p_smallest_prefix_reaching_mass():
    probs_all = np.exp(LOGITS) / np.exp(LOGITS).sum()
    order = np.argsort(-probs_all)
    cum = np.cumsum(probs_all[order])
    for top_p in (0.1, 0.5, 0.7, 0.9, 0.99):
        ids, _ = filter_probs(LOGITS, SamplingParams(top_p=top_p))
        n = int(np.argmax(cum >= top_p - 1e-7)) + 1
        assert ids.tolist() == order[:n].tolist(), top_p


def test_min_p_relative_to_best():
    ids, _ = filter_probs(LOGITS, SamplingParams(min_p=0.3))
    p = np.exp(LOGITS - LOGITS.max())
    assert sorted(ids.tolist()) == sorted(np.nonzero(p >= 0.3)[0].tolist())


def test_temperature_sharpens_and_flattens():
    _, cold = filter_probs(LOGITS, SamplingParams(temperature=0.5))
    _, hot = filter_probs(LOGITS, SamplingParams(temperature=2.0))
    assert cold[0] > hot[0]


def test_seed_reproduces_and_frequencies_match():
    params = SamplingParams(temperature=1.0, seed=7)
    a = [sample(LOGITS, params, np.random.default_rng(7)) for _ in range(3)]
    b = [sample(LOGITS, params, np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(1)
    draws = np.bincount([sample(LOGITS, params, rng) for _ in range(20000)], minlength=6)
    expected = np.exp(LOGITS) / np.exp(LOGITS).sum()
    np.testing.assert_allclose(draws / draws.sum(), expected, atol=0.015)


def test_penalties():
    ctx = np.array([4, 4, 0, 1], dtype=np.int32)  # prompt [4, 4], output [0, 1]
    rep = apply_penalties(LOGITS, ctx, ctx[2:], SamplingParams(repetition_penalty=2.0))
    assert rep[4] == pytest.approx(1.5) and rep[0] == pytest.approx(1.0)
    assert rep[3] == LOGITS[3]  # unseen tokens untouched
    pres = apply_penalties(LOGITS, ctx, ctx[2:], SamplingParams(presence_penalty=0.5,
                                                                 frequency_penalty=0.25))
    assert pres[0] == pytest.approx(2.0 - 0.75) and pres[4] == LOGITS[4]  # prompt not counted
    assert apply_penalties(LOGITS, ctx, ctx[2:], SamplingParams()) is LOGITS


def test_choose_reports_logprobs_of_penalised_distribution():
    ctx = np.array([4], dtype=np.int32)
    params = SamplingParams(temperature=0.0, logprobs=2, presence_penalty=2.5)
    token, lp, top = choose(LOGITS, np.array([4, 4], np.int32), 1, params,
                            np.random.default_rng(0))
    pen = LOGITS.copy()
    pen[4] -= 2.5
    assert token == 0
    assert lp == pytest.approx(float(log_softmax(pen)[0]), abs=1e-6)
    assert [t for t, _ in top] == [0, 1]
    assert choose(LOGITS, ctx, 1, SamplingParams(temperature=0.0), None)[1:] == (None, None)


def test_top_logprobs_sorted():
    lp = log_softmax(LOGITS)
    assert [t for t, _ in top_logprobs(lp, 3)] == [4, 0, 1]
    assert top_logprobs(lp, 0) == []


def test_sample_draws_from_filter_probs_sorting_only_the_head():
    """``sample`` sorts only as much of a large vocabulary as the draw reaches, and picks
    the token a draw of the same double picks from ``filter_probs``'s sorted distribution
    (up to float rounding at a boundary: at most one in the 600 draws here)."""
    r = np.random.default_rng(0)
    differ = 0
    for vocab, scale in ((50, 3.0), (49152, 1.0), (49152, 6.0), (262144, 2.0)):
        logits = (r.standard_normal(vocab) * scale).astype(np.float32)
        for params in (SamplingParams(temperature=0.8), SamplingParams(top_p=0.9),
                       SamplingParams(temperature=0.7, top_k=40),
                       SamplingParams(temperature=1.3, min_p=0.05),
                       SamplingParams(top_p=0.5, top_k=100, min_p=0.01)):
            ids, probs = filter_probs(logits, params)
            cdf = np.cumsum(probs.astype(np.float64))
            for seed in range(30):
                want = ids[min(int(np.searchsorted(cdf / cdf[-1],
                                                   np.random.default_rng(seed).random(),
                                                   side="right")), len(ids) - 1)]
                differ += sample(logits, params, np.random.default_rng(seed)) != want
    assert differ <= 1


def test_log_softmax_row_by_row_is_the_whole_array_formula_to_the_bit():
    """``log_softmax`` (a row at a time through one buffer) and ``picked_logprobs`` (one
    entry a row) give exactly what the whole-array formula gives, for 1-D, 2-D and 3-D
    logits, masked (-inf) entries, float16 input; the input is left as it was."""
    from mesh.engine.sampling import picked_logprobs

    def whole(x):
        x = x.astype(np.float32)
        shifted = x - x.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    rng = np.random.default_rng(1)
    big = rng.standard_normal((8, 262_144)).astype(np.float32) * 4
    masked = np.where(rng.random((5, 1000)) < 0.3, -np.inf, rng.standard_normal((5, 1000)))
    for x in (big, big[3], masked.astype(np.float32), rng.standard_normal((2, 3, 77)),
              rng.standard_normal((4, 300)).astype(np.float16), np.zeros((0, 10), np.float32)):
        before = x.copy()
        got = log_softmax(x)
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_array_equal(got, whole(x))
        np.testing.assert_array_equal(x, before)
        if x.ndim == 2:
            ids = rng.integers(0, x.shape[1], len(x))
            np.testing.assert_array_equal(picked_logprobs(x, ids),
                                          whole(x)[np.arange(len(x)), ids])


def test_top_ids_are_the_largest_entries_of_any_vocabulary():
    """``top_ids`` (a threshold from blocks' maxima first, on a large vocabulary) finds the
    same values a full sort does: with ties, masked (-inf) entries, a vocabulary of
    Gemma 3's size, k up to the vocabulary; a NaN takes the plain way."""
    from mesh.engine.sampling import top_ids

    rng = np.random.default_rng(0)
    cases = [rng.standard_normal(262_144).astype(np.float32) * 3]
    for n in (1, 7, 64 * 5, 5_000, 70_000):
        v = rng.standard_normal(n).astype(np.float32)
        cases += [v, np.round(v, 1), np.where(rng.random(n) < 0.95, -np.inf, v),
                  rng.integers(0, 3, n).astype(np.float32)]
    for v in cases:
        for k in {1, 2, 5, 64, 256, len(v)}:
            if k > len(v):
                continue
            got = top_ids(v, k)
            assert len(got) == len(set(got.tolist())) == k
            np.testing.assert_array_equal(np.sort(v[got]), np.sort(v)[len(v) - k:])
    v = np.ones(100_000, np.float32)
    v[[5, 9]] = 2.0
    v[7] = np.nan
    assert set(top_ids(np.where(np.isnan(v), -1.0, v), 2).tolist()) == {5, 9}
    assert len(top_ids(v, 3)) == 3
