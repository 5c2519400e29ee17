"""Draft tokens without a draft model: continue the sequence the way it went last time.

Code repeats itself (identifiers, call shapes, whole lines), so the tokens that
followed the most recent earlier occurrence of the last few tokens are a cheap
guess at what comes next ("prompt lookup" decoding; llama-server's ``ngram``
speculation). The guess is only a proposal: the model verifies every drafted
token in one batched ``llama_decode`` and the scheduler keeps the verified
prefix (:mod:`fastpilot.backends.scheduler`).

Matching: the last ``n`` tokens of the history (the prompt -- for an infill
request that includes the suffix, so the middle can run into it -- and the
tokens generated so far) are looked up for ``n`` in :data:`NGRAM_SIZES`, longest
first -- a longer match is a stronger hint, a bigram keeps drafting alive in
short histories.
Unigram matches are not used: they draft noise that costs verification work.
Among equal-length matches the most recent wins (code nearby is the best
predictor). A match may run into the current suffix; the draft then continues
periodically (``a b a b`` drafts ``a b a ...``), which is what a loop does.

Pure Python, no NumPy: one dict insert per size per token, O(1) per draft token.

Compared with llama-server's ``ngram-mod`` (which drafts only after a 24-token
match, 48 to 64 tokens or nothing, from one hash table shared by all slots):
short matches draft here too, and how far to trust them is measured instead of
fixed -- each sequence's acceptance and the decode cost decide the length
(:mod:`fastpilot.backends.draft_policy`), so a loop is drafted 32 tokens at a
time within a few steps while a short history still gets short drafts.

How :class:`fastpilot.backends.scheduler.Scheduler` speculates with it:

* **Drafting**: a DECODING sequence's batch entry becomes ``[next_token] + drafts``
  with logits for every token, verified in the same ``llama_decode`` as the other
  sequences' tokens. Streams decoding together draft together, all the same
  number of tokens or none (llama.cpp evaluates a batch over per-slot KV streams
  in micro-batches of equal tokens per sequence, so one stream's longer draft
  would cost a pass of its own): one length is chosen for all of them from
  their acceptance together, a stream without a match drafting *fillers*
  (:meth:`NgramDrafter.filler`: counted as worthless, verified like any draft)
  when the others' drafts pay for the wider batch, and the batch's drafts share
  ``DRAFT_SEQS * draft_max`` tokens. No sequence drafts beside more than
  ``SPEC_BUSY`` prompt tokens (a prompt chunk fills the batch).
* **Verifying**: the backend samples row after row (``Sample.drafts``); each
  sampled token goes through ``Scheduler.on_token``, which keeps the draft's KV
  cell when the token equals the next draft (``Verdict.more``: sample the next row
  too) and otherwise ends the verification, queueing a ``KvRemove`` of the cells
  past the last kept token. Sampling decides, the draft only proposes: a token is
  emitted exactly when plain decoding would have emitted it from the same logits
  and the same sampler state, so greedy output is unchanged and so is the sampled
  distribution (accepting draft ``x`` iff the draw from the processed
  distribution ``p`` equals ``x`` happens with probability ``p(x)``; otherwise the
  draw is ``p`` without ``x``, renormalized -- the speculative-sampling rule for a
  one-token proposal, here coupled to the plain draw so a seed gives the same text).
  "The same logits" is the caveat: llama.cpp computes a token's logits slightly
  differently when several tokens share its ubatch (up to 5e-3 in logprob on
  tiny-py's Q4_K_M file, measured one-per-step against one batch), so a near-tie
  can flip and greedy text can differ from plain decoding -- seen on random-weight
  Q4_K_M files in benchmarks/RESULTS.md, as with llama-server's own ngram-mod.
* **Adapting**: the draft length is the one with the most expected tokens per
  unit of step cost, from each sequence's measured acceptance (starting from the
  model's recent rate) and the measured cost of a wider batch
  (:mod:`fastpilot.backends.draft_policy`), within ``--draft-max``; a run of ``n``
  drafted tokens accepted since the last refusal counts as acceptance ``n / (n + 1)``
  (acceptance comes in runs: a loop), so drafts lengthen fast where verifying is
  cheap and stay short where it is not.
  A sequence whose drafts keep failing stops drafting, one that loops drafts long. Drafts never
  exceed what ``max_tokens`` or the context can still take. A memory that refuses
  the rollback (recurrent, sliding-window) makes the sequence re-evaluate its
  tokens once and turns speculation off.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastpilot.backends.draft_policy import MODEL_WEIGHT, SEQ_WEIGHT, Acceptance

__all__ = ["NGRAM_SIZES", "NgramDrafter"]

# Suffix lengths tried, longest first (see the module docstring for why not 1).
NGRAM_SIZES = (3, 2)


class NgramDrafter:
    """The n-gram index of one sequence's history; not thread-safe.

    Args:
        history: the prompt (and any tokens already generated).
        sizes: suffix lengths to match, tried in this order.
        model_acceptance: the model-wide acceptance counts (shared by every
            sequence of one scheduler): the starting estimate, updated by
            :meth:`verified`.
    """

    __slots__ = (
        "tokens",
        "sizes",
        "_index",
        "_unigram",
        "acceptance",
        "model_acceptance",
        "_streak",
    )

    def __init__(
        self,
        history: Iterable[int] = (),
        sizes: tuple[int, ...] = NGRAM_SIZES,
        model_acceptance: Acceptance | None = None,
    ) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError("n-gram sizes must be >= 1")
        self.tokens: list[int] = []
        self.sizes = tuple(sizes)
        # This sequence's acceptance, starting from the model's recent rate; the
        # model's counts learn from every verification of every sequence.
        self.model_acceptance = model_acceptance
        self.acceptance = model_acceptance.prior() if model_acceptance else Acceptance()
        # Drafted tokens accepted since the last refusal: acceptance comes in runs (a
        # loop), which the averaged estimate is slow to show; a run of n is evidence
        # for p = n / (n + 1).
        self._streak = 0
        # n-gram -> index of the token that followed its most recent occurrence.
        # The n-gram ending at the last token is not indexed yet (nothing follows it),
        # so a lookup of the current suffix finds an *earlier* occurrence.
        self._index: dict[tuple[int, ...], int] = {}
        self._unigram: dict[int, int] = {}  # the same for single tokens: fillers only
        self.extend(history)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append confirmed tokens (prompt, or generated tokens once emitted)."""
        toks, index, unigram = self.tokens, self._index, self._unigram
        for t in tokens:
            end = len(toks)  # the new token's index; it follows the n-grams ending at end-1
            for n in self.sizes:
                if end >= n:
                    index[tuple(toks[end - n : end])] = end
            if end:
                unigram[toks[end - 1]] = end
            toks.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the most recent match of the current suffix.

        Empty when ``k < 1`` or no suffix of a tried size occurred before.
        """
        start = self._match() if k >= 1 else None
        return [] if start is None else self._follow(start, k)

    @property
    def p(self) -> float:
        """The chance a drafted token is accepted given the previous one was: this
        sequence's estimate or, when higher, ``n / (n + 1)`` after a run of ``n``
        accepted drafted tokens (:mod:`fastpilot.backends.draft_policy` sizes the draft)."""
        return max(self.acceptance.rate, self._streak / (self._streak + 1))

    def filler(self, k: int) -> list[int]:
        """``k`` tokens for a stream without a match that must draft to keep the batch's
        shape: what followed the last occurrence of the last token, or that token again.
        Verified like any draft, but weighed as worthless when sizing drafts."""
        toks = self.tokens
        if k < 1 or not toks:
            return []
        start = self._unigram.get(toks[-1])
        return self._follow(start, k) if start is not None else [toks[-1]] * k

    def verified(self, drafted: int, accepted: int) -> None:
        """A verification ended: ``accepted`` of ``drafted`` tokens held (a miss if fewer)."""
        missed = accepted < drafted
        self._streak = 0 if missed else self._streak + accepted
        self.acceptance.record(accepted, missed, SEQ_WEIGHT)
        if self.model_acceptance is not None:
            self.model_acceptance.record(accepted, missed, MODEL_WEIGHT)

    def _match(self) -> int | None:
        """Index of the token after the most recent earlier occurrence of the longest
        matching suffix (sizes tried in order), or None."""
        toks = self.tokens
        for n in self.sizes:
            if len(toks) > n:
                start = self._index.get(tuple(toks[-n:]))
                if start is not None:
                    return start
        return None

    def _follow(self, start: int, k: int) -> list[int]:
        toks = self.tokens
        out: list[int] = []
        for j in range(k):
            i = start + j
            # Past the end the match overlaps the draft itself: continue periodically.
            out.append(toks[i] if i < len(toks) else out[i - len(toks)])
        return out
