"""Shared helpers for the API, CLI and end-to-end tests (this module holds no tests).

The app is built the way ``fastpilot serve`` builds it -- the real
:class:`fastpilot.models.Registry` and :class:`fastpilot.engine.model.Model` --
over the engine's :class:`tests.fakes.FakeBackend` (the real Backend ABC,
deterministic, with ``step_delay`` for timing tests).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import falcon.testing

from fastpilot.app import create_app
from fastpilot.engine.model import Model
from fastpilot.models import Registry
from fastpilot.serve import RunningServer, start_in_thread
from fastpilot.settings import Settings
from tests.fakes import FakeBackend

CREATED = 1_700_000_000
LOCAL = {"Host": "127.0.0.1:5000"}


def make_registry(*backends: tuple[str, FakeBackend], timeout: float | None = None) -> Registry:
    registry = Registry()
    n = 0

    def new_id() -> str:
        nonlocal n
        n += 1
        return f"{n:06d}"

    for name, backend in backends:
        registry.add(
            name,
            Model(
                name, backend, clock=lambda: float(CREATED), new_id=new_id, default_timeout=timeout
            ),
        )
    return registry


@contextmanager
def serving(settings: Settings, *backends: tuple[str, FakeBackend]) -> Iterator[RunningServer]:
    """The real app over ``backends`` (see :func:`make_registry`) on waitress in a thread.

    Yields once the socket listens; stops the server and closes the models after.
    """
    registry = make_registry(*backends)
    running = start_in_thread(create_app(settings, registry), settings)
    try:
        yield running
    finally:
        running.stop()
        registry.close_all()


def client(
    settings: Settings | None = None, registry: Registry | None = None, **backend_kwargs: Any
):
    """A TestClient over a fresh app with one FakeBackend model named ``fake``."""
    backend = FakeBackend(**backend_kwargs)
    registry = registry or make_registry(("fake", backend))
    app = create_app(settings or Settings(), registry, clock=lambda: float(CREATED))
    return falcon.testing.TestClient(app, headers=dict(LOCAL)), backend, registry


def sse_events(body: str | bytes) -> list[Any]:
    """Parse an SSE body strictly: every event one ``data:`` line, ``[DONE]`` last."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    events: list[Any] = []
    for block in blocks[:-1]:
        assert "\n" not in block, f"multi-line event: {block!r}"
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]"
    return events[:-1]


def joined_text(events: Iterable[dict[str, Any]], index: int = 0) -> str:
    return "".join(
        c.get("text", "") for e in events for c in e.get("choices", []) if c["index"] == index
    )
