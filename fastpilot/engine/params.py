"""The typed completion request and its validation, shared by the HTTP API and the library API.

The API layer turns a JSON body or a query string into a plain mapping
(coercing ``"true"``/``"false"`` and numbers); :meth:`CompletionRequest.from_dict`
validates every field against :class:`Limits` and raises
:class:`fastpilot.errors.InvalidRequest` naming the offending ``param``.
Unknown keys are ignored (Copilot sends ``nwo``, ``extra``, ``feature_flags``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fastpilot.backends.base import SamplingParams
from fastpilot.errors import InvalidRequest


class ContextMode(str, Enum):
    TRUNCATE = "truncate"  # left-truncate the prompt, clamp max_tokens (engine/Copilot routes)
    ERROR = "error"  # raise ContextLengthExceeded (/v1/completions unless asked)


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on what one request may ask for (settings can change them)."""

    max_n: int = 16
    max_best_of: int = 16
    max_tokens: int = 4096
    max_logprobs: int = 5
    max_stop: int = 4
    max_stop_length: int = 256
    max_logit_bias: int = 1024


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """One completion request, validated. ``prompt`` is text or token ids."""

    prompt: str | tuple[int, ...] = ""
    suffix: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    user: str | None = None
    stream: bool = False
    include_usage: bool = False
    context_mode: ContextMode = ContextMode.TRUNCATE
    timeout: float | None = None  # seconds; None means the server default
    extra: Mapping[str, Any] = field(default_factory=dict)

    def sampling(self, index: int = 0) -> SamplingParams:
        """SamplingParams for the ``index``-th sequence (seed offset per sequence)."""
        seed = None if self.seed is None else (self.seed + index) & 0x7FFFFFFF
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_tokens=self.min_tokens,
            logprobs=self.logprobs or 0,
            logit_bias=self.logit_bias,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=seed,
            ignore_eos=self.ignore_eos,
        )

    @property
    def num_sequences(self) -> int:
        return max(self.n, self.best_of or self.n)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        limits: Limits | None = None,
        context_mode: ContextMode = ContextMode.TRUNCATE,
    ) -> CompletionRequest:
        """Validate a decoded request body. Raises InvalidRequest naming the param."""
        lim = limits or Limits()
        if not isinstance(data, Mapping):
            raise InvalidRequest("the request body must be a JSON object", param=None)
        get = data.get

        prompt = _prompt(get("prompt", ""))
        suffix = _opt_str(get("suffix"), "suffix")
        # An omitted max_tokens means 16 (OpenAI), never more than the server cap.
        max_tokens = _int(
            get("max_tokens"), "max_tokens", min(16, lim.max_tokens), lo=0, hi=lim.max_tokens
        )
        temperature = _float(get("temperature"), "temperature", 1.0, lo=0.0, hi=2.0)
        top_p = _float(get("top_p"), "top_p", 1.0, lo=0.0, hi=1.0)
        if top_p == 0.0:
            top_p = 1e-9  # OpenAI accepts 0: keep only the single most likely token
        top_k = _int(get("top_k"), "top_k", 0, lo=0, hi=1 << 20)
        n = _int(get("n"), "n", 1, lo=1, hi=lim.max_n)
        best_of_raw = get("best_of")
        best_of = (
            None
            if best_of_raw is None
            else _int(best_of_raw, "best_of", n, lo=1, hi=lim.max_best_of)
        )
        if best_of is not None and best_of < n:
            raise InvalidRequest(
                f"best_of ({best_of}) must be greater than or equal to n ({n})", param="best_of"
            )
        echo = _bool(get("echo"), "echo", False)
        stop = _stop(get("stop"), lim)
        logprobs_raw = get("logprobs")
        logprobs = None
        if logprobs_raw is not None and logprobs_raw is not False:
            # The chat API sends logprobs: true; treat it as "the chosen token only".
            logprobs = (
                0
                if logprobs_raw is True
                else _int(logprobs_raw, "logprobs", 0, lo=0, hi=lim.max_logprobs)
            )
        logit_bias = _logit_bias(get("logit_bias"), lim)
        presence = _float(get("presence_penalty"), "presence_penalty", 0.0, lo=-2.0, hi=2.0)
        frequency = _float(get("frequency_penalty"), "frequency_penalty", 0.0, lo=-2.0, hi=2.0)
        repetition = _float(get("repetition_penalty"), "repetition_penalty", 1.0, lo=0.01, hi=10.0)
        min_tokens = _int(get("min_tokens"), "min_tokens", 0, lo=0, hi=lim.max_tokens)
        ignore_eos = _bool(get("ignore_eos"), "ignore_eos", False)
        seed_raw = get("seed")
        seed = (
            None if seed_raw is None else _int(seed_raw, "seed", 0, lo=-(1 << 63), hi=(1 << 64) - 1)
        )
        user = _opt_str(get("user"), "user")
        stream = _bool(get("stream"), "stream", False)
        include_usage = False
        opts = get("stream_options")
        if opts is not None:
            if not isinstance(opts, Mapping):
                raise InvalidRequest("stream_options must be an object", param="stream_options")
            include_usage = _bool(opts.get("include_usage"), "stream_options.include_usage", False)
        if stream and best_of is not None and best_of > n:
            raise InvalidRequest("best_of cannot be used with stream", param="best_of")
        mode = context_mode
        if "truncate" in data:
            mode = (
                ContextMode.TRUNCATE
                if _bool(get("truncate"), "truncate", False)
                else ContextMode.ERROR
            )
        timeout_raw = get("timeout")
        timeout = (
            None
            if timeout_raw is None
            else _float(timeout_raw, "timeout", 0.0, lo=0.001, hi=86400.0)
        )
        return cls(
            prompt=prompt,
            suffix=suffix,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            n=n,
            best_of=best_of,
            echo=echo,
            stop=stop,
            logprobs=logprobs,
            logit_bias=logit_bias,
            presence_penalty=presence,
            frequency_penalty=frequency,
            repetition_penalty=repetition,
            min_tokens=min_tokens,
            ignore_eos=ignore_eos,
            seed=seed,
            user=user,
            stream=stream,
            include_usage=include_usage,
            context_mode=mode,
            timeout=timeout,
        )


# -- field validators ------------------------------------------------------------------


def _type_name(value: object) -> str:
    return type(value).__name__


def _int(value: Any, param: str, default: int, *, lo: int, hi: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        raise InvalidRequest(f"{param} must be an integer, not a boolean", param=param)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise InvalidRequest(f"{param} must be an integer, got {value!r}", param=param)
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InvalidRequest(
                f"{param} must be an integer, got {value[:40]!r}", param=param
            ) from None
    if not isinstance(value, int):
        raise InvalidRequest(f"{param} must be an integer, got {_type_name(value)}", param=param)
    if not lo <= value <= hi:
        raise InvalidRequest(f"{param} must be between {lo} and {hi}, got {value}", param=param)
    return value


def _float(value: Any, param: str, default: float, *, lo: float, hi: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool):
        raise InvalidRequest(f"{param} must be a number, not a boolean", param=param)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidRequest(
                f"{param} must be a number, got {value[:40]!r}", param=param
            ) from None
    if not isinstance(value, (int, float)):
        raise InvalidRequest(f"{param} must be a number, got {_type_name(value)}", param=param)
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidRequest(
            f"{param} must be between {lo:g} and {hi:g}, got {value!r}", param=param
        )
    return value


def _bool(value: Any, param: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off", ""):
            return False
    raise InvalidRequest(f"{param} must be a boolean, got {str(value)[:40]!r}", param=param)


def _opt_str(value: Any, param: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{param} must be a string, got {_type_name(value)}", param=param)
    return value


def _prompt(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if len(value) == 1 and isinstance(value[0], list):
            value = value[0]
        if value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            if any(t < 0 for t in value):
                raise InvalidRequest("prompt token ids must be non-negative", param="prompt")
            return tuple(value)
        if not value:
            return ""
        raise InvalidRequest(
            "prompt must be a string, a list with one string, or a list of token ids "
            "(batches of several prompts are not supported; send one request each)",
            param="prompt",
        )
    if value is None:
        return ""
    raise InvalidRequest(
        f"prompt must be a string or token ids, got {_type_name(value)}", param="prompt"
    )


def _stop(value: Any, lim: Limits) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise InvalidRequest("stop must be a string or a list of strings", param="stop")
    items = [s for s in items if s]
    if len(items) > lim.max_stop:
        raise InvalidRequest(f"stop may hold at most {lim.max_stop} strings", param="stop")
    if any(len(s) > lim.max_stop_length for s in items):
        raise InvalidRequest(
            f"each stop string may be at most {lim.max_stop_length} characters", param="stop"
        )
    return tuple(dict.fromkeys(items))


def _logit_bias(value: Any, lim: Limits) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise InvalidRequest(
            "logit_bias must be an object mapping token ids to numbers", param="logit_bias"
        )
    if len(value) > lim.max_logit_bias:
        raise InvalidRequest(
            f"logit_bias may hold at most {lim.max_logit_bias} entries", param="logit_bias"
        )
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise InvalidRequest(
                f"logit_bias keys must be token ids, got {str(key)[:40]!r}", param="logit_bias"
            ) from None
        if tok < 0:
            raise InvalidRequest(
                "logit_bias keys must be non-negative token ids", param="logit_bias"
            )
        out[tok] = _float(bias, "logit_bias", 0.0, lo=-100.0, hi=100.0)
    return tuple(sorted(out.items()))
