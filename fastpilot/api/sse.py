"""Server-sent events framing for streamed completions.

Every event is exactly one line, ``data: <compact json>\\n\\n``, and the body
ends with ``data: [DONE]\\n\\n``: Copilot splits the body on newlines and
JSON-parses each ``data:`` line on its own. An error after the first byte
cannot change the status any more, so it goes out as a last
``data: {"error": {...}}`` event before ``[DONE]``.

:class:`EventStream` is the WSGI body. waitress calls :meth:`EventStream.close`
when the response ends or the client disconnects (its next write raises
``ClientDisconnected`` and it closes the app iterator); ``close`` cancels the
model's generation through the source's own ``close()`` even if iteration
never started, which a generator's ``close()`` would not do.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastpilot.api.errors import public_error
from fastpilot.errors import FastpilotError

log = logging.getLogger("fastpilot.api")

DONE = b"data: [DONE]\n\n"


def encode_event(payload: Any) -> bytes:
    """One SSE event on one line; ``ensure_ascii`` keeps U+2028 and friends escaped."""
    return (
        b"data: "
        + json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        + b"\n\n"
    )


def error_event(ex: BaseException, request_id: str) -> bytes:
    if isinstance(ex, FastpilotError):
        body = public_error(ex, request_id)
    else:
        body = {
            "error": {
                "message": f"internal server error (request id {request_id})",
                "type": "server_error",
                "param": None,
                "code": "internal_error",
            }
        }
    return encode_event(body)


class EventStream:
    """The SSE body for one completion stream.

    Args:
        source: iterator of chunk dicts.
        cancel: stops generation; default: ``source.close`` if it has one.
        prefetched: chunks already pulled from ``source`` (to surface errors as a status).
        on_chunk: called with each chunk before it is sent (usage accounting).
        on_close: called once when the body is closed, with a short note
            (``"done"``, ``"client gone"``, ``"error"``).
        request_id: for the generic error message.
        end: the last event (``[DONE]``; empty for llama.cpp-style streams, which have none).
    """

    def __init__(
        self,
        source: Iterable[dict[str, Any]],
        *,
        prefetched: Iterable[dict[str, Any]] = (),
        cancel: Callable[[], None] | None = None,
        on_chunk: Callable[[dict[str, Any]], None] | None = None,
        on_close: Callable[[str], None] | None = None,
        request_id: str = "",
        end: bytes = DONE,
    ) -> None:
        self._source = source
        self._cancel = cancel if cancel is not None else getattr(source, "close", None)
        self._iter: Iterator[bytes] = self._events(list(prefetched))
        self._on_chunk = on_chunk
        self._on_close = on_close
        self._request_id = request_id
        self._end = end
        self._completed = False
        self._failed = False
        self._closed = False
        self._lock = threading.Lock()

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> bytes:
        return next(self._iter)

    def _events(self, prefetched: list[dict[str, Any]]) -> Iterator[bytes]:
        try:
            for chunk in prefetched:
                yield self._frame(chunk)
            for chunk in self._source:
                yield self._frame(chunk)
        except Exception as ex:  # headers are out; the error becomes the last event
            self._failed = True
            if not isinstance(ex, FastpilotError) or ex.status >= 500:
                log.error("request %s: stream failed: %s", self._request_id, ex, exc_info=ex)
            yield error_event(ex, self._request_id)
        self._completed = True
        if self._end:
            yield self._end

    def _frame(self, chunk: dict[str, Any]) -> bytes:
        if self._on_chunk is not None:
            self._on_chunk(chunk)
        return encode_event(chunk)

    def close(self) -> None:
        """Cancel generation (if still running) and report once. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._cancel is not None:
                self._cancel()
        finally:
            if self._on_close is not None:
                note = "error" if self._failed else ("done" if self._completed else "client gone")
                self._on_close(note)
