"""The one-pass stop matcher (engine/stops.py) against a reference that scans the whole text.

The reference is the definition: the text ends where the earliest occurrence
of any stop string starts. The matcher must give that answer however the text
is cut into pieces (tokens), and between pieces hold back exactly the longest
suffix that could still begin a stop string.
"""

from __future__ import annotations

import random

import pytest

from fastpilot.engine import stops as stops_module
from fastpilot.engine.stops import StopMatcher

# What Continue's tab autocomplete sends for a StarCoder-style model in Python
# (getStopTokens: the template's FIM tokens, common stops, multi-line stops,
# "\n" + each top-level keyword of the language).
CONTINUE_STOPS = [
    "<fim_prefix>",
    "<fim_suffix>",
    "<fim_middle>",
    "<file_sep>",
    "<|endoftext|>",
    "<|file_separator|>",
    "/src/",
    "#- coding: utf-8",
    "```",
    "\n\n",
    "\r\n\r\n",
    "\ndef",
    "\nclass",
    '\n"""#',
]


def reference(stops: list[str], text: str) -> tuple[str, int | None]:
    """(text before the earliest stop occurrence, its start) by scanning for every stop."""
    hits = [at for at in (text.find(s) for s in stops if s) if at != -1]
    if not hits:
        return text, None
    return text[: min(hits)], min(hits)


def reference_hold(stops: list[str], text: str) -> int:
    """Longest suffix of ``text`` that is a proper prefix of a stop (what must be held)."""
    for k in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-k:]) and s != text[-k:] for s in stops):
            return k
    return 0


def run(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    matcher = StopMatcher(stops)
    out = []
    fed = ""
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), matcher.matched
        fed += piece
        # Nothing lost, nothing invented: emitted + held is all the text so far,
        # and the held part is exactly the longest possible stop prefix.
        assert "".join(out) + matcher.held == fed
        assert len(matcher.held) == reference_hold(stops, fed)
    out.append(matcher.flush())
    return "".join(out), matcher.matched


def cuts(text: str, rng: random.Random) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        j = i + rng.randint(1, 4)
        pieces.append(text[i:j])
        i = j
    return pieces


def test_continue_stop_list_across_token_boundaries():
    # "\n\n" starts at the end of the first function; the "\ndef" after it starts later.
    pieces = ["def", " add", "(a,", " b):\n", "    return", " a + b", "\n", "\nde", "f sub"]
    assert run(CONTINUE_STOPS, pieces) == ("def add(a, b):\n    return a + b", "\n\n")
    fim = "x = 1<fim_suf" + "fix>rest"
    assert run(CONTINUE_STOPS, ["x = 1<fim", "_suf", "fix>rest"]) == ("x = 1", "<fim_suffix>")
    assert reference(CONTINUE_STOPS, fim)[0] == "x = 1"


def test_earliest_start_wins_over_the_first_to_complete():
    # "bc" completes first, but "abcd" started earlier: the text ends before "a".
    assert run(["bc", "abcd"], ["abc", "d"]) == ("", "abcd")
    assert run(["bc", "abcd"], ["a", "b", "c", "d"]) == ("", "abcd")
    # When the longer candidate dies, the shorter match stands.
    assert run(["bc", "abcd"], ["abc", "x"]) == ("a", "bc")
    # Settled at the end of the text too.
    assert run(["bc", "abcd"], ["xabc"]) == ("xa", "bc")


def test_overlapping_and_nested_stops():
    assert run(["aab", "ab"], ["xaab"]) == ("x", "aab")
    assert run(["abab", "bab"], ["ab", "ab"]) == ("", "abab")
    assert run(["he", "she", "his", "hers"], ["us", "hers"]) == ("u", "she")
    # One stop inside another at the same start: either cuts at the same place.
    text, matched = run(["\n", "\n\n"], ["a\n\nb"])
    assert text == "a" and matched in ("\n", "\n\n")


def test_holds_back_only_possible_prefixes():
    matcher = StopMatcher(["\ndef "])
    assert matcher.feed("x = 1\nde") == ("x = 1", False)
    assert matcher.held == "\nde"
    assert matcher.feed("lta") == ("\ndelta", False)
    assert matcher.held == ""
    assert matcher.flush() == "" and matcher.matched is None


def test_no_stops_passes_text_through():
    matcher = StopMatcher([])
    assert matcher.feed("anything\n\n") == ("anything\n\n", False)
    assert matcher.flush() == ""


def test_matches_the_reference_on_random_texts_and_cuts():
    rng = random.Random(1234)
    alphabet = "ab\n c"
    for _ in range(3000):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(6)]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        got, matched = run(stops, cuts(text, rng))
        want, at = reference(stops, text)
        assert got == want, (stops, text)
        if at is None:
            assert matched is None
        else:
            assert matched is not None and text.startswith(matched, at)


def test_thirty_two_stops_and_unicode():
    stops = [f"<stop{i}>" for i in range(31)] + ["終わり"]
    assert run(stops, ["これで", "終", "わりです"]) == ("これで", "終わり")
    assert run(stops, ["a<stop2", "9>b"]) == ("a", "<stop29>")


def test_the_automaton_is_built_once_per_stop_list():
    stops_module._compile.cache_clear()
    for _ in range(5):
        StopMatcher(CONTINUE_STOPS).feed("x")
    info = stops_module._compile.cache_info()
    assert (info.misses, info.hits) == (1, 4)


@pytest.mark.parametrize("stops", [["\n"], CONTINUE_STOPS])
def test_after_a_match_nothing_more_is_returned(stops):
    matcher = StopMatcher(stops)
    text, stopped = matcher.feed("line\n\nmore")
    assert stopped and text == "line"
    assert matcher.feed("and more") == ("", True)
    assert matcher.flush() == ""
