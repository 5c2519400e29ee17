"""The canonical decoder that every architecture loader produces and every writer reads.

One layout serves both targets, so the architecture-specific work (GPT-2's Conv1D
transposes, CodeGen's [q|v|k] split and rotary permutation) is done once:

* linear weights are ``(out_features, in_features)`` like ``torch.nn.Linear`` (and like
  GGUF's numpy view, whose ggml ``ne`` order is reversed);
* the fused attention input projection is ``concat(q, k, v)`` along rows, shape
  ``(3 * n_embd, n_embd)``;
* for rotary models, within each head the first ``rotary_dim`` rows of q and k are
  already in "halves" (GPT-NeoX) order, which CTranslate2 (``rotary_interleave=False``)
  and llama.cpp (NEOX rope) both expect.

Arrays keep the checkpoint's precision (float32 or float16); writers cast.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = ["Activation", "DecoderModel", "Hyper", "Layer", "Linear", "Norm"]


class Activation(enum.Enum):
    """Feed-forward activations the writers can express."""

    GELU_TANH = "gelu_tanh"  # HF "gelu_new" / "gelu_pytorch_tanh"; GPT-2 and CodeGen


@dataclass(frozen=True, slots=True)
class Linear:
    weight: np.ndarray  # (out_features, in_features)
    bias: np.ndarray | None  # (out_features,) or None


@dataclass(frozen=True, slots=True)
class Norm:
    gamma: np.ndarray  # (n_embd,)
    beta: np.ndarray  # (n_embd,)


@dataclass(frozen=True, slots=True)
class Layer:
    """One block. ``ffn_norm is None`` means parallel residual with one shared norm:
    ``x + attn(norm(x)) + ffn(norm(x))`` (CodeGen); otherwise sequential (GPT-2)."""

    attn_norm: Norm
    qkv: Linear  # (3 * n_embd, n_embd), rows [q | k | v]
    attn_out: Linear  # (n_embd, n_embd)
    ffn_norm: Norm | None
    ffn_up: Linear  # (n_ff, n_embd)
    ffn_down: Linear  # (n_embd, n_ff)


@dataclass(frozen=True, slots=True)
class Hyper:
    """Shape and numerics of a decoder.

    ``rotary_dim is None`` means learned absolute positions (GPT-2); otherwise rotary
    embeddings on the first ``rotary_dim`` dims of each head (CodeGen).
    """

    arch: str  # the loader's name, e.g. "gpt2", "codegen"
    n_layer: int
    n_head: int
    n_embd: int
    n_ff: int
    n_ctx: int
    vocab_size: int  # rows of the embedding (may exceed the tokenizer's size)
    layer_norm_eps: float
    activation: Activation
    rotary_dim: int | None = None
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class DecoderModel:
    """A complete decoder-only LM in canonical layout.

    ``lm_head.weight is token_embd`` when the checkpoint ties them (GPT-2); writers may
    then store the matrix once.
    """

    hyper: Hyper
    token_embd: np.ndarray  # (vocab_size, n_embd)
    pos_embd: np.ndarray | None  # (n_ctx, n_embd) for learned positions, else None
    layers: tuple[Layer, ...]
    final_norm: Norm
    lm_head: Linear  # (vocab_size, n_embd)

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.token_embd and self.lm_head.bias is None
