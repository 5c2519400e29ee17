"""The shared SequenceSampler against hand computations on small vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastpilot.backends.base import SamplingParams
from fastpilot.backends.sampling import SequenceSampler, draw_index, log_softmax, top_entries

LOGITS = np.array([2.0, 1.0, 0.5, -1.0, 0.0], dtype=np.float32)


def lsm(x: list[float]) -> list[float]:
    """log-softmax by hand, in plain floats."""
    m = max(x)
    z = math.log(sum(math.exp(v - m) for v in x)) + m
    return [v - z for v in x]


def test_log_softmax_matches_hand_computation() -> None:
    got = log_softmax(LOGITS)
    assert np.allclose(got, lsm(LOGITS.tolist()), atol=1e-12)
    assert math.isclose(float(np.exp(got).sum()), 1.0, rel_tol=1e-12)


def test_top_entries_best_first() -> None:
    lp = log_softmax(LOGITS)
    assert [t for t, _ in top_entries(lp, 3)] == [0, 1, 2]
    assert top_entries(lp, 0) == ()


def test_greedy_logprob_is_real_log_softmax() -> None:
    s = SequenceSampler(SamplingParams(temperature=0.0, logprobs=2), 5)
    step = s.sample(LOGITS)
    want = lsm(LOGITS.tolist())
    assert step.token_id == 0
    assert math.isclose(step.logprob, want[0], abs_tol=1e-6)
    assert step.top_logprobs[0] == (0, pytest.approx(want[0], abs=1e-6))
    assert step.top_logprobs[1] == (1, pytest.approx(want[1], abs=1e-6))
    # Without logprobs the chosen token's value is the same number.
    s2 = SequenceSampler(SamplingParams(temperature=0.0), 5)
    assert math.isclose(s2.sample(LOGITS).logprob, want[0], abs_tol=1e-6)


def test_openai_additive_penalties() -> None:
    """logit[t] -= count[t] * frequency + (count[t] > 0) * presence, over generated tokens."""
    p = SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.3)
    s = SequenceSampler(p, 5)
    for tok in (0, 0, 1):
        s.observe(tok)
    got = s.process(LOGITS)
    want = LOGITS.tolist()
    want[0] -= 2 * 0.5 + 0.3  # seen twice
    want[1] -= 1 * 0.5 + 0.3  # seen once
    assert np.allclose(got, want, atol=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    s = SequenceSampler(p, 5, prompt_ids=[0, 3])
    got = s.process(LOGITS)
    want = LOGITS.tolist()
    want[0] = 2.0 / 2.0
    want[3] = -1.0 * 2.0
    assert np.allclose(got, want)


def test_logit_bias_minus_100_bans() -> None:
    p = SamplingParams(temperature=0.0, logit_bias=((0, -100.0), (2, 1.0)))
    s = SequenceSampler(p, 5)
    x = s.process(LOGITS)
    assert x[0] == -np.inf
    assert math.isclose(float(x[2]), 1.5)
    assert s.sample(LOGITS).token_id == 2  # 0.5 + 1.0 beats 1.0
    # Sampling never picks a banned token either.
    hot = SequenceSampler(SamplingParams(temperature=2.0, logit_bias=((0, -100.0),), seed=1), 5)
    assert all(hot.sample(LOGITS).token_id != 0 for _ in range(300))


def test_min_tokens_bans_eos_until_reached() -> None:
    p = SamplingParams(temperature=0.0, min_tokens=2)
    s = SequenceSampler(p, 5, eos_token_ids=[0])
    assert s.sample(LOGITS).token_id == 1
    assert s.sample(LOGITS).token_id == 1
    assert s.sample(LOGITS).token_id == 0  # two generated: EOS allowed again


def test_top_k_restricts_the_draw() -> None:
    s = SequenceSampler(SamplingParams(temperature=1.0, top_k=2, seed=3), 5)
    drawn = {s.sample(LOGITS).token_id for _ in range(400)}
    assert drawn == {0, 1}


def test_top_p_keeps_the_nucleus() -> None:
    probs = np.exp(lsm(LOGITS.tolist()))
    # p(0) ~ 0.54, p(0)+p(1) ~ 0.74: top_p 0.6 keeps exactly tokens 0 and 1.
    assert probs[0] < 0.6 < probs[0] + probs[1]
    s = SequenceSampler(SamplingParams(temperature=1.0, top_p=0.6, seed=5), 5)
    drawn = {s.sample(LOGITS).token_id for _ in range(400)}
    assert drawn == {0, 1}


def test_temperature_logprobs_are_of_the_scaled_distribution() -> None:
    s = SequenceSampler(SamplingParams(temperature=0.5, seed=0, logprobs=1), 5)
    step = s.sample(LOGITS)
    want = lsm((LOGITS / 0.5).tolist())
    assert math.isclose(step.logprob, want[step.token_id], abs_tol=1e-6)


def test_draw_frequencies_follow_softmax() -> None:
    s = SequenceSampler(SamplingParams(temperature=1.0, seed=11), 5)
    counts = np.bincount([s.sample(LOGITS).token_id for _ in range(20000)], minlength=5) / 20000
    assert np.allclose(counts, np.exp(lsm(LOGITS.tolist())), atol=0.015)


def test_seed_reproducible_and_seeds_differ() -> None:
    def draws(seed: int | None) -> list[int]:
        s = SequenceSampler(SamplingParams(temperature=1.0, seed=seed), 5)
        return [s.sample(LOGITS).token_id for _ in range(40)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize("seed", range(6))
def test_lean_greedy_equals_the_full_path(seed: int) -> None:
    """Greedy without logprobs reads the row in place (no copy, no mask, no softmax unless
    ``token_logprob``); token and logprob must equal the full path's (``logprobs`` > 0),
    with padding rows past ``vocab_size`` and a banned end-of-sequence id in the lead."""
    rng = np.random.default_rng(seed)
    vocab, eos = 300, 7
    for ban in ({}, {"ignore_eos": True}, {"min_tokens": 3}):
        full = SequenceSampler(SamplingParams(temperature=0.0, logprobs=1, **ban), vocab, [eos])
        lean = SequenceSampler(SamplingParams(temperature=0.0, **ban), vocab, [eos])
        cheap = SequenceSampler(
            SamplingParams(temperature=0.0, token_logprob=False, **ban), vocab, [eos]
        )
        for i in range(8):
            row = rng.standard_normal(vocab + 20).astype(np.float32)
            row[vocab:] = 50.0  # padding rows never win
            if i % 2:
                row[eos] = 40.0  # the EOS leads: banned or not decides the token
            row.setflags(write=False)  # a view of llama.cpp's buffer is only read
            want = full.sample(row)
            got = lean.sample(row)
            assert got.token_id == want.token_id
            assert math.isclose(got.logprob, want.logprob, rel_tol=1e-12, abs_tol=1e-12)
            step = cheap.sample(row)
            assert step.token_id == want.token_id
            # Only the banned-EOS fallback has a logprob; otherwise none was computed.
            assert math.isnan(step.logprob) or math.isclose(step.logprob, want.logprob)
        if ban:
            assert full.generated == lean.generated == cheap.generated == 8


def test_lean_greedy_skips_the_softmax_without_token_logprob() -> None:
    s = SequenceSampler(SamplingParams(temperature=0.0, token_logprob=False), 5)
    step = s.sample(LOGITS)
    assert step.token_id == 0 and math.isnan(step.logprob)


@pytest.mark.parametrize("n", [1, 5, 256, 257, 1000, 50257])
def test_draw_index_is_the_inverse_cdf(n: int) -> None:
    """The blocked search picks what a running sum over every id would, skips zero weights."""
    rng = np.random.default_rng(n)
    w = rng.random(n).astype(np.float32)
    w[rng.random(n) < 0.3] = 0.0
    w[-1] = 0.0 if n > 1 else 1.0
    if not w.any():
        w[0] = 1.0
    cdf = np.cumsum(w.astype(np.float64))
    for u in [0.0, *rng.random(300).tolist(), np.nextafter(1.0, 0.0)]:
        got = draw_index(w, u)
        assert w[got] > 0
        want = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), n - 1)
        if w[want] > 0:  # at u ~ 1 the naive search may land on a trailing zero weight
            assert got == want, (u, got, want)


def test_plain_sampling_draws_follow_softmax_over_many_blocks() -> None:
    """Without top-k/top-p the draw is an inverse CDF in id order: frequencies still match."""
    vocab = 600  # three blocks of draw_index
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(vocab) * 2).astype(np.float32)
    x[::7] = -np.inf
    s = SequenceSampler(SamplingParams(temperature=0.7, seed=2, token_logprob=False), vocab)
    draws = 30000
    counts = np.bincount([s.sample(x).token_id for _ in range(draws)], minlength=vocab) / draws
    want = np.exp(log_softmax(x / 0.7))
    assert counts[::7].sum() == 0
    assert np.abs(counts - want).max() < 0.01
    assert 0.5 * np.abs(counts - want).sum() < 0.05  # total variation
