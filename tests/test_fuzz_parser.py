"""Property tests: request parsing and validation raise only InvalidRequest-family errors.

Hypothesis generates JSON bodies and query strings of any shape -- wrong types,
huge and non-finite numbers, deep nesting, lone UTF-16 surrogates, invalid
UTF-8, empty and giant prompts -- and feeds them to each layer in turn:

- :func:`fastpilot.api.parsing.loads_untrusted` / ``json_body`` / ``query_mapping``,
- :meth:`CompletionRequest.from_dict` and :func:`fastpilot.engine.chat.validate_messages`,
- the whole app (Falcon TestClient over the FakeBackend), every POST route.

The property: a rejection is a :class:`fastpilot.errors.InvalidRequest` (or the
API's 413/415 ``ApiError``), never any other exception; over HTTP, never a 5xx,
always the OpenAI error envelope. Accepted requests respect the caps.
"""

from __future__ import annotations

import json
import math

import falcon
import falcon.testing
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastpilot.api.errors import ApiError
from fastpilot.api.parsing import MAX_JSON_DEPTH, json_body, loads_untrusted, query_mapping
from fastpilot.engine.chat import validate_messages
from fastpilot.engine.params import CompletionRequest, ContextMode, Limits, wire_fields
from fastpilot.errors import InvalidRequest
from fastpilot.settings import Settings
from tests.test_api_support import client

# Every field the completion parser reads (from its own declaration), plus other routes'.
FIELDS = [
    *wire_fields(), "model", "messages", "input", "tokens", "encoding_format",
    "max_completion_tokens", "top_logprobs",
]  # fmt: skip
LIMITS = Limits(max_n=4, max_best_of=4, max_tokens=8)

# Strings: any code point, lone surrogates included (JSON "\ud800" decodes to one).
TEXT = st.text(st.characters(codec=None), max_size=40) | st.sampled_from(
    ["", "true", "false", "1e400", "-0", "NaN", "9" * 5000, "\ud800", "中", "\x00"]
)
NUMBERS = (
    st.integers()
    | st.integers(min_value=-(1 << 200), max_value=1 << 200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, -1, 1 << 63, (1 << 64) + 1, 1e308, -1e-308, 0.5, 2.0000001])
)
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=30,
)
BODIES = st.dictionaries(st.sampled_from(FIELDS) | TEXT, VALUES, max_size=8)


def _valid_or_invalid_request(call):
    """Run ``call``; return its result, or None when it raised an InvalidRequest."""
    try:
        return call()
    except InvalidRequest as ex:
        assert ex.status == 400 and ex.message and isinstance(ex.message, str)
        return None


# -- the validators -----------------------------------------------------------------------


@settings(max_examples=250, deadline=None)
@given(data=BODIES, mode=st.sampled_from(list(ContextMode)))
@example(data={"prompt": "x", "max_tokens": float("nan")}, mode=ContextMode.ERROR)
@example(data={"temperature": float("inf"), "top_p": -0.0}, mode=ContextMode.ERROR)
@example(data={"seed": 1 << 70, "logit_bias": {"1e3": 5}}, mode=ContextMode.ERROR)
@example(data={"logit_bias": {"-1": float("nan")}}, mode=ContextMode.ERROR)
@example(data={"stop": [[]], "n": "2", "best_of": "1"}, mode=ContextMode.ERROR)
def test_completion_request_raises_only_invalid_request(data, mode):
    req = _valid_or_invalid_request(
        lambda: CompletionRequest.from_dict(data, limits=LIMITS, context_mode=mode)
    )
    if req is None:
        return
    # An absent max_tokens defaults to 16 even under a lower cap (from_dict does not clamp it).
    assert 0 <= req.max_tokens <= max(LIMITS.max_tokens, 16) and 1 <= req.n <= LIMITS.max_n
    assert math.isfinite(req.temperature) and 0 <= req.temperature <= 2
    assert math.isfinite(req.top_p) and 0 < req.top_p <= 1
    assert len(req.stop) <= LIMITS.max_stop and all(isinstance(s, str) for s in req.stop)
    assert req.logprobs is None or 0 <= req.logprobs <= LIMITS.max_logprobs
    assert all(isinstance(t, int) and math.isfinite(b) for t, b in req.logit_bias)
    assert isinstance(req.prompt, (str, tuple)) and req.prompt == req.prompts[0]
    assert len(req.prompts) * req.num_sequences <= LIMITS.max_n or len(req.prompts) == 1
    assert req.n_indent >= 0 and req.t_max_predict_ms >= 0


@settings(max_examples=120, deadline=None)
@given(
    messages=VALUES
    | st.lists(
        st.dictionaries(st.sampled_from(["role", "content"]) | TEXT, VALUES, max_size=3), max_size=4
    )
)
@example(messages=[{"role": ["user"], "content": "x"}])
@example(messages=[{"role": {"a": 1}, "content": "x"}])
@example(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}])
def test_chat_messages_raise_only_invalid_request(messages):
    out = _valid_or_invalid_request(lambda: validate_messages(messages))
    if out is not None:
        assert out and all(isinstance(m.content, str) for m in out)


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(FIELDS) | TEXT, TEXT), max_size=8))
@example(pairs=[("logit_bias", "[" * 5000), ("stop", "a")])
@example(pairs=[("logit_bias", '{"1": ' + "9" * 5000 + "}")])
@example(pairs=[("stream_options", '"\\ud800"')])
@example(pairs=[("n", "2"), ("n", "3")])
def test_query_strings_raise_only_invalid_request(pairs):
    mapping = _valid_or_invalid_request(lambda: query_mapping(pairs))
    if mapping is not None:
        _valid_or_invalid_request(lambda: CompletionRequest.from_dict(mapping, limits=LIMITS))


# -- raw bytes into the JSON reader ---------------------------------------------------------


def _json_text(value) -> bytes:
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


RAW = (
    st.binary(max_size=200)
    | VALUES.map(_json_text)
    | BODIES.map(_json_text)
    | st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)
    | st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)
    | st.integers(4000, 6000).map(lambda n: b'{"max_tokens": ' + b"7" * n + b"}")
    | st.sampled_from(
        [b"", b"   ", b"null", b"NaN", b"[1,", b'{"prompt": "\xff\xfe"}', b'{"prompt":"\\udfff"}',
         b'{"a": Infinity}', b"\xef\xbb\xbf{}", b'{"prompt": "' + b"x" * 100_000 + b'"}']
    )
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(raw=RAW, ctype=st.sampled_from(["application/json", None, "text/plain", "x/y+json"]))
def test_json_body_raises_only_request_errors(raw, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    req = falcon.Request(falcon.testing.create_environ(method="POST", body=raw, headers=headers))
    try:
        data = json_body(req, limit=64 * 1024)
    except InvalidRequest as ex:
        assert ex.status == 400
        return
    except ApiError as ex:
        assert ex.status_code in (413, 415)
        return
    assert isinstance(data, dict)


def test_depth_limit_is_exact():
    ok = '{"a":' * (MAX_JSON_DEPTH - 1) + "[1]" + "}" * (MAX_JSON_DEPTH - 1)
    assert loads_untrusted(ok, "body")
    with pytest.raises(InvalidRequest, match="nested deeper"):
        loads_untrusted("[" + ok + "]", "body")
    assert loads_untrusted('["\\ud83d\\ude00"]', "body") == ["\U0001f600"]  # a real pair is fine


# -- the whole app ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api():
    c, backend, registry = client(Settings(max_tokens=8, max_n=4, max_body_bytes=256 * 1024))
    yield c
    registry.close_all()


ROUTES = [
    "/v1/completions",
    "/v1/engines/codegen/completions",
    "/v1/chat/completions",
    "/ask",
    "/v1/embeddings",
    "/v1/tokenize",
    "/v1/detokenize",
]


def _assert_envelope(resp) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        err = resp.json["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert "Traceback" not in resp.text


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(route=st.sampled_from(ROUTES), raw=RAW)
@example(route="/v1/completions", raw=b'{"prompt": ""}')
@example(route="/v1/engines/x/completions", raw=_json_text({"prompt": "def f():\n" * 20_000}))
@example(route="/v1/completions", raw=_json_text({"prompt": "def f():\n" * 20_000}))
@example(route="/v1/chat/completions", raw=b'{"messages": [{"role": ["user"], "content": "x"}]}')
def test_every_post_route_answers_4xx_envelope_or_200(api, route, raw):
    resp = api.simulate_post(route, body=raw, headers={"Content-Type": "application/json"})
    _assert_envelope(resp)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    route=st.sampled_from(ROUTES[:2]),
    pairs=st.lists(st.tuples(st.sampled_from(FIELDS), TEXT), max_size=6),
)
def test_get_form_answers_4xx_envelope_or_200(api, route, pairs):
    from urllib.parse import quote

    query = "&".join(
        f"{quote(k.encode('utf-8', 'surrogatepass'))}={quote(v.encode('utf-8', 'surrogatepass'))}"
        for k, v in pairs
    )
    resp = api.simulate_get(route, query_string=query)
    _assert_envelope(resp)
