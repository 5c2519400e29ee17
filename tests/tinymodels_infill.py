"""Tiny CodeGen2 and T5 (CodeT5 / CodeT5+) checkpoints, built offline for the infill-model tests.

Kept apart from ``tests/tinymodels.py`` so that the shared GPT-2/CodeGen fixtures do
not rebuild when these change (their cache key covers that module only).

CodeGen2: transformers' own CodeGen packs ``qkv_proj`` in 4 model-parallel groups;
CodeGen2's (remote) code reads it as 8 groups and its config.json states
``head_dim``. There is no CodeGen2 class in transformers, so a CodeGen2-layout
checkpoint is made from a transformers CodeGen by re-packing ``qkv_proj`` rows as
CodeGen2's attention reads them (see :func:`_repack_qkv`), and the transformers model
itself stays the reference: both compute the same function. Shape: 8 heads of 128
(n_embd 1024, the smallest whole-head layout for 8 groups), rotary_dim 64 like
codegen2-1B, n_inner 1024 to keep it small, 2 layers.

The tokenizer is the shared tiny byte-level BPE plus CodeGen2's added tokens, in
the real tokenizer.json's form: ``<|endoftext|>`` special, ``<sep>``, ``<eom>`` and
``<mask_N>`` plain added tokens (``special: false``), ``<mask_1>`` the last id.

T5: RoBERTa-style byte-level BPE (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3,
``<mask>`` 4, inputs wrapped ``<s> ... </s>``) plus ``<extra_id_N>`` sentinels, as
CodeT5 and CodeT5+ ship; models in three shapes (see :data:`T5_SHAPES`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests import tinymodels

CODEGEN2_N_EMBD = 1024
CODEGEN2_N_HEAD = 8
CODEGEN2_HEAD_DIM = 128
CODEGEN2_MP = 8
CODEGEN2_MASKS = 8  # <mask_1> .. <mask_8>
T5_VOCAB = 600
T5_SENTINELS = 8  # <extra_id_0> .. <extra_id_7>
T5_CTX = 512
# Fewer steps than the shared tiny models: these are larger (CodeGen2) or two-sided
# (T5), and a shared CPU makes each step slow; enough for peaked logits.
CODEGEN2_TRAIN_STEPS = 24
T5_TRAIN_STEPS = 24
TRAINED_T5 = "codet5-base"  # the backend tests' model: needs a trained shape

# name -> T5Config overrides. codet5-base / codet5p-220m are T5-base shaped (relu,
# tied embeddings, 12 heads of 64); codet5p-770m is T5-large shaped (16 heads of 64,
# deeper). Scaled down, plus a T5 v1.1-style variant (gated-gelu, no output rescale,
# inner width != d_model) so the converter's other branches are checked too.
# (transformers >= 5 ties the head even for v1.1 and says "do not rescale" with
# scale_decoder_outputs; a separate lm_head.weight is not exercised here.)
T5_SHAPES: dict[str, dict[str, object]] = {
    "codet5-base": {"d_model": 256, "num_heads": 4, "d_kv": 64, "d_ff": 512, "num_layers": 2},
    "codet5p-770m": {"d_model": 256, "num_heads": 8, "d_kv": 32, "d_ff": 1024, "num_layers": 3},
    "t5-v1_1": {
        "d_model": 256,
        "num_heads": 4,
        "d_kv": 48,
        "d_ff": 384,
        "num_layers": 2,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    },
}


# -- CodeGen2 --------------------------------------------------------------------------


def build_codegen2_tokenizer(base: Path, out_dir: Path) -> Path:
    """The tiny BPE in ``base`` plus CodeGen2's added tokens; returns ``out_dir``."""
    from tokenizers import AddedToken, Tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    extra = ["<sep>", "<eom>"] + [f"<mask_{i}>" for i in range(CODEGEN2_MASKS, 0, -1)]
    tok.add_tokens([AddedToken(t, normalized=True, special=False) for t in extra])
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))
    added = {t: tok.token_to_id(t) for t in extra}
    (out_dir / "added_tokens.json").write_text(json.dumps(added))
    eot = tinymodels.EOT
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **special,
                "tokenizer_class": "GPT2Tokenizer",
                "add_prefix_space": False,
                "add_bos_token": False,
                "model_max_length": tinymodels.N_CTX,
            }
        )
    )
    return out_dir


def _repack_qkv(w: np.ndarray, n_head: int, head_dim: int, mp_from: int, mp_to: int) -> np.ndarray:
    """Re-pack a fused CodeGen ``qkv_proj`` weight from ``mp_from`` groups to ``mp_to``.

    CodeGen's attention reshapes the ``3E`` outputs to ``(mp, 3E/mp)``, splits each
    group's slice into query, value, key of ``local = E/mp`` each, and gives group g's
    j-th head of each part the rows ``j*head_dim ...``: head ``h = g * (n_head/mp) + j``.
    """
    e = n_head * head_dim
    out = np.empty_like(w)

    def rows(mp: int, part: int, h: int) -> slice:
        per, local = n_head // mp, e // mp
        g, j = divmod(h, per)
        start = g * 3 * local + part * local + j * head_dim
        return slice(start, start + head_dim)

    for part in range(3):  # 0 query, 1 value, 2 key: the same order in both layouts
        for h in range(n_head):
            out[rows(mp_to, part, h)] = w[rows(mp_from, part, h)]
    return out


def build_codegen2(tok_dir: Path, out_dir: Path, ref_dir: Path) -> tuple[Path, Path]:
    """Save a CodeGen2-layout checkpoint to ``out_dir`` and its transformers twin to ``ref_dir``.

    ``ref_dir`` is a plain transformers CodeGen (4-group qkv) computing the same
    function; it is the logit reference. Returns ``(out_dir, ref_dir)``.
    """
    import torch
    from safetensors.numpy import load_file, save_file
    from tokenizers import Tokenizer
    from transformers import CodeGenConfig, CodeGenForCausalLM

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    n_vocab = tok.get_vocab_size(with_added_tokens=True)  # no padding rows, like codegen2-1B
    eot_id = tok.token_to_id(tinymodels.EOT)
    torch.manual_seed(tinymodels.SEED + 2)
    config = CodeGenConfig(
        vocab_size=n_vocab,
        n_positions=tinymodels.N_CTX,
        n_ctx=tinymodels.N_CTX,
        n_embd=CODEGEN2_N_EMBD,
        n_layer=2,
        n_head=CODEGEN2_N_HEAD,
        n_inner=CODEGEN2_N_EMBD,
        rotary_dim=64,
        activation_function="gelu_new",
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = CodeGenForCausalLM(config).eval()
    tinymodels._scale(model, 2.0)
    with torch.no_grad():
        model.lm_head.bias.normal_(0.0, 0.5)
    tinymodels._train(model, tok_dir, CODEGEN2_TRAIN_STEPS, tinymodels.SEED + 2)
    for d in (ref_dir, out_dir):
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d)
        for p in tok_dir.iterdir():
            (d / p.name).write_bytes(p.read_bytes())

    weights = load_file(str(out_dir / "model.safetensors"))
    for name in [n for n in weights if n.endswith("attn.qkv_proj.weight")]:
        weights[name] = _repack_qkv(
            weights[name], CODEGEN2_N_HEAD, CODEGEN2_HEAD_DIM, 4, CODEGEN2_MP
        )
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["head_dim"] = CODEGEN2_HEAD_DIM  # what CodeGen2's own configuration writes
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir, ref_dir


# -- T5 --------------------------------------------------------------------------------


def build_t5_tokenizer(out_dir: Path) -> Path:
    """Train a RoBERTa-style byte-level BPE with T5 sentinels; save an HF tokenizer dir."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=T5_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tinymodels.corpus(), trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), trim_offsets=False
    )
    sentinels = [f"<extra_id_{i}>" for i in range(T5_SENTINELS - 1, -1, -1)]  # <extra_id_0> last
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sentinels])
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))  # vocab.json + merges.txt: the slow-tokenizer files
    added = {t: tok.token_to_id(t) for t in sentinels}
    (out_dir / "added_tokens.json").write_text(json.dumps(added))
    special = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
        "additional_special_tokens": sentinels[::-1],
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({**special, "tokenizer_class": "RobertaTokenizer", "model_max_length": T5_CTX})
    )
    return out_dir


def build_t5(tok_dir: Path, out_dir: Path, shape: str) -> Path:
    """Save a random T5ForConditionalGeneration of ``T5_SHAPES[shape]`` with the tokenizer."""
    import torch
    from tokenizers import Tokenizer
    from transformers import T5Config, T5ForConditionalGeneration

    n_vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(True)
    torch.manual_seed(tinymodels.SEED + 10 + list(T5_SHAPES).index(shape))
    overrides = dict(T5_SHAPES[shape])
    config = T5Config(
        vocab_size=n_vocab,
        num_decoder_layers=overrides["num_layers"],
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=0,
        n_positions=T5_CTX,
        **overrides,
    )
    model = T5ForConditionalGeneration(config).eval()
    if shape == TRAINED_T5:  # the others are checked teacher-forced; training is slow
        _train_t5(model, tok_dir, T5_TRAIN_STEPS, tinymodels.SEED + 10)
    with torch.no_grad():  # non-trivial norms catch a dropped or misplaced gamma
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for p in tok_dir.iterdir():
        (out_dir / p.name).write_bytes(p.read_bytes())
    return out_dir


def _train_t5(model: object, tok_dir: Path, steps: int, seed: int) -> None:
    """A few AdamW steps of CodeT5's two tasks, so the logits have a trained shape.

    Half the examples are span denoising (a span of the code replaced by
    ``<extra_id_0>``; target ``<extra_id_0> span <extra_id_1>``), half left-to-right
    completion (the first half of a window as input, the rest as target). An
    untrained T5 puts most mass on one token and decodes ``<pad>`` forever, which
    would make greedy parity trivially true.
    """
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    s0, s1 = tok.token_to_id("<extra_id_0>"), tok.token_to_id("<extra_id_1>")
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    data = [
        i for text in tinymodels.corpus() for i in tok.encode(text, add_special_tokens=False).ids
    ]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)  # type: ignore[attr-defined]
    model.train()  # type: ignore[attr-defined]
    window, batch = 40, 8
    for _ in range(steps):
        sources, targets = [], []
        for b in range(batch):
            start = int(rng.integers(0, len(data) - window))
            chunk = data[start : start + window]
            if b % 2:
                a = int(rng.integers(4, window - 12))
                n = int(rng.integers(2, 10))
                src, tgt = chunk[:a] + [s0] + chunk[a + n :], [s0] + chunk[a : a + n] + [s1]
            else:
                src, tgt = chunk[: window // 2], chunk[window // 2 :]
            sources.append([bos, *src, eos])
            targets.append([*tgt, eos])
        width_s = max(map(len, sources))
        width_t = max(map(len, targets))
        ids = torch.tensor([x + [0] * (width_s - len(x)) for x in sources])
        mask = torch.tensor([[1] * len(x) + [0] * (width_s - len(x)) for x in sources])
        labels = torch.tensor([y + [-100] * (width_t - len(y)) for y in targets])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # type: ignore[operator]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()  # type: ignore[attr-defined]


def t5_reference(model_dir: Path, source: list[int], target: list[int]) -> np.ndarray:
    """transformers' decoder logits ``(len(target), vocab)`` for teacher-forced ``target``.

    ``target`` starts with the decoder start token; row i predicts ``target[i + 1]``.
    """
    import torch
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([target])
        ).logits[0]
    return out.numpy()


def t5_greedy(model_dir: Path, source: list[int], max_new: int) -> list[int]:
    """transformers' greedy decode of ``source`` (no start token, eos included if reached)."""
    import torch
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([source]), max_new_tokens=max_new, do_sample=False, num_beams=1
        )[0]
    return [int(t) for t in out[1:]]
