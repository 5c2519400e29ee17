"""The CTranslate2 Translator backend on converted tiny T5s (CodeT5 / CodeT5+ shapes).

Every expected value comes from transformers on the same checkpoint: greedy tokens
and their log-probabilities for completion (the prompt as encoder input, wrapped
``<s> ... </s>``) and for infill (``prefix<extra_id_0>suffix``, decoder started with
``<extra_id_0>``, ended by the next sentinel or ``</s>``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import tinymodels_infill
from tests.infill_fixtures import t5_models  # noqa: F401
from tests.servers import ServeProcess

PROMPT = "def fibonacci(n):\n    if n < 2:\n"
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
MAX_TOKENS = 10
MIN_TOKENS = 6  # the tiny model would often close at once; this keeps the text non-empty


@pytest.fixture(scope="module")
def model_dir(t5_models: dict[str, dict[str, Path]]) -> Path:  # noqa: F811
    return t5_models["codet5-base"]["ct2-float32"]


@pytest.fixture(scope="module")
def hf_dir(t5_models: dict[str, dict[str, Path]]) -> Path:  # noqa: F811
    return t5_models["codet5-base"]["hf"]


@pytest.fixture(scope="module")
def model(model_dir: Path):  # type: ignore[no-untyped-def]
    from fastpilot.loader import load

    m = load(model_dir, name="t5", threads=2)
    yield m
    m.close()


def _hf_greedy(
    hf: Path, source: list[int], forced: list[int], ends: set[int], n: int, min_tokens: int = 0
) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens after ``[start, *forced]`` and their log-probs.

    The end tokens are masked for the first ``min_tokens`` steps (``min_tokens`` keeps a
    tiny model from ending at once), and log-probs are of that masked distribution.
    """
    tokens: list[int] = []
    lps: list[float] = []
    for _ in range(n):
        logits = tinymodels_infill.t5_reference(hf, source, [0, *forced, *tokens])[-1]
        logits = logits.astype(np.float64)
        if len(tokens) < min_tokens:
            logits[sorted(ends)] = -np.inf
        lp = logits - logits.max()
        lp -= np.log(np.exp(lp).sum())
        tok = int(lp.argmax())
        if tok in ends:
            break
        tokens.append(tok)
        lps.append(float(lp[tok]))
    return tokens, lps


def _ids(model_dir: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


def _token_id(model_dir: Path, token: str) -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id(token))


def _ends(model_dir: Path) -> set[int]:
    return set(json.loads((model_dir / "fastpilot.json").read_text())["eos_token_ids"])


def test_loader_picks_the_translator_backend(model) -> None:  # type: ignore[no-untyped-def]
    assert model.backend.name == "ctranslate2-seq2seq"
    assert model.backend.encoder_decoder
    from fastpilot.engine.fim import FimStyle, fim_format

    assert fim_format(model.backend).style is FimStyle.T5_SPAN


def test_completion_equals_transformers_greedy_with_real_logprobs(
    model, model_dir: Path, hf_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    source = _ids(model_dir, PROMPT)  # <s> prompt </s>, as the tokenizer wraps it
    expected, lps = _hf_greedy(hf_dir, source, [], _ends(model_dir), MAX_TOKENS, MIN_TOKENS)
    out = model.complete(
        prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=1, min_tokens=MIN_TOKENS
    )
    choice = out["choices"][0]
    assert choice["text"] == model.backend.detokenize(expected)
    assert np.allclose(choice["logprobs"]["token_logprobs"], lps, atol=1e-3)
    assert choice["finish_reason"] == ("length" if len(expected) == MAX_TOKENS else "stop")


def test_stream_equals_complete(model) -> None:  # type: ignore[no-untyped-def]
    args = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "min_tokens": MIN_TOKENS}
    full = model.complete(**args)
    chunks = list(model.stream(**args))
    text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    assert len([c for c in chunks if c.get("choices")]) >= 2  # streamed, not one blob
    assert text == full["choices"][0]["text"]


def test_stepwise_path_greedy_equals_native(model) -> None:  # type: ignore[no-untyped-def]
    """``seed`` routes through the sampler-over-logits path; at temperature 0 it is argmax."""
    args = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "min_tokens": MIN_TOKENS}
    native = model.complete(**args, logprobs=0)
    stepwise = model.complete(**args, logprobs=0, seed=7)
    assert stepwise["choices"][0]["text"] == native["choices"][0]["text"]
    assert np.allclose(
        stepwise["choices"][0]["logprobs"]["token_logprobs"],
        native["choices"][0]["logprobs"]["token_logprobs"],
        atol=1e-4,
    )


def test_infill_through_suffix_and_rendered_sentinel(model, model_dir: Path, hf_dir: Path) -> None:  # type: ignore[no-untyped-def]
    source = _ids(model_dir, PREFIX + "<extra_id_0>" + SUFFIX)
    sentinel = _token_id(model_dir, "<extra_id_0>")
    ends = _ends(model_dir)
    expected, lps = _hf_greedy(hf_dir, source, [sentinel], ends, MAX_TOKENS, MIN_TOKENS)
    want = model.backend.detokenize(expected)
    args = {"max_tokens": MAX_TOKENS, "temperature": 0, "min_tokens": MIN_TOKENS}

    rendered = model.complete(prompt=PREFIX + "<extra_id_0>" + SUFFIX, logprobs=0, **args)
    assert rendered["choices"][0]["text"] == want
    assert np.allclose(rendered["choices"][0]["logprobs"]["token_logprobs"], lps, atol=1e-3)
    through_suffix = model.complete(prompt=PREFIX, suffix=SUFFIX, **args)
    assert through_suffix["choices"][0]["text"] == want
    assert "<extra_id" not in want


@pytest.mark.parametrize("params", [{"echo": True}, {"echo": True, "logprobs": 1}])
def test_echo_is_refused(model, params: dict) -> None:  # type: ignore[no-untyped-def]
    from fastpilot.errors import NotSupported

    with pytest.raises(NotSupported, match="encoder-decoder"):
        model.complete(prompt=PROMPT, max_tokens=2, **params)


def test_prompt_logprobs_and_embeddings_are_refused(model) -> None:  # type: ignore[no-untyped-def]
    from fastpilot.errors import NotSupported

    with pytest.raises(NotSupported, match="encoder-decoder"):
        model.backend.prompt_logprobs([5, 6, 7], 1)
    with pytest.raises(NotSupported):
        model.embed("x = 1")


def test_http_serves_t5_and_answers_400_for_echo(model_dir: Path) -> None:
    with ServeProcess(["--model", f"codet5={model_dir}", "--threads", "1"]) as server:
        status, body = server.request(
            "POST",
            "/v1/completions",
            {
                "model": "codet5",
                "prompt": PROMPT,
                "max_tokens": 4,
                "min_tokens": 2,
                "temperature": 0,
            },
        )
        assert status == 200, body
        assert json.loads(body)["choices"][0]["text"]
        status, body = server.request(
            "POST",
            "/v1/completions",
            {"model": "codet5", "prompt": PROMPT, "max_tokens": 4, "echo": True},
        )
        assert status == 400
        err = json.loads(body)["error"]
        assert err["param"] == "echo" and "encoder-decoder" in err["message"]
        status, body = server.request(
            "POST", "/v1/embeddings", {"model": "codet5", "input": "x = 1"}
        )
        assert status == 400, body
        status, _ = server.request(
            "POST", "/v1/completions", {"model": "codet5", "prompt": "x", "max_tokens": 2}
        )
        assert status == 200  # still serving
        # llama.cpp's /infill and the OpenAI suffix form render the same span prompt
        status, body = server.request(
            "POST",
            "/v1/completions",
            {
                "model": "codet5",
                "prompt": PREFIX,
                "suffix": SUFFIX,
                "max_tokens": 6,
                "temperature": 0,
            },
        )
        assert status == 200, body
        via_suffix = json.loads(body)["choices"][0]["text"]
        status, body = server.request(
            "POST",
            "/infill",
            {
                "model": "codet5",
                "input_prefix": PREFIX,
                "input_suffix": SUFFIX,
                "n_predict": 6,
                "temperature": 0,
            },
        )
        assert status == 200, body
        assert json.loads(body)["content"] == via_suffix


def test_close_fails_open_streams(model_dir: Path) -> None:
    """The backend contract: close() fails running and queued streams; later submits fail."""
    from fastpilot.backends.base import GenerationRequest, SamplingParams
    from fastpilot.errors import BackendError
    from fastpilot.loader import load

    m = load(model_dir, name="t5-close", threads=1, max_batch=1)
    backend = m.backend
    ids = backend.tokenize(PROMPT)
    params = SamplingParams(max_tokens=400, min_tokens=400, temperature=0)
    streams = [backend.submit(GenerationRequest(list(ids), params)) for _ in range(3)]
    first = iter(streams[0])
    next(first)  # the worker is generating the first one; the others wait (max_batch=1)
    m.close()
    with pytest.raises(BackendError, match="closed"):
        list(first)
    for queued in streams[1:]:
        with pytest.raises(BackendError, match="closed"):
            list(queued)
    with pytest.raises(BackendError):
        backend.submit(GenerationRequest(list(ids), params))


@pytest.mark.parametrize("logprobs", [0, None])
def test_concurrent_requests_equal_solo_ones(model, logprobs: int | None) -> None:  # type: ignore[no-untyped-def]
    """Requests submitted together (batched, or one by one when reading logits) = alone."""
    import threading

    prompts = [PROMPT, "import os\n", PREFIX + "<extra_id_0>" + SUFFIX, "class A:\n"]
    args = {"max_tokens": MAX_TOKENS, "temperature": 0, "min_tokens": 3, "logprobs": logprobs}
    solo = [model.complete(prompt=p, **args)["choices"][0] for p in prompts]
    together: list[dict | None] = [None] * len(prompts)

    def run(i: int) -> None:
        together[i] = model.complete(prompt=prompts[i], **args)["choices"][0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for a, b in zip(solo, together, strict=True):
        assert b is not None and a["text"] == b["text"]
        if logprobs is not None:
            assert np.allclose(
                a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"], atol=1e-4
            )
    assert model.backend.stats()["batches"] > 0
