"""Non-generating resources: listings, tokenizer, health, metrics, playground."""

from __future__ import annotations

from importlib import resources
from typing import Any

import falcon

from fastpilot.api.metrics import CONTENT_TYPE, Metrics
from fastpilot.api.resolve import ModelBodyResource, ModelResolver
from fastpilot.errors import InvalidRequest, ModelLoading

OWNER = "fastpilot"


def _model_fields(name: str, model: Any, created: int) -> dict[str, Any]:
    info = getattr(model, "info", None)
    out: dict[str, Any] = {
        "id": name,
        "created": created,
        "owned_by": OWNER,
        "context_length": getattr(model, "context_length", None),
        "supports_fim": bool(getattr(model, "supports_fim", False)),
    }
    if info is not None:
        for key in ("backend", "arch", "quantization", "device"):
            value = getattr(info, key, None) if not isinstance(info, dict) else info.get(key)
            if value:
                out[key] = value
        extra = getattr(info, "extra", None) if not isinstance(info, dict) else info
        if isinstance(extra, dict) and extra.get("kernels"):
            # llama.cpp: the context settings (flash attention, batch sizes, threads, KV
            # type), each with its source (user, calibrated, default, llama.cpp auto).
            out["kernels"] = extra["kernels"]
    return out


def model_object(name: str, model: Any, created: int) -> dict[str, Any]:
    return {"object": "model", **_model_fields(name, model, created)}


def engine_object(name: str, model: Any, created: int) -> dict[str, Any]:
    # The legacy engine object: "owner" and "ready" instead of "owned_by".
    fields = _model_fields(name, model, created)
    fields["owner"] = fields.pop("owned_by")
    return {"object": "engine", "ready": True, **fields}


class Listing:
    """``/v1/models``, ``/v1/engines`` and ``/v1/engines/list``."""

    def __init__(self, resolver: ModelResolver, created: int, *, engines: bool) -> None:
        self._resolver = resolver
        self._created = created
        self._shape = engine_object if engines else model_object

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        data = [self._shape(name, model, self._created) for name, model in self._resolver.listing()]
        resp.media = {"object": "list", "data": data}


class OneModel:
    """``/v1/models/{id}`` (exact name); ``/v1/engines/{id}`` (unknown -> default unless strict)."""

    def __init__(self, resolver: ModelResolver, created: int, *, engines: bool) -> None:
        self._resolver = resolver
        self._created = created
        self._engines = engines

    def on_get(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        model_id: str | None = None,
        engine: str | None = None,
    ) -> None:
        model_id = model_id if model_id is not None else engine
        if self._engines:
            model = self._resolver.get(model_id)
            resp.media = engine_object(model.name, model, self._created)
        else:
            model = self._resolver.get(model_id, strict=True)
            resp.media = model_object(model.name, model, self._created)


def _text_field(data: dict[str, Any]) -> str:
    for key in ("prompt", "text", "content", "input"):
        if key in data:
            value = data[key]
            if not isinstance(value, str):
                raise InvalidRequest(f"{key} must be a string", param=key)
            return value
    raise InvalidRequest(
        "send the text to tokenize as 'prompt' (or 'text'/'content')", param="prompt"
    )


class Tokenize(ModelBodyResource):
    """``POST /v1/tokenize``: exact ids and count with the model's own tokenizer."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data, model = self._body_and_model(req)
        ids = list(model.tokenize(_text_field(data)))
        resp.media = {
            "model": model.name,
            "tokens": ids,
            "count": len(ids),
            "max_model_len": model.context_length,
        }


class Detokenize(ModelBodyResource):
    """``POST /v1/detokenize``: ``{tokens: [ids]}`` -> ``{text}``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data, model = self._body_and_model(req)
        ids = data.get("tokens")
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise InvalidRequest("tokens must be a list of token ids", param="tokens")
        vocab = getattr(model, "vocab_size", None) or getattr(
            getattr(model, "backend", None), "vocab_size", None
        )
        if any(t < 0 or (vocab is not None and t >= vocab) for t in ids):
            raise InvalidRequest("tokens holds an id outside the vocabulary", param="tokens")
        text = model.detokenize(ids)
        resp.media = {"model": model.name, "text": text, "content": text}


class Health:
    """``GET /health``: 200 when every model is loaded, 503 while loading."""

    def __init__(self, resolver: ModelResolver) -> None:
        self._resolver = resolver

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._resolver.loading:
            raise ModelLoading("models are still loading")
        resp.media = {"status": "ok", "models": self._resolver.names()}


class MetricsResource:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE
        resp.data = self._metrics.render()


class Playground:
    """``GET /``: one self-contained HTML page (no build step, no CDN)."""

    def __init__(self, auth_required: bool) -> None:
        page = (
            resources.files("fastpilot.api")
            .joinpath("static/index.html")
            .read_text(encoding="utf-8")
        )
        self._page = page.replace(
            "__FASTPILOT_AUTH__", "true" if auth_required else "false"
        ).encode("utf-8")

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.set_header("Cache-Control", "no-cache")
        # The page inlines its script; forbid everything else (no third-party loads).
        resp.set_header(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; frame-ancestors 'none'",
        )
        resp.data = self._page
