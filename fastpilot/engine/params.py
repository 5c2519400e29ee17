"""The typed completion request: the one place that lists the request's fields.

Each field of :class:`CompletionRequest` carries its wire name, type, limits and
description in its metadata (:func:`_f`). From that one declaration come:

- the parser, :meth:`CompletionRequest.from_dict`, which reads every field
  through the coercion function of its type (:mod:`fastpilot.engine.coerce`),
  for JSON bodies and query strings alike, and raises
  :class:`fastpilot.errors.InvalidRequest` naming the offending ``param``;
- the backend's :class:`~fastpilot.backends.base.SamplingParams`, derived by
  field name in :meth:`CompletionRequest.sampling` (no copy by hand);
- the OpenAPI description of the request body, :func:`wire_schema`.

Unknown keys are ignored (Copilot sends ``nwo``, ``feature_flags``);
``extra`` is kept, and its ``trim_by_indentation`` / ``next_indent`` become
the ``n_indent`` editor stop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from fastpilot.backends.base import SamplingParams
from fastpilot.engine.coerce import coerce_bool, coerce_float, coerce_int, coerce_str
from fastpilot.engine.editor_stops import LineLimits
from fastpilot.engine.fim import ContextFile
from fastpilot.errors import InvalidRequest

# One prompt: text, or token ids.
Prompt = str | tuple[int, ...]


class ContextMode(str, Enum):
    TRUNCATE = "truncate"  # left-truncate the prompt, clamp max_tokens (engine/Copilot routes)
    ERROR = "error"  # raise ContextLengthExceeded (/v1/completions unless asked)


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on what one request may ask for (settings can change them).

    ``max_n`` also caps the sequences of a whole request: prompts x
    ``max(n, best_of)``.
    """

    max_n: int = 16
    max_best_of: int = 16
    max_tokens: int = 4096
    max_logprobs: int = 5
    max_stop: int = 32
    max_stop_length: int = 256
    max_logit_bias: int = 1024


class Kind(str, Enum):
    """How a field is read off the wire; the value is its JSON-schema type."""

    INT = "integer"
    FLOAT = "number"
    BOOL = "boolean"
    STR = "string"
    CUSTOM = "custom"  # read by its own function below (lists, objects, mixed types)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one request field is read. ``hi`` may name a :class:`Limits` attribute."""

    kind: Kind
    doc: str
    wire: str | None  # the JSON key it is read from; None: derived from another field
    lo: float | None = None
    hi: float | str | None = None
    schema: Mapping[str, Any] | None = None  # JSON schema of a CUSTOM field


def _f(
    default: Any,
    kind: Kind,
    doc: str,
    *,
    wire: str | None = "",
    lo: float | None = None,
    hi: float | str | None = None,
    schema: Mapping[str, Any] | None = None,
) -> Any:
    """A request field: its default and how it is read (``wire=""`` means its own name)."""
    spec = FieldSpec(kind, doc, wire, lo, hi, schema)
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    ]
}
_STOP_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """One completion request, validated; ``prompt`` is ``prompts[0]``.

    A request with several prompts is run as one request per prompt (see
    :meth:`for_prompt`); choice ``j`` of prompt ``i`` is ``choices[i * n + j]``.
    """

    prompt: Prompt = _f(
        "",
        Kind.CUSTOM,
        "Text or token ids; a list of texts or of token-id lists runs several prompts.",
        schema=_PROMPT_SCHEMA,
    )
    prompts: tuple[Prompt, ...] = _f(("",), Kind.CUSTOM, "Every prompt, in order.", wire=None)
    suffix: str | None = _f(None, Kind.STR, "FIM suffix (ignored without FIM).")
    max_tokens: int = _f(
        16, Kind.INT, "Tokens to generate (0 scores the prompt).", lo=0, hi="max_tokens"
    )
    temperature: float = _f(1.0, Kind.FLOAT, "0 is greedy; up to 2.", lo=0.0, hi=2.0)
    top_p: float = _f(1.0, Kind.FLOAT, "Nucleus sampling mass.", lo=0.0, hi=1.0)
    top_k: int = _f(0, Kind.INT, "Keep the k most likely tokens (0: all).", lo=0, hi=1 << 20)
    n: int = _f(1, Kind.INT, "Choices per prompt.", lo=1, hi="max_n")
    best_of: int | None = _f(
        None, Kind.INT, "Sequences to generate, the n best returned.", lo=1, hi="max_best_of"
    )
    echo: bool = _f(False, Kind.BOOL, "Return the prompt before the completion.")
    stop: tuple[str, ...] = _f(
        (), Kind.CUSTOM, "Stop strings (up to --max-stop).", schema=_STOP_SCHEMA
    )
    logprobs: int | None = _f(
        None,
        Kind.CUSTOM,
        "Top alternatives per token (0..5); true means the chosen token only.",
        schema={"type": ["integer", "boolean", "string", "null"]},
    )
    logit_bias: tuple[tuple[int, float], ...] = _f(
        (),
        Kind.CUSTOM,
        "Token id -> additive bias (-100 bans).",
        schema={"type": "object", "additionalProperties": {"type": ["number", "string"]}},
    )
    presence_penalty: float = _f(0.0, Kind.FLOAT, "OpenAI presence penalty.", lo=-2.0, hi=2.0)
    frequency_penalty: float = _f(0.0, Kind.FLOAT, "OpenAI frequency penalty.", lo=-2.0, hi=2.0)
    repetition_penalty: float = _f(
        1.0, Kind.FLOAT, "Multiplicative (CTRL) repetition penalty.", lo=0.01, hi=10.0
    )
    min_tokens: int = _f(
        0, Kind.INT, "End-of-text is banned before this many tokens.", lo=0, hi="max_tokens"
    )
    ignore_eos: bool = _f(False, Kind.BOOL, "Generate past end-of-text.")
    seed: int | None = _f(
        None, Kind.INT, "Same seed, same request: same text.", lo=-(1 << 63), hi=(1 << 64) - 1
    )
    user: str | None = _f(None, Kind.STR, "End-user id (logged only).")
    stream: bool = _f(False, Kind.BOOL, "Server-Sent Events.")
    include_usage: bool = _f(
        False,
        Kind.CUSTOM,
        "stream_options.include_usage: a last event with the usage.",
        wire="stream_options",
        schema={
            "type": "object",
            "properties": {"include_usage": {"type": ["boolean", "integer", "string"]}},
        },
    )
    context_mode: ContextMode = _f(
        ContextMode.TRUNCATE,
        Kind.CUSTOM,
        "Left-truncate a prompt that does not fit.",
        wire="truncate",
        schema={"type": ["boolean", "integer", "string"]},
    )
    timeout: float | None = _f(
        None, Kind.FLOAT, "Deadline in seconds (504 past it).", lo=0.001, hi=86400.0
    )
    n_indent: int = _f(
        0,
        Kind.INT,
        "Editor stop: a new line indented less than this many columns ends the text "
        "(that line is not returned).",
        lo=0,
        hi=1 << 16,
    )
    t_max_predict_ms: float = _f(
        0.0,
        Kind.FLOAT,
        "Editor stop: past this many milliseconds, the text ends at the next newline.",
        lo=0.0,
        hi=86_400_000.0,
    )
    extra: Mapping[str, Any] = _f(
        {},
        Kind.CUSTOM,
        "Copilot's extra: trim_by_indentation with next_indent ends the text at the end "
        "of the block (a line indented next_indent columns or less).",
        schema={"type": "object"},
    )
    # Set by /infill and the library, never read off the wire (fastpilot/engine/fim.py).
    infill: bool = _f(
        False, Kind.CUSTOM, "Fill in the middle even with an empty suffix.", wire=None
    )
    context_files: tuple[ContextFile, ...] = _f(
        (), Kind.CUSTOM, "Repository context before the infill (input_extra).", wire=None
    )

    def sampling(self, index: int = 0) -> SamplingParams:
        """SamplingParams for the ``index``-th sequence: the request's fields of the same name.

        Only the seed (offset per sequence, so ``n`` samples differ) and
        ``logprobs`` (None means 0) are computed.
        """
        values = {name: getattr(self, name) for name in _SAMPLING_FIELDS}
        values["seed"] = None if self.seed is None else (self.seed + index) & 0x7FFFFFFF
        values["logprobs"] = self.logprobs or 0
        return SamplingParams(**values)

    @property
    def num_sequences(self) -> int:
        """Sequences generated per prompt."""
        return max(self.n, self.best_of or self.n)

    @property
    def line_limits(self) -> LineLimits:
        return LineLimits(self.n_indent, self.t_max_predict_ms)

    def for_prompt(self, i: int) -> CompletionRequest:
        """This request with only its ``i``-th prompt, and no usage event of its own."""
        p = self.prompts[i]
        return dataclasses.replace(self, prompt=p, prompts=(p,), include_usage=False)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        limits: Limits | None = None,
        context_mode: ContextMode = ContextMode.TRUNCATE,
    ) -> CompletionRequest:
        """Validate a decoded body or query mapping; raises InvalidRequest naming the param."""
        lim = limits or Limits()
        if not isinstance(data, Mapping):
            raise InvalidRequest("the request body must be a JSON object", param=None)
        values: dict[str, Any] = {}
        for f in fields(cls):
            spec: FieldSpec = f.metadata["spec"]
            if spec.kind is Kind.CUSTOM:
                continue
            assert spec.wire is not None
            name = spec.wire or f.name
            raw = data.get(name)
            if spec.kind is Kind.BOOL:
                values[f.name] = coerce_bool(raw, name, f.default)
            elif spec.kind is Kind.STR:
                values[f.name] = coerce_str(raw, name, f.default)
            else:
                hi = getattr(lim, spec.hi) if isinstance(spec.hi, str) else spec.hi
                assert spec.lo is not None and hi is not None
                if spec.kind is Kind.INT:
                    # An omitted max_tokens means 16 (OpenAI), never more than the server cap.
                    default: Any = f.default
                    if isinstance(default, int):
                        default = min(default, int(hi))
                    values[f.name] = coerce_int(raw, name, default, lo=int(spec.lo), hi=int(hi))
                else:
                    values[f.name] = coerce_float(raw, name, f.default, lo=spec.lo, hi=hi)
        if values["top_p"] == 0.0:
            values["top_p"] = 1e-9  # OpenAI accepts 0: keep only the single most likely token
        n, best_of = values["n"], values["best_of"]
        if best_of is not None and best_of < n:
            raise InvalidRequest(
                f"best_of ({best_of}) must be greater than or equal to n ({n})", param="best_of"
            )
        if values["stream"] and best_of is not None and best_of > n:
            raise InvalidRequest("best_of cannot be used with stream", param="best_of")
        prompts = _prompts(data.get("prompt"))
        _check_sequences(len(prompts), max(n, best_of or n), lim)
        extra = data.get("extra")
        extra = extra if isinstance(extra, Mapping) else {}
        values.update(
            prompt=prompts[0],
            prompts=prompts,
            stop=_stop(data.get("stop"), lim),
            logprobs=_logprobs(data.get("logprobs"), lim),
            logit_bias=_logit_bias(data.get("logit_bias"), lim),
            include_usage=_include_usage(data.get("stream_options")),
            context_mode=_context_mode(data, context_mode),
            extra=extra,
            n_indent=max(values["n_indent"], _block_indent(extra)),
        )
        return cls(**values)


# SamplingParams fields are the request fields of the same names (checked by the tests).
# token_logprob is the engine's to set (Run: only when logprobs or best_of read it).
_SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams) if f.name != "token_logprob")


def wire_fields() -> dict[str, FieldSpec]:
    """Every JSON key the parser reads, with its spec, in declaration order."""
    out: dict[str, FieldSpec] = {}
    for f in fields(CompletionRequest):
        spec: FieldSpec = f.metadata["spec"]
        if spec.wire is not None:
            out[spec.wire or f.name] = spec
    return out


def wire_schema() -> dict[str, dict[str, Any]]:
    """The JSON schema of every key :meth:`CompletionRequest.from_dict` reads.

    Typed fields also accept their string spelling (query strings, ``"0.2"``).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, spec in wire_fields().items():
        if spec.kind is Kind.CUSTOM:
            schema = dict(spec.schema or {})
        elif spec.kind is Kind.STR:
            schema = {"type": ["string", "null"]}
        elif spec.kind is Kind.BOOL:
            schema = {"type": ["boolean", "integer", "string", "null"]}
        else:
            schema = {"type": [spec.kind.value, "string", "null"]}
        out[name] = {**schema, "description": spec.doc}
    return out


# -- the fields with their own readers ---------------------------------------------------


def _check_sequences(prompts: int, per_prompt: int, lim: Limits) -> None:
    if prompts > 1 and prompts * per_prompt > lim.max_n:
        raise InvalidRequest(
            f"{prompts} prompts x {per_prompt} sequences each is {prompts * per_prompt} "
            f"sequences; this server runs at most {lim.max_n} per request (--max-n counts "
            "prompts x n); send fewer prompts per request",
            param="prompt",
        )


def _one_prompt(value: Any) -> Prompt | None:
    """A text or a non-empty list of non-negative token ids; None for anything else."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        if any(t < 0 for t in value):
            raise InvalidRequest("prompt token ids must be non-negative", param="prompt")
        return tuple(value)
    return None


def _prompts(value: Any) -> tuple[Prompt, ...]:
    """``prompt`` as one or more prompts; a flat list of ints is one prompt."""
    if value is None or value == []:
        return ("",)
    one = _one_prompt(value)
    if one is not None:
        return (one,)
    if isinstance(value, list):
        items = [_one_prompt(v) for v in value]
        # OpenAI's forms: a list of strings, or a list of token-id lists (not a mix).
        if all(isinstance(p, str) for p in items) or all(isinstance(p, tuple) for p in items):
            return tuple(p for p in items if p is not None)
        raise InvalidRequest(
            "prompt must be a string, token ids, or a list of strings or of token-id lists",
            param="prompt",
        )
    raise InvalidRequest(
        f"prompt must be a string or token ids, got {type(value).__name__}", param="prompt"
    )


def _stop(value: Any, lim: Limits) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise InvalidRequest("stop must be a string or a list of strings", param="stop")
    items = list(dict.fromkeys(s for s in items if s))
    if len(items) > lim.max_stop:
        raise InvalidRequest(
            f"stop may hold at most {lim.max_stop} strings, got {len(items)} "
            "(the server's --max-stop)",
            param="stop",
        )
    if any(len(s) > lim.max_stop_length for s in items):
        raise InvalidRequest(
            f"each stop string may be at most {lim.max_stop_length} characters", param="stop"
        )
    return tuple(items)


def _logprobs(value: Any, lim: Limits) -> int | None:
    if value is None or value is False:
        return None
    if value is True:
        return 0  # the chat API's logprobs: true means "the chosen token only"
    return coerce_int(value, "logprobs", 0, lo=0, hi=lim.max_logprobs)


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
        out[tok] = coerce_float(bias, "logit_bias", 0.0, lo=-100.0, hi=100.0)
    return tuple(sorted(out.items()))


def _include_usage(opts: Any) -> bool:
    if opts is None:
        return False
    if not isinstance(opts, Mapping):
        raise InvalidRequest("stream_options must be an object", param="stream_options")
    return coerce_bool(opts.get("include_usage"), "stream_options.include_usage", False)


def _context_mode(data: Mapping[str, Any], default: ContextMode) -> ContextMode:
    truncate = coerce_bool(data.get("truncate"), "truncate", None)
    if truncate is None:
        return default
    return ContextMode.TRUNCATE if truncate else ContextMode.ERROR


def _block_indent(extra: Mapping[str, Any]) -> int:
    """Copilot's block trimming as an ``n_indent``: the block ends at a line indented
    ``next_indent`` columns or less (the indentation of the code after the cursor)."""
    if not coerce_bool(extra.get("trim_by_indentation"), "extra.trim_by_indentation", False):
        return 0
    # A negative next_indent (no code after the cursor) means the same as 0.
    indent = coerce_int(extra.get("next_indent"), "extra.next_indent", 0, lo=-(1 << 16), hi=1 << 16)
    return max(0, indent) + 1
