"""The llama.cpp backend's work outside its decode loop: tokenizer, prompt scoring, embeddings.

:class:`LlamaCppExtras` is the abstract base of
:class:`fastpilot.backends.llamacpp.LlamaCppBackend`, which sets every attribute
declared here in its constructor and runs the continuous-batching worker. What
lives here only reads that state: the GGUF vocabulary (token ids, pieces, end
tokens), the prompt checks every request passes, prompt scoring (``echo``;
queued as a :class:`ScoreJob` for the worker, which calls :meth:`_score` between
decode steps) and embeddings (a second context, in the caller's thread).

Heavy import: none; ``llama_cpp`` comes in through the backend's constructor.
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fastpilot.backends.base import Backend, Step
from fastpilot.backends.llamacpp_native import (
    Embedder,
    NativeBatch,
    PromptScorer,
    on_own_thread,
    read_pieces,
)
from fastpilot.backends.scheduler import Scheduler
from fastpilot.errors import BackendError, ContextLengthExceeded, InvalidRequest
from fastpilot.manifest import Manifest

__all__ = ["LlamaCppExtras", "ScoreJob"]


@dataclass(eq=False, slots=True)
class ScoreJob:
    """One ``echo`` scoring request, answered through ``future`` by the worker."""

    prompt: list[int]
    top: int
    future: Future[list[Step | None]] = field(default_factory=Future)


class LlamaCppExtras(Backend):
    """Tokenizer, prompt checks, prompt scoring and embeddings of a llama.cpp model.

    Abstract: :class:`fastpilot.backends.llamacpp.LlamaCppBackend` sets the
    attributes below and implements generation.
    """

    _lib: Any  # llama_cpp's ctypes module
    _model: Any  # llama_model*
    _vocab: Any  # llama_vocab*
    _ctx: Any  # the generation context
    _short_ctx: Any  # the short lane's (flash attention on), or None
    _mem: Any  # its memory (KV)
    _batch: NativeBatch
    _n_rows: int  # logits per row (padded vocabularies have more than vocab_size)
    _chunk: int
    _threads: int
    _pieces: list[bytes]
    _bos: int
    _cond: threading.Condition  # guards _closed and _jobs
    _closed: bool
    _jobs: deque[ScoreJob]
    _sched: Scheduler[Any]
    _counters: dict[str, float]
    _embed_lock: threading.Lock
    _embedder: Embedder | None

    # -- vocabulary ------------------------------------------------------------------
    def _load_vocab(self, manifest: Manifest | None) -> None:
        lib, vocab = self._lib, self._vocab
        self._pieces = read_pieces(lib, vocab, self.vocab_size)
        # The GGUF's eos/eot, plus any the converter listed (the engine strips them all).
        eos = {int(lib.llama_vocab_eos(vocab)), int(lib.llama_vocab_eot(vocab))}
        eos.update(manifest.eos_token_ids if manifest else ())
        self.eos_token_ids = frozenset(t for t in eos if 0 <= t < self.vocab_size)
        self._bos = int(lib.llama_vocab_bos(vocab))

    def tokenize(self, text: str) -> list[int]:
        """Token ids from the GGUF's vocabulary; no BOS, special tokens written as text parsed.

        ``"<|endoftext|>"`` or ``"<|fim_prefix|>"`` in ``text`` become those control
        tokens (``parse_special``), as llama-server and HF tokenizers do.

        Thread-safe (llama.cpp's tokenizer API is), callable while the worker decodes.
        """
        data = text.encode("utf-8")
        cap = len(data) + 8
        out = (ctypes.c_int32 * cap)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), out, cap, False, True)
        if n < 0:
            if n == -(2**31):
                raise InvalidRequest("text too long to tokenize", param="prompt")
            cap = -n
            out = (ctypes.c_int32 * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), out, cap, False, True)
        return list(out[:n])

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < self.vocab_size:
            return self._pieces[token_id]
        return b""

    # -- submission checks ------------------------------------------------------------
    def _check_prompt(self, prompt: Sequence[int], room: int) -> None:
        if len(prompt) + room > self.context_length:
            raise ContextLengthExceeded(
                f"prompt of {len(prompt)} tokens leaves no room in the "
                f"{self.context_length}-token context",
                param="prompt",
            )
        if prompt and (min(prompt) < 0 or max(prompt) >= self.vocab_size):
            raise InvalidRequest(
                f"prompt token ids must be in [0, {self.vocab_size})", param="prompt"
            )

    # -- prompt scoring ----------------------------------------------------------------
    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int) -> list[Step | None]:
        """Log-probability of each prompt token given the ones before it (``echo``).

        Runs on the worker between decode steps, in a free slot (blocks the
        caller until one frees and the prompt is evaluated with logits at every
        position; other streams pause meanwhile). The slot keeps the prompt's KV,
        so a generation request with the same prompt that follows reuses it.
        Values are ``log_softmax`` of the raw logits (temperature 1).
        """
        prompt = list(prompt_ids)
        self._check_prompt(prompt, 0)
        if not prompt:
            return []
        job = ScoreJob(prompt, top)
        with self._cond:
            if self._closed:
                raise BackendError("the model was closed")
            self._jobs.append(job)
            self._cond.notify()
        return job.future.result()

    def _score(self, job: ScoreJob) -> None:
        slot = self._sched.begin_scoring()
        self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        scorer = PromptScorer(self._lib, self._ctx, self._batch, self._n_rows, self.vocab_size)
        try:
            out = scorer.score(job.prompt, slot.seq_id, self._chunk, job.top)
        except Exception as ex:
            self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            self._sched.end_scoring(slot, None)
            job.future.set_exception(ex)
        else:
            self._sched.end_scoring(slot, job.prompt)
            job.future.set_result(out)
        finally:
            self._counters["decode_steps"] += scorer.decodes
            self._counters["tokens_evaluated"] += scorer.tokens

    # -- embeddings --------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Mean-pooled final hidden states (after the last norm); raw, not normalized.

        Uses a second context (``embeddings=True``, mean pooling) created on the
        first call; calls are serialized and each runs on a thread of its own
        (:func:`~fastpilot.backends.llamacpp_native.on_own_thread`), concurrently with
        generation (they compete for the same CPU threads).
        An empty text embeds the BOS token.
        """
        with self._embed_lock:
            if self._closed:
                raise BackendError("the model was closed")
            if self._embedder is None:
                self._embedder = Embedder(
                    self._lib, self._model, self.context_length, self._threads
                )
            ids = [self.tokenize(t) or [self._bos] for t in texts]
            embedder = self._embedder
            return on_own_thread(lambda: [embedder.embed(i) for i in ids], "fastpilot-embed")

    def _free_native(self) -> None:
        """Free the embedder, the context and the model (each once)."""
        lib = self._lib
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        for name in ("_short_ctx", "_ctx"):
            if getattr(self, name, None) is not None:
                lib.llama_free(getattr(self, name))
                setattr(self, name, None)
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None
