"""Run the app on waitress: load the models, listen, shut down cleanly.

waitress settings chosen for streaming completions (all in :class:`Settings`):

- ``threads``: every open stream holds one waitress worker thread until its
  last event, so the default is ``slots x models + 8``: enough to keep every
  generation slot busy plus a few for /health, listings and queued requests.
  Requests beyond that wait in waitress's own queue, before the model's.
- ``channel_timeout`` (300 s): idle keep-alive connections are closed after it;
  a stream that is producing tokens is never idle. ``cleanup_interval`` (how
  often waitress looks for idle channels) follows it: at most half of it.
- ``connection_limit`` (200): open sockets beyond it wait in the listen backlog.
- ``max_request_body_size``: twice ``--max-body-bytes``. The app refuses
  bodies over the cap itself with the JSON 413 envelope; waitress's limit is
  the backstop that stops it from buffering anything larger (its own 413 is
  plain text).
- ``channel_request_lookahead=1``: keeps the socket readable while a request
  runs, so a client that hangs up mid-stream is noticed at once and the next
  write raises ``ClientDisconnected``; waitress then closes the body, which
  cancels the generation and frees the slot.
- Output is not buffered: waitress 3 flushes every ``write`` to the socket
  as soon as it is made (``send_bytes`` is 1 since 3.0), so each SSE event
  leaves when its token is made (tests/test_e2e_stream.py measures it).

Shutdown: SIGINT (Ctrl-C) and SIGTERM stop accepting, let waitress finish,
close every model (stopping the backends' worker threads) and exit 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastpilot.loader import discover_models
from fastpilot.settings import Settings

log = logging.getLogger("fastpilot.serve")

DEFAULT_MODEL_NAME = "tiny-py"


def waitress_options(settings: Settings, n_models: int) -> dict[str, Any]:
    """The waitress adjustments for these settings (see the module docstring)."""
    return {
        "threads": settings.waitress_thread_count(n_models),
        "channel_timeout": settings.channel_timeout,
        # waitress looks for idle channels every cleanup_interval (30 s by default), so
        # an idle connection could outlive channel_timeout by that much.
        "cleanup_interval": max(1, min(30, int(settings.channel_timeout // 2) or 1)),
        "connection_limit": settings.connection_limit,
        "max_request_body_size": 2 * settings.max_body_bytes,
        "channel_request_lookahead": 1,
        "asyncore_use_poll": True,  # select() cannot watch fds above 1024
        "clear_untrusted_proxy_headers": True,
        "ident": "fastpilot",
    }


# -- models ----------------------------------------------------------------------------


def model_specs(settings: Settings) -> list[tuple[str, str]]:
    """(name, path or engine name) pairs to load, from ``--model`` or the models dir.

    Without ``--model``, every engine :func:`fastpilot.loader.discover_models` finds.
    """
    specs: list[tuple[str, str]] = []
    for item in settings.model:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"--model {item!r}: expected NAME=PATH or NAME")
        specs.append((name, path.strip() if sep else name))
    if not specs:
        specs = [(name, name) for name in discover_models(settings.models_dir)]
    return specs


def pick_default(settings: Settings, names: list[str]) -> str | None:
    """``--default-model``, else ``tiny-py`` when served, else the first name."""
    if settings.default_model:
        return settings.default_model
    if DEFAULT_MODEL_NAME in names:
        return DEFAULT_MODEL_NAME
    return names[0] if names else None


def ordered_specs(settings: Settings) -> list[tuple[str, str]]:
    """:func:`model_specs` with the default model first (the registry's default is the first).

    Raises:
        ValueError: ``--default-model`` names no configured model.
    """
    specs = model_specs(settings)
    default = pick_default(settings, [name for name, _ in specs])
    if specs and default not in {name for name, _ in specs}:
        raise ValueError(
            f"--default-model {default!r} is not among the served models: "
            + ", ".join(name for name, _ in specs)
        )
    return sorted(specs, key=lambda spec: spec[0] != default)


def backend_options(fmt: str, settings: Settings) -> dict[str, Any]:
    """``--slots``/``--max-queue`` (and llama.cpp's own flags) in each backend's own terms.

    llama.cpp decodes ``slots`` sequences in one context (one KV stream each) and
    takes ``--speculative``/``--draft-max``, ``--cache-reuse`` and the context's
    kernel settings (``--flash-attn``, ``--ubatch``, ``--threads-batch``,
    ``--kv-type``, ``--prefill-batch``, ``--short-lane``); CTranslate2 batches up to ``max_batch``
    sequences per ``generate_batch`` and ignores them.
    """
    if fmt == "gguf":
        return {
            "slots": settings.slots,
            "max_queue": settings.max_queue,
            "speculative": settings.speculative,
            "draft_max": settings.draft_max,
            "flash_attn": settings.flash_attn,
            "n_ubatch": settings.ubatch,
            "threads_batch": settings.threads_batch,
            "kv_type": settings.kv_type,
            "prefill_batch": settings.prefill_batch,
            "cache_reuse": settings.cache_reuse,
            "short_lane": settings.short_lane,
        }
    return {"max_batch": settings.slots, "max_queue": settings.max_queue}


def load_models(settings: Settings, registry: Any, *, say: Callable[[str], None] = print) -> None:
    """Load every configured model into ``registry``, printing each as it loads.

    Blocks for as long as loading takes (seconds per model on CPU). Raises
    whatever the loader raises (ModelFileError, UnknownModel ...).
    """
    from fastpilot.loader import load, resolve

    specs = ordered_specs(settings)
    if not specs:
        raise FileNotFoundError(
            f"no models to serve: nothing converted under {settings.models_dir}/ "
            "(run `make convert` or `fastpilot convert ...`), and no --model NAME=PATH given"
        )
    for name, path in specs:
        where, fmt, _ = resolve(
            path, device=settings.device, backend=settings.backend, models_dir=settings.models_dir
        )
        say(f"loading {name} from {where} ({fmt}) ...")
        model = load(
            where,
            name=name,
            backend=settings.backend,
            device=settings.device,
            threads=settings.threads,
            models_dir=settings.models_dir,
            default_timeout=settings.timeout,
            limits=settings.limits,
            trust_unverified=settings.trust_unverified_models,
            **backend_options(fmt, settings),
        )
        registry.add(name, model)
        info = getattr(model, "info", None)
        backend = getattr(model, "backend", None)
        kernels = getattr(backend, "kernels", None)
        lane = getattr(backend, "short_lane", None)
        say(
            f"loaded {name}: {getattr(info, 'backend', '?')} "
            f"{getattr(info, 'quantization', '') or ''} context {model.context_length}"
            + (f"; {kernels.summary()}" if kernels is not None else "")
            + (f"; {lane.summary()}" if lane is not None else "")
        )


# -- server ----------------------------------------------------------------------------


@dataclass
class RunningServer:
    """A waitress server serving in a background thread (tests, embedding)."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listening socket and every connection; join the thread."""
        close_server(self.server)
        self.thread.join(timeout)


def close_server(server: Any) -> None:
    """Stop waitress's workers and close every socket, so its loop (map now empty) ends.

    Called from a thread other than the loop's; an open stream's worker sees
    its channel closed at its next write and closes the body (cancelling it).
    """
    from waitress import wasyncore

    server.task_dispatcher.shutdown(timeout=2)
    wasyncore.close_all(server._map)


def create_server(app: Any, settings: Settings, n_models: int) -> Any:
    """A waitress server bound to ``settings.host:port`` (port 0 picks one); not yet serving."""
    from waitress import create_server as _create

    return _create(
        app, host=settings.host, port=settings.port, **waitress_options(settings, n_models)
    )


def start_in_thread(app: Any, settings: Settings, n_models: int = 1) -> RunningServer:
    """Bind and serve ``app`` in a daemon thread; returns once the socket listens."""
    server = create_server(app, settings, n_models)
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    return RunningServer(server, thread, server.effective_host, int(server.effective_port))


def run(settings: Settings, *, say: Callable[[str], None] = print) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code.

    Checks the settings (a public bind needs a key), listens at once so
    ``/health`` answers 503 while models load, loads them, serves, and on a
    signal closes the server and every model.
    """
    from fastpilot.app import create_app
    from fastpilot.settings import SettingsError

    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        settings.check()
        keys = settings.api_keys()
        specs = ordered_specs(settings)
    except (SettingsError, ValueError) as ex:
        print(f"fastpilot: {ex}", file=sys.stderr)
        return 2
    from fastpilot.models import Registry

    registry = Registry()
    registry.loading = True
    app = create_app(settings, registry, api_keys=keys)
    server = create_server(app, settings, max(1, len(specs)))
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serving = threading.Thread(target=server.run, name="waitress", daemon=True)
        serving.start()
        url = f"http://{settings.host}:{server.effective_port}"
        say(f"listening on {url} (models loading; /health answers 503 until ready)")
        try:
            load_models(settings, registry, say=say)
        except Exception as ex:  # noqa: BLE001 - report any loader failure and exit
            print(f"fastpilot: cannot load models: {ex}", file=sys.stderr)
            return 1
        registry.loading = False
        say(f"ready: {url}  models: {', '.join(registry.names())}  default: {specs[0][0]}")
        if keys:
            say(f"API keys required ({len(keys)} configured)")
        while not stop.is_set():
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        say("shutting down ...")
        close_server(server)
        registry.close_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
