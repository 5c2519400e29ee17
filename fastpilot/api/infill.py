"""``POST /infill``: llama.cpp server's fill-in-the-middle route, for llama.vim and llama.vscode.

The body is llama.cpp's: ``input_prefix``, ``input_suffix``, ``input_extra``
(``[{filename, text}]``, repository context), ``prompt`` (text after the prefix:
the current line up to the cursor), ``n_predict`` (``-1``: as many as the
context allows, capped by ``--max-tokens``; ``0``: evaluate and cache the
prompt only, the editors' background warm-up), ``temperature``, ``top_k``,
``top_p``, ``stop``, ``seed`` (``-1``: random), ``stream``, and
``n_indent`` and ``t_max_predict_ms`` (the engine's editor stops: a new line
indented less than ``n_indent`` columns ends the text; past ``t_max_predict_ms``
the text ends at the next newline), and
``cache_prompt``/``id_slot``/``samplers``/``t_max_prompt_ms`` (type-checked,
not acted on: the prompt cache is always on and slots are chosen by the
backend). Sampling
defaults are llama.cpp's (temperature 0.8, top_k 40, top_p 0.95).

The resource only translates: the engine renders the infill prompt in the
model's own format (:mod:`fastpilot.engine.fim`) and fits it to the context.

The answer has llama.cpp's fields: ``content``, ``stop``, ``model``,
``tokens_predicted``, ``tokens_evaluated`` (prompt tokens, as llama.cpp counts
them), ``tokens_cached`` (of those, served from the prompt cache),
``truncated``, and ``timings`` (``prompt_n`` = prompt tokens evaluated this
time, ``prompt_ms`` = submission to first token, ``predicted_*``).
``response_fields`` (``["content", "timings/prompt_n"]``) selects fields by
``/``-separated path and answers them under the path as key, as llama.cpp does.
Streamed (``stream: true``), each event is ``{index, content, tokens, stop: false,
id_slot, tokens_predicted, tokens_evaluated}`` and the last one carries
``stop: true`` with the totals; there is no ``[DONE]`` line (llama.cpp sends none).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from typing import Any

import falcon

from fastpilot.api.parsing import json_body
from fastpilot.api.resolve import ModelResolver, model_name
from fastpilot.api.sse import EventStream
from fastpilot.engine.fim import ContextFile
from fastpilot.engine.infill import warm
from fastpilot.engine.params import CompletionRequest, ContextMode, Limits
from fastpilot.errors import InvalidRequest, NotSupported

SSE_TYPE = "text/event-stream; charset=utf-8"
MAX_EXTRA = 256  # input_extra chunks per request (llama.vim keeps a ring of 16)

# llama.cpp's sampling defaults (common/common.h), used when the body omits them.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string, got {type(value).__name__}", param=key)
    return value


def _extra(value: Any) -> tuple[ContextFile, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest(
            "input_extra must be a list of {filename, text} objects", param="input_extra"
        )
    if len(value) > MAX_EXTRA:
        raise InvalidRequest(
            f"input_extra may hold at most {MAX_EXTRA} chunks, got {len(value)}",
            param="input_extra",
        )
    out = []
    for item in value:
        if not isinstance(item, Mapping):
            raise InvalidRequest(
                "each input_extra item must be an object with filename and text",
                param="input_extra",
            )
        text, name = item.get("text", ""), item.get("filename", "tmp")
        if not isinstance(text, str) or not isinstance(name, str):
            raise InvalidRequest(
                "input_extra filename and text must be strings", param="input_extra"
            )
        out.append(ContextFile(name, text))
    return tuple(out)


def _paths(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise InvalidRequest("response_fields must be a list of strings", param="response_fields")
    return value


def _accepted(data: Mapping[str, Any]) -> None:
    """Type-check the fields that are accepted but change nothing here."""
    for key in ("cache_prompt",):
        if key in data and not isinstance(data[key], bool):
            raise InvalidRequest(f"{key} must be a boolean", param=key)
    for key in ("id_slot", "t_max_prompt_ms"):
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise InvalidRequest(f"{key} must be an integer", param=key)
    samplers = data.get("samplers")
    if samplers is not None and (
        not isinstance(samplers, list) or not all(isinstance(s, str) for s in samplers)
    ):
        raise InvalidRequest("samplers must be a list of strings", param="samplers")


def parse(data: Mapping[str, Any], limits: Limits) -> CompletionRequest:
    """The engine request for an ``/infill`` body. Raises InvalidRequest naming the field."""
    if not isinstance(data, Mapping):
        raise InvalidRequest("the request body must be a JSON object", param=None)
    _accepted(data)
    prefix = _str(data, "input_prefix") + _str(data, "prompt")
    suffix = _str(data, "input_suffix")
    files = _extra(data.get("input_extra"))
    n_predict = data.get("n_predict", -1)
    if isinstance(n_predict, bool) or not isinstance(n_predict, int):
        raise InvalidRequest("n_predict must be an integer", param="n_predict")
    if n_predict > limits.max_tokens:
        raise InvalidRequest(
            f"n_predict must be at most {limits.max_tokens}, got {n_predict}", param="n_predict"
        )
    seed = data.get("seed")
    fields: dict[str, Any] = {
        key: data[key]
        for key in ("temperature", "top_k", "top_p", "stop", "n_indent", "t_max_predict_ms")
        if key in data
    }
    fields = {**DEFAULTS, **fields}
    top_k = fields["top_k"]
    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k < 0:
        fields["top_k"] = 0  # llama.cpp: top_k <= 0 keeps the whole vocabulary
    fields["seed"] = None if seed in (None, -1) else seed
    fields["prompt"] = prefix
    fields["suffix"] = suffix
    fields["max_tokens"] = limits.max_tokens if n_predict < 0 else n_predict
    fields["stream"] = data.get("stream", False)
    request = CompletionRequest.from_dict(fields, limits=limits, context_mode=ContextMode.TRUNCATE)
    return dataclasses.replace(request, infill=True, context_files=files)


def select(result: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """llama.cpp's ``response_fields``: each ``a/b`` path's value under the key ``"a/b"``."""
    if not paths:
        return result
    out: dict[str, Any] = {}
    for path in paths:
        node: Any = result
        for key in path.split("/"):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            out[path] = node
    return out


def timings(
    prompt_n: int, cached: int, prompt_s: float, predicted_n: int, predicted_s: float
) -> dict[str, float]:
    """llama.cpp's ``timings`` object; per-token and per-second values from the same numbers."""
    p_ms, g_ms = prompt_s * 1e3, predicted_s * 1e3
    return {
        "cache_n": cached,
        "prompt_n": prompt_n,
        "prompt_ms": p_ms,
        "prompt_per_token_ms": p_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / prompt_s if prompt_n and prompt_s > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": g_ms,
        "predicted_per_token_ms": g_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": predicted_n / predicted_s
        if predicted_n and predicted_s > 0
        else 0.0,
    }


class Infill:
    """``POST /infill`` (and ``/k/<key>/infill``)."""

    def __init__(self, resolver: ModelResolver, limits: Limits, max_body: int) -> None:
        self._resolver = resolver
        self._limits = limits
        self._max_body = max_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data = json_body(req, self._max_body)
        model = self._resolver.get(model_name(data))
        record = req.context.record
        record.model = model.name
        request = parse(data, self._limits)
        if not model.supports_fim:
            raise NotSupported(
                f"model {model.name!r} cannot fill in the middle: it has no FIM tokens or "
                "template (serve a FIM-capable model, e.g. a Qwen2.5-Coder or StarCoder2 GGUF)",
                param="model",
            )
        paths = _paths(data.get("response_fields"))
        if isinstance(request.prompt, str):
            record.prompt_text = request.prompt
        base = {"index": 0, "id_slot": -1, "model": model.name}
        if request.max_tokens == 0:
            w = warm(model, request)
            record.add_usage(
                {
                    "prompt_tokens": w.prompt_tokens,
                    "prompt_tokens_details": {"cached_tokens": w.cached_tokens},
                }
            )
            resp.media = select(
                {
                    **base,
                    "content": "",
                    "tokens": [],
                    "stop": True,
                    "tokens_predicted": 0,
                    "tokens_evaluated": w.prompt_tokens,
                    "tokens_cached": w.cached_tokens,
                    "truncated": w.truncated > 0,
                    "timings": timings(
                        w.prompt_tokens - w.cached_tokens, w.cached_tokens, w.seconds, 0, 0.0
                    ),
                },
                paths,
            )
            return
        started = time.perf_counter()
        stream = model.stream(request)
        events = _events(stream, base, started)
        if request.stream:
            first = next(events)  # errors before any text still get their status
            record.streaming = True
            resp.content_type = SSE_TYPE
            resp.set_header("Cache-Control", "no-cache")
            resp.stream = EventStream(
                _chain(first, events, paths),
                cancel=stream.close,
                on_close=lambda note: record.add_usage(stream.usage()),
                request_id=record.request_id,
                end=b"",
            )
            return
        parts: list[str] = []
        final: dict[str, Any] = {}
        try:
            for event in events:
                parts.append(event["content"])
                if event["stop"]:
                    final = event
        finally:
            stream.close()
        record.add_usage(stream.usage())
        resp.media = select({**final, "content": "".join(parts)}, paths)


def _chain(
    first: dict[str, Any], rest: Iterator[dict[str, Any]], paths: list[str]
) -> Iterator[dict[str, Any]]:
    yield first if not first["stop"] else select(first, paths)
    for event in rest:
        yield event if not event["stop"] else select(event, paths)


def _events(stream: Any, base: dict[str, Any], started: float) -> Iterator[dict[str, Any]]:
    """llama.cpp-shaped events from a completion stream; the last has ``stop: true``."""
    prompt = int(stream.prompt_tokens)
    first_at: float | None = None
    for chunk in stream:
        if first_at is None:
            first_at = time.perf_counter()
        choice = chunk["choices"][0] if chunk.get("choices") else None
        if choice is None:
            continue
        generated = stream.usage()["completion_tokens"]
        if choice["text"]:
            yield {
                **base,
                "content": choice["text"],
                "tokens": [],
                "stop": False,
                "tokens_predicted": generated,
                "tokens_evaluated": prompt,
            }
    end = time.perf_counter()
    usage = stream.usage()
    cached = int(usage["prompt_tokens_details"]["cached_tokens"])
    predicted = int(usage["completion_tokens"])
    first = first_at if first_at is not None else end
    yield {
        **base,
        "content": "",
        "tokens": [],
        "stop": True,
        "tokens_predicted": predicted,
        "tokens_evaluated": prompt,
        "tokens_cached": cached,
        "truncated": stream.truncated > 0,
        "timings": timings(prompt - cached, cached, first - started, predicted, end - first),
    }
