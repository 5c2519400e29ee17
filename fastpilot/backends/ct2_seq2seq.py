"""Encoder-decoder (T5: CodeT5, CodeT5+) models on CTranslate2's ``Translator``.

The prompt is the encoder input, wrapped in the special tokens the model was trained
with (``<s> ... </s>`` for CodeT5's RoBERTa tokenizer; from the manifest's
``seq2seq`` entry); the completion is what the decoder writes. Infill is the T5 span
form: the encoder reads ``prefix<extra_id_0>suffix`` and the decoder, started with
``<extra_id_0>`` (forced, as the span-corruption training target begins), writes
the span and closes it with the next sentinel or ``</s>``; neither is returned.

Two decoding paths, as in the decoder-only CTranslate2 backend:

* **native** -- ``translate_batch`` with CT2's own greedy/top-k/top-p/temperature,
  ``min_decoding_length`` and ``suppress_sequences``; concurrent requests with the
  same options share one call, each step streamed through ``callback`` (those that
  read logits -- ``logprobs`` or a temperature -- run one per call).
* **stepwise** -- for ``seed``, the additive penalties, HF's repetition penalty and
  a non-ban ``logit_bias``: :class:`fastpilot.backends.sampling.SequenceSampler` picks
  from CT2's raw logits; CT2 decodes greedily while it agrees, and on the first
  disagreement the call restarts with the chosen tokens as ``target_prefix`` (the
  encoder runs again, so a restart costs a prefill of the prompt and the tokens so far).
  Penalties count the decoder's tokens only, as transformers does for
  encoder-decoders.

What an encoder-decoder cannot do answers :class:`NotSupported` (HTTP 400): prompt
log-probabilities (``echo`` with ``logprobs``: the prompt is not predicted by the
model) and embeddings. ``Backend.encoder_decoder`` tells the engine to refuse
``echo`` altogether.

The directory's files (:func:`is_seq2seq`, re-exported here) and the ``stepwise``
test shared with the decoder-only backend live in :mod:`fastpilot.backends.ct2_support`.
"""

from __future__ import annotations

import atexit
import collections
import functools
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fastpilot.backends.base import (
    Backend,
    BackendInfo,
    FinishReason,
    GenerationRequest,
    Step,
    TokenStream,
)
from fastpilot.backends.ct2_support import (
    follow_step,
    is_seq2seq,
    load_tokenizer,
    push_native,
    read_json,
    read_target_vocabulary,
    spelling_to_bytes,
    stepwise,
)
from fastpilot.backends.sampling import BAN, SequenceSampler, log_softmax
from fastpilot.errors import BackendError, InvalidRequest, ModelFileError, NotSupported, QueueFull
from fastpilot.manifest import Manifest

__all__ = ["CTranslate2Seq2SeqBackend", "is_seq2seq"]


@dataclass(frozen=True, slots=True)
class _Key:
    """Options CT2 takes once per translate_batch call; equal keys may batch."""

    topk: int
    topp: float
    temperature: float
    min_length: int
    banned: tuple[int, ...]
    forced: int  # decoder prefix length: CT2 counts it in min/max lengths and steps


@dataclass(slots=True)
class _Job:
    stream: TokenStream
    source: list[int]  # encoder ids, specials included
    forced: list[int]  # decoder prefix after the start token (the span sentinel) or []
    key: _Key | None  # None: the stepwise path
    emitted: int = 0
    steps: int = 0  # callback calls seen, forced prefix steps included


class CTranslate2Seq2SeqBackend(Backend):
    """A converted T5 directory served by one worker thread.

    Args:
        path: The CTranslate2 directory (``model.bin``, ``shared_vocabulary.json``,
            ``tokenizer.json``, ``fastpilot.json``).
        manifest: The parsed manifest (the loader passes the one it verified);
            None reads ``fastpilot.json`` when there is one.
        threads: CPU threads for CT2's intra-op pool (default ``os.cpu_count()``).
        device: ``cpu``, ``cuda`` or ``auto``.
        compute_type: CT2 compute type (default: the files' own).
        max_queue: Requests waiting beyond this raise :class:`QueueFull`.
        max_batch: Most sequences in one ``translate_batch`` call.
        backend_options: options meant for the decoder-only backend (the prompt
            cache's ``prefix_chunk`` ...) are accepted and ignored: a Translator has
            no static prompt.
    """

    name: ClassVar[str] = "ctranslate2-seq2seq"
    encoder_decoder: ClassVar[bool] = True

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
        **backend_options: Any,
    ) -> None:
        import ctranslate2

        self.path = Path(path)
        if not (self.path / "model.bin").is_file():
            raise ModelFileError(f"{self.path} is not a CTranslate2 model directory (no model.bin)")
        if manifest is None:
            manifest = Manifest.find(self.path)
        self._vocab = read_target_vocabulary(self.path)
        self._index = {t: i for i, t in enumerate(self._vocab)}
        self._tokenizer = load_tokenizer(
            self.path / (manifest.tokenizer if manifest else "tokenizer.json")
        )
        self.vocab_size = len(self._vocab)
        self._token_bytes = [spelling_to_bytes(t) for t in self._vocab]
        self.context_length = (manifest.context_length if manifest else 0) or 512
        config = read_json(self.path / "config.json")
        eos: Sequence[int] = manifest.eos_token_ids if manifest else ()
        if not eos:
            eos = [self._index[t] for t in (config.get("eos_token"),) if t in self._index]
        self.eos_token_ids = frozenset(int(i) for i in eos)
        # What the tokenizer's post-processor wraps around encoder text (<s> ... </s>).
        seq2seq = (manifest.get("seq2seq") if manifest else None) or {}
        self._encoder_prefix = [int(i) for i in seq2seq.get("encoder_prefix_ids", [])]
        self._encoder_suffix = [int(i) for i in seq2seq.get("encoder_suffix_ids", [])]
        fim = manifest.fim if manifest else None
        self.fim_spec = fim  # read by engine/fim.py
        self._sentinel: int | None = None
        if fim is not None and fim.get("style") == "t5-span":
            # engine/fim.py renders prefix + sentinel + suffix for the encoder from
            # fim_spec; the sentinel's id tells _plan to start the decoder with it.
            self._sentinel = self._index.get(str(fim.get("sentinel", "")))

        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        quant = manifest.quantization if manifest else ""
        args: dict[str, Any] = {
            "device": device,
            "compute_type": compute_type or "default",
            "intra_threads": threads or os.cpu_count() or 1,
            "inter_threads": 1,
        }
        try:
            self._translator = ctranslate2.Translator(str(self.path), **args)
        except (RuntimeError, ValueError) as ex:
            raise ModelFileError(f"cannot load the CTranslate2 model in {self.path}: {ex}") from ex
        self.info = BackendInfo(
            backend=self.name,
            path=str(self.path),
            arch=manifest.arch if manifest else "",
            quantization=quant,
            device=device,
            extra={**args, "compute_type": self._translator.compute_type},
        )
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self._pending: collections.deque[_Job] = collections.deque()
        self._running: list[_Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self._counters = collections.Counter[str]()
        self._worker = threading.Thread(
            target=self._run, name=f"ct2-seq2seq-{self.path.name}", daemon=True
        )
        self._worker.start()
        # CT2 aborts the process when a model is still alive at interpreter teardown.
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
        """Queue a request; raises QueueFull when ``max_queue`` requests already wait."""
        ids = request.prompt_ids
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise InvalidRequest("prompt token id out of the vocabulary", param="prompt")
        stream = TokenStream(request)
        with self._cv:
            if self._closed:
                raise BackendError("the model is closed")
            if len(self._pending) >= self.max_queue:
                raise QueueFull()
            self._pending.append(self._plan(stream))
            self._cv.notify()
        return stream

    def _plan(self, stream: TokenStream) -> _Job:
        ids = list(stream.request.prompt_ids)
        source = self._encoder_prefix + ids + self._encoder_suffix
        infill = self._sentinel is not None and self._sentinel in ids
        forced = [self._sentinel] if infill and self._sentinel is not None else []
        p = stream.request.params
        if stepwise(p):
            return _Job(stream, source, forced, None)
        banned = tuple(
            sorted({t for t, v in p.logit_bias if v <= BAN and 0 <= t < self.vocab_size})
        )
        key = _Key(
            topk=1 if p.greedy else p.top_k,
            topp=1.0 if p.greedy else p.top_p,
            temperature=1.0 if p.greedy else p.temperature,
            min_length=p.max_tokens if p.ignore_eos else p.min_tokens,
            banned=banned,
            forced=len(forced),
        )
        return _Job(stream, source, forced, key)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for job in self._pending:
                        job.stream.fail(BackendError("the model was closed"))
                    self._pending.clear()
                    break
                batch = self._take_batch()
                self._running = batch
            try:
                if batch:
                    self._execute(batch)
            except Exception as ex:  # keep serving; the native library failed this batch
                for job in batch:
                    job.stream.fail(BackendError(f"ctranslate2 failed: {ex}"))
            finally:
                self._running = []
        self._translator = None

    def _take_batch(self) -> list[_Job]:
        """Pop the oldest live job and the compatible ones behind it (under the lock)."""
        while self._pending:
            head = self._pending.popleft()
            if not head.stream.cancelled:
                break
            head.stream.finish(FinishReason.CANCELLED)
        else:
            return []
        batch = [head]
        if head.key is None or _wants_logits(head):
            return batch
        for job in list(self._pending):
            if len(batch) >= self.max_batch:
                break
            if job.key == head.key and not job.stream.cancelled and not _wants_logits(job):
                self._pending.remove(job)
                batch.append(job)
        return batch

    def _execute(self, batch: list[_Job]) -> None:
        self._counters["batches"] += 1
        if batch[0].key is None:
            self._run_stepwise(batch[0])
        else:
            self._run_native(batch)
        for job in batch:  # anything CT2 ended without our callback finishing it
            job.stream.finish(
                FinishReason.CANCELLED if job.stream.cancelled else FinishReason.LENGTH
            )

    def _live(self, job: _Job) -> bool:
        """False (and the stream finished) when a job has nothing to generate."""
        if job.stream.cancelled:
            job.stream.finish(FinishReason.CANCELLED)
            return False
        if job.stream.request.params.max_tokens <= 0:
            job.stream.finish(FinishReason.LENGTH)
            return False
        return True

    def _end_tokens(self) -> list[str]:
        return [self._vocab[t] for t in sorted(self.eos_token_ids)]

    def _run_native(self, batch: list[_Job]) -> None:
        key = batch[0].key
        assert key is not None
        jobs = [j for j in batch if self._live(j)]
        if not jobs:
            return
        limits = [j.stream.request.params.max_tokens for j in jobs]
        want_logits = any(_wants_logits(j) for j in jobs)  # then the batch holds one job
        eos = self.eos_token_ids

        def on_step(res: Any) -> bool:
            job = jobs[res.batch_id]
            stream = job.stream
            if stream.done:
                return True
            if stream.cancelled:
                stream.finish(FinishReason.CANCELLED)
                return True
            job.steps += 1
            if job.steps <= key.forced:  # CT2 reports the forced prefix tokens too
                return False
            self._counters["decode_steps"] += 1

            def logprobs() -> np.ndarray:
                # (vocab,) logits after CT2's masks, before temperature
                with np.errstate(over="ignore"):
                    raw = np.asarray(res.logits, dtype=np.float32).reshape(-1)
                    return log_softmax(raw / key.temperature)

            return push_native(
                job,
                int(res.token_id),
                res.log_prob,
                logprobs if want_logits else None,
                limit=limits[res.batch_id],
                min_length=key.min_length,
                eos=eos,
            )

        self._translator.translate_batch(
            [self._spell(j.source) for j in jobs],
            target_prefix=[self._spell(j.forced) for j in jobs],
            beam_size=1,
            max_input_length=0,  # the engine already fitted the prompt to the context
            max_decoding_length=key.forced + max(limits),  # CT2 counts the prefix in both
            min_decoding_length=key.forced + key.min_length,
            sampling_topk=key.topk,
            sampling_topp=key.topp,
            sampling_temperature=key.temperature,
            suppress_sequences=[[self._vocab[t]] for t in key.banned] or None,
            end_token=self._end_tokens() or None,
            return_scores=True,
            return_logits_vocab=want_logits,
            callback=on_step,
        )

    def _run_stepwise(self, job: _Job) -> None:
        """Sample with SequenceSampler over CT2's logits, restarting on disagreement."""
        stream = job.stream
        if not self._live(job):
            return
        params = stream.request.params
        limit = params.max_tokens
        sampler = SequenceSampler(params, self.vocab_size, self.eos_token_ids, [])
        generated: list[int] = []
        while not stream.done:
            diverged = False
            prefix = job.forced + generated
            skip = len(prefix)
            seen = 0

            def on_step(res: Any, skip: int = skip) -> bool:
                nonlocal diverged, seen
                if stream.cancelled:
                    stream.finish(FinishReason.CANCELLED)
                    return True
                seen += 1
                if seen <= skip:  # the forced prefix and the tokens already streamed
                    return False
                self._counters["decode_steps"] += 1
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

            self._translator.translate_batch(
                [self._spell(job.source)],
                target_prefix=[self._spell(prefix)],
                beam_size=1,
                max_input_length=0,
                max_decoding_length=len(job.forced) + limit,
                min_decoding_length=0,
                sampling_topk=1,
                end_token=self._end_tokens() or None,
                return_logits_vocab=True,
                callback=on_step,
            )
            if not diverged:
                break
            self._counters["stepwise_restarts"] += 1

    def _spell(self, ids: Sequence[int]) -> list[str]:
        vocab = self._vocab
        return [vocab[i] for i in ids]

    # -- what an encoder-decoder cannot do -----------------------------------------------
    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int) -> list[Step | None]:
        raise NotSupported(
            "this is an encoder-decoder (T5) model: it reads the prompt, it does not predict "
            "it, so prompt log-probabilities (echo with logprobs) do not exist",
            param="echo",
        )

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise NotSupported(
            "the ctranslate2 seq2seq backend does not produce embeddings", param="model"
        )

    def stats(self) -> dict[str, float]:
        with self._cv:
            depth = len(self._pending)
        return {
            "queue_depth": float(depth),
            "active": float(len(self._running)),
            "batches": float(self._counters["batches"]),
            "decode_steps": float(self._counters["decode_steps"]),
            "stepwise_restarts": float(self._counters["stepwise_restarts"]),
        }

    def close(self) -> None:
        """Fail waiting and running requests ("the model was closed") and free the model.

        Idempotent. Blocks for at most one decode step, or an encoder pass already
        under way (CT2 cannot interrupt one).
        """
        with self._cv:
            self._closed = True
            for job in self._running:
                job.stream.fail(BackendError("the model was closed"))
            self._cv.notify_all()
        if self._worker is not threading.current_thread():
            self._worker.join()
        self._translator = None
        atexit.unregister(self._atexit)


def _wants_logits(job: _Job) -> bool:
    """True when the native path reads this job's logits (temperature or logprobs).

    Such jobs run alone: CTranslate2 4.8.5 hands a step's whole ``(active, vocab)``
    logits matrix to the first callback of the step and empty views to the others
    (see ``ct2_support.StepLogits`` for the decoder-only workaround), and the rows
    of a Translator batch with unequal encoder inputs are not checked here.
    """
    assert job.key is not None
    return job.key.temperature != 1.0 or bool(job.stream.request.params.logprobs)


def _close_at_exit(ref: weakref.ref[CTranslate2Seq2SeqBackend]) -> None:
    backend = ref()
    if backend is not None:
        backend.close()
