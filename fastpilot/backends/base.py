"""The backend contract: one loaded model, its tokenizer, and streams of sampled steps.

A backend owns one model and a worker thread that schedules generation. The
engine (``fastpilot.engine``) talks to it only through this module: it
tokenizes, submits :class:`GenerationRequest` objects and iterates the
:class:`TokenStream` each one returns. Everything that must behave the same on
every backend -- stop strings, FIM rendering, usage, context fitting, response
shaping -- lives in the engine, not here.

Backends never import Falcon; heavy libraries are imported lazily inside the
concrete backend modules.
"""

from __future__ import annotations

import abc
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from fastpilot.errors import BackendError, NotSupported

if TYPE_CHECKING:
    from fastpilot.backends.fim_tokens import FimTokenIds


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-sequence sampling settings, OpenAI names and semantics.

    ``temperature == 0`` means greedy. ``logit_bias`` maps token id -> additive
    bias; ``-100`` or lower bans the token. ``presence_penalty`` and
    ``frequency_penalty`` follow OpenAI's additive definition over the tokens
    this sequence generated: ``logit[t] -= count[t] * frequency + (count[t] > 0) * presence``.
    ``repetition_penalty`` is the CTRL/HF multiplicative one over prompt and
    generated tokens. ``min_tokens`` bans end-of-sequence until that many
    tokens exist (benchmarks use it to force the length).

    ``token_logprob`` False lets the sampler skip the chosen token's
    log-probability when ``logprobs`` is 0 -- a pass over the whole vocabulary
    per token -- and leave :attr:`Step.logprob` NaN. The engine turns it off when
    nothing reads the value (no ``logprobs``, no ``best_of`` ranking).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    token_logprob: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True, slots=True)
class Step:
    """One generated token with its log-probability under the sampled distribution.

    ``top_logprobs`` lists ``(token_id, logprob)`` of the most likely
    alternatives, best first, when the request asked for them; the values come
    from the same log-softmax as ``logprob``. ``logprob`` is NaN when the request
    said it is not read (``SamplingParams.token_logprob`` False).
    """

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()


class FinishReason(str, Enum):
    """Why a stream ended (see :class:`Backend` for what each one looks like)."""

    STOP = "stop"  # end-of-sequence token (or a stop string, decided by the engine)
    LENGTH = "length"  # max_tokens or the context window reached
    CANCELLED = "cancelled"  # the consumer cancelled or the deadline passed


@dataclass(slots=True)
class GenerationRequest:
    """One sequence to generate. ``deadline`` is a ``time.monotonic()`` value."""

    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None = None
    request_id: str = ""


_END = object()


class TokenStream:
    """The consumer side of one sequence.

    The backend's worker thread calls :meth:`put`, :meth:`finish` or
    :meth:`fail`; the consumer iterates the steps. :meth:`cancel` may be called
    from any thread; the worker checks :attr:`cancelled` before every decode
    step and then finishes the stream with ``CANCELLED``, freeing its slot.
    """

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.finish_reason: FinishReason | None = None
        self.cached_tokens = 0  # prompt tokens served from the prompt cache
        # Speculative decoding (llama.cpp): drafted tokens the model confirmed / refused.
        # Written by the worker before the step or finish that follows; 0 without drafts.
        self.accepted_prediction_tokens = 0
        self.rejected_prediction_tokens = 0
        self.prompt_tokens = len(request.prompt_ids)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self.created = time.monotonic()
        self.first_token_at: float | None = None

    # -- worker side ------------------------------------------------------------------
    def put(self, step: Step) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self._queue.put(step)

    def finish(self, reason: FinishReason) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self._queue.put(_END)

    def fail(self, error: BaseException) -> None:
        if self.finish_reason is None:
            self._error = error
            self.finish_reason = FinishReason.CANCELLED
            self._queue.put(_END)

    @property
    def cancelled(self) -> bool:
        """True when the consumer cancelled or the request's deadline passed."""
        if self._cancel.is_set():
            return True
        deadline = self.request.deadline
        return deadline is not None and time.monotonic() > deadline

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # -- consumer side ----------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Iterator[Step]:
        while True:
            item = self._queue.get()
            if item is _END:
                if self._error is not None:
                    raise BackendError(str(self._error)) from self._error
                return
            assert isinstance(item, Step)
            yield item


@dataclass(frozen=True, slots=True)
class FimTemplate:
    """Fill-in-the-middle prompt layout.

    Rendered as ``prefix_token + prefix + suffix_token + suffix + middle_token``.
    """

    prefix: str
    suffix: str
    middle: str

    def render(self, prefix: str, suffix: str) -> str:
        return f"{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}"


@dataclass(slots=True)
class BackendInfo:
    """What the listing routes and /metrics say about a loaded model."""

    backend: str
    path: str
    arch: str = ""
    quantization: str = ""
    device: str = "cpu"
    extra: dict[str, object] = field(default_factory=dict)


class Backend(abc.ABC):
    """One loaded model. Subclasses implement the abstract methods only.

    Thread-safety: ``tokenize``/``token_bytes``/``detokenize`` may be called
    from any thread; ``submit`` is non-blocking and thread-safe (it enqueues
    for the backend's worker and raises :class:`fastpilot.errors.QueueFull`
    when the bounded queue is full).

    The contract every backend keeps (``tests/test_backend_contract.py`` runs it
    over the test fake, CTranslate2 and llama.cpp):

    * **Steps are completion tokens.** Each :class:`Step` pushed is one generated
      token, ids in ``[0, vocab_size)``. An end-of-sequence token is *not* pushed:
      the stream finishes ``STOP`` right after the last real token, so the EOS is
      neither text nor a counted completion token. ``min_tokens`` and
      ``ignore_eos`` ban it instead (then ``max_tokens`` ends with ``LENGTH``).
    * **Finishing.** ``LENGTH`` at ``max_tokens`` or when prompt + generated
      tokens fill ``context_length``; ``CANCELLED`` within one decode step of
      :meth:`TokenStream.cancel` or of the deadline passing, with the steps
      already pushed kept; a request cancelled or expired before it started
      finishes ``CANCELLED`` with no step. A stream fails (its iterator raises
      :class:`BackendError`) only when the native library failed it or the
      model was closed.
    * **Vocabulary.** ``vocab_size`` counts the tokenizer's ids. Output rows
      past it (a vocabulary padded to a round size, as converted CodeGen
      models have) are never sampled, never listed in ``top_logprobs`` and not
      part of the softmax; prompt ids outside ``[0, vocab_size)`` raise
      :class:`fastpilot.errors.InvalidRequest` at :meth:`submit`.
    * **The queue.** A backend generates up to its capacity at once (llama.cpp:
      ``slots``; CTranslate2: one batch of up to ``max_batch``). ``max_queue``
      counts the requests *waiting* beyond that -- submitted, unfinished, not
      generating; :meth:`submit` raises :class:`fastpilot.errors.QueueFull` when
      ``max_queue`` already wait and the new one could not start at once.
      ``stats()["queue_depth"]`` is that number.
    * **Closing.** :meth:`close` stops the worker and frees the model: every
      unfinished stream, running or queued, fails with :class:`BackendError`
      ("the model was closed") after the steps it already had; later
      :meth:`submit` calls raise :class:`BackendError`. Idempotent; blocks
      until the worker stopped (one decode step, or a CTranslate2 prefill).
    """

    name: ClassVar[str] = "base"
    # True for encoder-decoder models: the prompt is encoder input, not text the
    # completion continues, so ``echo`` has no meaning and the engine refuses it.
    encoder_decoder: ClassVar[bool] = False

    context_length: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    fim: FimTemplate | None = None
    # How the model infills when ``fim`` does not say: the manifest's raw "fim" entry
    # and a GGUF's own FIM token ids; read by fastpilot.engine.fim.fim_format.
    fim_spec: Mapping[str, Any] | None = None
    fim_tokens: FimTokenIds | None = None
    info: BackendInfo

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` exactly as the model's own tokenizer gives them (no BOS added)."""

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for; may be part of a UTF-8 character."""

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue one sequence for generation and return its stream at once."""

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int) -> list[Step | None]:
        """Log-probabilities of each prompt token given the ones before it (for ``echo``).

        The first entry is ``None`` (nothing precedes it). Backends that cannot
        score raise :class:`NotSupported`.
        """
        raise NotSupported(f"the {self.name} backend cannot score prompt tokens")

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Mean-pooled final hidden states, one vector per text."""
        raise NotSupported(f"the {self.name} backend does not produce embeddings")

    def stats(self) -> dict[str, float]:
        """Counters for /metrics (queue depth, busy slots, decode steps ...)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Stop the worker and free the model; unfinished streams fail. Idempotent."""
