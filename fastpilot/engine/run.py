"""One request in flight: prepared prompt, submitted streams, followed choices, shaped output.

:class:`Run` is created by :class:`fastpilot.engine.model.Model` for every
completion or chat request, with a :class:`~fastpilot.engine.context.RunContext`
(what it needs of the model, nothing more). It submits all of the request's sequences at once
(so the backend batches them), follows each stream through
:class:`~fastpilot.engine.sequences.SequenceState`, and shapes OpenAI objects:
:meth:`Run.complete` for one JSON document (a :class:`CompletionResult`),
:class:`CompletionStream` for chunks. Every exit path cancels every outstanding backend stream.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastpilot.backends.base import GenerationRequest, TokenStream
from fastpilot.engine.context import RunContext
from fastpilot.engine.detok import IncrementalDetokenizer
from fastpilot.engine.params import CompletionRequest
from fastpilot.engine.prompt import PreparedPrompt, prepare
from fastpilot.engine.sequences import Delta, SequenceState, TokenEntry, merge_streams
from fastpilot.errors import BackendError, FastpilotError, Timeout


@dataclass(frozen=True, slots=True)
class CompletionResult:
    """One finished request: the OpenAI object to send, and what only the headers say.

    Attributes:
        body: the ``text_completion`` / ``chat.completion`` object, JSON-ready.
        fim_used: the suffix went through the model's FIM template.
        suffix_ignored: a suffix was given but the model cannot infill.
        truncated: prompt tokens dropped from the left to fit the context.
    """

    body: dict[str, Any]
    fim_used: bool
    suffix_ignored: bool
    truncated: int


class Completion(dict):
    """The library's return value: the OpenAI object (a plain dict for JSON) plus attributes.

    ``Model.complete`` and ``Model.chat`` return it so that
    ``model.complete(...)["choices"]`` works and ``.fim_used``, ``.suffix_ignored``
    and ``.truncated`` are at hand; the engine passes :class:`CompletionResult` inside.
    """

    fim_used: bool = False
    suffix_ignored: bool = False
    truncated: int = 0

    @classmethod
    def of(cls, result: CompletionResult) -> Completion:
        """The library's view of a finished request."""
        out = cls(result.body)
        out.fim_used = result.fim_used
        out.suffix_ignored = result.suffix_ignored
        out.truncated = result.truncated
        return out


class Run:
    """One request in flight: its prepared prompt, its streams and its choices."""

    def __init__(
        self, ctx: RunContext, req: CompletionRequest, *, stops: Sequence[str], chat: bool
    ) -> None:
        self.ctx = ctx
        self.req = req
        self.chat = chat
        self.stops = tuple(stops)
        self.id = ("chatcmpl-" if chat else "cmpl-") + ctx.new_id()
        self.created = max(1, int(ctx.clock()))
        self.object = "chat.completion" if chat else "text_completion"
        backend = ctx.backend
        self.prep: PreparedPrompt = prepare(backend, req, default_timeout=ctx.default_timeout)
        self.want_logprobs = req.logprobs is not None
        self.echo_text = ""
        self.echo_entries: tuple[TokenEntry, ...] = ()
        if req.echo and not chat:
            self._echo()
        self.closed = False
        self.streams: list[TokenStream] = []
        self.states: list[SequenceState] = []
        count = req.num_sequences
        ctx.counters.add(requests_total=1, requests_active=1)
        self._active = True
        self._settle = threading.Lock()  # finish() may race between close() and the iterator
        if self.prep.max_tokens == 0:
            return
        try:
            for i in range(count):
                params = dataclasses.replace(
                    req.sampling(i),
                    max_tokens=self.prep.max_tokens,
                    # best_of ranks the choices by their summed logprobs
                    token_logprob=self.want_logprobs or count > req.n,
                )
                stream = backend.submit(
                    GenerationRequest(
                        prompt_ids=list(self.prep.prompt_ids),
                        params=params,
                        deadline=self.prep.deadline,
                        request_id=f"{self.id}-{i}",
                    )
                )
                self.streams.append(stream)
                self.states.append(
                    SequenceState(
                        i,
                        stream,
                        token_bytes=backend.token_bytes,
                        stops=self.stops,
                        eos_token_ids=frozenset(backend.eos_token_ids) | self.prep.stop_token_ids,
                        max_tokens=self.prep.max_tokens,
                        want_logprobs=self.want_logprobs,
                        base_offset=len(self.echo_text),
                        lines=req.line_limits,
                    )
                )
        except BaseException:
            self.finish(error=True)
            raise

    def _echo(self) -> None:
        """Decode the (possibly truncated) prompt and, when asked, score its tokens."""
        ids = self.prep.echo_ids
        detok = IncrementalDetokenizer(self.ctx.backend.token_bytes)
        parts: list[str] = []
        offsets: list[int] = []
        for tok in ids:
            offsets.append(detok.chars)
            parts.append(detok.feed(tok))
        parts.append(detok.flush())
        self.echo_text = "".join(parts)
        if self.want_logprobs and ids:
            k = self.req.logprobs or 0
            scored = self.ctx.backend.prompt_logprobs(list(self.prep.prompt_ids), k)
            # prompt_ids may start with a stand-in BOS that echo does not show.
            scored = scored[len(scored) - len(ids) :]
            entries = []
            for j, (tok, step) in enumerate(zip(ids, scored, strict=True)):
                if step is None or j == 0:
                    entries.append(TokenEntry(tok, None, (), offsets[j]))
                else:
                    entries.append(TokenEntry(tok, step.logprob, step.top_logprobs, offsets[j]))
            self.echo_entries = tuple(entries)

    # -- driving ------------------------------------------------------------------------
    def deltas(self, *, lookahead: bool) -> Iterator[Delta]:
        """Yield each choice's deltas as generation proceeds; the finishing one last.

        With ``lookahead`` (streaming) a choice's text deltas after its first
        are held until the choice's next event, so ``finish_reason`` rides on
        the last text-bearing delta instead of an empty one. The first delta
        goes out at once, so the time to first token is not delayed; the cost
        is that a choice that ends by end-of-text right after its first delta
        gets its ``finish_reason`` on an empty delta. Later deltas arrive one
        decode step late, except when the end is known at once (max_tokens
        reached, stop string matched). Cancels every outstanding backend
        stream on any exit.
        """
        held: dict[int, Delta] = {}
        sent: set[int] = set()  # choices that already emitted a delta
        try:
            if self.echo_text or self.echo_entries:
                for i in range(self.req.n if self.prep.max_tokens == 0 else len(self.states)):
                    held[i] = Delta(i, self.echo_text, self.echo_entries)
            if self.prep.max_tokens == 0:
                for i in range(self.req.n):
                    yield held.pop(i, Delta(i, "")).merge(Delta(i, "", (), "length"))
                return
            live = len(self.states)
            for i, step in merge_streams(self.streams):
                state = self.states[i]
                if state.finished:
                    continue
                try:
                    delta = (
                        state.on_step(step)
                        if step is not None
                        else state.on_end(closed=self.closed)
                    )
                except Timeout:
                    if i in held:
                        yield held.pop(i)
                    raise
                if delta is None:
                    if self.closed:
                        return
                    continue
                prev = held.pop(i, None)
                if prev is not None:
                    if delta.finish_reason is not None or (delta.empty and lookahead):
                        delta = prev.merge(delta) if delta.finish_reason is not None else prev
                    else:
                        sent.add(i)
                        yield prev
                if delta.finish_reason is not None:
                    yield delta
                    live -= 1
                    if live == 0:
                        return
                elif not delta.empty:
                    if lookahead and i in sent:
                        held[i] = delta
                    else:
                        sent.add(i)
                        yield delta
        except FastpilotError:
            raise
        except Exception as ex:  # a backend bug surfaces as a typed 500, not a bare exception
            raise BackendError(f"generation failed: {type(ex).__name__}: {ex}") from ex
        finally:
            self.finish()

    def finish(self, *, error: bool = False) -> None:
        """Cancel every stream (finished ones ignore it) and settle the counters once."""
        for stream in self.streams:
            stream.cancel()
        with self._settle:
            if not self._active:
                return
            self._active = False
            self.ctx.counters.add(
                requests_active=-1,
                errors_total=int(error),
                prompt_tokens_total=len(self.prep.prompt_ids),
                completion_tokens_total=self.completion_tokens,
            )

    def count_error(self, ex: FastpilotError) -> None:
        """Count a failed request: every error, and a passed deadline as a timeout too."""
        if isinstance(ex, Timeout):
            self.ctx.counters.add(timeouts_total=1, errors_total=1)
        else:
            self.ctx.counters.add(errors_total=1)

    def close(self) -> None:
        self.closed = True
        for stream in self.streams:
            stream.cancel()

    @property
    def completion_tokens(self) -> int:
        return sum(s.generated for s in self.states)

    def usage(self) -> dict[str, Any]:
        prompt = len(self.prep.prompt_ids)
        completion = self.completion_tokens
        # min: sequences of one request share their prefill, which a backend may
        # report as cached for all but the first; usage counts cross-request hits.
        cached = min((s.cached_tokens for s in self.streams), default=0)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(cached, prompt)},
        }
        # Speculative decoding ran (OpenAI's names): drafted tokens the model confirmed,
        # and drafted tokens it refused (evaluated, never emitted nor counted above).
        accepted = sum(s.accepted_prediction_tokens for s in self.streams)
        rejected = sum(s.rejected_prediction_tokens for s in self.streams)
        if accepted or rejected:
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": accepted,
                "rejected_prediction_tokens": rejected,
            }
        return usage

    def complete(self) -> CompletionResult:
        texts: dict[int, list[str]] = {}
        entries: dict[int, list[TokenEntry]] = {}
        reasons: dict[int, str | None] = {}
        try:
            for d in self.deltas(lookahead=False):
                texts.setdefault(d.index, []).append(d.text)
                entries.setdefault(d.index, []).extend(d.entries)
                if d.finish_reason is not None:
                    reasons[d.index] = d.finish_reason
        except FastpilotError as ex:
            self.count_error(ex)
            raise
        order = list(range(self.req.n))
        if self.states and len(self.states) > self.req.n:
            ranked = sorted(range(len(self.states)), key=lambda i: -self.states[i].cum_logprob)
            order = ranked[: self.req.n]
        choices = []
        for new_index, i in enumerate(order):
            text = "".join(texts.get(i, []))
            lp = self.shape_logprobs(entries.get(i, [])) if self.want_logprobs else None
            choices.append(self.shape_choice(new_index, text, lp, reasons.get(i)))
        body = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.ctx.name,
            "choices": choices,
            "usage": self.usage(),
        }
        return CompletionResult(
            body, self.prep.fim_used, self.prep.suffix_ignored, self.prep.truncated
        )

    # -- shaping ------------------------------------------------------------------------
    def shape_choice(
        self, index: int, text: str, logprobs: Any, reason: str | None
    ) -> dict[str, Any]:
        if self.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": reason,
            }
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}

    def shape_logprobs(self, entries: Sequence[TokenEntry]) -> dict[str, Any]:
        text_of = self.ctx.token_text
        if self.chat:

            def item(tok: int, lp: float) -> dict[str, Any]:
                return {
                    "token": text_of(tok),
                    "logprob": lp,
                    "bytes": list(self.ctx.backend.token_bytes(tok)),
                }

            return {
                "content": [
                    {
                        **item(e.token_id, e.logprob if e.logprob is not None else 0.0),
                        "top_logprobs": [item(t, lp) for t, lp in e.top[: self.req.logprobs or 0]],
                    }
                    for e in entries
                ]
            }
        tops: list[dict[str, float] | None] = []
        for e in entries:
            if e.logprob is None:
                tops.append(None)
                continue
            top: dict[str, float] = {}
            for tok, lp in e.top[: self.req.logprobs or 0]:
                top.setdefault(text_of(tok), lp)
            # OpenAI lists the sampled token too, even when it is not in the top k;
            # when two ids share a text (padding rows decode to ""), the sampled
            # token's value is the one shown, so top[token] == token_logprob.
            top[text_of(e.token_id)] = e.logprob
            tops.append(top)
        return {
            "tokens": [text_of(e.token_id) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops,
            "text_offset": [e.offset for e in entries],
        }


_S = TypeVar("_S", bound="ChunkIterator")


class ChunkIterator:
    """Iterates the generator ``_chunks`` a subclass sets; closing may come from any thread."""

    _chunks: Generator[dict[str, Any], None, None]

    def __iter__(self: _S) -> _S:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._chunks)

    def _end_chunks(self) -> None:
        """End the iteration now, or at its next chunk when another thread is inside it."""
        try:
            self._chunks.close()
        except ValueError:
            pass  # being iterated in another thread: it ends at its next chunk


class CompletionStream(ChunkIterator):
    """Chunks of one streaming request, as dicts ready for ``data:`` lines.

    Iterate it from one thread. :meth:`close` (alias :meth:`cancel`) may be
    called from any thread, e.g. when the client disconnects: it cancels every
    backend stream of the request at once and ends the iteration. Errors
    during iteration are :class:`fastpilot.errors.FastpilotError` subclasses.
    """

    def __init__(self, run: Run) -> None:
        self._run = run
        self.id = run.id
        self.created = run.created
        self.fim_used = run.prep.fim_used
        self.suffix_ignored = run.prep.suffix_ignored
        self.truncated = run.prep.truncated
        self.prompt_tokens = len(run.prep.prompt_ids)
        # A function of the run, not a bound method: a generator holding ``self`` would
        # make a cycle, and an abandoned stream would run on until the cycle collector
        # found it instead of being cancelled when its last reference goes.
        self._chunks = _chunks(run)

    def close(self) -> None:
        """Cancel the request's backend streams and end the iteration; idempotent."""
        self._run.close()
        self._end_chunks()
        self._run.finish()

    cancel = close

    def __del__(self) -> None:
        run = getattr(self, "_run", None)
        if run is not None:
            run.close()
            run.finish()

    def usage(self) -> dict[str, Any]:
        """Usage so far (complete once the iteration ended)."""
        return self._run.usage()


def _chunks(run: Run) -> Generator[dict[str, Any], None, None]:
    """The chunks of ``run`` as dicts ready for ``data:`` lines; finishes the run."""
    base = {
        "id": run.id,
        "object": run.object + (".chunk" if run.chat else ""),
        "created": run.created,
        "model": run.ctx.name,
    }
    with_usage = run.req.include_usage
    started: set[int] = set()
    try:
        for d in run.deltas(lookahead=True):
            lp = run.shape_logprobs(d.entries) if run.want_logprobs else None
            if run.chat:
                text = d.text  # exactly as generated: leading whitespace included
                delta: dict[str, Any] = {"content": text} if text else {}
                if d.index not in started:
                    delta = {"role": "assistant", "content": text}
                    started.add(d.index)
                choice: dict[str, Any] = {
                    "index": d.index,
                    "delta": delta,
                    "logprobs": lp,
                    "finish_reason": d.finish_reason,
                }
            else:
                choice = {
                    "text": d.text,
                    "index": d.index,
                    "logprobs": lp,
                    "finish_reason": d.finish_reason,
                }
            chunk = {**base, "choices": [choice]}
            if with_usage:
                chunk["usage"] = None
            yield chunk
    except FastpilotError as ex:
        run.count_error(ex)
        raise
    finally:
        run.finish()
    if with_usage and not run.closed:
        yield {**base, "choices": [], "usage": run.usage()}
