"""CTranslate2 backend: a converted CT2 directory served by one batching worker thread.

The directory holds ``model.bin``, ``config.json``, the vocabulary CT2 saved
(``vocabulary.json`` or ``vocabulary.txt``), the Hugging Face ``tokenizer.json``
and the ``fastpilot.json`` manifest written by ``conversion/``.

Two decoding paths, chosen per request:

* **native** -- ``Generator.generate_batch`` does the whole decode: greedy,
  temperature, top-k, top-p, ``min_length`` for ``min_tokens``/``ignore_eos``
  and ``suppress_sequences`` for banned tokens (``logit_bias <= -100``). The
  worker groups concurrent requests that share every per-call option into one
  call and streams each step through CT2's ``callback``.
* **stepwise** -- for what CT2 cannot do itself: a non-ban ``logit_bias``,
  OpenAI's additive presence/frequency penalties, HF's repetition penalty
  (CT2's own one skips the prompt tokens) and ``seed`` (CT2's sampler uses a
  ``thread_local`` RNG seeded once per thread, so ``set_random_seed`` cannot
  reseed a running generator). The token is picked by
  :class:`fastpilot.backends.sampling.SequenceSampler` from CT2's raw logits, so the
  semantics equal the llama.cpp backend's. CT2 has no logits-processor hook, so
  we let CT2 decode greedily and accept its steps while our pick equals its
  argmax; on the first disagreement the call stops and a new call restarts from
  prompt + generated tokens, with the prompt as a cached ``static_prompt`` (its
  KV state is copied, not recomputed). A restart costs a prefill of the
  generated tokens so far, so this path is as fast as native while the sampler
  agrees with argmax (greedy with mild penalties, low temperatures) and degrades
  to O(generated) per token when it never does (high-temperature seeded sampling).
  Stepwise requests run one at a time (batch of one).

Prompt cache: CT2's ``static_prompt`` caches the decoder state of an exact token
prefix, in an unbounded map that lives as long as the loaded model. We pass as
static prompt the longest prefix (a multiple of ``prefix_chunk`` tokens) shared
with a recently seen prompt, count the tokens we made CT2 keep, and reload the
model (dropping CT2's map) once ``prefix_cache_tokens`` is exceeded.
"""

from __future__ import annotations

import atexit
import collections
import functools
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

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
from fastpilot.backends.ct2_support import (
    Job,
    PrefixPlanner,
    StepLogits,
    check_vocabulary,
    follow_step,
    load_tokenizer,
    plan_job,
    push_native,
    read_json,
    read_vocabulary,
    spelling_to_bytes,
    take_batch,
    wants_logits,
)
from fastpilot.backends.sampling import SequenceSampler, log_softmax, top_entries
from fastpilot.errors import BackendError, InvalidRequest, ModelFileError, NotSupported, QueueFull
from fastpilot.manifest import Manifest


class CTranslate2Backend(Backend):
    """A CT2 model directory with a bounded queue and one worker thread.

    Args:
        path: The converted model directory.
        manifest: Its parsed ``fastpilot.json`` (the loader passes the one it
            verified); None reads the directory's own, if it has one.
        threads: CPU threads for CT2's intra-op pool (default ``os.cpu_count()``;
            CT2's own default of 0 means 4).
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when a device is visible).
        compute_type: CT2 compute type; default keeps the files' quantization on
            CPU and uses ``int8_float16`` for int8 files on CUDA.
        max_queue: Requests that may wait while a batch runs; :meth:`submit` raises
            :class:`QueueFull` past it.
        max_batch: Most sequences in one ``generate_batch`` call.
        prefix_chunk: Static-prompt prefixes are multiples of this many tokens
            (0 disables the prompt cache).
        prefix_cache_tokens: Tokens of decoder state CT2 may keep cached before the
            model is reloaded to free it (each token costs
            ``2 * n_layer * n_embd * 4`` bytes, ~74 KB for GPT-2 117M).
    """

    name: ClassVar[str] = "ctranslate2"

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: Manifest | None = None,
        *,
        threads: int | None = None,
        device: str = "cpu",
        compute_type: str | None = None,
        max_queue: int = 64,
        max_batch: int = 8,
        prefix_chunk: int = 64,
        prefix_cache_tokens: int = 8192,
    ) -> None:
        import ctranslate2

        self._ct2 = ctranslate2
        self.path = Path(path)
        if not (self.path / "model.bin").is_file():
            raise ModelFileError(f"{self.path} is not a CTranslate2 model directory (no model.bin)")
        if manifest is None:
            manifest = Manifest.find(self.path)
        config = read_json(self.path / "config.json")
        self._vocab = read_vocabulary(self.path)
        self._vocab_index = {tok: i for i, tok in enumerate(self._vocab)}
        self._tokenizer = load_tokenizer(
            self.path / (manifest.tokenizer if manifest else "tokenizer.json")
        )
        # CT2's vocabulary may be padded past the tokenizer (CodeGen: one entry per
        # embedding row); those ids are no tokens and are never sampled.
        self.vocab_size = check_vocabulary(self.path, self._tokenizer, self._vocab)
        self._padding = tuple(range(self.vocab_size, len(self._vocab)))
        self._token_bytes = [spelling_to_bytes(t) for t in self._vocab]
        self.context_length = (manifest.context_length if manifest else 0) or 2048
        eos: Sequence[int] | None = manifest.eos_token_ids if manifest else None
        if eos is None:
            eos_tok = config.get("eos_token", "<|endoftext|>")
            eos = [self._vocab_index[eos_tok]] if eos_tok in self._vocab_index else []
        self.eos_token_ids = frozenset(int(i) for i in eos)
        bos = manifest.bos_token_id if manifest else None
        if bos is None:
            bos = self._vocab_index.get(str(config.get("bos_token", "")))
        self._bos = int(bos) if bos is not None else min(self.eos_token_ids, default=0)
        fim = manifest.fim if manifest else None
        self.fim_spec = fim  # read by engine/fim.py
        if fim is not None and {"prefix", "suffix", "middle"} <= fim.keys():
            self.fim = FimTemplate(fim["prefix"], fim["suffix"], fim["middle"])

        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        quant = manifest.quantization if manifest else ""
        if compute_type is None:
            cuda_int8 = device == "cuda" and quant.startswith("int8")
            compute_type = "int8_float16" if cuda_int8 else "default"
        self._gen_args: dict[str, Any] = {
            "device": device,
            "compute_type": compute_type,
            "intra_threads": threads or os.cpu_count() or 1,
            "inter_threads": 1,  # one worker drives it; parallelism is batching
        }
        self._generator = self._load_generator()
        self.info = BackendInfo(
            backend=self.name,
            path=str(self.path),
            arch=manifest.arch if manifest else "",
            quantization=quant,
            device=device,
            extra={**self._gen_args, "compute_type": self._generator.compute_type},
        )

        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self._planner = PrefixPlanner(prefix_chunk, prefix_cache_tokens)
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._counters = collections.Counter[str]()
        self._active = 0
        self._running: list[Job] = []
        self._worker = threading.Thread(target=self._run, name=f"ct2-{self.path.name}", daemon=True)
        self._worker.start()
        # CT2 aborts the process ("terminate called ...") when a Generator is still
        # alive at interpreter teardown: release it first.
        self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._atexit)

    # -- tokenizer --------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < self.vocab_size:
            return self._token_bytes[token_id]
        return b""

    # -- generation -------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a request; returns its stream at once.

        Raises :class:`QueueFull` when ``max_queue`` requests already wait and this
        one could not start at once (a batch is running, or another request is
        about to start); :class:`BackendError` once the model is closed.
        """
        ids = request.prompt_ids
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise InvalidRequest("prompt token id out of the vocabulary", param="prompt")
        stream = TokenStream(request)
        with self._cv:
            if self._closed:
                raise BackendError("the model was closed")
            # An idle worker starts the head of the queue at once: it does not wait.
            if len(self._pending) >= self.max_queue + (0 if self._running else 1):
                raise QueueFull()
            self._pending.append(plan_job(stream, self._bos, self.vocab_size, self._padding))
            self._cv.notify()
        return stream

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for job in self._pending:
                        self._stop(job.stream)
                    self._pending.clear()
                    break
                batch = take_batch(self._pending, self._planner, self.max_batch, self._stop)
                self._running = batch
                self._active = len(batch)
            try:
                if batch:
                    self._execute(batch)
            except Exception as ex:  # keep serving; the native library failed this batch
                for job in batch:
                    job.stream.fail(BackendError(f"ctranslate2 failed: {ex}"))
            finally:
                self._active = 0
                self._running = []
        self._generator = None  # type: ignore[assignment]

    def _execute(self, batch: list[Job]) -> None:
        static = batch[0].static
        if static and static not in self._planner.cached:
            if self._planner.used + len(static) > self._planner.budget:
                self._reset_cache()
            self._planner.keep(static)
        self._counters["batches"] += 1
        if batch[0].key is None:
            self._run_stepwise(batch[0])
        else:
            self._run_native(batch)
        for job in batch:  # anything CT2 ended without our callback finishing it
            if job.stream.cancelled:
                self._stop(job.stream)
            else:
                job.stream.finish(FinishReason.LENGTH)

    def _stop(self, stream: TokenStream) -> None:
        """End a stream that was cancelled, or fail it when the model is closing."""
        if self._closed:
            stream.fail(BackendError("the model was closed"))
        else:
            stream.finish(FinishReason.CANCELLED)

    def _max_new(self, job: Job) -> int:
        room = self.context_length - len(job.static) - len(job.start)
        return max(0, min(job.stream.request.params.max_tokens, room))

    def _run_native(self, batch: list[Job]) -> None:
        key = batch[0].key
        assert key is not None
        limits = [self._max_new(j) for j in batch]
        live = [(j, n) for j, n in zip(batch, limits, strict=True) if self._finish_early(j, n)]
        if not live:
            return
        jobs = [j for j, _ in live]
        limits = [n for _, n in live]
        want_logits = any(wants_logits(j) for j in jobs)
        temp = key.temperature
        eos = self.eos_token_ids
        rows = StepLogits(len(self._vocab))  # CT2's rows, padding included

        def on_step(res: Any) -> bool:
            # Every callback takes its row first, the ones that return early included:
            # the step's matrix came with the first callback, and a row left behind
            # would go to the next index (StepLogits hands rows out in arrival order).
            row = rows.row(res.logits) if want_logits else None
            job = jobs[res.batch_id]
            stream = job.stream
            if stream.done:
                return True
            if stream.cancelled:
                self._stop(stream)
                return True
            self._counters["decode_steps"] += 1

            # (vocab,) logits after CT2's masks (bans, min_length), before temperature;
            # masked logits are -FLT_MAX: / T -> -inf. Only the tokenizer's rows: padding
            # rows are no tokens.
            def logprobs() -> np.ndarray:
                assert row is not None
                with np.errstate(over="ignore"):
                    return log_softmax(row[: self.vocab_size] / temp)

            return push_native(
                job,
                int(res.token_id),
                res.log_prob,  # log_softmax at T=1 of the same logits
                logprobs if want_logits else None,
                limit=limits[res.batch_id],
                min_length=key.min_length,
                eos=eos,
            )

        self._generator.generate_batch(
            [self._spell(j.start) for j in jobs],
            max_length=max(limits),
            min_length=min(key.min_length, max(limits)),  # CT2 rejects min > max
            sampling_topk=key.topk,
            sampling_topp=key.topp,
            sampling_temperature=key.temperature,
            suppress_sequences=[[self._vocab[t]] for t in key.banned] or None,
            end_token=[self._vocab[t] for t in sorted(eos)] or None,
            static_prompt=self._spell(jobs[0].static) if jobs[0].static else None,
            include_prompt_in_result=False,
            return_scores=True,
            return_logits_vocab=want_logits,
            callback=on_step,
        )

    def _finish_early(self, job: Job, limit: int) -> bool:
        """False (and the stream finished) when a job has nothing to generate."""
        if job.stream.cancelled:
            self._stop(job.stream)
            return False
        if limit <= 0:
            job.stream.finish(FinishReason.LENGTH)
            return False
        return True

    def _run_stepwise(self, job: Job) -> None:
        """Sample with SequenceSampler over CT2's logits; see the module docstring for the cost."""
        stream = job.stream
        params = stream.request.params
        limit = self._max_new(job)
        if not self._finish_early(job, limit):
            return
        prompt = stream.request.prompt_ids
        sampler = SequenceSampler(params, self.vocab_size, self.eos_token_ids, prompt)
        generated: list[int] = []
        static = self._spell(job.static) if job.static else None
        end = [self._vocab[t] for t in sorted(self.eos_token_ids)] or None
        while not stream.done:
            diverged = False

            def on_step(res: Any) -> bool:
                nonlocal diverged
                if stream.cancelled:
                    self._stop(stream)
                    return True
                self._counters["decode_steps"] += 1
                # (1, rows) raw logits but for the suppressed padding rows, which the
                # sampler does not read (it takes the first vocab_size)
                logits = np.asarray(res.logits, dtype=np.float32).reshape(-1)
                stop, went_apart = follow_step(
                    stream,
                    sampler,
                    logits,
                    res.token_id,
                    generated,
                    limit=limit,
                    eos=self.eos_token_ids,
                )
                diverged = diverged or went_apart
                return stop

            self._generator.generate_batch(
                [self._spell(job.start + generated)],
                max_length=limit - len(generated),
                sampling_topk=1,
                # Padding rows banned here too, so CT2's argmax agrees with ours more often.
                suppress_sequences=[[self._vocab[t]] for t in self._padding] or None,
                end_token=end,
                static_prompt=static,
                include_prompt_in_result=False,
                return_logits_vocab=True,
                callback=on_step,
            )
            if not diverged:
                break
            self._counters["stepwise_restarts"] += 1

    def _spell(self, ids: Sequence[int]) -> list[str]:
        vocab = self._vocab
        return [vocab[i] for i in ids]

    def _load_generator(self) -> Any:
        try:
            return self._ct2.Generator(str(self.path), **self._gen_args)
        except (RuntimeError, ValueError) as ex:
            raise ModelFileError(f"cannot load the CTranslate2 model in {self.path}: {ex}") from ex

    def _reset_cache(self) -> None:
        """Reload the model so CT2 drops its static-prompt states (worker thread only)."""
        self._generator = None
        self._generator = self._load_generator()
        self._planner.clear()
        self._counters["prefix_cache_resets"] += 1

    # -- scoring ----------------------------------------------------------------------
    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int) -> list[Step | None]:
        """Score the prompt with one ``forward_batch``; blocks the caller.

        Memory: the full logits, ``len(prompt) * vocab * 4`` bytes (~200 MB for
        1,000 GPT-2 tokens), are held while scoring.
        """
        ids = list(prompt_ids)
        if not ids:
            return []
        if len(ids) == 1:
            return [None]
        generator = self._generator
        if generator is None:
            raise BackendError("the model is closed")
        out = generator.forward_batch([self._spell(ids[:-1])])
        logits = np.asarray(out, dtype=np.float32)[0]  # (len(ids) - 1, vocab)
        steps: list[Step | None] = [None]
        for pos, token in enumerate(ids[1:]):
            lp = log_softmax(logits[pos, : self.vocab_size])  # padding rows are no tokens
            steps.append(Step(token, float(lp[token]), top_entries(lp, top)))
        return steps

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise NotSupported(
            "the ctranslate2 backend cannot produce embeddings: CTranslate2 4.8's Generator "
            "exposes logits, not hidden states; serve this model through a GGUF file instead"
        )

    def stats(self) -> dict[str, float]:
        with self._cv:
            depth = len(self._pending)
        return {
            "queue_depth": float(depth),
            "active": float(self._active),
            "batches": float(self._counters["batches"]),
            "decode_steps": float(self._counters["decode_steps"]),
            "stepwise_restarts": float(self._counters["stepwise_restarts"]),
            "prefix_cache_hits": float(self._planner.hits),
            "prefix_cache_tokens": float(self._planner.used),
            "prefix_cache_resets": float(self._counters["prefix_cache_resets"]),
        }

    def close(self) -> None:
        """Stop the worker and free the model; unfinished streams fail with BackendError.

        Idempotent. Blocks for at most one decode step, or for a prefill already
        under way (CT2 cannot interrupt one).
        """
        with self._cv:
            self._closed = True
            for job in self._running:
                job.stream.cancel()
            self._cv.notify_all()
        if self._worker is not threading.current_thread():
            self._worker.join()
        self._generator = None
        atexit.unregister(self._atexit)


def _close_at_exit(ref: weakref.ref[CTranslate2Backend]) -> None:
    backend = ref()
    if backend is not None:
        backend.close()
