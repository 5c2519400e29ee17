"""Request bookkeeping and access control, as Falcon middleware.

:class:`RequestLog` gives every request an id, times it, sets the
``x-request-id`` and ``openai-processing-ms`` headers, and writes one log line
plus the metrics when the response is done -- for a stream, when waitress
closes the body (the client read ``[DONE]`` or went away). The log line names
the path as asked (``/v1/engines/copilot-codex/completions``, never the key
prefix) and, when it differs from the model that answered, the model name the
client asked for (``asked=gpt-4``) and Copilot's ``OpenAI-Intent``
(``intent=copilot-ghost``); the metrics keep the route template, so
invented engine names cannot grow their label sets. Every response also
carries ``x-github-request-id`` (the same id): Copilot's language server
refuses GitHub-API answers without it.

:class:`Guard` enforces, in order: the ``Host`` check on a loopback bind
(DNS rebinding: a page on ``evil.example`` resolving to 127.0.0.1 sends
``Host: evil.example``), the ``/k/<key>/`` path prefix, and the API key.
Keys are compared with :func:`hmac.compare_digest` against every configured
key (no early exit), so timing does not reveal which key or how much of it
matched. ``/health`` and the playground page ``/`` need no key: neither
reveals anything, and the page asks for the key itself; every API call the
page makes is checked. CORS preflights (``OPTIONS`` with
``Access-Control-Request-Method``) pass when CORS is on, since browsers never
send credentials with them.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import falcon

from fastpilot.api.errors import ApiError
from fastpilot.api.metrics import Metrics

log = logging.getLogger("fastpilot.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# What of a path or a model name goes into a log line as is; the rest is %-escaped,
# so a crafted path cannot forge a line or a field.
_LOG_SAFE = re.compile(r"[^A-Za-z0-9._~/:@!$&'()*+,;=%\-]")
_LOG_MAX = 200
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
# Paths reachable without a key (after the /k/<key> prefix is removed).
OPEN_PATHS = frozenset({"/health", "/"})


@dataclass(slots=True)
class RequestRecord:
    """What the access log and the metrics say about one request; resources fill it in."""

    request_id: str
    started: float
    model: str | None = None
    requested: str | None = None
    intent: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_text: str | None = None
    streaming: bool = False
    note: str = ""
    finished: bool = False

    def add_usage(self, usage: dict | None) -> None:
        if not usage:
            return
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        self.cached_tokens = int(details.get("cached_tokens") or 0)


class RequestLog:
    """Request id, timing headers, one access-log line and metrics per request."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        timer: Callable[[], float] = time.perf_counter,
        new_id: Callable[[], str] | None = None,
        log_prompts: bool = False,
    ) -> None:
        self._metrics = metrics
        self._timer = timer
        self._new_id = new_id or (lambda: "req-" + uuid.uuid4().hex)
        self._log_prompts = log_prompts

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        given = req.get_header("X-Request-Id")
        request_id = given if given and _SAFE_ID.match(given) else self._new_id()
        req.context.request_id = request_id
        req.context.record = RequestRecord(
            request_id=request_id,
            started=self._timer(),
            # Copilot's ghost text vs its panel: worth a column when reading the log.
            intent=req.get_header("OpenAI-Intent"),
        )
        req.context.log_prompts = self._log_prompts

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict
    ) -> None:
        record: RequestRecord | None = getattr(req.context, "record", None)
        asked = params.get("engine") or params.get("model_id")
        if record is not None and isinstance(asked, str):
            record.requested = asked

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        record: RequestRecord | None = getattr(req.context, "record", None)
        if record is None:  # process_request never ran (Falcon-level failure)
            return
        resp.set_header("x-request-id", record.request_id)
        resp.set_header("x-github-request-id", record.request_id)
        resp.set_header("openai-processing-ms", str(int((self._timer() - record.started) * 1000)))
        if record.model:
            resp.set_header("openai-model", record.model)
        route = req.uri_template or "unmatched"
        # req.path has lost the /k/<key> prefix by now (Guard strips it), so no key is logged.
        path = _loggable(req.path)
        status = resp.status_code
        if record.streaming and resp.stream is not None:
            # The body is still being generated: the stream calls back when closed.
            req.context.finish_stream = lambda note="": self.finish(
                req.method, route, status, record, note, path=path
            )
            return
        self.finish(req.method, route, status, record, "", path=path)

    def finish(
        self,
        method: str,
        route: str,
        status: int,
        record: RequestRecord,
        note: str,
        *,
        path: str | None = None,
    ) -> None:
        """Write the access line and the metrics once per request."""
        if record.finished:
            return
        record.finished = True
        seconds = self._timer() - record.started
        self._metrics.observe(
            route,
            status,
            seconds,
            record.model,
            record.prompt_tokens,
            record.completion_tokens,
            record.cached_tokens,
        )
        parts = [
            record.request_id,
            f"{method} {path or route}",
            f"model={_loggable(record.model) if record.model else '-'}",
        ]
        if record.requested and record.requested != record.model:
            parts.append(f"asked={_loggable(record.requested)}")
        parts += [
            f"status={status}",
            f"prompt={record.prompt_tokens}",
            f"completion={record.completion_tokens}",
            f"cached={record.cached_tokens}",
            f"ms={seconds * 1000:.0f}",
        ]
        if record.intent:
            parts.append(f"intent={_loggable(record.intent)}")
        if record.streaming:
            parts.append("stream")
        if note or record.note:
            parts.append(note or record.note)
        if self._log_prompts and record.prompt_text is not None:
            parts.append("prompt_text=" + repr(record.prompt_text[:2000]))
        log.info(" ".join(parts))


def _loggable(text: str) -> str:
    """``text`` for one field of a log line: no spaces or control characters, bounded."""
    return _LOG_SAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), text)[
        :_LOG_MAX
    ]


def _host_name(host_header: str) -> str:
    """``Host`` without its port, lower-cased; ``[::1]:5000`` -> ``[::1]``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """Host check, ``/k/<key>`` prefix and API-key authentication."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str],
        check_host: bool,
        allowed_hosts: Iterable[str] = (),
        cors: bool = False,
    ) -> None:
        self._keys = tuple(k.encode("utf-8") for k in api_keys)
        self._check_host = check_host
        self._allowed = LOOPBACK_HOSTS | {_host_name(h) for h in allowed_hosts}
        self._cors = cors

    @property
    def auth_required(self) -> bool:
        return bool(self._keys)

    def key_ok(self, given: str) -> bool:
        """Constant-time comparison against every key (no short circuit)."""
        given_b = given.encode("utf-8")
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(key, given_b)
        return ok

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._check_host:
            host = _host_name(req.get_header("Host") or "")
            if host not in self._allowed:
                raise ApiError(
                    403,
                    f"Host {host!r} is not allowed for a server bound to loopback; "
                    "add it with --allowed-host if this is intended",
                    code="host_not_allowed",
                )
        req.context.path_prefix = ""
        authenticated = False
        if req.path.startswith("/k/"):
            _, _, rest = req.path[3:].partition("/")
            key = req.path[3:].split("/", 1)[0]
            # Without configured keys the prefix is accepted and dropped, so a client set
            # up with a prefix keeps working when keys are turned off.
            if self._keys and not self.key_ok(key):
                raise ApiError(
                    401, "invalid API key in the /k/<key> path prefix", code="invalid_api_key"
                )
            authenticated = True
            req.context.path_prefix = "/k/" + key
            req.path = "/" + rest
        if not self._keys or authenticated:
            return
        if req.path in OPEN_PATHS:
            return
        if (
            self._cors
            and req.method == "OPTIONS"
            and req.get_header("Access-Control-Request-Method")
        ):
            return
        auth = req.get_header("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>' "
                "or use the /k/<key>/ path prefix",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not self.key_ok(token.strip()):
            raise ApiError(
                401,
                "invalid API key",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
