"""CTranslate2-specific behaviour on tiny random GPT-2 and CodeGen models.

The contract every backend shares (exact greedy/temperature/penalty logprobs
against transformers, seeds, cancellation, deadlines, the queue, closing, padded
vocabularies ...) is tests/test_backend_contract.py; here is what only this
backend has: batching inside one ``generate_batch`` call, the static-prompt
cache, int8 files. Every generation runs through the real ctranslate2 library;
the only test hooks wrap ``TokenStream.put`` to act at a given step.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from fastpilot.backends.base import FinishReason, GenerationRequest, SamplingParams, TokenStream
from fastpilot.errors import NotSupported
from tests import tinymodels
from tests.gates import hook_put, run

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
def backend(built: dict[str, Path], arch: str):
    from fastpilot.backends.ctranslate2 import CTranslate2Backend

    b = CTranslate2Backend(built[f"{arch}-float32"], threads=1, prefix_chunk=16)
    yield b
    b.close()


def test_a_cancelled_sequence_leaves_its_batch_mate_alone(backend, monkeypatch) -> None:
    """Cancelling one sequence of a generate_batch call ends only that one, in one call."""
    ids = backend.tokenize(PROMPT)
    serial, _ = run(backend, ids, max_tokens=20, temperature=0.0, ignore_eos=True)

    def cancel_at_3(stream: TokenStream, n: int) -> None:
        if n == 3:
            stream.cancel()

    gate = threading.Event()
    hook_put(monkeypatch, {"victim": cancel_at_3, "blocker": lambda s, n: gate.wait(10)})
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


def test_an_idle_worker_starts_a_request_even_with_max_queue_zero(built) -> None:
    """max_queue counts waiting requests; one an idle worker starts at once does not wait."""
    from fastpilot.backends.ctranslate2 import CTranslate2Backend

    b = CTranslate2Backend(built["gpt2-float32"], threads=1, max_queue=0)
    try:
        steps, stream = run(b, b.tokenize(PROMPT), max_tokens=2, temperature=0.0)
        assert len(steps) == 2 and stream.finish_reason is FinishReason.LENGTH
    finally:
        b.close()


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
