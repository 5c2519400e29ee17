"""How many prompt tokens one ``llama_decode`` evaluates: the prefill-chunk rule.

Pure Python, used by :class:`fastpilot.backends.scheduler.Scheduler` to plan each step
and by the llama.cpp backend to size its batch (``n_batch``).

A step's prompt tokens delay every other sequence's next token by the time they take
(on a 2-core CPU, ~2 ms per GPT-2-117M prompt token: a 256-token chunk is ~0.5 s).
So the chunk depends on what else is decoding:

* **alone** (no sequence is decoding): nobody waits for the chunk, so up to
  ``alone`` tokens go in one step (:func:`alone_tokens`: 1024 with flash attention,
  fewer decode calls and full micro-batches; 256 without it, see there);
* **busy** (some sequence decodes a token this step): ``busy`` tokens at most
  (the backend's ``prompt_chunk``, default 256), which bounds the other streams'
  per-token latency while a long prompt is prefilled.

With one KV stream per slot, llama.cpp splits a mixed batch into micro-batches
with the same number of tokens per sequence: one token of every sequence, then the
rest of the chunk alone. A busy step therefore costs a decode step plus the chunk's
own pass, which is what ``busy`` bounds.
"""

from __future__ import annotations

__all__ = ["ALONE_FLASH", "KV_PAD", "alone_tokens", "batch_tokens", "kv_padded", "prefill_budget"]

KV_PAD = 256  # llama.cpp attends a multiple of 256 KV cells (llama_kv_cache::get_n_kv)
ALONE_FLASH = 1024


def kv_padded(cells: int) -> int:
    """``cells`` rounded up to llama.cpp's KV padding (what a KV stream really holds)."""
    return -(-cells // KV_PAD) * KV_PAD


def alone_tokens(flash_attn: bool | None) -> int:
    """Prompt tokens per step for a prompt alone, by the context's attention kernel.

    Without flash attention llama.cpp computes every attended cell of a step, the
    masked ones too: a 1024-token step of a cold prompt attends 1024 cells for each
    of its tokens, 256-token steps attend 256, 512, 768 and 1024, a third less
    work. Measured on GPT-2-117M Q4_K_M, 2 EPYC threads, a cold 916-token prompt
    in process (median of 4, interleaved): 2292 ms in 1024-token steps, 2048 in 512-
    and in 256-token steps. Flash attention skips masked blocks, so there the big
    step wins (1763 ms). ``None`` (llama.cpp's own choice, GPU offload) counts as on.
    """
    return KV_PAD if flash_attn is False else ALONE_FLASH


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
