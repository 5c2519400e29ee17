"""Stop strings matched across token boundaries, in one pass over the text.

A stop string can straddle tokens (``"\\nde"`` + ``"f "`` for ``"\\ndef "``),
so text that *could* be the start of a stop string is held back until the
next piece proves it is not. Text from the stop string on is never returned.

Every stop string of a request is compiled into one Aho–Corasick automaton
(a trie of the strings with failure links), so each generated character costs
a bounded number of transitions whatever the number of stop strings: Continue
sends ~14 per request, the cap is ``--max-stop`` (32 by default). The
automaton's state after the text so far is also the longest suffix of the
text that is a prefix of some stop string -- exactly the text to hold back.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence


class _Automaton:
    """The Aho–Corasick automaton of a set of stop strings. Immutable once built.

    Node 0 is the root. ``depth[s]`` is the length of the prefix node ``s``
    spells; ``match[s]`` is the index in ``stops`` of the longest stop string
    that ends at ``s`` (itself or through failure links), or -1.
    """

    __slots__ = ("stops", "goto", "fail", "depth", "match")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]
        own = [-1]
        for k, stop in enumerate(stops):
            node = 0
            for ch in stop:
                nxt = self.goto[node].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[node][ch] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[node] + 1)
                    own.append(-1)
                node = nxt
            own[node] = k
        # Breadth-first: a node's failure target is shallower, so it is final first.
        self.fail = [0] * len(self.goto)
        self.match = list(own)
        order = list(self.goto[0].values())
        for node in order:
            for ch, child in self.goto[node].items():
                order.append(child)
                if node:
                    self.fail[child] = self.step(self.fail[node], ch)
                if self.match[child] == -1:
                    # The longest stop ending here is the child's own, else its fallback's.
                    self.match[child] = self.match[self.fail[child]]

    def step(self, state: int, ch: str) -> int:
        """The state after reading ``ch`` in ``state`` (amortized O(1) per character)."""
        while True:
            nxt = self.goto[state].get(ch)
            if nxt is not None:
                return nxt
            if state == 0:
                return 0
            state = self.fail[state]


@functools.lru_cache(maxsize=256)
def _compile(stops: tuple[str, ...]) -> _Automaton:
    # Clients send the same list on every request (Continue, Copilot): build it once.
    return _Automaton(stops)


class StopMatcher:
    """Hold back possible stop-string prefixes; report the earliest full match.

    Not thread-safe: one per sequence (the compiled automaton is shared and
    read-only). With no stop strings every call passes its text straight
    through. The earliest *starting* occurrence of any stop string ends the
    text, however the text was split into pieces: when a stop string has
    matched but a longer one that started earlier may still complete, the
    match waits for the next piece (or :meth:`flush`) to settle it.
    """

    __slots__ = ("stops", "matched", "_ac", "_state", "_buf", "_pos", "_pending")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops: tuple[str, ...] = tuple(s for s in dict.fromkeys(stops) if s)
        self.matched: str | None = None  # the stop string that ended the text
        self._ac = _compile(self.stops) if self.stops else None
        self._state = 0
        self._buf = ""  # held text: the last len(_buf) characters read
        self._pos = 0  # characters read so far
        self._pending: tuple[int, str] | None = None  # (start, stop) of an unsettled match

    def feed(self, text: str) -> tuple[str, bool]:
        """Add decoded text; return ``(text safe to emit now, stopped)``.

        Once a stop matched, every later call returns ``("", True)``.
        """
        if self.matched is not None:
            return "", True
        ac = self._ac
        if ac is None:
            return text, False
        state, pos, pending = self._state, self._pos, self._pending
        depth, match, stops = ac.depth, ac.match, ac.stops
        for ch in text:
            state = ac.step(state, ch)
            k = match[state]
            if k != -1:
                start = pos + 1 - len(stops[k])
                if pending is None or start < pending[0]:
                    pending = (start, stops[k])
            pos += 1
            # Settled when no partial match alive now started before the pending one.
            if pending is not None and pos - depth[state] >= pending[0]:
                return self._stop(text, pending, self._pos)
        self._state, self._pos, self._pending = state, pos, pending
        buf = self._buf + text
        hold = depth[state]
        self._buf = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def _stop(self, text: str, pending: tuple[int, str], text_start: int) -> tuple[str, bool]:
        """End the text at ``pending``'s start; ``text`` began at offset ``text_start``."""
        start, stop = pending
        self.matched = stop
        buf = self._buf + text
        buf_start = text_start - len(self._buf)
        self._buf, self._pending = "", None
        return buf[: start - buf_start], True

    @property
    def held(self) -> str:
        """The text currently held back."""
        return self._buf

    def flush(self) -> str:
        """Return the held text at the end of generation.

        A match still waiting for a longer candidate is settled here: the text
        before it is returned and :attr:`matched` is set.
        """
        if self.matched is not None:
            return ""
        if self._pending is not None:
            text, _ = self._stop("", self._pending, self._pos)
            return text
        text, self._buf = self._buf, ""
        return text
