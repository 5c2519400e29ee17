"""How many prompt tokens one ``llama_decode`` evaluates: the prefill-chunk rule.

Pure Python, used by :class:`fastpilot.backends.scheduler.Scheduler` to plan each step
and by the llama.cpp backend to size its batch (``n_batch``).

A step's prompt tokens delay every other sequence's next token by the time they take
(on a 2-core CPU, ~2 ms per GPT-2-117M prompt token: a 256-token chunk is ~0.5 s).
So the chunk depends on what else is decoding:

* **alone** (no sequence is decoding): nobody waits for the chunk, and bigger
  chunks mean fewer decode calls and llama.cpp micro-batches (``n_ubatch``) that
  are full, so up to ``alone`` tokens (default 1024, the batch's size) go in one step;
* **busy** (some sequence decodes a token this step): ``busy`` tokens at most
  (the backend's ``prompt_chunk``, default 256), which bounds the other streams'
  per-token latency while a long prompt is prefilled.

With one KV stream per slot, llama.cpp splits a mixed batch into micro-batches
with the same number of tokens per sequence: one token of every sequence, then the
rest of the chunk alone. A busy step therefore costs a decode step plus the chunk's
own pass, which is what ``busy`` bounds.
"""

from __future__ import annotations

__all__ = ["batch_tokens", "prefill_budget"]


def prefill_budget(decoding: int, alone: int, busy: int) -> int:
    """Prompt tokens the next step may hold, shared by every prefilling sequence.

    Args:
        decoding: sequences that feed a token in this step (DECODING ones).
        alone: the budget when none is decoding.
        busy: the budget when some are (the bound on their extra latency).
    """
    return busy if decoding else max(alone, busy)


def batch_tokens(slots: int, busy: int, drafts: int, alone: int) -> int:
    """Most tokens one step's batch holds (llama.cpp's ``n_batch`` must be at least this).

    A busy step: a token per slot, the ``busy`` chunk and ``drafts`` draft tokens;
    an alone step: the ``alone`` chunk (no sequence decodes, so none drafts).
    """
    return max(busy + slots + drafts, alone)
