"""CTranslate2 backend against transformers on tiny random GPT-2 and CodeGen models.

Exactness checks use float32 CT2 files (logits agree with transformers to ~1e-4);
int8 files get a smoke test. Every generation runs through the real ctranslate2
library; the only test hooks wrap ``TokenStream.put`` to act at a given step.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastpilot.backends.base import FinishReason, GenerationRequest, SamplingParams, TokenStream
from fastpilot.engine.sampling import log_softmax
from fastpilot.errors import NotSupported, QueueFull
from tests import tinymodels
from tests.reference import Ref

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
LONG = tinymodels.SNIPPETS[2] + tinymodels.SNIPPETS[3]  # > 2 prefix chunks of 16


@pytest.fixture(scope="module")
def built(tiny_models: dict[str, dict[str, Path]]) -> dict[str, Path]:
    """The shared tiny models (conftest.py), keyed ``<arch>-hf`` / ``<arch>-<quantization>``."""
    dirs: dict[str, Path] = {}
    for arch in ("gpt2", "codegen"):
        dirs[f"{arch}-hf"] = tiny_models[arch]["hf"]
        for q in ("float32", "int8"):
            dirs[f"{arch}-{q}"] = tiny_models[arch][f"ct2-{q}"]
    return dirs


@pytest.fixture(scope="module", params=["gpt2", "codegen"])
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def ref(built: dict[str, Path], arch: str) -> Ref:
    return Ref(built[f"{arch}-hf"])


@pytest.fixture(scope="module")
def backend(built: dict[str, Path], arch: str):
    from fastpilot.backends.ctranslate2 import CTranslate2Backend

    b = CTranslate2Backend(built[f"{arch}-float32"], threads=1, prefix_chunk=16)
    yield b
    b.close()


def run(backend, ids: list[int], **kw) -> tuple[list, TokenStream]:
    stream = backend.submit(GenerationRequest(list(ids), SamplingParams(**kw)))
    return list(stream), stream


def test_greedy_matches_reference_argmax_and_logprobs(backend, ref: Ref) -> None:
    ids = backend.tokenize(PROMPT)
    steps, stream = run(backend, ids, max_tokens=12, temperature=0.0, logprobs=3)
    assert len(steps) == 12 and stream.finish_reason is FinishReason.LENGTH
    seq = list(ids)
    for step in steps:
        logits = ref.logits(seq)
        lp = log_softmax(logits)
        assert step.token_id == int(np.argmax(logits))
        assert step.logprob == pytest.approx(lp[step.token_id], abs=2e-3)
        top = dict(step.top_logprobs)
        assert len(top) == 3 and top[step.token_id] == step.logprob
        best3 = np.argsort(-logits)[:3]
        assert set(top) == set(int(i) for i in best3)
        seq.append(step.token_id)


def test_temperature_logprobs_are_of_the_scaled_distribution(backend, ref: Ref) -> None:
    ids = backend.tokenize(PROMPT)
    steps, _ = run(backend, ids, max_tokens=4, temperature=0.7, logprobs=2)
    seq = list(ids)
    for step in steps:
        lp = log_softmax(ref.logits(seq) / 0.7)
        assert step.logprob == pytest.approx(lp[step.token_id], abs=2e-3)
        assert dict(step.top_logprobs).keys() == {int(i) for i in np.argsort(-lp)[:2]}
        seq.append(step.token_id)


def test_logit_bias_ban_and_force(backend, ref: Ref) -> None:
    ids = backend.tokenize(PROMPT)
    logits = ref.logits(ids)
    order = np.argsort(-logits)
    best, second = int(order[0]), int(order[1])
    steps, _ = run(backend, ids, max_tokens=1, temperature=0.0, logit_bias=((best, -100.0),))
    assert steps[0].token_id == second
    # the reported logprob is of the distribution with the ban applied
    masked = logits.copy()
    masked[best] = -np.inf
    assert steps[0].logprob == pytest.approx(log_softmax(masked)[second], abs=2e-3)
    forced = int(order[-1])  # the least likely token
    steps, _ = run(backend, ids, max_tokens=3, temperature=0.0, logit_bias=((forced, 100.0),))
    assert [s.token_id for s in steps] == [forced] * 3


def test_frequency_and_presence_penalty_match_hand_computation(backend, ref: Ref) -> None:
    ids = backend.tokenize(PROMPT)
    first = int(np.argmax(ref.logits(ids)))
    nxt = ref.logits(ids + [first])
    fp, pp = 1.5, 0.75
    hand = nxt.copy()
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
    assert steps[1].logprob == pytest.approx(log_softmax(hand)[expected], abs=2e-3)


def test_seed_reproduces_and_differs(backend) -> None:
    ids = backend.tokenize(PROMPT)
    a, _ = run(backend, ids, max_tokens=16, temperature=1.0, seed=7)
    b, _ = run(backend, ids, max_tokens=16, temperature=1.0, seed=7)
    c, _ = run(backend, ids, max_tokens=16, temperature=1.0, seed=8)
    assert [s.token_id for s in a] == [s.token_id for s in b]
    assert [s.token_id for s in a] != [s.token_id for s in c]
    assert [s.logprob for s in a] == [s.logprob for s in b]


def _hook_put(monkeypatch: pytest.MonkeyPatch, actions: dict) -> None:
    """Run ``actions[request_id](stream, n)`` on the worker thread after each n-th step."""
    original = TokenStream.put
    counts: dict[int, int] = {}

    def put(self: TokenStream, step) -> None:
        original(self, step)
        action = actions.get(self.request.request_id)
        if action is not None:
            counts[id(self)] = counts.get(id(self), 0) + 1
            action(self, counts[id(self)])

    monkeypatch.setattr(TokenStream, "put", put)


def test_cancel_stops_within_one_step_without_disturbing_others(backend, monkeypatch) -> None:
    ids = backend.tokenize(PROMPT)
    serial, _ = run(backend, ids, max_tokens=20, temperature=0.0, ignore_eos=True)

    def cancel_at_3(stream: TokenStream, n: int) -> None:
        if n == 3:
            stream.cancel()

    gate = threading.Event()
    _hook_put(monkeypatch, {"victim": cancel_at_3, "blocker": lambda s, n: gate.wait(10)})
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    blocker_params = SamplingParams(max_tokens=1, temperature=0.5)  # another batch key
    batches = backend.stats()["batches"]
    blocker = backend.submit(GenerationRequest(ids, blocker_params, request_id="blocker"))
    victim = backend.submit(GenerationRequest(ids, params, request_id="victim"))
    other = backend.submit(GenerationRequest(ids, params, request_id="other"))
    gate.set()  # victim and other now wait together behind the blocker
    list(blocker)
    v, o = list(victim), list(other)
    assert backend.stats()["batches"] - batches == 2
    assert victim.finish_reason is FinishReason.CANCELLED and len(v) == 3
    assert [s.token_id for s in o] == [s.token_id for s in serial]
    assert other.finish_reason is FinishReason.LENGTH


def test_concurrent_requests_equal_serial_runs(backend, monkeypatch) -> None:
    texts = [PROMPT, tinymodels.SNIPPETS[0], "import os\n", "class A:\n    def f(self):\n"]
    texts += [t + "x = 1\n" for t in texts]
    prompts = [backend.tokenize(t) for t in texts]
    serial = [
        [s.token_id for s in run(backend, p, max_tokens=8, temperature=0.0)[0]] for p in prompts
    ]
    gate = threading.Event()
    _hook_put(monkeypatch, {"blocker": lambda s, n: gate.wait(10)})
    blocker = SamplingParams(max_tokens=1, temperature=0.5)
    backend.submit(GenerationRequest(prompts[0], blocker, request_id="blocker"))
    before = backend.stats()["batches"]
    streams = [
        backend.submit(GenerationRequest(p, SamplingParams(max_tokens=8, temperature=0.0)))
        for p in prompts
    ]
    gate.set()
    together = [[s.token_id for s in st] for st in streams]
    assert together == serial
    # prompts within LENGTH_TOLERANCE tokens of each other share a call
    assert backend.stats()["batches"] - before < len(prompts)


def test_queue_full_and_deadline(built: dict[str, Path], monkeypatch) -> None:
    from fastpilot.backends.ctranslate2 import CTranslate2Backend

    b = CTranslate2Backend(built["gpt2-float32"], threads=1, max_queue=2)
    try:
        ids = b.tokenize(PROMPT)
        release = threading.Event()
        _hook_put(monkeypatch, {"hold": lambda stream, n: release.wait(10)})
        params = SamplingParams(max_tokens=2, temperature=0.0)
        held = b.submit(GenerationRequest(ids, params, request_id="hold"))
        while b.stats()["active"] == 0:  # the worker is now inside the held request
            time.sleep(0.005)
        waiting = [b.submit(GenerationRequest(ids, params)) for _ in range(2)]
        with pytest.raises(QueueFull):
            b.submit(GenerationRequest(ids, params))
        expired = waiting[0]
        expired.request.deadline = time.monotonic() - 1.0
        release.set()
        assert len(list(held)) == 2
        assert list(expired) == [] and expired.finish_reason is FinishReason.CANCELLED
        assert len(list(waiting[1])) == 2
        # a deadline passing mid-generation cancels at the next step
        monkeypatch.undo()
        _hook_put(monkeypatch, {"slow": lambda stream, n: time.sleep(0.05)})
        slow = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
        req = GenerationRequest(ids, slow, deadline=time.monotonic() + 0.2, request_id="slow")
        steps = list(b.submit(req))
        assert 1 <= len(steps) < 50
    finally:
        b.close()
    b.close()  # idempotent


def test_prompt_logprobs_match_reference(backend, ref: Ref) -> None:
    ids = backend.tokenize(PROMPT)[:10]
    steps = backend.prompt_logprobs(ids, 2)
    assert steps[0] is None and len(steps) == len(ids)
    for i in range(1, len(ids)):
        lp = log_softmax(ref.logits(ids[:i]))
        assert steps[i].token_id == ids[i]
        assert steps[i].logprob == pytest.approx(lp[ids[i]], abs=2e-3)
        assert steps[i].top_logprobs[0][0] == int(np.argmax(lp))


def test_prefix_cache_hits_and_keeps_output(backend, built: dict[str, Path], arch: str) -> None:
    from fastpilot.backends.ctranslate2 import CTranslate2Backend

    base = backend.tokenize(LONG)[:40]  # 2 chunks of 16 + 8; extensions stay below 48
    first, s1 = run(backend, base, max_tokens=6, temperature=0.0, logprobs=1)
    extended = base + [5, 6]
    second, s2 = run(backend, extended, max_tokens=6, temperature=0.0, logprobs=1)
    third, s3 = run(backend, extended + [5], max_tokens=6, temperature=0.0, logprobs=1)
    assert s1.cached_tokens == 0
    assert s2.cached_tokens == 0  # a prefix seen twice: computed and kept now, for later
    assert s3.cached_tokens == 32
    assert backend.stats()["prefix_cache_hits"] >= 1
    plain = CTranslate2Backend(built[f"{arch}-float32"], threads=1, prefix_chunk=0)
    try:
        for prompt, got in ((extended, second), (extended + [5], third)):
            want, _ = run(plain, prompt, max_tokens=6, temperature=0.0, logprobs=1)
            assert [s.token_id for s in got] == [s.token_id for s in want]
            assert np.allclose([s.logprob for s in got], [s.logprob for s in want], atol=1e-4)
    finally:
        plain.close()


def test_tokenizer_bytes_roundtrip(backend) -> None:
    for text in tinymodels.SNIPPETS:
        ids = backend.tokenize(text)
        assert b"".join(backend.token_bytes(i) for i in ids) == text.encode("utf-8")
        assert backend.detokenize(ids) == text


def test_min_tokens_stepwise_bans_eos(backend) -> None:
    ids = backend.tokenize(PROMPT)
    eos = min(backend.eos_token_ids)
    bias = ((eos, 50.0),)  # EOS would win at once without min_tokens
    steps, stream = run(backend, ids, max_tokens=10, temperature=0.0, logit_bias=bias, min_tokens=4)
    assert len(steps) == 4 and stream.finish_reason is FinishReason.STOP
    assert eos not in [s.token_id for s in steps]


def test_int8_smoke_and_unsupported(built: dict[str, Path], arch: str) -> None:
    from fastpilot.backends.ctranslate2 import CTranslate2Backend

    b = CTranslate2Backend(built[f"{arch}-int8"], threads=1)
    try:
        assert b.info.extra["compute_type"] == "int8_float32"
        steps, _ = run(b, b.tokenize(PROMPT), max_tokens=8, temperature=0.0, ignore_eos=True)
        assert len(steps) == 8
        assert all(np.isfinite(s.logprob) and s.logprob <= 0 for s in steps)
        with pytest.raises(NotSupported):
            b.embed(["x"])
    finally:
        b.close()


def test_close_cancels_the_running_request(built: dict[str, Path], monkeypatch) -> None:
    from fastpilot.backends.ctranslate2 import CTranslate2Backend
    from fastpilot.errors import BackendError

    b = CTranslate2Backend(built["gpt2-float32"], threads=1)
    release, entered = threading.Event(), threading.Event()

    def hold(stream: TokenStream, n: int) -> None:  # the worker parks after the 1st step
        entered.set()
        release.wait(10)

    _hook_put(monkeypatch, {"run": hold})
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    running = b.submit(GenerationRequest(b.tokenize(PROMPT), params, request_id="run"))
    # "active" alone is too early: close() could cancel before the first step is put.
    assert entered.wait(30)
    waiting = b.submit(GenerationRequest(b.tokenize(PROMPT), params))
    closer = threading.Thread(target=b.close)
    closer.start()
    while not running.cancelled:
        time.sleep(0.005)
    release.set()
    closer.join(10)
    assert not closer.is_alive()
    assert len(list(running)) == 1 and running.finish_reason is FinishReason.CANCELLED
    assert list(waiting) == [] and waiting.finish_reason is FinishReason.CANCELLED
    with pytest.raises(BackendError):
        b.submit(GenerationRequest([1], params))
