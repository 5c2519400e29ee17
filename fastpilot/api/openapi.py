"""The OpenAPI 3.1 description of every route, served at ``GET /openapi.json``.

Written by hand (the routes are few and their request shapes come from
:mod:`fastpilot.engine.params`, not from a schema library), and kept honest by
``tests/test_openapi.py``: every route Falcon's router knows is documented with
exactly its methods, and nothing else is. The schemathesis run in
``tests/test_fuzz_http.py`` generates requests from it.

Every error, on every route, is the OpenAI envelope ``#/components/schemas/Error``.
"""

from __future__ import annotations

import json
from typing import Any

import falcon

from fastpilot.engine.params import wire_schema

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_ERROR_RESPONSE = {
    "description": "Error in the OpenAI envelope (400 bad value, 401 key, 403 host, "
    "404 route or strict model, 405 method, 413 body too large, 415 content type, "
    "429 queue full with Retry-After, 500 backend, 503 loading, 504 deadline).",
    "content": _json(_ref("Error")),
}

# Completion fields: generated from CompletionRequest's own field declarations, so the
# schema lists exactly what the parser reads (tests/test_openapi.py checks both ways).
_COMPLETION_FIELDS: dict[str, dict[str, Any]] = {
    "model": {"type": "string", "description": "Engine name; unknown names use the default."},
    **wire_schema(),
}
# Chat reads the same fields except these (the prompt is the rendered messages) ...
_NOT_IN_CHAT = ("prompt", "suffix", "echo", "best_of")
# ... and these of its own (Model._chat_request maps them onto the completion fields).
_CHAT_FIELDS: dict[str, dict[str, Any]] = {
    "max_completion_tokens": {
        "type": ["integer", "string", "null"],
        "description": "Chat's name for max_tokens.",
    },
    "top_logprobs": {
        "type": ["integer", "string", "null"],
        "description": "Alternatives per token when logprobs is true.",
    },
}

# The GET form: the same fields as query parameters (JSON text for objects).
_QUERY_FIELDS = list(_COMPLETION_FIELDS)

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "CompletionRequest": {
        "type": "object",
        "properties": _COMPLETION_FIELDS,
        "additionalProperties": True,  # Copilot's nwo, extra, feature_flags are ignored
    },
    "Usage": {
        "type": "object",
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "minItems": 1, "items": {"type": "object"}},
            "usage": _ref("Usage"),
        },
    },
    "Message": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant"]},
            "content": {"type": "string"},
        },
    },
    "ChatRequest": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {"type": "array", "items": _ref("Message")},
            **{k: v for k, v in _COMPLETION_FIELDS.items() if k not in _NOT_IN_CHAT},
            **_CHAT_FIELDS,
        },
    },
    "AskReply": {
        "type": "object",
        "required": ["reply"],
        "properties": {"reply": {"type": "string"}, "usage": _ref("Usage")},
    },
    "EmbeddingRequest": {
        "type": "object",
        "required": ["input"],
        "properties": {
            "model": {"type": "string"},
            "input": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}},
                    {"type": "array", "items": {"type": "integer"}},
                    {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                ]
            },
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        },
    },
    "Embeddings": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array"}},
    },
    "Model": {
        "type": "object",
        "required": ["id", "object"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["model", "engine"]},
            "created": {"type": "integer"},
            "context_length": {"type": ["integer", "null"]},
            "supports_fim": {"type": "boolean"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Model")},
        },
    },
    "TokenizeRequest": {
        "type": "object",
        "properties": {"model": {"type": "string"}, "prompt": {"type": "string"}},
    },
    "Tokenized": {
        "type": "object",
        "required": ["tokens", "count"],
        "properties": {
            "model": {"type": "string"},
            "tokens": {"type": "array", "items": {"type": "integer"}},
            "count": {"type": "integer"},
            "max_model_len": {"type": ["integer", "null"]},
        },
    },
    "DetokenizeRequest": {
        "type": "object",
        "required": ["tokens"],
        "properties": {
            "model": {"type": "string"},
            "tokens": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "Detokenized": {
        "type": "object",
        "required": ["text"],
        "properties": {"model": {"type": "string"}, "text": {"type": "string"}},
    },
    # llama.cpp server's /infill (fastpilot/api/infill.py says what each field does).
    "InfillRequest": {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "input_prefix": {"type": "string"},
            "input_suffix": {"type": "string"},
            "input_extra": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"filename": {"type": "string"}, "text": {"type": "string"}},
                },
            },
            "prompt": {"type": "string", "description": "Text after input_prefix."},
            "n_predict": {"type": "integer", "description": "-1: no limit; 0: warm up only."},
            "temperature": {"type": "number"},
            "top_k": {"type": "integer"},
            "top_p": {"type": "number"},
            "stop": {"type": ["string", "array"], "items": {"type": "string"}},
            "seed": {"type": "integer"},
            "stream": {"type": "boolean"},
            "cache_prompt": {"type": "boolean"},
            "id_slot": {"type": "integer"},
            "samplers": {"type": "array", "items": {"type": "string"}},
            "response_fields": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Infill": {
        "type": "object",
        "description": "All fields, or those response_fields names (keyed by their path).",
        "properties": {
            "content": {"type": "string"},
            "stop": {"type": "boolean"},
            "model": {"type": "string"},
            "tokens_predicted": {"type": "integer"},
            "tokens_evaluated": {"type": "integer"},
            "tokens_cached": {"type": "integer"},
            "truncated": {"type": "boolean"},
            "timings": {"type": "object"},
        },
    },
}


def _op(
    summary: str,
    ok: dict[str, Any],
    *,
    body: str | None = None,
    params: list[dict[str, Any]] | None = None,
    public: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": ok, "default": _ERROR_RESPONSE},
    }
    if body:
        op["requestBody"] = {"required": True, "content": _json(_ref(body))}
    if params:
        op["parameters"] = params
    if public:
        op["security"] = [{}]
    return op


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query_params() -> list[dict[str, Any]]:
    out = []
    for name in _QUERY_FIELDS:
        schema: dict[str, Any] = {"type": "string"}
        if name in ("logit_bias", "stream_options", "extra"):
            schema = {"type": "string", "description": "JSON text"}
        out.append({"name": name, "in": "query", "required": False, "schema": schema})
    return out


_COMPLETION_OK = {
    "description": "A completion; with stream=true, Server-Sent Events: one single-line "
    "`data: {json}` per chunk, then `data: [DONE]` (an error after the first event is "
    'sent as `data: {"error": ...}` before `[DONE]`).',
    "content": {
        **_json(_ref("Completion")),
        "text/event-stream": {"schema": {"type": "string"}},
    },
}


def _completion_path(summary: str, path_params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "post": _op(summary, _COMPLETION_OK, body="CompletionRequest", params=path_params or None),
        "get": _op(
            summary + " (query-string form, for browsers and curl)",
            _COMPLETION_OK,
            params=path_params + _query_params(),
        ),
    }


def _ok(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": _json(_ref(schema))}


def _compat_paths() -> dict[str, Any]:
    """Routes for clients of other servers: GitHub's API (Copilot) and llama.cpp's server."""
    obj = {"description": "OK", "content": _json({"type": "object"})}
    llama_body = {"required": True, "content": _json({"type": "object"})}
    tokenize = _op("Token ids, llama.cpp's or vLLM's names (content|prompt -> tokens)", obj)
    tokenize["requestBody"] = llama_body
    detokenize = _op("Text of token ids, llama.cpp's names (tokens -> content)", obj)
    detokenize["requestBody"] = llama_body
    return {
        "/copilot_internal/user": {"get": _op("Copilot account stub (no quotas)", obj)},
        "/models": {"get": _op("The models as GitHub's catalogue (Copilot)", obj)},
        "/embeddings/models": {"get": _op("Embedding models for Copilot: none", obj)},
        "/telemetry": {
            "get": _op("Copilot experiments: none", obj),
            "post": _op("Copilot telemetry events: counted and dropped", obj),
        },
        "/tokenize": {"post": tokenize},
        "/detokenize": {"post": detokenize},
        "/props": {"get": _op("llama.cpp-server properties (n_ctx, model, infill)", obj)},
        "/tokenizer_info": {"get": _op("Special tokens as text, vLLM's names (lm-eval)", obj)},
    }


def build_document(version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh dict; callers may change it)."""
    engine = [_path_param("engine")]
    paths: dict[str, Any] = {
        "/v1/engines/{engine}/completions": _completion_path(
            "Complete with an engine (legacy, Copilot, FauxPilot); the prompt is "
            "left-truncated to fit",
            engine,
        ),
        "/v1/completions": _completion_path(
            "Complete (OpenAI); a prompt that does not fit is 400 unless truncate=true", []
        ),
        "/v1/chat/completions": {
            "post": _op("Chat completion", _COMPLETION_OK, body="ChatRequest")
        },
        "/ask": {"post": _op("Answer a conversation", _ok("AskReply"), body="ChatRequest")},
        "/v1/embeddings": {
            "post": _op("Pooled hidden states", _ok("Embeddings"), body="EmbeddingRequest")
        },
        "/v1/models": {"get": _op("List models", _ok("ModelList"))},
        "/v1/engines": {"get": _op("List engines", _ok("ModelList"))},
        "/v1/engines/list": {"get": _op("List engines", _ok("ModelList"))},
        "/v1/models/{model_id}": {
            "get": _op("One model (exact name)", _ok("Model"), params=[_path_param("model_id")])
        },
        "/v1/engines/{engine}": {
            "get": _op("One engine (unknown names: the default)", _ok("Model"), params=engine)
        },
        "/infill": {
            "post": _op(
                "Fill in the middle, llama.cpp server's shape (models without FIM: 400)",
                {
                    "description": "the infill; with stream=true, one `data: {json}` per "
                    "event, the last with stop=true (no [DONE])",
                    "content": {
                        **_json(_ref("Infill")),
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                body="InfillRequest",
            )
        },
        "/v1/tokenize": {
            "post": _op(
                "Token ids with the model's tokenizer", _ok("Tokenized"), body="TokenizeRequest"
            )
        },
        "/v1/detokenize": {
            "post": _op("Text of token ids", _ok("Detokenized"), body="DetokenizeRequest")
        },
        "/copilot_internal/v2/token": {
            "get": _op(
                "Token stub for Copilot agents (not a credential)",
                {"description": "token", "content": _json({"type": "object"})},
            )
        },
        **_compat_paths(),
        "/health": {
            "get": _op(
                "Readiness: 200 when loaded, 503 while loading",
                {"description": "ready", "content": _json({"type": "object"})},
                public=True,
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics",
                {
                    "description": "text exposition",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
            )
        },
        "/": {
            "get": _op(
                "Playground page",
                {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
                public=True,
            )
        },
        "/openapi.json": {
            "get": _op(
                "This document",
                {"description": "OpenAPI 3.1", "content": _json({"type": "object"})},
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fastpilot",
            "version": version,
            "description": "Self-hosted code completion: the OpenAI completions API, the "
            "legacy engines API and the GitHub Copilot plugin's protocol.",
        },
        "servers": [
            {"url": "/"},
            {
                "url": "/k/{key}",
                "description": "API key as a path prefix (for clients that cannot set headers)",
                "variables": {"key": {"default": "KEY"}},
            },
        ],
        "security": [{}, {"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": json.loads(json.dumps(_SCHEMAS)),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


class OpenApi:
    """``GET /openapi.json``: the document above, rendered once."""

    def __init__(self, version: str = "0.1.0") -> None:
        self._body = json.dumps(build_document(version), separators=(",", ":")).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body
