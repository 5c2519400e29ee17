"""Prompt preparation: tokenization, fill-in-the-middle rendering and context fitting.

Every backend gets the same treatment here, so a prompt that is too long is
truncated (or refused) identically on CTranslate2 and llama.cpp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastpilot.backends.base import Backend
from fastpilot.engine.params import CompletionRequest, ContextMode
from fastpilot.errors import ContextLengthExceeded, InvalidRequest


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
    """
    ctx = int(backend.context_length)
    fim = backend.fim
    suffix = request.suffix or ""
    fim_used = bool(suffix) and fim is not None
    suffix_ignored = bool(suffix) and fim is None
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

    # FIM pieces are tokenized separately so that truncation can cut inside
    # the prefix (oldest tokens first) and then the suffix (farthest tokens
    # first) without breaking the template's marker tokens.
    head: list[int] = []  # prefix marker
    marks: list[int] = []  # suffix marker
    suffix_ids: list[int] = []
    tail: list[int] = []  # middle marker
    if fim_used:
        assert fim is not None
        head = backend.tokenize(fim.prefix)
        marks = backend.tokenize(fim.suffix)
        suffix_ids = backend.tokenize(suffix)
        tail = backend.tokenize(fim.middle)

    bos: list[int] = []
    if not body and not fim_used:
        eos = sorted(backend.eos_token_ids)
        if not eos:
            raise InvalidRequest("prompt must not be empty for this model", param="prompt")
        bos = [eos[0]]

    max_tokens = request.max_tokens
    fixed = len(head) + len(marks) + len(tail) + len(bos)
    total = fixed + len(body) + len(suffix_ids)
    truncated = 0
    if total + max_tokens > ctx:
        if request.context_mode is ContextMode.ERROR:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {ctx} tokens, however you requested "
                f"{total + max_tokens} tokens ({total} in your prompt; {max_tokens} for the "
                "completion). Please reduce your prompt or completion length.",
                param="prompt" if total + min(max_tokens, 1) > ctx else "max_tokens",
            )
        reserve = min(max_tokens, max(1, ctx // 4)) if max_tokens else 0
        excess = total - (ctx - reserve)
        if excess > 0:
            cut = min(excess, len(body))
            body = body[cut:]
            scut = min(excess - cut, len(suffix_ids))
            suffix_ids = suffix_ids[: len(suffix_ids) - scut]
            truncated = cut + scut
            if excess > truncated:
                raise ContextLengthExceeded(
                    f"the prompt template alone needs {fixed} of the {ctx} context tokens",
                    param="prompt",
                )
        total = fixed + len(body) + len(suffix_ids)
        max_tokens = min(max_tokens, ctx - total)

    prompt_ids = tuple(head + bos + body + marks + suffix_ids + tail)
    timeout = request.timeout if request.timeout is not None else default_timeout
    return PreparedPrompt(
        prompt_ids=prompt_ids,
        echo_ids=tuple(body),
        max_tokens=max_tokens,
        truncated=truncated,
        fim_used=fim_used,
        suffix_ignored=suffix_ignored,
        deadline=None if timeout is None else time.monotonic() + timeout,
    )
