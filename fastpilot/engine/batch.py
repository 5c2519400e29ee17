"""Several prompts in one completion request, as OpenAI runs them.

``prompt`` may be a list of texts or of token-id lists (LangChain's
``generate([...])``, openai-node, lm-evaluation-harness with ``batch_size`` >
1). Each prompt becomes one :class:`~fastpilot.engine.run.Run`; every run is
created -- so every sequence of every prompt is submitted to the backend --
before any is read, so the backend batches them all. The answer is OpenAI's:
choice ``j`` of prompt ``i`` is ``choices[i * n + j]`` (streamed events carry
that ``index``), ``usage`` is the sum over the prompts, and ``echo`` and
``logprobs`` apply to each prompt's own choices. A failure of any prompt
(context too long, queue full, deadline) fails the whole request and cancels
every sequence already submitted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from typing import Any

from fastpilot.engine.params import CompletionRequest
from fastpilot.engine.run import ChunkIterator, CompletionResult, CompletionStream, Run
from fastpilot.engine.sequences import interleave


def start_runs(req: CompletionRequest, new_run: Callable[[CompletionRequest], Run]) -> list[Run]:
    """One run per prompt, all submitted; on any failure every started run is cancelled."""
    runs: list[Run] = []
    try:
        for i in range(len(req.prompts)):
            runs.append(new_run(req.for_prompt(i)))
    except BaseException:
        for run in runs:
            run.finish(error=True)
        raise
    return runs


def sum_usage(usages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Usage of a multi-prompt request: every count summed over the prompts."""
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    cached = sum(u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for u in usages)
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    details = [u["completion_tokens_details"] for u in usages if "completion_tokens_details" in u]
    if details:  # speculative decoding ran for some prompt
        out["completion_tokens_details"] = {
            key: sum(d[key] for d in details)
            for key in ("accepted_prediction_tokens", "rejected_prediction_tokens")
        }
    return out


def complete(runs: Sequence[Run], n: int) -> CompletionResult:
    """Read every run to its end (they generate concurrently) and join their choices."""
    results: list[CompletionResult] = []
    try:
        for run in runs:
            results.append(run.complete())
    finally:
        for run in runs:
            run.finish(error=len(results) < len(runs))
    choices = []
    for i, result in enumerate(results):
        for choice in result.body["choices"]:
            choices.append({**choice, "index": i * n + choice["index"]})
    first = results[0].body
    body = {
        "id": first["id"],
        "object": first["object"],
        "created": first["created"],
        "model": first["model"],
        "choices": choices,
        "usage": sum_usage([r.body["usage"] for r in results]),
    }
    return CompletionResult(
        body,
        fim_used=any(r.fim_used for r in results),
        suffix_ignored=any(r.suffix_ignored for r in results),
        truncated=sum(r.truncated for r in results),
    )


class BatchStream(ChunkIterator):
    """The chunks of several prompts' streams as one stream, indices remapped to ``i * n + j``.

    Behaves like :class:`CompletionStream` (same attributes, ``close()`` from
    any thread, ``usage()``). Each prompt's stream is read by a daemon thread
    into one queue, so the chunks leave in the order they are made.
    """

    def __init__(self, runs: Sequence[Run], n: int, *, include_usage: bool) -> None:
        self._streams = [CompletionStream(run) for run in runs]
        first = self._streams[0]
        self.id = first.id
        self.created = first.created
        self.fim_used = any(s.fim_used for s in self._streams)
        self.suffix_ignored = any(s.suffix_ignored for s in self._streams)
        self.truncated = sum(s.truncated for s in self._streams)
        self.prompt_tokens = sum(s.prompt_tokens for s in self._streams)
        self._model = runs[0].ctx.name
        self._n = n
        self._closed = threading.Event()
        # A function of the parts, not a bound method: a generator holding ``self``
        # would make a cycle, and an abandoned request would run on until the cycle
        # collector found it instead of being cancelled by ``__del__``.
        self._chunks = _batch_chunks(
            self._streams, n, include_usage, self._closed, (self.id, self.created, self._model)
        )

    def close(self) -> None:
        """Cancel every prompt's sequences and end the iteration; idempotent."""
        self._closed.set()
        for stream in self._streams:
            stream.close()
        self._end_chunks()

    cancel = close

    def __del__(self) -> None:
        # Dropped without close(): the prompts' reader threads hold their streams, so
        # cancel them here or they would generate to the end.
        for stream in getattr(self, "_streams", ()):
            stream.close()

    def usage(self) -> dict[str, Any]:
        """Usage so far, summed over the prompts (complete once the iteration ended)."""
        return sum_usage([s.usage() for s in self._streams])


def _batch_chunks(
    streams: Sequence[CompletionStream],
    n: int,
    include_usage: bool,
    closed: threading.Event,
    head: tuple[str, int, str],
) -> Generator[dict[str, Any], None, None]:
    """Every prompt's chunks, re-indexed ``i * n + j``, in the order they are made."""
    request_id, created, model = head
    try:
        for i, item in interleave(streams, "fastpilot-prompt"):
            if item is not None:
                choices = [{**c, "index": i * n + c["index"]} for c in item["choices"]]
                chunk = {**item, "id": request_id, "created": created, "choices": choices}
                if include_usage:
                    chunk["usage"] = None  # as for one prompt: only the last event has it
                yield chunk
    finally:
        for stream in streams:
            stream.close()
    if include_usage and not closed.is_set():
        base = {"id": request_id, "object": "text_completion", "created": created}
        yield {
            **base,
            "model": model,
            "choices": [],
            "usage": sum_usage([s.usage() for s in streams]),
        }
