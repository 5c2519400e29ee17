"""A small timing HTTP client: one request, its time to first token, end-to-end time, tokens.

Stdlib ``http.client`` only, one connection per request (the harness runs on loopback,
so connection setup is tens of microseconds and is charged equally to every contender).
Streams are read line by line as the Copilot plugin does: every ``data:`` line is JSON
on its own, ``[DONE]`` ends the stream.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

__all__ = ["Call", "Result", "send"]


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request as a contender wants it (built by the contender's adapter)."""

    method: str  # "POST" or "GET"
    path: str  # with the query string for GET
    body: dict | None
    stream: bool

    @staticmethod
    def get(path: str, params: dict) -> Call:
        """A GET with ``params`` in the query string (booleans as "true"/"false")."""
        q = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items()}
        return Call("GET", f"{path}?{urlencode(q, doseq=True)}", None, False)


@dataclass(frozen=True, slots=True)
class Result:
    """What one request measured. Times are seconds from just before the request was sent."""

    ok: bool
    status: int
    ttft: float | None  # first non-empty text (streams) or None (non-streamed)
    e2e: float  # until [DONE] / end of body
    tokens: int  # completion tokens (see token_source)
    token_source: str  # "usage" (server-reported), "events" (non-empty SSE events)
    text: str
    finish_reason: str | None
    done: bool  # stream ended with [DONE] (always True for a complete non-streamed body)
    error: str | None = None
    event_times: tuple[float, ...] = field(default=())  # arrival of each non-empty event


def _choice_text(obj: dict) -> tuple[str, str | None]:
    """Text and finish_reason of an OpenAI completion chunk or llama-server /completion chunk."""
    choices = obj.get("choices")
    if choices:
        c = choices[0]
        return c.get("text") or "", c.get("finish_reason")
    if "content" in obj:  # llama-server native /completion
        return obj.get("content") or "", obj.get("stop_type") if obj.get("stop") else None
    return "", None


def _usage_tokens(obj: dict) -> int | None:
    usage = obj.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        return int(usage["completion_tokens"])
    if "tokens_predicted" in obj:  # llama-server native
        return int(obj["tokens_predicted"])
    return None


def send(port: int, call: Call, timeout: float = 300.0) -> Result:
    """Send ``call`` to 127.0.0.1:port and time it. Never raises for HTTP/network errors.

    Blocks the calling thread for the whole request; run concurrent clients on threads.
    """
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Accept": "text/event-stream" if call.stream else "application/json"}
        body = None
        if call.body is not None:
            body = json.dumps(call.body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(call.method, call.path, body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            detail = resp.read(2000).decode(errors="replace")
            return Result(
                False,
                resp.status,
                None,
                time.perf_counter() - t0,
                0,
                "none",
                "",
                None,
                False,
                detail,
            )
        if not call.stream:
            raw = resp.read()
            e2e = time.perf_counter() - t0
            obj = json.loads(raw)
            text, finish = _choice_text(obj)
            n = _usage_tokens(obj)
            return Result(
                True,
                200,
                None,
                e2e,
                n or 0,
                "usage" if n is not None else "none",
                text,
                finish,
                True,
            )
        return _read_stream(resp, t0)
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as ex:
        return Result(
            False, 0, None, time.perf_counter() - t0, 0, "none", "", None, False, repr(ex)
        )
    finally:
        conn.close()


def _read_stream(resp: http.client.HTTPResponse, t0: float) -> Result:
    parts: list[str] = []
    times: list[float] = []
    ttft: float | None = None
    finish: str | None = None
    usage: int | None = None
    done = False
    error: str | None = None
    while True:
        line = resp.readline()
        if not line:
            break
        s = line.decode("utf-8", errors="replace").strip()
        if not s.startswith("data:"):
            continue
        payload = s[5:].strip()
        if payload == "[DONE]":
            done = True
            break
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError:
            error = f"bad event: {payload[:200]}"
            continue
        if "error" in obj:
            error = json.dumps(obj["error"])[:500]
            continue
        text, fr = _choice_text(obj)
        now = time.perf_counter() - t0
        if text:
            if ttft is None:
                ttft = now
            parts.append(text)
            times.append(now)
        if fr:
            finish = fr
        u = _usage_tokens(obj)
        if u is not None:
            usage = u
        if obj.get("stop") is True and "content" in obj:  # llama-server native: last chunk
            done = True
            break
    e2e = time.perf_counter() - t0
    tokens, source = (usage, "usage") if usage is not None else (len(times), "events")
    ok = error is None and (done or finish is not None)
    return Result(
        ok, 200, ttft, e2e, tokens, source, "".join(parts), finish, done, error, tuple(times)
    )
