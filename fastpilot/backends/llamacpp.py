"""llama.cpp backend: GGUF models through llama-cpp-python's low-level API.

One :class:`LlamaCppBackend` owns a ``llama_model``, one generation context
with ``slots`` sequences (separate KV streams, ``kv_unified=False``) and a
worker thread that runs **continuous batching**: every iteration builds one
``llama_batch`` holding one token for each generating sequence plus up to
``prompt_chunk`` prompt tokens of sequences still prefilling, calls
``llama_decode`` once, and samples each output row with the shared
:class:`fastpilot.engine.sampling.SequenceSampler` (llama.cpp's own sampler
chain is not used, so sampling is identical to the CTranslate2 backend).
New requests join the running batch at the next iteration.

Prompt cache: each slot remembers the tokens whose KV it holds. A request
takes the free slot sharing the longest common prefix with its prompt and only
evaluates the rest. When a *running* request holds a longer prefix (at least
``_MIN_COPY`` tokens more), its KV stream is copied into a free slot with
``llama_memory_seq_cp`` instead; and requests with an identical prompt that
arrive while the first is still prefilling (``n > 1``) wait for that prefill and
then copy its KV and share its first logits, so the prompt is evaluated once.

End of sequence: when the sampler picks an end-of-sequence token, the stream
finishes with ``STOP`` and *no step is pushed* for it, so no text and no
completion token is counted for the EOS itself.

Heavy import: ``llama_cpp`` is imported when a backend is constructed.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

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
from fastpilot.backends.fim_tokens import read_fim_tokens
from fastpilot.backends.llamacpp_native import (
    Embedder,
    NativeBatch,
    load_library,
    read_pieces,
    resolve_gguf,
)
from fastpilot.engine.sampling import SequenceSampler, log_softmax, top_entries
from fastpilot.errors import (
    BackendError,
    ContextLengthExceeded,
    InvalidRequest,
    ModelFileError,
    QueueFull,
)

__all__ = ["LlamaCppBackend", "resolve_gguf"]

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # KV held for positions 0..len-1
    busy: bool = False
    last_used: float = 0.0


@dataclass(eq=False, slots=True)
class _Active:
    """A request that owns a slot. ``next_token >= 0`` means it is generating."""

    stream: TokenStream
    slot: _Slot
    sampler: SequenceSampler
    prompt: list[int]
    todo: list[int]  # prompt tokens still to evaluate
    max_tokens: int
    leader: _Active | None = None  # identical prompt being prefilled by another request
    followers: list[_Active] = field(default_factory=list)
    next_token: int = -1
    generated: int = 0


@dataclass(eq=False, slots=True)
class _ScoreJob:
    prompt: list[int]
    top: int
    future: Future[list[Step | None]] = field(default_factory=Future)


# Fewest prompt tokens worth copying another slot's KV stream for. The copy moves the
# whole stream (n_ctx cells x layers), about the cost of evaluating a few tokens.
_MIN_COPY = 16


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _runs(ids: set[int]) -> int:
    """Maximal runs of consecutive integers in ``ids`` ({0, 1, 3} has two)."""
    return sum(1 for i in ids if i - 1 not in ids)


class LlamaCppBackend(Backend):
    """A GGUF model served by llama.cpp with continuous batching and a prompt cache.

    Args:
        path: a ``.gguf`` file, or a directory with ``model.gguf`` and ``fastpilot.json``.
        threads: CPU threads for decoding and prompt processing (default
            ``os.cpu_count()``; llama.cpp's own default is half the cores).
        device: ``"cpu"`` (no offload), ``"cuda"`` (offload every layer; raises
            :class:`BackendError` if this llama.cpp build has no GPU support) or
            ``"auto"`` (offload when the build supports it).
        slots: concurrent sequences. Each slot has its own KV stream of
            ``context_length`` cells, so KV memory grows linearly with it.
        max_queue: requests that may wait beyond the free slots; :meth:`submit`
            raises :class:`QueueFull` past it.
        context_length: cap on the per-slot context (default: the model's trained context).
        prompt_chunk: prompt tokens evaluated per decode step, shared by all prefilling
            requests; bounds how much a long prompt delays the other streams' next token.
        flash_attn: ``None`` (default) disables flash attention on CPU -- measured
            ~1.5-2x slower per token at 1000 positions on an AVX2 EPYC -- and lets
            llama.cpp decide when layers are offloaded to a GPU.

    Loading blocks (mmap + context allocation). The worker thread starts at once
    and is the only thread that touches the generation context.
    """

    name = "llamacpp"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        device: str = "cpu",
        slots: int = 4,
        max_queue: int = 64,
        context_length: int | None = None,
        prompt_chunk: int = 256,
        flash_attn: bool | None = None,
    ) -> None:
        if slots < 1 or prompt_chunk < 1 or max_queue < 0:
            raise ValueError("slots and prompt_chunk must be >= 1, max_queue >= 0")
        lib = self._lib = load_library()
        gguf, manifest = resolve_gguf(path)
        self._threads = threads or os.cpu_count() or 1
        if device == "cpu":
            gpu_layers = 0
        elif device == "cuda":
            if not lib.llama_supports_gpu_offload():
                raise BackendError("device='cuda' but this llama.cpp build has no GPU offload")
            gpu_layers = 999
        elif device == "auto":
            gpu_layers = 999 if lib.llama_supports_gpu_offload() else 0
        else:
            raise ValueError(f"unknown device {device!r}; expected cpu, cuda or auto")

        self._ctx = None
        self._embedder: Embedder | None = None
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers
        self._model = lib.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self._model:
            raise ModelFileError(f"llama.cpp could not load {gguf}")
        try:
            self._vocab = lib.llama_model_get_vocab(self._model)
            self.vocab_size = int(lib.llama_vocab_n_tokens(self._vocab))
            # Some GGUFs omit the trained context; 2048 is llama.cpp's usual fallback.
            trained = int(lib.llama_model_n_ctx_train(self._model)) or 2048
            per_slot = min(trained, context_length) if context_length else trained
            self._slots_n = slots
            self._chunk = prompt_chunk
            cparams = lib.llama_context_default_params()
            # llama.cpp pads each KV stream to a multiple of 256 cells; ask for that directly.
            cparams.n_ctx = -(-per_slot // 256) * 256 * slots
            cparams.n_seq_max = slots
            cparams.n_batch = cparams.n_ubatch = prompt_chunk + slots
            cparams.n_threads = cparams.n_threads_batch = self._threads
            cparams.kv_unified = False  # one KV stream per slot: attention only over its own cells
            cparams.no_perf = True
            if flash_attn is None:
                cparams.flash_attn_type = -1 if gpu_layers else 0  # AUTO / DISABLED
            else:
                cparams.flash_attn_type = 1 if flash_attn else 0
            self._ctx = lib.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise BackendError(f"llama.cpp could not create a context for {gguf}")
            self.context_length = min(per_slot, int(lib.llama_n_ctx_seq(self._ctx)))
            self._mem = lib.llama_get_memory(self._ctx)
            self._batch = NativeBatch(lib, prompt_chunk + slots)
            self._load_vocab(manifest)
            self.fim_tokens = read_fim_tokens(lib, self._vocab)  # engine/fim.py renders them
        except BaseException:
            self._free_native()
            raise

        fim = manifest.get("fim")
        if isinstance(fim, dict) and {"prefix", "suffix", "middle"} <= fim.keys():
            self.fim = FimTemplate(str(fim["prefix"]), str(fim["suffix"]), str(fim["middle"]))
        self.info = BackendInfo(
            backend=self.name,
            path=str(gguf),
            arch=str(manifest.get("arch", "")),
            quantization=str(manifest.get("quantization", "")),
            device="cuda" if gpu_layers else "cpu",
            extra={"threads": self._threads, "slots": slots, "manifest": manifest},
        )

        self._cond = threading.Condition()
        self._pending: deque[TokenStream] = deque()
        self._jobs: deque[_ScoreJob] = deque()
        self._max_queue = max_queue
        self._slots = [_Slot(i) for i in range(slots)]
        self._free = slots  # free slots, read by submit() under the lock
        self._active: list[_Active] = []
        self._closed = False
        self._embed_lock = threading.Lock()
        self._counters: dict[str, float] = dict.fromkeys(
            (
                "decode_steps",
                "decode_seconds",  # wall time inside llama_decode (the rest is Python's)
                "tokens_evaluated",
                "prompt_tokens_evaluated",
                "tokens_generated",
                "cached_prompt_tokens",
                "shared_prefills",
                "prefix_copies",
                "decode_errors",
            ),
            0,
        )
        self._worker = threading.Thread(target=self._run, name="llamacpp-worker", daemon=True)
        self._worker.start()
        atexit.register(self.close)

    # -- vocabulary ------------------------------------------------------------------
    def _load_vocab(self, manifest: dict[str, Any]) -> None:
        lib, vocab = self._lib, self._vocab
        self._pieces = read_pieces(lib, vocab, self.vocab_size)
        # The GGUF's eos/eot, plus any the converter listed (the engine strips them all).
        eos = {int(lib.llama_vocab_eos(vocab)), int(lib.llama_vocab_eot(vocab))}
        listed = manifest.get("eos_token_ids") or []
        eos.update(int(t) for t in listed if isinstance(t, int))
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

    # -- submission ------------------------------------------------------------------
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

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue one sequence; returns its stream at once. Thread-safe, never blocks on decoding.

        Raises :class:`QueueFull` when ``max_queue`` requests already wait beyond
        the free slots, :class:`ContextLengthExceeded` when the prompt leaves no
        room for one token, :class:`InvalidRequest` for out-of-vocabulary ids.
        An empty prompt starts from the model's BOS token.
        """
        self._check_prompt(request.prompt_ids, 1 if request.params.max_tokens > 0 else 0)
        stream = TokenStream(request)
        self._enqueue(stream)
        return stream

    def _enqueue(self, stream: TokenStream) -> None:
        with self._cond:
            if self._closed:
                raise BackendError("the model was closed")
            if len(self._pending) >= self._max_queue + self._free:
                raise QueueFull()
            self._pending.append(stream)
            self._cond.notify()

    # -- worker ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._pending or self._active or self._jobs):
                    self._cond.wait()
                if self._closed:
                    break
                self._sweep_pending_locked()
                admitted = self._take_pending_locked()
                job = self._jobs.popleft() if self._jobs and self._free else None
            for stream in admitted:
                try:
                    self._admit(stream)
                except Exception as ex:  # e.g. parameters the sampler rejects
                    log.exception("could not start a llama.cpp request")
                    stream.fail(ex)
                    with self._cond:
                        self._free += 1
            try:
                if job is not None:
                    self._score(job)
                self._drop_cancelled()
                if self._active:
                    self._step()
            except Exception as ex:  # a bug here must not kill the worker
                log.exception("llama.cpp worker iteration failed")
                for a in list(self._active):
                    self._fail(a, ex)
        self._drain()

    def _sweep_pending_locked(self) -> None:
        # Queued requests whose consumer left or whose deadline passed end without a slot.
        if any(s.cancelled for s in self._pending):
            for stream in [s for s in self._pending if s.cancelled]:
                stream.finish(FinishReason.CANCELLED)
            self._pending = deque(s for s in self._pending if not s.done)

    def _take_pending_locked(self) -> list[TokenStream]:
        taken: list[TokenStream] = []
        while self._pending and self._free > len(taken):
            stream = self._pending.popleft()
            if stream.cancelled:
                stream.finish(FinishReason.CANCELLED)
            else:
                taken.append(stream)
        self._free -= len(taken)
        return taken

    def _admit(self, stream: TokenStream) -> None:
        """Bind a request to the free slot with the longest cached prefix and trim its KV."""
        req = stream.request
        prompt = list(req.prompt_ids) or ([self._bos] if self._bos >= 0 else [0])
        sampler = SequenceSampler(req.params, self.vocab_size, self.eos_token_ids, prompt)
        free = [s for s in self._slots if not s.busy]
        busy_ids = {s.seq_id for s in self._slots if s.busy}

        def rank(s: _Slot) -> tuple[int, int, float]:
            # A cached prefix worth having wins; otherwise keep the busy sequence ids
            # contiguous (each run of consecutive ids is one more graph pass per step,
            # see _step), then least recently used.
            shared = _common_prefix(s.tokens, prompt)
            return (
                shared if shared >= _MIN_COPY else 0,
                -_runs(busy_ids | {s.seq_id}),
                -s.last_used,
            )

        slot = max(free, key=rank)
        shared = _common_prefix(slot.tokens, prompt)
        donor = max(
            (s for s in self._slots if s.busy),
            key=lambda s: _common_prefix(s.tokens, prompt),
            default=None,
        )
        leader = next(
            (o for o in self._active if o.leader is None and o.todo and o.prompt == prompt), None
        )
        if leader is not None:
            donor = None  # it will get the leader's whole KV once that prefill ends
        if donor is not None and _common_prefix(donor.tokens, prompt) >= shared + _MIN_COPY:
            # A running request holds a longer prefix: copy its KV stream into the least
            # recently used free slot (a buffer copy, far cheaper than re-evaluating).
            slot = min(free, key=lambda s: s.last_used)
            self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            self._lib.llama_memory_seq_cp(self._mem, donor.seq_id, slot.seq_id, -1, -1)
            slot.tokens = list(donor.tokens)
            shared = _common_prefix(slot.tokens, prompt)
            self._counters["prefix_copies"] += 1
        # Keep at least the last prompt token to evaluate: its logits pick the first token.
        reuse = min(shared, len(prompt) - 1)
        if reuse < len(slot.tokens):
            if not self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, reuse, -1):
                # Memories that cannot drop a suffix (recurrent/SWA) start the slot afresh.
                self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                reuse = 0
            del slot.tokens[reuse:]
        slot.busy = True
        stream.cached_tokens = reuse
        self._counters["cached_prompt_tokens"] += reuse
        a = _Active(stream, slot, sampler, prompt, prompt[reuse:], req.params.max_tokens)
        if a.max_tokens <= 0:
            self._release(a, FinishReason.LENGTH)
            return
        if leader is not None:
            a.leader = leader
            leader.followers.append(a)
        self._active.append(a)

    def _drop_cancelled(self) -> None:
        for a in list(self._active):
            if a.stream.cancelled:
                self._release(a, FinishReason.CANCELLED)

    def _step(self) -> None:
        """One ``llama_decode`` over every generating sequence plus one prompt chunk."""
        entries: list[tuple[_Active, list[int]]] = []
        for a in self._active:
            if a.next_token >= 0:
                entries.append((a, [a.next_token]))
        budget = self._chunk
        for a in self._active:
            if budget and a.todo and a.leader is None:
                chunk = a.todo[:budget]
                budget -= len(chunk)
                entries.append((a, chunk))
        if not entries:
            return
        # With one KV stream per sequence llama.cpp splits a batch into ubatches of
        # *consecutive, increasing* sequence ids (llama_batch_allocr::split_equal with
        # sequential=true), one graph evaluation each: 4 sequences in admission order
        # [2, 0, 3, 1] cost four weight passes, in slot order [0, 1, 2, 3] one.
        entries.sort(key=lambda e: e[0].slot.seq_id)
        rc = self._decode(entries)
        if rc == 0:
            self._after_decode(entries)
            return
        self._counters["decode_errors"] += 1
        log.warning("llama_decode failed with status %d over %d sequences", rc, len(entries))
        # Isolate the culprit: retry each sequence on its own, failing only those that fail again.
        for entry in entries:
            rc1 = self._decode([entry]) if len(entries) > 1 else rc
            if rc1 == 0:
                self._after_decode([entry])
            else:
                self._fail(entry[0], BackendError(f"llama_decode failed with status {rc1}"))

    def _decode(self, entries: list[tuple[_Active, list[int]]]) -> int:
        batch = self._batch
        batch.clear()
        for a, toks in entries:
            # Logits are needed for a generated token, or for the last prompt token.
            wants = a.next_token >= 0 or len(toks) == len(a.todo)
            batch.add(toks, len(a.slot.tokens), a.slot.seq_id, wants)
        t0 = time.perf_counter()
        rc = int(self._lib.llama_decode(self._ctx, batch.ready()))
        self._counters["decode_seconds"] += time.perf_counter() - t0
        self._counters["decode_steps"] += 1
        if rc != 0:
            # A failed decode may leave some ubatches in memory: roll every sequence back.
            for a, _ in entries:
                self._lib.llama_memory_seq_rm(self._mem, a.slot.seq_id, len(a.slot.tokens), -1)
        else:
            self._counters["tokens_evaluated"] += batch.n
        return rc

    def _after_decode(self, entries: list[tuple[_Active, list[int]]]) -> None:
        lib, ctx, n_vocab = self._lib, self._ctx, self.vocab_size
        row = -1
        for a, toks in entries:
            row += len(toks)  # batch index of this entry's last token
            a.slot.tokens.extend(toks)
            if a.next_token < 0:
                self._counters["prompt_tokens_evaluated"] += len(toks)
                del a.todo[: len(toks)]
                if a.todo:
                    continue
            # (n_vocab,) float32 view into llama.cpp's output buffer; valid until the next decode.
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
            if a.followers:
                self._share_prefill(a, logits)
            self._emit(a, logits)

    def _share_prefill(self, leader: _Active, logits: np.ndarray) -> None:
        """Give requests waiting on the same prompt a copy of the leader's KV and logits."""
        for f in leader.followers:
            if f not in self._active:
                continue
            self._lib.llama_memory_seq_rm(self._mem, f.slot.seq_id, -1, -1)
            self._lib.llama_memory_seq_cp(self._mem, leader.slot.seq_id, f.slot.seq_id, -1, -1)
            f.slot.tokens = list(leader.slot.tokens)
            f.stream.cached_tokens = len(f.prompt)
            f.todo, f.leader = [], None
            self._counters["shared_prefills"] += 1
            self._emit(f, logits)
        leader.followers = []

    def _emit(self, a: _Active, logits: np.ndarray) -> None:
        step = a.sampler.sample(logits)
        if step.token_id in self.eos_token_ids:
            self._release(a, FinishReason.STOP)
            return
        a.stream.put(step)
        a.generated += 1
        self._counters["tokens_generated"] += 1
        # Prompt + generated tokens (len(tokens) + the one just sampled) fill the context.
        if a.generated >= a.max_tokens or len(a.slot.tokens) + 1 >= self.context_length:
            self._release(a, FinishReason.LENGTH)
        else:
            a.next_token = step.token_id

    def _release(self, a: _Active, reason: FinishReason) -> None:
        a.stream.finish(reason)
        self._free_slot(a)

    def _fail(self, a: _Active, error: BaseException) -> None:
        a.stream.fail(error)
        # The KV state of a failed sequence is unknown: forget it.
        self._lib.llama_memory_seq_rm(self._mem, a.slot.seq_id, -1, -1)
        a.slot.tokens = []
        self._free_slot(a)

    def _free_slot(self, a: _Active) -> None:
        if a in self._active:
            self._active.remove(a)
        if a.leader is not None:
            a.leader.followers.remove(a)
        if a.followers:  # promote: the first follower prefills for itself and the rest
            head, rest = a.followers[0], a.followers[1:]
            head.leader, head.followers = None, rest
            for f in rest:
                f.leader = head
            a.followers = []
        a.slot.busy = False
        a.slot.last_used = time.monotonic()
        with self._cond:
            self._free += 1

    def _drain(self) -> None:
        error = BackendError("the model was closed")
        for a in self._active:
            a.stream.fail(error)
        self._active.clear()
        with self._cond:
            for stream in self._pending:
                stream.fail(error)
            self._pending.clear()
            for job in self._jobs:
                job.future.set_exception(error)
            self._jobs.clear()

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
        job = _ScoreJob(prompt, top)
        with self._cond:
            if self._closed:
                raise BackendError("the model was closed")
            self._jobs.append(job)
            self._cond.notify()
        return job.future.result()

    def _score(self, job: _ScoreJob) -> None:
        slot = min((s for s in self._slots if not s.busy), key=lambda s: s.last_used)
        self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.tokens = []
        prompt, batch, n_vocab = job.prompt, self._batch, self.vocab_size
        out: list[Step | None] = [None]
        try:
            for start in range(0, len(prompt), self._chunk):
                chunk = prompt[start : start + self._chunk]
                batch.clear()
                batch.add(chunk, start, slot.seq_id, False)
                # Logits at position i score token i+1; the very last one is not needed.
                batch.logits[: batch.n] = 1
                if start + len(chunk) == len(prompt):
                    batch.logits[batch.n - 1] = 0
                rc = int(self._lib.llama_decode(self._ctx, batch.ready()))
                self._counters["decode_steps"] += 1
                if rc != 0:
                    raise BackendError(f"llama_decode failed with status {rc} while scoring")
                self._counters["tokens_evaluated"] += batch.n
                for j in range(len(chunk)):
                    if start + j + 1 >= len(prompt):
                        break
                    row = np.ctypeslib.as_array(
                        self._lib.llama_get_logits_ith(self._ctx, j), shape=(n_vocab,)
                    )
                    lp = log_softmax(row)
                    tok = prompt[start + j + 1]
                    out.append(Step(tok, float(lp[tok]), top_entries(lp, job.top)))
            slot.tokens = list(prompt)
            slot.last_used = time.monotonic()
            job.future.set_result(out)
        except Exception as ex:
            self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            slot.tokens = []
            job.future.set_exception(ex)

    # -- embeddings --------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Mean-pooled final hidden states (after the last norm); raw, not normalized.

        Uses a second context (``embeddings=True``, mean pooling) created on the
        first call; calls are serialized and run in the caller's thread,
        concurrently with generation (they compete for the same CPU threads).
        An empty text embeds the BOS token.
        """
        with self._embed_lock:
            if self._closed:
                raise BackendError("the model was closed")
            if self._embedder is None:
                self._embedder = Embedder(
                    self._lib, self._model, self.context_length, self._threads
                )
            return [self._embedder.embed(self.tokenize(t) or [self._bos]) for t in texts]

    # -- lifecycle ---------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Queue depth, busy slots and cumulative counters (decode steps, tokens evaluated ...)."""
        with self._cond:
            out: dict[str, float] = {
                "queue_depth": len(self._pending),
                "busy_slots": self._slots_n - self._free,
            }
        out["slots"] = self._slots_n
        out.update(self._counters)
        return out

    def close(self) -> None:
        """Stop the worker and free native memory; unfinished streams fail with BackendError.

        Idempotent; also runs at interpreter exit. Blocks until the current decode step ends.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join()
        with self._embed_lock:
            self._free_native()
        atexit.unregister(self.close)

    def _free_native(self) -> None:
        lib = self._lib
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None
