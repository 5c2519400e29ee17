"""Incremental detokenization: token ids in, complete UTF-8 characters out.

Byte-level BPE tokenizers (GPT-2, CodeGen) split multi-byte characters across
tokens: ``"中"`` (3 bytes) may arrive as two tokens. Decoding each token on its
own would emit replacement characters mid-stream, so the detokenizer keeps the
bytes of an unfinished character until the rest arrives.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class IncrementalDetokenizer:
    """Turn a stream of token ids into text without splitting UTF-8 characters.

    ``token_bytes`` maps a token id to the raw bytes it stands for (the
    backend's :meth:`~fastpilot.backends.base.Backend.token_bytes`). Invalid
    byte sequences become U+FFFD at once; only a *possibly incomplete* tail
    (at most 3 bytes) is held back. Not thread-safe: one per sequence.
    """

    __slots__ = ("_token_bytes", "_decoder", "chars")

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        # The stdlib incremental decoder keeps an incomplete trailing sequence
        # between calls and replaces malformed ones.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0  # characters returned so far (feed + flush)

    def feed(self, token_id: int) -> str:
        """Add one token; return the characters it completed (may be ``""``)."""
        return self.feed_bytes(self._token_bytes(token_id))

    def feed_bytes(self, data: bytes) -> str:
        """Add raw bytes; return the characters they completed."""
        text = self._decoder.decode(data, final=False)
        self.chars += len(text)
        return text

    @property
    def pending(self) -> bool:
        """True while bytes of an unfinished character are held."""
        return bool(self._decoder.getstate()[0])

    def flush(self) -> str:
        """Return the held bytes decoded with replacement, and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        self.chars += len(text)
        return text
