"""The library API: one loaded model answering OpenAI-shaped requests.

:class:`Model` sits between a validated :class:`CompletionRequest` and a
backend's token streams. It prepares the prompt (tokenize, FIM, context
fitting), submits every sequence of a request at once so the backend can
batch them, follows each stream (detokenization, stop strings, logprobs,
``finish_reason``), and shapes OpenAI ``text_completion`` / ``chat.completion``
objects or chunk iterators. The HTTP layer only serializes what it returns.

How the server learns what is not in the JSON: the returned dict
(:class:`Completion`) and the stream (:class:`CompletionStream`) carry
attributes ``fim_used`` (the suffix went through the model's FIM template),
``suffix_ignored`` (a suffix was given but the model has no FIM template; say
so in a response header) and ``truncated`` (prompt tokens dropped).

Deadlines: ``timeout`` (request) or ``default_timeout`` (model) becomes the
backend request's monotonic deadline. When it passes, the backend ends the
stream and the model raises :class:`fastpilot.errors.Timeout` (504) -- from
``complete`` before anything is returned, or from a stream's iteration after
the chunks generated so far (the server then sends an error event).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any

from fastpilot.backends.base import Backend, BackendInfo, GenerationRequest, TokenStream
from fastpilot.engine import chat as chatfmt
from fastpilot.engine.detok import IncrementalDetokenizer
from fastpilot.engine.params import CompletionRequest, Limits
from fastpilot.engine.prompt import PreparedPrompt, prepare
from fastpilot.engine.sequences import Delta, SequenceState, TokenEntry, merge_streams
from fastpilot.errors import BackendError, FastpilotError, InvalidRequest, Timeout


class Completion(dict):
    """An OpenAI response object (a plain dict for JSON) plus what the headers need."""

    fim_used: bool = False
    suffix_ignored: bool = False
    truncated: int = 0


class Model:
    """A loaded model behind the OpenAI request semantics. Thread-safe.

    Every method may be called from many threads at once (waitress runs one
    per connection); requests only share the backend, which batches them.
    ``clock`` (wall seconds, for ``created``) and ``new_id`` (a unique string,
    for ``id``) are injectable for tests.
    """

    def __init__(
        self,
        name: str,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] | None = None,
        default_timeout: float | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.name = name
        self.backend = backend
        self.clock = clock
        self.new_id = new_id or (lambda: uuid.uuid4().hex[:24])
        self.default_timeout = default_timeout
        self.limits = limits or Limits()
        self._token_text: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stats = {
            "requests_total": 0,
            "requests_active": 0,
            "errors_total": 0,
            "timeouts_total": 0,
            "prompt_tokens_total": 0,
            "completion_tokens_total": 0,
        }

    # -- properties ---------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return int(self.backend.context_length)

    @property
    def supports_fim(self) -> bool:
        return self.backend.fim is not None

    @property
    def info(self) -> BackendInfo:
        return self.backend.info

    def __repr__(self) -> str:
        return f"Model({self.name!r}, backend={type(self.backend).__name__})"

    # -- tokenizer ----------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's own tokenizer (no BOS)."""
        if not isinstance(text, str):
            raise InvalidRequest("text to tokenize must be a string", param="prompt")
        return list(self.backend.tokenize(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; raises InvalidRequest for ids outside the vocabulary."""
        ids = list(ids)
        if not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.backend.vocab_size
            for t in ids
        ):
            raise InvalidRequest(
                f"tokens must be integers in [0, {self.backend.vocab_size})", param="tokens"
            )
        return self.backend.detokenize(ids)

    def token_text(self, token_id: int) -> str:
        """One token's text for ``logprobs``; a partial UTF-8 character reads ``bytes:\\x..``."""
        text = self._token_text.get(token_id)
        if text is None:
            data = self.backend.token_bytes(token_id)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                # Part of a character: OpenAI spells such tokens "bytes:\\xe4\\xb8".
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            self._token_text[token_id] = text
        return text

    # -- completions --------------------------------------------------------------------
    def _request(
        self, request: CompletionRequest | None, params: Mapping[str, Any]
    ) -> CompletionRequest:
        if request is None:
            return CompletionRequest.from_dict(params, limits=self.limits)
        if params:
            raise TypeError("pass either a CompletionRequest or keyword parameters, not both")
        if not isinstance(request, CompletionRequest):
            raise TypeError(f"expected a CompletionRequest, got {type(request).__name__}")
        return request

    def complete(self, request: CompletionRequest | None = None, /, **params: Any) -> Completion:
        """Run one completion request to the end; returns the ``text_completion`` object.

        Blocks the calling thread until every sequence finished. ``best_of``
        sequences are generated together and the ``n`` with the highest
        cumulative logprob are returned, best first. Raises
        :class:`FastpilotError` subclasses (InvalidRequest,
        ContextLengthExceeded, QueueFull, Timeout, BackendError).
        """
        req = self._request(request, params)
        run = _Run(self, req, stops=req.stop, chat=False)
        return run.complete()

    def stream(
        self, request: CompletionRequest | None = None, /, **params: Any
    ) -> CompletionStream:
        """Start a completion and return its chunk iterator.

        Validation, context errors and QueueFull are raised here, before the
        first chunk, so the server can still answer with a status code. The
        caller must exhaust or :meth:`CompletionStream.close` the stream.
        """
        req = self._request(request, params)
        if req.best_of is not None and req.best_of > req.n:
            raise InvalidRequest("best_of cannot be used with stream", param="best_of")
        return CompletionStream(_Run(self, req, stops=req.stop, chat=False))

    # -- chat ---------------------------------------------------------------------------
    def _chat_request(self, messages: Any, params: dict[str, Any]) -> CompletionRequest:
        msgs = chatfmt.validate_messages(messages)
        p = dict(params)
        for key in ("echo", "suffix", "best_of", "prompt"):
            p.pop(key, None)
        if "max_completion_tokens" in p:
            p["max_tokens"] = p.pop("max_completion_tokens")
        p.setdefault("max_tokens", min(256, self.limits.max_tokens))
        want = p.pop("logprobs", None)
        top = p.pop("top_logprobs", None)
        if want not in (None, False, "false", "False", "0", 0):
            p["logprobs"] = top if top is not None else 0
        p["prompt"] = chatfmt.render_plain(msgs)
        return CompletionRequest.from_dict(p, limits=self.limits)

    def chat(self, messages: Any, **params: Any) -> Completion:
        """Answer a conversation; returns the ``chat.completion`` object.

        Models without a chat template (GPT-2, CodeGen) get the plain
        role-tagged transcript of :mod:`fastpilot.engine.chat` and stop at the
        next ``"\\nUser:"``. ``max_tokens`` defaults to 256 here.
        """
        req = self._chat_request(messages, params)
        return _Run(self, req, stops=req.stop + chatfmt.DEFAULT_STOPS, chat=True).complete()

    def stream_chat(self, messages: Any, **params: Any) -> CompletionStream:
        """Like :meth:`chat`, as ``chat.completion.chunk`` dicts with ``delta``."""
        req = self._chat_request(messages, params)
        return CompletionStream(_Run(self, req, stops=req.stop + chatfmt.DEFAULT_STOPS, chat=True))

    def ask(self, messages: Any, **params: Any) -> dict[str, Any]:
        """The ``/ask`` shape: ``{"reply": text, "usage": {...}}``."""
        out = self.chat(messages, **params)
        return {"reply": out["choices"][0]["message"]["content"], "usage": out["usage"]}

    # -- embeddings ---------------------------------------------------------------------
    def embed(self, texts: str | Sequence[str]) -> dict[str, Any]:
        """Mean-pooled hidden states as the OpenAI ``list`` of embeddings.

        Blocks while the backend runs the forward passes; raises NotSupported
        when the backend cannot embed.
        """
        items = [texts] if isinstance(texts, str) else texts
        if (
            not isinstance(items, Sequence)
            or not items
            or not all(isinstance(t, str) for t in items)
        ):
            raise InvalidRequest(
                "input must be a string or a non-empty list of strings", param="input"
            )
        items = list(items)
        counts = [len(self.backend.tokenize(t)) for t in items]
        too_long = [c for c in counts if c > self.context_length]
        if too_long:
            raise InvalidRequest(
                f"an input has {too_long[0]} tokens; the context length is {self.context_length}",
                param="input",
            )
        vectors = self.backend.embed(items)
        used = sum(counts)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [float(x) for x in vec]}
                for i, vec in enumerate(vectors)
            ],
            "model": self.name,
            "usage": {"prompt_tokens": used, "total_tokens": used},
        }

    # -- bookkeeping --------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._stats[key] += value

    def stats(self) -> dict[str, float]:
        """Counters for /metrics: this model's requests and tokens, then the backend's."""
        with self._lock:
            out: dict[str, float] = dict(self._stats)
        for key, value in self.backend.stats().items():
            out[f"backend_{key}"] = value
        return out

    def close(self) -> None:
        """Stop the backend's worker and free the model. Idempotent."""
        self.backend.close()


class _Run:
    """One request in flight: its prepared prompt, its streams and its choices."""

    def __init__(
        self, model: Model, req: CompletionRequest, *, stops: Sequence[str], chat: bool
    ) -> None:
        self.model = model
        self.req = req
        self.chat = chat
        self.stops = tuple(stops)
        self.id = ("chatcmpl-" if chat else "cmpl-") + model.new_id()
        self.created = max(1, int(model.clock()))
        self.object = "chat.completion" if chat else "text_completion"
        backend = model.backend
        self.prep: PreparedPrompt = prepare(backend, req, default_timeout=model.default_timeout)
        self.want_logprobs = req.logprobs is not None
        self.echo_text = ""
        self.echo_entries: tuple[TokenEntry, ...] = ()
        if req.echo and not chat:
            self._echo()
        self.closed = False
        self.streams: list[TokenStream] = []
        self.states: list[SequenceState] = []
        count = req.num_sequences
        model._count(requests_total=1, requests_active=1)
        self._active = True
        self._settle = threading.Lock()  # finish() may race between close() and the iterator
        if self.prep.max_tokens == 0:
            return
        try:
            for i in range(count):
                params = dataclasses.replace(req.sampling(i), max_tokens=self.prep.max_tokens)
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
                        eos_token_ids=frozenset(backend.eos_token_ids),
                        max_tokens=self.prep.max_tokens,
                        want_logprobs=self.want_logprobs,
                        base_offset=len(self.echo_text),
                    )
                )
        except BaseException:
            self.finish(error=True)
            raise

    def _echo(self) -> None:
        """Decode the (possibly truncated) prompt and, when asked, score its tokens."""
        ids = self.prep.echo_ids
        detok = IncrementalDetokenizer(self.model.backend.token_bytes)
        parts: list[str] = []
        offsets: list[int] = []
        for tok in ids:
            offsets.append(detok.chars)
            parts.append(detok.feed(tok))
        parts.append(detok.flush())
        self.echo_text = "".join(parts)
        if self.want_logprobs and ids:
            k = self.req.logprobs or 0
            scored = self.model.backend.prompt_logprobs(list(self.prep.prompt_ids), k)
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

        With ``lookahead`` a text delta is held until the choice's next event,
        so ``finish_reason`` rides on the last text-bearing delta instead of an
        empty one; this delays each delta by one decode step, except when the
        end is known at once (max_tokens reached, stop string matched).
        Cancels every outstanding backend stream on any exit.
        """
        held: dict[int, Delta] = {}
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
                        yield prev
                if delta.finish_reason is not None:
                    yield delta
                    live -= 1
                    if live == 0:
                        return
                elif not delta.empty:
                    if lookahead:
                        held[i] = delta
                    else:
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
            self.model._count(
                requests_active=-1,
                errors_total=int(error),
                prompt_tokens_total=len(self.prep.prompt_ids),
                completion_tokens_total=self.completion_tokens,
            )

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
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(cached, prompt)},
        }

    def complete(self) -> Completion:
        texts: dict[int, list[str]] = {}
        entries: dict[int, list[TokenEntry]] = {}
        reasons: dict[int, str | None] = {}
        try:
            for d in self.deltas(lookahead=False):
                texts.setdefault(d.index, []).append(d.text)
                entries.setdefault(d.index, []).extend(d.entries)
                if d.finish_reason is not None:
                    reasons[d.index] = d.finish_reason
        except Timeout:
            self.model._count(timeouts_total=1, errors_total=1)
            raise
        except FastpilotError:
            self.model._count(errors_total=1)
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
        out = Completion(
            id=self.id,
            object=self.object,
            created=self.created,
            model=self.model.name,
            choices=choices,
            usage=self.usage(),
        )
        out.fim_used = self.prep.fim_used
        out.suffix_ignored = self.prep.suffix_ignored
        out.truncated = self.prep.truncated
        return out

    # -- shaping ------------------------------------------------------------------------
    def shape_choice(
        self, index: int, text: str, logprobs: Any, reason: str | None
    ) -> dict[str, Any]:
        if self.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text.lstrip()},
                "logprobs": logprobs,
                "finish_reason": reason,
            }
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}

    def shape_logprobs(self, entries: Sequence[TokenEntry]) -> dict[str, Any]:
        text_of = self.model.token_text
        if self.chat:

            def item(tok: int, lp: float) -> dict[str, Any]:
                return {
                    "token": text_of(tok),
                    "logprob": lp,
                    "bytes": list(self.model.backend.token_bytes(tok)),
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


class CompletionStream:
    """Chunks of one streaming request, as dicts ready for ``data:`` lines.

    Iterate it from one thread. :meth:`close` (alias :meth:`cancel`) may be
    called from any thread, e.g. when the client disconnects: it cancels every
    backend stream of the request at once and ends the iteration. Errors
    during iteration are :class:`fastpilot.errors.FastpilotError` subclasses.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run
        self.id = run.id
        self.created = run.created
        self.fim_used = run.prep.fim_used
        self.suffix_ignored = run.prep.suffix_ignored
        self.truncated = run.prep.truncated
        self.prompt_tokens = len(run.prep.prompt_ids)
        self._chunks = self._generate()

    def __iter__(self) -> CompletionStream:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._chunks)

    def close(self) -> None:
        """Cancel the request's backend streams and end the iteration; idempotent."""
        self._run.close()
        try:
            self._chunks.close()
        except ValueError:
            pass  # being iterated in another thread: it ends at its next step
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

    def _generate(self) -> Generator[dict[str, Any], None, None]:
        run = self._run
        base = {
            "id": run.id,
            "object": run.object + (".chunk" if run.chat else ""),
            "created": run.created,
            "model": run.model.name,
        }
        with_usage = run.req.include_usage
        started: set[int] = set()
        try:
            for d in run.deltas(lookahead=True):
                lp = run.shape_logprobs(d.entries) if run.want_logprobs else None
                if run.chat:
                    text = d.text
                    if d.index not in started:
                        text = text.lstrip()
                        if not text and d.finish_reason is None:
                            continue  # only leading whitespace so far
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
        except Timeout:
            run.model._count(timeouts_total=1, errors_total=1)
            raise
        except FastpilotError:
            run.model._count(errors_total=1)
            raise
        finally:
            run.finish()
        if with_usage and not run.closed:
            yield {**base, "choices": [], "usage": run.usage()}
