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

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastpilot.backends.base import Backend, BackendInfo
from fastpilot.engine import batch
from fastpilot.engine import chat as chatfmt
from fastpilot.engine.coerce import coerce_bool, coerce_int
from fastpilot.engine.context import RequestCounters, RunContext
from fastpilot.engine.fim import FimFormat, fim_format
from fastpilot.engine.params import CompletionRequest, Limits
from fastpilot.engine.run import Completion, CompletionStream, Run
from fastpilot.errors import InvalidRequest

__all__ = ["Completion", "CompletionStream", "Model"]


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
        self._counters = RequestCounters()

    # -- properties ---------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return int(self.backend.context_length)

    @property
    def fim_format(self) -> FimFormat:
        """How this model fills in the middle (``FimStyle.CANNOT`` when it cannot)."""
        return fim_format(self.backend)

    @property
    def supports_fim(self) -> bool:
        return self.fim_format.can_infill

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
    def _context(self) -> RunContext:
        """What a request needs of this model, read now (tests may swap ``clock``/``new_id``)."""
        return RunContext(
            name=self.name,
            backend=self.backend,
            token_text=self.token_text,
            counters=self._counters,
            new_id=self.new_id,
            clock=self.clock,
            default_timeout=self.default_timeout,
        )

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
        cumulative logprob are returned, best first. Several prompts are
        submitted together and answered as ``choices[i * n + j]`` (see
        :mod:`fastpilot.engine.batch`). Raises :class:`FastpilotError`
        subclasses (InvalidRequest, ContextLengthExceeded, QueueFull, Timeout,
        BackendError).
        """
        req = self._request(request, params)
        if len(req.prompts) > 1:
            return Completion.of(batch.complete(batch.start_runs(req, self._completion_run), req.n))
        return Completion.of(self._completion_run(req).complete())

    def _completion_run(self, req: CompletionRequest) -> Run:
        return Run(self._context(), req, stops=req.stop, chat=False)

    def stream(
        self, request: CompletionRequest | None = None, /, **params: Any
    ) -> CompletionStream | batch.BatchStream:
        """Start a completion and return its chunk iterator.

        Validation, context errors and QueueFull are raised here, before the
        first chunk, so the server can still answer with a status code. The
        caller must exhaust or :meth:`CompletionStream.close` the stream.
        Each choice's first chunk is sent at once; later chunks are held one
        decode step so ``finish_reason`` rides on the last text chunk (see
        :meth:`fastpilot.engine.run.Run.deltas`).
        """
        req = self._request(request, params)
        if req.best_of is not None and req.best_of > req.n:
            raise InvalidRequest("best_of cannot be used with stream", param="best_of")
        if len(req.prompts) > 1:
            runs = batch.start_runs(req, self._completion_run)
            return batch.BatchStream(runs, req.n, include_usage=req.include_usage)
        return CompletionStream(self._completion_run(req))

    # -- chat ---------------------------------------------------------------------------
    def _chat_request(self, messages: Any, params: dict[str, Any]) -> CompletionRequest:
        msgs = chatfmt.validate_messages(messages)
        p = dict(params)
        for key in ("echo", "suffix", "best_of", "prompt"):
            p.pop(key, None)
        newer = p.pop("max_completion_tokens", None)  # chat's newer name for max_tokens
        if newer is not None:
            p["max_tokens"] = coerce_int(
                newer, "max_completion_tokens", 0, lo=0, hi=self.limits.max_tokens
            )
        p.setdefault("max_tokens", min(256, self.limits.max_tokens))
        # Chat's logprobs is a boolean; top_logprobs says how many alternatives.
        want = coerce_bool(p.pop("logprobs", None), "logprobs", False)
        top = coerce_int(
            p.pop("top_logprobs", None), "top_logprobs", 0, lo=0, hi=self.limits.max_logprobs
        )
        if want:
            p["logprobs"] = top
        p["prompt"] = chatfmt.render_plain(msgs)
        return CompletionRequest.from_dict(p, limits=self.limits)

    def chat(self, messages: Any, **params: Any) -> Completion:
        """Answer a conversation; returns the ``chat.completion`` object.

        Models without a chat template (GPT-2, CodeGen) get the plain
        role-tagged transcript of :mod:`fastpilot.engine.chat` and stop at the
        next ``"\\nUser:"``. ``max_tokens`` defaults to 256 here.
        """
        req = self._chat_request(messages, params)
        run = Run(self._context(), req, stops=req.stop + chatfmt.DEFAULT_STOPS, chat=True)
        return Completion.of(run.complete())

    def stream_chat(self, messages: Any, **params: Any) -> CompletionStream:
        """Like :meth:`chat`, as ``chat.completion.chunk`` dicts with ``delta``."""
        req = self._chat_request(messages, params)
        stops = req.stop + chatfmt.DEFAULT_STOPS
        return CompletionStream(Run(self._context(), req, stops=stops, chat=True))

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
    def stats(self) -> dict[str, float]:
        """Counters for /metrics: this model's requests and tokens, then the backend's."""
        out: dict[str, float] = dict(self._counters.snapshot())
        for key, value in self.backend.stats().items():
            out[f"backend_{key}"] = value
        return out

    def close(self) -> None:
        """Stop the backend's worker and free the model. Idempotent."""
        self.backend.close()
