"""Read a GPT-2 style byte-level BPE tokenizer from a checkpoint, without transformers.

The source of truth is ``tokenizer.json`` (the `tokenizers` library format): it is
copied verbatim into CTranslate2 outputs, and its vocabulary, merges and added
tokens are written into GGUF files. A checkpoint that only has ``vocab.json`` +
``merges.txt`` (+ ``added_tokens.json``) gets an equivalent ``tokenizer.json`` built
with the `tokenizers` library, the way GPT-2's slow->fast conversion does it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpilot.errors import ConversionError

__all__ = ["TokenKind", "TokenizerData", "load_tokenizer"]

DEFAULT_SPECIAL = "<|endoftext|>"


class TokenKind(enum.IntEnum):
    """Token kinds, numbered as GGUF's ``tokenizer.ggml.token_type`` (gguf.TokenType)."""

    NORMAL = 1
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5


@dataclass(frozen=True)
class TokenizerData:
    """A byte-level BPE vocabulary in id order plus what GGUF and CT2 need from it.

    Attributes:
        tokens: token strings by id, ``len(tokens) == max id + 1`` (byte-level
            encoded for normal tokens, raw text for added tokens).
        kinds: :class:`TokenKind` per id.
        merges: BPE merges as ``"left right"`` strings, highest priority first.
        bos_id / eos_id: ids of the begin/end of text tokens.
        json_text: the ``tokenizer.json`` document that reproduces HF tokenization.
    """

    tokens: tuple[str, ...]
    kinds: tuple[TokenKind, ...]
    merges: tuple[str, ...]
    bos_id: int
    eos_id: int
    json_text: str

    @property
    def bos_token(self) -> str:
        return self.tokens[self.bos_id]

    @property
    def eos_token(self) -> str:
        return self.tokens[self.eos_id]

    def padded(self, size: int) -> tuple[list[str], list[TokenKind]]:
        """Return tokens and kinds padded with unused entries up to ``size`` ids.

        CodeGen's embedding has more rows than its tokenizer has tokens (51200 vs
        50295); every format wants one vocabulary entry per row, and the filler names
        must be unique and never produced by the tokenizer.

        Raises:
            ConversionError: the tokenizer has more tokens than the model has rows.
        """
        if len(self.tokens) > size:
            raise ConversionError(
                f"tokenizer has {len(self.tokens)} tokens but the model's embedding has "
                f"only {size} rows; tokenizer and config.json disagree"
            )
        tokens = list(self.tokens)
        kinds = list(self.kinds)
        taken = set(tokens)
        for i in range(len(tokens), size):
            name = f"[PAD{i}]"
            while name in taken:
                name = "_" + name
            tokens.append(name)
            kinds.append(TokenKind.UNUSED)
        return tokens, kinds


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise ConversionError(f"{path}: cannot read ({ex})") from ex


def _build_tokenizer_json(directory: Path) -> str:
    """Build tokenizer.json from vocab.json + merges.txt (+ added_tokens.json).

    GPT-2 style by default (``<|endoftext|>`` special, nothing added around the text).
    A RoBERTa tokenizer (``tokenizer_class`` RobertaTokenizer, as CodeT5 and CodeT5+
    ship it) keeps its own special tokens and wraps every input ``<s> ... </s>``, as
    transformers' fast RoBERTa tokenizer does.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    try:
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as ex:  # the tokenizers library raises plain Exception subclasses
        raise ConversionError(f"{directory}: cannot read vocab.json/merges.txt ({ex})") from ex
    # GPT-2's pre-tokenizer: byte-level with the GPT-2 split regex, no prefix space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added_path = directory / "added_tokens.json"
    if added_path.is_file():
        added: dict[str, int] = _read_json(added_path)
        for content, idx in sorted(added.items(), key=lambda kv: kv[1]):
            tok.add_tokens([AddedToken(content, normalized=False)])
            if tok.token_to_id(content) != idx:
                raise ConversionError(f"{added_path}: token {content!r} expected at id {idx}")
    if _tokenizer_class(directory).startswith("Roberta"):
        specials = _roberta_specials(directory)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        bos, eos = _special_token(directory, "bos_token"), _special_token(directory, "eos_token")
        bos_id = tok.token_to_id(bos) if bos is not None else None
        eos_id = tok.token_to_id(eos) if eos is not None else None
        if bos is None or eos is None or bos_id is None or eos_id is None:
            raise ConversionError(f"{directory}: a RoBERTa tokenizer needs its bos and eos tokens")
        tok.post_processor = processors.RobertaProcessing(
            (eos, eos_id), (bos, bos_id), trim_offsets=False
        )
        return tok.to_str()
    tok.add_special_tokens([AddedToken(DEFAULT_SPECIAL, special=True, normalized=False)])
    return tok.to_str()


def _tokenizer_class(directory: Path) -> str:
    path = directory / "tokenizer_config.json"
    data = _read_json(path) if path.is_file() else {}
    value = data.get("tokenizer_class") if isinstance(data, dict) else None
    return value if isinstance(value, str) else ""


def _roberta_specials(directory: Path) -> list[str]:
    """bos/eos/unk/pad/mask and the additional special tokens (T5 sentinels), in that order."""
    found: list[str] = []
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"):
        content = _special_token(directory, key)
        if content is not None and content not in found:
            found.append(content)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        data = _read_json(path) if path.is_file() else {}
        extra = data.get("additional_special_tokens") if isinstance(data, dict) else None
        for value in extra or []:
            content = _special_content(value)
            if content is not None and content not in found:
                found.append(content)
    return found


def _special_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_token(directory: Path, key: str) -> str | None:
    """Find ``bos_token``/``eos_token`` in tokenizer_config.json or special_tokens_map.json."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            data = _read_json(path)
            if isinstance(data, dict) and (content := _special_content(data.get(key))):
                return content
    return None


def _has_byte_level(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre.get("pretokenizers", []) or [])


def load_tokenizer(directory: Path, config: dict[str, Any]) -> TokenizerData:
    """Read the checkpoint's tokenizer.

    Args:
        directory: checkpoint directory with tokenizer.json, or vocab.json + merges.txt.
        config: its config.json; ``bos_token_id``/``eos_token_id`` are a last resort,
            the tokenizer files win (CodeGen's config says bos=1, which is ``"``).

    Raises:
        ConversionError: no tokenizer files, or not a byte-level BPE tokenizer.
    """
    path = directory / "tokenizer.json"
    if path.is_file():
        try:
            json_text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as ex:
            raise ConversionError(f"{path}: cannot read ({ex})") from ex
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        json_text = _build_tokenizer_json(directory)
    else:
        raise ConversionError(
            f"{directory}: no tokenizer (expected tokenizer.json, or vocab.json + merges.txt)"
        )
    try:
        doc = json.loads(json_text)
        model = doc["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as ex:
        raise ConversionError(f"{path}: not a tokenizers JSON document") from ex
    if model.get("type") != "BPE" or not _has_byte_level(doc.get("pre_tokenizer")):
        raise ConversionError(f"{path}: only GPT-2 style byte-level BPE tokenizers are supported")

    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    kinds: dict[int, TokenKind] = {}
    for added in doc.get("added_tokens") or []:
        idx = int(added["id"])
        by_id[idx] = added["content"]
        kinds[idx] = TokenKind.CONTROL if added.get("special") else TokenKind.USER_DEFINED
    size = max(by_id) + 1
    missing = [i for i in range(size) if i not in by_id]
    if missing:
        raise ConversionError(f"{path}: token ids are not contiguous (first hole at {missing[0]})")
    tokens = tuple(by_id[i] for i in range(size))
    ids = {t: i for i, t in enumerate(tokens)}

    # Merges are "a b" strings (older files) or [a, b] pairs (tokenizers >= 0.20).
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model.get("merges", []))

    def resolve(key: str, config_key: str) -> int:
        content = _special_token(directory, key)
        if content is not None and content in ids:
            return ids[content]
        if DEFAULT_SPECIAL in ids:
            return ids[DEFAULT_SPECIAL]
        value = config.get(config_key)
        if isinstance(value, int) and 0 <= value < size:
            return value
        raise ConversionError(f"{directory}: cannot tell the {key} of the tokenizer")

    return TokenizerData(
        tokens=tokens,
        kinds=tuple(kinds.get(i, TokenKind.NORMAL) for i in range(size)),
        merges=merges,
        bos_id=resolve("bos_token", "bos_token_id"),
        eos_id=resolve("eos_token", "eos_token_id"),
        json_text=json_text,
    )
