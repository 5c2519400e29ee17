"""N-gram speculative decoding without a model: the drafter and the scheduler's plans.

The scheduler is driven with token lists only (as in tests/test_scheduler.py):
each test plans a step, pretends it was decoded, feeds "sampled" tokens back
row by row the way the llama.cpp backend does, and checks one rule -- drafts in
one batch entry with logits for each, the KV rollback after a rejection, the
adaptive draft length, no drafting in a busy batch, limits from max_tokens and
the context. The real-model exactness tests are tests/test_speculative_llamacpp.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fastpilot.backends.base import FinishReason
from fastpilot.backends.ngram import NgramDrafter
from fastpilot.backends.scheduler import (
    DRAFT_START,
    SPEC_BUSY,
    KvRemove,
    Plan,
    Scheduler,
    Seq,
    batch_capacity,
)

EOS = 0
LOOP = [5, 6, 7, 8]  # a prompt that repeats this is drafted from itself


def spec(slots: int = 4, chunk: int = 64, ctx: int = 256, draft_max: int = 8) -> Scheduler[str]:
    return Scheduler(slots, chunk, ctx, {EOS}, speculative=True, draft_max=draft_max)


def decoding(s: Scheduler[str], prompt: list[int], max_tokens: int = 100) -> Seq[str]:
    """Admit, prefill and sample a first token that continues the prompt's loop."""
    seq = s.add("", prompt, max_tokens)
    s.admit()
    while seq.todo:
        plan = s.plan_step()
        for sample in s.update_from_output(plan.entries):
            s.on_token(sample.seq, LOOP[len(sample.seq.prompt) % len(LOOP)])
    return seq


def verify(s: Scheduler[str], model: Callable[[Seq[str], int], int]) -> Plan[str]:
    """Plan a step and sample rows like the backend: ``model(seq, i)`` is row i's token."""
    plan = s.plan_step()
    for sample in s.update_from_output(plan.entries):
        i = 0
        while s.on_token(sample.seq, model(sample.seq, i)).more:
            i += 1
    return plan


def loop_model(seq: Seq[str], i: int) -> int:
    """A model that continues LOOP forever (its tokens follow what is in the KV)."""
    assert seq.slot is not None
    return LOOP[(LOOP.index(seq.slot.tokens[-1]) + 1) % len(LOOP)]


# -- the drafter ---------------------------------------------------------------------------


def test_drafter_continues_the_most_recent_match() -> None:
    d = NgramDrafter([1, 2, 3, 10, 11, 1, 2, 3, 20, 21, 22, 1, 2, 3])
    assert d.draft(3) == [20, 21, 22]  # the later "1 2 3" wins over the first
    assert d.draft(1) == [20]


def test_drafter_prefers_longer_ngrams_and_falls_back_to_bigrams() -> None:
    # "9 2 3" is new, so the trigram misses; the bigram "2 3" matched last before "30".
    d = NgramDrafter([1, 2, 3, 10, 2, 3, 30, 9, 2, 3])
    assert d.draft(2) == [30, 9]
    d = NgramDrafter([4, 2, 3, 10, 1, 2, 3, 30, 4, 2, 3])
    assert d.draft(1) == [10]  # the trigram "4 2 3" beats the more recent bigram "2 3"


def test_drafter_has_nothing_without_a_match_and_unigrams_are_not_used() -> None:
    d = NgramDrafter([1, 2, 3, 4, 5, 1])
    assert d.draft(4) == []
    assert NgramDrafter(sizes=(1,), history=[1, 2, 3, 1]).draft(2) == [2, 3]
    assert d.draft(0) == []


def test_drafter_extends_incrementally_and_repeats_periodically() -> None:
    d = NgramDrafter([7, 8])
    assert d.draft(3) == []
    d.extend([7, 8])
    assert d.draft(5) == [7, 8, 7, 8, 7]  # the match overlaps the suffix: a loop continues
    with pytest.raises(ValueError):
        NgramDrafter(sizes=())


# -- planning drafts -------------------------------------------------------------------------


def test_drafts_ride_in_one_entry_with_logits_for_every_token() -> None:
    s = spec()
    seq = decoding(s, LOOP * 4)
    plan = s.plan_step()
    (entry,) = plan.entries
    assert entry.tokens == (seq.next_token, 6, 7, 8, 5)[: 1 + DRAFT_START]
    assert entry.n_logits == len(entry.tokens)
    assert entry.pos0 == len(LOOP * 4)
    (sample,) = s.update_from_output(plan.entries)
    assert sample.drafts == entry.tokens[1:]
    assert sample.row == 0  # the first of the entry's rows


def test_no_drafts_when_speculation_is_off_or_nothing_matches() -> None:
    off = Scheduler[str](4, 64, 256, {EOS})
    seq = off.add("", LOOP * 4, 10)
    off.admit()
    plan = off.plan_step()
    off.update_from_output(plan.entries)
    off.on_token(seq, 5)
    assert off.plan_step().entries[0].tokens == (5,)
    s = spec()
    fresh = s.add("", [1, 2, 3, 4], 10)
    s.admit()
    for sample in s.update_from_output(s.plan_step().entries):
        s.on_token(sample.seq, 99)
    assert s.plan_step().entries[0].tokens == (99,)
    assert fresh.drafts == []


def test_accepted_drafts_stay_and_a_rejection_rolls_the_kv_back() -> None:
    s = spec()
    seq = decoding(s, LOOP * 4)
    assert seq.slot is not None
    L = len(seq.slot.tokens)
    # The model agrees with the first two drafts (6, 7), then says 1 instead of 8.
    plan = verify(s, lambda q, i: [6, 7, 1][i])
    (entry,) = plan.entries
    assert entry.tokens == (5, 6, 7, 8, 5)
    assert seq.slot.tokens[L:] == [5, 6, 7]  # next_token + the two accepted drafts
    assert seq.next_token == 1 and seq.generated == 4 and seq.drafts == []
    assert s.counters["draft_tokens_accepted"] == 2 and seq.accepted == 2
    assert s.counters["draft_tokens_rejected"] == 2 and seq.rejected == 2
    # The cells of 8 and 5 (positions L+3, L+4) are dropped before the next decode.
    nxt = s.plan_step()
    assert nxt.kv_ops == (KvRemove(seq.slot.seq_id, L + 3),)
    assert nxt.entries[0].pos0 == L + 3  # positions stay contiguous


def test_draft_length_adapts_within_one_and_draft_max() -> None:
    s = spec(draft_max=6)
    seq = decoding(s, LOOP * 8)

    def drafted(model: Callable[[Seq[str], int], int]) -> int:
        return len(verify(s, model).entries[0].tokens) - 1

    # The model follows the loop: every draft holds and the length grows to draft_max.
    assert [drafted(loop_model) for _ in range(4)] == [4, 5, 6, 6]
    assert s.counters["draft_tokens_rejected"] == 0
    assert drafted(lambda q, i: 99) == 6  # refused at once: the length halves
    assert seq.draft_len == 3 and s.counters["draft_tokens_rejected"] == 6
    assert drafted(lambda q, i: 5) == 0  # "... 99": no n-gram to match
    assert drafted(loop_model) == 0  # "99 5": still none
    # "5 6" matches again, most recently followed by "99 5": 99 holds, 5 is refused.
    assert drafted(lambda q, i: 99) == 3
    assert seq.draft_len == 1
    assert seq.slot is not None and seq.slot.tokens[-2:] == [6, 99] and seq.next_token == 99
    assert s.counters["draft_tokens_accepted"] == 4 + 5 + 6 + 6 + 1


def test_no_drafting_when_the_batch_is_busy() -> None:
    s = spec(slots=8)
    seqs = [decoding(s, [i * 10 + 1] + LOOP * 4) for i in range(SPEC_BUSY + 2)]
    plan = s.plan_step()
    assert all(len(e.tokens) == 1 for e in plan.entries)  # SPEC_BUSY + 1 others each
    s.update_from_output(plan.entries)
    for q in seqs:
        s.on_token(q, 6)
    s.finish(seqs[-1], FinishReason.CANCELLED)
    plan = s.plan_step()  # now each has SPEC_BUSY others: all speculate
    assert all(len(e.tokens) > 1 for e in plan.entries)
    assert sum(len(e.tokens) for e in plan.entries) <= s.capacity


def test_no_drafting_beside_a_prompt_chunk() -> None:
    s = spec(chunk=16)
    seq = decoding(s, LOOP * 4)
    s.add("other", list(range(100, 140)), 5)
    s.admit()
    plan = s.plan_step()
    mine = next(e for e in plan.entries if e.seq is seq)
    assert mine.tokens == (seq.next_token,)


def test_drafts_never_pass_max_tokens_or_the_context() -> None:
    s = spec()
    seq = decoding(s, LOOP * 4, max_tokens=3)  # one generated: two left, so one draft
    assert len(s.plan_step().entries[0].tokens) == 2
    s2 = spec(ctx=len(LOOP * 4) + 3)
    decoding(s2, LOOP * 4)
    assert len(s2.plan_step().entries[0].tokens) == 2  # cells left for one draft only
    assert seq.generated == 1


def test_finishing_mid_verification_drops_the_unverified_cells() -> None:
    s = spec()
    seq = decoding(s, LOOP * 4, max_tokens=3)
    assert seq.slot is not None
    L = len(seq.slot.tokens)
    verify(s, loop_model)  # the draft (6) holds; max_tokens ends at the third token
    assert seq.finish_reason is FinishReason.LENGTH and seq.generated == 3
    assert seq.slot.tokens[L:] == [5, 6]
    s2 = spec()
    q = decoding(s2, LOOP * 4)
    assert q.slot is not None
    plan = verify(s2, lambda x, i: EOS)  # end of sequence at the first row
    assert q.finish_reason is FinishReason.STOP
    assert s2.take_kv_ops() == (KvRemove(q.slot.seq_id, plan.entries[0].pos0 + 1),)
    assert s2.counters["draft_tokens_rejected"] == DRAFT_START


def test_capacity_holds_the_drafts() -> None:
    assert batch_capacity(4, 64) == 68
    assert spec(slots=4, chunk=64, draft_max=8).capacity == 68 + (SPEC_BUSY + 1) * 8
    with pytest.raises(ValueError):
        Scheduler(1, 1, 16, speculative=True, draft_max=0)


def test_settings_reach_the_llamacpp_options_only() -> None:
    from fastpilot.serve import backend_options
    from fastpilot.settings import SettingsError, load_settings

    s = load_settings(["--speculative", "ngram", "--draft-max", "5"], environ={})
    assert backend_options("gguf", s) == {
        "slots": 4,
        "max_queue": 64,
        "speculative": "ngram",
        "draft_max": 5,
        "flash_attn": "auto",
        "n_ubatch": None,
        "threads_batch": None,
        "kv_type": None,
        "prefill_batch": 1024,
        "cache_reuse": 0,
    }
    assert "speculative" not in backend_options("ct2", s)  # CTranslate2 has no speculation
    assert load_settings([], environ={}).speculative == "off"
    with pytest.raises(SettingsError, match="--speculative must be one of off, ngram"):
        load_settings(["--speculative", "eagle"], environ={}).check()
    with pytest.raises(SettingsError, match="--draft-max"):
        load_settings(["--draft-max", "0"], environ={}).check()


def test_multi_prompt_usage_sums_the_prediction_details() -> None:
    from fastpilot.engine.batch import sum_usage

    base = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    spec_usage = {
        **base,
        "completion_tokens_details": {
            "accepted_prediction_tokens": 2,
            "rejected_prediction_tokens": 1,
        },
    }
    out = sum_usage([spec_usage, base, spec_usage])
    assert out["completion_tokens_details"] == {
        "accepted_prediction_tokens": 4,
        "rejected_prediction_tokens": 2,
    }
    assert "completion_tokens_details" not in sum_usage([base, base])


def test_a_refused_rollback_reevaluates_the_sequence_and_stops_speculating() -> None:
    s = spec()
    seq = decoding(s, LOOP * 4)
    assert seq.slot is not None
    verify(s, lambda q, i: [6, 1][i])  # one draft held, then a rejection
    history = [*(LOOP * 4), 5, 6, 1]  # prompt, next_token, the held draft, the new token
    (op,) = s.plan_step().kv_ops  # planned, but the memory refuses a partial removal
    assert op == KvRemove(seq.slot.seq_id, len(LOOP * 4) + 2)
    s.kv_restarted(op.seq_id)
    plan = s.plan_step()
    assert [e.tokens for e in plan.entries] == [tuple(history[:64])]
    assert plan.entries[0].pos0 == 0 and not s.speculative
    for sample in s.update_from_output(plan.entries):  # the prefill ends on next_token
        assert sample.seq is seq and sample.drafts == ()
        s.on_token(seq, 5)
    assert seq.slot.tokens == history and seq.generated == 4
    assert len(s.plan_step().entries[0].tokens) == 1  # no drafts any more
