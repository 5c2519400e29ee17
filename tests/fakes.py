"""A deterministic toy backend implementing the real :class:`Backend` contract.

For fast engine and API tests that need no converted model. The "model" is a
bigram table: the logits for the next token are ``TABLE[last_token]`` (fixed
numpy random numbers) plus a boost of ``SCRIPT_BOOST`` on the token at the
current position of a script, so greedy decoding writes ``script`` exactly
(then the end-of-text token), while sampling at temperature 1 still varies.

The vocabulary is byte-level like GPT-2: ids 0..255 are single bytes, then a
few multi-byte words (including the two halves of the UTF-8 for "中", so
detokenization is exercised), then ``<|endoftext|>`` last. The tokenizer is
greedy longest match.

The worker thread interleaves every active sequence one step at a time, honours
cancellation and deadlines before each step, and uses the shared
:class:`SequenceSampler`, so logprobs, penalties and seeds behave as on the
real backends. It obeys the contract of :mod:`fastpilot.backends.base`: no step
for an end-of-sequence token, ``close()`` fails open streams, and ``max_queue``
counts requests waiting beyond ``slots`` generating ones. ``step_delay``
(seconds per decode round) makes timing tests possible.

Typical use::

    backend = FakeBackend(script=" world!\\n")
    model = Model("fake", backend)
    model.complete(prompt="hello", max_tokens=8, temperature=0)  # text " world!\\n"
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from fastpilot.backends.base import (
    Backend,
    BackendInfo,
    FimTemplate,
    FinishReason,
    GenerationRequest,
    Step,
    TokenStream,
)
from fastpilot.backends.sampling import SequenceSampler, log_softmax, top_entries
from fastpilot.errors import BackendError, InvalidRequest, QueueFull

WORDS = (
    "hello",
    " world",
    "def",
    " fib",
    "(n",
    "):",
    "\n",
    "    ",
    "return",
    " ",
    "\n\n",
    "User",
    ":",
)
SCRIPT_BOOST = 8.0


def _vocab() -> list[bytes]:
    words = [w.encode() for w in WORDS]
    zhong = "中".encode()  # 3 bytes
    words += [zhong[:2], zhong[2:] + b"!"]  # split across two tokens, on purpose
    return [bytes([b]) for b in range(256)] + words + [b"<|endoftext|>"]


class FakeBackend(Backend):
    """Toy bigram model behind the real contract; thread-safe like a real backend."""

    name = "fake"

    def __init__(
        self,
        script: str = " world\n\ndef fib(n):\n    return n\n",
        *,
        context_length: int = 128,
        fim: FimTemplate | None = None,
        step_delay: float = 0.0,
        max_queue: int = 64,
        slots: int = 0,
        seed: int = 0,
    ) -> None:
        """``slots``: sequences generated at once, the rest wait in order. ``0`` (the
        engine tests' default) generates every request at once yet counts each as
        waiting, so ``max_queue`` bounds all unfinished requests."""
        self.vocab = _vocab()
        self.vocab_size = len(self.vocab)
        self.eos = self.vocab_size - 1
        self.eos_token_ids = frozenset({self.eos})
        self.context_length = context_length
        self.fim = fim
        self.step_delay = step_delay
        self.max_queue = max_queue
        self.slots = slots
        self.info = BackendInfo(backend="fake", path="<memory>", arch="bigram", quantization="f32")
        rng = np.random.default_rng(seed)
        # (vocab, vocab): logits of the next token given the last one.
        self.table = rng.normal(0.0, 1.0, (self.vocab_size, self.vocab_size)).astype(np.float32)
        self.script_ids = self.tokenize(script) + [self.eos]
        self._by_bytes = {tok: i for i, tok in enumerate(self.vocab)}
        self._inbox: queue.SimpleQueue[TokenStream | None] = queue.SimpleQueue()
        self._pending = 0  # unfinished requests
        self._generating = 0  # of which holding one of ``slots``
        self._lock = threading.Lock()
        self.submitted: list[GenerationRequest] = []  # for tests that inspect what was sent
        self.streams: list[TokenStream] = []  # every stream handed out, in order
        self.decode_steps = 0
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="fake-backend", daemon=True)
        self._worker.start()

    # -- tokenizer ----------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        ids: list[int] = []
        i = 0
        while i < len(data):
            best = data[i]  # single byte id
            best_len = 1
            for tid in range(256, self.vocab_size - 1):
                tok = self.vocab[tid]
                if len(tok) > best_len and data.startswith(tok, i):
                    best, best_len = tid, len(tok)
            ids.append(best)
            i += best_len
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self.vocab[token_id]

    # -- the "model" --------------------------------------------------------------------
    def logits(self, context: Sequence[int], position: int) -> np.ndarray:
        """(vocab,) float32 logits after ``context``; ``position`` counts generated tokens."""
        x = self.table[context[-1] if context else self.eos].copy()
        x[self.script_ids[position % len(self.script_ids)]] += SCRIPT_BOOST
        return x

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int) -> list[Step | None]:
        out: list[Step | None] = [None]
        for j in range(1, len(prompt_ids)):
            lp = log_softmax(self.table[prompt_ids[j - 1]])
            out.append(Step(int(prompt_ids[j]), float(lp[prompt_ids[j]]), top_entries(lp, top)))
        return out

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            ids = self.tokenize(text) or [self.eos]
            out.append(self.table[ids, :16].mean(axis=0).tolist())
        return out

    # -- scheduling ---------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> TokenStream:
        if any(not 0 <= i < self.vocab_size for i in request.prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {self.vocab_size})")
        stream = TokenStream(request)
        with self._lock:
            if self._closed:
                raise BackendError("the model was closed")
            if self._pending >= self.max_queue + self.slots:
                raise QueueFull()
            self._pending += 1
            self.submitted.append(request)
            self.streams.append(stream)
            self._inbox.put(stream)
        return stream

    def _run(self) -> None:
        active: list[tuple[TokenStream, SequenceSampler, list[int]]] = []
        waiting: deque[TokenStream] = deque()
        while True:
            # Block only when idle; otherwise pick up new requests between rounds.
            try:
                while True:
                    item = self._inbox.get(block=not (active or waiting))
                    if item is None:
                        error = BackendError("the model was closed")
                        for stream in [*(a[0] for a in active), *waiting]:
                            stream.fail(error)
                        return
                    waiting.append(item)
            except queue.Empty:
                pass
            for stream in [s for s in waiting if s.cancelled]:  # no slot needed to end
                waiting.remove(stream)
                stream.finish(FinishReason.CANCELLED)
                self._ended(generating=False)
            while waiting and (not self.slots or len(active) < self.slots):
                item = waiting.popleft()
                params = item.request.params
                sampler = SequenceSampler(
                    params, self.vocab_size, self.eos_token_ids, item.request.prompt_ids
                )
                active.append((item, sampler, list(item.request.prompt_ids)))
                with self._lock:
                    self._generating += 1
            if not active:
                continue
            if self.step_delay:
                time.sleep(self.step_delay)
            still = []
            for stream, sampler, ctx in active:
                if self._step(stream, sampler, ctx):
                    self._ended(generating=True)
                else:
                    still.append((stream, sampler, ctx))
            active = still

    def _ended(self, *, generating: bool) -> None:
        with self._lock:
            self._pending -= 1
            self._generating -= int(generating)

    def _step(self, stream: TokenStream, sampler: SequenceSampler, ctx: list[int]) -> bool:
        """Advance one sequence by one token; True when it finished."""
        if stream.cancelled:
            stream.finish(FinishReason.CANCELLED)
            return True
        params = stream.request.params
        if sampler.generated >= params.max_tokens or len(ctx) >= self.context_length:
            stream.finish(FinishReason.LENGTH)
            return True
        self.decode_steps += 1
        step = sampler.sample(self.logits(ctx, sampler.generated))
        ctx.append(step.token_id)
        if step.token_id in self.eos_token_ids:  # ends the text; no step for it (contract)
            stream.finish(FinishReason.STOP)
            return True
        stream.put(step)
        if sampler.generated >= params.max_tokens or len(ctx) >= self.context_length:
            stream.finish(FinishReason.LENGTH)
            return True
        return False

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until every submitted stream finished; True when it did."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(s.done for s in self.streams):
                return True
            time.sleep(0.002)
        return False

    def stats(self) -> dict[str, float]:
        """``queue_depth``: unfinished requests not generating (all of them when slots=0)."""
        with self._lock:
            waiting = self._pending - (self._generating if self.slots else 0)
            busy = self._generating
        return {
            "queue_depth": float(waiting),
            "busy_slots": float(busy),
            "decode_steps": float(self.decode_steps),
        }

    def close(self) -> None:
        """Fail unfinished streams with BackendError and stop the worker; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(None)
        self._worker.join(timeout=5)
