"""T5 encoder-decoder models (CodeT5, CodeT5+ 220m/770m) -> a canonical :class:`Seq2SeqModel`.

These models run on CTranslate2's ``Translator`` (not ``Generator``; the spec is
built in :mod:`conversion.ct2_writer`); llama.cpp cannot serve them here, so the GGUF
writer refuses them. Importing this module registers :class:`T5Loader`;
:func:`conversion.convert.convert` does so before it picks a loader.

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

import numpy as np

from fastpilot.errors import ConversionError

from .architectures import ArchitectureLoader, register
from .progress import bar
from .seq2seq import Attention, Block, FeedForward, FfnActivation, Seq2SeqHyper, Seq2SeqModel
from .tokenizer import TokenizerData

__all__ = ["T5Loader", "encoder_specials"]


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
