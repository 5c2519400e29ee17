"""The llama.cpp batching policy (fastpilot.backends.scheduler) driven with token lists only.

No model and no native library: each test plays the backend's part -- admit,
plan a step, pretend it was decoded, feed sampled tokens back -- and checks one
rule of the policy (slot choice, contiguity, the prompt cache, KV copies, shared
prefills, chunked prefill, finishing, batch order).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fastpilot.backends.base import FinishReason
from fastpilot.backends.prefill import alone_tokens, batch_tokens, prefill_budget
from fastpilot.backends.scheduler import (
    MIN_COPY,
    KvCopy,
    KvRemove,
    Plan,
    Scheduler,
    Seq,
    SeqState,
    Verdict,
    batch_capacity,
    choose_slot,
    runs,
)

EOS = 0


def sched(slots: int = 4, chunk: int = 64, ctx: int = 256) -> Scheduler[str]:
    return Scheduler(slots, chunk, ctx, eos_token_ids={EOS})


def toks(start: int, n: int) -> list[int]:
    """``n`` distinct non-EOS token ids from ``start``."""
    return list(range(start, start + n))


def start(s: Scheduler[str], prompt: list[int], max_tokens: int = 1, name: str = "") -> Seq[str]:
    seq = s.add(name, prompt, max_tokens)
    s.admit()
    return seq


def step(s: Scheduler[str], pick: Callable[[Seq[str]], int] | None = None) -> Plan[str]:
    """Plan one step, pretend it was decoded, sample ``pick(seq)`` (default 900 + generated)."""
    plan = s.plan_step()
    for sample in s.update_from_output(plan.entries):
        token = pick(sample.seq) if pick else 900 + sample.seq.generated
        s.on_token(sample.seq, token)
    return plan


def run_all(s: Scheduler[str]) -> list[Plan[str]]:
    plans = []
    while s.running:
        plans.append(step(s))
    return plans


def slot_of(seq: Seq[str]) -> int:
    assert seq.slot is not None
    return seq.slot.seq_id


# -- slot choice ------------------------------------------------------------------------
def test_runs_counts_maximal_runs_of_consecutive_ids() -> None:
    assert runs(set()) == 0
    assert runs({0, 1, 2, 3}) == 1
    assert runs({0, 2, 3}) == 2
    assert runs({0, 2, 4}) == 3


def test_a_cached_prefix_of_at_least_min_copy_tokens_picks_the_slot() -> None:
    s = sched(slots=2)
    a, c = toks(100, 30), toks(200, 30)
    assert slot_of(start(s, a)) == 0
    run_all(s)
    assert slot_of(start(s, c)) == 1  # the other slot: least recently used
    run_all(s)
    # slot 1 (holding c) was used last; the prompt cache still finds a's slot.
    again = start(s, a + c[:5])
    assert slot_of(again) == 0 and again.cached_tokens == 30
    assert again.todo == c[:5]
    run_all(s)
    other = start(s, c + a[:5])
    assert slot_of(other) == 1 and other.cached_tokens == 30


def test_a_shorter_shared_prefix_does_not_beat_least_recently_used() -> None:
    s = sched(slots=2)
    a = toks(100, 40)
    start(s, toks(300, 20))  # slot 0
    run_all(s)
    start(s, a)  # slot 1, used last
    run_all(s)
    short = start(s, a[: MIN_COPY - 1] + toks(500, 10))
    assert slot_of(short) == 0 and short.cached_tokens == 0  # LRU, not a's slot
    run_all(s)
    enough = start(s, a[:MIN_COPY] + toks(600, 10))
    assert slot_of(enough) == 1 and enough.cached_tokens == MIN_COPY


def test_busy_slots_stay_contiguous_before_least_recently_used() -> None:
    s = sched(slots=4)
    seqs = [start(s, toks(100 * (i + 1), 6), max_tokens=400) for i in range(3)]
    assert [slot_of(x) for x in seqs] == [0, 1, 2]
    step(s)
    s.finish(seqs[1], FinishReason.CANCELLED)
    # Slot 3 was never used (least recently used); slot 1 keeps {0, 1, 2} one run.
    late = start(s, toks(700, 6), max_tokens=400)
    assert slot_of(late) == 1


def test_choose_slot_ranks_prefix_then_runs_then_age() -> None:
    s = sched(slots=4)
    slots = s.slots
    slots[0].busy = slots[2].busy = True
    slots[1].last_used, slots[3].last_used = 5, 1
    assert choose_slot(slots, [1, 2, 3]).seq_id == 1  # joins 0 and 2 into one run
    slots[3].tokens = toks(100, MIN_COPY)
    assert choose_slot(slots, toks(100, MIN_COPY) + [7]).seq_id == 3  # prefix first


# -- prompt cache -------------------------------------------------------------------------
def test_reused_prefix_is_trimmed_and_only_the_rest_evaluated() -> None:
    s = sched(slots=1, chunk=64)
    base = toks(100, 40)
    start(s, base)
    run_all(s)
    assert s.slots[0].tokens == base  # the KV of the prompt (the generated token was not fed)
    longer = base + toks(200, 10)
    seq = start(s, longer, max_tokens=2)
    plan = s.plan_step()
    assert plan.kv_ops == ()  # nothing to drop: the slot holds exactly a prefix
    (entry,) = plan.entries
    assert entry.pos0 == 40 and list(entry.tokens) == longer[40:] and entry.n_logits == 1
    assert seq.cached_tokens == 40
    run_all(s)
    # Identical prompt again: all cached but the last token, whose logits pick the first.
    same = start(s, longer)
    assert same.cached_tokens == len(longer) - 1
    plan = s.plan_step()
    assert plan.kv_ops == (KvRemove(0, len(longer) - 1),)  # drop the last prompt + generated
    assert [list(e.tokens) for e in plan.entries] == [longer[-1:]]
    assert s.counters["cached_prompt_tokens"] == 40 + len(longer) - 1


def test_refused_partial_removal_restarts_the_prompt() -> None:
    s = sched(slots=1)
    base = toks(100, 30)
    start(s, base)
    run_all(s)
    seq = start(s, base[:20] + toks(400, 5))
    assert s.take_kv_ops() == (KvRemove(0, 20),)
    s.kv_restarted(0)  # e.g. a recurrent memory: the executor cleared the slot
    assert seq.cached_tokens == 0 and seq.todo == seq.prompt and s.slots[0].tokens == []
    (entry,) = s.plan_step().entries
    assert entry.pos0 == 0 and list(entry.tokens) == seq.prompt


def test_a_running_sequence_with_a_longer_prefix_is_copied() -> None:
    s = sched(slots=2, chunk=64)
    base = toks(100, 60)
    donor = start(s, base, max_tokens=20, name="donor")
    step(s)  # prefilled; its first token sampled
    step(s)  # that token decoded: the donor's KV holds base + 1
    late = start(s, base + toks(300, 8), name="late")
    assert slot_of(late) == 1
    ops = s.take_kv_ops()
    assert ops == (KvRemove(1), KvCopy(0, 1), KvRemove(1, 60))
    assert late.cached_tokens == 60 and late.todo == toks(300, 8)
    assert s.counters["prefix_copies"] == 1
    assert slot_of(donor) == 0


def test_no_copy_when_the_donor_is_less_than_min_copy_tokens_ahead() -> None:
    s = sched(slots=2, chunk=64)
    base = toks(100, 60)
    start(s, base[:50])  # leaves slot 0 holding 50 tokens of base
    run_all(s)
    start(s, base, max_tokens=20)  # takes slot 0 (50 cached) and runs on
    step(s)
    step(s)  # slot 0 now holds base + [900]
    late = start(s, base + [7])  # free slot 1 holds nothing: 60 >= 0 + MIN_COPY, copy
    assert s.take_kv_ops() == (KvRemove(1), KvCopy(0, 1), KvRemove(1, 60))
    s.finish(late, FinishReason.CANCELLED)
    # Slot 1 keeps 60 tokens of base; the donor shares 61 with this prompt: not worth it.
    third = start(s, base + [900, 5])
    assert slot_of(third) == 1 and third.cached_tokens == 60
    assert s.take_kv_ops() == ()
    assert s.counters["prefix_copies"] == 1


def test_identical_prompts_prefill_once_and_share_the_first_logits() -> None:
    s = sched(slots=4, chunk=8)
    prompt = toks(100, 20)
    seqs = [s.add(f"r{i}", prompt, 5) for i in range(3)]
    s.admit()
    leader, followers = seqs[0], seqs[1:]
    assert all(f.leader is leader for f in followers) and leader.followers == followers
    assert s.take_kv_ops() == ()  # no donor copy: followers wait for the leader
    for _ in range(3):  # 8 + 8 + 4 prompt tokens
        plan = s.plan_step()
        assert [e.seq for e in plan.entries] == [leader]  # followers never prefill
        last = s.update_from_output(plan.entries)
    assert [x.seq for x in last] == [*followers, leader]  # followers first, same row
    assert len({x.row for x in last}) == 1
    ops = s.take_kv_ops()
    assert ops == tuple(
        op for f in followers for op in (KvRemove(slot_of(f)), KvCopy(slot_of(leader), slot_of(f)))
    )
    assert all(f.cached_tokens == len(prompt) and f.todo == [] for f in followers)
    assert s.counters["shared_prefills"] == 2
    assert s.counters["prompt_tokens_evaluated"] == len(prompt)  # once, not three times


def test_a_cancelled_leader_hands_its_prefill_to_the_first_follower() -> None:
    s = sched(slots=3, chunk=8)
    prompt = toks(100, 20)
    lead, f1, f2 = (s.add(n, prompt, 5) for n in ("a", "b", "c"))
    s.admit()
    s.finish(lead, FinishReason.CANCELLED)
    assert f1.leader is None and f1.followers == [f2] and f2.leader is f1
    (entry,) = s.plan_step().entries
    assert entry.seq is f1


# -- steps ----------------------------------------------------------------------------------
def test_prefill_is_chunked_and_shares_the_budget_in_admission_order() -> None:
    s = sched(slots=2, chunk=8)
    a = start(s, toks(100, 20), max_tokens=3, name="a")
    b = start(s, toks(200, 5), max_tokens=3, name="b")
    sizes = []
    for _ in range(4):
        plan = step(s)
        sizes.append({e.seq.owner: (len(e.tokens), e.n_logits) for e in plan.entries})
    assert sizes == [
        {"a": (8, 0)},
        {"a": (8, 0)},
        {"a": (4, 1), "b": (4, 0)},  # a's last chunk wants logits, b's first does not
        {"a": (1, 1), "b": (1, 1)},  # a decodes its first token; b ends its prompt
    ]
    assert a.state is SeqState.DECODING and b.state is SeqState.DECODING


def test_prefill_budget_is_large_alone_and_small_beside_decoding_streams() -> None:
    assert prefill_budget(0, alone=1024, busy=256) == 1024
    assert prefill_budget(1, alone=1024, busy=256) == 256
    assert prefill_budget(3, alone=1024, busy=256) == 256
    assert prefill_budget(0, alone=64, busy=256) == 256  # never below the busy chunk
    # n_batch covers both kinds of step: the alone chunk, or chunk + slots + drafts.
    assert batch_tokens(slots=4, busy=256, drafts=24, alone=1024) == 1024
    assert batch_tokens(slots=4, busy=256, drafts=24, alone=256) == 284
    assert batch_capacity(4, 256, 8, 1024) == 1024 and batch_capacity(4, 256) == 260


def test_a_prompt_alone_is_prefilled_in_large_chunks_then_small_beside_a_decoder() -> None:
    s: Scheduler[str] = Scheduler(2, 8, 256, eos_token_ids={EOS}, prefill_alone=32)
    assert s.capacity == 32
    a = start(s, toks(100, 70), max_tokens=20, name="a")
    sizes = [len(step(s).entries[0].tokens) for _ in range(3)]
    assert sizes == [32, 32, 6]  # alone: three steps for 70 tokens, not nine of 8
    assert a.state is SeqState.DECODING
    b = start(s, toks(300, 40), max_tokens=3, name="b")
    plan = step(s)
    # a decodes a token, so b's prompt goes in chunks of 8: a's latency stays bounded.
    assert {e.seq.owner: len(e.tokens) for e in plan.entries} == {"a": 1, "b": 8}
    assert b.todo == toks(308, 32)
    assert sum(len(e.tokens) for e in plan.entries) <= s.capacity


def test_without_prefill_alone_every_step_uses_the_prompt_chunk() -> None:
    s = sched(slots=2, chunk=8)
    assert s.prefill_alone == 8 and s.capacity == 10
    start(s, toks(100, 20), max_tokens=1)
    assert [len(step(s).entries[0].tokens) for _ in range(3)] == [8, 8, 4]


def test_batches_are_ordered_by_slot_not_by_admission() -> None:
    s = sched(slots=3)
    x = start(s, toks(100, 4), max_tokens=50)
    y = start(s, toks(200, 4), max_tokens=50)
    step(s)
    s.finish(x, FinishReason.CANCELLED)  # frees slot 0 (now more recent than slot 2)
    z = start(s, toks(300, 4), max_tokens=50)
    w = start(s, toks(400, 4), max_tokens=50)
    assert [slot_of(q) for q in s.running] == [1, 2, 0]  # y, z, w in admission order
    plan = s.plan_step()
    assert [e.seq_id for e in plan.entries] == [0, 1, 2]
    assert [e.seq for e in plan.entries] == [w, y, z]


def test_sequences_wait_for_a_free_slot() -> None:
    s = sched(slots=1)
    first = s.add("first", toks(100, 4), 2)
    second = s.add("second", toks(200, 4), 2)
    assert s.admit() == [first]
    assert second.state is SeqState.WAITING and second.slot is None
    run_all(s)
    assert s.admit() == [second] and second.state is SeqState.PREFILLING


# -- finishing --------------------------------------------------------------------------
def test_cancellation_frees_the_slot_at_once() -> None:
    s = sched(slots=1)
    seq = start(s, toks(100, 4), max_tokens=50)
    step(s)
    waiting = s.add("next", toks(200, 4), 5)
    assert s.admit() == []
    s.finish(seq, FinishReason.CANCELLED)
    assert seq.state is SeqState.FINISHED and seq.finish_reason is FinishReason.CANCELLED
    assert not s.slots[0].busy and s.running == []
    assert s.admit() == [waiting]


def test_failed_sequence_drops_its_kv() -> None:
    s = sched(slots=1)
    seq = start(s, toks(100, 4), max_tokens=50)
    step(s)
    s.finish(seq, FinishReason.CANCELLED, kv_lost=True)
    assert s.slots[0].tokens == [] and s.take_kv_ops() == (KvRemove(0),)


@pytest.mark.parametrize(
    ("token", "max_tokens", "ctx", "verdict"),
    [
        (EOS, 5, 256, Verdict(emit=False, finish=FinishReason.STOP)),  # no step for EOS
        (7, 1, 256, Verdict(emit=True, finish=FinishReason.LENGTH)),  # max_tokens
        (7, 50, 5, Verdict(emit=True, finish=FinishReason.LENGTH)),  # 4 prompt + 1: full
        (7, 5, 256, Verdict(emit=True)),
    ],
)
def test_on_token_finishes_on_eos_max_tokens_and_full_context(
    token: int, max_tokens: int, ctx: int, verdict: Verdict
) -> None:
    s = sched(slots=1, ctx=ctx)
    seq = start(s, toks(100, 4), max_tokens=max_tokens)
    plan = s.plan_step()
    (sample,) = s.update_from_output(plan.entries)
    assert s.on_token(sample.seq, token) == verdict
    finished = verdict.finish is not None
    assert (seq.state is SeqState.FINISHED) == finished
    assert seq.finish_reason is verdict.finish
    assert s.slots[0].busy is not finished
    if not finished:
        assert seq.state is SeqState.DECODING and seq.next_token == token


def test_zero_max_tokens_finishes_at_admission() -> None:
    s = sched(slots=1)
    seq = start(s, toks(100, 4), max_tokens=0)
    assert seq.finish_reason is FinishReason.LENGTH and not s.slots[0].busy
    assert s.plan_step().entries == ()


def test_entries_carry_positions_and_samples_their_batch_rows() -> None:
    s = sched(slots=3, chunk=8)
    a = start(s, toks(100, 3), max_tokens=9, name="a")
    b = start(s, toks(200, 2), max_tokens=9, name="b")
    step(s)  # both prompts in; each sampled its first token
    c = start(s, toks(300, 5), max_tokens=9, name="c")
    plan = s.plan_step()
    got = [(e.seq.owner, e.pos0, list(e.tokens), e.n_logits) for e in plan.entries]
    assert got == [
        ("a", 3, [900], 1),  # a's sampled token goes in at position len(prompt)
        ("b", 2, [900], 1),
        ("c", 0, toks(300, 5), 1),
    ]
    samples = s.update_from_output(plan.entries)
    # Rows index the batch: one per token, each sample at its entry's last token.
    assert [(x.seq, x.row) for x in samples] == [(a, 0), (b, 1), (c, 6)]
    assert [len(q.slot.tokens) for q in (a, b, c)] == [4, 3, 5]  # type: ignore[union-attr]


def test_a_prompt_alone_goes_in_kv_pad_steps_without_flash_attention() -> None:
    # Without flash attention every padded KV cell of a step is computed, so a cold
    # prompt costs less in 256-cell steps; with it (or llama.cpp's own choice) 1024.
    assert alone_tokens(False) == 256
    assert alone_tokens(True) == alone_tokens(None) == 1024
