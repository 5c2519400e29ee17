"""Editor stops: end a completion at a line boundary, as llama.cpp's server does for editors.

Two limits an editor plugin sets per request (llama.vim / llama.vscode send
both; Copilot's ``extra.trim_by_indentation`` maps onto the first):

- ``n_indent``: a new line indented by fewer than ``n_indent`` columns ends
  the completion, and that line is not returned (the text ends with the
  newline before it). Spaces and tabs count one column each, as llama.cpp
  counts them. Blank lines do not decide anything: they are held until the
  next line with text shows whether the block goes on.
- ``t_max_predict_ms``: once that much time has passed since the first
  generated token, the completion ends at the next newline (included).

:class:`LineStops` filters the text that survived the stop strings, so a
stop string still wins when it comes first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LineLimits:
    """The editor stops of one request; zero turns a limit off."""

    n_indent: int = 0
    t_max_predict_ms: float = 0.0

    @property
    def active(self) -> bool:
        return self.n_indent > 0 or self.t_max_predict_ms > 0


NO_LINE_LIMITS = LineLimits()


class LineStops:
    """Apply :class:`LineLimits` to a sequence's text. Not thread-safe: one per sequence.

    ``clock`` is ``time.monotonic`` unless a test injects another; it is read
    once per :meth:`feed`.
    """

    __slots__ = ("limits", "_clock", "_started", "_expired", "_held", "_holding", "stopped")

    def __init__(self, limits: LineLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._started: float | None = None  # when the first text arrived
        self._expired = False  # t_max_predict_ms has passed
        self._held = ""  # the current line's indentation (and blank lines before it)
        self._holding = False  # inside the indentation of a line after a newline
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return ``(text to emit now, stopped)``. After a stop, ``("", True)``."""
        if self.stopped:
            return "", True
        lim = self.limits
        if not lim.active:
            return text, False
        if lim.t_max_predict_ms > 0 and not self._expired:
            now = self._clock()
            if self._started is None:
                self._started = now
            elif (now - self._started) * 1000.0 >= lim.t_max_predict_ms:
                self._expired = True
        out: list[str] = []
        for ch in text:
            if self._holding:
                if ch in " \t":
                    self._held += ch
                    continue
                if ch == "\n":
                    if self._expired:
                        return self._stop(out)  # the budget ends on a blank line: drop it
                    self._held += ch
                    continue
                # The first character with text decides the line.
                indent = len(self._held) - (self._held.rfind("\n") + 1)
                if indent < lim.n_indent:
                    return self._stop(out)
                out.append(self._held)
                self._held, self._holding = "", False
            if ch == "\n":
                if self._expired:
                    out.append(ch)
                    return self._stop(out)
                if lim.n_indent > 0:
                    out.append(ch)
                    self._holding = True
                    continue
            out.append(ch)
        return "".join(out), False

    def _stop(self, out: list[str]) -> tuple[str, bool]:
        self.stopped = True
        self._held = ""
        return "".join(out), True

    def flush(self) -> str:
        """The held indentation at the natural end of the text ("" after a stop)."""
        text, self._held = self._held, ""
        return "" if self.stopped else text
