"""Prompt-cache reuse past the common prefix: which cached KV cells to keep, drop and shift.

Editors send the last N tokens of a growing file, so from one request to the next
the prompt's start moves down by a line or two and the plain prefix cache misses
entirely although nearly every token is already in a slot's KV. With rotary
positions (RoPE: CodeGen through ``phi2``, llama-family, Qwen2, StarCoder2) a
cached run of tokens can be *moved*: ``llama_memory_seq_add`` changes the cells'
positions and llama.cpp re-rotates their keys by the difference before the next
decode, after which attention sees the same relative distances as if the run had
been evaluated at its new place. Models with learned absolute positions (GPT-2)
cannot: the position is baked into every cached key and value, so they keep the
prefix cache only (the backend decides that from the model's rope type).

A moved run is an approximation, not a replay. Each cached cell was computed with
attention over whatever preceded it *then* -- including the lines that have since
slid out of the window -- so its keys and values differ from a cold evaluation of
the new prompt. Measured on the tests' tiny f32 CodeGen (``phi2``, f16 KV), one
line slid out of a 90-token window, 12 windows (``benchmarks/sliding_accuracy.py``):
the logprobs differ from a cold evaluation by up to 0.35 over the whole vocabulary,
0.18 on the tokens greedy decoding picks, and all 12 greedy 20-token continuations
are identical (a wider scratch run saw 1 of 16 differ); against the exact
equivalent without a shift (the same cells left in place, the dropped ones
removed) they agree within 1.4e-3, the rounding of re-rotating f16 keys.

The policy here is pure Python on token lists; the scheduler picks a slot with
:func:`choose_slot` (the one saving the most tokens) and queues the ops, the backend
applies them. :func:`plan_reuse` keeps the common prefix, then repeatedly takes the
*longest* run of cached tokens (after the previous run) that continues the
prompt, as long as it is at least ``min_chunk`` tokens; runs shorter than that
are not worth the approximation nor the re-rotation of the whole KV stream.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fastpilot.backends.scheduler_state import KvOp, KvRemove, KvShift, Slot

__all__ = [
    "MIN_COPY",
    "Chunk",
    "Reuse",
    "choose_slot",
    "common_prefix",
    "plan_reuse",
    "reuse_ops",
    "runs",
]

# Fewest prompt tokens worth a cached prefix, or copying another slot's KV stream for.
# The copy moves the whole stream (n_ctx cells x layers), about the cost of a few tokens.
MIN_COPY = 16


@dataclass(frozen=True, slots=True)
class Chunk:
    """Cached tokens at positions ``[src, src + length)`` that the prompt holds at
    ``[dst, dst + length)``; moving them is a shift by ``dst - src``."""

    src: int
    dst: int
    length: int

    @property
    def delta(self) -> int:
        return self.dst - self.src


@dataclass(frozen=True, slots=True)
class Reuse:
    """How a slot's cached tokens serve a prompt: a prefix kept in place, then runs moved.

    The chunks follow each other in the prompt (the first starts at ``prefix``), so
    the prompt's first :attr:`tokens` tokens are all reused and the rest evaluated.
    """

    prefix: int
    chunks: tuple[Chunk, ...] = ()

    @property
    def shifted(self) -> int:
        """Prompt tokens whose KV is moved rather than kept in place."""
        return sum(c.length for c in self.chunks)

    @property
    def tokens(self) -> int:
        """Prompt tokens whose KV is reused: the prompt's first ``tokens`` tokens."""
        return self.prefix + self.shifted


def _common_run(a: Sequence[int], i: int, b: Sequence[int], j: int, room: int) -> int:
    """Length of the common run of ``a[i:]`` and ``b[j:]``, at most ``room``.

    Compares slices (one C-level comparison each) in doubling steps, then halves the
    step that failed: O(log n) comparisons instead of a Python loop per token.
    """
    n, step = 0, 16
    while n < room:
        k = min(step, room - n)
        if a[i + n : i + n + k] == b[j + n : j + n + k]:
            n += k
            step *= 2
            continue
        while k > 1:  # the first mismatch lies in [n, n + k)
            half = k // 2
            if a[i + n : i + n + half] == b[j + n : j + n + half]:
                n, k = n + half, k - half
            else:
                k = half
        return n
    return n


def _longest_run(
    cached: Sequence[int],
    prompt: Sequence[int],
    head_c: int,
    head_p: int,
    where: dict[int, list[int]],
    min_chunk: int,
) -> tuple[int, int] | None:
    """``(src, length)`` of the longest run ``cached[src:]`` (``src >= head_c``) that
    continues ``prompt[head_p:]``, at least ``min_chunk`` long; the earliest of equals."""
    room_p = len(prompt) - head_p
    if room_p < min_chunk:
        return None
    best: tuple[int, int] | None = None
    need = min_chunk  # a candidate must match at least this many tokens to win
    candidates = where.get(prompt[head_p], [])
    for src in candidates[bisect_left(candidates, head_c) :]:
        room = min(len(cached) - src, room_p)
        if room < need:  # need <= room_p here, so the cache ends too soon: and it ends
            break  # sooner still for every later (ascending) candidate
        # Cheap filter before measuring: the token that decides whether it can win.
        if cached[src + need - 1] != prompt[head_p + need - 1]:
            continue
        n = _common_run(cached, src, prompt, head_p, room)
        if n >= need:
            best, need = (src, n), n + 1
            if n == room_p:
                break  # the rest of the prompt: nothing is longer
    return best


def plan_reuse(cached: Sequence[int], prompt: Sequence[int], min_chunk: int) -> Reuse:
    """The reuse of ``cached`` (a slot's tokens, positions ``0..``) for ``prompt``.

    The common prefix is always kept. With ``min_chunk > 0``, runs of at least
    ``min_chunk`` cached tokens that continue the prompt are moved into place, in
    order, each the longest available after the previous one. The prompt's last
    token is never reused: its logits pick the first generated token, so it must be
    evaluated. ``min_chunk == 0`` turns the shifting off (the prefix cache alone).
    Costs a pass over ``cached`` plus a few slice comparisons per candidate run.
    """
    limit = len(prompt) - 1
    n = min(len(cached), limit)
    prefix = 0
    while prefix < n and cached[prefix] == prompt[prefix]:
        prefix += 1
    if min_chunk <= 0 or prefix >= limit:
        return Reuse(prefix)
    where: dict[int, list[int]] = {}
    for pos in range(prefix, len(cached)):
        where.setdefault(cached[pos], []).append(pos)
    chunks: list[Chunk] = []
    head_c = head_p = prefix
    while head_p < limit:
        found = _longest_run(cached, prompt, head_c, head_p, where, min_chunk)
        if found is None:
            break
        src, length = found
        length = min(length, limit - head_p)  # leave the last prompt token to evaluate
        chunks.append(Chunk(src, head_p, length))
        head_c, head_p = src + length, head_p + length
    return Reuse(prefix, tuple(chunks))


def reuse_ops(seq_id: int, cached_len: int, reuse: Reuse) -> list[KvOp]:
    """The KV ops that turn a slot holding ``cached_len`` cells into ``reuse``'s tokens.

    Per chunk: drop the cells between the previous chunk's new end and this chunk
    (cached tokens the prompt skips), then shift the chunk down into place; last,
    drop every cell past the reused tokens. Applied in order, the slot then holds
    the prompt's first ``reuse.tokens`` tokens at positions ``0..reuse.tokens - 1``.
    """
    ops: list[KvOp] = []
    end = reuse.prefix  # cells [0, end) hold the prompt's first tokens
    tail = reuse.prefix  # cached cells from here on are still at their old places
    for c in reuse.chunks:
        if c.src > end:
            ops.append(KvRemove(seq_id, end, c.src))
        ops.append(KvShift(seq_id, c.src, c.src + c.length, c.delta))
        end, tail = end + c.length, c.src + c.length
    if tail < cached_len:
        ops.append(KvRemove(seq_id, end))
    return ops


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def runs(ids: Iterable[int]) -> int:
    """Maximal runs of consecutive integers in ``ids`` ({0, 1, 3} has two)."""
    s = set(ids)
    return sum(1 for i in s if i - 1 not in s)


def choose_slot(slots: list[Slot], prompt: list[int], cache_reuse: int = 0) -> Slot:
    """The free slot for ``prompt``: the most cached tokens reused (prefix, and runs of
    >= ``cache_reuse`` shifted into place), if >= MIN_COPY, wins; else the one keeping
    busy ids contiguous (llama.cpp: one graph per run of consecutive sequence ids),
    else the least recently used; ties go to the lower id."""
    busy = {s.seq_id for s in slots if s.busy}

    def rank(s: Slot) -> tuple[int, int, int]:
        saved = plan_reuse(s.tokens, prompt, cache_reuse).tokens
        return (saved if saved >= MIN_COPY else 0, -runs(busy | {s.seq_id}), -s.last_used)

    return max((s for s in slots if not s.busy), key=rank)
