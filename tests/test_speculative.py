"""N-gram speculative decoding without a model: the drafter and the scheduler's plans.

The scheduler is driven with token lists only (as in tests/test_scheduler.py):
each test plans a step, pretends it was decoded, feeds "sampled" tokens back
row by row the way the llama.cpp backend does, and checks one rule -- drafts in
one batch entry with logits for each, the KV rollback after a rejection, the
adaptive draft length, drafts of one length across streams (or none), limits from max_tokens and
the context. The real-model exactness tests are tests/test_speculative_llamacpp.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fastpilot.backends.base import FinishReason
from fastpilot.backends.draft_policy import (
    PRIOR_RATIO,
    Acceptance,
    DecodeCost,
    best_shared_len,
)
from fastpilot.backends.ngram import NgramDrafter
from fastpilot.backends.scheduler import (
    DRAFT_SEQS,
    EXPLORE,
    KvRemove,
    Plan,
    Scheduler,
    Seq,
    SeqState,
    batch_capacity,
)

EOS = 0
LOOP = [5, 6, 7, 8]  # a prompt that repeats this is drafted from itself
# Decode-only batch times by width (ms, widths 1..16), measured by batch_cost for
# GPT-2-117M Q4_K_M on 2 EPYC threads: 8 tokens cost 7.3 of one, 16 tokens 7.9.
GPT2_MS = (7.8, 13.5, 17.9, 20.5, 26.4, 26.9, 33.1, 56.9)
GPT2_MS += (56.9, 60.2, 62.4, 64.5, 64.0, 65.9, 70.0, 61.6)


def best_draft_len(p: float, ratio: float, k_max: int) -> int:
    """One stream's draft length on the line ``1 + ratio * (n - 1)``."""
    return best_shared_len([p], k_max, lambda n: 1.0 + ratio * (n - 1))


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
    s = spec(draft_max=4)
    seq = decoding(s, LOOP * 4)
    plan = s.plan_step()
    (entry,) = plan.entries
    assert entry.tokens == (seq.next_token, 6, 7, 8, 5)
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
    s = spec(draft_max=4)
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


def test_draft_length_follows_the_measured_acceptance() -> None:
    s = spec(draft_max=40, ctx=2048)
    seq = decoding(s, LOOP * 8, max_tokens=1000)

    def drafted(model: Callable[[Seq[str], int], int]) -> int:
        return len(verify(s, model).entries[0].tokens) - 1

    # The model follows the loop: every draft holds, the acceptance estimate rises and
    # the drafts lengthen to draft_max.
    lengths = [drafted(loop_model) for _ in range(6)]
    assert lengths == [6, 12, 20, 33, 40, 40]
    assert s.counters["draft_tokens_rejected"] == 0
    assert seq.drafter is not None and seq.drafter.acceptance.rate > 0.95
    # Refused at once, again and again: the estimate falls and the drafts shorten
    # (the steps after each 99 have no n-gram to match, so they draft nothing).
    refused = [n for n in (drafted(lambda q, i: [99, 5, 6, 7, 8][i % 5]) for _ in range(12)) if n]
    assert refused[0] == 40 and refused[-1] < 10 and refused == sorted(refused, reverse=True)
    # A new sequence starts from the model's recent rate, not from scratch.
    # (the model-wide counts remember longer: less moved by the refusals)
    assert seq.drafter.acceptance.rate < s.acceptance.rate < 1
    fresh = decoding(s, [3] + LOOP * 8, max_tokens=1000)
    assert fresh.drafter is not None
    assert fresh.drafter.acceptance.rate == pytest.approx(s.acceptance.rate)


def test_a_run_of_accepted_drafts_counts_as_acceptance() -> None:
    """After n drafted tokens accepted in a row the draft is sized for p = n / (n + 1),
    even when the sequence's average says less; a refusal ends the run."""
    d = NgramDrafter(LOOP * 8)
    d.acceptance = Acceptance(8.0, 8.0)  # a history of refusals: p = 0.5
    d.verified(10, 10)
    assert d.acceptance.rate < 0.75 and d.p == pytest.approx(10 / 11)
    assert best_draft_len(d.p, PRIOR_RATIO, 40) > 12
    d.verified(20, 3)  # refused at the fourth: the run is over
    assert d.p == d.acceptance.rate < 0.75
    s = spec(slots=1, draft_max=40)
    seq = decoding(s, LOOP * 8)
    assert seq.drafter is not None
    seq.drafter.acceptance = Acceptance(8.0, 8.0)
    seq.drafter.verified(10, 10)
    width = len(s.plan_step().entries[0].tokens)
    assert width - 1 == best_draft_len(10 / 11, PRIOR_RATIO, 40) > 12


def test_costly_verification_shortens_the_drafts() -> None:
    """The same acceptance drafts less when the measured batch cost grows faster."""
    lengths = []
    for per_token in (0.001, 0.5):  # seconds per extra token over a 1 s step
        s = spec(draft_max=64)
        for n in (1, 2, 5, 9, 1, 17):
            s.draft_cost.observe_batch([_fake_entry(n)], 1.0 + per_token * (n - 1))
        decoding(s, LOOP * 8)
        lengths.append(len(s.plan_step().entries[0].tokens) - 1)
    assert lengths[0] > lengths[1] >= 1
    s = spec()
    s.draft_cost.observe_batch([_fake_entry(3, n_logits=1)], 99.0)  # a prompt chunk: not a sample
    assert s.draft_cost.ratio == PRIOR_RATIO


def _fake_entry(n: int, n_logits: int | None = None):
    from fastpilot.backends.scheduler import BatchEntry

    return BatchEntry(Seq("", [1], 1), 0, tuple(range(n)), 0, n if n_logits is None else n_logits)


def test_best_draft_len_weighs_acceptance_against_cost() -> None:
    assert best_draft_len(0.0, 0.01, 64) == 0  # nothing will be accepted
    assert best_draft_len(0.99, 0.0, 64) == 64  # free verification: all of it
    assert best_draft_len(0.9, 0.05, 3) == 3  # capped
    by_p = [best_draft_len(p, 1 / 16, 64) for p in (0.3, 0.6, 0.8, 0.9, 0.97)]
    assert by_p == sorted(by_p) and by_p[0] <= 2 and by_p[-1] >= 20
    by_cost = [best_draft_len(0.9, r, 64) for r in (0.01, 0.05, 0.2, 0.8)]
    assert by_cost == sorted(by_cost, reverse=True) and by_cost[-1] <= 1
    # The chosen length beats its neighbours on expected tokens per unit cost.
    p, r = 0.85, 0.1
    k = best_draft_len(p, r, 64)

    def value(j: int) -> float:
        return sum(p**i for i in range(j + 1)) / (1 + r * j)

    assert value(k) >= value(k - 1) and value(k) >= value(k + 1)


def test_acceptance_and_cost_estimates() -> None:
    a = Acceptance()
    assert a.rate == 0.75
    a.record(10, False, 100.0)
    a.record(0, True, 100.0)
    assert a.rate == pytest.approx(13 / 15)
    assert a.prior(4.0).rate == pytest.approx(a.rate)
    a.record(1000, False, 16.0)  # a long run weighs at most 16 tokens: one miss counts
    a.record(0, True, 16.0)
    assert 0.9 < a.rate < 16 / 17 + 1e-9
    c = DecodeCost()
    assert c.ratio == PRIOR_RATIO
    clock = 0.0

    def step(n: int, seconds: float, outside: float, fit: bool = True) -> None:
        nonlocal clock
        clock += outside + seconds
        c.observe(n, seconds, fit=fit, now=clock)

    for n in (1, 1, 1):
        step(n, 0.011, 0.0)
    assert c.ratio == PRIOR_RATIO  # one batch size: no slope yet
    for n in (1, 9, 1, 33, 5):  # t = 10 ms + 1 ms per token: ratio 1/11
        step(n, 0.010 + 0.001 * n, 0.0)
    assert c.ratio == pytest.approx(1 / 11, rel=1e-6)
    # 11 ms spent outside llama_decode per step (sampling, emitting): a drafted token
    # saves that too, so it is relatively cheaper: 1 / (11 + 11).
    for _ in range(400):
        step(1, 0.011, 0.011)
        step(9, 0.019, 0.011)
    assert c.ratio == pytest.approx(1 / 22, rel=1e-3)
    step(1, 0.011, 5.0)  # the worker idle for 5 s: not a step's own time
    step(3, 0.5, 0.011, fit=False)  # a prompt chunk: its gap counts, its time does not
    assert c.ratio == pytest.approx(1 / 22, rel=2e-2)
    c.pin(0.0)  # pinned: the fit is ignored until unpinned
    assert c.ratio == 0.0 and best_draft_len(0.5, c.ratio, 8) == 8
    assert c.relative(9) == 1.0
    c.pin(None)
    assert c.ratio == pytest.approx(1 / 22, rel=2e-2)
    assert c.relative(9) == pytest.approx(1 + 8 * c.ratio)  # no shape: the line


def test_a_measured_shape_is_scaled_by_the_steps_and_their_gap() -> None:
    c = DecodeCost([2.0, 3.0, 4.5])  # normalized to its first width: 1, 1.5, 2.25
    assert c.relative(1) == 1.0 and c.relative(3) == 2.25
    assert c.relative(6) == pytest.approx(4.5)  # past the end: the last width's per token
    clock = 0.0
    for n in (1, 2, 3) * 200:  # a machine twice as slow as the shape's: 10 ms per unit
        clock += 0.010 + 0.010 * c._shape_at(n)
        c.observe(n, 0.010 * c._shape_at(n), now=clock)  # and 10 ms outside each decode
    # (shape + gap) / (1 + gap), the gap in units of the shape: (2.25 + 1) / 2
    assert c.relative(3) == pytest.approx(3.25 / 2, rel=1e-3)
    c.set_shape(None)
    assert c.relative(3) == pytest.approx(1 + 2 * c.ratio)


def test_a_width_timed_too_cheap_at_load_is_corrected_by_its_steps() -> None:
    """The steps the backend runs correct a width the load-time timing got wrong, so the
    policy stops choosing it once it has paid for it a few times."""
    c = DecodeCost([1.0, 1.5, 1.2, 2.5])  # 3 tokens timed at 1.2: really 2.25
    assert best_shared_len([0.8], 3, c.relative) == 2  # the cheap-looking width
    clock = 0.0
    for n, real in [(1, 1.0), (3, 2.25)] * 10:
        clock += 0.01 * real
        c.observe(n, 0.01 * real, now=clock)
    assert c.relative(3) == pytest.approx(2.25, rel=0.05)
    assert best_shared_len([0.8], 3, c.relative) != 2


def next_in_loop(seq: Seq[str], i: int) -> int:
    """Like :func:`loop_model`, and LOOP's first token after anything else."""
    assert seq.slot is not None
    return loop_model(seq, i) if seq.slot.tokens[-1] in LOOP else LOOP[0]


def streams(s: Scheduler[str], prompts: list[list[int]], max_tokens: int = 100) -> list[Seq[str]]:
    """Admit the prompts together and prefill them, each first token continuing LOOP."""
    seqs = [s.add("", p, max_tokens) for p in prompts]
    s.admit()
    while any(q.todo for q in seqs):
        verify(s, next_in_loop)
    assert all(q.state is SeqState.DECODING for q in seqs)
    return seqs


def looping(i: int) -> list[int]:
    """A prompt of its own (distinct first tokens) that loops."""
    return [100 + i] * 4 + LOOP * 4


def test_streams_draft_together_in_one_shape() -> None:
    # llama.cpp splits a batch over per-slot KV streams into micro-batches with an equal
    # token count per sequence: every decoding sequence drafts the same number or none.
    s = spec(slots=8)
    streams(s, [looping(i) for i in range(4)])
    plan = s.plan_step()
    lens = {len(e.tokens) for e in plan.entries}
    assert len(plan.entries) == 4 and len(lens) == 1 and lens.pop() > 1
    assert all(e.n_logits == len(e.tokens) for e in plan.entries)
    assert sum(len(e.tokens) for e in plan.entries) <= s.capacity
    verify(s, loop_model)  # every draft held: one step, the same length again
    assert s.counters["draft_tokens_rejected"] == 0
    assert len({len(e.tokens) for e in s.plan_step().entries}) == 1


def test_the_shortest_proposal_sets_every_streams_draft_length() -> None:
    s = spec(slots=8)
    streams(s, [looping(i) for i in range(3)])
    streams(s, [looping(3)], max_tokens=3)  # one generated, two left: room for one draft
    assert [len(e.tokens) for e in s.plan_step().entries] == [2, 2, 2, 2]


def test_a_stream_without_a_match_drafts_fillers_that_keep_the_shape() -> None:
    s = spec(slots=8)
    seqs = streams(s, [looping(i) for i in range(3)] + [[300, 301, 302, 303, 304]])  # no repeat
    plan = s.plan_step()
    assert [len(e.tokens) for e in plan.entries] == [plan.entries[0].n_logits] * 4
    assert len(plan.entries[0].tokens) > 1
    assert [e.fillers for e in plan.entries] == [0, 0, 0, len(plan.entries[0].tokens) - 1]
    lone = seqs[3].drafter
    assert lone is not None
    before = (lone.acceptance.accepted, lone.acceptance.missed)
    verify(s, next_in_loop)  # the fillers are refused: not evidence against its n-grams
    assert (lone.acceptance.accepted, lone.acceptance.missed) == before
    assert s.counters["draft_tokens_rejected"] >= len(plan.entries[0].tokens) - 1
    # No stream with a match: nothing worth drafting.
    s2 = spec(slots=8)
    streams(s2, [[300 + 10 * i, 301 + 10 * i, 302 + 10 * i, 303 + 10 * i] for i in range(4)])
    assert [len(e.tokens) for e in s2.plan_step().entries] == [1, 1, 1, 1]


def test_the_draft_length_follows_the_measured_batch_shape() -> None:
    """Where a step's cost jumps with its width (llama.cpp's CPU kernels), the drafts
    stop short of the jump or go past it to where the width is cheap again."""
    shape = [t / GPT2_MS[0] for t in GPT2_MS]
    cost = DecodeCost(shape)
    for p in (0.6, 0.8, 0.9, 0.97):
        k = best_shared_len([p], 15, cost.relative)
        assert 1 + k not in range(8, 15)  # 8 tokens cost 7.3 of one: never just past it
    # Eight streams: a ninth to sixteenth token cost little more than the eighth, so one
    # draft each pays even with only three streams matching (the rest draft fillers).
    assert best_shared_len([0.6] * 3 + [0.0] * 5, 8, cost.relative) == 1
    # One stream on the same shape: the first drafted token costs 73 % of a step.
    assert best_shared_len([0.6], 8, cost.relative) == 0
    # On the line the same eight streams would not draft: the shape decides.
    assert best_shared_len([0.6] * 3 + [0.0] * 5, 8, lambda n: 1 + 0.7 * (n - 1)) == 0


def test_many_streams_share_the_batchs_draft_room() -> None:
    s = spec(slots=8, draft_max=8)
    s.draft_cost.pin(0.0)  # verifying free: each stream would draft draft_max alone
    streams(s, [looping(i) for i in range(8)])
    plan = s.plan_step()
    assert [len(e.tokens) for e in plan.entries] == [1 + DRAFT_SEQS * 8 // 8] * 8
    assert sum(len(e.tokens) for e in plan.entries) <= s.capacity
    s2 = spec(slots=8, draft_max=8)
    s2.draft_cost.pin(0.0)
    streams(s2, [looping(0)])
    assert [len(e.tokens) for e in s2.plan_step().entries] == [1 + 8]  # alone: draft_max


def test_a_stream_whose_drafts_look_too_costly_still_drafts_now_and_then() -> None:
    """The estimates learn only from drafts: where they say no draft pays, one token is
    drafted after EXPLORE steps without one, so a noisy stretch cannot stop speculation
    for good."""
    s = spec(slots=1)
    decoding(s, LOOP * 8)
    s.draft_cost.pin(1.0)  # a drafted token as dear as a step: never worth it
    widths = []
    for _ in range(2 * EXPLORE + 2):
        plan = verify(s, loop_model)
        widths.append(len(plan.entries[0].tokens))
    assert widths == ([1] * EXPLORE + [2]) * 2
    assert s.counters["draft_tokens_accepted"] == 2  # the loop: both held


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
    # The first draft's length: the prior acceptance (3 of 4) at the prior cost ratio.
    assert s2.counters["draft_tokens_rejected"] == best_draft_len(0.75, PRIOR_RATIO, 8) == 6


def test_capacity_holds_the_drafts() -> None:
    assert batch_capacity(4, 64) == 68
    assert spec(slots=4, chunk=64, draft_max=8).capacity == 68 + DRAFT_SEQS * 8
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
        "prefill_batch": None,
        "cache_reuse": 0,
        "short_lane": None,
    }
    assert "speculative" not in backend_options("ct2", s)  # CTranslate2 has no speculation
    defaults = load_settings([], environ={})
    assert (defaults.speculative, defaults.draft_max) == ("ngram", 32)  # on by default
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
