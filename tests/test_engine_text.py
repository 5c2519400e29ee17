"""IncrementalDetokenizer, StopMatcher and chat rendering: the pure-text parts of the engine."""

from __future__ import annotations

import pytest

from fastpilot.engine.chat import render_plain, validate_messages
from fastpilot.engine.detok import IncrementalDetokenizer
from fastpilot.engine.stops import StopMatcher
from fastpilot.errors import InvalidRequest


def pieces_detok(pieces: list[bytes]) -> tuple[list[str], str]:
    """Feed byte pieces as tokens 0..n-1; return the per-token outputs and the flush."""
    det = IncrementalDetokenizer(lambda i: pieces[i])
    outs = [det.feed(i) for i in range(len(pieces))]
    return outs, det.flush()


@pytest.mark.parametrize("char", ["é", "中", "😀"])
def test_multibyte_character_split_into_every_piece_size(char: str) -> None:
    data = char.encode()
    for cut in range(1, len(data)):
        outs, tail = pieces_detok([b"a", data[:cut], data[cut:], b"b"])
        # Nothing half-decoded: the character appears whole, with the token that completed it.
        assert outs == ["a", "", char, "b"]
        assert tail == ""


def test_emoji_one_byte_per_token() -> None:
    data = "😀".encode()
    outs, tail = pieces_detok([bytes([b]) for b in data])
    assert outs == ["", "", "", "😀"]
    assert tail == ""


def test_incomplete_tail_flushed_with_replacement() -> None:
    det = IncrementalDetokenizer(lambda i: [b"x", "中".encode()[:2]][i])
    assert det.feed(0) == "x"
    assert det.feed(1) == ""
    assert det.pending
    assert det.flush() == "\ufffd"
    assert det.chars == 2


def test_invalid_bytes_are_replaced_at_once() -> None:
    det = IncrementalDetokenizer(lambda i: [b"\xff", b"ok"][i])
    # 0xff can never start a UTF-8 character: no reason to hold it.
    assert det.feed(0) == "\ufffd"
    assert det.feed(1) == "ok"


def test_mixed_pieces_reassemble_the_text() -> None:
    text = "héllo 中文 😀 done"
    data = text.encode()
    pieces = [data[i : i + 2] for i in range(0, len(data), 2)]
    outs, tail = pieces_detok(pieces)
    assert "".join(outs) + tail == text
    assert "\ufffd" not in "".join(outs)


def run_stops(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    m = StopMatcher(stops)
    outs = []
    stopped = False
    for p in pieces:
        out, stopped = m.feed(p)
        outs.append(out)
        if stopped:
            break
    return outs, stopped, m.flush()


def test_stop_split_across_tokens() -> None:
    outs, stopped, tail = run_stops(["\ndef "], ["x = 1", "\nde", "f ", "foo"])
    assert stopped
    assert "".join(outs) == "x = 1"
    # "\nde" could be the start of the stop string: it is held, not sent.
    assert outs[1] == ""
    assert tail == ""


def test_held_prefix_released_when_it_diverges() -> None:
    outs, stopped, tail = run_stops(["\ndef "], ["a\nd", "o", "ne"])
    assert not stopped
    assert outs == ["a", "\ndo", "ne"]
    assert tail == ""


def test_partial_prefix_at_the_end_is_flushed() -> None:
    outs, stopped, tail = run_stops(["</s>"], ["answer<", "/"])
    assert not stopped
    assert outs == ["answer", ""]
    assert tail == "</"


def test_earliest_of_several_stops_wins() -> None:
    m = StopMatcher(["world", "lo w"])
    out, stopped = m.feed("hello world")
    assert stopped
    assert out == "hel"
    assert m.matched == "lo w"


def test_stop_inside_one_piece_drops_the_rest() -> None:
    outs, stopped, _ = run_stops(["\n"], ["abc\ndef"])
    assert stopped and outs == ["abc"]


def test_after_a_match_nothing_more_is_returned() -> None:
    m = StopMatcher(["x"])
    assert m.feed("ax") == ("a", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_no_stops_passes_through() -> None:
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


def test_stop_at_the_very_start() -> None:
    m = StopMatcher(["\n"])
    assert m.feed("\nfoo") == ("", True)


def test_overlapping_prefix_hold_uses_the_longest_candidate() -> None:
    # "aab" could continue as "aaba"? The stop "aba" has prefix "ab": hold "ab" only.
    m = StopMatcher(["aba"])
    assert m.feed("aab") == ("a", False)
    assert m.feed("a") == ("", True)


def test_chat_rendering_and_validation() -> None:
    msgs = validate_messages(
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ]
    )
    assert render_plain(msgs) == "System: Be terse.\nUser: Hi\nAssistant:"


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "hi",
        [],
        [{"role": "user"}],
        [{"role": "robot", "content": "x"}],
        [{"role": "user", "content": 3}],
        [3],
    ],
)
def test_bad_messages_name_the_param(bad: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate_messages(bad)
    assert err.value.param == "messages"
