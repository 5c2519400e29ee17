"""One frozen settings object for the server: CLI flag > ``FASTPILOT_<NAME>`` env > default.

Every field carries its help text and its environment variable in its metadata;
:func:`build_parser` generates the ``fastpilot serve`` argument parser from the
fields, and :func:`load_settings` merges the three sources once, at start-up.
Nothing here imports Falcon or a backend, so the CLI stays fast to start.

The waitress fields matter for streaming: each streamed completion holds one
waitress worker thread for its whole duration, so ``waitress_threads`` must
exceed the generation slots of all models (the default is ``slots * models + 8``)
or streams queue behind each other before reaching the model's own queue.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fastpilot.engine.params import Limits

ENV_PREFIX = "FASTPILOT_"
DEFAULT_MAX_BODY = 4 * 1024 * 1024  # 4 MiB: a 1500-token Copilot prompt is ~10 KiB
SPECULATIVE = ("off", "ngram")  # --speculative choices (the llama.cpp backend's)
FLASH_ATTN = ("auto", "on", "off")  # --flash-attn (fastpilot.backends.llamacpp_tuning)
KV_TYPES = ("f16", "q8_0")  # --kv-type (the llama.cpp backend's KV cache types)


class SettingsError(ValueError):
    """The settings are inconsistent or unsafe; the message says how to fix them."""


def _opt(
    help: str, *, kind: str = "str", flag: str | None = None, metavar: str | None = None
) -> dict:
    """Metadata of one setting: its help, how to parse it, and its CLI flag (default: --name)."""
    return {"help": help, "kind": kind, "flag": flag, "metavar": metavar}


@dataclass(frozen=True, slots=True)
class Settings:
    """Server settings. Build with :func:`load_settings`; tests may construct directly."""

    host: str = field(
        default="127.0.0.1",
        metadata=_opt(
            "Address to bind. A non-loopback address needs --api-key (or --api-key-file) "
            "unless --insecure-public is given."
        ),
    )
    port: int = field(
        default=5000, metadata=_opt("TCP port to listen on (0 picks a free one).", kind="int")
    )
    model: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "Model to serve as NAME=PATH (repeatable; PATH is a converted model directory, "
            "or NAME alone for models/NAME). With none, every converted model under "
            "--models-dir is served.",
            kind="list",
            metavar="NAME=PATH",
        ),
    )
    default_model: str | None = field(
        default=None,
        metadata=_opt(
            "Model that answers unknown engine names and requests without a model "
            "(default: tiny-py if served, else the first model)."
        ),
    )
    models_dir: str = field(default="models", metadata=_opt("Directory holding converted models."))
    backend: str | None = field(
        default=None,
        metadata=_opt(
            "Force a backend (ctranslate2 or llamacpp); default: from the model's format."
        ),
    )
    device: str = field(default="cpu", metadata=_opt("Device to run on: cpu or cuda."))
    threads: int | None = field(
        default=None,
        metadata=_opt(
            "CPU threads per model for compute (default: the backend's choice).", kind="int"
        ),
    )
    slots: int = field(
        default=4,
        metadata=_opt(
            "Generation slots per model: sequences decoded together in one batch.", kind="int"
        ),
    )
    speculative: str = field(
        default="ngram",
        metadata=_opt(
            "Speculative decoding for llama.cpp models: ngram (the default: draft tokens "
            "by matching the last tokens against the prompt and output, verify them in "
            "the same batch; output unchanged; each draft only as long as the measured "
            "acceptance and decode cost make it pay, none while more than three streams "
            "decode), or off. CTranslate2 models ignore it."
        ),
    )
    draft_max: int = field(
        default=32,
        metadata=_opt(
            "Most tokens one sequence drafts per step with --speculative ngram (the "
            "length adapts within 0..this; each slot of the batch grows by it for up to "
            "three speculating streams). CTranslate2 models ignore it.",
            kind="int",
        ),
    )
    flash_attn: str = field(
        default="auto",
        metadata=_opt(
            "Flash attention for llama.cpp models: auto (on CPU, decode steps are timed "
            "with it on and off once per model file and machine, at load, and the faster "
            "is kept -- on unless off is 5 percent faster; cached under "
            "~/.cache/fastpilot/kernels; with GPU offload, llama.cpp's own choice), on, "
            "or off. /v1/models reports "
            "the choice and its source. CTranslate2 models ignore it."
        ),
    )
    ubatch: int | None = field(
        default=None,
        metadata=_opt(
            "llama.cpp micro-batch (n_ubatch): prompt tokens per matrix pass (default 512, "
            "llama.cpp's; at most the batch). CTranslate2 models ignore it.",
            kind="int",
        ),
    )
    threads_batch: int | None = field(
        default=None,
        metadata=_opt(
            "CPU threads for prompt evaluation in llama.cpp models (default: --threads).",
            kind="int",
        ),
    )
    kv_type: str | None = field(
        default=None,
        metadata=_opt(
            "KV cache type of llama.cpp models: f16 (default) or q8_0 (half the KV "
            "bytes per step, slightly different logprobs; needs flash attention)."
        ),
    )
    prefill_batch: int | None = field(
        default=None,
        metadata=_opt(
            "Prompt tokens a llama.cpp model evaluates per step when no other stream is "
            "decoding (a prompt alone goes in chunks this large; beside decoding streams, "
            "256, so their next token waits for at most that). Default: 1024 with flash "
            "attention, 256 without (it computes every padded KV cell of a step).",
            kind="int",
        ),
    )
    cache_reuse: int = field(
        default=0,
        metadata=_opt(
            "Prompt cache for llama.cpp models with rotary positions (CodeGen, llama-family): "
            "when a prompt's window slid, move cached runs of at least N tokens into place "
            "instead of evaluating them again. Close to, not equal to, a cold evaluation: "
            "the moved tokens still carry the context of the text that slid out, so it is off "
            "(0) unless asked; 256 suits editors. GPT-2 (absolute positions) never shifts; "
            "CTranslate2 models ignore it.",
            kind="int",
            metavar="N",
        ),
    )
    short_lane: int | None = field(
        default=None,
        metadata=_opt(
            "llama.cpp models on CPU with flash attention calibrated off: a second context "
            "with it on for requests whose mean depth (prompt + max_tokens/2) is under N "
            "cells, where it is faster (it skips the masked cells of the 256-cell window). "
            "Default: the crossover the calibration measured; 0: no second context.",
            kind="int",
            metavar="N",
        ),
    )
    max_queue: int = field(
        default=64,
        metadata=_opt(
            "Requests that may wait per model before new ones get 429 queue_full.", kind="int"
        ),
    )
    api_key: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "API key clients must send as 'Authorization: Bearer KEY' or as the path prefix "
            "/k/KEY/ (repeatable; the env var takes a comma-separated list).",
            kind="list",
            metavar="KEY",
        ),
    )
    api_key_file: str | None = field(
        default=None,
        metadata=_opt("File with one API key per line (blank lines and # comments ignored)."),
    )
    insecure_public: bool = field(
        default=False,
        metadata=_opt("Allow binding a non-loopback address without an API key.", kind="bool"),
    )
    allowed_host: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "Extra Host header names accepted on a loopback bind (repeatable). localhost, "
            "127.0.0.1 and [::1] on any port are always accepted; others get 403 "
            "(DNS-rebinding protection).",
            kind="list",
            metavar="HOST",
        ),
    )
    cors_origin: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "Origin allowed to call the API from a browser (repeatable). CORS is off without it.",
            kind="list",
            metavar="ORIGIN",
        ),
    )
    trust_unverified_models: bool = field(
        default=False,
        metadata=_opt(
            "Load models without a fastpilot.json manifest and skip the sha256 check of the "
            "weights (header and size checks still run). Only for files you trust.",
            kind="bool",
        ),
    )
    strict_models: bool = field(
        default=False,
        metadata=_opt(
            "Answer 404 for unknown model/engine names instead of using the default model.",
            kind="bool",
        ),
    )
    max_body_bytes: int = field(
        default=DEFAULT_MAX_BODY,
        metadata=_opt("Largest request body accepted (bytes); bigger gets 413.", kind="int"),
    )
    max_tokens: int = field(
        default=4096, metadata=_opt("Cap on max_tokens per request.", kind="int")
    )
    max_n: int = field(
        default=16,
        metadata=_opt(
            "Cap on the sequences of one request: n and best_of, times the number of "
            "prompts when several are sent.",
            kind="int",
        ),
    )
    max_stop: int = field(
        default=32,
        metadata=_opt(
            "Cap on stop strings per request (more is a 400 naming stop). They are "
            "matched in one pass whatever their number.",
            kind="int",
        ),
    )
    timeout: float = field(
        default=600.0,
        metadata=_opt(
            "Per-request deadline in seconds; generation past it is cancelled and the "
            "request answers 504 timeout (a stream ends with an error event).",
            kind="float",
        ),
    )
    log_prompts: bool = field(
        default=False,
        metadata=_opt("Include prompt text in the request log (off: counts only).", kind="bool"),
    )
    waitress_threads: int | None = field(
        default=None,
        metadata=_opt(
            "waitress worker threads. Each open stream holds one; default slots x models + 8.",
            kind="int",
        ),
    )
    channel_timeout: int = field(
        default=300,
        metadata=_opt(
            "waitress: seconds an idle connection is kept before it is closed.", kind="int"
        ),
    )
    connection_limit: int = field(
        default=200,
        metadata=_opt(
            "waitress: most simultaneous connections; more wait in the backlog.", kind="int"
        ),
    )

    # -- derived values ---------------------------------------------------------------
    @property
    def limits(self) -> Limits:
        """The per-request caps the validator enforces."""
        return Limits(
            max_n=self.max_n,
            max_best_of=self.max_n,
            max_tokens=self.max_tokens,
            max_stop=self.max_stop,
        )

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def api_keys(self) -> tuple[str, ...]:
        """All keys: ``--api-key`` values plus the lines of ``--api-key-file`` (read now).

        Raises:
            SettingsError: the key file cannot be read.
        """
        keys = [k for k in self.api_key if k]
        if self.api_key_file:
            try:
                text = Path(self.api_key_file).read_text(encoding="utf-8")
            except OSError as ex:
                raise SettingsError(
                    f"cannot read --api-key-file {self.api_key_file}: {ex.strerror}"
                ) from ex
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return tuple(dict.fromkeys(keys))

    def waitress_thread_count(self, n_models: int) -> int:
        if self.waitress_threads:
            return self.waitress_threads
        return max(1, self.slots) * max(1, n_models) + 8

    def check(self) -> None:
        """Refuse unsafe or impossible settings with a message that says the fix.

        Raises:
            SettingsError: a non-loopback bind without keys (and without
                ``--insecure-public``), or a non-positive cap.
        """
        if not self.is_loopback and not self.insecure_public and not self.api_keys():
            raise SettingsError(
                f"refusing to listen on {self.host} without an API key: anyone who can reach "
                "this address could use the server. Give --api-key KEY (or --api-key-file FILE), "
                "bind --host 127.0.0.1, or pass --insecure-public if you really mean it."
            )
        names = ("slots", "max_queue", "max_body_bytes", "max_tokens", "max_n", "max_stop")
        for name in (*names, "draft_max"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.cache_reuse < 0:
            raise SettingsError("--cache-reuse must be 0 (off) or more")
        if self.short_lane is not None and self.short_lane < 0:
            raise SettingsError("--short-lane must be 0 (off) or more")
        for name in ("ubatch", "threads_batch", "prefill_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1")
        for name, choices in (
            ("speculative", SPECULATIVE),
            ("flash_attn", FLASH_ATTN),
            ("kv_type", (None, *KV_TYPES)),
        ):
            if getattr(self, name) not in choices:
                raise SettingsError(
                    f"--{name.replace('_', '-')} must be one of "
                    f"{', '.join(c for c in choices if c)}, not {getattr(self, name)!r}"
                )
        if self.kv_type not in (None, "f16") and self.flash_attn == "off":
            raise SettingsError(
                f"--kv-type {self.kv_type} needs flash attention: drop --flash-attn off"
            )
        if self.timeout <= 0:
            raise SettingsError("--timeout must be positive")


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback IP literals (127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- parsing ---------------------------------------------------------------------------


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _flag(f: Any) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _convert(kind: str, raw: str, where: str) -> Any:
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"{where} must be a number, got {raw!r}") from None
    if kind == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{where} must be true or false, got {raw!r}")
    if kind == "list":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per settings field; absent flags stay absent (argparse.SUPPRESS)."""
    for f in fields(Settings):
        meta = f.metadata
        env = _env_name(f.name)
        help_text = f"{meta['help']} [env {env}; default {f.default!r}]"
        kind = meta["kind"]
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "default": argparse.SUPPRESS}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind == "list":
            kwargs["action"] = "append"
            kwargs["metavar"] = meta["metavar"] or f.name.upper()
        else:
            kwargs["type"] = {"int": int, "float": float}.get(kind, str)
            kwargs["metavar"] = meta["metavar"] or f.name.upper()
        parser.add_argument(_flag(f), **kwargs)


def build_parser(prog: str = "fastpilot serve") -> argparse.ArgumentParser:
    """The ``serve`` parser, generated from :class:`Settings`."""
    parser = argparse.ArgumentParser(prog=prog, description="Serve converted models over HTTP.")
    add_arguments(parser)
    return parser


def load_settings(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    namespace: argparse.Namespace | None = None,
) -> Settings:
    """Merge CLI > env > defaults into one :class:`Settings`.

    Args:
        argv: CLI arguments for the serve parser (ignored when ``namespace`` is given).
        environ: the environment (default ``os.environ``).
        namespace: an already parsed namespace (the CLI's subcommand parser).

    Raises:
        SettingsError: an env var does not parse.
    """
    env = os.environ if environ is None else environ
    if namespace is None:
        namespace = build_parser().parse_args(list(argv or []))
    given = vars(namespace)
    values: dict[str, Any] = {}
    for f in fields(Settings):
        kind = f.metadata["kind"]
        if f.name in given:
            value = given[f.name]
            values[f.name] = tuple(value) if kind == "list" else value
        elif _env_name(f.name) in env:
            values[f.name] = _convert(kind, env[_env_name(f.name)], _env_name(f.name))
    return replace(Settings(), **values)
