"""HF checkpoint -> CTranslate2 / GGUF conversion, quantization and the model manifest.

Public API (imports stay light: numpy, ctranslate2, gguf and llama_cpp load lazily,
torch and transformers never)::

    from conversion.convert import Target, convert
    convert("gpt2", "117M", [Target("ct2", "int8"), Target("gguf", "q4_k_m")])

    from conversion.manifest import read_manifest, verify

``conversion.convert_checkpoint`` is the same function as ``conversion.convert.convert``
(the submodule name ``convert`` shadows a package-level function of that name).
Errors are :class:`fastpilot.errors.ConversionError` with a one-line message.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_TARGETS", "Target", "convert_checkpoint", "read_manifest", "verify"]


def __getattr__(name: str) -> Any:
    if name in ("Target", "DEFAULT_TARGETS", "convert_checkpoint"):
        from . import convert as _convert

        return _convert.convert if name == "convert_checkpoint" else getattr(_convert, name)
    if name in ("read_manifest", "verify"):
        from . import manifest

        return getattr(manifest, name)
    raise AttributeError(name)
