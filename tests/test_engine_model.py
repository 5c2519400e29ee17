"""Model semantics over the deterministic FakeBackend (fast; no native library).

The fake writes its script under greedy decoding, so every expected text here
is known exactly. The same behaviours are checked on the real backends in
test_engine_behaviour.py.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from fastpilot.backends.base import FimTemplate, FinishReason
from fastpilot.engine.model import Model
from fastpilot.engine.params import CompletionRequest, ContextMode
from fastpilot.errors import BackendError, ContextLengthExceeded, InvalidRequest, QueueFull, Timeout
from tests.fakes import FakeBackend
from tests.gates import WorkerGate

SCRIPT = " world\n\ndef fib(n):\n    return n\n"


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    b = FakeBackend(SCRIPT)
    yield b
    b.close()


@pytest.fixture
def model(backend: FakeBackend) -> Model:
    ids = iter(range(1000))
    return Model("fake", backend, clock=lambda: 1234.5, new_id=lambda: f"id{next(ids)}")


def text_of(out: dict, i: int = 0) -> str:
    return out["choices"][i]["text"]


def test_greedy_writes_the_script_and_stops_at_eos(model: Model, backend: FakeBackend) -> None:
    out = model.complete(prompt="hello", max_tokens=50, temperature=0)
    assert out["id"] == "cmpl-id0" and out["object"] == "text_completion"
    assert out["created"] == 1234 and out["model"] == "fake"
    assert text_of(out) == SCRIPT
    assert out["choices"][0]["finish_reason"] == "stop"
    n_script = len(backend.tokenize(SCRIPT))
    # Backends push no step for the end-of-text token (backends/base.py): not counted.
    assert out["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": n_script,
        "total_tokens": n_script + 1,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_max_tokens_gives_length(model: Model, backend: FakeBackend) -> None:
    out = model.complete(prompt="hello", max_tokens=3, temperature=0)
    assert text_of(out) == " world\n\ndef"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 3
    assert len(backend.tokenize(text_of(out))) == 3


def test_request_object_and_params_are_equivalent(model: Model) -> None:
    req = CompletionRequest.from_dict({"prompt": "hello", "max_tokens": 4, "temperature": 0})
    assert text_of(model.complete(req)) == text_of(
        model.complete(prompt="hello", max_tokens=4, temperature=0)
    )
    with pytest.raises(TypeError):
        model.complete(req, max_tokens=3)
    with pytest.raises(InvalidRequest) as err:
        model.complete(prompt="x", temperature=5)
    assert err.value.param == "temperature"


def test_token_id_prompt(model: Model, backend: FakeBackend) -> None:
    ids = backend.tokenize("hello")
    out = model.complete(prompt=ids, max_tokens=2, temperature=0, echo=True)
    assert text_of(out) == "hello world\n\n"
    with pytest.raises(InvalidRequest) as err:
        model.complete(prompt=[backend.vocab_size + 5], max_tokens=2)
    assert err.value.param == "prompt"


def test_stop_string_split_across_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    b = FakeBackend(SCRIPT * 10, context_length=1024)
    # The worker parks after the 4th token; the stop is seen at the 3rd, so the request
    # must end (and cancel) while the worker waits there.
    gate = WorkerGate(monkeypatch, b, after=4, timeout=10)
    try:
        # "\n\n" and "def" are separate tokens: the stop "\ndef" straddles them.
        out = Model("fake", b).complete(
            prompt="hello", max_tokens=100, temperature=0, stop=["\ndef", "zzz"]
        )
        assert not gate.expired
        gate.release()
        assert text_of(out) == " world\n"
        assert out["choices"][0]["finish_reason"] == "stop"
        # The backend stream was cancelled at once instead of running to the end.
        assert b.wait_idle()
        assert b.streams[-1].finish_reason is FinishReason.CANCELLED
        assert b.decode_steps <= gate.after + 1
        assert out["usage"]["completion_tokens"] == 3
    finally:
        gate.release()
        b.close()


def test_stream_chunks_token_by_token_with_finish_on_last_content(model: Model) -> None:
    chunks = list(
        model.stream(
            prompt="hello", max_tokens=50, temperature=0, stream_options={"include_usage": True}
        )
    )
    content, final = chunks[:-1], chunks[-1]
    assert all(c["object"] == "text_completion" and c["id"] == content[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in content) == SCRIPT
    assert all(c["choices"][0]["text"] for c in content), "no empty content chunk"
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (len(content) - 1) + [
        "stop"
    ]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] > len(content) - 1
    assert len(content) > 5  # token by token, not one blob


def test_stream_stop_never_sends_text_after_it(model: Model, backend: FakeBackend) -> None:
    s = model.stream(prompt="hello", max_tokens=50, temperature=0, stop="fib")
    chunks = list(s)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == " world\n\ndef "  # the stop cuts inside the token " fib"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in chunks[-1]
    assert backend.wait_idle()


def test_multibyte_character_never_split_in_stream() -> None:
    b = FakeBackend("x中!y")
    try:
        model = Model("fake", b)
        assert len(b.tokenize("中!")) == 2  # the fake splits it across two tokens
        chunks = list(model.stream(prompt="a", max_tokens=20, temperature=0))
        texts = [c["choices"][0]["text"] for c in chunks]
        assert "".join(texts) == "x中!y"
        assert all("\ufffd" not in t for t in texts)
        out = model.complete(prompt="a", max_tokens=20, temperature=0, logprobs=1)
        lp = out["choices"][0]["logprobs"]
        # Both halves of the character sit at the same offset (the text starts there).
        assert lp["text_offset"][1] == lp["text_offset"][2] == 1
        assert lp["tokens"][1:3] == ["bytes:\\xe4\\xb8", "bytes:\\xad\\x21"]
    finally:
        b.close()


def test_n_with_seed_reproducible_and_distinct(model: Model) -> None:
    a = model.complete(prompt="hello", max_tokens=20, temperature=1.0, n=4, seed=123)
    b = model.complete(prompt="hello", max_tokens=20, temperature=1.0, n=4, seed=123)
    texts = [text_of(a, i) for i in range(4)]
    assert texts == [text_of(b, i) for i in range(4)]
    assert len(set(texts)) == 4
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3]
    c = model.complete(prompt="hello", max_tokens=20, temperature=1.0, n=4, seed=124)
    assert [text_of(c, i) for i in range(4)] != texts


def test_all_sequences_submitted_at_once(model: Model, backend: FakeBackend) -> None:
    model.complete(prompt="hello", max_tokens=3, temperature=1.0, n=3, seed=1)
    reqs = backend.submitted[-3:]
    assert [r.params.seed for r in reqs] == [1, 2, 3]
    assert len({r.request_id for r in reqs}) == 3


def test_token_logprob_asked_only_when_read(model: Model, backend: FakeBackend) -> None:
    """The chosen token's logprob costs a pass over the vocabulary per token: the engine
    asks for it only with ``logprobs`` or when ``best_of`` ranks the choices by it."""
    model.complete(prompt="hello", max_tokens=2, temperature=0)
    assert backend.submitted[-1].params.token_logprob is False
    model.complete(prompt="hello", max_tokens=2, temperature=0, logprobs=0)
    assert backend.submitted[-1].params.token_logprob is True
    model.complete(prompt="hello", max_tokens=2, temperature=1.0, n=1, best_of=2, seed=1)
    assert [r.params.token_logprob for r in backend.submitted[-2:]] == [True, True]


def test_best_of_picks_highest_cumulative_logprob(model: Model) -> None:
    n, best_of = 2, 6
    out = model.complete(
        prompt="hello", max_tokens=12, temperature=1.5, n=n, best_of=best_of, seed=9, logprobs=0
    )
    all6 = model.complete(
        prompt="hello", max_tokens=12, temperature=1.5, n=best_of, seed=9, logprobs=0
    )

    def score(choice: dict) -> float:
        return sum(choice["logprobs"]["token_logprobs"])

    ranked = sorted(all6["choices"], key=score, reverse=True)
    assert [text_of(out, i) for i in range(n)] == [c["text"] for c in ranked[:n]]
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["completion_tokens"] == all6["usage"]["completion_tokens"]


def test_logit_bias_bans_a_token(model: Model, backend: FakeBackend) -> None:
    world = backend.tokenize(" world")[0]
    out = model.complete(
        prompt="hello", max_tokens=8, temperature=0, logit_bias={str(world): -100}, logprobs=0
    )
    assert world not in backend.tokenize(text_of(out))
    assert " world" not in out["choices"][0]["logprobs"]["tokens"]


def test_logprobs_object(model: Model) -> None:
    out = model.complete(prompt="hello", max_tokens=6, temperature=0, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    text = text_of(out)
    assert "".join(lp["tokens"]) == text
    for tok, val, top, off in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"], strict=False
    ):
        assert text[off:].startswith(tok)
        assert top[tok] == val  # the chosen token, same number
        assert len(top) == 3 and max(top.values()) == val  # greedy: the best one
        assert val < 0
    # Tokens that are not whole UTF-8 characters are spelled as OpenAI does.
    assert any(k.startswith("bytes:") for top in lp["top_logprobs"] for k in top)


def test_echo_with_logprobs_first_is_null(model: Model, backend: FakeBackend) -> None:
    out = model.complete(prompt="hello world", max_tokens=2, temperature=0, echo=True, logprobs=1)
    lp = out["choices"][0]["logprobs"]
    text = text_of(out)
    assert text.startswith("hello world")
    prompt_ids = backend.tokenize("hello world")
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"][: len(prompt_ids)] == ["hello", " world"]
    scored = backend.prompt_logprobs(prompt_ids, 1)
    assert lp["token_logprobs"][1] == pytest.approx(scored[1].logprob)
    assert lp["text_offset"] == [0, 5, 11, 17]
    for tok, off in zip(lp["tokens"], lp["text_offset"], strict=False):
        assert text[off:].startswith(tok)


def test_echo_with_zero_max_tokens_returns_the_prompt(model: Model, backend: FakeBackend) -> None:
    before = len(backend.submitted)
    out = model.complete(prompt="hello", max_tokens=0, echo=True, n=2)
    assert [text_of(out, i) for i in range(2)] == ["hello", "hello"]
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0
    assert len(backend.submitted) == before  # nothing generated


def test_context_truncation_and_error() -> None:
    b = FakeBackend(SCRIPT, context_length=32)
    try:
        model = Model("fake", b)
        prompt = "hello" * 40  # 40 tokens
        out = model.complete(prompt=prompt, max_tokens=100, temperature=0)
        usage = out["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 32
        assert usage["prompt_tokens"] == 32 - 8  # a quarter of the window kept for output
        assert out.truncated == 16
        assert b.submitted[-1].params.max_tokens == 8
        with pytest.raises(ContextLengthExceeded) as err:
            model.complete(prompt=prompt, max_tokens=4, truncate=False)
        assert (
            err.value.param == "prompt" and "32" in err.value.message and "40" in err.value.message
        )
        with pytest.raises(ContextLengthExceeded) as err:
            model.complete(prompt="hello" * 20, max_tokens=20, context_mode=None, truncate=False)
        assert err.value.param == "max_tokens"
        req = CompletionRequest.from_dict(
            {"prompt": "hello" * 20, "max_tokens": 5}, context_mode=ContextMode.ERROR
        )
        assert model.complete(req)["usage"]["prompt_tokens"] == 20
    finally:
        b.close()


def test_fim_used_when_the_model_has_a_template() -> None:
    fim = FimTemplate("<PRE>", "<SUF>", "<MID>")
    b = FakeBackend(SCRIPT, fim=fim)
    try:
        out = Model("fake", b).complete(prompt="def f(", suffix="return x", max_tokens=2)
        assert out.fim_used and not out.suffix_ignored
        assert b.submitted[-1].prompt_ids == b.tokenize("<PRE>def f(<SUF>return x<MID>")
    finally:
        b.close()


def test_suffix_ignored_without_fim(model: Model, backend: FakeBackend) -> None:
    out = model.complete(prompt="hello", suffix="tail", max_tokens=2)
    assert out.suffix_ignored and not out.fim_used
    assert backend.submitted[-1].prompt_ids == backend.tokenize("hello")
    s = model.stream(prompt="hello", suffix="tail", max_tokens=2)
    assert s.suffix_ignored
    s.close()
    assert model.supports_fim is False


def test_close_cancels_every_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    b = FakeBackend(SCRIPT * 20, context_length=4096)
    gate = WorkerGate(monkeypatch, b, after=3)  # parked after each choice's first token
    try:
        model = Model("fake", b)
        s = model.stream(prompt="hello", max_tokens=500, temperature=1.0, n=3, seed=1)
        got = [next(s) for _ in range(3)]
        assert got
        s.close()
        gate.release()
        assert b.wait_idle(), "a backend stream kept running after close()"
        assert b.decode_steps <= 2 * gate.after
        assert all(st.finish_reason is FinishReason.CANCELLED for st in b.streams)
        assert list(s) == []
        assert model.stats()["requests_active"] == 0
    finally:
        gate.release()
        b.close()


def test_close_from_another_thread_ends_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    b = FakeBackend(SCRIPT, context_length=4096)
    # ignore_eos and 2000 tokens: only cancellation can end this stream early, and the
    # worker parks after its 3rd token until the close is done, so it cannot win a race.
    gate = WorkerGate(monkeypatch, b, after=3)
    try:
        model = Model("fake", b)
        s = model.stream(prompt="hello", max_tokens=2000, temperature=0, ignore_eos=True)

        got_one = threading.Event()

        def close_while_parked() -> None:
            got_one.wait(30)
            gate.parked.wait(30)
            s.close()
            gate.release()

        closer = threading.Thread(target=close_while_parked)
        closer.start()
        chunks = []
        for chunk in s:  # this thread iterates; the other one closes
            chunks.append(chunk)
            got_one.set()
        closer.join(30)
        assert gate.parked.is_set() and not gate.expired
        assert b.wait_idle()
        assert b.streams[-1].finish_reason is FinishReason.CANCELLED
        # At most the step under way when close() came; 2000 without cancellation.
        assert b.decode_steps <= gate.after + 1
        assert 0 < len(chunks) <= gate.after
        assert model.stats()["requests_active"] == 0
    finally:
        gate.release()
        b.close()


def abandon_after_one_chunk(
    model: Model, b: FakeBackend, gate: WorkerGate, *, prompt: str | list[str]
) -> None:
    """Read one chunk of a 2000-token stream, then drop the stream without close().

    The cycle collector is off meanwhile, so only the stream's own finalizer can
    cancel it; returns once ``gate`` is released and the backend is idle.
    """
    s = model.stream(prompt=prompt, max_tokens=2000, temperature=0, ignore_eos=True)
    for _ in s:
        break
    gc.disable()
    try:
        del s
        gate.release()
        assert b.wait_idle()
    finally:
        gc.enable()


def test_consumer_abandoning_the_loop_cancels(monkeypatch: pytest.MonkeyPatch) -> None:
    b = FakeBackend(SCRIPT, context_length=4096)
    gate = WorkerGate(monkeypatch, b, after=2)  # parked until the loop has been abandoned
    try:
        model = Model("fake", b)
        # Dropped without close(): the finalizer cancels as soon as the last reference
        # goes, with the cycle collector off (a stream that its own generator referred
        # to ran on until the next collection).
        abandon_after_one_chunk(model, b, gate, prompt="hello")
        assert b.streams[-1].finish_reason is FinishReason.CANCELLED
        assert b.decode_steps <= gate.after + 1  # 2000 without cancellation
        assert model.stats()["requests_active"] == 0
    finally:
        gate.release()
        b.close()


def test_consumer_abandoning_a_several_prompt_stream_cancels_every_prompt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b = FakeBackend(SCRIPT, context_length=4096)
    gate = WorkerGate(monkeypatch, b, after=2)
    try:
        model = Model("fake", b)
        # Each prompt's reader thread holds its own stream; dropping the request must
        # still cancel both, without the cycle collector's help.
        abandon_after_one_chunk(model, b, gate, prompt=["hello", "def fib"])
        assert [st.finish_reason for st in b.streams[-2:]] == [FinishReason.CANCELLED] * 2
        assert b.decode_steps <= gate.after + 2  # the steps under way; 4000 without cancelling
        assert model.stats()["requests_active"] == 0
    finally:
        gate.release()
        b.close()


def test_deadline_raises_timeout() -> None:
    # 500 tokens take 5 s; the deadline (0.5 s) passes mid-run, the first token (10 ms)
    # long before it even on a loaded machine.
    b = FakeBackend(SCRIPT * 20, step_delay=0.01, context_length=4096)
    try:
        model = Model("fake", b, default_timeout=0.5)
        with pytest.raises(Timeout) as err:
            model.complete(prompt="hello", max_tokens=500, temperature=0)
        assert err.value.status == 504
        chunks = []
        with pytest.raises(Timeout):
            for c in model.stream(prompt="hello", max_tokens=500, temperature=0, timeout=0.5):
                chunks.append(c)
        assert chunks, "what was generated before the deadline was delivered"
        assert model.stats()["timeouts_total"] == 2
        # A generous request timeout overrides the default.
        assert (
            model.complete(prompt="hello", max_tokens=3, timeout=30)["choices"][0]["finish_reason"]
            == "length"
        )
    finally:
        b.close()


def test_queue_full_cancels_what_was_submitted(monkeypatch: pytest.MonkeyPatch) -> None:
    b = FakeBackend(SCRIPT, max_queue=2)
    gate = WorkerGate(monkeypatch, b, after=1)  # the two admitted cannot finish first
    try:
        with pytest.raises(QueueFull):
            Model("fake", b).complete(prompt="hello", max_tokens=50, n=3)
        gate.release()
        assert b.wait_idle()
        assert len(b.streams) == 2
        assert all(s.finish_reason is FinishReason.CANCELLED for s in b.streams)
    finally:
        gate.release()
        b.close()


def test_concurrent_requests_equal_serial(model: Model) -> None:
    prompts = ["hello", "def", "x", "return", "hello world", "ab", "\n", "fib"]
    serial = [text_of(model.complete(prompt=p, max_tokens=12, temperature=0)) for p in prompts]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = "".join(
            c["choices"][0]["text"]
            for c in model.stream(prompt=prompts[i], max_tokens=12, temperature=0)
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [results[i] for i in range(len(prompts))] == serial


def test_stream_n_interleaves_choices(model: Model) -> None:
    chunks = list(model.stream(prompt="hello", max_tokens=6, temperature=0.8, n=3, seed=4))
    by_index: dict[int, list[dict]] = {}
    for c in chunks:
        assert len(c["choices"]) == 1
        by_index.setdefault(c["choices"][0]["index"], []).append(c["choices"][0])
    assert sorted(by_index) == [0, 1, 2]
    for items in by_index.values():
        assert [x["finish_reason"] for x in items][-1] == "length"
        assert all(x["finish_reason"] is None for x in items[:-1])
    ref = model.complete(prompt="hello", max_tokens=6, temperature=0.8, n=3, seed=4)
    for i, items in by_index.items():
        assert "".join(x["text"] for x in items) == text_of(ref, i)


def test_stream_logprobs_per_chunk(model: Model) -> None:
    chunks = list(model.stream(prompt="hello", max_tokens=5, temperature=0, logprobs=2))
    ref = model.complete(prompt="hello", max_tokens=5, temperature=0, logprobs=2)["choices"][0][
        "logprobs"
    ]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [t for c in chunks for t in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == ref["tokens"] and offsets == ref["text_offset"]


def test_chat_and_stream_chat(model: Model) -> None:
    msgs = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]
    out = model.chat(msgs, temperature=0, max_tokens=50)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    msg = out["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": SCRIPT}
    chunks = list(model.stream_chat(msgs, temperature=0, max_tokens=50))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == SCRIPT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    reply = model.ask(msgs, temperature=0, max_tokens=3)
    assert reply["reply"] == " world\n\ndef" and reply["usage"]["completion_tokens"] == 3
    with pytest.raises(InvalidRequest) as err:
        model.chat([{"role": "user", "content": None}])
    assert err.value.param == "messages"


def test_chat_stops_at_the_next_user_turn() -> None:
    b = FakeBackend(" Sure.\nUser: more")
    try:
        out = Model("fake", b).chat([{"role": "user", "content": "hi"}], temperature=0)
        assert out["choices"][0]["message"]["content"] == " Sure."
        assert out["choices"][0]["finish_reason"] == "stop"
    finally:
        b.close()


def test_chat_logprobs_shape(model: Model) -> None:
    out = model.chat(
        [{"role": "user", "content": "hi"}],
        temperature=0,
        max_tokens=2,
        logprobs=True,
        top_logprobs=2,
    )
    content = out["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [" world", "\n\n"]
    assert len(content[0]["top_logprobs"]) == 2 and content[0]["bytes"] == list(b" world")


def test_embed(model: Model) -> None:
    out = model.embed(["hello", "def fib"])
    assert out["object"] == "list" and [d["index"] for d in out["data"]] == [0, 1]
    assert len(out["data"][0]["embedding"]) == 16
    assert out["usage"]["prompt_tokens"] == 1 + 2
    with pytest.raises(InvalidRequest) as err:
        model.embed([1, 2])
    assert err.value.param == "input"


def test_tokenize_detokenize_and_info(model: Model, backend: FakeBackend) -> None:
    ids = model.tokenize("hello world")
    assert ids == backend.tokenize("hello world") and model.detokenize(ids) == "hello world"
    with pytest.raises(InvalidRequest):
        model.detokenize([-1])
    assert model.context_length == 128 and model.info.backend == "fake"
    model.complete(prompt="hello", max_tokens=2)
    stats = model.stats()
    assert stats["requests_total"] == 1 and stats["completion_tokens_total"] == 2
    assert "backend_decode_steps" in stats


def test_backend_failure_is_a_typed_error() -> None:
    class Broken(FakeBackend):
        def token_bytes(self, token_id: int) -> bytes:
            raise RuntimeError("vocabulary file vanished")

    b = Broken(SCRIPT)
    try:
        model = Model("fake", b)
        with pytest.raises(BackendError):
            model.complete(prompt="hello", max_tokens=4, temperature=0)
        with pytest.raises(BackendError):
            list(model.stream(prompt="hello", max_tokens=4, temperature=0, n=2))
        assert b.wait_idle()
        assert model.stats()["requests_active"] == 0
    finally:
        b.close()


def test_stream_chat_include_usage(model: Model) -> None:
    chunks = list(
        model.stream_chat(
            [{"role": "user", "content": "hi"}],
            temperature=0,
            max_tokens=3,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_first_chunk_is_not_held_back(monkeypatch: pytest.MonkeyPatch) -> None:
    b = FakeBackend(SCRIPT)
    # The worker parks after the first token: the first chunk must arrive while it waits
    # there (one decode round), not after the lookahead's second round.
    gate = WorkerGate(monkeypatch, b, after=1, timeout=10)
    try:
        model = Model("fake", b)
        s = model.stream(prompt="hello", max_tokens=5, temperature=0)
        first = next(s)
        assert b.decode_steps == 1 and not gate.expired
        gate.release()
        assert first["choices"][0]["text"] == " world"
        rest = list(s)
        assert (
            rest[-1]["choices"][0]["finish_reason"] == "length" and rest[-1]["choices"][0]["text"]
        )
    finally:
        gate.release()
        b.close()


def test_one_token_then_eos_finishes_on_an_empty_chunk() -> None:
    b = FakeBackend("x")
    try:
        chunks = list(Model("fake", b).stream(prompt="hello", max_tokens=5, temperature=0))
        assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [
            ("x", None),
            ("", "stop"),
        ]
    finally:
        b.close()
