"""Stop strings matched across token boundaries.

A stop string can straddle tokens (``"\\nde"`` + ``"f "`` for ``"\\ndef "``),
so text that *could* be the start of a stop string is held back until the
next piece proves it is not. Text from the stop string on is never returned.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Hold back possible stop-string prefixes; report the first full match.

    Not thread-safe: one per sequence. With no stop strings every call passes
    its text straight through.
    """

    __slots__ = ("stops", "_buf", "matched", "_max_hold")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops: tuple[str, ...] = tuple(s for s in dict.fromkeys(stops) if s)
        self._buf = ""
        self.matched: str | None = None  # the stop string that ended the text
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """Add decoded text; return ``(text safe to emit now, stopped)``.

        Once a stop matched, every later call returns ``("", True)``.
        """
        if self.matched is not None:
            return "", True
        if not self.stops:
            return text, False
        buf = self._buf + text
        # Earliest match wins; on a tie at one position the shorter stop string
        # ends the text first, which yields the same emitted text anyway.
        best = -1
        for stop in self.stops:
            at = buf.find(stop)
            if at != -1 and (best == -1 or at < best):
                best, self.matched = at, stop
        if best != -1:
            self._buf = ""
            return buf[:best], True
        hold = self._hold_length(buf)
        self._buf = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def _hold_length(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop."""
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(stop.startswith(tail) for stop in self.stops):
                return k
        return 0

    @property
    def held(self) -> str:
        """The text currently held back."""
        return self._buf

    def flush(self) -> str:
        """Return the held text at the end of generation (no stop matched)."""
        text, self._buf = self._buf, ""
        return "" if self.matched is not None else text
