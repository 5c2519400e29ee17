"""What one request in flight needs from its model, and the model's request counters.

:class:`RunContext` is the narrow view a :class:`fastpilot.engine.run.Run` gets
instead of the whole :class:`fastpilot.engine.model.Model`: the backend it
submits to, how to name and date the response, the default deadline, the text
of a token for ``logprobs``, and the counters it settles. So ``run`` does not
import ``model`` (the model builds contexts; runs never reach back), and a test
can drive a ``Run`` over any backend with a context built by hand.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from fastpilot.backends.base import Backend

__all__ = ["RequestCounters", "RunContext"]


class RequestCounters:
    """A model's request and token counters for ``/metrics``; thread-safe.

    Every request thread adds to them (start, finish, error); ``snapshot`` reads
    them all under the same lock, so a scrape never sees half an update.
    """

    NAMES = (
        "requests_total",
        "requests_active",
        "errors_total",
        "timeouts_total",
        "prompt_tokens_total",
        "completion_tokens_total",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0)

    def add(self, **deltas: int) -> None:
        """Add each delta to its counter; an unknown name raises KeyError (a typo, not a metric)."""
        with self._lock:
            for key, value in deltas.items():
                self._values[key] += value

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter, taken at one instant."""
        with self._lock:
            return dict(self._values)


@dataclass(frozen=True, slots=True)
class RunContext:
    """Exactly what a request in flight uses of its model (see the module docstring).

    Attributes:
        name: the served model name, written into every response's ``model`` field.
        backend: where the request's sequences are submitted; also the tokenizer
            for echo and the source of prompt logprobs.
        token_text: one token's text as ``logprobs`` shows it (memoized by the model).
        counters: settled once per request (started, finished, errors, tokens).
        new_id: a fresh unique string for the response ``id``.
        clock: wall-clock seconds for ``created``.
        default_timeout: seconds until the request's deadline when it sets no
            ``timeout`` (None: no deadline).
    """

    name: str
    backend: Backend
    token_text: Callable[[int], str]
    counters: RequestCounters
    new_id: Callable[[], str]
    clock: Callable[[], float]
    default_timeout: float | None
