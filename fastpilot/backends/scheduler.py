"""Batching policy for the llama.cpp backend: slots, the prompt cache and what each decode holds.

Pure Python, no native calls: :class:`Scheduler` decides, the backend
(:mod:`fastpilot.backends.llamacpp`) does. The backend's worker loop is::

    seqs = [scheduler.add(owner, prompt, max_tokens) for each new request]
    scheduler.admit()              # WAITING -> PREFILLING: slot, cached prefix, KV ops
    plan = scheduler.plan_step()   # KV ops + the tokens of the next llama_decode
    ... apply plan.kv_ops, fill the batch from plan.entries, llama_decode ...
    for sample in scheduler.update_from_output(plan.entries):
        step = sample the logits at sample.row for sample.seq
        verdict = scheduler.on_token(sample.seq, step.token_id)

Each sequence moves ``WAITING -> PREFILLING -> DECODING -> FINISHED`` (see
:class:`SeqState`). A *slot* is one llama.cpp sequence id with its own KV stream;
the scheduler remembers which tokens each slot's KV holds, which is the prompt
cache:

* **Slot choice** (:func:`choose_slot`): the free slot whose cached tokens save
  the most prompt tokens -- the common prefix, plus with ``cache_reuse`` the runs
  moved into place when the window slid (:mod:`fastpilot.backends.kv_reuse`) --
  when that is at least :data:`MIN_COPY` tokens; otherwise the free slot that keeps
  the busy slot ids one run of consecutive integers (llama.cpp evaluates one graph
  per run of consecutive sequence ids when every sequence has its own KV stream, so
  ``{0, 1, 3}`` costs two weight passes per step where ``{0, 1, 2}`` costs one);
  then the least recently used.
* **KV copy**: when a *busy* slot holds a prefix at least :data:`MIN_COPY`
  tokens longer than the chosen slot's, its KV stream is copied into the least
  recently used free slot (a buffer copy, far cheaper than evaluating the tokens).
* **Shared prefill** (``n > 1``): a request whose prompt equals one still being
  prefilled waits for that prefill, then gets a copy of its KV and samples its
  first token from the same logits, so the prompt is evaluated once.
* **Chunked prefill**: every step holds one token per decoding sequence plus up
  to ``prompt_chunk`` prompt tokens of prefilling ones, so a long prompt delays
  the other streams by one chunk per step, not by its whole length; with no
  sequence decoding, up to ``prefill_alone`` (:mod:`fastpilot.backends.prefill`).
* **Batch order**: entries are sorted by slot id, for the same one-graph-per-run
  reason as the slot choice.

A plan entry may carry several tokens and asks for logits of its last
``n_logits`` tokens. **Speculative decoding** (``speculative=True``) uses it: a
DECODING sequence's entry is ``[next_token] + drafts`` with logits for each, the
drafts from :mod:`fastpilot.backends.ngram` (which explains the rules: when a
sequence drafts, how drafts are verified and rolled back, how the length adapts).

The values it works with (:class:`Seq`, :class:`Slot`, :class:`Plan`, ...) live in
:mod:`fastpilot.backends.scheduler_state` and are re-exported here.

Not thread-safe: only the backend's worker thread uses a scheduler.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Generic

from fastpilot.backends.base import FinishReason
from fastpilot.backends.draft_policy import Acceptance, DecodeCost, best_shared_len
from fastpilot.backends.kv_reuse import (
    MIN_COPY,
    choose_slot,
    common_prefix,
    plan_reuse,
    reuse_ops,
    runs,
)
from fastpilot.backends.ngram import NgramDrafter
from fastpilot.backends.prefill import batch_tokens, prefill_budget
from fastpilot.backends.scheduler_state import (
    BatchEntry,
    KvCopy,
    KvOp,
    KvRemove,
    KvShift,
    OwnerT,
    Plan,
    Sample,
    Seq,
    SeqState,
    Slot,
    Verdict,
)

__all__ = [
    "DRAFT_SEQS",
    "EXPLORE",
    "MIN_COPY",
    "SPEC_BUSY",
    "BatchEntry",
    "KvCopy",
    "KvOp",
    "KvRemove",
    "KvShift",
    "Plan",
    "Sample",
    "Scheduler",
    "Seq",
    "SeqState",
    "Slot",
    "Verdict",
    "batch_capacity",
    "choose_slot",
    "common_prefix",
    "runs",
]

# Most prompt tokens a step may hold for its decoding sequences to still draft: a
# prompt chunk already fills the batch (and would split it unevenly, see below).
SPEC_BUSY = 2
# After this many decode steps without a draft, a step with an n-gram match drafts one
# token even where the estimates say it will not pay: the estimates only learn from
# drafts, and one noisy stretch (a burst of load timed on wide steps, a run of refusals)
# must not stop speculation for good (tiny-py, bench run 20261128-033953: one server
# drafted 145 tokens in a round slowed 2.5x by the machine, then 64 in its next 290 steps).
EXPLORE = 16
# A step's drafted tokens, all sequences together, are at most DRAFT_SEQS * draft_max
# (what the batch is sized for): with m sequences decoding each drafts at most
# DRAFT_SEQS * draft_max // m.
DRAFT_SEQS = 3


def batch_capacity(
    slots: int, prompt_chunk: int, draft_max: int = 0, prefill_alone: int = 0
) -> int:
    """Most tokens in one plan's batch: a token per slot, a prompt chunk and
    ``DRAFT_SEQS * draft_max`` drafted tokens (``draft_max`` 0: speculation off),
    or the ``prefill_alone`` chunk of a step where no sequence decodes."""
    return batch_tokens(slots, prompt_chunk, DRAFT_SEQS * draft_max, prefill_alone)


class Scheduler(Generic[OwnerT]):
    """Continuous-batching policy over ``slots`` KV streams; see the module docstring.

    Args:
        slots: sequences decoded together (llama.cpp sequence ids ``0..slots-1``).
        prompt_chunk: prompt tokens per step, shared by every prefilling sequence.
        context_length: cells per slot; a sequence finishes ``LENGTH`` when full.
        eos_token_ids: tokens that finish a sequence ``STOP`` (no step is pushed).
        speculative, draft_max: n-gram drafts of up to this many tokens, verified in the batch.
        prefill_alone: prompt tokens per step when no sequence is decoding
            (None: ``prompt_chunk``, one budget for every step).
        cache_reuse: shortest run of cached tokens moved into place when the prompt
            slid (:mod:`fastpilot.backends.kv_reuse`); 0 keeps the prefix cache only.
            Only for memories that can shift positions (rotary models).
    """

    def __init__(
        self,
        slots: int,
        prompt_chunk: int,
        context_length: int,
        eos_token_ids: Iterable[int] = (),
        *,
        speculative: bool = False,
        draft_max: int = 8,
        prefill_alone: int | None = None,
        cache_reuse: int = 0,
    ) -> None:
        if slots < 1 or prompt_chunk < 1 or draft_max < 1 or cache_reuse < 0:
            raise ValueError("slots, prompt_chunk, draft_max must be >= 1, cache_reuse >= 0")
        self.cache_reuse = cache_reuse
        self.speculative = speculative
        self.draft_max = draft_max
        self.slots = [Slot(i) for i in range(slots)]
        self.chunk = prompt_chunk
        self.prefill_alone = max(prompt_chunk, prefill_alone or prompt_chunk)
        self.context_length = context_length
        self.eos = frozenset(eos_token_ids)
        self.waiting: deque[Seq[OwnerT]] = deque()
        self.running: list[Seq[OwnerT]] = []  # holding a slot, in admission order
        self.counters: dict[str, float] = dict.fromkeys(
            (
                "prompt_tokens_evaluated",
                "cached_prompt_tokens",
                "shared_prefills",
                "prefix_copies",
                "kv_shifts",
                "shifted_prompt_tokens",
                "draft_tokens_accepted",
                "draft_tokens_rejected",
            ),
            0,
        )
        self._ops: list[KvOp] = []
        self._clock = 0
        self.acceptance = Acceptance()  # every sequence's verifications (draft_policy.py)
        self.draft_cost = DecodeCost()  # step times, fed by the backend (draft_policy.py)
        self._undrafted = 0  # decode steps since one held drafts (EXPLORE)

    @property
    def busy(self) -> bool:
        """Some sequence holds a slot or waits for one."""
        return bool(self.running or self.waiting)

    @property
    def capacity(self) -> int:
        """Most tokens one plan's batch holds (see :func:`batch_capacity`)."""
        drafts = self.draft_max * self.speculative
        return batch_capacity(len(self.slots), self.chunk, drafts, self.prefill_alone)

    # -- admission ---------------------------------------------------------------------
    def add(self, owner: OwnerT, prompt: list[int], max_tokens: int) -> Seq[OwnerT]:
        """Queue a sequence (WAITING); :meth:`admit` gives it a slot when one is free."""
        if not prompt:
            raise ValueError("a sequence needs at least one prompt token")
        seq = Seq(owner, list(prompt), max_tokens)
        self.waiting.append(seq)
        return seq

    def admit(self) -> list[Seq[OwnerT]]:
        """Move waiting sequences into free slots, oldest first; returns them.

        A sequence with ``max_tokens <= 0`` is FINISHED (``LENGTH``) at once.
        The KV ops this needs are queued for :meth:`take_kv_ops` / the next plan.
        """
        admitted: list[Seq[OwnerT]] = []
        while self.waiting and any(not s.busy for s in self.slots):
            seq = self.waiting.popleft()
            self._admit(seq)
            admitted.append(seq)
        return admitted

    def _admit(self, seq: Seq[OwnerT]) -> None:
        prompt = seq.prompt
        leader = self._leader_for(prompt)
        slot = choose_slot(self.slots, prompt, self.cache_reuse)
        plan = plan_reuse(slot.tokens, prompt, self.cache_reuse)
        # A follower gets the leader's whole KV once that prefill ends: no donor.
        donor = None if leader is not None else self._donor_for(prompt)
        if donor is not None and common_prefix(donor.tokens, prompt) >= plan.tokens + MIN_COPY:
            slot = self._lru_free()
            self._ops += [KvRemove(slot.seq_id), KvCopy(donor.seq_id, slot.seq_id)]
            slot.tokens = list(donor.tokens)
            plan = plan_reuse(slot.tokens, prompt, self.cache_reuse)
            self.counters["prefix_copies"] += 1
        # The plan keeps the last prompt token to evaluate: its logits pick the first token.
        self._ops += reuse_ops(slot.seq_id, len(slot.tokens), plan)
        slot.tokens, reuse = prompt[: plan.tokens], plan.tokens
        self.counters["kv_shifts"] += bool(plan.chunks)
        self.counters["shifted_prompt_tokens"] += plan.shifted
        slot.busy = True
        seq.slot, seq.state = slot, SeqState.PREFILLING
        seq.cached_tokens = reuse
        self.counters["cached_prompt_tokens"] += reuse
        seq.todo = prompt[reuse:]
        if seq.max_tokens <= 0:
            self._release(seq, FinishReason.LENGTH)
            return
        if leader is not None:
            seq.leader = leader
            leader.followers.append(seq)
        if self.speculative:
            seq.drafter = NgramDrafter(prompt, model_acceptance=self.acceptance)
        self.running.append(seq)

    def _leader_for(self, prompt: list[int]) -> Seq[OwnerT] | None:
        """A running sequence still prefilling exactly this prompt for itself."""
        return next(
            (o for o in self.running if o.leader is None and o.todo and o.prompt == prompt), None
        )

    def _donor_for(self, prompt: list[int]) -> Slot | None:
        """The busy slot sharing the longest prefix with ``prompt`` (first of equals)."""
        return max(
            (s for s in self.slots if s.busy),
            key=lambda s: common_prefix(s.tokens, prompt),
            default=None,
        )

    def _lru_free(self) -> Slot:
        return min((s for s in self.slots if not s.busy), key=lambda s: s.last_used)

    # -- KV ops ------------------------------------------------------------------------
    def take_kv_ops(self) -> tuple[KvOp, ...]:
        """The queued KV ops, in order; the caller must apply them before touching a slot."""
        ops, self._ops = tuple(self._ops), []
        return ops

    def kv_restarted(self, seq_id: int) -> None:
        """A partial :class:`KvRemove` was refused and the slot was cleared instead."""
        slot = self.slots[seq_id]
        slot.tokens = []
        owner = next((s for s in self.running if s.slot is slot), None)
        if owner is not None and owner.state is SeqState.PREFILLING:
            self.counters["cached_prompt_tokens"] -= owner.cached_tokens
            owner.cached_tokens = 0
            owner.todo = list(owner.prompt)
        elif owner is not None and owner.drafter is not None:
            # A draft rollback was refused (recurrent or sliding-window memory): evaluate
            # the confirmed tokens again, next_token last, whose logits are the next
            # sample; and stop speculating, as every rollback would cost this again.
            owner.todo, owner.state = list(owner.drafter.tokens), SeqState.PREFILLING
            self.speculative = False

    # -- one step ----------------------------------------------------------------------
    def plan_step(self) -> Plan[OwnerT]:
        """The queued KV ops (each handed out once) and the next batch; changes no sequence.

        Planning again after applying the ops gives the same batch, updated for any
        :meth:`kv_restarted` in between.

        The batch holds one token for every DECODING sequence, then prompt chunks
        of PREFILLING ones in admission order until the step's prompt budget is
        used (:func:`~fastpilot.backends.prefill.prefill_budget`: ``prompt_chunk``
        while any sequence decodes, else ``prefill_alone``), sorted by slot id.
        Followers of a shared prefill are left out.
        """
        entries: list[BatchEntry[OwnerT]] = []
        decoding = [s for s in self.running if s.state is SeqState.DECODING]
        budget = allowed = prefill_budget(len(decoding), self.prefill_alone, self.chunk)
        for seq in self.running:
            if budget and seq.todo and seq.leader is None:
                chunk = seq.todo[:budget]
                budget -= len(chunk)
                entries.append(self._entry(seq, chunk, 1 if len(chunk) == len(seq.todo) else 0))
        prompt_tokens = allowed - budget
        draft = self.speculative and prompt_tokens <= SPEC_BUSY
        drafts = self._batch_drafts(decoding, prompt_tokens) if draft and decoding else []
        for i, seq in enumerate(decoding):
            mine, fillers = drafts[i] if drafts else ([], 0)
            entries.append(self._entry(seq, [seq.next_token, *mine], 1 + len(mine), fillers))
        entries.sort(key=lambda e: e.seq_id)
        return Plan(self.take_kv_ops(), tuple(entries))

    def _batch_drafts(self, decoding: list[Seq[OwnerT]], extra: int) -> list[tuple[list[int], int]]:
        """Each decoding sequence's drafts for one step, all of one length, with how many
        of them are fillers; empty when drafting does not pay.

        With one KV stream per slot llama.cpp splits a batch into micro-batches of an
        equal number of tokens per sequence (``split_equal``): entries of 1 + 4, 1, 1
        and 1 tokens cost two passes over the weights, one token of each and then the
        four drafts alone, where 1 + 1 of each is one pass. So the streams draft together
        or not at all, one length for all (:func:`best_shared_len` over the step's cost
        with ``extra`` prompt tokens beside them: the measured shape of the batch widths
        for several streams, the fitted line for one, see
        :mod:`~fastpilot.backends.draft_policy`); a stream without an n-gram match
        fills its share with :meth:`~fastpilot.backends.ngram.NgramDrafter.filler`
        tokens, which the choice counts as worthless.
        """
        m = len(decoding)
        room = DRAFT_SEQS * self.draft_max // m
        for seq in decoding:  # the tightest stream bounds every stream's draft
            room = self._room(seq, room)
        found: list[list[int]] = []
        for seq in decoding:
            assert seq.drafter is not None
            found.append(seq.drafter.draft(room))
        if not any(found):
            return []
        pairs = zip(decoding, found, strict=True)
        ps = [q.drafter.p if mine and q.drafter else 0.0 for q, mine in pairs]
        cost = self.draft_cost
        k = best_shared_len(ps, room, cost.relative if m > 1 else cost.line, extra)
        if k == 0 and self._undrafted >= EXPLORE:
            k = 1  # keep the estimates learning (EXPLORE)
        if k == 0:
            return []
        out: list[tuple[list[int], int]] = []
        for seq, mine in zip(decoding, found, strict=True):
            assert seq.drafter is not None
            mine = mine[:k]
            out.append((mine + seq.drafter.filler(k - len(mine)), k - len(mine)))
        return out

    def _room(self, seq: Seq[OwnerT], room: int) -> int:
        """``room`` capped by draft_max and what max_tokens and the context can still
        take (the token after the drafts is the model's own)."""
        assert seq.slot is not None
        return min(
            room,
            self.draft_max,
            seq.max_tokens - seq.generated - 1,
            # next_token sits at len(tokens); drafts after it, all before the context's end
            self.context_length - len(seq.slot.tokens) - 2,
        )

    @staticmethod
    def _entry(
        seq: Seq[OwnerT], tokens: list[int], n_logits: int, fillers: int = 0
    ) -> BatchEntry[OwnerT]:
        assert seq.slot is not None
        pos0 = len(seq.slot.tokens)
        return BatchEntry(seq, seq.slot.seq_id, tuple(tokens), pos0, n_logits, fillers)

    def update_from_output(self, entries: Iterable[BatchEntry[OwnerT]]) -> list[Sample[OwnerT]]:
        """Record that ``entries`` (in batch order) were decoded; returns what to sample.

        Prefilling sequences advance by their chunk and need a sample once their
        prompt is done; a leader's followers get its KV (queued copies) and sample
        from the leader's row first.
        """
        samples: list[Sample[OwnerT]] = []
        row = -1
        entries = tuple(entries)
        widths = [len(e.tokens) for e in entries if e.seq.state is SeqState.DECODING]
        if widths:
            self._undrafted = 0 if max(widths) > 1 else self._undrafted + 1
        for e in entries:
            seq, slot = e.seq, e.seq.slot
            assert slot is not None
            row += len(e.tokens)  # the batch index of this entry's last token
            if seq.state is SeqState.DECODING and len(e.tokens) > 1:
                # Only next_token is certain; the drafts join slot.tokens once verified.
                slot.tokens.append(e.tokens[0])
                seq.drafts = list(e.tokens[1:])
                seq.draft_len, seq.fillers = len(seq.drafts), e.fillers
                samples.append(Sample(seq, row - len(seq.drafts), tuple(seq.drafts)))
                continue
            slot.tokens.extend(e.tokens)
            if seq.state is SeqState.PREFILLING:
                self.counters["prompt_tokens_evaluated"] += len(e.tokens)
                del seq.todo[: len(e.tokens)]
                if seq.todo:
                    continue
            if seq.followers:
                samples += self._share_prefill(seq, row)
            samples.append(Sample(seq, row))
        return samples

    def _share_prefill(self, leader: Seq[OwnerT], row: int) -> list[Sample[OwnerT]]:
        """Give the followers a copy of the leader's KV; they sample from its logits."""
        out: list[Sample[OwnerT]] = []
        assert leader.slot is not None
        for f in leader.followers:
            if f not in self.running:
                continue
            assert f.slot is not None
            self._ops += [KvRemove(f.slot.seq_id), KvCopy(leader.slot.seq_id, f.slot.seq_id)]
            f.slot.tokens = list(leader.slot.tokens)
            f.cached_tokens = len(f.prompt)
            f.todo, f.leader = [], None
            self.counters["shared_prefills"] += 1
            out.append(Sample(f, row))
        leader.followers = []
        return out

    def on_token(self, seq: Seq[OwnerT], token: int) -> Verdict:
        """Record the token sampled for ``seq``.

        End-of-sequence finishes it ``STOP`` with nothing to push. Otherwise the
        step is pushed; the sequence finishes ``LENGTH`` at ``max_tokens`` or when
        prompt + generated tokens fill the slot, else it is DECODING this token next
        -- unless the token equals the next draft in flight: then the draft's KV
        cell is kept and ``more`` asks for the next row. A token that differs ends
        the verification: the cells of the drafts still in flight are removed
        (a queued :class:`KvRemove`), whatever the outcome.
        """
        if token in self.eos:
            self._release(seq, FinishReason.STOP)
            return Verdict(emit=False, finish=FinishReason.STOP)
        seq.generated += 1
        assert seq.slot is not None
        if (drafter := seq.drafter) is not None:
            drafter.extend((token,))
        # The KV holds len(tokens); the token just sampled would take one more cell.
        if seq.generated >= seq.max_tokens or len(seq.slot.tokens) + 1 >= self.context_length:
            self._release(seq, FinishReason.LENGTH)
            return Verdict(emit=True, finish=FinishReason.LENGTH)
        if seq.drafts and token == seq.drafts[0]:
            seq.slot.tokens.append(seq.drafts.pop(0))  # its KV cell is the right one
            self.counters["draft_tokens_accepted"] += 1
            seq.accepted += 1
            if not seq.drafts:  # all held; the next row is the model's own token
                self._verified(seq)
            return Verdict(emit=True, more=True)
        if seq.drafts:
            self._verified(seq)
            self._reject_drafts(seq)
        seq.next_token, seq.state = token, SeqState.DECODING
        return Verdict(emit=True)

    @staticmethod
    def _verified(seq: Seq[OwnerT]) -> None:
        """Tell the drafter how its n-gram drafts fared (fillers are not its proposals)."""
        proposed = seq.draft_len - seq.fillers
        if seq.drafter is not None and proposed > 0:
            held = seq.draft_len - len(seq.drafts)
            seq.drafter.verified(proposed, min(held, proposed))

    def _reject_drafts(self, seq: Seq[OwnerT]) -> None:
        """Drop the KV cells of drafts still in flight (positions past the kept tokens)."""
        assert seq.slot is not None
        self.counters["draft_tokens_rejected"] += len(seq.drafts)
        seq.rejected += len(seq.drafts)
        self._ops.append(KvRemove(seq.slot.seq_id, len(seq.slot.tokens)))
        seq.drafts = []

    # -- finishing ---------------------------------------------------------------------
    def finish(self, seq: Seq[OwnerT], reason: FinishReason, *, kv_lost: bool = False) -> None:
        """End a sequence early (cancelled, or failed when ``kv_lost``: its KV is dropped)."""
        if seq.state is SeqState.WAITING:
            self.waiting.remove(seq)
            seq.state, seq.finish_reason = SeqState.FINISHED, reason
            return
        if kv_lost and seq.slot is not None:
            self._ops.append(KvRemove(seq.slot.seq_id))
            seq.slot.tokens = []
        self._release(seq, reason)

    def _release(self, seq: Seq[OwnerT], reason: FinishReason) -> None:
        if seq.state is SeqState.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        if seq.leader is not None:
            seq.leader.followers.remove(seq)
            seq.leader = None
        if seq.followers:  # promote: the first follower prefills for itself and the rest
            head, rest = seq.followers[0], seq.followers[1:]
            head.leader, head.followers = None, rest
            for f in rest:
                f.leader = head
            seq.followers = []
        if seq.drafts:  # finished mid-verification: the unverified cells go
            self._reject_drafts(seq)
        seq.state, seq.finish_reason = SeqState.FINISHED, reason
        if seq.slot is not None:
            seq.slot.busy = False
            seq.slot.last_used = self._tick()

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # -- prompt scoring (echo) -----------------------------------------------------------
    def begin_scoring(self) -> Slot:
        """The least recently used free slot, forgotten; the caller clears its KV and
        evaluates a prompt there (outside any plan, so apply :meth:`take_kv_ops` first)."""
        slot = self._lru_free()
        slot.tokens = []
        return slot

    def end_scoring(self, slot: Slot, tokens: list[int] | None) -> None:
        """The slot now holds ``tokens``' KV (``None``: scoring failed, the KV is gone)."""
        if tokens is None:
            slot.tokens = []
        else:
            slot.tokens = list(tokens)
            slot.last_used = self._tick()
