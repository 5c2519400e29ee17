"""Editor stops (n_indent, t_max_predict_ms, Copilot's trim_by_indentation) on every route.

The line rules are tested on :class:`LineStops` with an injected clock, then
through the engine and the HTTP routes over the deterministic FakeBackend,
whose greedy text is its script.
"""

from __future__ import annotations

import pytest

from fastpilot.engine.editor_stops import LineLimits, LineStops
from fastpilot.engine.model import Model
from tests.fakes import FakeBackend
from tests.test_api_support import client, sse_events

# A block: a first line, indented lines with a blank one inside, then a line at column 0.
BLOCK = " a\n    b\n\n    c\nd e\n    f\n"
IN_BLOCK = " a\n    b\n\n    c\n"


def feed_all(stops: LineStops, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = stops.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(stops.flush())
    return "".join(out), False


def test_n_indent_drops_the_first_shallower_line_and_keeps_blank_lines_inside():
    pieces = list(BLOCK)  # one character per piece: the hardest split
    assert feed_all(LineStops(LineLimits(n_indent=4)), pieces) == (IN_BLOCK, True)
    assert feed_all(LineStops(LineLimits(n_indent=4)), [BLOCK]) == (IN_BLOCK, True)
    # Deeper requirement: the first indented line is already too shallow.
    assert feed_all(LineStops(LineLimits(n_indent=5)), [BLOCK]) == (" a\n", True)
    # Off, or every line deep enough: the text passes unchanged.
    assert feed_all(LineStops(LineLimits()), [BLOCK]) == (BLOCK, False)
    assert feed_all(LineStops(LineLimits(n_indent=1)), ["x\n  y\n\t z\n"]) == (
        "x\n  y\n\t z\n",
        False,
    )


def test_n_indent_holds_indentation_until_the_line_shows_text():
    stops = LineStops(LineLimits(n_indent=2))
    assert stops.feed("x\n ") == ("x\n", False)  # one space so far: undecided
    assert stops.feed(" y") == ("  y", False)
    assert stops.feed("\n\n ") == ("\n", False)
    assert stops.feed("z") == ("", True)


def test_t_max_predict_ms_ends_at_the_next_newline_once_spent():
    now = [0.0]
    stops = LineStops(LineLimits(t_max_predict_ms=10), clock=lambda: now[0])
    out = []
    for t, piece in [(0.0, "a"), (0.006, "b\nc"), (0.012, "d"), (0.013, "e\nf"), (0.02, "g")]:
        now[0] = t
        text, stopped = stops.feed(piece)
        out.append(text)
        if stopped:
            break
    # The newline at 6 ms is inside the budget; the first one after 10 ms ends the text.
    assert ("".join(out), stopped) == ("ab\ncde\n", True)


def model_with(script: str, **kwargs) -> Model:
    return Model("fake", FakeBackend(script=script, **kwargs))


def test_engine_n_indent_finish_reason_and_logprobs_match_the_text():
    model = model_with(BLOCK)
    try:
        out = model.complete(prompt="x", max_tokens=60, temperature=0, n_indent=4, logprobs=1)
        choice = out["choices"][0]
        assert choice["text"] == IN_BLOCK
        assert choice["finish_reason"] == "stop"
        # No token of the dropped line is reported.
        assert "".join(choice["logprobs"]["tokens"]) == IN_BLOCK
        full = model.complete(prompt="x", max_tokens=60, temperature=0)
        assert full["choices"][0]["text"] == BLOCK
    finally:
        model.close()


def test_engine_stop_string_before_the_editor_stop_wins():
    model = model_with(BLOCK)
    try:
        out = model.complete(prompt="x", max_tokens=60, temperature=0, n_indent=4, stop=["\n\n"])
        assert out["choices"][0]["text"] == " a\n    b"
    finally:
        model.close()


def test_engine_t_max_predict_ms_with_a_slow_backend():
    # Every decode round sleeps 5 ms, so a 1 ms budget is spent by the second token.
    script = " a b c\nmore\nlines\n"
    model = model_with(script, step_delay=0.005)
    try:
        out = model.complete(prompt="x", max_tokens=60, temperature=0, t_max_predict_ms=1)
        assert out["choices"][0]["text"] == " a b c\n"
        assert out["choices"][0]["finish_reason"] == "stop"
        full = model.complete(prompt="x", max_tokens=60, temperature=0)
        assert full["choices"][0]["text"] == script
    finally:
        model.close()


@pytest.fixture
def api():
    c, _backend, registry = client(script=BLOCK)
    yield c
    registry.close_all()


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/engines/copilot-codex/completions", "/v1/chat/completions"]
)
def test_n_indent_on_every_route(api, path):
    body = {"max_tokens": 60, "temperature": 0, "n_indent": 4}
    if "chat" in path:
        r = api.simulate_post(path, json={**body, "messages": [{"role": "user", "content": "x"}]})
        assert r.json["choices"][0]["message"]["content"] == IN_BLOCK
    else:
        r = api.simulate_post(path, json={**body, "prompt": "x"})
        assert r.json["choices"][0]["text"] == IN_BLOCK
    query = "prompt=x&max_tokens=60&temperature=0&n_indent=4"
    if "chat" not in path:
        r = api.simulate_get(path, query_string=query)
        assert r.json["choices"][0]["text"] == IN_BLOCK


def test_copilot_trim_by_indentation_stops_at_the_end_of_the_block(api):
    # Copilot sends next_indent = the indentation of the code after the cursor (0
    # here): the block ends at the first line indented 0 columns.
    body = {
        "prompt": "def f():\n",
        "max_tokens": 60,
        "temperature": 0,
        "n": 3,
        "stream": True,
        "extra": {"language": "python", "next_indent": 0, "trim_by_indentation": True},
    }
    r = api.simulate_post("/v1/engines/copilot-codex/completions", json=body)
    events = sse_events(r.content)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
    assert texts == {0: IN_BLOCK, 1: IN_BLOCK, 2: IN_BLOCK}
    assert reasons == {0: "stop", 1: "stop", 2: "stop"}
    # Without trim_by_indentation the same request runs past the block.
    body["extra"] = {"language": "python", "next_indent": 0}
    r = api.simulate_post("/v1/engines/copilot-codex/completions", json={**body, "n": 1})
    assert "".join(e["choices"][0]["text"] for e in sse_events(r.content)) == BLOCK


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_indent", -1), ("n_indent", "deep"), ("t_max_predict_ms", -5), ("t_max_predict_ms", [])],
)
def test_bad_editor_stop_values_are_400(api, field, value):
    r = api.simulate_post("/v1/completions", json={"prompt": "x", field: value})
    assert r.status_code == 400
    assert r.json["error"]["param"] == field
