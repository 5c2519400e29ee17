"""Tiny random-weight GGUFs of FIM-capable code models, written as llama.cpp's converter would.

Two layouts, written with the ``gguf`` package (tensor names from its tensor
map, so a renamed tensor fails to load instead of passing silently):

- **Qwen2** (Qwen2.5-Coder): RMSNorm, SwiGLU, q/k/v with biases, grouped KV
  heads, tied output; ``tokenizer.ggml.pre = "qwen2"``; FIM tokens
  ``<|fim_prefix|>`` ... ``<|repo_name|>`` ``<|file_sep|>`` appended after the
  BPE vocabulary and *not* named in ``tokenizer.ggml.fim_*_token_id`` -- llama.cpp
  finds them by their spelling, as in the files its converter writes for Qwen.
- **StarCoder2**: LayerNorm with biases, GELU MLP with biases, grouped KV heads;
  ``tokenizer.ggml.pre = "starcoder"``; the special tokens come first (ids 0-7,
  as in bigcode's vocabulary) and the FIM ids are written in the
  ``tokenizer.ggml.fim_{pre,suf,mid,pad}_token_id`` keys.

The byte-level BPE is trained offline with ``tokenizers`` on the stdlib corpus of
:mod:`tests.tinymodels`; special tokens are ``CONTROL`` tokens. Each model is a
``model.gguf`` alone in its directory, no ``fastpilot.json``: it is served as a
user serves a downloaded GGUF, with ``--trust-unverified-models``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.tinymodels import corpus

BPE_SIZE = 480  # trained tokens (bytes + merges), before the special tokens
N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER, N_CTX = 64, 4, 2, 128, 2, 256

QWEN_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
STARCODER_SPECIAL = (
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<repo_name>",
    "<file_sep>",
    "<issue_start>",
)


@dataclass(frozen=True)
class FimModel:
    """One written GGUF and the spellings of its FIM tokens."""

    arch: str
    path: Path  # the .gguf file
    pre: str
    suf: str
    mid: str
    eot: str = "<|endoftext|>"


def _tokenizer(special: tuple[str, ...], first: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_SIZE + (len(special) if first else 0),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special) if first else [],
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if not first:
        tok.add_special_tokens(list(special))
    return tok


def _vocab(tok, special: tuple[str, ...]) -> tuple[list[str], list[int], list[str]]:
    import json

    import gguf

    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for text, idx in vocab.items():
        tokens[idx] = text
    kinds = [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, kinds, merges


def _name(kind, bid: int | None = None, suffix: str = "weight") -> str:
    import gguf

    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=bid) if bid is not None else base) + "." + suffix


def _write(
    out: Path, arch: str, special: tuple[str, ...], first: bool, pre_name: str, seed: int
) -> Path:
    import gguf

    tok = _tokenizer(special, first)
    tokens, kinds, merges = _vocab(tok, special)
    ids = {t: i for i, t in enumerate(tokens)}
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.25) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}-fim")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    eot = ids["<|endoftext|>"]
    writer.add_bos_token_id(eot)
    writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)

    t = gguf.MODEL_TENSOR
    kv = N_EMBD // N_HEAD * N_HEAD_KV

    def add_qkv(i: int) -> None:  # both architectures: Q, K, V of layer i, each with a bias
        for kind, rows in ((t.ATTN_Q, N_EMBD), (t.ATTN_K, kv), (t.ATTN_V, kv)):
            writer.add_tensor(_name(kind, i), w(rows, N_EMBD))
            writer.add_tensor(_name(kind, i, "bias"), w(rows))

    writer.add_tensor(_name(t.TOKEN_EMBD), w(n_vocab, N_EMBD, scale=1.0))
    if arch == "qwen2":
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_tensor(_name(t.OUTPUT_NORM), 1 + w(N_EMBD, scale=0.1))
        for i in range(N_LAYER):
            writer.add_tensor(_name(t.ATTN_NORM, i), 1 + w(N_EMBD, scale=0.1))
            add_qkv(i)
            writer.add_tensor(_name(t.ATTN_OUT, i), w(N_EMBD, N_EMBD))
            writer.add_tensor(_name(t.FFN_NORM, i), 1 + w(N_EMBD, scale=0.1))
            writer.add_tensor(_name(t.FFN_GATE, i), w(N_FF, N_EMBD))
            writer.add_tensor(_name(t.FFN_UP, i), w(N_FF, N_EMBD))
            writer.add_tensor(_name(t.FFN_DOWN, i), w(N_EMBD, N_FF))
    else:
        writer.add_layer_norm_eps(1e-5)
        for key, name in (("pre", "<fim_prefix>"), ("suf", "<fim_suffix>")):
            writer.add_uint32(f"tokenizer.ggml.fim_{key}_token_id", ids[name])
        writer.add_uint32("tokenizer.ggml.fim_mid_token_id", ids["<fim_middle>"])
        writer.add_uint32("tokenizer.ggml.fim_pad_token_id", ids["<fim_pad>"])
        writer.add_tensor(_name(t.OUTPUT_NORM), 1 + w(N_EMBD, scale=0.1))
        writer.add_tensor(_name(t.OUTPUT_NORM, None, "bias"), w(N_EMBD, scale=0.1))
        for i in range(N_LAYER):
            for norm in (t.ATTN_NORM, t.FFN_NORM):
                writer.add_tensor(_name(norm, i), 1 + w(N_EMBD, scale=0.1))
                writer.add_tensor(_name(norm, i, "bias"), w(N_EMBD, scale=0.1))
            add_qkv(i)
            writer.add_tensor(_name(t.ATTN_OUT, i), w(N_EMBD, N_EMBD))
            writer.add_tensor(_name(t.ATTN_OUT, i, "bias"), w(N_EMBD))
            writer.add_tensor(_name(t.FFN_UP, i), w(N_FF, N_EMBD))
            writer.add_tensor(_name(t.FFN_UP, i, "bias"), w(N_FF))
            writer.add_tensor(_name(t.FFN_DOWN, i), w(N_EMBD, N_FF))
            writer.add_tensor(_name(t.FFN_DOWN, i, "bias"), w(N_EMBD))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_fim_models(root: Path) -> dict[str, FimModel]:
    """Write both GGUFs under ``root`` (a few seconds); returns them by architecture."""
    qwen = _write(root / "qwen2", "qwen2", QWEN_SPECIAL, False, "qwen2", seed=7)
    star = _write(root / "starcoder2", "starcoder2", STARCODER_SPECIAL, True, "starcoder", seed=8)
    return {
        "qwen2": FimModel("qwen2", qwen, "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
        "starcoder2": FimModel("starcoder2", star, "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    }


_QUIET_LOG: list = []  # the callback llama.cpp holds; must outlive every later model load


def _quiet_native_log(lib) -> None:
    """Silence llama.cpp's load chatter with a callback that lives as long as the process.

    llama.cpp keeps the function pointer globally: a callback freed with the object
    that set it crashed the next model load in another test (SIGSEGV in
    ``llama_model_load_from_file``).
    """
    if not _QUIET_LOG:
        _QUIET_LOG.append(lib.llama_log_callback(lambda level, text, user: None))
        lib.llama_log_set(_QUIET_LOG[0], None)


class Reference:
    """llama.cpp's own greedy continuation, through its low-level API (no fastpilot code).

    Loads the GGUF in a fresh ``llama_model`` + context, tokenizes with
    ``llama_tokenize`` (special tokens parsed) and runs a ``llama_decode`` +
    argmax loop until an end-of-generation token or ``n`` tokens.
    """

    def __init__(self, path: Path) -> None:
        import llama_cpp

        self.lib = lib = llama_cpp
        _quiet_native_log(lib)
        lib.llama_backend_init()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        assert self.model, f"llama.cpp could not load {path}"
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))

    def tokenize(self, text: str) -> list[int]:
        import ctypes

        data = text.encode()
        buf = (ctypes.c_int32 * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, True)
        assert n >= 0
        return list(buf[:n])

    def special(self, name: str) -> int:
        (tok,) = self.tokenize(name)
        return tok

    def fim_ids(self) -> tuple[int, int, int]:
        v = self.vocab
        return (
            int(self.lib.llama_vocab_fim_pre(v)),
            int(self.lib.llama_vocab_fim_suf(v)),
            int(self.lib.llama_vocab_fim_mid(v)),
        )

    def piece(self, tok: int) -> bytes:
        import ctypes

        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, True)
        return buf.raw[:n]

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], bool]:
        """Up to ``n`` argmax tokens after ``ids``; True when end-of-generation ended them."""
        lib = self.lib
        cp = lib.llama_context_default_params()
        cp.n_ctx = N_CTX
        cp.n_batch = cp.n_ubatch = N_CTX
        cp.n_threads = cp.n_threads_batch = 1
        ctx = lib.llama_init_from_model(self.model, cp)
        try:
            out: list[int] = []
            buf = (lib.llama_token * len(ids))(*ids)  # referenced until decoded
            batch = lib.llama_batch_get_one(buf, len(ids))
            for _ in range(n):
                assert lib.llama_decode(ctx, batch) == 0
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), (self.n_vocab,))
                tok = int(np.argmax(logits))
                out.append(tok)
                if lib.llama_vocab_is_eog(self.vocab, tok):
                    return out, True
                buf = (lib.llama_token * 1)(tok)
                batch = lib.llama_batch_get_one(buf, 1)
            return out, False
        finally:
            lib.llama_free(ctx)

    def text(self, ids: list[int]) -> str:
        return b"".join(self.piece(t) for t in ids).decode("utf-8", "replace")

    def close(self) -> None:
        self.lib.llama_model_free(self.model)
