"""The OpenAI error envelope, mapped once for every error the app can raise.

Three handlers, registered by :func:`install_error_handlers`:

- :class:`fastpilot.errors.FastpilotError` (domain errors) keep their status,
  type, code and param; ``QueueFull`` adds ``Retry-After``.
- Falcon's own :class:`falcon.HTTPError` (404 unknown route, 405 method, 413,
  415, 400 ...) is reshaped into the same envelope.
- Any other exception becomes a 500 with a generic message; the traceback
  goes to the log with the request id, never to the client.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon

from fastpilot.errors import FastpilotError, ModelLoading, QueueFull, Timeout

log = logging.getLogger("fastpilot.api")

# Falcon's status -> (OpenAI type, code) for errors Falcon raises itself.
_HTTP_CODES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    411: ("invalid_request_error", "length_required"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    421: ("invalid_request_error", "misdirected_request"),
    429: ("rate_limit_error", "rate_limited"),
}


class ApiError(falcon.HTTPError):
    """An HTTP error raised by the API layer itself, with an explicit OpenAI code/param."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(falcon.code_to_http_status(status), description=message, headers=headers)
        self.message = message
        self.api_code = code  # falcon.HTTPError.code is a numeric app code; keep ours apart
        self.param = param


def envelope(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _set_error(resp: falcon.Response, status: int, body: dict[str, Any]) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.media = body
    resp.content_type = falcon.MEDIA_JSON
    resp.stream = None
    resp.context.error_code = body["error"].get("code")


def handle_domain_error(
    req: falcon.Request, resp: falcon.Response, ex: FastpilotError, params: Any
) -> None:
    request_id = getattr(req.context, "request_id", "-")
    # A 503 while the models load is a state, not a failure: the access log has it.
    if ex.status >= 500 and not isinstance(ex, ModelLoading):
        log.error("request %s failed: %s: %s", request_id, type(ex).__name__, ex, exc_info=ex)
    if isinstance(ex, QueueFull):
        resp.set_header("Retry-After", str(max(1, int(ex.retry_after))))
    _set_error(resp, ex.status, public_error(ex, request_id))


def public_error(ex: FastpilotError, request_id: str) -> dict[str, Any]:
    """The envelope a client may see for ``ex``.

    A 5xx from the backend or a model file carries the native library's
    message, which can name server paths; the client gets a generic message
    with the request id (the detail is in the log). Our own 503/504 messages
    and every 4xx are sent as they are.
    """
    message = ex.message
    if ex.status >= 500 and not isinstance(ex, (ModelLoading, Timeout)):
        message = (
            f"the model failed while generating (request id {request_id}); "
            "the server log has the details"
        )
    return envelope(message, ex.type, ex.code, ex.param)


def handle_http_error(
    req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: Any
) -> None:
    status = int(ex.status_code)
    headers = dict(ex.headers or {})
    type_, code = _HTTP_CODES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    message = getattr(ex, "message", None) or ex.description or ex.title or "error"
    if status == 404 and not ex.description:
        message = f"no route for {req.method} {req.path}"
    elif status == 405 and not ex.description:
        allowed = headers.get("Allow", "")
        message = f"{req.method} is not allowed on {req.path}" + (
            f"; use {allowed}" if allowed else ""
        )
    code = getattr(ex, "api_code", None) or code
    param = getattr(ex, "param", None)
    for name, value in headers.items():
        resp.set_header(name, value)
    _set_error(resp, status, envelope(message, type_, code, param))


def handle_unexpected(
    req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any
) -> None:
    request_id = getattr(req.context, "request_id", "-")
    log.exception(
        "request %s: unexpected error on %s %s", request_id, req.method, req.path, exc_info=ex
    )
    _set_error(
        resp,
        500,
        envelope(
            f"internal server error (request id {request_id})", "server_error", "internal_error"
        ),
    )


def install_error_handlers(app: falcon.App) -> None:
    """Register the three handlers; Falcon picks the most specific class per exception."""
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(FastpilotError, handle_domain_error)
