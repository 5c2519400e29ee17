"""Driving a backend's worker thread from a test: a gate that parks it, hooks, a plain run.

This module holds no tests.

Tiny models write a hundred tokens in a few milliseconds, so a test that
cancels a stream and then sees it end cannot tell cancellation from the model
finishing on its own. :class:`WorkerGate` removes the race: it wraps
:meth:`TokenStream.put` (the one call every backend -- fake, CTranslate2,
llama.cpp -- makes for each generated token, on its worker thread) so that the
worker parks right after the ``after``-th token until the test calls
:meth:`WorkerGate.release`. Whatever the test does while the worker is parked
(close the stream, drop it, hang up) happens before the next decode step, and
the steps counted afterwards show whether generation stopped.

The wrapper stores and forwards the step unchanged; it only delays the worker.
It also records the streams that ``backend.submit`` hands out, through the
public contract, so a test can check how each one finished. :func:`hook_put`
runs a test's action on the worker after a stream's n-th step, and :func:`run`
generates one request to its end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from fastpilot.backends.base import Backend, GenerationRequest, SamplingParams, Step, TokenStream


class WorkerGate:
    """Park the worker after the ``after``-th token put (counted over all streams)."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        backend: Backend | None = None,
        *,
        after: int = 1,
        timeout: float = 60.0,
    ) -> None:
        self.timeout = timeout
        self.streams: list[TokenStream] = []  # every stream backend.submit returned
        self.arm(after)
        original_put = TokenStream.put

        def put(stream: TokenStream, step: Step) -> None:
            original_put(stream, step)
            with self._lock:
                self.puts += 1
                park = self.puts == self.after
            if park:
                self.parked.set()
                # Bounded, so that a broken test fails on its assertions instead of hanging.
                self.expired = not self._release.wait(self.timeout)

        monkeypatch.setattr(TokenStream, "put", put)
        if backend is not None:
            original_submit = backend.submit

            def submit(request: Any) -> TokenStream:
                stream = original_submit(request)
                self.streams.append(stream)
                return stream

            monkeypatch.setattr(backend, "submit", submit)

    def arm(self, after: int) -> None:
        """Count tokens from zero again and park after the ``after``-th; forget old streams."""
        self._lock = threading.Lock()
        self.after = after
        self.puts = 0
        self.parked = threading.Event()  # set when the worker reached the gate
        self._release = threading.Event()
        self.expired = False  # True when the worker left the gate by timeout, not release()
        self.streams.clear()

    def release(self) -> None:
        """Let the worker go on (idempotent; later puts do not park until :meth:`arm`)."""
        self._release.set()


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds; False after ``timeout`` seconds (a generous bound)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def run(backend: Backend, ids: list[int], **kw: Any) -> tuple[list[Step], TokenStream]:
    kw.setdefault("temperature", 0.0)
    stream = backend.submit(GenerationRequest(list(ids), SamplingParams(**kw)))
    return list(stream), stream


def hook_put(monkeypatch: pytest.MonkeyPatch, actions: dict[str, Callable[..., None]]) -> None:
    """Run ``actions[request_id](stream, n)`` in the worker right after a stream's n-th step."""
    original = TokenStream.put
    counts: dict[int, int] = {}

    def put(self: TokenStream, step: Step) -> None:
        original(self, step)
        action = actions.get(self.request.request_id)
        if action is not None:
            counts[id(self)] = counts.get(id(self), 0) + 1
            action(self, counts[id(self)])

    monkeypatch.setattr(TokenStream, "put", put)
