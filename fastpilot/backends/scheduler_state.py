"""The values the llama.cpp scheduler works with: states, slots, sequences, KV ops, plans.

:class:`fastpilot.backends.scheduler.Scheduler` decides with them and the backend
(:mod:`fastpilot.backends.llamacpp`, :mod:`fastpilot.backends.llamacpp_native`)
executes them: a :class:`Plan` is the KV ops (:class:`KvRemove`, :class:`KvCopy`,
:class:`KvShift`) and the :class:`BatchEntry` rows of one ``llama_decode``; a
:class:`Sample` says which logits row to sample for a :class:`Seq`; a
:class:`Verdict` is what the scheduler made of the sampled token. Every name here is re-exported by
:mod:`fastpilot.backends.scheduler`, the place to import them from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

from fastpilot.backends.base import FinishReason
from fastpilot.backends.ngram import NgramDrafter

__all__ = [
    "BatchEntry",
    "KvCopy",
    "KvOp",
    "KvRemove",
    "KvShift",
    "OwnerT",
    "Plan",
    "Sample",
    "Seq",
    "SeqState",
    "Slot",
    "Verdict",
]

OwnerT = TypeVar("OwnerT")


class SeqState(str, Enum):
    """Where a sequence is. A speculating sequence is DECODING with ``Seq.drafts`` in flight."""

    WAITING = "waiting"  # added, no slot yet
    PREFILLING = "prefilling"  # holds a slot; prompt tokens still to evaluate (or shared)
    DECODING = "decoding"  # feeds its last sampled token each step
    FINISHED = "finished"  # slot released; finish_reason says why


@dataclass(eq=False, slots=True)
class Slot:
    """One llama.cpp sequence id and the tokens whose KV it holds (positions 0..len-1)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: int = 0  # a tick of the scheduler's clock; larger is more recent


@dataclass(eq=False, slots=True)
class Seq(Generic[OwnerT]):
    """One request as the scheduler sees it; ``owner`` is the backend's own record."""

    owner: OwnerT
    prompt: list[int]
    max_tokens: int
    state: SeqState = SeqState.WAITING
    slot: Slot | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    cached_tokens: int = 0  # prompt tokens whose KV was reused or copied
    leader: Seq[OwnerT] | None = None  # the sequence prefilling this identical prompt
    followers: list[Seq[OwnerT]] = field(default_factory=list)
    next_token: int = -1  # DECODING: the sampled token the next step feeds
    generated: int = 0
    finish_reason: FinishReason | None = None
    drafter: NgramDrafter | None = None  # speculative: prompt + emitted tokens, indexed
    draft_len: int = 0  # speculative: tokens drafted in the verification in flight
    fillers: int = 0  # of them, the trailing ones drafted only to keep the batch's shape
    drafts: list[int] = field(default_factory=list)  # in the KV, not yet verified
    accepted: int = 0  # drafts confirmed so far
    rejected: int = 0  # drafts refused so far


@dataclass(frozen=True, slots=True)
class KvRemove:
    """Drop a slot's KV cells at positions ``[start, end)`` (``end == -1``: to the last);
    ``start == -1`` drops all of them.

    A partial removal may be refused by memories that cannot drop a suffix
    (recurrent, sliding-window); the executor then drops everything and calls
    :meth:`Scheduler.kv_restarted`.
    """

    seq_id: int
    start: int = -1
    end: int = -1


@dataclass(frozen=True, slots=True)
class KvShift:
    """Add ``delta`` to the positions of a slot's cells in ``[start, end)``
    (``llama_memory_seq_add``; rotary models re-rotate those keys before the next decode).

    Only emitted for memories that can shift (see :mod:`fastpilot.backends.kv_reuse`).
    """

    seq_id: int
    start: int
    end: int
    delta: int


@dataclass(frozen=True, slots=True)
class KvCopy:
    """Copy the whole KV stream of slot ``src`` into slot ``dst`` (``llama_memory_seq_cp``)."""

    src: int
    dst: int


KvOp = KvRemove | KvCopy | KvShift


@dataclass(frozen=True, slots=True)
class BatchEntry(Generic[OwnerT]):
    """Tokens of one sequence at positions ``pos0, pos0 + 1, ...`` of its slot."""

    seq: Seq[OwnerT]
    seq_id: int
    tokens: tuple[int, ...]
    pos0: int
    n_logits: int  # logits wanted for this many trailing tokens (1 + drafts when drafting)
    fillers: int = 0  # trailing drafts without an n-gram match (ngram.NgramDrafter.filler)


@dataclass(frozen=True, slots=True)
class Plan(Generic[OwnerT]):
    """What to do before and in the next ``llama_decode``: KV ops in order, then the batch."""

    kv_ops: tuple[KvOp, ...]
    entries: tuple[BatchEntry[OwnerT], ...]


@dataclass(frozen=True, slots=True)
class Sample(Generic[OwnerT]):
    """Sample ``seq``'s next token from the logits at batch row ``row``.

    With ``drafts``, rows ``row + 1 ..`` hold the logits after each draft: sample
    them in order while :meth:`Scheduler.on_token` answers ``more``.
    """

    seq: Seq[OwnerT]
    row: int
    drafts: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`Scheduler.on_token` decided: push the step? did the sequence finish?

    ``more``: the token matched the next draft, so the following logits row is this
    sequence's next position -- sample it too.
    """

    emit: bool
    finish: FinishReason | None = None
    more: bool = False
