"""How many tokens to draft: the measured acceptance against the measured cost of verifying.

A draft of ``k`` tokens pays when the tokens it is expected to save outweigh what
the longer batch costs. Both sides are measured, not fixed:

* **Acceptance** (:class:`Acceptance`): a drafted token is taken as accepted with
  probability ``p`` given that the one before it was (a geometric model: a draft
  of ``k`` yields ``1 + p + ... + p^k`` tokens per verification, the model's own
  token included). ``p`` is estimated from decayed counts of accepted drafted
  tokens and of *misses* (one per verification that ended on a refused draft),
  scaled down to the last :data:`SEQ_WEIGHT` tokens of evidence so that a few
  refusals after a long accepted run shorten the next drafts at once: per
  sequence, so a stream that has fallen into a loop drafts long while one writing
  new code drafts little, and starting from the model's recent rate (every
  sequence's verifications, :data:`MODEL_WEIGHT` tokens of evidence) rather than
  a constant.
* **Cost** (:class:`DecodeCost`): ``llama_decode`` time is fitted as ``a + b * n``
  over the decode-only batches of ``n`` tokens the backend runs (every token
  asking for logits, as a verification does), and the time a step spends outside
  it (planning, sampling, emitting) is averaged as ``g``. ``b / (a + b + g)`` is
  what one more drafted token costs relative to a one-token step: small for a small model on a
  GPU or a CPU whose step is bound by reading the weights, near 1 for a big model
  on a CPU whose batch is bound by arithmetic. Until two batch sizes were seen the
  ratio is :data:`PRIOR_RATIO`.

  On a CPU the line is a poor fit: llama.cpp's matrix products change kernels with
  the batch's width (GPT-2-117M Q4_K_M, 2 EPYC threads, one sequence: 7 tokens
  cost 3.5x one, 8 tokens 5.1x, 16 tokens 6.1x; eight sequences of two tokens
  1.09x eight of one). So where the kernel calibration measured the decode time
  of every batch width (:func:`fastpilot.backends.llamacpp_tuning.batch_cost`),
  the cost of ``n`` tokens for streams drafting together is that measured shape,
  scaled online to the steps the backend times (a loaded machine), plus ``g``.
  A lone stream keeps the line: measured in process (CodeGen-350M-shaped Q4_K_M, 2
  vCPUs, 160 greedy tokens on three prompts, two processes of each interleaved) it
  drafted more on the line and decoded at 50.9-67.8 tok/s against 41.6-65.1 on the
  shape, which, with acceptance averaged over runs that are really bursty, stopped
  drafting on one prompt altogether.

:func:`best_shared_len` picks the draft length ``k`` (up to ``--draft-max``) that
maximizes expected tokens per unit of step cost for the ``m`` streams that decode
together and draft together (one shape, see :mod:`fastpilot.backends.scheduler`):
``sum_s (1 + p_s + ... + p_s^k) / cost(m * (k + 1))``; for one stream on the line
that is ``(1 + p + ... + p^k) / (1 + r * k)``. A stream
without an n-gram match adds nothing to the sum (its drafts are fillers that
only keep the shape). The drafter (:mod:`fastpilot.backends.ngram`) passes
``n / (n + 1)`` as ``p`` instead after a run of ``n`` accepted drafted tokens when
that is higher, since acceptance comes in runs (a loop) that an average over the
last 16 tokens is slow to show.
Speculating never changes the text (the sampler decides every token, see
:mod:`fastpilot.backends.ngram`); this only decides how much verification work
is worth spending. The cost is wall time, so on a loaded machine drafts shorten.

Pure Python; used only by the backend's worker thread (not thread-safe).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "MODEL_WEIGHT",
    "PRIOR_RATIO",
    "SEQ_WEIGHT",
    "Acceptance",
    "DecodeCost",
    "best_shared_len",
]

# Relative cost of one drafted token before any measurement: a 16-token
# verification costing about two one-token steps (a small model on a CPU).
PRIOR_RATIO = 1 / 16
# Evidence kept per sequence, in tokens: with 16, one refusal after a long accepted
# run brings the estimate to 16/17 and about halves the next draft.
SEQ_WEIGHT = 16.0
# The model-wide counts (the prior for new sequences) remember longer.
MODEL_WEIGHT = 64.0
# The cost fit's samples decay by this per decode (a half-life of ~35 steps).
COST_DECAY = 0.98
# Per width, the correction of the measured shape by the steps run decays by this per
# step of that width (a width's own steps soon outweigh a noisy load-time timing).
SEEN_DECAY = 0.8
# A longer pause between two decodes is the worker idle, not a step's own work.
IDLE_GAP = 0.05
# A new sequence's counts weigh this many tokens of evidence.
PRIOR_WEIGHT = 4.0
# Below this a drafted token's chance of being reached adds nothing worth computing.
_NEGLIGIBLE = 1e-3


def best_shared_len(
    ps: Sequence[float], k_max: int, cost: Callable[[int], float], extra: int = 0
) -> int:
    """The draft length in ``0..k_max`` that every one of ``len(ps)`` streams drafting
    together should use: the most expected tokens per unit of step cost.

    Args:
        ps: each stream's chance that a drafted token is accepted given the previous
            one was (0 for a stream whose drafts are fillers: no match).
        k_max: the longest draft every stream can take.
        cost: a step's cost by its token count (:meth:`DecodeCost.relative`).
        extra: tokens in the step besides the streams' own (a few prompt tokens).

    Returns 0 when no length beats plain decoding. A step of ``m`` streams drafting
    ``k`` holds ``m * (k + 1) + extra`` tokens.
    """
    m = len(ps)
    if m == 0 or k_max < 1:
        return 0
    best_value, best_k = m / cost(m + extra), 0
    expected, reach = float(m), [1.0] * m
    for k in range(1, k_max + 1):
        for i, p in enumerate(ps):
            reach[i] *= p
            expected += reach[i]
        value = expected / cost(m * (k + 1) + extra)
        if value > best_value:
            best_value, best_k = value, k
        elif max(reach) < _NEGLIGIBLE:
            break
    return best_k


class Acceptance:
    """Decayed counts of accepted drafted tokens and of refused drafts ("misses").

    Args:
        accepted: initial accepted-token weight.
        missed: initial miss weight.
    """

    __slots__ = ("accepted", "missed")

    def __init__(self, accepted: float = 3.0, missed: float = 1.0) -> None:
        self.accepted = accepted
        self.missed = missed

    @property
    def rate(self) -> float:
        """The estimated ``p``: accepted / (accepted + misses)."""
        total = self.accepted + self.missed
        return self.accepted / total if total > 0 else 0.0

    def record(self, accepted: int, missed: bool, weight: float) -> None:
        """One verification: ``accepted`` drafted tokens held, ``missed`` if one was
        refused; then both counts scale down to at most ``weight`` in total."""
        self.accepted += accepted
        self.missed += 1.0 if missed else 0.0
        total = self.accepted + self.missed
        if total > weight:
            self.accepted *= weight / total
            self.missed *= weight / total

    def prior(self, weight: float = PRIOR_WEIGHT) -> Acceptance:
        """A fresh estimate with this one's rate and ``weight`` tokens of evidence."""
        p = self.rate
        return Acceptance(p * weight, (1.0 - p) * weight)


class DecodeCost:
    """What a step costs: ``llama_decode`` time as ``a + b * n`` by exponentially
    weighted least squares, plus the step's time outside ``llama_decode``.

    The fit uses decode-only batches (a prompt chunk asks for one logits row per
    chunk, a different cost per token). The time between one decode's end and the
    next one's start (planning, sampling, emitting; gaps over :data:`IDLE_GAP` are
    the worker waiting for work and are skipped) is part of every step too: a
    drafted token saves a whole step, not just its ``llama_decode``, which matters
    most for a small model whose decode is as short as the Python around it.
    """

    __slots__ = (
        "_w",
        "_n",
        "_t",
        "_nn",
        "_nt",
        "_gap",
        "_end",
        "_pinned",
        "_shape",
        "_scale",
        "_seen",
    )

    def __init__(self, shape: Sequence[float] | None = None) -> None:
        self._w = self._n = self._t = self._nn = self._nt = 0.0
        self._gap: float | None = None  # decayed mean time outside llama_decode per step
        self._end: float | None = None  # when the last decode ended
        self._pinned: float | None = None
        self._shape: tuple[float, ...] | None = None
        self._scale: float | None = None  # seconds per unit of shape (decayed mean)
        # width -> decayed mean of its steps' seconds / (scale * shape): what the steps
        # the backend ran say of a width the load-time timing got wrong (noise)
        self._seen: dict[int, float] = {}
        self.set_shape(shape)

    def set_shape(self, shape: Sequence[float] | None) -> None:
        """Use a measured batch-cost shape: ``shape[n - 1]`` is a decode-only batch of
        ``n`` tokens' time relative to one token's
        (:func:`~fastpilot.backends.llamacpp_tuning.batch_cost`);
        past its end, the last entry's cost per token. None or fewer than two
        entries: the fitted line."""
        if shape is None or len(shape) < 2 or min(shape) <= 0:
            self._shape = None
        else:
            self._shape = tuple(v / shape[0] for v in shape)

    def _shape_at(self, n: int) -> float:
        shape = self._shape
        assert shape is not None
        if n <= len(shape):
            return shape[max(n, 1) - 1]
        return shape[-1] * n / len(shape)

    def pin(self, ratio: float | None) -> None:
        """Use ``ratio`` instead of the fit (``None``: the fit again). Tests pin 0 so that
        drafts are as long as the acceptance allows whatever a loaded machine's timings say."""
        self._pinned = ratio

    def observe(
        self, n_tokens: int, seconds: float, *, fit: bool = True, now: float | None = None
    ) -> None:
        """One ``llama_decode`` of ``n_tokens`` tokens took ``seconds`` and ended at
        ``now`` (``time.perf_counter()``); ``fit``: a decode-only batch."""
        now = time.perf_counter() if now is None else now
        if self._end is not None:
            gap = now - seconds - self._end
            if 0.0 <= gap < IDLE_GAP:
                self._gap = (
                    gap if self._gap is None else self._gap * COST_DECAY + gap * (1 - COST_DECAY)
                )
        self._end = now
        if not fit:
            return
        d = COST_DECAY
        if self._shape is not None:
            per = seconds / self._shape_at(n_tokens)
            self._scale = per if self._scale is None else self._scale * d + per * (1 - d)
            off = per / self._scale
            seen = self._seen.get(n_tokens)
            self._seen[n_tokens] = (
                off if seen is None else seen * SEEN_DECAY + off * (1 - SEEN_DECAY)
            )
        self._w = self._w * d + 1.0
        self._n = self._n * d + n_tokens
        self._t = self._t * d + seconds
        self._nn = self._nn * d + n_tokens * n_tokens
        self._nt = self._nt * d + n_tokens * seconds

    def observe_batch(self, entries: Iterable[Any], seconds: float) -> None:
        """The backend's ``llama_decode`` of a plan's entries (:class:`BatchEntry`) just
        took ``seconds``; fitted when decode-only (logits for every token, as in a
        verification), its gap to the previous decode counted either way."""
        n, fit = 0, True
        for e in entries:
            n += len(e.tokens)
            fit = fit and e.n_logits == len(e.tokens)
        self.observe(n, seconds, fit=fit)

    @property
    def ratio(self) -> float:
        """``b / (a + b + gap)``: one more token's cost relative to a one-token step, in
        ``[0.005, 1]``; :data:`PRIOR_RATIO` until batches of different sizes were seen."""
        if self._pinned is not None:
            return self._pinned
        w = self._w
        if w == 0:
            return PRIOR_RATIO
        mean_n, mean_t = self._n / w, self._t / w
        var_n = self._nn / w - mean_n * mean_n
        if var_n < 0.1:  # (nearly) one batch size so far: no slope to fit
            return PRIOR_RATIO
        b = (self._nt / w - mean_n * mean_t) / var_n
        step = mean_t - b * mean_n + b + (self._gap or 0.0)  # a + b + gap
        if b <= 0:
            return 0.005
        if step <= 0:
            return 1.0
        return min(1.0, max(0.005, b / step))

    def line(self, n_tokens: int) -> float:
        """The fitted line's cost of a step of ``n_tokens`` relative to a one-token step,
        ``1 + ratio * (n - 1)``, whatever shape was measured."""
        return 1.0 + self.ratio * (n_tokens - 1)

    def relative(self, n_tokens: int) -> float:
        """A step of ``n_tokens`` decode-only tokens (its ``llama_decode`` and the time
        outside it) relative to a one-token step: from the measured shape when there is
        one, else the line ``1 + ratio * (n - 1)`` (pinned: the pinned ratio's line).

        A width the backend has run is corrected by what its steps took against the
        shape's prediction, so a width the load-time timing measured too cheap (noise)
        is not chosen for long."""
        if self._shape is None or self._pinned is not None:
            return self.line(n_tokens)
        seen = self._seen
        width = self._shape_at(n_tokens) * seen.get(n_tokens, 1.0)
        one = seen.get(1, 1.0)
        g = (self._gap or 0.0) / self._scale if self._scale else 0.0  # in units of the shape
        return (width + g) / (one + g)
