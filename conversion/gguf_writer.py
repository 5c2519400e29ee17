"""Write a canonical :class:`DecoderModel` as an f32 or f16 GGUF file with the gguf package.

Which llama.cpp graph runs the file is decided by the model's shape:

* learned positions + sequential blocks (GPT-2) -> arch ``gpt2``;
* partial rotary + parallel residual with one shared norm (CodeGen-1 and CodeGen2,
  whose difference is only in how the checkpoint packs ``qkv_proj``) -> arch ``phi2``.
  llama.cpp has no CodeGen graph, but phi2's is the same computation: one LayerNorm
  feeding parallel attention and MLP, NeoX rotary on the first ``rope.dimension_count``
  dims, tanh-GELU, LM head with bias. phi2 requires ``attn_output.bias`` and
  ``output.bias``; CodeGen has neither on attention, so zeros are written.

Tensor names come from gguf's own tables (``gguf.TENSOR_NAMES``), so a rename in
llama.cpp shows up as a gguf package change, not a silent mismatch. Quantized types
(Q8_0, Q4_K_M) are made from these files by :mod:`conversion.quantize`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fastpilot.errors import ConversionError

from .infill import end_token_ids
from .model import DecoderModel, Linear, Norm
from .progress import steps
from .tokenizer import TokenizerData

__all__ = ["GGUF_FLOAT_TYPES", "gguf_arch", "write_gguf"]

GGUF_FLOAT_TYPES = ("f32", "f16")


def gguf_arch(model: DecoderModel) -> str:
    """Return the llama.cpp architecture name that computes ``model`` exactly.

    Raises:
        ConversionError: no llama.cpp graph matches this model's shape.
    """
    parallel = model.layers[0].ffn_norm is None
    if model.hyper.rotary_dim is None and model.pos_embd is not None and not parallel:
        return "gpt2"
    if model.hyper.rotary_dim is not None and model.pos_embd is None and parallel:
        return "phi2"
    raise ConversionError(f"no llama.cpp graph for a {model.hyper.arch} model of this shape")


def _tensors(model: DecoderModel, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (gguf name, array) in the canonical (out, in) layout = ggml's reversed ne."""
    import gguf

    T = gguf.MODEL_TENSOR
    names = gguf.TENSOR_NAMES

    def norm(
        t: gguf.MODEL_TENSOR, n: Norm, bid: int | None = None
    ) -> Iterator[tuple[str, np.ndarray]]:
        base = names[t].format(bid=bid)
        yield f"{base}.weight", n.gamma
        yield f"{base}.bias", n.beta

    def linear(
        t: gguf.MODEL_TENSOR, lin: Linear, bid: int | None = None, bias_required: bool = False
    ) -> Iterator[tuple[str, np.ndarray]]:
        base = names[t].format(bid=bid)
        yield f"{base}.weight", lin.weight
        if lin.bias is not None:
            yield f"{base}.bias", lin.bias
        elif bias_required:
            yield f"{base}.bias", np.zeros(lin.weight.shape[0], dtype=np.float32)

    yield f"{names[T.TOKEN_EMBD]}.weight", model.token_embd  # (vocab, n_embd)
    if arch == "gpt2":
        yield f"{names[T.POS_EMBD]}.weight", model.pos_embd  # type: ignore[misc]  # (n_ctx, n_embd)
    for i, layer in enumerate(model.layers):
        yield from norm(T.ATTN_NORM, layer.attn_norm, i)
        yield from linear(T.ATTN_QKV, layer.qkv, i)  # (3E, E) rows [q | k | v]
        yield from linear(T.ATTN_OUT, layer.attn_out, i, bias_required=arch == "phi2")
        if layer.ffn_norm is not None:
            yield from norm(T.FFN_NORM, layer.ffn_norm, i)
        yield from linear(T.FFN_UP, layer.ffn_up, i)
        yield from linear(T.FFN_DOWN, layer.ffn_down, i)
    yield from norm(T.OUTPUT_NORM, model.final_norm)
    if not (arch == "gpt2" and model.tied):
        # gpt2 without output.weight reuses token_embd (llama.cpp TENSOR_DUPLICATED).
        yield from linear(T.OUTPUT, model.lm_head, bias_required=arch == "phi2")


def write_gguf(
    model: DecoderModel, tokenizer: TokenizerData, path: Path, ftype: str, name: str = "model"
) -> None:
    """Write ``model`` to ``path`` as one GGUF file, weights in ``ftype`` (f32 or f16).

    In f16 files only matrices are half precision; norms and biases stay f32, as
    llama.cpp's own converter does. The whole file is assembled in memory first.
    """
    import gguf

    if ftype not in GGUF_FLOAT_TYPES:
        raise ConversionError(f"GGUF float type must be one of {GGUF_FLOAT_TYPES}, not {ftype!r}")
    hp = model.hyper
    arch = gguf_arch(model)
    half = ftype == "f16"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_block_count(hp.n_layer)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head)
    writer.add_layer_norm_eps(hp.layer_norm_eps)
    if hp.rotary_dim is not None:
        writer.add_rope_dimension_count(hp.rotary_dim)
        writer.add_rope_freq_base(hp.rope_base)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)

    # Tokenizer: GPT-2 byte-level BPE; llama.cpp's "gpt-2" pre-tokenizer is the same
    # split regex as the HF ByteLevel pre-tokenizer. CodeGen's padded rows get
    # UNUSED entries so that n_vocab equals the embedding's row count.
    tokens, kinds = tokenizer.padded(hp.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(k) for k in kinds])
    writer.add_token_merges(list(tokenizer.merges))
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    ends = end_token_ids(hp.arch, tokenizer)
    if hp.arch == "codegen2" and len(ends) > 1:
        # <eom> closes an infilled span; as the file's EOM token llama.cpp counts it as
        # end-of-generation (it would not guess that from the token's text).
        writer.add_eom_token_id(ends[1])
    writer.add_add_bos_token(False)  # neither GPT-2 nor CodeGen prepends BOS

    for tname, array in _tensors(model, arch):
        if half and array.ndim == 2:
            array = array.astype(np.float16, copy=False)
        else:
            array = array.astype(np.float32, copy=False)
        writer.add_tensor(tname, np.ascontiguousarray(array))

    with steps(f"gguf {ftype}", 1) as progress:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress.disable is False)
        writer.close()
        progress.update()
