"""Build tiny GPT-2 / CodeGen checkpoints offline, for conversion and backend tests.

Nothing is downloaded: a byte-level BPE tokenizer is trained with the `tokenizers`
library on a slice of Python's own stdlib source, and random models are built with
transformers (a dev/test dependency; only this module and the parity tests import
it, and only inside functions). Weights are scaled up from the usual init (sharp
attention, so a wrong rotary or head split shows in the logits) and then trained for
a few dozen steps on the tokenizer corpus, so logits have a trained model's peaked
shape and quantized top-1 agreement measures the format rather than noise.

Shapes: n_embd 256 so that Q4_K's 256-wide blocks really apply (not a fallback type),
2 layers, n_ctx 128. CodeGen: 8 heads of 32 dims (two heads per mp_num group, so a
wrong [q|v|k] split shows), rotary_dim 16 < head_dim, vocab padded above the
tokenizer's size like the real 51200-row CodeGen.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

EOT = "<|endoftext|>"
VOCAB_SIZE = 800
N_CTX = 128
N_EMBD = 256
CODEGEN_PADDED_VOCAB = 896  # > tokenizer size (800), like CodeGen's 51200 vs 50295
SEED = 1234
TRAIN_STEPS = 40
TRAIN_BATCH, TRAIN_SEQ = 8, 64

# Source files the tokenizer is trained on (stdlib, always present, stable enough).
_CORPUS_MODULES = (
    "textwrap.py",
    "json/encoder.py",
    "json/decoder.py",
    "argparse.py",
    "shlex.py",
    "string.py",
    "fnmatch.py",
    "heapq.py",
    "bisect.py",
    "glob.py",
)

# Code snippets for parity checks: ASCII code, unicode (é, 中文, emoji), tabs and long
# whitespace runs, mixed line endings.
SNIPPETS = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    'class Café:\n\t"""Représente un café — 中文注释 🚀."""\n'
    "\tdef __init__(self):\n\t\tself.prix = 2.5  # €\n",
    "import os\n\n\n\nfor root, dirs, files in os.walk('.'):\n" + " " * 24 + "print(root)\r\n",
    "x = {'ключ': [1, 2, 3], \"emoji\": '😀👍🏽'}\n        \t  \n" + "\t" * 5 + "return None  \n",
    "    # 数据处理\n    result = [i ** 2 for i in range(10) if i % 2 == 0]\n"
    "    yield from result\n",
)


def corpus() -> list[str]:
    """Return stdlib source texts used to train the tiny tokenizer."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [
        (stdlib / m).read_text(encoding="utf-8") for m in _CORPUS_MODULES if (stdlib / m).is_file()
    ]
    return texts + list(SNIPPETS)


def build_tokenizer(out_dir: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a GPT-2 style byte-level BPE and save it as an HF tokenizer directory.

    Writes tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and
    special_tokens_map.json; ``<|endoftext|>`` is bos, eos and unk (as in GPT-2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # + <|endoftext|> appended last, GPT-2 style
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([EOT])
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))  # vocab.json + merges.txt (the slow-tokenizer files)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **special,
                "tokenizer_class": "GPT2Tokenizer",
                "add_prefix_space": False,
                "add_bos_token": False,
                "model_max_length": N_CTX,
            }
        )
    )
    return out_dir


def _copy_tokenizer(tok_dir: Path, out_dir: Path) -> None:
    for p in tok_dir.iterdir():
        (out_dir / p.name).write_bytes(p.read_bytes())


def _scale(model: object, factor: float) -> None:
    """Multiply matrices (not norms/biases) by ``factor`` to sharpen the logits."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():  # type: ignore[attr-defined]
            if p.ndim == 2:
                p.mul_(factor)
            elif "ln" in name and name.endswith("bias"):
                p.normal_(0.0, 0.1)  # non-trivial norm biases catch a dropped beta


def _train(model: object, tok_dir: Path, steps: int, seed: int) -> None:
    """A few AdamW steps on the corpus so logits get a trained model's peaked shape.

    Purely random models have near-Gaussian logits whose top-2 gap (~0.3) is within
    int8 noise, which makes quantized top-1 agreement a coin toss; 40 steps (~20 s of
    CPU) fix that while the scaled init keeps attention sharp.
    """
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    data = torch.tensor([i for text in corpus() for i in tok.encode(text).ids])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)  # type: ignore[attr-defined]
    model.train()  # type: ignore[attr-defined]
    for _ in range(steps):
        starts = torch.randint(0, len(data) - TRAIN_SEQ - 1, (TRAIN_BATCH,), generator=gen)
        batch = torch.stack([data[int(i) : int(i) + TRAIN_SEQ] for i in starts])  # (B, T)
        loss = model(batch, labels=batch).loss  # type: ignore[operator]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()  # type: ignore[attr-defined]


def build_gpt2(tok_dir: Path, out_dir: Path, train_steps: int = TRAIN_STEPS) -> Path:
    """Save a 2-layer GPT-2 (n_embd 256, 4 heads) as safetensors + tokenizer files.

    Random init scaled x4, then ``train_steps`` short training steps (0 = untrained).
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_vocab = len(json.loads((tok_dir / "vocab.json").read_text())) + 1
    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=n_vocab,
        n_positions=N_CTX,
        n_embd=N_EMBD,
        n_layer=2,
        n_head=4,
        bos_token_id=n_vocab - 1,
        eos_token_id=n_vocab - 1,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).eval()
    _scale(model, 4.0)
    _train(model, tok_dir, train_steps, SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors; tied lm_head is not stored
    _copy_tokenizer(tok_dir, out_dir)
    return out_dir


def build_codegen(tok_dir: Path, out_dir: Path, train_steps: int = TRAIN_STEPS) -> Path:
    """Save a 2-layer CodeGen (n_embd 256, 8 heads, rotary_dim 16, padded vocab).

    Random init scaled x4 (lm_head bias random too), then ``train_steps`` steps.
    """
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    n_vocab = len(json.loads((tok_dir / "vocab.json").read_text())) + 1
    torch.manual_seed(SEED + 1)
    config = CodeGenConfig(
        vocab_size=CODEGEN_PADDED_VOCAB,
        n_positions=N_CTX,
        n_ctx=N_CTX,
        n_embd=N_EMBD,
        n_layer=2,
        n_head=8,
        rotary_dim=16,
        activation_function="gelu_new",
        bos_token_id=n_vocab - 1,
        eos_token_id=n_vocab - 1,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = CodeGenForCausalLM(config).eval()
    _scale(model, 4.0)
    with torch.no_grad():
        model.lm_head.bias.normal_(0.0, 0.5)  # exercise output.bias in phi2
    _train(model, tok_dir, train_steps, SEED + 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    _copy_tokenizer(tok_dir, out_dir)
    return out_dir


def hf_logits(model_dir: Path, sequences: list[list[int]]) -> list[object]:
    """Reference float32 logits ``(len(seq), vocab)`` per sequence from transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq in sequences:
            out.append(model(torch.tensor([seq])).logits[0].numpy())
    return out


def hf_tokenize(model_dir: Path, text: str) -> list[int]:
    """Token ids from the transformers tokenizer of ``model_dir`` (no special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return list(tok(text, add_special_tokens=False)["input_ids"])
