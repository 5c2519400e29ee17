"""Draft tokens without a draft model: continue the sequence the way it went last time.

Code repeats itself (identifiers, call shapes, whole lines), so the tokens that
followed the most recent earlier occurrence of the last few tokens are a cheap
guess at what comes next ("prompt lookup" decoding; llama-server's ``ngram``
speculation). The guess is only a proposal: the model verifies every drafted
token in one batched ``llama_decode`` and the scheduler keeps the verified
prefix (:mod:`fastpilot.backends.scheduler`).

Matching: the last ``n`` tokens of the history (prompt + tokens generated so
far) are looked up for ``n`` in :data:`NGRAM_SIZES`, longest first -- a longer
match is a stronger hint, a bigram keeps drafting alive in short histories.
Unigram matches are not used: they draft noise that costs verification work.
Among equal-length matches the most recent wins (code nearby is the best
predictor). A match may run into the current suffix; the draft then continues
periodically (``a b a b`` drafts ``a b a ...``), which is what a loop does.

Pure Python, no NumPy: one dict insert per size per token, O(1) per draft token.

How :class:`fastpilot.backends.scheduler.Scheduler` speculates with it:

* **Drafting**: a DECODING sequence's batch entry becomes ``[next_token] + drafts``
  with logits for every token, verified in the same ``llama_decode`` as the other
  sequences' tokens. No sequence drafts when the rest of the batch (other
  decoding tokens, prompt chunks) holds more than ``SPEC_BUSY`` tokens: with many
  streams the batch already uses the weights well and drafts would only add work
  (multi-client throughput comes first).
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
* **Adapting**: each sequence's draft length starts at ``min(4, draft_max)``,
  grows by one after a fully accepted draft and halves after a rejection (within
  ``1..draft_max``); drafts never exceed what ``max_tokens`` or the context can
  still take. A memory that refuses the rollback (recurrent, sliding-window) makes
  the sequence re-evaluate its tokens once and turns speculation off.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["NGRAM_SIZES", "NgramDrafter"]

# Suffix lengths tried, longest first (see the module docstring for why not 1).
NGRAM_SIZES = (3, 2)


class NgramDrafter:
    """The n-gram index of one sequence's history; not thread-safe.

    Args:
        history: the prompt (and any tokens already generated).
        sizes: suffix lengths to match, tried in this order.
    """

    __slots__ = ("tokens", "sizes", "_index")

    def __init__(self, history: Iterable[int] = (), sizes: tuple[int, ...] = NGRAM_SIZES) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError("n-gram sizes must be >= 1")
        self.tokens: list[int] = []
        self.sizes = tuple(sizes)
        # n-gram -> index of the token that followed its most recent occurrence.
        # The n-gram ending at the last token is not indexed yet (nothing follows it),
        # so a lookup of the current suffix finds an *earlier* occurrence.
        self._index: dict[tuple[int, ...], int] = {}
        self.extend(history)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append confirmed tokens (prompt, or generated tokens once emitted)."""
        toks, index = self.tokens, self._index
        for t in tokens:
            end = len(toks)  # the new token's index; it follows the n-grams ending at end-1
            for n in self.sizes:
                if end >= n:
                    index[tuple(toks[end - n : end])] = end
            toks.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the most recent match of the current suffix.

        Empty when ``k < 1`` or no suffix of a tried size occurred before.
        """
        toks = self.tokens
        if k < 1:
            return []
        for n in self.sizes:
            if len(toks) <= n:
                continue
            start = self._index.get(tuple(toks[-n:]))
            if start is None:
                continue
            out: list[int] = []
            for j in range(k):
                i = start + j
                # Past the end the match overlaps the draft itself: continue periodically.
                out.append(toks[i] if i < len(toks) else out[i - len(toks)])
            return out
        return []
