"""N-gram speculative decoding on the real llama.cpp backend: output must not change.

Each test compares a backend with ``speculative="ngram"`` against one with it
off, on the tiny random GPT-2 and CodeGen GGUFs of tests/conftest.py, with
prompts that repeat themselves so drafts are proposed and some accepted (the
tests assert they were). The whole backend contract also runs with speculation
on (the ``llamaspec-*`` subjects of tests/test_backend_contract.py); the plans
themselves are tested without a model in tests/test_speculative.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastpilot.backends.base import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Step,
    TokenStream,
)
from fastpilot.backends.scheduler import Plan, SeqState
from tests import tinymodels

pytestmark = pytest.mark.timeout(300)

# Code that repeats: the n-gram drafter finds its continuations in the prompt.
REPEATING = "for i in range(10):\n    x = f(i)\n    y = g(x)\n" * 3 + "for i in range(10):\n"


@pytest.fixture(scope="module", params=["gpt2", "codegen"])
def pair(request: pytest.FixtureRequest, tiny_models: dict[str, dict[str, Path]]) -> Iterator:
    """(plain, speculative) llama.cpp backends on one architecture's f32 GGUF."""
    from fastpilot.backends.llamacpp import LlamaCppBackend

    path = tiny_models[str(request.param)]["gguf-f32"]
    kw = {"threads": 2, "slots": 2, "prompt_chunk": 32, "max_queue": 512}
    plain = LlamaCppBackend(path, speculative="off", **kw)
    spec = LlamaCppBackend(path, speculative="ngram", draft_max=6, **kw)
    # Drafts as long as the acceptance allows, whatever this machine's timings say: every
    # test below exercises verification (the cost-based length is tests/test_speculative.py's).
    spec._sched.draft_cost.pin(0.0)
    yield plain, spec
    plain.close()
    spec.close()


def run(backend, ids: list[int], **kw) -> tuple[list[Step], FinishReason | None]:
    kw.setdefault("temperature", 0.0)
    stream = backend.submit(GenerationRequest(list(ids), SamplingParams(**kw)))
    return list(stream), stream.finish_reason


def test_greedy_output_and_logprobs_are_unchanged(pair, logprob_atol) -> None:
    plain, spec = pair
    ids = plain.tokenize(REPEATING)
    for kw in ({"max_tokens": 40}, {"max_tokens": 33, "ignore_eos": True, "logprobs": 3}):
        want, want_end = run(plain, ids, **kw)
        before = spec.stats()
        got, got_end = run(spec, ids, **kw)
        after = spec.stats()
        assert [s.token_id for s in got] == [s.token_id for s in want]
        assert got_end == want_end
        for g, w in zip(got, want, strict=True):  # each logprob is the model's at its position
            assert g.logprob == pytest.approx(w.logprob, abs=logprob_atol)
            assert [t for t, _ in g.top_logprobs] == [t for t, _ in w.top_logprobs]
        assert after["draft_tokens_accepted"] > before["draft_tokens_accepted"]
        # Fewer decodes than tokens: accepted drafts cost no step of their own.
        assert after["decode_steps"] - before["decode_steps"] < len(got) + 2
    assert plain.stats()["draft_tokens_accepted"] == 0


def test_streams_decoding_together_draft_together_and_keep_their_output(pair) -> None:
    # Two streams at once: each step's batch holds both, and both draft (one length,
    # tests/test_speculative.py) -- fewer steps than tokens -- with the plain output.
    plain, spec = pair
    prompts = [plain.tokenize(REPEATING), plain.tokenize(REPEATING.replace("x", "z"))]
    kw = {"max_tokens": 40, "ignore_eos": True, "temperature": 0.0}
    want = [[s.token_id for s in run(plain, ids, **kw)[0]] for ids in prompts]
    shapes: list[tuple[int, ...]] = []  # tokens per decoding sequence of each planned step
    for lane in spec._lanes:
        plan_step = lane.sched.plan_step

        def watched(plan_step=plan_step) -> Plan:
            plan = plan_step()
            decoding = [e for e in plan.entries if e.seq.state is SeqState.DECODING]
            shapes.append(tuple(len(e.tokens) for e in decoding))
            return plan

        lane.sched.plan_step = watched  # type: ignore[method-assign]
    before = spec.stats()
    try:
        live = [spec.submit(GenerationRequest(list(ids), SamplingParams(**kw))) for ids in prompts]
        got = [[s.token_id for s in stream] for stream in live]
    finally:
        for lane in spec._lanes:
            del lane.sched.plan_step
    after = spec.stats()
    assert got == want
    assert after["draft_tokens_accepted"] > before["draft_tokens_accepted"]
    assert after["decode_steps"] - before["decode_steps"] < 40
    together = [t for t in shapes if len(t) == 2]
    assert any(t[0] > 1 for t in together)  # both streams drafted in one step
    assert all(t[0] == t[1] for t in together)  # and always the same number


def test_penalties_and_bias_see_exactly_the_emitted_tokens(pair, logprob_atol) -> None:
    """Row i+1 of a draft is processed with the counts after token i, as plain decoding does."""
    plain, spec = pair
    ids = plain.tokenize(REPEATING)
    before = spec.stats()["draft_tokens_accepted"]
    for kw in (
        {"frequency_penalty": 0.3, "presence_penalty": 0.2},
        {"repetition_penalty": 1.1, "logit_bias": ((ids[3], 2.0),)},
        {"temperature": 0.7, "top_p": 0.9, "seed": 11, "frequency_penalty": 0.2},
    ):
        params = {"max_tokens": 30, "ignore_eos": True, "logprobs": 2, **kw}
        want, _ = run(plain, ids, **params)
        got, _ = run(spec, ids, **params)
        assert [s.token_id for s in got] == [s.token_id for s in want], kw
        want_lp = [s.logprob for s in want]
        assert [s.logprob for s in got] == pytest.approx(want_lp, abs=logprob_atol)
    assert spec.stats()["draft_tokens_accepted"] > before


def test_max_tokens_is_never_exceeded(pair) -> None:
    plain, spec = pair
    ids = plain.tokenize(REPEATING)
    for n in (1, 2, 3, 7):
        got, end = run(spec, ids, max_tokens=n, ignore_eos=True)
        want, _ = run(plain, ids, max_tokens=n, ignore_eos=True)
        assert [s.token_id for s in got] == [s.token_id for s in want]
        assert len(got) == n and end is FinishReason.LENGTH


def test_rollback_keeps_positions_contiguous_and_the_prompt_cache_correct(
    pair, llamacpp_device
) -> None:
    plain, spec = pair
    ids = plain.tokenize(REPEATING)
    # Sampling (seeded, so both backends draw alike) makes the drafts miss now and then.
    params = {"max_tokens": 30, "temperature": 0.6, "top_k": 8, "ignore_eos": True}
    before = spec.stats()["draft_tokens_rejected"]
    got, _ = run(spec, ids, seed=3, **params)
    rolled_back = spec.stats()["draft_tokens_rejected"] > before
    if llamacpp_device != "cpu" and not rolled_back:  # the sample is the device's numerics'
        pytest.skip(f"no draft rejected in this sample on {llamacpp_device}")
    assert rolled_back  # some drafts were rolled back
    want, _ = run(plain, ids, seed=3, **params)
    # After each rollback the next step's positions continue where the kept tokens end:
    # otherwise llama.cpp refuses the batch or attends to stale cells and the text drifts.
    assert [s.token_id for s in got] == [s.token_id for s in want]
    # The slot holds prompt + generated KV; a prompt extending it hits the cache there,
    # over the positions where rejected drafts were written and removed.
    longer = ids + [s.token_id for s in got[:-1]] + plain.tokenize("\n    x = ")
    cached = spec.submit(GenerationRequest(longer, SamplingParams(max_tokens=12, temperature=0)))
    steps = list(cached)
    assert cached.cached_tokens >= len(ids) + len(got) - 1
    want, _ = run(plain, longer, max_tokens=12)
    assert [s.token_id for s in steps] == [s.token_id for s in want]
    assert [s.logprob for s in steps] == pytest.approx([s.logprob for s in want], abs=1e-3)


def test_seeded_sampling_is_unchanged_and_first_tokens_keep_their_distribution(pair) -> None:
    """Sampled output keeps its distribution: first-3-token frequencies over 150 seeds.

    A draft is accepted exactly when the sampler's own draw equals it, so the
    distribution is the plain one and, with the same seed, so is the text. The
    test checks both: the same text for every seed but at most two (a float
    difference between a batched and a single row may flip a near tie), and a
    total-variation distance below 0.1 between the two empirical distributions
    of each of the first three tokens. That tolerance is far above what the
    coupled draws give (0 when every seed agrees) and below what a different
    distribution gives: a hotter plain run is checked to exceed it.
    """
    plain, spec = pair
    ids = plain.tokenize(REPEATING)
    params = {"max_tokens": 6, "temperature": 0.6, "top_k": 8, "ignore_eos": True}
    seeds = range(150)
    before = spec.stats()
    want = [[s.token_id for s in run(plain, ids, seed=k, **params)[0]] for k in seeds]
    got = [[s.token_id for s in run(spec, ids, seed=k, **params)[0]] for k in seeds]
    after = spec.stats()
    assert after["draft_tokens_accepted"] > before["draft_tokens_accepted"]
    assert after["draft_tokens_rejected"] > before["draft_tokens_rejected"]
    same = sum(g == w for g, w in zip(got, want, strict=True))
    assert same >= len(seeds) - 2  # float noise between batched and single rows may flip one

    def tv(a: list[list[int]], b: list[list[int]], pos: int) -> float:
        ca, cb = Counter(x[pos] for x in a), Counter(x[pos] for x in b)
        return sum(abs(ca[t] - cb[t]) for t in ca.keys() | cb.keys()) / (2 * len(a))

    for pos in range(3):
        assert tv(got, want, pos) < 0.1
    # The statistic can tell distributions apart: a hotter plain run moves it past 0.1.
    hot = dict(params, temperature=3.0, top_k=0)
    other = [[s.token_id for s in run(plain, ids, seed=1000 + k, **hot)[0]] for k in seeds]
    assert max(tv(other, want, pos) for pos in range(3)) > 0.1


def test_speculation_settings_are_checked_and_reported(tiny_models) -> None:
    from fastpilot.backends.llamacpp import LlamaCppBackend

    path = tiny_models["gpt2"]["gguf-f32"]
    with pytest.raises(ValueError):
        LlamaCppBackend(path, threads=1, speculative="eagle")
    with pytest.raises(ValueError):
        LlamaCppBackend(path, threads=1, draft_max=0)
    b = LlamaCppBackend(path, threads=1, slots=1, speculative="ngram", draft_max=3)
    try:
        assert b.info.extra["speculative"] == "ngram" and b.info.extra["draft_max"] == 3
        assert b.context_length == tinymodels.N_CTX
    finally:
        b.close()


def test_serve_flags_reach_the_backend_and_metrics(tiny_models) -> None:
    """``--speculative ngram --draft-max`` through the CLI, loader and a real server."""
    import json

    from fastpilot.backends.llamacpp import LlamaCppBackend
    from tests.servers import ServeProcess, run_serve

    path = tiny_models["gpt2"]["gguf-f32"]
    refused = run_serve(["--model", f"m={path}", "--speculative", "eagle"])
    assert refused.returncode != 0 and "--speculative must be one of off, ngram" in refused.stderr
    plain = LlamaCppBackend(path, threads=1, slots=1, speculative="off")
    try:
        want, _ = run(plain, plain.tokenize(REPEATING), max_tokens=24)
        text = plain.detokenize([s.token_id for s in want])
    finally:
        plain.close()
    args = ["--model", f"m={path}", "--trust-unverified-models", "--threads", "1"]
    with ServeProcess([*args, "--speculative", "ngram", "--draft-max", "4"]) as server:
        body = {"model": "m", "prompt": REPEATING, "max_tokens": 24, "temperature": 0}
        status, data = server.request("POST", "/v1/completions", body)
        assert status == 200, data[:500]
        reply = json.loads(data)
        assert reply["choices"][0]["text"] == text
        details = reply["usage"]["completion_tokens_details"]
        assert details["accepted_prediction_tokens"] > 0
        assert details["rejected_prediction_tokens"] >= 0
        # The same request with speculation off on another model would carry no details;
        # here a prompt with nothing to match drafts nothing, so none are reported.
        body = {"model": "m", "prompt": "q", "max_tokens": 1, "temperature": 0}
        status, data = server.request("POST", "/v1/completions", body)
        assert status == 200 and "completion_tokens_details" not in json.loads(data)["usage"]
        status, data = server.request("GET", "/metrics")
        (line,) = [
            ln
            for ln in data.decode().splitlines()
            if ln.startswith("fastpilot_model_backend_draft_tokens_accepted{")
        ]
        assert float(line.split()[-1]) > 0


@pytest.fixture(scope="module", params=["gpt2", "codegen"])
def engines(request: pytest.FixtureRequest, tiny_models: dict[str, dict[str, Path]]) -> Iterator:
    """(plain, speculative) library models on one architecture's f32 GGUF."""
    import fastpilot

    path = tiny_models[str(request.param)]["gguf-f32"]
    kw = {"trust_unverified": True, "threads": 1, "slots": 1}
    plain = fastpilot.load(path, speculative="off", **kw)
    spec = fastpilot.load(path, **kw)  # speculation is the default
    spec.backend._sched.draft_cost.pin(0.0)
    yield plain, spec
    plain.close()
    spec.close()


def test_stop_strings_logprobs_and_usage_through_the_engine(engines) -> None:
    """The library's completions are the same JSON with speculation on (but its details)."""
    plain, spec = engines
    req = {"prompt": REPEATING, "max_tokens": 40, "temperature": 0, "logprobs": 2}
    full = plain.complete(**req)["choices"][0]["text"]
    spec.complete(**req)  # both prompt caches warm alike: cached_tokens compare too
    stops = [full[len(full) // 2 : len(full) // 2 + 3]]
    assert stops[0] and len(full) > 10
    for extra in ({}, {"stop": stops}):
        want = plain.complete(**req, **extra)
        got = spec.complete(**req, **extra)
        (g,), (w,) = got["choices"], want["choices"]
        assert (g["text"], g["finish_reason"]) == (w["text"], w["finish_reason"])
        for key in ("tokens", "text_offset"):
            assert g["logprobs"][key] == w["logprobs"][key]
        assert g["logprobs"]["token_logprobs"] == pytest.approx(
            w["logprobs"]["token_logprobs"], abs=1e-3
        )
        details = got["usage"].pop("completion_tokens_details", None)
        if not extra:  # (a stop string may end it before any draft was verified)
            assert details is not None and details["accepted_prediction_tokens"] > 0
        assert got["usage"] == want["usage"]
    assert want["choices"][0]["finish_reason"] == "stop"
    assert len(want["choices"][0]["text"]) < len(full)


def test_n_indent_cuts_where_plain_decoding_cuts(engines, llamacpp_device) -> None:
    """The line stop sees the same text, token for token, with drafts accepted on the way."""
    from fastpilot.engine.editor_stops import LineLimits, LineStops

    plain, spec = engines
    # Seeded sampling among three tokens (strongly biased), from a prompt made of them:
    # lines of both depths, and n-grams for the drafter to find.
    bias = {str(plain.tokenize(t)[0]): 30 for t in ("\n", "x", " ")}
    req = {
        "prompt": "x\n  x x\n x\n" * 6,
        "max_tokens": 60,
        "temperature": 1.0,
        "seed": 5,
        "logit_bias": bias,
    }
    full = plain.complete(**req)["choices"][0]["text"]
    spec_full = spec.complete(**req)
    assert spec_full["choices"][0]["text"] == full
    assert spec_full["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0
    expected, cut = LineStops(LineLimits(n_indent=1)).feed(full)
    if llamacpp_device != "cpu" and not (cut and expected != full):
        pytest.skip(f"no shallow line in this sample on {llamacpp_device}: {full!r}")
    assert cut and expected != full, repr(full)  # the sample really has a shallow line
    want = plain.complete(**req, n_indent=1)["choices"][0]
    got = spec.complete(**req, n_indent=1)["choices"][0]
    assert (got["text"], got["finish_reason"]) == (want["text"], want["finish_reason"])
    assert got["text"] == expected and got["finish_reason"] == "stop"


class CancelAt(TokenStream):
    """A stream that cancels itself in the worker thread right after its ``at``-th step,
    noting how many drafts of its verification were still in flight and the step count."""

    def __init__(self, request: GenerationRequest, at: int, backend) -> None:
        super().__init__(request)
        self.at, self.backend, self.count = at, backend, 0
        self.drafts_left, self.steps = -1, -1.0

    def put(self, step: Step) -> None:
        super().put(step)
        self.count += 1
        if self.count == self.at:
            seq = next(q for q in self.backend._sched.running if q.owner.stream is self)
            self.drafts_left = len(seq.drafts)
            self.cancel()
            self.steps = self.backend.stats()["decode_steps"]


def test_cancelling_mid_verification_stops_at_once_and_leaves_the_kv_right(pair) -> None:
    """Cancelled at its k-th token while later drafts of the same verification wait: the
    stream ends with exactly k tokens, nothing more is decoded for it, and the slot's KV
    (rejected cells dropped) serves the next request as plain decoding would."""
    plain, spec = pair
    ids = plain.tokenize(REPEATING)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want = [s.token_id for s in plain.submit(GenerationRequest(list(ids), params))]
    mid_verification = 0
    for k in (4, 7, 10, 13):
        stream = CancelAt(GenerationRequest(list(ids), params), k, spec)
        spec._enqueue(stream)
        got = [s.token_id for s in stream]
        assert got == want[:k] and stream.finish_reason is FinishReason.CANCELLED
        assert spec.stats()["decode_steps"] == stream.steps  # no step after the cancel
        mid_verification += stream.drafts_left > 0
        # The next request (same prompt: the slot's cache) decodes exactly as plain does.
        again = [s.token_id for s in spec.submit(GenerationRequest(list(ids), params))]
        assert again == want
    assert mid_verification > 0  # some cancels landed while drafts were still in flight
