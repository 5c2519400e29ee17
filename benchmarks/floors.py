"""In-process library floors: the fastest a server built on each library could be.

No HTTP, no scheduler, no detokenizer: the prompt is evaluated once, then greedy
decoding runs one token per step straight on the library (EOS masked, so every run
produces exactly ``--tokens`` tokens). Each floor runs in its own process
(``python -m benchmarks.floors llama|ct2 ...``) so that its threads and memory do not
mix with the harness; it prints one JSON line with per-repetition timings.

* llama: ``llama_cpp.Llama`` to load, then the low-level path per step:
  ``Llama.eval([token])`` (one ``llama_decode`` of a 1-token batch) and numpy argmax
  over ``llama_get_logits``.
* ct2: ``Generator.generate_batch`` with ``include_prompt_in_result=False`` (the
  prompt is one forward pass), greedy (``sampling_topk=1``), ``min_length`` = tokens,
  and a step callback that timestamps each token.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _llama(args: argparse.Namespace, prompt: str) -> dict:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        verbose=False,
    )
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False)
    n_vocab = llm.n_vocab()
    eos = llm.token_eos()
    reps = []
    for _ in range(args.reps):
        llm.reset()  # n_tokens = 0: the next eval drops the whole KV cache
        t0 = time.perf_counter()
        llm.eval(ids)
        times = []
        for _i in range(args.tokens):
            # (n_vocab,) float32 view of the last position's logits, owned by llama.cpp.
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            if eos >= 0:
                logits[eos] = -np.inf  # force length, like ignore_eos
            tok = int(np.argmax(logits))
            times.append(time.perf_counter() - t0)
            if _i + 1 < args.tokens:
                llm.eval([tok])
        reps.append({"prompt_tokens": len(ids), "times": times})
    return {"reps": reps}


def _ct2(args: argparse.Namespace, prompt: str) -> dict:
    import ctranslate2
    from tokenizers import Tokenizer

    mdir = Path(args.model).parent if Path(args.model).is_file() else Path(args.model)
    tok = Tokenizer.from_file(str(mdir / "tokenizer.json"))
    ids = tok.encode(prompt).ids
    tokens = [tok.id_to_token(i) for i in ids]
    gen = ctranslate2.Generator(
        str(mdir), device="cpu", compute_type="int8", intra_threads=args.threads
    )
    reps = []
    for _ in range(args.reps):
        times: list[float] = []
        t0 = time.perf_counter()

        def cb(step, times=times, t0=t0) -> bool:
            times.append(time.perf_counter() - t0)
            return False

        gen.generate_batch(
            [tokens],
            max_length=args.tokens,
            min_length=args.tokens,
            sampling_topk=1,
            include_prompt_in_result=False,
            callback=cb,
        )
        reps.append({"prompt_tokens": len(ids), "times": times})
    return {"reps": reps}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="in-process decode floor (one JSON line on stdout)")
    ap.add_argument("kind", choices=["llama", "ct2"])
    ap.add_argument("--model", required=True, help=".gguf file, or CT2 directory / model.bin")
    ap.add_argument("--prompt-file", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args(argv)
    prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    out = _llama(args, prompt) if args.kind == "llama" else _ct2(args, prompt)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
