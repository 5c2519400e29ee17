"""T5 encoder-decoder models (CodeT5, CodeT5+ 220m/770m) -> a canonical :class:`Seq2SeqModel`.

These models run on CTranslate2's ``Translator`` (not ``Generator``); llama.cpp
cannot serve them here, so the GGUF writer refuses them.

T5 facts the writer relies on (checked for logit parity against transformers):

* RMS norm without bias or mean subtraction, ``layer_norm_epsilon`` (1e-6), before
  every sub-layer, plus a final norm per stack;
* attention without the ``1/sqrt(d_kv)`` scale (folded into the init), no biases,
  inner width ``num_heads * d_kv`` that may differ from ``d_model``;
* bucketed relative position biases, stored only in the first layer of each stack
  and shared by the others; decoder buckets are causal (one-directional);
* feed-forward ``wo(act(wi x))``, or gated ``wo(act(wi_0 x) * wi_1 x)``
  (``feed_forward_proj = "gated-gelu"``, T5 v1.1);
* CodeT5 and CodeT5+ (T5 v1.0) rescale the decoder output by ``d_model ** -0.5``
  before projecting with the shared embedding; T5 v1.1 does not rescale (config:
  ``tie_word_embeddings: false``, or transformers 5's ``scale_decoder_outputs``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastpilot.errors import ConversionError

from .architectures import ArchitectureLoader, register
from .progress import bar
from .tokenizer import TokenizerData

__all__ = ["FfnActivation", "Seq2SeqModel", "T5Loader", "build_t5_spec", "encoder_specials"]


class FfnActivation(enum.Enum):
    RELU = "relu"
    GELU_TANH = "gelu_new"
    GELU = "gelu"


@dataclass(frozen=True, slots=True)
class Attention:
    q: np.ndarray  # (n_head * d_kv, d_model)
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray  # (d_model, n_head * d_kv)


@dataclass(frozen=True, slots=True)
class FeedForward:
    wi: np.ndarray  # (d_ff, d_model); the activated branch when gated
    wi_gate: np.ndarray | None  # (d_ff, d_model): the linear branch of a gated FFN
    wo: np.ndarray  # (d_model, d_ff)


@dataclass(frozen=True, slots=True)
class Block:
    """One encoder (``cross is None``) or decoder block; norms are RMS gammas."""

    self_norm: np.ndarray
    self_attn: Attention
    cross_norm: np.ndarray | None
    cross: Attention | None
    ffn_norm: np.ndarray
    ffn: FeedForward


@dataclass(frozen=True, slots=True)
class Seq2SeqHyper:
    arch: str  # "t5"
    n_layer: int  # encoder blocks
    n_decoder_layer: int
    n_head: int
    d_model: int
    d_kv: int
    d_ff: int
    n_ctx: int  # the encoder length the model was trained on (512 for CodeT5)
    vocab_size: int
    layer_norm_eps: float
    activation: FfnActivation
    gated: bool
    scale_output: bool  # decoder output scaled by d_model**-0.5 before the LM head
    relative_max_distance: int
    decoder_start_token_id: int


@dataclass(frozen=True)
class Seq2SeqModel:
    """A complete T5 in canonical (out, in) layout."""

    hyper: Seq2SeqHyper
    embedding: np.ndarray  # (vocab, d_model), shared by encoder and decoder
    encoder: tuple[Block, ...]
    encoder_norm: np.ndarray
    encoder_rel_bias: np.ndarray  # (num_buckets, n_head)
    decoder: tuple[Block, ...]
    decoder_norm: np.ndarray
    decoder_rel_bias: np.ndarray
    lm_head: np.ndarray  # (vocab, d_model); ``is embedding`` when tied


@register
class T5Loader(ArchitectureLoader):
    """T5ForConditionalGeneration checkpoints: CodeT5-base and CodeT5+ 220m / 770m."""

    model_type = "t5"
    architectures = ("T5ForConditionalGeneration",)

    def _activation(self) -> tuple[FfnActivation, bool]:
        proj = str(self.cfg("feed_forward_proj", default="relu"))
        parts = proj.split("-")
        gated = parts[0] == "gated"
        if len(parts) > 2 or (len(parts) == 2 and not gated):
            raise ConversionError(f"config.json: feed_forward_proj {proj!r} is not understood")
        name = "gelu_new" if proj == "gated-gelu" else parts[-1]
        try:
            return FfnActivation(name), gated
        except ValueError:
            raise ConversionError(
                f"T5 activation {name!r} is not supported "
                f"(supported: {', '.join(a.value for a in FfnActivation)})"
            ) from None

    def load(self) -> Seq2SeqModel:
        d_model = int(self.cfg("d_model"))
        n_head = int(self.cfg("num_heads"))
        d_kv = int(self.cfg("d_kv"))
        d_ff = int(self.cfg("d_ff"))
        n_enc = int(self.cfg("num_layers"))
        n_dec = int(self.cfg("num_decoder_layers", "num_layers"))
        vocab = int(self.cfg("vocab_size"))
        buckets = int(self.cfg("relative_attention_num_buckets", default=32))
        activation, gated = self._activation()
        names = self.checkpoint.weights.names
        # T5 v1.0 (CodeT5, CodeT5+) ties the head to the embedding and rescales the
        # decoder output; v1.1 does neither. Older configs say so with
        # tie_word_embeddings; transformers >= 5 writes scale_decoder_outputs and always
        # ties (then the checkpoint holds no separate lm_head.weight).
        tie_flag = self.config.get("tie_word_embeddings", True)
        scale = self.config.get("scale_decoder_outputs")
        scale_output = bool(tie_flag is not False if scale is None else scale)
        hp = Seq2SeqHyper(
            arch="t5",
            n_layer=n_enc,
            n_decoder_layer=n_dec,
            n_head=n_head,
            d_model=d_model,
            d_kv=d_kv,
            d_ff=d_ff,
            n_ctx=int(self.cfg("n_positions", default=512)),
            vocab_size=vocab,
            layer_norm_eps=float(self.cfg("layer_norm_epsilon", default=1e-6)),
            activation=activation,
            gated=gated,
            scale_output=scale_output,
            relative_max_distance=int(self.cfg("relative_attention_max_distance", default=128)),
            decoder_start_token_id=int(self.cfg("decoder_start_token_id", default=0)),
        )
        inner = n_head * d_kv

        def attention(prefix: str) -> Attention:
            return Attention(
                q=self.tensor(f"{prefix}.q.weight", (inner, d_model)),
                k=self.tensor(f"{prefix}.k.weight", (inner, d_model)),
                v=self.tensor(f"{prefix}.v.weight", (inner, d_model)),
                o=self.tensor(f"{prefix}.o.weight", (d_model, inner)),
            )

        def ffn(prefix: str) -> FeedForward:
            if gated:
                return FeedForward(
                    wi=self.tensor(f"{prefix}.wi_0.weight", (d_ff, d_model)),
                    wi_gate=self.tensor(f"{prefix}.wi_1.weight", (d_ff, d_model)),
                    wo=self.tensor(f"{prefix}.wo.weight", (d_model, d_ff)),
                )
            return FeedForward(
                wi=self.tensor(f"{prefix}.wi.weight", (d_ff, d_model)),
                wi_gate=None,
                wo=self.tensor(f"{prefix}.wo.weight", (d_model, d_ff)),
            )

        def norm(name: str) -> np.ndarray:
            return self.tensor(name, (d_model,))

        def stack(side: str, n: int) -> tuple[Block, ...]:
            blocks = []
            for i in bar(range(n), desc=f"load t5 {side}", unit="layer"):
                b = f"{side}.block.{i}.layer"
                decoder = side == "decoder"
                f = 2 if decoder else 1  # the FFN sub-layer index
                blocks.append(
                    Block(
                        self_norm=norm(f"{b}.0.layer_norm.weight"),
                        self_attn=attention(f"{b}.0.SelfAttention"),
                        cross_norm=norm(f"{b}.1.layer_norm.weight") if decoder else None,
                        cross=attention(f"{b}.1.EncDecAttention") if decoder else None,
                        ffn_norm=norm(f"{b}.{f}.layer_norm.weight"),
                        ffn=ffn(f"{b}.{f}.DenseReluDense"),
                    )
                )
            return tuple(blocks)

        def rel_bias(side: str) -> np.ndarray:
            name = f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            return self.tensor(name, (buckets, n_head))

        # save_pretrained keeps one copy of the tied embedding, under any of these names.
        emb_name = next(
            (
                n
                for n in (
                    "shared.weight",
                    "encoder.embed_tokens.weight",
                    "decoder.embed_tokens.weight",
                )
                if n in names
            ),
            "shared.weight",
        )
        embedding = self.tensor(emb_name, (vocab, d_model))
        if tie_flag is not False or "lm_head.weight" not in names:
            lm_head = embedding
        else:
            lm_head = self.tensor("lm_head.weight", (vocab, d_model))
        return Seq2SeqModel(
            hyper=hp,
            embedding=embedding,
            encoder=stack("encoder", n_enc),
            encoder_norm=norm("encoder.final_layer_norm.weight"),
            encoder_rel_bias=rel_bias("encoder"),
            decoder=stack("decoder", n_dec),
            decoder_norm=norm("decoder.final_layer_norm.weight"),
            decoder_rel_bias=rel_bias("decoder"),
            lm_head=lm_head,
        )


def encoder_specials(tokenizer: TokenizerData) -> tuple[list[int], list[int]]:
    """Ids the tokenizer's post-processor puts before and after encoder text.

    CodeT5's RoBERTa tokenizer wraps every input as ``<s> ... </s>`` and the model
    was trained on inputs of that shape; a T5 sentencepiece tokenizer appends ``</s>``
    only. Found by encoding a probe with and without special tokens.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.json_text)
    probe = "x = 1"
    plain = tok.encode(probe, add_special_tokens=False).ids
    full = tok.encode(probe, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ConversionError("the tokenizer's post-processor changes the text it wraps")


def _unk_token(tokens: list[str], fallback: str) -> str:
    return "<unk>" if "<unk>" in tokens else fallback


def build_t5_spec(model: Seq2SeqModel, tokenizer: TokenizerData) -> Any:
    """Build and validate (not quantize) a ctranslate2 ``TransformerSpec`` for ``model``."""
    from ctranslate2.specs import common_spec, transformer_spec

    from .ct2_writer import Copier

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
