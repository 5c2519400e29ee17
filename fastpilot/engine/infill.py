"""Prompt warm-up: evaluate and cache an (infill) prompt without returning any text.

llama.vim and llama.vscode send ``/infill`` with ``n_predict: 0`` in the
background so that the server has the repository context cached when the
user next pauses. A request with ``max_tokens == 0`` normally never reaches
the backend, so :func:`warm` submits the prepared prompt for one greedy step
and throws that token away: the backend evaluates the prompt and keeps its
KV in its prompt cache exactly as for a real request.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastpilot.backends.base import GenerationRequest, SamplingParams
from fastpilot.engine.prompt import prepare
from fastpilot.errors import BackendError, FastpilotError

if TYPE_CHECKING:
    from fastpilot.engine.model import Model
    from fastpilot.engine.params import CompletionRequest


@dataclass(frozen=True, slots=True)
class Warmed:
    """What a warm-up did: prompt size, tokens served from the cache, seconds spent."""

    prompt_tokens: int
    cached_tokens: int
    truncated: int
    seconds: float


def warm(model: Model, request: CompletionRequest) -> Warmed:
    """Evaluate ``request``'s prompt (FIM rendered, fitted) and leave it in the prompt cache.

    Blocks until the backend has evaluated it (one decode step; the sampled
    token is discarded). Raises what :meth:`Model.complete` raises before
    generation (InvalidRequest, ContextLengthExceeded, QueueFull).
    """
    start = time.perf_counter()
    # Room for the discarded token, so the fitted prompt is the one a real request sends.
    req = dataclasses.replace(request, max_tokens=max(1, request.max_tokens))
    prep = prepare(model.backend, req, default_timeout=model.default_timeout)
    stream = model.backend.submit(
        GenerationRequest(
            prompt_ids=list(prep.prompt_ids),
            params=SamplingParams(max_tokens=1, temperature=0.0),
            deadline=prep.deadline,
            request_id="warm-" + model.new_id(),
        )
    )
    try:
        for _ in stream:
            pass
    except FastpilotError:
        raise
    except Exception as ex:  # a backend bug surfaces as a typed 500
        raise BackendError(f"warm-up failed: {type(ex).__name__}: {ex}") from ex
    finally:
        stream.cancel()
    return Warmed(
        prompt_tokens=len(prep.prompt_ids),
        cached_tokens=min(stream.cached_tokens, len(prep.prompt_ids)),
        truncated=prep.truncated,
        seconds=time.perf_counter() - start,
    )
