"""Prompt preparation: tokenization, fill-in-the-middle rendering and context fitting.

Every backend gets the same treatment here, so a prompt that is too long is
truncated (or refused) identically on CTranslate2 and llama.cpp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastpilot.backends.base import Backend
from fastpilot.engine.fim import FimFormat, build_fim_prompt, fim_format
from fastpilot.engine.params import CompletionRequest, ContextMode
from fastpilot.errors import ContextLengthExceeded, InvalidRequest, NotSupported


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """A request's prompt as the backend will see it.

    ``prompt_ids`` is what is submitted (after FIM rendering and truncation);
    ``max_tokens`` is the request's value clamped to the context window.
    ``echo_ids`` are the tokens ``echo`` returns: the prompt without the
    end-of-text token standing in for an empty prompt.
    """

    prompt_ids: tuple[int, ...]
    echo_ids: tuple[int, ...]
    max_tokens: int
    truncated: int  # prompt tokens dropped from the left
    fim_used: bool
    suffix_ignored: bool
    deadline: float | None
    stop_token_ids: frozenset[int] = frozenset()  # end the middle (FIM), besides EOS
    files_dropped: int = 0  # context files the FIM budget left out


def prepare(
    backend: Backend,
    request: CompletionRequest,
    *,
    default_timeout: float | None = None,
) -> PreparedPrompt:
    """Tokenize and fit ``request``'s prompt to ``backend``'s context window.

    Context fitting (``prompt + max_tokens <= context_length``):

    - ``ContextMode.ERROR``: raise :class:`ContextLengthExceeded` naming
      ``prompt`` (the prompt alone does not fit) or ``max_tokens``.
    - ``ContextMode.TRUNCATE``: keep room for ``min(max_tokens,
      context_length // 4)`` new tokens (at least one), drop the oldest prompt
      tokens beyond that, then clamp ``max_tokens`` to what is left. A
      quarter of the window keeps Copilot's 1500-token prompts with
      ``max_tokens=500`` useful on GPT-2's 1024 window (768 + 256).

    An empty prompt is replaced by the end-of-text token, as GPT-2 was trained
    to start documents after it (OpenAI does the same).

    Fill in the middle: a non-empty ``suffix``, ``infill`` or ``context_files``
    make the prompt the prefix of an infill rendered by
    :func:`fastpilot.engine.fim.build_fim_prompt` in the model's
    :class:`~fastpilot.engine.fim.FimFormat`; truncation then keeps the end of
    the prefix and the start of the suffix (see :func:`~fastpilot.engine.fim.split_budget`)
    and ``prompt_ids`` -- what ``usage.prompt_tokens`` counts -- is the
    rendered prompt. A model that cannot infill ignores ``suffix``
    (``suffix_ignored``) and refuses ``infill``/``context_files`` with
    :class:`NotSupported`.
    """
    ctx = int(backend.context_length)
    fmt = fim_format(backend)
    suffix = request.suffix or ""
    wants_fim = bool(suffix) or request.infill or bool(request.context_files)
    fim_used = wants_fim and fmt.can_infill
    suffix_ignored = bool(suffix) and not fmt.can_infill
    if wants_fim and not fim_used and (request.infill or request.context_files):
        raise NotSupported(
            "this model cannot fill in the middle (it has no FIM tokens or template)",
            param="input_suffix" if request.infill else "suffix",
        )
    if request.echo and backend.encoder_decoder:
        raise NotSupported(
            "echo is not available for an encoder-decoder model: its completion does not "
            "continue the prompt",
            param="echo",
        )
    if fim_used and request.echo:
        raise InvalidRequest(
            "echo cannot be combined with suffix (fill-in-the-middle)", param="echo"
        )

    if isinstance(request.prompt, tuple):
        body = list(request.prompt)
        bad = [t for t in body if t >= backend.vocab_size]
        if bad:
            raise InvalidRequest(
                f"prompt token id {bad[0]} is out of range (vocabulary of {backend.vocab_size})",
                param="prompt",
            )
    else:
        body = backend.tokenize(request.prompt)
    timeout = request.timeout if request.timeout is not None else default_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    if fim_used:
        return _prepare_fim(backend, fmt, request, body, suffix, deadline)

    bos: list[int] = []
    if not body:
        eos = sorted(backend.eos_token_ids)
        if not eos:
            raise InvalidRequest("prompt must not be empty for this model", param="prompt")
        bos = [eos[0]]

    max_tokens = request.max_tokens
    total = len(bos) + len(body)
    truncated = 0
    if total + max_tokens > ctx:
        if request.context_mode is ContextMode.ERROR:
            raise _too_long(ctx, total, max_tokens)
        reserve = _reserve(ctx, max_tokens)
        excess = total - (ctx - reserve)
        if excess > 0:
            cut = min(excess, len(body))
            body = body[cut:]
            truncated = cut
            if excess > truncated:
                raise ContextLengthExceeded(
                    f"the prompt needs {len(bos)} fixed tokens of the {ctx} context tokens",
                    param="prompt",
                )
        total = len(bos) + len(body)
        max_tokens = min(max_tokens, ctx - total)

    return PreparedPrompt(
        prompt_ids=tuple(bos + body),
        echo_ids=tuple(body),
        max_tokens=max_tokens,
        truncated=truncated,
        fim_used=False,
        suffix_ignored=suffix_ignored,
        deadline=deadline,
    )


def _reserve(ctx: int, max_tokens: int) -> int:
    """Completion tokens kept free when truncating: ``min(max_tokens, ctx // 4)``, >= 1."""
    return min(max_tokens, max(1, ctx // 4)) if max_tokens else 0


def _too_long(ctx: int, total: int, max_tokens: int) -> ContextLengthExceeded:
    return ContextLengthExceeded(
        f"This model's maximum context length is {ctx} tokens, however you requested "
        f"{total + max_tokens} tokens ({total} in your prompt; {max_tokens} for the "
        "completion). Please reduce your prompt or completion length.",
        param="prompt" if total + min(max_tokens, 1) > ctx else "max_tokens",
    )


def _prepare_fim(
    backend: Backend,
    fmt: FimFormat,
    request: CompletionRequest,
    prefix: list[int],
    suffix: str,
    deadline: float | None,
) -> PreparedPrompt:
    """The infill prompt through :func:`build_fim_prompt`, fitted like any other prompt.

    ``ContextMode.ERROR`` renders everything and refuses what does not fit;
    ``TRUNCATE`` gives the FIM layer the context minus the reserved completion
    tokens, and it keeps the end of the prefix and the start of the suffix.
    """
    ctx = int(backend.context_length)
    max_tokens = request.max_tokens
    files = request.context_files
    if request.context_mode is ContextMode.ERROR:
        fp = build_fim_prompt(backend, fmt, prefix, suffix, files, room=1 << 62)
        if len(fp.ids) + max_tokens > ctx:
            raise _too_long(ctx, len(fp.ids), max_tokens)
    else:
        fp = build_fim_prompt(
            backend, fmt, prefix, suffix, files, room=ctx - _reserve(ctx, max_tokens)
        )
        max_tokens = min(max_tokens, ctx - len(fp.ids))
    return PreparedPrompt(
        prompt_ids=fp.ids,
        echo_ids=fp.prefix_ids,
        max_tokens=max_tokens,
        truncated=fp.truncated,
        fim_used=True,
        suffix_ignored=False,
        deadline=deadline,
        stop_token_ids=fp.stop_ids,
        files_dropped=fp.files_dropped,
    )
