"""Write a canonical model as a CTranslate2 model directory.

A :class:`DecoderModel` becomes a ``Generator`` model
(``TransformerDecoderModelSpec``), a T5 :class:`Seq2SeqModel` a ``Translator`` one
(``TransformerSpec``). The model is described with ctranslate2's spec API from numpy
arrays (no torch): ``from_config`` -> fill weights -> ``validate`` ->
``optimize(quantization)`` -> ``save``. ``optimize`` quantizes in memory, so writing
needs roughly the model's float32 size in RAM on top of the loaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fastpilot.errors import ConversionError

from .model import Activation, DecoderModel, Linear, Norm
from .progress import steps
from .seq2seq import Attention, FeedForward, FfnActivation, Seq2SeqModel
from .tokenizer import TokenizerData

__all__ = ["CT2_QUANTIZATIONS", "Copier", "write_ct2"]

CT2_QUANTIZATIONS = ("float32", "float16", "int8", "int8_float16")


class Copier:
    """Hand ctranslate2 private copies: ``spec.optimize`` quantizes arrays in place.

    Without copies, writing ct2-int8 first would corrupt the shared canonical model
    for every later target in the same run. Arrays shared by identity (a tied LM
    head) stay shared so ctranslate2 still stores them once.
    """

    def __init__(self) -> None:
        self._copies: dict[int, np.ndarray] = {}

    def __call__(self, array: np.ndarray) -> np.ndarray:
        key = id(array)
        if key not in self._copies:
            self._copies[key] = np.array(array, copy=True, order="C")
        return self._copies[key]


def _set_linear(spec: Any, linear: Linear, copy: Copier) -> None:
    spec.weight = copy(linear.weight)  # (out, in), as CT2 expects
    if linear.bias is not None:
        spec.bias = copy(linear.bias)


def _set_norm(spec: Any, norm: Norm, copy: Copier) -> None:
    spec.gamma = copy(norm.gamma)
    spec.beta = copy(norm.beta)


def build_spec(model: DecoderModel, tokenizer: TokenizerData) -> Any:
    """Build and validate (but not quantize) the ctranslate2 spec for ``model``."""
    from ctranslate2.specs import common_spec, transformer_spec

    hp = model.hyper
    activation = {Activation.GELU_TANH: common_spec.Activation.GELUTanh}[hp.activation]
    parallel = model.layers[0].ffn_norm is None
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        hp.n_layer,
        hp.n_head,
        pre_norm=True,
        activation=activation,
        rotary_dim=hp.rotary_dim,
        # the canonical layout already has q/k rotary rows in halves order
        rotary_interleave=False,
        rotary_base=hp.rope_base,
        parallel_residual=parallel,
        shared_layer_norm=parallel,
    )
    copy = Copier()
    dec = spec.decoder
    dec.scale_embeddings = False
    dec.embeddings.weight = copy(model.token_embd)  # (vocab, n_embd)
    if model.pos_embd is not None:
        dec.position_encodings.encodings = copy(model.pos_embd)  # (n_ctx, n_embd)
    _set_norm(dec.layer_norm, model.final_norm, copy)
    _set_linear(dec.projection, model.lm_head, copy)
    for layer_spec, layer in zip(dec.layer, model.layers, strict=True):
        if parallel:
            _set_norm(layer_spec.shared_layer_norm, layer.attn_norm, copy)
        else:
            _set_norm(layer_spec.self_attention.layer_norm, layer.attn_norm, copy)
            _set_norm(layer_spec.ffn.layer_norm, layer.ffn_norm, copy)  # type: ignore[arg-type]
        _set_linear(layer_spec.self_attention.linear[0], layer.qkv, copy)  # (3E, E) [q|k|v]
        _set_linear(layer_spec.self_attention.linear[1], layer.attn_out, copy)
        _set_linear(layer_spec.ffn.linear_0, layer.ffn_up, copy)
        _set_linear(layer_spec.ffn.linear_1, layer.ffn_down, copy)

    spec.config.layer_norm_epsilon = hp.layer_norm_eps
    spec.config.bos_token = tokenizer.bos_token
    spec.config.eos_token = tokenizer.eos_token
    # GPT-2 style BPE never emits an unknown token; CT2 still wants one in the vocab.
    spec.config.unk_token = tokenizer.eos_token
    tokens, _ = tokenizer.padded(hp.vocab_size)
    spec.register_vocabulary(tokens)
    try:
        spec.validate()
    except (ValueError, TypeError) as ex:
        raise ConversionError(f"ctranslate2 rejected the model: {ex}") from ex
    return spec


def _unk_token(tokens: list[str], fallback: str) -> str:
    return "<unk>" if "<unk>" in tokens else fallback


def build_seq2seq_spec(model: Seq2SeqModel, tokenizer: TokenizerData) -> Any:
    """Build and validate (not quantize) a ctranslate2 ``TransformerSpec`` for a T5.

    T5 facts (see :mod:`conversion.t5`): RMS norms, unscaled attention, relative
    position biases held by the first layer of each stack and shared, an optional
    gated FFN and an optional ``d_model ** -0.5`` rescale of the decoder output.
    """
    from ctranslate2.specs import common_spec, transformer_spec

    hp = model.hyper
    activation = {
        FfnActivation.RELU: common_spec.Activation.RELU,
        FfnActivation.GELU_TANH: common_spec.Activation.GELUTanh,
        FfnActivation.GELU: common_spec.Activation.GELU,
    }[hp.activation]
    spec = transformer_spec.TransformerSpec.from_config(
        (hp.n_layer, hp.n_decoder_layer),
        hp.n_head,
        pre_norm=True,
        activation=activation,
        ffn_glu=hp.gated,
        relative_attention_bias=True,
        rms_norm=True,
    )
    copy = Copier()
    max_distance = np.dtype("int32").type(hp.relative_max_distance)

    def attention(spec_attn: Any, attn: Attention, bias: np.ndarray | None, fused: bool) -> None:
        spec_attn.queries_scale = 1.0  # T5 attention is unscaled
        if fused:  # self-attention: one (3 * inner, d_model) projection [q | k | v]
            spec_attn.linear[0].weight = np.concatenate([attn.q, attn.k, attn.v], axis=0)
        else:  # cross-attention: q from the decoder, fused [k | v] from the encoder output
            spec_attn.linear[0].weight = copy(attn.q)
            spec_attn.linear[1].weight = np.concatenate([attn.k, attn.v], axis=0)
        spec_attn.linear[-1].weight = copy(attn.o)
        if bias is not None:
            # Every layer points at the first layer's table: ctranslate2 stores it once.
            spec_attn.relative_attention_bias = copy(bias)
            spec_attn.relative_attention_max_distance = max_distance

    def feed_forward(spec_ffn: Any, norm: np.ndarray, ffn: FeedForward) -> None:
        spec_ffn.layer_norm.gamma = copy(norm)
        spec_ffn.linear_0.weight = copy(ffn.wi)
        if ffn.wi_gate is not None:
            spec_ffn.linear_0_noact.weight = copy(ffn.wi_gate)
        spec_ffn.linear_1.weight = copy(ffn.wo)

    enc = spec.encoder
    enc.embeddings[0].weight = copy(model.embedding)
    enc.scale_embeddings = False
    enc.layer_norm.gamma = copy(model.encoder_norm)
    for layer_spec, block in zip(enc.layer, model.encoder, strict=True):
        layer_spec.self_attention.layer_norm.gamma = copy(block.self_norm)
        attention(layer_spec.self_attention, block.self_attn, model.encoder_rel_bias, True)
        feed_forward(layer_spec.ffn, block.ffn_norm, block.ffn)

    dec = spec.decoder
    dec.embeddings.weight = copy(model.embedding)
    dec.scale_embeddings = False
    dec.layer_norm.gamma = copy(model.decoder_norm)
    dec.projection.weight = copy(model.lm_head)
    if hp.scale_output:
        dec.scale_outputs = hp.d_model**-0.5
    for layer_spec, block in zip(dec.layer, model.decoder, strict=True):
        assert block.cross is not None and block.cross_norm is not None
        layer_spec.self_attention.layer_norm.gamma = copy(block.self_norm)
        attention(layer_spec.self_attention, block.self_attn, model.decoder_rel_bias, True)
        layer_spec.attention.layer_norm.gamma = copy(block.cross_norm)
        attention(layer_spec.attention, block.cross, None, False)
        feed_forward(layer_spec.ffn, block.ffn_norm, block.ffn)

    tokens, _ = tokenizer.padded(hp.vocab_size)
    spec.config.layer_norm_epsilon = hp.layer_norm_eps
    spec.config.bos_token = tokens[hp.decoder_start_token_id]
    spec.config.decoder_start_token = tokens[hp.decoder_start_token_id]
    spec.config.eos_token = tokenizer.eos_token
    spec.config.unk_token = _unk_token(tokens, tokenizer.eos_token)
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    try:
        spec.validate()
    except (ValueError, TypeError) as ex:
        raise ConversionError(f"ctranslate2 rejected the model: {ex}") from ex
    return spec


def write_ct2(
    model: DecoderModel | Seq2SeqModel, tokenizer: TokenizerData, out_dir: Path, quantization: str
) -> list[str]:
    """Write a CTranslate2 model (model.bin, config.json, vocabulary) to ``out_dir``.

    A decoder-only model becomes a ``Generator`` directory (``vocabulary.json``); a T5
    becomes a ``Translator`` directory (``shared_vocabulary.json``).

    Args:
        quantization: one of :data:`CT2_QUANTIZATIONS`; weights are stored that way
            and ctranslate2 may convert again at load time (``compute_type``).

    Returns:
        The weight file names written (for the manifest's sha256 list).
    """
    if quantization not in CT2_QUANTIZATIONS:
        raise ConversionError(
            f"unknown CTranslate2 quantization {quantization!r}; "
            f"choose from {', '.join(CT2_QUANTIZATIONS)}"
        )
    with steps(f"ctranslate2 {quantization}", 3) as progress:
        if isinstance(model, Seq2SeqModel):
            spec = build_seq2seq_spec(model, tokenizer)
        else:
            spec = build_spec(model, tokenizer)
        progress.update()
        spec.optimize(quantization=quantization)
        progress.update()
        spec.save(str(out_dir))
        progress.update()
    return ["model.bin"]
