"""Quantize a float GGUF file with llama.cpp's own quantizer (through llama-cpp-python).

``llama_model_quantize`` is the same code path as llama.cpp's ``llama-quantize`` tool;
it is CPU bound and uses ``nthread`` threads. Tensors whose rows are not a multiple of
the block size (256 for k-quants) fall back to a compatible type chosen by llama.cpp.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastpilot.errors import ConversionError

from .progress import steps

__all__ = ["GGUF_QUANT_TYPES", "quantize_gguf"]

# fastpilot name -> llama_cpp LLAMA_FTYPE_* constant name
GGUF_QUANT_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def quantize_gguf(src: Path, dst: Path, qtype: str, nthread: int | None = None) -> None:
    """Write ``dst`` as ``src`` quantized to ``qtype`` (``q8_0`` or ``q4_k_m``).

    Args:
        src: an f32 or f16 GGUF file (f32 gives the most accurate result).
        nthread: worker threads; defaults to all CPUs (this call blocks until done).

    Raises:
        ConversionError: unknown type, llama-cpp-python missing, or llama.cpp failed.
    """
    if qtype not in GGUF_QUANT_TYPES:
        raise ConversionError(
            f"unknown GGUF quantization {qtype!r}; choose from "
            f"f32, f16, {', '.join(GGUF_QUANT_TYPES)}"
        )
    try:
        import llama_cpp
    except ImportError as ex:
        raise ConversionError(
            "GGUF quantization needs llama-cpp-python (pip install llama-cpp-python)"
        ) from ex

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_QUANT_TYPES[qtype])
    params.nthread = nthread or os.cpu_count() or 1
    # llama.cpp logs every tensor at INFO; keep errors only while quantizing.
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with steps(f"gguf {qtype}", 1) as progress:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
            progress.update()
    finally:
        logger.setLevel(level)
    if rc != 0 or not dst.is_file():
        raise ConversionError(f"llama.cpp failed to quantize {src.name} to {qtype} (status {rc})")
