"""Generation resources: completions (POST and GET, two routes), chat, ask, embeddings.

Each resource reads the request (JSON body or query string), resolves the
model, hands a validated request to the engine and shapes the reply. A
streamed reply pulls the first chunk before the headers go out, so an error
that happens before any text exists (queue full, context too long, deadline)
still gets its real status code instead of a 200 with an error event.

A waitress worker thread is held for the whole of a streamed response.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import Any

import falcon
import numpy as np

from fastpilot.api.middleware import RequestRecord
from fastpilot.api.parsing import json_body, query_mapping, query_pairs
from fastpilot.api.resolve import ModelBodyResource, ModelResolver, model_name
from fastpilot.api.sse import EventStream
from fastpilot.engine.coerce import coerce_bool
from fastpilot.engine.params import CompletionRequest, ContextMode, Limits
from fastpilot.errors import BackendError, InvalidRequest

SSE_TYPE = "text/event-stream; charset=utf-8"


def _record(req: falcon.Request) -> RequestRecord:
    return req.context.record


def _suffix_header(resp: falcon.Response, result: Any) -> None:
    """Say so when the prompt had a suffix the model could not use (no FIM template)."""
    ignored = getattr(result, "suffix_ignored", None)
    if ignored is None and isinstance(result, Mapping):
        ignored = result.get("suffix_ignored")
    if ignored:
        resp.set_header("x-fastpilot-suffix", "ignored")


def _check_choices(result: Mapping[str, Any]) -> None:
    if not result.get("choices") and result.get("object") != "list":
        # A 200 with nothing in it reads as "no suggestion" to clients; say it failed.
        raise BackendError("the model returned no choices")


def stream_response(
    req: falcon.Request,
    resp: falcon.Response,
    stream: Any,
) -> None:
    """Send ``stream`` (an iterator of chunk dicts with ``close()``) as SSE."""
    record = _record(req)
    iterator = iter(stream)
    prefetched: list[dict[str, Any]] = []
    try:
        prefetched.append(next(iterator))
    except StopIteration:
        pass
    except BaseException:
        closer = getattr(stream, "close", None)
        if closer is not None:
            closer()
        raise
    for chunk in prefetched:
        record.add_usage(chunk.get("usage"))

    def on_chunk(chunk: dict[str, Any]) -> None:
        if chunk.get("usage"):
            record.add_usage(chunk["usage"])

    def on_close(note: str) -> None:
        usage = getattr(stream, "usage", None)
        if callable(usage):  # CompletionStream.usage(): complete once iteration ended
            usage = usage()
        if isinstance(usage, Mapping):
            record.add_usage(dict(usage))
        finish = getattr(req.context, "finish_stream", None)
        if finish is not None:
            finish(note)

    record.streaming = True
    _suffix_header(resp, stream)
    resp.content_type = SSE_TYPE
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")  # tell nginx-style proxies not to buffer
    resp.stream = EventStream(
        iterator,
        prefetched=prefetched,
        cancel=getattr(stream, "close", None),
        on_chunk=on_chunk,
        on_close=on_close,
        request_id=record.request_id,
    )


class Completions:
    """``/v1/completions`` and ``/v1/engines/{engine}/completions``, POST and GET."""

    def __init__(
        self, resolver: ModelResolver, limits: Limits, max_body: int, mode: ContextMode
    ) -> None:
        self._resolver = resolver
        self._limits = limits
        self._max_body = max_body
        self._mode = mode

    def on_post(
        self, req: falcon.Request, resp: falcon.Response, engine: str | None = None
    ) -> None:
        self._run(req, resp, json_body(req, self._max_body), engine)

    def on_get(self, req: falcon.Request, resp: falcon.Response, engine: str | None = None) -> None:
        self._run(req, resp, query_mapping(query_pairs(req)), engine)

    def _run(
        self, req: falcon.Request, resp: falcon.Response, data: dict[str, Any], engine: str | None
    ) -> None:
        name = engine if engine is not None else model_name(data)
        model = self._resolver.get(name)
        record = _record(req)
        record.model, record.requested = model.name, name
        request = CompletionRequest.from_dict(data, limits=self._limits, context_mode=self._mode)
        if isinstance(request.prompt, str) and len(request.prompts) == 1:
            record.prompt_text = request.prompt
        if request.stream:
            stream_response(req, resp, model.stream(request))
            return
        result = model.complete(request)
        _check_choices(result)
        record.add_usage(result.get("usage"))
        _suffix_header(resp, result)
        resp.media = result


def _chat_params(data: Mapping[str, Any]) -> dict[str, Any]:
    """Body fields for ``Model.chat`` (validated there against the model's limits)."""
    return {k: v for k, v in data.items() if k not in ("messages", "model")}


class Chat(ModelBodyResource):
    """``POST /v1/chat/completions``: role-tagged prompt for base models, same sampling."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data, model = self._body_and_model(req)
        record = _record(req)
        messages = data.get("messages")
        params = _chat_params(data)
        # The same reading of "stream" as every other route ("stream": 1 streams).
        if coerce_bool(params.get("stream"), "stream", False):
            stream_response(req, resp, model.stream_chat(messages, **params))
            return
        result = model.chat(messages, **params)
        _check_choices(result)
        record.add_usage(result.get("usage"))
        resp.media = result


class Ask(ModelBodyResource):
    """``POST /ask``: ``{messages}`` -> ``{reply, usage}``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data, model = self._body_and_model(req)
        record = _record(req)
        params = _chat_params(data)
        params.pop("stream", None)
        result = model.ask(data.get("messages"), **params)
        record.add_usage(result.get("usage"))
        resp.media = result


class Embeddings(ModelBodyResource):
    """``POST /v1/embeddings``: ``input`` as a string, a list of strings or token ids."""

    def __init__(self, resolver: ModelResolver, max_body: int, max_inputs: int = 256) -> None:
        super().__init__(resolver, max_body)
        self._max_inputs = max_inputs

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data, model = self._body_and_model(req)
        record = _record(req)
        texts = _embedding_inputs(data.get("input"), model.detokenize, self._max_inputs)
        fmt = data.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise InvalidRequest(
                "encoding_format must be 'float' or 'base64'", param="encoding_format"
            )
        result = model.embed(texts)
        if fmt == "base64":
            # The openai SDK asks for base64 by default: little-endian float32 bytes.
            for item in result["data"]:
                vec = np.asarray(item["embedding"], dtype="<f4")
                item["embedding"] = base64.b64encode(vec.tobytes()).decode("ascii")
        record.add_usage(result.get("usage"))
        resp.media = result


def _embedding_inputs(value: Any, detokenize: Callable[[list[int]], str], limit: int) -> list[str]:
    def is_ids(v: Any) -> bool:
        return (
            isinstance(v, list)
            and bool(v)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        )

    if isinstance(value, str):
        items: list[str] = [value]
    elif is_ids(value):
        items = [detokenize(value)]
    elif isinstance(value, list) and value and all(isinstance(v, str) or is_ids(v) for v in value):
        items = [v if isinstance(v, str) else detokenize(v) for v in value]
    else:
        raise InvalidRequest(
            "input must be a string, a list of strings, or token ids (one list or a list of lists)",
            param="input",
        )
    if len(items) > limit:
        raise InvalidRequest(f"input may hold at most {limit} items", param="input")
    return items
