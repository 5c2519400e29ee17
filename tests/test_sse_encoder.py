"""The SSE chunk encoder's fast path against ``json.dumps``, byte for byte."""

from __future__ import annotations

import json

import pytest

from fastpilot.api.sse import ChunkEncoder, EventStream, encode_event

NASTY = [
    "",
    "plain",
    'quote " and backslash \\ and slash /',
    "newline \n tab \t cr \r nul \x00 bell \x07 unit \x1f del \x7f",
    "non-ASCII é ñ 中文 😀 (astral: a surrogate pair)",
    "line separators \u2028 \u2029 and BOM \ufeff",
    "lone surrogate \ud800 end",
    "replacement \ufffd",
    "data: [DONE]\n\n",
    '"}]},{"injected":1',
]


def chunk(text: str, reason: str | None = None, *, usage: bool = False, **head: object) -> dict:
    out: dict = {
        "id": head.get("id", "cmpl-abc"),
        "object": "text_completion",
        "created": head.get("created", 1700000000),
        "model": head.get("model", "tiny-py"),
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
    }
    if usage:
        out["usage"] = None
    return out


def reference(payload: object) -> bytes:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=True)
    return b"data: " + body.encode("ascii") + b"\n\n"


@pytest.mark.parametrize("text", NASTY)
@pytest.mark.parametrize("reason", [None, "stop", "length"])
@pytest.mark.parametrize("usage", [False, True])
def test_fast_path_equals_json_dumps(text: str, reason: str | None, usage: bool) -> None:
    enc = ChunkEncoder()
    c = chunk(text, reason, usage=usage)
    got = enc(c)
    assert got == reference(c)
    assert json.loads(got[len(b"data: ") :]) == c
    assert enc._key is not None  # the template was used, not the fallback


def test_header_follows_the_chunk_not_the_first_one() -> None:
    """The cached header is keyed by the chunk's own fields: a change re-encodes it."""
    enc = ChunkEncoder()
    for head in ({}, {"model": 'we"ird\u2028'}, {"id": "cmpl-other"}, {"created": 5}, {}):
        c = chunk("x", **head)
        assert enc(c) == reference(c)


@pytest.mark.parametrize(
    "c",
    [
        {**chunk("x"), "usage": {"prompt_tokens": 1}},  # the usage chunk
        {**chunk("x"), "choices": []},
        {**chunk("x"), "choices": [{**chunk("x")["choices"][0], "logprobs": {"tokens": ["x"]}}]},
        {**chunk("x"), "choices": [{**chunk("x")["choices"][0], "index": True}]},
        {**chunk("x"), "choices": [chunk("a")["choices"][0], chunk("b")["choices"][0]]},
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": []},
        {"error": {"message": 'bad "x"', "type": "server_error", "param": None, "code": None}},
    ],
)
def test_other_shapes_fall_back_to_the_encoder(c: dict) -> None:
    assert ChunkEncoder()(c) == reference(c) == encode_event(c)


def test_event_stream_frames_with_the_fast_encoder() -> None:
    chunks = [chunk(t) for t in NASTY] + [chunk("", "stop")]
    body = b"".join(EventStream(iter(chunks)))
    assert body == b"".join(reference(c) for c in chunks) + b"data: [DONE]\n\n"
