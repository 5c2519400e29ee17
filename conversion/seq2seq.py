"""The canonical encoder-decoder model that the T5 loader produces and the CT2 writer reads.

Kept apart from :mod:`conversion.t5` (the loader) so that writers and the generic
conversion code can name these types without importing a loader.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = ["Attention", "Block", "FeedForward", "FfnActivation", "Seq2SeqHyper", "Seq2SeqModel"]


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
