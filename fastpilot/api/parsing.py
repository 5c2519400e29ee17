"""Turn a JSON body or a query string into the plain mapping the validators take.

Body policy (documented in the README and the settings help):

- ``Content-Type: application/json`` (any charset) or any ``+json`` type is parsed.
- No Content-Type at all is parsed as JSON too: raw HTTP clients often omit it,
  and a browser never does, so this opens no cross-site path.
- ``application/x-www-form-urlencoded`` (what ``curl -d`` sends), ``text/plain``
  and every other type get 415 with a message saying to send JSON. These are
  the types a web page can POST cross-site without a CORS preflight; refusing
  them keeps other sites from driving a local server through the browser.
- Bodies over the cap get 413, checked on ``Content-Length`` before reading and
  again while reading (chunked bodies have no length).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import falcon

from fastpilot.api.errors import ApiError
from fastpilot.errors import InvalidRequest

_READ_CHUNK = 64 * 1024

# Query-string values that are JSON text rather than scalars.
_JSON_QUERY_FIELDS = frozenset({"logit_bias", "stream_options", "extra", "messages", "input"})
# Deepest container nesting accepted in a JSON body (real requests use 3).
MAX_JSON_DEPTH = 64
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Query-string fields that may repeat and are lists.
_LIST_QUERY_FIELDS = frozenset({"stop"})


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"request body is larger than the {limit}-byte limit", code="request_too_large"
    )


def read_body(req: falcon.Request, limit: int) -> bytes:
    """Read the whole body, refusing more than ``limit`` bytes (413)."""
    length = req.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    stream = req.bounded_stream
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(_READ_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _is_json_type(content_type: str | None) -> bool:
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def loads_untrusted(raw: bytes | str, what: str, *, param: str | None = None) -> Any:
    """``json.loads`` for request input: every failure is InvalidRequest or JSONDecodeError.

    Plain ``json.loads`` lets three inputs escape as other exceptions (a 500):
    nesting deep enough to exhaust the C scanner's recursion (RecursionError),
    an integer literal over Python's 4300-digit limit (ValueError), and a lone
    UTF-16 surrogate escape such as ``"\\ud800"``, which decodes to a ``str``
    that no tokenizer can encode. Containers nested deeper than
    :data:`MAX_JSON_DEPTH` are refused too, so nothing downstream recurses on them.
    """
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise InvalidRequest(
            f"{what} is nested too deeply", param=param, code="invalid_json"
        ) from None
    except ValueError as ex:  # int digits limit; UnicodeDecodeError is a ValueError too
        if isinstance(ex, UnicodeDecodeError):
            raise
        raise InvalidRequest(
            f"{what} holds a number with too many digits", param=param, code="invalid_json"
        ) from None
    raw_bytes = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    # Only \\uD800-\\uDFFF escapes can produce a lone surrogate: skip the string scan without them.
    _check_tree(data, what, param, surrogates=_SURROGATE_ESCAPE.search(raw_bytes) is not None)
    return data


def _check_tree(data: Any, what: str, param: str | None, *, surrogates: bool) -> None:
    """Iterative walk (no recursion): container depth, and lone surrogates when asked."""

    def refuse(problem: str) -> InvalidRequest:
        return InvalidRequest(f"{what} {problem}", param=param, code="invalid_json")

    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise refuse("holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise refuse(f"is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            if surrogates and any(_SURROGATE.search(key) for key in node):
                raise refuse("holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
            values: Iterable[Any] = node.values()
        else:
            values = node
        for value in values:
            if isinstance(value, (dict, list)) or (surrogates and isinstance(value, str)):
                stack.append((value, depth + 1))


def json_body(req: falcon.Request, limit: int) -> dict[str, Any]:
    """The request's JSON object. 415 for a non-JSON type, 400 for bad JSON or a non-object."""
    if not _is_json_type(req.content_type):
        media = (req.content_type or "").split(";", 1)[0]
        hint = " (curl -d sends that; use --json or -H 'Content-Type: application/json')"
        raise ApiError(
            415,
            f"send the body as JSON with Content-Type: application/json, not {media}"
            + (hint if media == "application/x-www-form-urlencoded" else ""),
            code="unsupported_media_type",
        )
    raw = read_body(req, limit)
    if not raw.strip():
        raise InvalidRequest(
            "the request body is empty; send a JSON object", param=None, code="invalid_json"
        )
    try:
        data = loads_untrusted(raw, "the request body")
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not UTF-8 text", code="invalid_json") from None
    except json.JSONDecodeError as ex:
        raise InvalidRequest(
            f"the request body is not valid JSON: {ex.msg} at line {ex.lineno} column {ex.colno}",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"the request body must be a JSON object, got {type(data).__name__}",
            code="invalid_json",
        )
    return data


def query_mapping(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The GET form of a request as a mapping the validators accept.

    Values stay strings (the validators coerce ``"false"``, ``"0.2"``, ``"32"``);
    ``stop`` may repeat and becomes a list; ``logit_bias`` and ``stream_options``
    are JSON text. Any other repeated key is an error rather than a silent pick.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in _LIST_QUERY_FIELDS:
            out.setdefault(key, []).append(value)
            continue
        if key in out:
            raise InvalidRequest(f"{key} is given more than once in the query string", param=key)
        if key in _JSON_QUERY_FIELDS:
            try:
                out[key] = loads_untrusted(value, key, param=key)
            except json.JSONDecodeError:
                raise InvalidRequest(
                    f"{key} must be JSON text in the query string", param=key
                ) from None
        else:
            out[key] = value
    return out


def query_pairs(req: falcon.Request) -> list[tuple[str, str]]:
    """Decoded (key, value) pairs in order, keeping repeats and blank values."""
    from urllib.parse import parse_qsl

    try:
        return parse_qsl(
            req.query_string, keep_blank_values=True, strict_parsing=False, errors="strict"
        )
    except UnicodeDecodeError:
        raise InvalidRequest("the query string is not valid UTF-8") from None
