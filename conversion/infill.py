"""What a converted model's manifest says about fill-in-the-middle and where generation ends.

The shapes follow the project's shared FIM contract (the engine renders them; the
converter only states them):

* CodeGen2: ``{"style": "codegen2", "mask": "<mask_1>", "eot": "<|endoftext|>",
  "sep": "<sep>", "end": "<eom>"}``; the prompt is
  ``prefix + <mask_1> + suffix + <|endoftext|> + <sep> + <mask_1>`` and the model
  closes the infilled span with ``<eom>``, so ``<eom>`` is also an end token.
* CodeT5 / CodeT5+: ``{"style": "t5-span", "sentinel": "<extra_id_0>"}``; the
  encoder reads ``prefix + <extra_id_0> + suffix``.
* GPT-2 and CodeGen-1 were not trained to infill: ``None``.

A template is only written when every token it names is one token of the model's
vocabulary; a checkpoint whose tokenizer lacks them gets ``None`` rather than a
template that would be tokenized into pieces.
"""

from __future__ import annotations

import re
from typing import Any

from .tokenizer import TokenizerData

__all__ = ["CODEGEN2_FIM", "T5_SPAN_FIM", "end_token_ids", "fim_template"]

CODEGEN2_FIM = {
    "style": "codegen2",
    "mask": "<mask_1>",
    "eot": "<|endoftext|>",
    "sep": "<sep>",
    "end": "<eom>",
}
T5_SPAN_FIM = {"style": "t5-span", "sentinel": "<extra_id_0>"}
_SENTINEL = re.compile(r"<extra_id_\d+>")


def _ids(tokenizer: TokenizerData) -> dict[str, int]:
    return {t: i for i, t in enumerate(tokenizer.tokens)}


def fim_template(arch: str, tokenizer: TokenizerData) -> dict[str, Any] | None:
    """The manifest's ``fim`` entry for a model of ``arch``, or None when it cannot infill."""
    template = {"codegen2": CODEGEN2_FIM, "t5": T5_SPAN_FIM}.get(arch)
    if template is None:
        return None
    ids = _ids(tokenizer)
    needed = [v for k, v in template.items() if k != "style"]
    if not all(t in ids for t in needed):
        return None
    return dict(template)


def end_token_ids(arch: str, tokenizer: TokenizerData) -> list[int]:
    """Ids that end a completion: the tokenizer's eos, plus the span markers of infill models.

    CodeGen2's ``<eom>`` ends an infilled span and is emitted nowhere else, so treating
    it as an end token everywhere keeps it out of any returned text. A T5 decoder
    writes spans as ``<extra_id_0> span <extra_id_1> ...``: any sentinel after the
    first span ends it.
    """
    ends = [tokenizer.eos_id]
    ids = _ids(tokenizer)
    if arch == "codegen2":
        extra = [ids[CODEGEN2_FIM["end"]]] if CODEGEN2_FIM["end"] in ids else []
    elif arch == "t5":
        extra = sorted(i for t, i in ids.items() if _SENTINEL.fullmatch(t))
    else:
        extra = []
    return ends + [i for i in extra if i not in ends]
