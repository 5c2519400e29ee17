"""The backend contract (fastpilot/backends/base.py), one suite over every backend.

Each test runs against the test fake (tests/fakes.py), CTranslate2 (float32) and
llama.cpp (f32 GGUF; plain and with n-gram speculative decoding), the real ones
on both tiny random models (GPT-2 and CodeGen, whose vocabulary is padded from
800 tokens to 896 rows). Exactness is
checked against a reference: transformers on the same HF checkpoint for the
real backends, the fake's own bigram table for the fake. The only test hook
wraps ``TokenStream.put`` to act in the worker thread at a given step, which
every backend calls for every step.

Backend-specific behaviour (prompt cache, batching counters, embeddings,
quantized files, native failures) stays in tests/test_backend_ct2.py and
tests/test_backend_llamacpp.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fastpilot.backends.base import (
    Backend,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Step,
    TokenStream,
)
from fastpilot.backends.sampling import log_softmax
from fastpilot.errors import BackendError, InvalidRequest, QueueFull
from tests import tinymodels
from tests.gates import hook_put, run

pytestmark = pytest.mark.timeout(300)

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
# llamaspec: the llama.cpp backend with n-gram speculative decoding on (same contract).
SUBJECTS = (
    "fake",
    "ct2-gpt2",
    "ct2-codegen",
    "llamacpp-gpt2",
    "llamacpp-codegen",
    "llamaspec-gpt2",
    "llamaspec-codegen",
)


@dataclass
class Subject:
    """One backend kind: how to build it and what it should compute.

    ``logits(ids, generated)`` are the next-token logits after ``ids`` (the fake's
    also depend on how many tokens were generated); ``prompt_logits(ids)`` are the
    logits at every position of a scored prompt; ``rows`` is the output layer's size.
    """

    name: str
    make: Callable[..., Backend]
    logits: Callable[[list[int], int], np.ndarray]
    prompt_logits: Callable[[list[int]], np.ndarray]
    rows: int
    tol: float
    batched: Callable[[dict[str, float], dict[str, float], int], None] | None = None


def _fake_subject() -> Subject:
    from tests.fakes import FakeBackend

    table = FakeBackend()
    table.close()

    def make(slots: int = 0, max_queue: int = 64) -> Backend:
        return FakeBackend(slots=slots, max_queue=max_queue)

    return Subject(
        "fake",
        make,
        logits=lambda ids, generated: table.logits(ids, generated),
        prompt_logits=lambda ids: table.table[ids],
        rows=table.vocab_size,
        tol=1e-5,
    )


def _real_subject(name: str, models: dict[str, dict[str, Path]]) -> Subject:
    from tests.reference import Ref

    kind, arch = name.split("-")
    ref = Ref(models[arch]["hf"])
    rows = tinymodels.CODEGEN_PADDED_VOCAB if arch == "codegen" else tinymodels.VOCAB_SIZE

    if kind == "ct2":
        from fastpilot.backends.ctranslate2 import CTranslate2Backend

        def make(slots: int = 8, max_queue: int = 64) -> Backend:
            path = models[arch]["ct2-float32"]
            return CTranslate2Backend(
                path, threads=1, prefix_chunk=16, max_batch=slots, max_queue=max_queue
            )

        def batched(before: dict[str, float], after: dict[str, float], n: int) -> None:
            # prompts within LENGTH_TOLERANCE tokens of each other share a call
            assert after["batches"] - before["batches"] < n

    else:
        from fastpilot.backends.llamacpp import LlamaCppBackend

        def make(slots: int = 4, max_queue: int = 64) -> Backend:
            path = models[arch]["gguf-f32"]
            # prompt_chunk 16: the tiny prompts still need several prefill chunks.
            return LlamaCppBackend(
                path,
                threads=2,
                slots=slots,
                max_queue=max_queue,
                prompt_chunk=16,
                speculative="ngram" if kind == "llamaspec" else "off",
            )

        def batched(before: dict[str, float], after: dict[str, float], n: int) -> None:
            generated = after["tokens_generated"] - before["tokens_generated"]
            # One request at a time would take at least one decode step per token.
            assert after["decode_steps"] - before["decode_steps"] < generated

    # The reference distribution is over the tokenizer's ids: padding rows are no tokens.
    return Subject(
        name,
        make,
        logits=lambda ids, generated: ref.logits(ids)[: tinymodels.VOCAB_SIZE],
        prompt_logits=lambda ids: ref.all_logits(ids)[:, : tinymodels.VOCAB_SIZE],
        rows=rows,
        tol=5e-3,
        batched=batched,
    )


@pytest.fixture(scope="module", params=SUBJECTS)
def subject(request: pytest.FixtureRequest) -> Subject:
    if request.param == "fake":
        return _fake_subject()
    return _real_subject(request.param, request.getfixturevalue("tiny_models"))


@pytest.fixture(scope="module")
def backend(subject: Subject) -> Iterator[Backend]:
    b = subject.make()
    yield b
    b.close()


def _eos(backend: Backend) -> int:
    return min(backend.eos_token_ids)


def _masked(x: np.ndarray, banned: int) -> np.ndarray:
    x = np.array(x, dtype=np.float64)
    x[banned] = -np.inf
    return x


# -- exactness ------------------------------------------------------------------------
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_greedy_equals_reference_argmax_with_logprobs(
    subject: Subject, backend, ignore_eos: bool
) -> None:
    ids = backend.tokenize(PROMPT)
    steps, stream = run(backend, ids, max_tokens=12, logprobs=3, ignore_eos=ignore_eos)
    assert len(steps) == 12 and stream.finish_reason is FinishReason.LENGTH
    seq = list(ids)
    for n, step in enumerate(steps):
        logits = subject.logits(seq, n)
        # The logprobs are of the distribution sampled from: ignore_eos bans EOS in it.
        lp = log_softmax(_masked(logits, _eos(backend)) if ignore_eos else logits)
        assert step.token_id == int(np.argmax(lp))
        assert step.logprob == pytest.approx(lp[step.token_id], abs=subject.tol)
        # top_logprobs: best first, the chosen token on top, values of the same distribution.
        top = step.top_logprobs
        assert len(top) == 3 and top[0] == (step.token_id, pytest.approx(step.logprob))
        assert top[0][1] >= top[1][1] >= top[2][1]
        assert {t for t, _ in top} == {int(i) for i in np.argsort(-lp)[:3]}
        seq.append(step.token_id)


def test_temperature_logprobs_are_of_the_scaled_distribution(subject: Subject, backend) -> None:
    ids = backend.tokenize(PROMPT)
    steps, _ = run(backend, ids, max_tokens=4, temperature=0.7, logprobs=2)
    assert steps
    seq = list(ids)
    for n, step in enumerate(steps):
        lp = log_softmax(np.asarray(subject.logits(seq, n), dtype=np.float64) / 0.7)
        assert step.logprob == pytest.approx(lp[step.token_id], abs=subject.tol)
        assert dict(step.top_logprobs).keys() == {int(i) for i in np.argsort(-lp)[:2]}
        seq.append(step.token_id)


def test_logit_bias_ban_and_force(subject: Subject, backend) -> None:
    ids = backend.tokenize(PROMPT)
    logits = subject.logits(ids, 0)
    order = np.argsort(-logits)
    best, second = int(order[0]), int(order[1])
    steps, _ = run(backend, ids, max_tokens=1, temperature=0.0, logit_bias=((best, -100.0),))
    assert steps[0].token_id == second
    # the reported logprob is of the distribution with the ban applied
    assert steps[0].logprob == pytest.approx(
        log_softmax(_masked(logits, best))[second], abs=subject.tol
    )
    forced = int(order[-1])  # the least likely token
    steps, _ = run(backend, ids, max_tokens=3, temperature=0.0, logit_bias=((forced, 100.0),))
    assert [s.token_id for s in steps] == [forced] * 3


def test_frequency_and_presence_penalty_match_hand_computation(subject: Subject, backend) -> None:
    ids = backend.tokenize(PROMPT)
    first = int(np.argmax(subject.logits(ids, 0)))
    hand = np.array(subject.logits(ids + [first], 1), dtype=np.float64)
    fp, pp = 1.5, 0.75
    hand[first] -= 1 * fp + pp  # OpenAI: count * frequency + (count > 0) * presence
    expected = int(np.argmax(hand))
    steps, _ = run(
        backend,
        ids,
        max_tokens=2,
        temperature=0.0,
        frequency_penalty=fp,
        presence_penalty=pp,
        logprobs=1,
    )
    assert [s.token_id for s in steps] == [first, expected]
    assert steps[1].logprob == pytest.approx(log_softmax(hand)[expected], abs=subject.tol)


def test_seed_reproduces_and_differs(backend) -> None:
    ids = backend.tokenize(PROMPT)

    def sample(seed: int) -> list[Step]:
        return run(backend, ids, max_tokens=16, temperature=1.5, seed=seed, ignore_eos=True)[0]

    a, b, c = sample(7), sample(7), sample(8)
    assert [s.token_id for s in a] == [s.token_id for s in b]
    assert [s.logprob for s in a] == [s.logprob for s in b]
    assert [s.token_id for s in a] != [s.token_id for s in c]


def test_prompt_logprobs_equal_reference(subject: Subject, backend) -> None:
    ids = backend.tokenize(tinymodels.SNIPPETS[0])  # > one 16-token scoring chunk
    got = backend.prompt_logprobs(ids, 2)
    assert got[0] is None and len(got) == len(ids)
    lp = log_softmax(subject.prompt_logits(ids).astype(np.float64))
    for i in range(1, len(ids)):
        step = got[i]
        assert step is not None and step.token_id == ids[i]
        assert step.logprob == pytest.approx(lp[i - 1, ids[i]], abs=subject.tol)
        assert step.top_logprobs[0][0] == int(np.argmax(lp[i - 1]))
        assert len(step.top_logprobs) == 2


def test_tokenizer_bytes_roundtrip(backend) -> None:
    for text in tinymodels.SNIPPETS:
        ids = backend.tokenize(text)
        assert b"".join(backend.token_bytes(i) for i in ids) == text.encode("utf-8")
        assert backend.detokenize(ids) == text


# -- padded vocabularies (issue 11 item 7) ----------------------------------------------
def test_padding_rows_are_never_sampled_nor_listed(subject: Subject, backend) -> None:
    """CodeGen's 896 output rows hold 800 tokens: ids 800.. are no tokens on any path."""
    vocab = backend.vocab_size
    if subject.name != "fake":
        assert vocab == tinymodels.VOCAB_SIZE  # the tokenizer's size, not the rows
    pad = vocab + 5  # a padding row on the CodeGen models, out of range elsewhere
    if "codegen" in subject.name:
        assert pad < subject.rows  # the bias below would force this row if it were a token
    ids = backend.tokenize(PROMPT)
    bias = ((pad, 100.0),)
    greedy, _ = run(backend, ids, max_tokens=6, temperature=0.0, logit_bias=bias, logprobs=5)
    hot, _ = run(backend, ids, max_tokens=12, temperature=3.0, seed=3, logprobs=20)
    # CT2's native path (no seed, no bias): sampled by CT2 itself, with and without logits.
    native, _ = run(backend, ids, max_tokens=24, temperature=3.0, ignore_eos=True)
    plain, _ = run(backend, ids, max_tokens=6, temperature=0.0, logprobs=20)
    for step in [*greedy, *hot, *native, *plain]:
        assert 0 <= step.token_id < vocab
        assert all(0 <= t < vocab for t, _ in step.top_logprobs)
    # The bias on a non-token changes nothing.
    assert [s.token_id for s in greedy] == [s.token_id for s in plain][: len(greedy)]
    scored = backend.prompt_logprobs(ids[:8], 20)
    assert all(t < vocab for s in scored[1:] if s is not None for t, _ in s.top_logprobs)
    with pytest.raises(InvalidRequest):  # a padding id is no prompt token either
        backend.submit(GenerationRequest([1, pad], SamplingParams(max_tokens=1)))


def test_bad_input_is_rejected_at_submit(backend) -> None:
    with pytest.raises(InvalidRequest):
        backend.submit(GenerationRequest([1, backend.vocab_size], SamplingParams(max_tokens=2)))
    with pytest.raises(InvalidRequest):
        backend.submit(GenerationRequest([-1], SamplingParams(max_tokens=2)))


# -- finishing ----------------------------------------------------------------------------
def test_eos_stops_without_a_step_and_min_tokens_or_ignore_eos_hold_it_off(backend) -> None:
    ids = backend.tokenize(PROMPT)
    eos = _eos(backend)
    force_eos = ((eos, 100.0),)
    steps, stream = run(backend, ids, max_tokens=8, temperature=0.0, logit_bias=force_eos)
    assert steps == [] and stream.finish_reason is FinishReason.STOP
    steps, stream = run(
        backend, ids, max_tokens=8, temperature=0.0, logit_bias=force_eos, min_tokens=5
    )
    toks = [s.token_id for s in steps]
    assert len(toks) == 5 and eos not in toks and stream.finish_reason is FinishReason.STOP
    steps, stream = run(
        backend, ids, max_tokens=8, temperature=0.0, logit_bias=force_eos, ignore_eos=True
    )
    toks = [s.token_id for s in steps]
    assert len(toks) == 8 and eos not in toks and stream.finish_reason is FinishReason.LENGTH


def test_full_context_finishes_length(backend) -> None:
    text = "".join(tinymodels.SNIPPETS) * 3
    ids = backend.tokenize(text)[: backend.context_length - 5]
    assert len(ids) == backend.context_length - 5
    steps, stream = run(backend, ids, max_tokens=50, temperature=0.0, ignore_eos=True)
    assert len(steps) == 5 and stream.finish_reason is FinishReason.LENGTH


def test_passed_deadline_finishes_cancelled_without_a_step(backend) -> None:
    ids = backend.tokenize(PROMPT)
    req = GenerationRequest(ids, SamplingParams(max_tokens=8), deadline=time.monotonic() - 1)
    stream = backend.submit(req)
    assert list(stream) == [] and stream.finish_reason is FinishReason.CANCELLED


def test_deadline_passing_mid_generation_stops_at_the_next_step(backend, monkeypatch) -> None:
    def expire_at_3(stream: TokenStream, n: int) -> None:
        if n == 3:
            stream.request.deadline = time.monotonic() - 1.0

    hook_put(monkeypatch, {"late": expire_at_3})
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    stream = backend.submit(GenerationRequest(backend.tokenize(PROMPT), params, request_id="late"))
    assert len(list(stream)) == 3 and stream.finish_reason is FinishReason.CANCELLED


def test_cancel_stops_within_one_step_without_disturbing_others(backend, monkeypatch) -> None:
    ids = backend.tokenize(PROMPT)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    serial, _ = run(backend, ids[:-3], max_tokens=20, temperature=0.0, ignore_eos=True)

    def cancel_at(k: int) -> Callable[[TokenStream, int], None]:
        def action(stream: TokenStream, n: int) -> None:
            if n == k:
                stream.cancel()

        return action

    gate = threading.Event()
    hook_put(
        monkeypatch,
        {"alone": cancel_at(3), "victim": cancel_at(5), "blocker": lambda s, n: gate.wait(10)},
    )
    lone = backend.submit(GenerationRequest(ids, params, request_id="alone"))
    assert len(list(lone)) == 3 and lone.finish_reason is FinishReason.CANCELLED
    # Victim and other wait together behind a blocker (another batch key for CT2), so
    # they generate side by side.
    blocker_params = SamplingParams(max_tokens=1, temperature=0.5)
    blocker = backend.submit(GenerationRequest(ids, blocker_params, request_id="blocker"))
    victim = backend.submit(GenerationRequest(ids, params, request_id="victim"))
    other = backend.submit(GenerationRequest(ids[:-3], params, request_id="other"))
    gate.set()
    list(blocker)
    assert len(list(victim)) == 5 and victim.finish_reason is FinishReason.CANCELLED
    assert [s.token_id for s in other] == [s.token_id for s in serial]
    assert other.finish_reason is FinishReason.LENGTH


def test_concurrent_requests_equal_serial_runs(subject: Subject, backend, monkeypatch) -> None:
    texts = [PROMPT, tinymodels.SNIPPETS[0], "import os\n", "class A:\n    def f(self):\n"]
    texts += [t + "x = 1\n" for t in texts]
    prompts = [backend.tokenize(t) for t in texts]
    # No ignore_eos: CT2 batches only equal lengths under min_length.
    params = SamplingParams(max_tokens=8, temperature=0.0)
    serial = [[s.token_id for s in run(backend, p, max_tokens=8)[0]] for p in prompts]
    gate = threading.Event()
    hook_put(monkeypatch, {"blocker": lambda s, n: gate.wait(10)})
    blocker = SamplingParams(max_tokens=1, temperature=0.5)
    backend.submit(GenerationRequest(prompts[0], blocker, request_id="blocker"))
    before = backend.stats()
    streams = [backend.submit(GenerationRequest(p, params)) for p in prompts]
    gate.set()
    together = [[s.token_id for s in st] for st in streams]
    assert together == serial
    if subject.batched is not None:
        subject.batched(before, backend.stats(), len(prompts))


# -- the queue and closing ------------------------------------------------------------------
def start_parked(
    b: Backend,
    monkeypatch: pytest.MonkeyPatch,
    park: Callable[[TokenStream, int], None],
    inside: threading.Event,
    *,
    max_tokens: int,
) -> tuple[TokenStream, list[int], SamplingParams]:
    """Submit a greedy request of ``PROMPT`` whose worker runs ``park`` after each step.

    Returns once ``park`` has set ``inside`` (the worker is held): the stream,
    the prompt ids and the parameters, for more requests like it.
    """
    hook_put(monkeypatch, {"parked": park})
    ids = b.tokenize(PROMPT)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    stream = b.submit(GenerationRequest(ids, params, request_id="parked"))
    assert inside.wait(30)
    return stream, ids, params


def test_max_queue_counts_requests_waiting_beyond_the_capacity(subject: Subject, monkeypatch):
    b = subject.make(slots=1, max_queue=2)
    gate, inside = threading.Event(), threading.Event()

    def hold(stream: TokenStream, n: int) -> None:  # keeps the worker (and the slot) busy
        inside.set()
        gate.wait(10)

    try:
        held, ids, params = start_parked(b, monkeypatch, hold, inside, max_tokens=4)
        cancelled = b.submit(GenerationRequest(ids, params))
        expired = b.submit(GenerationRequest(ids, params))
        assert b.stats()["queue_depth"] == 2
        with pytest.raises(QueueFull):
            b.submit(GenerationRequest(ids, params))
        if "busy_slots" in b.stats():
            assert b.stats()["busy_slots"] == 1
        cancelled.cancel()
        expired.request.deadline = time.monotonic() - 1.0
        gate.set()
        assert len(list(held)) == 4 and held.finish_reason is FinishReason.LENGTH
        for waited in (cancelled, expired):
            assert list(waited) == [] and waited.finish_reason is FinishReason.CANCELLED
        # Freed: the queue takes requests again, and they run.
        assert len(run(b, ids, max_tokens=2, temperature=0.0, ignore_eos=True)[0]) == 2
    finally:
        gate.set()
        b.close()


def test_close_fails_open_streams_and_is_idempotent(subject: Subject, monkeypatch) -> None:
    b = subject.make(slots=1)
    inside = threading.Event()

    def park(stream: TokenStream, n: int) -> None:  # the worker waits here until close()
        inside.set()
        deadline = time.monotonic() + 30
        while not b._closed and time.monotonic() < deadline:  # set first thing in close()
            time.sleep(0.002)

    running, ids, params = start_parked(b, monkeypatch, park, inside, max_tokens=100)
    queued = b.submit(GenerationRequest(ids, params))
    closer = threading.Thread(target=b.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()
    got: list[Step] = []
    with pytest.raises(BackendError):
        for step in running:
            got.append(step)
    assert len(got) == 1  # the step it had, then the error
    with pytest.raises(BackendError):
        list(queued)
    with pytest.raises(BackendError):
        b.submit(GenerationRequest(ids, params))
    b.close()  # idempotent
