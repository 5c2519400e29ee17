"""Fill-in-the-middle token ids of a GGUF vocabulary, as llama.cpp itself reads them.

llama.cpp fills its FIM ids from the ``tokenizer.ggml.fim_{pre,suf,mid,pad,rep,sep}_token_id``
keys when the converter wrote them and otherwise recognises the usual spellings
in the vocabulary (``<|fim_prefix|>``, ``<fim_prefix>``, ``<PRE>``, ``<|file_sep|>`` ...).
``llama_vocab_fim_pre()`` and its siblings return the result of both, so asking
them is how a GGUF written for Qwen2.5-Coder, StarCoder2, DeepSeek-Coder,
CodeLlama or CodeGemma tells us how to infill. Nothing here imports ``llama_cpp``:
the caller passes the loaded library module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FimTokenIds", "read_fim_tokens"]


@dataclass(frozen=True, slots=True)
class FimTokenIds:
    """The FIM control tokens of one vocabulary; ``None`` where the model has none.

    ``bos`` is set only when the vocabulary asks for a BOS at the start of every
    sequence (``tokenizer.ggml.add_bos_token``), as llama.cpp's server puts it
    before an infill prompt then. ``end`` holds every end-of-generation token
    llama.cpp knows for this vocabulary (EOS, EOT, and FIM_PAD/REP/SEP, which
    it counts as end-of-generation too), so an infill stops where
    llama.cpp's own would.
    """

    pre: int
    suf: int
    mid: int
    pad: int | None = None
    rep: int | None = None
    sep: int | None = None
    bos: int | None = None
    end: frozenset[int] = frozenset()


def _opt(value: int, n_vocab: int) -> int | None:
    # LLAMA_TOKEN_NULL is -1; anything outside the vocabulary is as good as absent.
    return value if 0 <= value < n_vocab else None


def read_fim_tokens(lib: Any, vocab: Any) -> FimTokenIds | None:
    """FIM ids of ``vocab`` (a ``llama_vocab *``), or None when it lacks PRE, SUF or MID.

    Costs one ``llama_vocab_is_eog`` ctypes call per token, once at load time
    and only for vocabularies with FIM tokens (a fraction of a second for 150k).
    """
    n_vocab = int(lib.llama_vocab_n_tokens(vocab))
    pre = _opt(int(lib.llama_vocab_fim_pre(vocab)), n_vocab)
    suf = _opt(int(lib.llama_vocab_fim_suf(vocab)), n_vocab)
    mid = _opt(int(lib.llama_vocab_fim_mid(vocab)), n_vocab)
    if pre is None or suf is None or mid is None:
        return None
    pad = _opt(int(lib.llama_vocab_fim_pad(vocab)), n_vocab)
    rep = _opt(int(lib.llama_vocab_fim_rep(vocab)), n_vocab)
    sep = _opt(int(lib.llama_vocab_fim_sep(vocab)), n_vocab)
    bos = _opt(int(lib.llama_vocab_bos(vocab)), n_vocab)
    add_bos = bool(lib.llama_vocab_get_add_bos(vocab))
    end = frozenset(t for t in range(n_vocab) if lib.llama_vocab_is_eog(vocab, t))
    return FimTokenIds(
        pre=pre,
        suf=suf,
        mid=mid,
        pad=pad,
        rep=rep,
        sep=sep,
        bos=bos if add_bos else None,
        end=end,
    )
