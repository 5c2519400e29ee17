"""Typed domain errors. The API maps them to the OpenAI error envelope in one handler.

Each error carries what the envelope needs: the HTTP ``status``, the OpenAI
``type`` and ``code``, and the offending ``param`` when there is one.
"""

from __future__ import annotations


class FastpilotError(Exception):
    """Base of every typed error: a server error (500) unless a subclass says otherwise."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(FastpilotError):
    """A parameter has a bad value or type (400)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus max_tokens do not fit the model's context window (400)."""

    code = "context_length_exceeded"


class NotSupported(InvalidRequest):
    """The loaded model or backend cannot do what was asked (400)."""

    code = "not_supported"


class UnknownModel(FastpilotError):
    """No model of that name (404, only under --strict-models or for files)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class QueueFull(FastpilotError):
    """The model's bounded queue is full (429, with Retry-After)."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(
        self, message: str = "the model's queue is full; retry shortly", *, retry_after: int = 1
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelLoading(FastpilotError):
    """The models are still loading (503)."""

    status = 503
    code = "model_loading"


class Timeout(FastpilotError):
    """The request's deadline (its ``timeout`` or the server default) passed (504).

    Raised by ``Model.complete`` and while iterating a stream; a stream has
    already delivered the text generated before the deadline.
    """

    status = 504
    type = "timeout_error"
    code = "timeout"


class BackendError(FastpilotError):
    """The native library failed while generating (500; the server keeps serving)."""

    code = "backend_error"


class ModelFileError(FastpilotError):
    """A model file or directory is missing, truncated, corrupted or unverified."""

    code = "model_file_error"


class ConversionError(FastpilotError):
    """A checkpoint cannot be converted (missing files, wrong shapes, unknown architecture)."""

    code = "conversion_error"
