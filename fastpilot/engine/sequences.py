"""Per-sequence bookkeeping: steps in, text deltas and logprob entries out.

One :class:`SequenceState` follows one backend stream: it detokenizes
incrementally, applies the stop strings and the editor stops
(:mod:`fastpilot.engine.editor_stops`), attributes each token to the text it
produced (for ``logprobs`` and ``text_offset``) and decides the OpenAI
``finish_reason``. :func:`merge_streams` interleaves several streams of one
request so that ``n > 1`` choices progress together.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from fastpilot.backends.base import FinishReason, Step, TokenStream
from fastpilot.engine.detok import IncrementalDetokenizer
from fastpilot.engine.editor_stops import NO_LINE_LIMITS, LineLimits, LineStops
from fastpilot.engine.stops import StopMatcher
from fastpilot.errors import BackendError, FastpilotError, Timeout


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One token of a choice's ``logprobs``: ``logprob`` is None for the first prompt token."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]
    offset: int  # character offset in the choice's text (echo included)


@dataclass(frozen=True, slots=True)
class Delta:
    """Text a choice may emit now, the tokens it came from, and the end when known."""

    index: int
    text: str
    entries: tuple[TokenEntry, ...] = ()
    finish_reason: str | None = None

    def merge(self, later: Delta) -> Delta:
        return Delta(
            self.index, self.text + later.text, self.entries + later.entries, later.finish_reason
        )

    @property
    def empty(self) -> bool:
        return not self.text and not self.entries and self.finish_reason is None


class SequenceState:
    """Follow one generated sequence. Not thread-safe: the consuming thread owns it.

    ``base_offset`` is the length of the text already in the choice (the
    echoed prompt), so ``text_offset`` values index the full returned text.
    ``lines`` are the editor stops; ``clock`` times ``t_max_predict_ms``.
    """

    def __init__(
        self,
        index: int,
        stream: TokenStream,
        *,
        token_bytes: Callable[[int], bytes],
        stops: Sequence[str],
        eos_token_ids: frozenset[int],
        max_tokens: int,
        want_logprobs: bool,
        base_offset: int = 0,
        lines: LineLimits = NO_LINE_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.stream = stream
        self.detok = IncrementalDetokenizer(token_bytes)
        self.stops = StopMatcher(stops)
        self.lines = LineStops(lines, clock=clock)
        self.eos = frozenset() if stream.request.params.ignore_eos else eos_token_ids
        self.max_tokens = max_tokens
        self.want_logprobs = want_logprobs
        self.base_offset = base_offset
        self.generated = 0  # steps consumed (usage counts them, EOS included)
        self.cum_logprob = 0.0  # best_of ranks choices by it
        self.finish_reason: str | None = None
        self.text_len = 0  # characters decoded so far (before stop handling)
        self.emitted = 0  # characters emitted so far
        self._pending: list[TokenEntry] = []  # tokens whose text is not emitted yet
        self._saw_eos = False
        self._cut = False  # a stop string or an editor stop ended the text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def on_step(self, step: Step) -> Delta | None:
        """Consume one step; returns what became emittable, or None."""
        if self.finished:
            return None
        self.generated += 1
        self.cum_logprob += step.logprob
        if step.token_id in self.eos:
            # The end-of-text token ends the text; it is counted, never shown.
            self._saw_eos = True
            return self._finish("stop", cancel=True)
        if self.want_logprobs:
            self._pending.append(
                TokenEntry(step.token_id, step.logprob, step.top_logprobs, self.text_len)
            )
        piece = self.detok.feed(step.token_id)
        self.text_len += len(piece)
        text, stopped = self._filter(piece)
        if stopped:
            return self._finish("stop", text=text, cancel=True)
        if self.generated >= self.max_tokens:
            # The last allowed token: no need to wait for the backend to say so.
            return self._finish("length", text=text)
        return self._emit(text)

    def on_end(self, *, closed: bool) -> Delta | None:
        """The backend finished the stream. Raises Timeout when the deadline ended it."""
        if self.finished:
            return None
        reason = self.stream.finish_reason
        if reason is FinishReason.CANCELLED and not closed:
            deadline = self.stream.request.deadline
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout("the request's deadline passed before generation finished")
        if closed:
            return None
        return self._finish("stop" if reason is FinishReason.STOP or self._saw_eos else "length")

    def _finish(self, reason: str, *, text: str = "", cancel: bool = False) -> Delta:
        if cancel:
            self.stream.cancel()  # stop the backend at once: nothing more is needed
        if not self._cut:
            # Natural end: release what the detokenizer and the matchers held.
            tail, stopped = self._filter(self.detok.flush(), final=True)
            text += tail
            if stopped:
                reason = "stop"
        self.finish_reason = reason
        delta = self._emit(text, final=True)
        return Delta(self.index, delta.text, delta.entries, reason)

    def _filter(self, piece: str, *, final: bool = False) -> tuple[str, bool]:
        """Pass decoded text through the stop strings, then the editor stops.

        Returns ``(text to emit, cut)``; ``cut`` means either ended the text.
        ``final`` releases what both hold (the text ends here anyway).
        """
        text, stopped = self.stops.feed(piece)
        if final and not stopped:
            text += self.stops.flush()
            stopped = self.stops.matched is not None
        text, cut = self.lines.feed(text)
        if (stopped or final) and not cut:
            text += self.lines.flush()  # indentation held for a line that never came
        self._cut = stopped or cut
        return text, self._cut

    def _emit(self, text: str, *, final: bool = False) -> Delta:
        self.emitted += len(text)
        if not self._pending:
            return Delta(self.index, text)
        # A token belongs to the emitted text when it starts inside it; at the
        # end, tokens starting at or after a stop string are dropped with it.
        k = 0
        while k < len(self._pending) and self._pending[k].offset < self.emitted:
            k += 1
        if final and not self._cut:
            k = len(self._pending)
        out = self._pending[:k]
        del self._pending[:k]
        if self.base_offset:
            out = [
                TokenEntry(e.token_id, e.logprob, e.top, e.offset + self.base_offset) for e in out
            ]
        return Delta(self.index, text, tuple(out))


_END = object()
T = TypeVar("T")


def merge_streams(streams: Sequence[TokenStream]) -> Iterator[tuple[int, Step | None]]:
    """Yield ``(index, step)`` from every stream as steps arrive; ``(index, None)`` at each end.

    One stream is read directly; several through :func:`interleave`. Errors
    raised by a stream are re-raised here as :class:`FastpilotError`.
    """
    if len(streams) == 1:
        try:
            for step in streams[0]:
                yield 0, step
        except FastpilotError:
            raise
        except Exception as ex:  # a backend bug must not escape as a bare exception
            raise BackendError(f"generation failed: {ex}") from ex
        yield 0, None
        return

    yield from interleave(streams, "fastpilot-pump")


def interleave(sources: Sequence[Iterable[T]], name: str) -> Iterator[tuple[int, T | None]]:
    """Yield ``(index, item)`` from every source as items arrive; ``(index, None)`` at each end.

    Each source is read by its own daemon thread (named ``{name}-{index}``), all
    feeding one queue, because a stream can only be waited on by blocking. A
    thread ends when its source ends, which cancelling the source guarantees.
    The first error a source raises is re-raised here, as
    :class:`FastpilotError` (a bare exception is wrapped in
    :class:`BackendError`); the remaining threads run on until their sources end.
    """
    events: queue.SimpleQueue[tuple[int, object]] = queue.SimpleQueue()

    def pump(i: int, source: Iterable[T]) -> None:
        try:
            for item in source:
                events.put((i, item))
        except BaseException as ex:  # noqa: BLE001 - handed to the consumer thread
            events.put((i, ex))
        else:
            events.put((i, _END))

    for i, source in enumerate(sources):
        threading.Thread(target=pump, args=(i, source), name=f"{name}-{i}", daemon=True).start()
    live = len(sources)
    while live:
        i, item = events.get()
        if item is _END:
            live -= 1
            yield i, None
        elif isinstance(item, BaseException):
            if isinstance(item, FastpilotError):
                raise item
            raise BackendError(f"generation failed: {item}") from item
        else:
            yield i, cast(T, item)
