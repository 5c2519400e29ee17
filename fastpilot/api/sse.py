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
    return b"data: " + _JSON.encode(payload).encode("ascii") + b"\n\n"


# One encoder for every event: json.dumps with arguments builds a new one per call.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
# The stdlib's own string escaper (C): what the encoder writes for a str, byte for byte.
_quote = json.encoder.encode_basestring_ascii
_HEAD = ("id", "object", "created", "model")
_TEXT_CHUNK = (*_HEAD, "choices")
_TEXT_CHUNK_USAGE = (*_HEAD, "choices", "usage")
_TEXT_CHOICE = ("text", "index", "logprobs", "finish_reason")


class ChunkEncoder:
    """SSE events of one stream's chunks, the common shape without a generic JSON encoder.

    A text-completion chunk -- ``id, object, created, model, choices[, usage: null]``
    with one choice ``text, index, logprobs: null, finish_reason`` -- is written as
    its header (encoded once per stream) plus the escaped text, index and finish
    reason: the same bytes ``json.dumps(chunk, separators=(",", ":"),
    ensure_ascii=True)`` gives (``tests/test_sse_encoder.py`` checks it on nasty
    strings). Any other chunk (logprobs, chat, usage, errors) goes through the
    encoder. Not thread-safe: one per stream.
    """

    __slots__ = ("_key", "_head", "_tail")

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._head = b""
        self._tail = b""

    def __call__(self, chunk: Any) -> bytes:
        if type(chunk) is dict:
            keys = tuple(chunk)
            if keys == _TEXT_CHUNK or (keys == _TEXT_CHUNK_USAGE and chunk["usage"] is None):
                choices = chunk["choices"]
                if type(choices) is list and len(choices) == 1:
                    event = self._fast(chunk, choices[0], len(keys) == 6)
                    if event is not None:
                        return event
        return encode_event(chunk)

    def _fast(self, chunk: dict[str, Any], c: Any, usage: bool) -> bytes | None:
        if type(c) is not dict or tuple(c) != _TEXT_CHOICE or c["logprobs"] is not None:
            return None
        text, index, reason = c["text"], c["index"], c["finish_reason"]
        if type(text) is not str or type(index) is not int:
            return None
        if reason is None:
            finish = "null"
        elif type(reason) is str:
            finish = _quote(reason)
        else:
            return None
        key = (chunk["id"], chunk["object"], chunk["created"], chunk["model"], usage)
        if key != self._key:
            head = {k: chunk[k] for k in _HEAD}
            # '{"id":...,"model":"m"}' -> 'data: {"id":...,"model":"m","choices":[{"text":'
            self._head = b"data: " + _JSON.encode(head)[:-1].encode() + b',"choices":[{"text":'
            self._tail = b',"usage":null}\n\n' if usage else b"}\n\n"
            self._key = key
        return b"".join(
            (
                self._head,
                _quote(text).encode("ascii"),
                b',"index":%d,"logprobs":null,"finish_reason":' % index,
                finish.encode("ascii"),
                b"}]",
                self._tail,
            )
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
        self._encode = ChunkEncoder()

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
        return self._encode(chunk)

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
