"""The sliding-window prompt cache on real llama.cpp: tiny f32 CodeGen (``phi2``, RoPE)
shifts, tiny GPT-2 (learned absolute positions) does not.

A prompt that slid by one line reuses the cached window through
``llama_memory_seq_rm`` + ``llama_memory_seq_add`` and evaluates only the new
tokens. Two references:

* **exact**: the same cells left where they were and the dropped ones removed,
  built with the raw llama.cpp API (attention under RoPE depends only on position
  differences, so this is what a correct shift computes). Measured on these three
  windows: within 1.6e-4 on the generated tokens' logprobs (1.4e-3 over the whole
  vocabulary, ``benchmarks/sliding_accuracy.py``: f16 keys re-rotated). A shift
  off by one position moves them by 0.04-0.09 here, a dropped shift by 0.09-0.15,
  one off the other way fails the decode. Tolerance: 1e-2.
* **cold**: a fresh evaluation of the new prompt. The shifted cells still carry
  the context of the line that slid out, so this is close, not equal: 0.012-0.025
  on these windows (up to 0.18 on the chosen tokens of 12 windows in
  ``benchmarks/sliding_accuracy.py``). Tolerance: 0.1, and the same greedy tokens.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastpilot.backends.base import GenerationRequest, SamplingParams
from fastpilot.backends.kv_reuse import Chunk, Reuse, plan_reuse
from fastpilot.backends.sampling import log_softmax
from fastpilot.manifest import find_gguf

pytestmark = pytest.mark.timeout(300)

MIN_CHUNK = 8  # the tiny models' windows are ~90 tokens (n_ctx 128)
GEN = 8
EXACT_ATOL = 1e-2
COLD_ATOL = 0.1


def _new(path: Path, **kw: Any) -> Any:
    from fastpilot.backends.llamacpp import LlamaCppBackend

    kw.setdefault("threads", 2)
    return LlamaCppBackend(path, **kw)


@pytest.fixture(scope="module")
def codegen(tiny_models: dict[str, dict[str, Path]]) -> Path:
    return tiny_models["codegen"]["gguf-f32"]


@pytest.fixture(scope="module")
def lines(codegen: Path) -> list[list[int]]:
    """textwrap.py from this interpreter's stdlib, one token list per line."""
    b = _new(codegen, slots=1)
    try:
        src = Path(textwrap.__file__).read_text().splitlines(keepends=True)[40:120]
        return [b.tokenize(line) for line in src]
    finally:
        b.close()


def window(lines: list[list[int]], first: int, n: int = 90) -> list[int]:
    """Whole lines from ``first`` on, as many as fit in ``n`` tokens."""
    out: list[int] = []
    for line in lines[first:]:
        if len(out) + len(line) > n:
            break
        out += line
    return out


def _greedy(n: int = GEN) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=3)


def _run(backend: Any, ids: list[int], n: int = GEN) -> tuple[list[tuple[int, float]], Any]:
    stream = backend.submit(GenerationRequest(list(ids), _greedy(n)))
    return [(s.token_id, s.logprob) for s in stream], stream


class Exact:
    """The cells a correct shift produces, computed without one: evaluate the old
    window (+ generated tokens) at positions 0.., drop the first ``k`` cells and the
    ones past the reused run, go on at the old positions. Raw llama.cpp, one sequence."""

    def __init__(self, path: Path) -> None:
        from fastpilot.backends.llamacpp_native import NativeBatch, context_params, load_library

        lib = self.lib = load_library()
        params = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(find_gguf(path)).encode(), params)
        assert self.model
        cparams = context_params(
            lib,
            n_ctx=256,
            n_seq=1,
            n_batch=256,
            n_ubatch=256,
            threads=2,
            threads_batch=2,
            flash_attn=False,
        )
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        assert self.ctx
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = NativeBatch(lib, 256)
        self.rows = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model)))

    def _decode(self, ids: list[int], pos0: int) -> np.ndarray:
        self.batch.clear()
        self.batch.add(ids, pos0, 0, 1)
        assert self.lib.llama_decode(self.ctx, self.batch.ready()) == 0
        ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
        return log_softmax(np.ctypeslib.as_array(ptr, shape=(self.rows,))[:800].astype(np.float64))

    def run(self, prompt: list[int], gen: list[int], k: int, kept: int, tail: list[int]):
        """Greedy GEN tokens (and logprobs) after: ``prompt`` in one batch and ``gen`` one
        by one (as the backend's slot got them), cells ``[0, k)`` and ``[k + kept, ...)``
        removed, then ``tail`` at the next position."""
        lib = self.lib
        lib.llama_memory_seq_rm(self.mem, 0, -1, -1)
        self._decode(prompt, 0)
        for i, t in enumerate(gen):
            self._decode([t], len(prompt) + i)
        lib.llama_memory_seq_rm(self.mem, 0, 0, k)
        lib.llama_memory_seq_rm(self.mem, 0, k + kept, -1)
        pos = k + kept
        lp = self._decode(tail, pos)
        pos += len(tail)
        out = []
        for _ in range(GEN):
            t = int(np.argmax(lp))
            out.append((t, float(lp[t])))
            lp = self._decode([t], pos)
            pos += 1
        return out

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


@pytest.fixture(scope="module")
def exact(codegen: Path):
    e = Exact(codegen)
    yield e
    e.close()


@pytest.mark.parametrize("first", [0, 9, 21])
def test_a_slid_prompt_shifts_the_cache_and_matches_both_references(
    codegen: Path, lines: list[list[int]], exact: Exact, first: int
) -> None:
    b = _new(codegen, slots=2, cache_reuse=MIN_CHUNK)
    cold = _new(codegen, slots=1)
    try:
        assert b.info.extra["cache_reuse"] == MIN_CHUNK
        old, new = window(lines, first), window(lines, first + 1)
        k = len(lines[first])
        assert new[: len(old) - k] == old[k:]
        first_out, _ = _run(b, old)
        before = b.stats()
        got, stream = _run(b, new)
        after = b.stats()
        # The slot held the old window and the generated tokens but the last; the run
        # reused is the old window after its first line (and more if the generated
        # tokens happen to continue like the new prompt).
        gen = [t for t, _ in first_out[:-1]]
        reuse = plan_reuse([*old, *gen], new, MIN_CHUNK)
        kept = reuse.tokens
        assert reuse == Reuse(0, (Chunk(k, 0, kept),)) and kept >= len(old) - k
        assert stream.cached_tokens == kept
        assert after["kv_shifts"] - before["kv_shifts"] == 1
        assert after["shifted_prompt_tokens"] - before["shifted_prompt_tokens"] == kept
        assert (
            after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"] == len(new) - kept
        )

        want = exact.run(old, gen, k, kept, new[kept:])
        assert [t for t, _ in got] == [t for t, _ in want]
        np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in want], atol=EXACT_ATOL)

        cold_out, cold_stream = _run(cold, new)
        assert cold_stream.cached_tokens == 0
        assert [t for t, _ in got] == [t for t, _ in cold_out]
        np.testing.assert_allclose(
            [lp for _, lp in got], [lp for _, lp in cold_out], atol=COLD_ATOL
        )
    finally:
        b.close()
        cold.close()


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """Same tokens; logprobs up to llama.cpp's batch-size dependent rounding (a decode of
    two sequences is not bit-identical to one of a single sequence)."""
    assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in want], atol=2e-3)


def _twin(path: Path, history: list[list[int]], **kw: Any) -> Any:
    """A backend whose slots have served ``history`` one by one (greedy GEN tokens)."""
    b = _new(path, cache_reuse=MIN_CHUNK, **kw)
    for prompt in history:
        _run(b, prompt)
    return b


def test_identical_slid_prompts_share_the_shifted_prefill(
    codegen: Path, lines: list[list[int]]
) -> None:
    """``n > 1``: the same slid prompt twice at once shifts once, prefills once, and both
    get what one request alone gets."""
    old, new = window(lines, 30), window(lines, 31)
    solo = _twin(codegen, [old], slots=2)
    b = _twin(codegen, [old], slots=2)
    try:
        want, _ = _run(solo, new)
        before = b.stats()
        streams = [b.submit(GenerationRequest(new, _greedy())) for _ in range(2)]
        got = [[(s.token_id, s.logprob) for s in st] for st in streams]
        after = b.stats()
        assert got[0] == got[1]
        _same(got[0], want)
        assert after["kv_shifts"] - before["kv_shifts"] == 1
        assert after["shared_prefills"] - before["shared_prefills"] == 1
        assert sorted(st.cached_tokens for st in streams) == [
            solo.stats()["cached_prompt_tokens"],
            len(new),
        ]
    finally:
        solo.close()
        b.close()


def test_concurrent_slid_prompts_each_reuse_their_own_slot(
    codegen: Path, lines: list[list[int]]
) -> None:
    """Two editors' windows cached in two slots, both slid and sent at once: each picks
    the slot that saves it the most, and each gets what it gets alone."""
    a_old, b_old = window(lines, 0), window(lines, 40)
    a_new, b_new = window(lines, 1), window(lines, 42)
    alone = [_twin(codegen, [a_old], slots=1), _twin(codegen, [b_old], slots=1)]
    both = _twin(codegen, [a_old, b_old], slots=3)
    try:
        want = [_run(alone[0], a_new)[0], _run(alone[1], b_new)[0]]
        before = both.stats()
        streams = [both.submit(GenerationRequest(p, _greedy())) for p in (b_new, a_new)]
        got = [[(s.token_id, s.logprob) for s in st] for st in streams]
        after = both.stats()
        _same(got[0], want[1])
        _same(got[1], want[0])
        assert after["kv_shifts"] - before["kv_shifts"] == 2
        saved = [st.cached_tokens for st in streams]
        assert saved[0] >= len(b_old) - len(lines[40]) - len(lines[41])
        assert saved[1] >= len(a_old) - len(lines[0])
        evaluated = after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"]
        assert evaluated == len(a_new) + len(b_new) - sum(saved)
    finally:
        for x in (*alone, both):
            x.close()


def test_gpt2_never_shifts_and_still_hits_its_prefix(
    tiny_models: dict[str, dict[str, Path]], lines: list[list[int]]
) -> None:
    """Learned absolute positions: the backend turns cache_reuse off, a slid prompt is
    evaluated again in full, a grown one reuses its prefix as before."""
    b = _new(tiny_models["gpt2"]["gguf-f32"], slots=1, cache_reuse=MIN_CHUNK)
    try:
        assert b.info.extra["cache_reuse"] == 0
        old, new = window(lines, 0), window(lines, 1)
        _run(b, old)
        before = b.stats()
        _, stream = _run(b, new)
        assert stream.cached_tokens == 0
        grown = new + lines[len(lines) // 2][:5]
        _, stream = _run(b, grown)
        assert stream.cached_tokens == len(new)
        after = b.stats()
        assert after["kv_shifts"] == 0 and after["shifted_prompt_tokens"] == 0
        assert after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"] == len(new) + 5
    finally:
        b.close()
