"""llama.cpp-specific behaviour on tiny random GPT-2 and CodeGen GGUF files.

The contract every backend shares (exactness against transformers, seeds,
cancellation, deadlines, the queue, closing, padded vocabularies ...) is
tests/test_backend_contract.py; the batching policy alone is tests/test_scheduler.py.
Here is what only this backend has, end to end through the real llama.cpp (f32
GGUF, q4_k_m for a smoke test): slots and the prompt cache, KV copies, shared
prefills, batch order, embeddings, native failures, interpreter exit. The models
are the session fixtures of ``tests/conftest.py``. Decode steps and evaluated
tokens are counted with ``backend.stats()``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastpilot.backends.base import FinishReason, GenerationRequest, SamplingParams, TokenStream
from fastpilot.errors import BackendError, ContextLengthExceeded
from tests import tinymodels
from tests.reference import Ref

pytestmark = pytest.mark.timeout(300)

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
EOS = tinymodels.VOCAB_SIZE - 1  # "<|endoftext|>" is the last tokenizer id in both tiny models


@pytest.fixture(scope="module")
def built(tiny_models: dict[str, dict[str, Path]]) -> dict[str, Path]:
    """``"<arch>-hf"``, ``"<arch>-f32"``, ``"<arch>-q4_k_m"`` from the shared tiny models."""
    return {
        f"{arch}-{key}": tiny_models[arch][src]
        for arch in ("gpt2", "codegen")
        for key, src in (("hf", "hf"), ("f32", "gguf-f32"), ("q4_k_m", "gguf-q4_k_m"))
    }


@pytest.fixture(scope="module", params=["gpt2", "codegen"])
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def ref(built: dict[str, Path], arch: str) -> Ref:
    return Ref(built[f"{arch}-hf"])


@pytest.fixture(scope="module")
def backend(built: dict[str, Path], arch: str):
    from fastpilot.backends.llamacpp import LlamaCppBackend

    # prompt_chunk 16: the tiny prompts still need several prefill chunks.
    b = LlamaCppBackend(built[f"{arch}-f32"], threads=2, slots=4, prompt_chunk=16)
    yield b
    b.close()


def _new(built: dict[str, Path], arch: str, **kw):
    from fastpilot.backends.llamacpp import LlamaCppBackend

    kw.setdefault("threads", 2)
    return LlamaCppBackend(built[f"{arch}-f32"], **kw)


class Hook(TokenStream):
    """A stream that runs ``action`` in the worker thread right after its ``at``-th step.

    Enqueued with the backend's private ``_enqueue`` (submit builds its own stream).
    """

    def __init__(self, request: GenerationRequest, at: int, action) -> None:
        super().__init__(request)
        self.at, self.action, self.count = at, action, 0

    def put(self, step) -> None:
        super().put(step)
        self.count += 1
        if self.count == self.at:
            self.action(self)


def _greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def _run(backend, ids: list[int], params: SamplingParams) -> tuple[list[int], TokenStream]:
    stream = backend.submit(GenerationRequest(list(ids), params))
    return [s.token_id for s in stream], stream


def _prompt(backend, text: str, n: int) -> list[int]:
    ids = backend.tokenize(text)
    assert len(ids) >= n
    return ids[:n]


def _long_text() -> str:
    return "".join(tinymodels.SNIPPETS) * 3


@contextmanager
def _cached_and_cold(built: dict[str, Path], arch: str) -> Iterator[tuple[Any, Any]]:
    """A two-slot backend with a 16-token prompt cache and a one-slot one to compare with."""
    b = _new(built, arch, slots=2, prompt_chunk=16)
    cold = _new(built, arch, slots=1)
    try:
        yield b, cold
    finally:
        b.close()
        cold.close()


def _base_and_longer(b: Any, n_base: int, n_more: int) -> tuple[list[int], list[int]]:
    """``n_base`` tokens of the long text, and them followed by ``n_more`` other tokens."""
    base = _prompt(b, _long_text(), n_base)
    return base, base + _prompt(b, "    return fibonacci(n - 1)\n", n_more)


# -- model facts -----------------------------------------------------------------------
def test_backend_runs_on_the_session_device(backend, llamacpp_device) -> None:
    # ``pytest --device cuda`` (tests/conftest.py) must reach the backend: a GPU run whose
    # backends stayed on the CPU would report CPU results as CUDA ones.
    assert backend.info.device == llamacpp_device


def test_metadata_and_tokenizer_match_hf(backend, built, arch) -> None:
    from transformers import AutoTokenizer

    assert backend.context_length == tinymodels.N_CTX
    assert EOS in backend.eos_token_ids
    # vocab_size is the tokenizer's; CodeGen's padded output rows are counted apart.
    rows = tinymodels.CODEGEN_PADDED_VOCAB if arch == "codegen" else tinymodels.VOCAB_SIZE
    assert backend.vocab_size == tinymodels.VOCAB_SIZE and backend._n_rows == rows
    assert backend.info.arch == arch and backend.info.quantization == "f32"
    hf = AutoTokenizer.from_pretrained(built[f"{arch}-hf"])
    for text in tinymodels.SNIPPETS:
        ids = backend.tokenize(text)
        assert ids == hf(text)["input_ids"]
        assert backend.detokenize(ids) == text
    assert backend.token_bytes(EOS) == b"<|endoftext|>"


def test_a_scored_prompt_stays_cached(backend) -> None:
    """prompt_logprobs (echo) leaves the prompt's KV in its slot: generating from the
    same prompt next evaluates only its last token."""
    ids = backend.tokenize(tinymodels.SNIPPETS[0])  # > one 16-token scoring chunk
    got = backend.prompt_logprobs(ids, 2)
    assert got[0] is None and len(got) == len(ids)
    before = backend.stats()["prompt_tokens_evaluated"]
    _, stream = _run(backend, ids, _greedy(1))
    assert stream.cached_tokens == len(ids) - 1
    assert backend.stats()["prompt_tokens_evaluated"] - before == 1


def test_embeddings_are_mean_pooled_hidden_states(backend, ref) -> None:
    texts = ["def f(x):\n    return x", "import os"]
    got = backend.embed(texts)
    for text, vec in zip(texts, got, strict=True):
        want = ref.embedding(backend.tokenize(text))
        np.testing.assert_allclose(vec, want, atol=2e-3 * max(1.0, float(np.abs(want).max())))


def test_quantized_q4_k_m_generates(built, arch) -> None:
    from fastpilot.backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(built[f"{arch}-q4_k_m"], threads=2, slots=2)
    try:
        assert b.info.quantization == "q4_k_m"
        toks, stream = _run(b, b.tokenize(PROMPT), _greedy(8, ignore_eos=True))
        assert len(toks) == 8 and stream.finish_reason is FinishReason.LENGTH
    finally:
        b.close()


# -- continuous batching ---------------------------------------------------------------
def test_concurrent_requests_equal_sequential(built, arch) -> None:
    text = _long_text()
    solo = _new(built, arch, slots=1)
    many = _new(built, arch, slots=4, prompt_chunk=16)
    try:
        prompts = [solo.tokenize(text[i * 40 :])[: 10 + 11 * i] for i in range(8)]
        params = _greedy(20, ignore_eos=True)
        want = [_run(solo, p, params)[0] for p in prompts]
        results: list[list[int] | None] = [None] * 8

        def go(i: int) -> None:
            results[i] = _run(many, prompts[i], params)[0]

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == want
        stats = many.stats()
        # 8 requests over 4 slots in fewer steps than running them one by one would take.
        assert stats["tokens_generated"] == 8 * 20
        assert stats["decode_steps"] < solo.stats()["decode_steps"]
    finally:
        solo.close()
        many.close()


def test_identical_prompts_share_one_prefill(built, arch, logprob_atol) -> None:
    b = _new(built, arch, slots=4, prompt_chunk=8)
    solo = _new(built, arch, slots=1)
    try:
        ids = b.tokenize(tinymodels.SNIPPETS[1])[:60]
        params = _greedy(12, ignore_eos=True, logprobs=1)
        streams = [b.submit(GenerationRequest(ids, params)) for _ in range(3)]
        got = [[(s.token_id, s.logprob) for s in st] for st in streams]
        stats = b.stats()
        assert stats["shared_prefills"] == 2
        assert stats["prompt_tokens_evaluated"] == len(ids)  # evaluated once, not three times
        assert sorted(st.cached_tokens for st in streams) == [0, len(ids), len(ids)]
        # The copies are exact: all three sequences see bit-identical logits.
        assert got[0] == got[1] == got[2]
        # Against a lone run: same tokens; logprobs agree up to llama.cpp's batch-size
        # dependent rounding (a 3-row decode is not bit-identical to a 1-row one).
        want = [(s.token_id, s.logprob) for s in solo.submit(GenerationRequest(ids, params))]
        assert [t for t, _ in got[0]] == [t for t, _ in want]
        np.testing.assert_allclose(
            [lp for _, lp in got[0]], [lp for _, lp in want], atol=max(2e-3, logprob_atol)
        )
        # Sampling with seeds over a shared prefill reproduces run to run.
        seeded = [SamplingParams(max_tokens=12, temperature=0.9, seed=s) for s in (1, 2, 3)]

        def sampled() -> list[list[int]]:
            sts = [b.submit(GenerationRequest(ids + [5], p)) for p in seeded]
            return [[s.token_id for s in st] for st in sts]

        first = sampled()
        assert first == sampled() and len({tuple(x) for x in first}) > 1
    finally:
        b.close()
        solo.close()


# -- prompt cache ---------------------------------------------------------------------
def test_prompt_cache_evaluates_only_new_tokens(built, arch) -> None:
    with _cached_and_cold(built, arch) as (b, cold):
        base, longer = _base_and_longer(b, 70, 10)
        _run(b, base, _greedy(1))
        before = b.stats()
        toks, stream = _run(b, longer, _greedy(10, ignore_eos=True))
        after = b.stats()
        assert stream.cached_tokens == len(base)
        assert after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"] == 10
        assert toks == _run(cold, longer, _greedy(10, ignore_eos=True))[0]
        # The identical prompt again: everything cached except the last token (for its logits).
        toks2, stream2 = _run(b, longer, _greedy(10, ignore_eos=True))
        assert toks2 == toks and stream2.cached_tokens == len(longer) - 1
        assert b.stats()["prompt_tokens_evaluated"] - after["prompt_tokens_evaluated"] == 1


def test_slot_choice_prefers_longest_prefix(built, arch) -> None:
    b = _new(built, arch, slots=2)
    try:
        a = _prompt(b, tinymodels.SNIPPETS[0], 30)
        c = _prompt(b, tinymodels.SNIPPETS[2], 30)
        _run(b, a, _greedy(1))
        _run(b, c, _greedy(1))  # the other (LRU, empty) slot; ``a`` stays cached
        _, stream = _run(b, a + c[:5], _greedy(1))
        assert stream.cached_tokens == 30
        _, stream = _run(b, c + a[:5], _greedy(1))
        assert stream.cached_tokens == 30
    finally:
        b.close()


def test_prefix_is_copied_from_a_running_request(built, arch) -> None:
    with _cached_and_cold(built, arch) as (b, cold):
        base, longer = _base_and_longer(b, 60, 8)
        want = _run(cold, longer, _greedy(8, ignore_eos=True))[0]
        late: list[TokenStream] = []

        def submit_late(_: TokenStream) -> None:  # runs while the first request generates
            late.append(b.submit(GenerationRequest(longer, _greedy(8, ignore_eos=True))))

        first = Hook(
            GenerationRequest(base, _greedy(20, ignore_eos=True)), at=2, action=submit_late
        )
        b._enqueue(first)
        assert len(list(first)) == 20
        assert [s.token_id for s in late[0]] == want
        # (>=: the first generated token may happen to equal longer[len(base)])
        cached = late[0].cached_tokens
        assert cached >= len(base)
        assert b.stats()["prefix_copies"] == 1
        assert b.stats()["prompt_tokens_evaluated"] == len(base) + len(longer) - cached


def test_batches_are_in_slot_order_and_busy_slots_stay_contiguous(built, arch) -> None:
    """llama.cpp evaluates one graph per run of consecutive sequence ids in the batch
    (non-unified KV), so the backend orders every batch by slot and, when no slot holds
    a useful prefix, picks the free slot that keeps the busy ones contiguous."""
    b = _new(built, arch, slots=4, prompt_chunk=16)
    seen: list[list[int]] = []
    decode = b._decode

    def recording(lane, entries):  # runs in the worker thread
        seen.append([e.seq_id for e in entries])
        return decode(lane, entries)

    b._decode = recording
    try:
        snippets = [s for s in tinymodels.SNIPPETS if len(b.tokenize(s)) >= 6][:4]
        prompts = [_prompt(b, s, 6) for s in snippets]
        params = _greedy(400, ignore_eos=True)
        running = [b.submit(GenerationRequest(p, params)) for p in prompts[:3]]
        its = [iter(s) for s in running]
        for it in its:
            next(it)  # all three hold a slot now: 0, 1 and 2
        slot_of = {id(q.owner.stream): q.slot.seq_id for q in list(b._sched.running)}
        assert sorted(slot_of[id(s)] for s in running) == [0, 1, 2]
        middle = next(s for s in running if slot_of[id(s)] == 1)
        middle.cancel()
        deadline = time.monotonic() + 10
        while b.stats()["busy_slots"] != 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        # Slot 3 was never used (least recently used); slot 1 keeps {0, 1, 2} one run.
        late = b.submit(GenerationRequest(prompts[3], params))
        it_late = iter(late)
        next(it_late)
        late_slot = next(q.slot.seq_id for q in list(b._sched.running) if q.owner.stream is late)
        assert late_slot == 1
        for s in [*running, late]:
            s.cancel()
        assert all(ids == sorted(ids) for ids in seen)
        assert any(len(ids) == 3 for ids in seen)
    finally:
        b.close()


# -- finishing -------------------------------------------------------------------------
def test_cancel_stops_decoding_at_once_and_frees_the_slot(built, arch) -> None:
    b = _new(built, arch, slots=2)
    try:
        ids = b.tokenize(PROMPT)
        params = _greedy(100, ignore_eos=True)
        # Alone: cancelled (from the worker, at its 3rd token) -> no further decode step.
        at_cancel: list[float] = []

        def cancel(stream: TokenStream) -> None:
            stream.cancel()
            at_cancel.append(b.stats()["decode_steps"])

        lone = Hook(GenerationRequest(ids, params), at=3, action=cancel)
        b._enqueue(lone)
        assert len(list(lone)) == 3 and lone.finish_reason is FinishReason.CANCELLED
        time.sleep(0.1)
        assert b.stats()["decode_steps"] == at_cancel[0]
        assert b.stats()["busy_slots"] == 0
    finally:
        b.close()


def test_a_prompt_filling_the_context_is_rejected_at_submit(backend) -> None:
    with pytest.raises(ContextLengthExceeded):
        backend.submit(GenerationRequest(_prompt(backend, _long_text(), 128), _greedy(1)))


# -- errors ----------------------------------------------------------------------------
def test_native_error_fails_only_the_affected_stream(built, arch) -> None:
    b = _new(built, arch, slots=2)
    try:
        ids = b.tokenize(PROMPT)
        want = _run(b, ids, _greedy(12, ignore_eos=True))[0]
        # Bypass submit's validation so llama_decode itself rejects the batch.
        bad = TokenStream(GenerationRequest([1, 2, b._n_rows + 5], _greedy(4)))
        good = TokenStream(GenerationRequest(list(ids), _greedy(12, ignore_eos=True)))
        b._enqueue(bad)
        b._enqueue(good)
        with pytest.raises(BackendError):
            list(bad)
        assert [s.token_id for s in good] == want
        assert b.stats()["decode_errors"] >= 1
        assert _run(b, ids, _greedy(12, ignore_eos=True))[0] == want  # still serving
    finally:
        b.close()


def test_interpreter_exit_with_an_open_backend_is_clean(built, arch) -> None:
    """The atexit hook stops the worker mid-generation before native memory is freed."""
    import subprocess
    import sys

    code = (
        "from fastpilot.backends.llamacpp import LlamaCppBackend\n"
        "from fastpilot.backends.base import GenerationRequest, SamplingParams\n"
        f"b = LlamaCppBackend({str(built[f'{arch}-f32'])!r}, threads=1)\n"
        "p = SamplingParams(max_tokens=120, ignore_eos=True)\n"
        "s = b.submit(GenerationRequest([1, 2, 3], p))\n"
        "next(iter(s))\n"
        "print('exiting', flush=True)\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "exiting"


def test_logits_rows_are_the_native_rows_without_copies(built, arch) -> None:
    """LogitsRows hands out views of llama.cpp's output rows (the sampler reads them in
    place): for every batch index with logits, the same memory and values as
    ``llama_get_logits_ith``, one view per row, for a batch of two sequences of
    different lengths with logits for part of one of them. The native call keeps the GIL
    (a ``PyDLL`` function pointer)."""
    import ctypes

    from fastpilot.backends.llamacpp_native import LogitsRows, NativeBatch

    b = _new(built, arch, slots=2)
    try:
        lib, ctx, n = b._lib, b._ctx, b._n_rows  # the worker is idle: nothing was submitted
        batch = NativeBatch(lib, 16)
        batch.add([1, 2, 3], 0, 0, 1)  # logits for index 2 only
        batch.add([4, 5, 6, 7, 8], 0, 1, 5)  # indices 3..7
        assert lib.llama_decode(ctx, batch.ready()) == 0
        rows = LogitsRows(lib, ctx, n)
        assert rows._fn._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]
        for i in (2, 3, 4, 5, 6, 7):
            want = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(n,))
            got = rows(i)
            assert got.shape == (n,) and got.dtype == np.float32
            assert got.ctypes.data == want.ctypes.data
            assert np.array_equal(got, want)
            assert rows(i) is got
        lib.llama_memory_clear(b._mem, True)
    finally:
        b.close()


def test_native_batch_single_token_adds() -> None:
    """The one-token fast path of NativeBatch.add writes token, position, sequence and
    the logits flag as the multi-token path does, and returns the token's batch index."""
    from fastpilot.backends.llamacpp_native import NativeBatch, load_library

    lib = load_library()
    batch = NativeBatch(lib, 8)
    assert batch.add([5, 6], 3, 0, 1) == 1  # the slice path: logits for the last only
    assert batch.add([7], 9, 2, 0) == 2
    assert batch.add((11,), 0, 1, True) == 3
    assert batch.token[:4].tolist() == [5, 6, 7, 11]
    assert batch.pos[:4].tolist() == [3, 4, 9, 0]
    assert batch.seq[:4].tolist() == [0, 0, 2, 1]
    assert batch.logits[:4].tolist() == [0, 1, 0, 1]
    assert batch.ready().n_tokens == 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF symbol scopes")
def test_libllama_binds_its_cxx_calls_to_the_shared_runtime() -> None:
    """load_library puts libstdc++ in the global symbol scope before llama_cpp opens
    libllama, so a CUDA build's libggml-cuda cannot lend libllama its private copy of
    the ostream code (the H200 crash in ``llama_model::print_info``). In a fresh process,
    the global scope lacks ``std::ostream::operator<<(int)`` before and has it after,
    and the dynamic linker's record shows libllama's binding of it going to libstdc++."""
    import subprocess

    code = (
        "import ctypes; g = ctypes.CDLL(None); before = hasattr(g, '_ZNSolsEi'); "
        "from fastpilot.backends.llamacpp_native import load_library; load_library(); "
        "print(before, hasattr(g, '_ZNSolsEi'))"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LD_DEBUG": "bindings"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True"]
    bound = [
        line.split(" to ")[1].split()[0]
        for line in proc.stderr.splitlines()
        if "libllama" in line.split(" to ")[0] and "`_ZNSolsEi'" in line
    ]
    assert bound and all(Path(t).name.startswith("libstdc++") for t in bound), bound


def test_byte_table_equals_the_tokenizer_on_every_token(backend, built, arch) -> None:
    """Detokenizing reads a table of every token's bytes, made once at load: each entry
    must be the bytes the HF tokenizer's byte-level alphabet stands for, and streaming
    ids through it must hold a split UTF-8 character back and emit it whole."""
    from transformers import AutoTokenizer

    from fastpilot.engine.detok import IncrementalDetokenizer

    hf = AutoTokenizer.from_pretrained(built[f"{arch}-hf"])
    # Byte-level BPE's alphabet: printable Latin-1 bytes stand for themselves, the other
    # bytes (controls, space, 0x7f-0xa0, 0xad) for chr(256 + k) in byte order.
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}
    special = set(hf.all_special_ids)
    for tok in range(backend.vocab_size):
        piece = hf.convert_ids_to_tokens(tok)
        want = piece.encode() if tok in special else bytes(to_byte[c] for c in piece)
        assert backend.token_bytes(tok) == want, tok
    text = "s = '中文 é 😀'  # ünïcode\n"
    ids = backend.tokenize(text)
    detok = IncrementalDetokenizer(backend.token_bytes)
    pieces = [detok.feed(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
