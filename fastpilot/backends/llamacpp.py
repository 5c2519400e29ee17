"""llama.cpp backend: GGUF models through llama-cpp-python's low-level API.

One :class:`LlamaCppBackend` owns a ``llama_model``, one generation context with
``slots`` sequences (separate KV streams, ``kv_unified=False``) -- two when the CPU's
short-KV kernel differs from its editor-depth one (the *short lane*,
:class:`~fastpilot.backends.llamacpp_tuning.ShortLane`: flash attention on for short
requests beside a flash-off main context; each context is a :class:`_Lane` with its own
scheduler) -- and a worker
thread that runs **continuous batching**: each iteration one ``llama_decode`` per busy lane
over one token of every generating sequence plus up to ``prompt_chunk`` prompt
tokens (``prefill_batch`` when none is generating), each output row sampled with the shared
:class:`fastpilot.backends.sampling.SequenceSampler` (not llama.cpp's sampler
chain, so sampling equals the CTranslate2 backend's). New requests join at the
next iteration.

The *policy* -- sequence states, slot choice, the prompt cache (a slot's own KV,
a copy of a running sequence's, one prefill shared by identical prompts),
prefill chunking, batch order, speculative drafts -- is
:class:`fastpilot.backends.scheduler.Scheduler`, which plans each step; this module
applies the plans with native calls and samples (a speculating sequence row after
row while its drafts hold, see :mod:`fastpilot.backends.ngram`).

Padded vocabularies (converted CodeGen): ``vocab_size`` counts the tokenizer's
ids, the trailing ``UNUSED`` rows are never sampled nor listed in ``top_logprobs``.
End of sequence finishes the stream ``STOP`` with no step pushed for it.

The tokenizer, prompt checks, prompt scoring (``echo``) and embeddings are
:class:`fastpilot.backends.llamacpp_extras.LlamaCppExtras`, this backend's base;
the ctypes helpers (batch, KV ops, scorer, embedder) are
:mod:`fastpilot.backends.llamacpp_native`.

Heavy import: ``llama_cpp`` is imported when a backend is constructed.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fastpilot.backends.base import (
    BackendInfo,
    FimTemplate,
    FinishReason,
    GenerationRequest,
    TokenStream,
)
from fastpilot.backends.fim_tokens import read_fim_tokens
from fastpilot.backends.llamacpp_extras import LlamaCppExtras
from fastpilot.backends.llamacpp_native import (
    LogitsRows,
    NativeBatch,
    apply_kv_ops,
    decode_entries,
    load_library,
    new_context,
    offload_layers,
    real_vocab_size,
    release_openmp_team,
    shift_min_chunk,
)
from fastpilot.backends.llamacpp_tuning import DEFAULT_CACHE, ShortLane, decide, short_lane_for
from fastpilot.backends.prefill import ALONE_FLASH, alone_tokens
from fastpilot.backends.sampling import SequenceSampler
from fastpilot.backends.scheduler import BatchEntry, KvOp, Scheduler, Seq, batch_capacity
from fastpilot.errors import (
    BackendError,
    ModelFileError,
    QueueFull,
)
from fastpilot.manifest import Manifest, find_gguf

__all__ = ["LlamaCppBackend"]

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Lane:
    """One generation context, the scheduler that plans its steps and its native buffers."""

    sched: Scheduler[_Request]
    ctx: Any
    mem: Any
    batch: NativeBatch
    rows: LogitsRows


@dataclass(eq=False, slots=True)
class _Request:
    """The backend's side of one scheduled sequence (:attr:`Seq.owner`)."""

    stream: TokenStream
    sampler: SequenceSampler
    lane: _Lane


class LlamaCppBackend(LlamaCppExtras):
    """A GGUF model served by llama.cpp with continuous batching and a prompt cache.

    Args:
        path: a ``.gguf`` file, or a directory with ``model.gguf`` and ``fastpilot.json``.
        manifest: the parsed ``fastpilot.json`` (the loader passes the one it
            verified); None reads the one beside ``path``, if any.
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
        prompt_chunk: prompt tokens evaluated per decode step while other sequences
            decode, shared by all prefilling requests; bounds how much a long prompt
            delays the other streams' next token.
        prefill_batch: prompt tokens per step when none decodes (a prompt alone); None:
            by the attention kernel (:func:`fastpilot.backends.prefill.alone_tokens`).
        flash_attn, n_ubatch, threads_batch, kv_type, kernel_cache: the context's kernels
            (:func:`fastpilot.backends.llamacpp_tuning.decide`; ``"auto"`` flash attention
            is measured once per model file and machine); ``self.kernels`` says the choice.
        speculative, draft_max: ``"ngram"`` (default) drafts up to ``draft_max`` tokens per
            step by n-gram lookup and verifies them in the same decode, as many as the
            measured acceptance and cost make pay (:mod:`fastpilot.backends.ngram`); the
            output is unchanged (greedy byte for byte, sampled in distribution). ``"off"``.
        cache_reuse: move cached runs of >= this many tokens into place when the prompt
            slid (:mod:`fastpilot.backends.kv_reuse`); 0 is off, as for non-RoPE models.
        short_lane: beside a flash-off context, a second context with flash attention on
            for requests that stay short (:class:`~fastpilot.backends.llamacpp_tuning.ShortLane`):
            None: where the calibration measured flash attention faster at a short KV,
            with its crossover; 0: never; N: requests whose mean depth is under N cells.
            ``self.short_lane`` says the lane (None: none).

    Loading blocks (mmap + context allocation). The worker thread starts at once
    and is the only thread that touches the generation context.
    """

    name = "llamacpp"

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: Manifest | None = None,
        *,
        threads: int | None = None,
        device: str = "cpu",
        slots: int = 4,
        max_queue: int = 64,
        context_length: int | None = None,
        prompt_chunk: int = 256,
        prefill_batch: int | None = None,
        flash_attn: str | bool | None = "auto",
        n_ubatch: int | None = None,
        threads_batch: int | None = None,
        kv_type: str | None = None,
        kernel_cache: str | os.PathLike[str] | None = DEFAULT_CACHE,
        speculative: str = "ngram",
        draft_max: int = 32,
        cache_reuse: int = 0,
        short_lane: int | None = None,
    ) -> None:
        alone = ALONE_FLASH if prefill_batch is None else prefill_batch  # n_batch; step: below
        lane_min = 1 if short_lane is None else short_lane + 1
        if min(slots, prompt_chunk, draft_max, alone, max_queue + 1, cache_reuse + 1, lane_min) < 1:
            raise ValueError("slots, prompt_chunk, prefill_batch, draft_max >= 1; others >= 0")
        if speculative not in ("off", "ngram"):
            raise ValueError(f"speculative must be 'off' or 'ngram', not {speculative!r}")
        lib = self._lib = load_library()
        gguf = find_gguf(path)
        if manifest is None:
            manifest = Manifest.find(gguf)
        gpu_layers = offload_layers(lib, device)

        self._ctx = self._short_ctx = None
        self._embedder = None
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers
        self._model = lib.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self._model:
            raise ModelFileError(f"llama.cpp could not load {gguf}")
        try:
            self._vocab = lib.llama_model_get_vocab(self._model)
            self._n_rows = int(lib.llama_vocab_n_tokens(self._vocab))  # logits per row
            self.vocab_size = real_vocab_size(lib, self._vocab, self._n_rows)
            # Some GGUFs omit the trained context; 2048 is llama.cpp's usual fallback.
            trained = int(lib.llama_model_n_ctx_train(self._model)) or 2048
            per_slot = min(trained, context_length) if context_length else trained
            self._slots_n = slots
            self._chunk = prompt_chunk
            spec = speculative == "ngram"
            capacity = batch_capacity(slots, prompt_chunk, draft_max if spec else 0, alone)
            kernels = decide(
                lib, self._model, gguf, capacity, per_slot, gpu_layers, threads, threads_batch,
                flash_attn=flash_attn, n_ubatch=n_ubatch, kv_type=kv_type, cache_dir=kernel_cache,
                batch_shape=spec,
            )  # fmt: skip
            self._ctx = new_context(lib, self._model, per_slot, slots, kernels)
            if not self._ctx:
                raise BackendError(f"llama.cpp could not create a context for {gguf}")
            self.kernels = kernels.read_back(lib, self._ctx)
            self.short_lane: ShortLane | None = short_lane_for(self.kernels, per_slot, short_lane)
            if self.short_lane is not None:
                flash = replace(self.kernels, flash_attn=True)
                n_short = self.short_lane.context
                self._short_ctx = new_context(lib, self._model, n_short, slots, flash)
                if not self._short_ctx:
                    raise BackendError(f"llama.cpp could not create a second context for {gguf}")
            if prefill_batch is None:
                alone = alone_tokens(self.kernels.flash_attn)
            self._threads = self.kernels.threads
            lane = f"; {self.short_lane.summary()}" if self.short_lane else ""
            log.info("%s: %s%s", gguf.name, self.kernels.summary(), lane)
            self.context_length = min(per_slot, int(lib.llama_n_ctx_seq(self._ctx)))
            self._mem = lib.llama_get_memory(self._ctx)
            self._rows = LogitsRows(lib, self._ctx, self._n_rows)
            cache_reuse = shift_min_chunk(lib, self._model, self._mem, cache_reuse)
            self._batch = NativeBatch(lib, capacity)
            self._load_vocab(manifest)
            self.fim_tokens = read_fim_tokens(lib, self._vocab)  # engine/fim.py renders them
        except BaseException:
            self._free_native()
            raise

        fim = manifest.fim if manifest else None
        if fim is not None and {"prefix", "suffix", "middle"} <= fim.keys():
            self.fim = FimTemplate(str(fim["prefix"]), str(fim["suffix"]), str(fim["middle"]))
        self.info = BackendInfo(
            backend=self.name,
            path=str(gguf),
            arch=manifest.arch if manifest else "",
            quantization=manifest.quantization if manifest else "",
            device="cuda" if gpu_layers else "cpu",
            extra={
                "threads": self._threads,
                "slots": slots,
                "speculative": speculative,
                "draft_max": draft_max,
                "prompt_chunk": prompt_chunk,
                "prefill_batch": alone,
                "kernels": dict(
                    self.kernels.to_json(),
                    prefill_batch=alone,
                    short_lane=self.short_lane.to_json() if self.short_lane else None,
                ),
                "cache_reuse": cache_reuse,
                "manifest": manifest.to_json() if manifest else {},
            },
        )

        self._cond = threading.Condition()
        self._pending: deque[TokenStream] = deque()
        self._jobs = deque()
        self._max_queue = max_queue
        self._sched: Scheduler[_Request] = Scheduler(
            slots,
            prompt_chunk,
            self.context_length,
            self.eos_token_ids,
            speculative=spec,
            draft_max=draft_max,
            prefill_alone=alone,
            cache_reuse=cache_reuse,
        )
        self._sched.draft_cost.set_shape(self.kernels.batch_shape)
        main = _Lane(self._sched, self._ctx, self._mem, self._batch, self._rows)
        self._lanes = [main]
        self._short: _Lane | None = None
        if self.short_lane is not None:
            sched: Scheduler[_Request] = Scheduler(
                slots,
                prompt_chunk,
                self.short_lane.context,
                self.eos_token_ids,
                speculative=spec,
                draft_max=draft_max,
                prefill_alone=ALONE_FLASH,
            )
            # The main context's shape: at a short KV the matrix products dominate both.
            sched.draft_cost.set_shape(self.kernels.batch_shape)
            short_mem = lib.llama_get_memory(self._short_ctx)
            batch = NativeBatch(lib, capacity)
            rows = LogitsRows(lib, self._short_ctx, self._n_rows)
            self._short = _Lane(sched, self._short_ctx, short_mem, batch, rows)
            self._lanes.append(self._short)
        self._free = slots  # free slots, read by submit() under the lock
        self._closed = False
        self._embed_lock = threading.Lock()
        # decode_seconds: wall time inside llama_decode (the rest is Python's)
        counters = ("decode_steps", "decode_seconds", "tokens_evaluated", "tokens_generated")
        self._counters: dict[str, float] = dict.fromkeys((*counters, "decode_errors"), 0)
        self._worker = threading.Thread(target=self._run, name="llamacpp-worker", daemon=True)
        self._worker.start()
        atexit.register(self.close)

    # -- submission ------------------------------------------------------------------
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
    def _running(self) -> bool:
        return any(lane.sched.running for lane in self._lanes)

    def _has_work(self) -> bool:
        """Something for the worker: a sequence running, a request or job queued, or close."""
        return bool(self._closed or self._pending or self._running() or self._jobs)

    def _run(self) -> None:
        main = self._lanes[0]
        taken: list[TokenStream] = []
        job = None
        while True:
            # Mid-generation with nothing queued, the step needs no lock: these reads are
            # atomic under the GIL, and a request queued right after them is taken at the
            # next step, as it would be had it come a moment later.
            if not (self._running() and not self._pending and not self._jobs and not self._closed):
                with self._cond:
                    if not self._has_work():
                        release_openmp_team()  # idle: no team held (see the function)
                    while not self._has_work():
                        self._cond.wait()
                    if self._closed:
                        break
                    taken = self._take_pending_locked()
                    job = self._jobs.popleft() if self._jobs and self._free else None
            for stream in taken:
                self._add(stream)
            try:
                for lane in self._lanes:
                    self._admit(lane)
                if job is not None:  # scoring touches a slot of the main lane outside a plan
                    self._apply(main, main.sched.take_kv_ops())
                    self._score(job)
                for lane in self._lanes:
                    self._drop_cancelled(lane)
                    if lane.sched.running:
                        self._step(lane)
            except Exception as ex:  # a bug here must not kill the worker
                log.exception("llama.cpp worker iteration failed")
                for lane in self._lanes:
                    for seq in list(lane.sched.running):
                        self._fail(seq, ex)
            taken, job = [], None
        self._drain()

    def _take_pending_locked(self) -> list[TokenStream]:
        # Queued requests whose consumer left or whose deadline passed end without a slot.
        if any(s.cancelled for s in self._pending):
            for stream in [s for s in self._pending if s.cancelled]:
                stream.finish(FinishReason.CANCELLED)
            self._pending = deque(s for s in self._pending if not s.done)
        taken: list[TokenStream] = []
        while self._pending and self._free > len(taken):
            stream = self._pending.popleft()
            if stream.cancelled:
                stream.finish(FinishReason.CANCELLED)
            else:
                taken.append(stream)
        self._free -= len(taken)
        return taken

    def _add(self, stream: TokenStream) -> None:
        """Hand a request (with a slot counted for it) to the scheduler as WAITING."""
        req = stream.request
        prompt = list(req.prompt_ids) or ([self._bos] if self._bos >= 0 else [0])
        try:
            sampler = SequenceSampler(req.params, self.vocab_size, self.eos_token_ids, prompt)
        except Exception as ex:  # e.g. parameters the sampler rejects
            log.exception("could not start a llama.cpp request")
            stream.fail(ex)
            with self._cond:
                self._free += 1
            return
        lane, short = self._lanes[0], self.short_lane
        if self._short is not None and short is not None:
            busy = lane.sched.busy, self._short.sched.busy
            if short.takes(len(prompt), req.params.max_tokens, *busy):
                lane = self._short
        lane.sched.add(_Request(stream, sampler, lane), prompt, req.params.max_tokens)

    def _admit(self, lane: _Lane) -> None:
        """Give waiting sequences their slots, apply the KV trims/copies that takes."""
        admitted = lane.sched.admit()
        if not admitted:
            return
        self._apply(lane, lane.sched.take_kv_ops())
        for seq in admitted:  # cached_tokens is final once the KV ops were applied
            seq.owner.stream.cached_tokens = seq.cached_tokens
            if seq.finish_reason is not None:  # max_tokens <= 0
                self._finished(seq)

    def _apply(self, lane: _Lane, ops: Sequence[KvOp]) -> bool:
        """Apply KV ops in order; False when a partial removal had to clear a whole slot."""
        restarted = apply_kv_ops(self._lib, lane.mem, ops)
        for seq_id in restarted:
            lane.sched.kv_restarted(seq_id)
        return not restarted

    def _drop_cancelled(self, lane: _Lane) -> None:
        for seq in list(lane.sched.running):
            if seq.owner.stream.cancelled:
                lane.sched.finish(seq, FinishReason.CANCELLED)
                self._finished(seq)

    def _step(self, lane: _Lane) -> None:
        """One ``llama_decode`` over every generating sequence plus one prompt chunk."""
        plan = lane.sched.plan_step()
        while not self._apply(lane, plan.kv_ops):  # a slot restarted: its prompt is all to do
            plan = lane.sched.plan_step()
        entries = list(plan.entries)
        if not entries:
            return
        rc = self._decode(lane, entries)
        if rc == 0:
            self._after_decode(lane, entries)
            return
        self._counters["decode_errors"] += 1
        log.warning("llama_decode failed with status %d over %d sequences", rc, len(entries))
        # Isolate the culprit: retry each sequence on its own, failing only those that fail again.
        for entry in entries:
            rc1 = self._decode(lane, [entry]) if len(entries) > 1 else rc
            if rc1 == 0:
                self._after_decode(lane, [entry])
            else:
                self._fail(entry.seq, BackendError(f"llama_decode failed with status {rc1}"))

    def _decode(self, lane: _Lane, entries: list[BatchEntry[_Request]]) -> int:
        t0 = time.perf_counter()
        rc = decode_entries(self._lib, lane.ctx, lane.mem, lane.batch, entries)
        self._counters["decode_seconds"] += (dt := time.perf_counter() - t0)
        self._counters["decode_steps"] += 1
        if rc == 0:
            self._counters["tokens_evaluated"] += lane.batch.n
            if lane.sched.speculative:  # drafts are sized by the measured step cost
                lane.sched.draft_cost.observe_batch(entries, dt)
        return rc

    def _after_decode(self, lane: _Lane, entries: list[BatchEntry[_Request]]) -> None:
        rows = lane.rows
        for sample in lane.sched.update_from_output(entries):
            row = sample.row
            # A speculating sequence: rows after the first hold the logits after each
            # draft; sample them in order while the token matches the draft.
            while True:
                # (n_rows,) float32 view into llama.cpp's output buffer; valid until the next
                # decode. The sampler reads the first vocab_size rows: padding rows never win.
                more = self._emit(sample.seq, rows(row))
                if not more:
                    break
                if sample.seq.owner.stream.cancelled:  # nothing more once cancelled
                    lane.sched.finish(sample.seq, FinishReason.CANCELLED)
                    self._finished(sample.seq)
                    break
                row += 1

    def _emit(self, seq: Seq[_Request], logits: np.ndarray) -> bool:
        """Sample, push and maybe finish; True when the next row is this sequence's too."""
        stream = seq.owner.stream
        if seq.generated == 0:  # the first token: the prompt cache's share is settled
            stream.cached_tokens = seq.cached_tokens
        step = seq.owner.sampler.sample(logits)
        verdict = seq.owner.lane.sched.on_token(seq, step.token_id)
        if seq.drafter is not None:  # before put/finish: the consumer reads them after
            stream.accepted_prediction_tokens = seq.accepted
            stream.rejected_prediction_tokens = seq.rejected
        if verdict.emit:
            stream.put(step)
            self._counters["tokens_generated"] += 1
        if verdict.finish is not None:
            stream.finish(verdict.finish)
            self._free_slot()
        return verdict.more

    def _finished(self, seq: Seq[_Request]) -> None:
        assert seq.finish_reason is not None
        seq.owner.stream.finish(seq.finish_reason)
        self._free_slot()

    def _fail(self, seq: Seq[_Request], error: BaseException) -> None:
        seq.owner.stream.fail(error)
        # The KV state of a failed sequence is unknown: the scheduler drops it.
        seq.owner.lane.sched.finish(seq, FinishReason.CANCELLED, kv_lost=True)
        self._free_slot()

    def _free_slot(self) -> None:
        with self._cond:
            self._free += 1

    def _drain(self) -> None:
        error = BackendError("the model was closed")
        for lane in self._lanes:
            for seq in lane.sched.running:
                seq.owner.stream.fail(error)
            lane.sched.running.clear()
        with self._cond:
            for stream in self._pending:
                stream.fail(error)
            self._pending.clear()
            for job in self._jobs:
                job.future.set_exception(error)
            self._jobs.clear()

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
        for lane in self._lanes:  # prompt cache: evaluated, cached, shared, copied
            for key, value in lane.sched.counters.items():
                out[key] = out.get(key, 0) + value
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
