"""A request in flight needs only its RunContext, not the Model; its result is typed."""

from __future__ import annotations

import dataclasses

import pytest

from fastpilot.engine.context import RequestCounters, RunContext
from fastpilot.engine.model import Model
from fastpilot.engine.params import CompletionRequest
from fastpilot.engine.run import Completion, CompletionResult, CompletionStream, Run
from fastpilot.errors import Timeout
from tests.fakes import FakeBackend


@pytest.fixture
def backend():
    b = FakeBackend(" world!\n")
    yield b
    b.close()


def context(backend: FakeBackend, counters: RequestCounters) -> RunContext:
    return RunContext(
        name="by-hand",
        backend=backend,
        token_text=lambda t: backend.token_bytes(t).decode("utf-8", "replace"),
        counters=counters,
        new_id=lambda: "fixed",
        clock=lambda: 42.0,
        default_timeout=None,
    )


def test_a_run_needs_only_its_context(backend: FakeBackend) -> None:
    counters = RequestCounters()
    req = CompletionRequest.from_dict({"prompt": "hello", "max_tokens": 8, "temperature": 0})
    result = Run(context(backend, counters), req, stops=(), chat=False).complete()
    assert isinstance(result, CompletionResult) and type(result.body) is dict
    assert result.body["id"] == "cmpl-fixed" and result.body["created"] == 42
    assert result.body["model"] == "by-hand"
    assert result.body["choices"][0]["text"] == " world!\n"
    assert (result.fim_used, result.suffix_ignored, result.truncated) == (False, False, 0)
    usage = result.body["usage"]
    snap = counters.snapshot()
    assert snap["requests_total"] == 1 and snap["requests_active"] == 0
    assert snap["prompt_tokens_total"] == usage["prompt_tokens"]
    assert snap["completion_tokens_total"] == usage["completion_tokens"] > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.truncated = 1  # type: ignore[misc]


def test_a_stream_settles_the_context_counters(backend: FakeBackend) -> None:
    counters = RequestCounters()
    req = CompletionRequest.from_dict({"prompt": "hello", "max_tokens": 8, "stream": True})
    chunks = list(CompletionStream(Run(context(backend, counters), req, stops=(), chat=False)))
    assert chunks and all(c["model"] == "by-hand" for c in chunks)
    assert counters.snapshot()["requests_active"] == 0


def test_the_library_still_returns_a_dict_with_attributes(backend: FakeBackend) -> None:
    model = Model("lib", backend, clock=lambda: 7.0, new_id=lambda: "x")
    out = model.complete(prompt="hello", max_tokens=4, temperature=0, suffix="!")
    assert isinstance(out, Completion) and isinstance(out, dict)
    assert out["model"] == "lib" and out["created"] == 7 and out["id"] == "cmpl-x"
    assert out.suffix_ignored and not out.fim_used and out.truncated == 0
    stats = model.stats()
    assert stats["requests_total"] == 1 and stats["errors_total"] == 0


def test_counters_refuse_unknown_names() -> None:
    counters = RequestCounters()
    counters.add(errors_total=2, timeouts_total=1)
    assert counters.snapshot()["errors_total"] == 2
    with pytest.raises(KeyError):
        counters.add(error_total=1)


def test_a_timeout_is_counted_in_the_context() -> None:
    slow = FakeBackend(" world!\n" * 50, step_delay=0.02, context_length=1024)
    try:
        counters = RequestCounters()
        ctx = dataclasses.replace(context(slow, counters), default_timeout=0.05)
        req = CompletionRequest.from_dict(
            {"prompt": "hello", "max_tokens": 300, "ignore_eos": True}
        )
        with pytest.raises(Timeout):
            Run(ctx, req, stops=(), chat=False).complete()
        snap = counters.snapshot()
        assert (snap["timeouts_total"], snap["errors_total"], snap["requests_active"]) == (1, 1, 0)
    finally:
        slow.close()
