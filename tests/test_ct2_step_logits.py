"""CTranslate2 hands a batched step's logits to one callback: each sequence must get its own row.

ctranslate2 4.8.5 passes the ``(active, vocab)`` logits of every running example
to the first callback of a step and an empty view to the others; the backend's
:class:`~fastpilot.backends.ct2_support.StepLogits` hands the rows out. Before it,
a batch of two with logprobs failed with a 500 ("data is NULL but array contains
data") and batch index 0 got a log-softmax over both rows.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastpilot
from fastpilot.backends.ct2_support import StepLogits, read_vocabulary

ctranslate2 = pytest.importorskip("ctranslate2")


def _rows_alone(gen, start, steps):
    rows: list[np.ndarray] = []

    def keep(res):
        rows.append(np.asarray(res.logits, dtype=np.float32).reshape(-1).copy())
        return False

    gen.generate_batch(
        [start],
        max_length=steps,
        return_logits_vocab=True,
        include_prompt_in_result=False,
        callback=keep,
    )
    return rows


@pytest.mark.parametrize("stop_first", [None, 0, 1])
def test_each_batch_index_gets_its_own_row(tiny_gpt2_models, stop_first):
    path = tiny_gpt2_models["ct2-float32"]
    vocab = read_vocabulary(path)
    gen = ctranslate2.Generator(str(path), intra_threads=1)
    starts = [vocab[10:14], vocab[40:44], vocab[200:204]]  # equal lengths: see StepLogits
    alone = [_rows_alone(gen, s, 3) for s in starts]
    rows = StepLogits(len(vocab))
    seen: list[tuple[int, int]] = []

    def check(res):
        row = rows.row(res.logits)
        np.testing.assert_allclose(row, alone[res.batch_id][res.step], atol=1e-4)
        seen.append((res.batch_id, res.step))
        return res.batch_id == stop_first and res.step == 0  # one example leaves the batch

    gen.generate_batch(
        starts,
        max_length=3,
        return_logits_vocab=True,
        include_prompt_in_result=False,
        callback=check,
    )
    survivors = [b for b in range(3) if b != stop_first]
    assert sorted(seen) == sorted(
        [(b, 0) for b in range(3)] + [(b, s) for b in survivors for s in (1, 2)]
    )


def test_batched_sequences_report_the_same_logprobs_as_one_alone(tiny_gpt2_models):
    model = fastpilot.load(tiny_gpt2_models["ct2-float32"])
    try:
        one = model.complete(prompt="def fib(n):", max_tokens=6, temperature=0, logprobs=2)
        want = one["choices"][0]["logprobs"]
        batched = 0
        for _ in range(10):  # the worker may start the first sequence before the second arrives
            before = model.backend.stats()["batches"]
            two = model.complete(prompt="def fib(n):", max_tokens=6, temperature=0, logprobs=2, n=2)
            for choice in two["choices"]:
                assert choice["logprobs"]["tokens"] == want["tokens"]
                np.testing.assert_allclose(
                    choice["logprobs"]["token_logprobs"], want["token_logprobs"], atol=1e-5
                )
            batched += model.backend.stats()["batches"] - before == 1
            if batched:
                break
        assert batched, "the two sequences never shared a CTranslate2 batch"
    finally:
        model.close()


def test_prompts_of_different_lengths_with_logprobs_equal_single_requests(tiny_gpt2_models):
    model = fastpilot.load(tiny_gpt2_models["ct2-float32"])
    prompts = ["def fib(n):", "import os\nimport sys\n", "x = 1"]
    try:
        for temperature in (0, 0.7):
            both = model.complete(
                prompt=prompts, max_tokens=5, temperature=temperature, logprobs=1, seed=None
            )
            for i, prompt in enumerate(prompts):
                got = both["choices"][i]["logprobs"]
                assert all(isinstance(x, float) for x in got["token_logprobs"])
                if temperature == 0:
                    one = model.complete(prompt=prompt, max_tokens=5, temperature=0, logprobs=1)
                    want = one["choices"][0]["logprobs"]
                    assert got["tokens"] == want["tokens"]
                    np.testing.assert_allclose(
                        got["token_logprobs"], want["token_logprobs"], atol=1e-5
                    )
    finally:
        model.close()
