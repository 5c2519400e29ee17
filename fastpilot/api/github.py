"""The GitHub-API answers Copilot's language server needs before it asks for a completion.

``@github/copilot-language-server`` (what the Copilot plugins for VS Code,
Neovim and JetBrains run) can be pointed at this server with
``GH_COPILOT_TOKEN=<anything>`` and ``GH_COPILOT_API_URL`` /
``GH_COPILOT_SERVER_URL``. It then calls, in order:

- ``GET copilot_internal/v2/token``: trades the GitHub token for a Copilot
  token whose ``endpoints`` say where everything else lives. We point every
  endpoint back here, keeping the ``/k/<key>/`` prefix the request came in
  on. The client resolves paths *relative* to those URLs (``new URL("telemetry",
  endpoints.telemetry)``), so each one ends in ``/``: without it, the last
  path segment -- the key -- would be dropped.
- ``GET copilot_internal/user``: the account; it reads the plan, the SKU and
  the quota snapshots (an absent snapshot means "no quota shown").
- ``GET models`` (GitHub's model catalogue; our completion models, so the
  client asks for ``/v1/engines/<our model>/completions``) and
  ``GET embeddings/models`` (none: this server has no GitHub embeddings API,
  so the client's codebase indexing stays off).
- ``GET telemetry`` (the experimentation service: no experiments) and
  ``POST telemetry`` (Application-Insights events: counted and dropped).

Every answer must carry ``x-github-request-id`` or the client refuses it as
"does not appear to originate from GitHub";
:class:`fastpilot.api.middleware.RequestLog` sets it on every response.
Nothing here is a credential: the token we hand out is an opaque label, and
the API keys (when configured) are checked by the ``/k/<key>/`` prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon

from fastpilot.api.parsing import loads_untrusted, read_body
from fastpilot.api.resolve import ModelResolver
from fastpilot.errors import InvalidRequest

# The tokenizer the client counts prompt tokens with; it ships only these two
# (dist/resources/*.tiktoken), and our models' own BPE is close to neither, so
# the client's budget is approximate and the engine route truncates exactly.
CLIENT_TOKENIZER = "cl100k_base"
USER_LOGIN = "fastpilot"


def base_url(req: falcon.Request) -> str:
    """This server's URL as the client reached it, with the key prefix and a trailing ``/``."""
    return req.prefix + getattr(req.context, "path_prefix", "") + "/"


class CopilotToken:
    """``GET /copilot_internal/v2/token``: a short-lived label and endpoints back to us."""

    def __init__(self, clock: Callable[[], float], lifetime: int = 3600) -> None:
        self._clock = clock
        self._lifetime = lifetime

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        now = int(self._clock())
        base = base_url(req)
        expires = now + self._lifetime
        resp.media = {
            # ";"-separated key=value pairs: the client parses it for feature flags.
            "token": f"tid=fastpilot;exp={expires};sku=fastpilot",
            "expires_at": expires,
            "refresh_in": self._lifetime // 2,
            "endpoints": {"api": base, "proxy": base, "origin-tracker": base, "telemetry": base},
            "chat_enabled": False,
            "annotations_enabled": False,
            "code_quote_enabled": False,
            "public_suggestions": "enabled",
            "sku": "fastpilot",
            "tracking_id": USER_LOGIN,
        }


class CopilotUser:
    """``GET /copilot_internal/user``: one plausible individual account without quotas."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        base = base_url(req)
        resp.media = {
            "login": USER_LOGIN,
            "access_type_sku": "fastpilot",
            "copilot_plan": "individual",
            "chat_enabled": False,
            "analytics_tracking_id": USER_LOGIN,
            "assigned_date": None,
            "can_signup_for_limited": False,
            "can_upgrade_plan": False,
            "organization_login_list": [],
            "organization_list": [],
            "restricted_telemetry": True,
            "token_based_billing": False,
            "endpoints": {"api": base, "proxy": base, "origin-tracker": base, "telemetry": base},
        }


def capi_model(name: str, model: Any) -> dict[str, Any]:
    """One entry of GitHub's ``/models`` catalogue for a completion model.

    The client validates the shape (id, name, version, model_picker_enabled,
    capabilities.{type,tokenizer,family,object}); an entry that fails makes it
    ignore the whole list and fall back to its built-in engine name, which
    still works here (unknown engine names mean the default model).
    """
    context = int(getattr(model, "context_length", 0) or 0)
    limits = {"max_context_window_tokens": context, "max_prompt_tokens": context}
    return {
        "id": name,
        "object": "model",
        "name": name,
        "version": name,
        "vendor": "fastpilot",
        "preview": False,
        "model_picker_enabled": False,
        "capabilities": {
            "type": "completion",
            "object": "model_capabilities",
            "family": name,
            "tokenizer": CLIENT_TOKENIZER,
            "limits": limits,
            "supports": {"streaming": True},
        },
    }


class CapiModels:
    """``GET /models``: the loaded models as GitHub's catalogue of completion models."""

    def __init__(self, resolver: ModelResolver) -> None:
        self._resolver = resolver

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        data = [capi_model(name, model) for name, model in self._resolver.listing()]
        resp.media = {"object": "list", "data": data}


class EmbeddingModels:
    """``GET /embeddings/models``: none, so the client never starts codebase indexing here."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"models": []}


class Telemetry:
    """``GET /telemetry`` (no experiments) and ``POST /telemetry`` (events dropped unread)."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # The experimentation service's answer: the client looks up Configs[Id="vscode"].
        resp.media = {
            "Features": [],
            "Flights": {},
            "Configs": [{"Id": "vscode", "Parameters": {}}],
            "ParameterGroups": [],
            "FlightingVersion": 0,
            "ImpressionId": "",
            "AssignmentContext": "",
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Application Insights' ingestion answer: a JSON array of events in, their
        # count back. Nothing is stored; the body is read (capped) so the
        # connection can be reused.
        raw = read_body(req, self._max_body)
        try:
            events = loads_untrusted(raw, "the telemetry body")
        except (InvalidRequest, ValueError):
            events = None
        count = len(events) if isinstance(events, list) else 1
        resp.media = {"itemsReceived": count, "itemsAccepted": count, "errors": []}
