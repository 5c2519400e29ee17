"""Fill in the middle: how a model infills, and the one place FIM prompts are built.

A model declares how it infills with a :class:`FimFormat`:

- ``TEMPLATE``: text markers from the converter's manifest,
  ``P + prefix + S + suffix + M`` (``{"prefix", "suffix", "middle"}``).
- ``CODEGEN2``: ``prefix + "<mask_1>" + suffix + "<|endoftext|>" + "<sep>" + "<mask_1>"``;
  the middle ends at ``<eom>``, which is never returned as text.
- ``TOKENS``: a GGUF's own FIM token ids (:mod:`fastpilot.backends.fim_tokens`),
  ``[FIM_PRE] prefix [FIM_SUF] suffix [FIM_MID]`` (PSM) or
  ``[FIM_SUF] suffix [FIM_PRE] prefix [FIM_MID]`` (SPM, as llama.cpp's
  ``--spm-infill``), with repo-level context in ``[FIM_REP]``/``[FIM_SEP]`` form
  when the vocabulary has those tokens.
- ``T5_SPAN``: an encoder-decoder's span sentinel, ``prefix + "<extra_id_0>" + suffix``
  as the encoder input.
- ``CANNOT``: the model cannot infill; a suffix is ignored (and said so).

Every route -- ``/v1/completions`` ``suffix``, the engine routes, ``/infill``, the
library, the CLI, the playground -- hands (prefix, suffix, context files) to
:func:`build_fim_prompt` through :func:`fastpilot.engine.prompt.prepare`; no route
renders FIM markup itself. Marker text is tokenized with the backend's tokenizer,
which turns the model's special tokens written as text into those tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from fastpilot.errors import ContextLengthExceeded

if TYPE_CHECKING:
    from fastpilot.backends.base import Backend
    from fastpilot.backends.fim_tokens import FimTokenIds

__all__ = [
    "ContextFile",
    "FimFormat",
    "FimOrder",
    "FimPrompt",
    "FimStyle",
    "build_fim_prompt",
    "fim_format",
]

# A marker is text to tokenize (the model's special tokens written out) or a token id.
Marker = str | int

# Between context files when the model has no FIM_SEP token (llama.cpp's server
# uses the same plain separator, so prompts match across the two servers).
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"
# The repository and current-file names of the repo-level layout; clients do not send them.
REPO_NAME = "myproject"
CURRENT_FILE = "filename"


class FimStyle(str, Enum):
    TEMPLATE = "template"
    CODEGEN2 = "codegen2"
    TOKENS = "tokens"
    T5_SPAN = "t5-span"
    CANNOT = "cannot"


class FimOrder(str, Enum):
    PSM = "psm"  # prefix, suffix, middle
    SPM = "spm"  # suffix, prefix, middle


@dataclass(frozen=True, slots=True)
class ContextFile:
    """One chunk of repository context (``/infill``'s ``input_extra``): a file name and text."""

    filename: str
    text: str


@dataclass(frozen=True, slots=True)
class FimFormat:
    """How one model infills. Build it with the class methods; ``CANNOT`` for none.

    ``pre``/``suf``/``mid`` are the markers before the prefix, before the suffix
    and after both (generation starts after ``mid``); ``end`` are the tokens
    that end the middle (never returned as text). ``repo``/``file_sep`` are
    the repo-level markers, ``bos`` a token the model wants first.
    """

    style: FimStyle
    pre: tuple[Marker, ...] = ()
    suf: tuple[Marker, ...] = ()
    mid: tuple[Marker, ...] = ()
    end: tuple[Marker, ...] = ()
    order: FimOrder = FimOrder.PSM
    repo: Marker | None = None
    file_sep: Marker | None = None
    bos: int | None = None

    @property
    def can_infill(self) -> bool:
        return self.style is not FimStyle.CANNOT

    @classmethod
    def template(cls, prefix: str, suffix: str, middle: str) -> FimFormat:
        return cls(FimStyle.TEMPLATE, pre=(prefix,), suf=(suffix,), mid=(middle,))

    @classmethod
    def codegen2(
        cls,
        mask: str = "<mask_1>",
        eot: str = "<|endoftext|>",
        sep: str = "<sep>",
        end: str = "<eom>",
    ) -> FimFormat:
        return cls(FimStyle.CODEGEN2, suf=(mask,), mid=(eot, sep, mask), end=(end,))

    @classmethod
    def t5_span(cls, sentinel: str = "<extra_id_0>") -> FimFormat:
        return cls(FimStyle.T5_SPAN, suf=(sentinel,))

    @classmethod
    def from_token_ids(cls, ids: FimTokenIds, order: FimOrder = FimOrder.PSM) -> FimFormat:
        return cls(
            FimStyle.TOKENS,
            pre=(ids.pre,),
            suf=(ids.suf,),
            mid=(ids.mid,),
            end=tuple(sorted(ids.end)),
            order=order,
            repo=ids.rep,
            file_sep=ids.sep,
            bos=ids.bos,
        )

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], tokens: FimTokenIds | None) -> FimFormat | None:
        """The format a manifest's ``"fim"`` entry names; None when it names none.

        ``{"order": "spm"}`` (with or without ``"style": "tokens"``) selects the
        suffix-prefix-middle order for a GGUF's own FIM tokens.
        """
        style = spec.get("style")
        if style == FimStyle.CODEGEN2.value:
            return cls.codegen2(
                str(spec.get("mask", "<mask_1>")),
                str(spec.get("eot", "<|endoftext|>")),
                str(spec.get("sep", "<sep>")),
                str(spec.get("end", "<eom>")),
            )
        if style == FimStyle.T5_SPAN.value:
            return cls.t5_span(str(spec.get("sentinel", "<extra_id_0>")))
        if {"prefix", "suffix", "middle"} <= spec.keys():
            return cls.template(str(spec["prefix"]), str(spec["suffix"]), str(spec["middle"]))
        if tokens is not None and style in (None, FimStyle.TOKENS.value):
            order = FimOrder.SPM if spec.get("order") == FimOrder.SPM.value else FimOrder.PSM
            return cls.from_token_ids(tokens, order)
        return None


CANNOT = FimFormat(FimStyle.CANNOT)


def fim_format(backend: Backend) -> FimFormat:
    """How ``backend``'s model infills, from what its files declare.

    In order: a format the backend sets itself (``fim_format``), the manifest's
    ``"fim"`` entry (``fim_spec``, or ``info.extra["manifest"]``), a template
    the backend parsed (``fim``), the GGUF's FIM token ids (``fim_tokens``);
    otherwise ``CANNOT``.
    """
    declared = getattr(backend, "fim_format", None)
    if isinstance(declared, FimFormat):
        return declared
    tokens = getattr(backend, "fim_tokens", None)
    spec = getattr(backend, "fim_spec", None)
    if spec is None:
        info = getattr(backend, "info", None)
        manifest = info.extra.get("manifest") if info is not None else None
        spec = manifest.get("fim") if isinstance(manifest, Mapping) else None
    if isinstance(spec, Mapping):
        parsed = FimFormat.from_spec(spec, tokens)
        if parsed is not None:
            return parsed
    template = getattr(backend, "fim", None)
    if template is not None:
        return FimFormat.template(template.prefix, template.suffix, template.middle)
    if tokens is not None:
        return FimFormat.from_token_ids(tokens)
    return CANNOT


@dataclass(frozen=True, slots=True)
class FimPrompt:
    """A rendered infill prompt and what the budget split kept of it."""

    ids: tuple[int, ...]
    prefix_ids: tuple[int, ...]  # the prefix tokens kept (``echo`` would show these)
    truncated: int  # prefix + suffix tokens dropped
    files_kept: int
    files_dropped: int
    stop_ids: frozenset[int]  # tokens that end the middle besides the model's EOS


def _ids(backend: Backend, markers: Sequence[Marker]) -> list[int]:
    out: list[int] = []
    for m in markers:
        out.extend([m] if isinstance(m, int) else backend.tokenize(m))
    return out


def _one(backend: Backend, marker: Marker | None) -> list[int]:
    return [] if marker is None else _ids(backend, (marker,))


def split_budget(n_prefix: int, n_suffix: int, room: int) -> tuple[int, int]:
    """Tokens of prefix and suffix to keep in ``room`` tokens: ``(prefix, suffix)``.

    Both fit: keep both. Otherwise the suffix keeps at least a quarter of the
    room (what remains when the prefix is short, never more than it has) and
    the prefix takes the rest -- the code right before the cursor matters most,
    the code right after it next (llama.cpp's server splits 3:1 the same way).
    """
    room = max(0, room)
    if n_prefix + n_suffix <= room:
        return n_prefix, n_suffix
    keep_suffix = min(n_suffix, max(room // 4, room - n_prefix))
    return min(n_prefix, room - keep_suffix), keep_suffix


def build_fim_prompt(
    backend: Backend,
    fmt: FimFormat,
    prefix: str | Sequence[int],
    suffix: str,
    files: Sequence[ContextFile] = (),
    *,
    room: int,
) -> FimPrompt:
    """Render ``prefix``/``suffix``/``files`` in ``fmt`` within ``room`` tokens.

    Budget: the markers (and the repo-level header and footer when files are
    given) are fixed; the prefix and suffix share the rest by
    :func:`split_budget` -- keeping the *end* of the prefix and the *start* of
    the suffix; context files get what prefix and suffix leave, newest kept,
    oldest dropped first, whole. ``room`` is the context minus the tokens
    reserved for generation; the caller decides it.

    Raises:
        ContextLengthExceeded: the markers alone do not fit in ``room``.
    """
    pre, suf, mid = _ids(backend, fmt.pre), _ids(backend, fmt.suf), _ids(backend, fmt.mid)
    bos = [] if fmt.bos is None else [fmt.bos]
    head: list[int] = []  # repo-level header, before the first file
    foot: list[int] = []  # after the last file, before the FIM markers
    chunks: list[list[int]] = []
    if files:
        sep = _one(backend, fmt.file_sep)
        if sep:
            head = _one(backend, fmt.repo) + backend.tokenize(REPO_NAME + "\n") if fmt.repo else []
            foot = sep + backend.tokenize(CURRENT_FILE + "\n")
            chunks = [sep + backend.tokenize(f.filename + "\n" + f.text) for f in files]
        else:
            gap = backend.tokenize(SNIPPET_SEPARATOR)
            chunks = [gap + backend.tokenize(f.text) for f in files]
            foot = gap
    prefix_ids = list(prefix) if not isinstance(prefix, str) else backend.tokenize(prefix)
    suffix_ids = backend.tokenize(suffix)

    fixed = len(bos) + len(pre) + len(suf) + len(mid)
    if fixed > room:
        raise ContextLengthExceeded(
            f"the fill-in-the-middle markers alone need {fixed} tokens; {room} are left "
            "after the tokens reserved for the completion",
            param="prompt",
        )
    keep_p, keep_s = split_budget(len(prefix_ids), len(suffix_ids), room - fixed)
    truncated = len(prefix_ids) - keep_p + len(suffix_ids) - keep_s
    prefix_ids = prefix_ids[len(prefix_ids) - keep_p :]
    suffix_ids = suffix_ids[:keep_s]

    left = room - fixed - keep_p - keep_s - len(head) - len(foot)
    kept: list[list[int]] = []
    for chunk in reversed(chunks):  # newest last in the request: keep from the end
        if len(chunk) > left:
            break
        kept.append(chunk)
        left -= len(chunk)
    kept.reverse()
    context: list[int] = []
    if kept:
        context = head + [t for c in kept for t in c] + foot

    body_p = pre + prefix_ids
    body_s = suf + suffix_ids
    first, second = (body_s, body_p) if fmt.order is FimOrder.SPM else (body_p, body_s)
    # BOS (when the model wants one) first, then the context files, then the FIM body;
    # llama.cpp's server puts the files before its BOS, which no model was trained on.
    ids = bos + context + first + second + mid
    return FimPrompt(
        ids=tuple(ids),
        prefix_ids=tuple(prefix_ids),
        truncated=truncated,
        files_kept=len(kept),
        files_dropped=len(chunks) - len(kept),
        stop_ids=frozenset(_ids(backend, fmt.end)),
    )
