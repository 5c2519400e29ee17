"""The sliding-window prompt cache (fastpilot.backends.kv_reuse) on token lists, no model.

Which cached runs are reused and where they move (:func:`plan_reuse`), that the KV
ops (:func:`reuse_ops`) leave a slot holding exactly the prompt's first tokens at
positions ``0..n-1`` -- checked on a small model of llama.cpp's KV cells that
applies ``seq_rm`` / ``seq_add`` with llama.cpp's rules --, and how the scheduler
uses both: slot choice by tokens saved, counters, no shift with ``cache_reuse=0``.
The real shift on a real model is tests/test_kv_reuse_llamacpp.py.
"""

from __future__ import annotations

import random

import pytest

from fastpilot.backends.base import FinishReason
from fastpilot.backends.kv_reuse import Chunk, Reuse, plan_reuse, reuse_ops
from fastpilot.backends.scheduler import (
    KvCopy,
    KvOp,
    KvRemove,
    KvShift,
    Scheduler,
    choose_slot,
)
from fastpilot.backends.scheduler_state import Slot


class Cells:
    """One slot's KV cells as llama.cpp keeps them: position -> token.

    ``seq_rm(p0, p1)`` drops positions in ``[p0, p1)`` (negative p0: from 0, negative
    p1: to the end); ``seq_add(p0, p1, d)`` moves positions in ``[p0, p1)`` by ``d``
    and drops cells pushed below 0 (llama_kv_cells::pos_add). Two cells on one
    position, or a batch not starting right after the last position, are the errors
    llama.cpp raises (the batch check ``Y = X + 1``).
    """

    def __init__(self, tokens: list[int]) -> None:
        self.pos = dict(enumerate(tokens))

    def apply(self, op: KvOp) -> None:
        if isinstance(op, KvShift):
            hi = op.end if op.end >= 0 else 1 << 30
            moved = {p + op.delta: t for p, t in self.pos.items() if op.start <= p < hi}
            kept = {p: t for p, t in self.pos.items() if not op.start <= p < hi}
            assert not moved.keys() & kept.keys(), "a shift landed on occupied positions"
            self.pos = kept | {p: t for p, t in moved.items() if p >= 0}
        elif isinstance(op, KvRemove):
            lo, hi = max(op.start, 0), op.end if op.end >= 0 else 1 << 30
            self.pos = {p: t for p, t in self.pos.items() if not lo <= p < hi}
        else:
            raise AssertionError(f"unexpected op {op}")

    def tokens(self) -> list[int]:
        """The cells in position order; they must be 0..n-1 for a decode to follow."""
        assert sorted(self.pos) == list(range(len(self.pos))), sorted(self.pos)
        return [self.pos[p] for p in range(len(self.pos))]


def apply_plan(cached: list[int], prompt: list[int], min_chunk: int) -> tuple[Reuse, list[int]]:
    reuse = plan_reuse(cached, prompt, min_chunk)
    cells = Cells(cached)
    for op in reuse_ops(3, len(cached), reuse):
        assert op.seq_id == 3
        cells.apply(op)
    return reuse, cells.tokens()


def file_tokens(n: int, seed: int = 0) -> list[list[int]]:
    """A "file" of ``n`` lines, each a few tokens, code-like: a small vocabulary repeats."""
    rng = random.Random(seed)
    return [[rng.randrange(1, 60) for _ in range(rng.randrange(3, 12))] for _ in range(n)]


def window(lines: list[list[int]], first: int, last: int) -> list[int]:
    return [t for line in lines[first:last] for t in line]


# -- plan_reuse ------------------------------------------------------------------------
def test_a_window_slid_by_one_line_is_one_chunk_moved_down() -> None:
    lines = file_tokens(40)
    old = window(lines, 0, 30) + [99, 98, 97]  # the prompt, then what was generated
    new = window(lines, 1, 31)
    k = len(lines[0])
    reuse, held = apply_plan(old, new, 8)
    assert reuse == Reuse(0, (Chunk(k, 0, len(window(lines, 1, 30))),))
    assert reuse.chunks[0].delta == -k
    assert held == new[: reuse.tokens] and reuse.tokens == len(new) - len(lines[30])


def test_the_last_prompt_token_is_always_evaluated() -> None:
    lines = file_tokens(20)
    old = window(lines, 0, 20)
    new = window(lines, 2, 20)  # entirely inside the cache
    reuse, held = apply_plan(old, new, 4)
    assert reuse.tokens == len(new) - 1 and held == new[:-1]
    same, held = apply_plan(old, old, 4)  # a pure prefix hit keeps the same rule
    assert same == Reuse(len(old) - 1) and held == old[:-1]


def test_zero_min_chunk_keeps_the_prefix_only() -> None:
    lines = file_tokens(20)
    old = window(lines, 0, 20)
    new = window(lines, 0, 5) + window(lines, 6, 20)  # a line deleted in the middle
    assert plan_reuse(old, new, 0) == Reuse(len(window(lines, 0, 5)))
    reuse, held = apply_plan(old, new, 4)
    assert reuse.prefix == len(window(lines, 0, 5)) and reuse.chunks
    assert held == new[: reuse.tokens] and reuse.tokens == len(new) - 1


def test_runs_shorter_than_min_chunk_are_not_moved() -> None:
    cached = list(range(100, 140))
    reuse = plan_reuse(cached, [*range(100, 110), 8, 9], 10)
    assert reuse == Reuse(10)  # a prefix is always kept, whatever its length
    reuse = plan_reuse([5, *cached], [*range(100, 110), 8, 9], 10)
    assert reuse == Reuse(0, (Chunk(1, 0, 10),))
    assert plan_reuse([5, *cached], [*range(100, 110), 8, 9], 11) == Reuse(0)


def test_reused_tokens_are_the_prompts_first_ones() -> None:
    """KV cells must sit at 0..n-1 before the rest is evaluated after them: a run that
    matches only after a new first token is of no use."""
    cached = list(range(100, 140))
    assert plan_reuse(cached, [7, *range(100, 130), 8], 4) == Reuse(0)


def test_the_longest_run_wins_over_the_first() -> None:
    body = list(range(200, 260))
    cached = [1, *body[:12], 2, *body, 3]  # a 12-token copy of the start comes first
    prompt = [*body, 4]
    reuse, held = apply_plan(cached, prompt, 8)
    assert reuse.chunks == (Chunk(14, 0, len(body)),)
    assert held == body


def test_deleted_and_skipped_cache_runs_give_several_chunks() -> None:
    a, b, c, d = (list(range(s, s + 20)) for s in (100, 200, 300, 400))
    cached = a + b + c + d + [7, 7]
    prompt = b + d + [5, 6]  # a slid out, c deleted, then new text
    reuse, held = apply_plan(cached, prompt, 16)
    assert reuse.chunks == (Chunk(20, 0, 20), Chunk(60, 20, 20))
    assert held == b + d and reuse.tokens == 40


def _longest_after(cached: list[int], prompt: list[int], head_c: int, head_p: int) -> int:
    """Brute force: the longest run of cached[src:] (src >= head_c) continuing prompt[head_p:]."""
    best = 0
    for src in range(head_c, len(cached)):
        n = 0
        while (
            src + n < len(cached)
            and head_p + n < len(prompt)
            and cached[src + n] == prompt[head_p + n]
        ):
            n += 1
        best = max(best, n)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_random_edits_reuse_the_longest_runs_and_leave_consistent_cells(seed: int) -> None:
    """Slides, deletions, insertions and rewrites of a code-like file: the cells end up as
    the prompt's first tokens at 0..n-1, and each chunk is the longest available."""
    rng = random.Random(seed)
    lines = file_tokens(60, seed)
    first = rng.randrange(0, 10)
    cached = window(lines, first, first + 35) + [rng.randrange(1, 60) for _ in range(5)]
    edited = [list(x) for x in lines]
    for _ in range(rng.randrange(0, 4)):  # edits in the middle
        i = rng.randrange(first, first + 35)
        op = rng.choice(("del", "ins", "rewrite"))
        if op == "del":
            del edited[i]
        elif op == "ins":
            edited.insert(i, [rng.randrange(1, 60) for _ in range(4)])
        else:
            edited[i] = [rng.randrange(1, 60) for _ in range(len(edited[i]))]
    start = first + rng.randrange(0, 4)
    prompt = window(edited, start, start + 33)
    min_chunk = rng.choice((1, 4, 8, 32))
    reuse, held = apply_plan(cached, prompt, min_chunk)
    assert held == prompt[: reuse.tokens] and reuse.tokens <= len(prompt) - 1
    head_c = head_p = reuse.prefix
    for c in reuse.chunks:
        assert c.dst == head_p and c.src >= head_c and c.length >= 1
        longest = _longest_after(cached, prompt, head_c, head_p)
        assert longest >= min_chunk
        assert c.length == min(longest, len(prompt) - 1 - head_p)
        head_c, head_p = c.src + c.length, head_p + c.length
    if head_p < len(prompt) - 1:  # it stopped because nothing long enough was left
        assert _longest_after(cached, prompt, head_c, head_p) < min_chunk


def test_a_dropped_or_wrong_shift_leaves_cells_a_decode_cannot_follow() -> None:
    """The cell model above catches the mistakes the native test catches on a model."""
    lines = file_tokens(30)
    old, new = window(lines, 0, 25), window(lines, 1, 26)
    ops = reuse_ops(0, len(old), plan_reuse(old, new, 8))
    assert any(isinstance(op, KvShift) for op in ops)
    for broken in (
        [op for op in ops if not isinstance(op, KvShift)],
        [
            KvShift(op.seq_id, op.start, op.end, op.delta + 1) if isinstance(op, KvShift) else op
            for op in ops
        ],
    ):
        cells = Cells(old)
        for op in broken:
            cells.apply(op)
        with pytest.raises(AssertionError):
            assert cells.tokens() == new[: len(cells.pos)]


# -- the scheduler ---------------------------------------------------------------------
def _finish(s: Scheduler[str], prompt: list[int], generated: list[int]) -> None:
    """Admit, prefill and generate ``generated`` (then max_tokens ends it)."""
    s.add("x", prompt, len(generated))
    s.admit()
    s.take_kv_ops()
    it = iter(generated)
    while s.running:
        plan = s.plan_step()
        for sample in s.update_from_output(plan.entries):
            s.on_token(sample.seq, next(it))


def test_scheduler_shifts_a_slid_prompt_and_evaluates_only_the_rest() -> None:
    lines = file_tokens(40)
    s: Scheduler[str] = Scheduler(2, 512, 512, eos_token_ids={0}, cache_reuse=16)
    old = window(lines, 0, 30)
    _finish(s, old, [90, 91, 92])
    slot0 = s.slots[0]
    assert slot0.tokens == old + [90, 91]  # the last sampled token never entered the KV
    cells = Cells(list(slot0.tokens))
    new = window(lines, 1, 31)
    seq = s.add("y", new, 4)
    s.admit()
    plan = s.plan_step()
    assert seq.slot is slot0
    for op in plan.kv_ops:
        assert op.seq_id == 0
        cells.apply(op)
    kept = len(window(lines, 1, 30))
    assert cells.tokens() == new[:kept] == slot0.tokens
    assert seq.cached_tokens == kept and seq.todo == new[kept:]
    (entry,) = plan.entries
    assert entry.pos0 == kept and list(entry.tokens) == new[kept:]
    assert s.counters["kv_shifts"] == 1 and s.counters["shifted_prompt_tokens"] == kept
    assert s.counters["cached_prompt_tokens"] == kept


def test_without_cache_reuse_a_slid_prompt_is_evaluated_again() -> None:
    lines = file_tokens(40)
    s: Scheduler[str] = Scheduler(2, 512, 512, eos_token_ids={0})
    _finish(s, window(lines, 0, 30), [90])
    new = window(lines, 1, 31)
    seq = s.add("y", new, 4)
    s.admit()
    plan = s.plan_step()
    assert not any(isinstance(op, KvShift) for op in plan.kv_ops)
    assert seq.cached_tokens == 0 and s.counters["kv_shifts"] == 0


def test_slot_choice_counts_shifted_tokens() -> None:
    """A slot that would shift 200 tokens into place beats one sharing a 20-token prefix."""
    lines = file_tokens(80, seed=3)
    text = window(lines, 0, 60)
    prompt = window(lines, 2, 62)
    prefix_slot = Slot(0, prompt[:20] + [1, 2, 3], last_used=5)
    slid_slot = Slot(1, text, last_used=1)
    assert choose_slot([prefix_slot, slid_slot], prompt, 0) is prefix_slot
    assert choose_slot([prefix_slot, slid_slot], prompt, 32) is slid_slot


def test_a_donor_copy_is_only_taken_when_it_beats_the_shift() -> None:
    """A running request sharing a prefix is copied only if that beats the free slot's
    shifted reuse by MIN_COPY tokens."""
    lines = file_tokens(60)
    s: Scheduler[str] = Scheduler(3, 1024, 1024, eos_token_ids={0}, cache_reuse=16)
    old = s.add("old", window(lines, 0, 20), 1)
    s.admit()  # slot 0
    short = s.add("short", window(lines, 1, 10), 50)
    long = s.add("long", window(lines, 1, 45), 50)
    s.admit()  # slots 1 and 2: slot 0 is busy, nothing to reuse
    plan = s.plan_step()  # prefills all three; "old" finishes (max_tokens 1)
    for sample in s.update_from_output(plan.entries):
        s.on_token(sample.seq, 90)
    assert old.slot is s.slots[0] and not s.slots[0].busy
    assert short.slot is s.slots[1] and long.slot is s.slots[2]
    s.take_kv_ops()
    seq = s.add("y", window(lines, 1, 41), 4)  # slot 0 would shift 19 lines; "long" has 40
    s.admit()
    ops = s.take_kv_ops()
    assert seq.slot is s.slots[0]
    assert ops[:2] == (KvRemove(0), KvCopy(2, 0)) and s.counters["prefix_copies"] == 1
    assert not any(isinstance(op, KvShift) for op in ops)
    assert seq.cached_tokens == len(window(lines, 1, 41)) - 1
    s.finish(seq, FinishReason.CANCELLED)
    s.finish(long, FinishReason.CANCELLED)
    s.take_kv_ops()
    seq = s.add("z", window(lines, 2, 22), 4)  # now only "short" runs: shift, no copy
    s.admit()
    ops = s.take_kv_ops()
    assert not any(isinstance(op, KvCopy) for op in ops)
    assert any(isinstance(op, KvShift) for op in ops) and s.counters["prefix_copies"] == 1


def test_negative_cache_reuse_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_reuse"):
        Scheduler(1, 16, 64, cache_reuse=-1)
