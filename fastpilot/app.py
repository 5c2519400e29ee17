"""``create_app(settings, registry)``: the Falcon WSGI app, built from its collaborators.

No module-level state: everything a test swaps (the clock, the request-id
generator, the registry of models) is an argument. The same routes answer
under a ``/k/<key>`` path prefix (see :class:`fastpilot.api.middleware.Guard`).

Context fitting differs by route, as clients expect: the engine routes used by
Copilot and the legacy SDKs left-truncate long prompts; ``/v1/completions``
answers 400 ``context_length_exceeded`` unless the body says ``truncate: true``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import falcon

from fastpilot.api import completions, github, infill, info, llamacpp_compat, openapi
from fastpilot.api.errors import install_error_handlers
from fastpilot.api.metrics import Metrics
from fastpilot.api.middleware import Guard, RequestLog
from fastpilot.api.resolve import ModelResolver
from fastpilot.engine.params import ContextMode
from fastpilot.settings import Settings

EXPOSED_HEADERS = (
    "x-request-id",
    "x-github-request-id",
    "openai-processing-ms",
    "openai-model",
    "x-fastpilot-suffix",
)


def create_app(
    settings: Settings,
    registry: Any,
    *,
    clock: Callable[[], float] = time.time,
    timer: Callable[[], float] = time.perf_counter,
    new_request_id: Callable[[], str] | None = None,
    api_keys: tuple[str, ...] | None = None,
) -> falcon.App:
    """Build the app.

    Args:
        settings: server settings (caps, keys, host policy, CORS).
        registry: a :class:`fastpilot.models.Registry` (or anything with its
            ``get(name, strict=)``, ``names``, ``loading``).
        clock: wall clock for timestamps the app itself makes (token stub, listings).
        timer: monotonic timer for ``openai-processing-ms`` and latency metrics.
        new_request_id: id generator when the client sends no ``X-Request-Id``.
        api_keys: the keys, if already read (default: ``settings.api_keys()``,
            which reads ``--api-key-file`` now).
    """
    keys = settings.api_keys() if api_keys is None else api_keys
    resolver = ModelResolver(registry, strict=settings.strict_models)
    metrics = Metrics(resolver.models)
    guard = Guard(
        api_keys=keys,
        check_host=settings.is_loopback,
        allowed_hosts=settings.allowed_host,
        cors=bool(settings.cors_origin),
    )
    middleware: list[Any] = [
        RequestLog(metrics, timer=timer, new_id=new_request_id, log_prompts=settings.log_prompts),
        guard,
    ]
    if settings.cors_origin:
        middleware.append(
            falcon.CORSMiddleware(
                allow_origins=list(settings.cors_origin), expose_headers=list(EXPOSED_HEADERS)
            )
        )
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    app.resp_options.secure_cookies_by_default = True
    install_error_handlers(app)

    limits = settings.limits
    body = settings.max_body_bytes
    created = int(clock())

    engine_completions = completions.Completions(resolver, limits, body, ContextMode.TRUNCATE)
    openai_completions = completions.Completions(resolver, limits, body, ContextMode.ERROR)
    app.add_route("/v1/engines/{engine}/completions", engine_completions)
    app.add_route("/v1/completions", openai_completions)
    app.add_route("/v1/chat/completions", completions.Chat(resolver, body))
    app.add_route("/ask", completions.Ask(resolver, body))
    app.add_route("/v1/embeddings", completions.Embeddings(resolver, body))
    app.add_route("/infill", infill.Infill(resolver, limits, body))

    app.add_route("/v1/models", info.Listing(resolver, created, engines=False))
    app.add_route("/v1/engines", info.Listing(resolver, created, engines=True))
    app.add_route("/v1/engines/list", info.Listing(resolver, created, engines=True))
    app.add_route("/v1/models/{model_id}", info.OneModel(resolver, created, engines=False))
    app.add_route("/v1/engines/{engine}", info.OneModel(resolver, created, engines=True))
    app.add_route("/v1/tokenize", info.Tokenize(resolver, body))
    app.add_route("/v1/detokenize", info.Detokenize(resolver, body))
    # llama.cpp-server and vLLM names (llama.vim, lm-eval's remote tokenizer).
    app.add_route("/tokenize", llamacpp_compat.Tokenize(resolver, body))
    app.add_route("/detokenize", llamacpp_compat.Detokenize(resolver, body))
    app.add_route("/props", llamacpp_compat.Props(resolver))
    app.add_route("/tokenizer_info", llamacpp_compat.TokenizerInfo(resolver))
    # The GitHub API as Copilot's language server uses it (see fastpilot/api/github.py).
    app.add_route("/copilot_internal/v2/token", github.CopilotToken(clock))
    app.add_route("/copilot_internal/user", github.CopilotUser())
    app.add_route("/models", github.CapiModels(resolver))
    app.add_route("/embeddings/models", github.EmbeddingModels())
    app.add_route("/telemetry", github.Telemetry(body))
    app.add_route("/health", info.Health(resolver))
    app.add_route("/metrics", info.MetricsResource(metrics))
    app.add_route("/", info.Playground(auth_required=guard.auth_required))
    app.add_route("/openapi.json", openapi.OpenApi())
    return app
