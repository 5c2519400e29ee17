"""Engine/model name -> loaded model, with the server's strictness applied once.

Copilot invents engine names (``copilot-codex``, ``gpt-4o-copilot`` ...), so by
default an unknown name means the default model; ``--strict-models`` turns that
into 404 ``model_not_found``. While the registry is still loading, every
generation route answers 503 ``model_loading``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import falcon

from fastpilot.api.parsing import json_body
from fastpilot.errors import InvalidRequest, ModelLoading, UnknownModel


class ModelResolver:
    """Thin adapter over :class:`fastpilot.models.Registry` used by every resource."""

    def __init__(self, registry: Any, *, strict: bool) -> None:
        self.registry = registry
        self.strict = strict

    @property
    def loading(self) -> bool:
        value = getattr(self.registry, "loading", False)
        return bool(value() if callable(value) else value)

    def names(self) -> list[str]:
        value = self.registry.names
        return list(value() if callable(value) else value)

    def get(self, name: str | None, *, strict: bool | None = None) -> Any:
        """The model for ``name`` (``None``/empty: the default model).

        Raises:
            ModelLoading: the registry is still loading models.
            UnknownModel: strict and no model has that name, or no model at all.
        """
        self._require_loaded()
        return self.registry.get(name or None, strict=self.strict if strict is None else strict)

    def _require_loaded(self) -> None:
        if self.loading:
            raise ModelLoading("models are still loading; retry shortly")

    def listing(self) -> list[tuple[str, Any]]:
        """:meth:`models` for a listing route.

        Raises:
            ModelLoading: the registry is still loading models (a partial list would
                tell a client that a model it asked for does not exist).
        """
        self._require_loaded()
        return self.models()

    def models(self) -> list[tuple[str, Any]]:
        """(name, model) for every loaded model, for listings and metrics."""
        out = []
        for name in self.names():
            try:
                out.append((name, self.registry.get(name, strict=True)))
            except UnknownModel:  # closed between names() and get()
                continue
        return out


def model_name(data: Mapping[str, Any]) -> str | None:
    """The body's ``model`` field (``None`` when absent: the default model)."""
    name = data.get("model")
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidRequest("model must be a string", param="model")
    return name


class ModelBodyResource:
    """Base of the POST resources whose JSON body names the model to use."""

    def __init__(self, resolver: ModelResolver, max_body: int) -> None:
        self._resolver = resolver
        self._max_body = max_body

    def _body_and_model(self, req: falcon.Request) -> tuple[dict[str, Any], Any]:
        """Read the body (capped), resolve its model and note it in the access record."""
        data = json_body(req, self._max_body)
        asked = model_name(data)
        req.context.record.requested = asked
        model = self._resolver.get(asked)
        req.context.record.model = model.name
        return data, model
