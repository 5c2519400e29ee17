"""How far a shifted KV cache is from a cold evaluation: the numbers behind ``--cache-reuse``.

``python -m benchmarks.sliding_accuracy MODEL_DIR [--windows 16] [--tokens 90]``
(a rotary GGUF directory with ``model.gguf`` and ``tokenizer.json``, e.g. the tests'
tiny f32 CodeGen under ``~/.cache/fastpilot/test-models/<hash>/codegen/gguf-f32``).

For windows of ``--tokens`` tokens of whole lines of the stdlib's ``textwrap.py``
(line 40 on), each slid by one line, it evaluates the new window three ways in one
llama.cpp context, one sequence each, and greedily continues 20 tokens:

* **cold**: the new window from scratch;
* **shifted**: the old window, its first line's cells removed and the rest moved down
  with ``llama_memory_seq_add`` (what ``--cache-reuse`` does), then the new tail;
* **exact**: the old window, its first line's cells removed, the rest left in place and
  the new tail after it -- under RoPE attention depends on position differences only,
  so this is what a correct shift computes, without re-rotating anything.

Prints per window the largest logprob difference over the whole vocabulary (shifted vs
cold, shifted vs exact), over the tokens greedy decoding picks, and whether the greedy
continuations agree; then the maxima.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np


def main() -> None:
    from tokenizers import Tokenizer

    from fastpilot.backends.llamacpp_native import NativeBatch, context_params, load_library
    from fastpilot.backends.sampling import log_softmax

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=90)
    ap.add_argument("--greedy", type=int, default=20)
    args = ap.parse_args()
    lib = load_library()
    model = lib.llama_model_load_from_file(
        str(args.model / "model.gguf").encode(), lib.llama_model_default_params()
    )
    if not model:
        raise SystemExit(f"cannot load {args.model / 'model.gguf'}")
    n_ctx = args.tokens * 2 + args.greedy + 64
    cparams = context_params(
        lib,
        n_ctx=3 * n_ctx,
        n_seq=3,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        threads=2,
        threads_batch=2,
        flash_attn=False,
    )
    ctx = lib.llama_init_from_model(model, cparams)
    mem = lib.llama_get_memory(ctx)
    batch = NativeBatch(lib, n_ctx)
    vocab = lib.llama_model_get_vocab(model)
    rows = int(lib.llama_vocab_n_tokens(vocab))
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    n_real = tok.get_vocab_size()
    src = Path(textwrap.__file__).read_text().splitlines(keepends=True)[40:]
    lines = [ids for ids in (tok.encode(s).ids for s in src) if ids]

    def window(first: int) -> list[int]:
        out: list[int] = []
        for line in lines[first:]:
            if len(out) + len(line) > args.tokens:
                break
            out += line
        return out

    def decode(seq: int, ids: list[int], pos0: int) -> list[np.ndarray]:
        """Logprobs after each of ``ids``: (len(ids), n_real) float64 rows."""
        batch.clear()
        batch.add(ids, pos0, seq, len(ids))
        if lib.llama_decode(ctx, batch.ready()) != 0:
            raise RuntimeError("llama_decode failed")
        return [
            log_softmax(
                np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(rows,))[:n_real]
            )
            for i in range(len(ids))
        ]

    def greedy(seq: int, lp: np.ndarray, pos: int) -> list[int]:
        out = []
        for i in range(args.greedy):
            out.append(int(np.argmax(lp)))
            lp = decode(seq, [out[-1]], pos + i)[0]
        return out

    worst = {"vocab_cold": 0.0, "chosen_cold": 0.0, "vocab_exact": 0.0}
    agree = total = 0
    for first in range(0, 3 * args.windows, 3):
        old, new = window(first), window(first + 1)
        k = len(lines[first])
        kept = len(old) - k
        if new[:kept] != old[k:] or len(new) <= kept:
            continue
        for seq in range(3):
            lib.llama_memory_seq_rm(mem, seq, -1, -1)
        cold = decode(0, new, 0)[kept:]
        decode(1, old, 0)
        lib.llama_memory_seq_rm(mem, 1, 0, k)
        lib.llama_memory_seq_add(mem, 1, k, -1, -k)
        lib.llama_memory_seq_rm(mem, 1, kept, -1)
        shifted = decode(1, new[kept:], kept)
        decode(2, old, 0)
        lib.llama_memory_seq_rm(mem, 2, 0, k)
        exact = decode(2, new[kept:], len(old))
        g_cold = greedy(0, cold[-1], len(new))
        g_shift = greedy(1, shifted[-1], len(new))
        chosen = [*new[kept + 1 :], g_cold[0]]
        d = {
            "vocab_cold": max(
                float(np.abs(a - b).max()) for a, b in zip(shifted, cold, strict=True)
            ),
            "chosen_cold": max(
                abs(a[t] - b[t]) for a, b, t in zip(shifted, cold, chosen, strict=True)
            ),
            "vocab_exact": max(
                float(np.abs(a - b).max()) for a, b in zip(shifted, exact, strict=True)
            ),
        }
        for key, v in d.items():
            worst[key] = max(worst[key], v)
        total += 1
        agree += g_cold == g_shift
        print(
            f"window {first}: slid {k} tokens, reused {kept}, evaluated {len(new) - kept}; "
            f"|shifted-cold| vocab {d['vocab_cold']:.4f} chosen {d['chosen_cold']:.4f}; "
            f"|shifted-exact| vocab {d['vocab_exact']:.2e}; greedy same: {g_cold == g_shift}"
        )
    print(
        f"max over {total} windows: |shifted-cold| vocab {worst['vocab_cold']:.4f}, chosen "
        f"{worst['chosen_cold']:.4f}; |shifted-exact| vocab {worst['vocab_exact']:.2e}; "
        f"greedy {args.greedy} tokens identical in {agree}/{total}"
    )


if __name__ == "__main__":
    main()
