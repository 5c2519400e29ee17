"""Files and bookkeeping for the CTranslate2 backends: spelling, model files, jobs, batches.

Kept apart from ``ctranslate2.py`` so the backend module holds only the
scheduling and decoding; nothing here imports ctranslate2. The encoder-decoder
backend (``ct2_seq2seq.py``) shares the spelling, tokenizer and ``stepwise``
test and reads its Translator vocabulary here (:func:`read_target_vocabulary`,
:func:`is_seq2seq`).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fastpilot.backends.base import FinishReason, SamplingParams, Step, TokenStream
from fastpilot.backends.sampling import BAN, SequenceSampler, top_entries
from fastpilot.errors import ModelFileError


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE token spelling).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte
    order, to code points 256, 257, ... (the scheme of GPT-2's ``encoder.py``).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {ch: b for b, ch in _bytes_to_unicode().items()}


def spelling_to_bytes(token: str) -> bytes:
    """Raw bytes of a byte-level BPE token string; non-mapped chars pass as UTF-8."""
    out = bytearray()
    for ch in token:
        b = _BYTE_DECODER.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


# Prompts whose remaining lengths differ by at most this many tokens share a
# generate_batch call: CT2 prefills only up to the shortest prompt and feeds the
# rest one token per decode step (include_prompt_in_result=False), so each token
# of difference costs one batch-wide decode step, cheaper than a separate call.
LENGTH_TOLERANCE = 16


@dataclass(frozen=True, slots=True)
class BatchKey:
    """Everything CT2 takes once per generate_batch call; equal keys may batch."""

    topk: int
    topp: float
    temperature: float
    min_length: int
    banned: tuple[int, ...]


@dataclass(slots=True)
class Job:
    """One queued request: what CT2 is given for it, and how many steps it produced."""

    stream: TokenStream
    start: list[int]  # tokens passed as start_tokens (prompt minus the static prefix)
    static: tuple[int, ...]
    key: BatchKey | None  # None: the stepwise path
    emitted: int = 0


def wants_logits(job: Job) -> bool:
    """True when the native path must read this job's logits (temperature or logprobs)."""
    assert job.key is not None
    return job.key.temperature != 1.0 or bool(job.stream.request.params.logprobs)


def stepwise(p: SamplingParams) -> bool:
    """True for what CT2 cannot sample itself (see the ctranslate2 module docstring)."""
    return bool(
        p.seed is not None
        or p.presence_penalty
        or p.frequency_penalty
        or p.repetition_penalty != 1.0
        or any(v > BAN for _, v in p.logit_bias)
    )


def plan_job(stream: TokenStream, bos: int, vocab_size: int, padding: tuple[int, ...]) -> Job:
    """The job for a new request: the stepwise path, or the native one with its batch key.

    ``padding`` (ids past the tokenizer, rows of a padded vocabulary) is banned
    on the native path like a ``logit_bias`` of -100, so it is never sampled.
    """
    p = stream.request.params
    prompt = list(stream.request.prompt_ids) or [bos]  # CT2 needs one start token
    if stepwise(p):
        return Job(stream, prompt, (), None)
    greedy = p.greedy
    banned = tuple(sorted({t for t, v in p.logit_bias if v <= BAN and 0 <= t < vocab_size}))
    key = BatchKey(
        topk=1 if greedy else p.top_k,
        topp=1.0 if greedy else p.top_p,
        temperature=1.0 if greedy else p.temperature,
        min_length=p.max_tokens if p.ignore_eos else p.min_tokens,
        banned=banned + padding,
    )
    return Job(stream, prompt, (), key)


class PrefixPlanner:
    """Chooses static prompts and accounts for what CT2 keeps cached.

    Not thread-safe: only the worker thread uses it.
    """

    def __init__(self, chunk: int, budget_tokens: int, recent: int = 16) -> None:
        self.chunk = chunk
        self.budget = budget_tokens
        self.cached: set[tuple[int, ...]] = set()
        self.used = 0
        self.recent: collections.deque[tuple[int, ...]] = collections.deque(maxlen=recent)
        self.hits = 0

    def plan(self, prompt: Sequence[int]) -> tuple[tuple[int, ...], bool]:
        """Return ``(static_prefix, hit)`` for a prompt (empty prefix: no static prompt)."""
        if self.chunk <= 0 or len(prompt) <= self.chunk:
            return (), False
        p = tuple(prompt)
        best_cached: tuple[int, ...] = ()
        for entry in self.cached:
            if len(best_cached) < len(entry) < len(p) and p[: len(entry)] == entry:
                best_cached = entry
        best_seen = 0
        for old in self.recent:
            n = min(len(old), len(p) - 1)
            lcp = n if old[:n] == p[:n] else int(np.argmin(np.equal(old[:n], p[:n])))
            best_seen = max(best_seen, lcp // self.chunk * self.chunk)
        self.recent.append(p)
        if best_seen > len(best_cached) and self.used + best_seen <= self.budget:
            return p[:best_seen], False  # computed now, kept by CT2 for the next hit
        if best_cached:
            self.hits += 1
            return best_cached, True
        return (), False

    def keep(self, prefix: tuple[int, ...]) -> None:
        if prefix and prefix not in self.cached:
            self.cached.add(prefix)
            self.used += len(prefix)

    def clear(self) -> None:
        self.cached.clear()
        self.used = 0


def take_batch(
    pending: collections.deque[Job],
    planner: PrefixPlanner,
    max_batch: int,
    stop: Callable[[TokenStream], None],
) -> list[Job]:
    """Pop the oldest live job and the compatible ones behind it (caller holds the lock).

    Cancelled jobs met at the head are handed to ``stop``. The head gets its
    static prefix from ``planner``; a native job batches with the head when it
    shares the head's key and static prefix and its remaining prompt has about
    the head's length (exactly, where step counts or logits rows depend on it).
    """
    while pending:
        head = pending.popleft()
        if head.stream.cancelled:
            stop(head.stream)
            continue
        break
    else:
        return []
    assign_static(head, planner)
    if head.key is None:
        return [head]
    batch = [head]
    for job in list(pending):
        if len(batch) >= max_batch:
            break
        if job.key is None or job.stream.cancelled:
            continue
        prefix = head.static
        full = job.start
        if prefix and tuple(full[: len(prefix)]) != prefix:
            continue
        rest = len(full) - len(prefix)
        if rest < 1 or job.key != head.key:
            continue
        # min_length counts decode steps, which include a longer prompt's fed tokens;
        # and per-example logits rows are only laid out by batch index when every
        # prompt has the same length (see StepLogits).
        exact = head.key.min_length or wants_logits(head) or wants_logits(job)
        tolerance = 0 if exact else LENGTH_TOLERANCE
        if abs(rest - len(head.start)) > tolerance:
            continue
        pending.remove(job)
        job.static, job.start = prefix, full[len(prefix) :]
        job.stream.cached_tokens = head.stream.cached_tokens
        batch.append(job)
    return batch


def assign_static(job: Job, planner: PrefixPlanner) -> None:
    """Split the job's start tokens into the static prefix ``planner`` chooses and the rest."""
    prefix, hit = planner.plan(job.start)
    if job.key is None and not prefix and len(job.start) > 1:
        # Stepwise restarts reuse the prompt's state: always make it static.
        prefix, hit = tuple(job.start[:-1]), False
    if prefix:
        job.static, job.start = prefix, job.start[len(prefix) :]
        job.stream.cached_tokens = len(prefix) if hit else 0


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as ex:
        raise ModelFileError(f"cannot read {path}: {ex}") from ex
    return data if isinstance(data, dict) else {}


def read_vocabulary(path: Path) -> list[str]:
    if (path / "vocabulary.json").is_file():
        vocab = json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))
    elif (path / "vocabulary.txt").is_file():
        text = (path / "vocabulary.txt").read_text(encoding="utf-8")
        vocab = text.split("\n")
        if vocab and vocab[-1] == "":
            vocab.pop()
    else:
        raise ModelFileError(f"{path} has no vocabulary.json or vocabulary.txt")
    return [str(t) for t in vocab]


# Vocabulary files only a Translator (encoder-decoder) directory has.
SEQ2SEQ_VOCAB_FILES = (
    "shared_vocabulary.json",
    "shared_vocabulary.txt",
    "target_vocabulary.json",
    "target_vocabulary.txt",
)


def is_seq2seq(path: Path) -> bool:
    """True when a CTranslate2 directory holds an encoder-decoder (Translator) model."""
    return any((path / name).is_file() for name in SEQ2SEQ_VOCAB_FILES)


def read_target_vocabulary(path: Path) -> list[str]:
    """The target (or shared) vocabulary of a Translator directory, in id order."""
    for name in SEQ2SEQ_VOCAB_FILES:
        file = path / name
        if not file.is_file():
            continue
        text = file.read_text(encoding="utf-8")
        if name.endswith(".json"):
            return [str(t) for t in json.loads(text)]
        tokens = text.split("\n")
        return tokens[:-1] if tokens and tokens[-1] == "" else tokens
    raise ModelFileError(f"{path} has no shared or target vocabulary")


def check_vocabulary(path: Path, tokenizer: Any, vocab: Sequence[str]) -> int:
    """CT2's vocabulary must spell the tokenizer's ids; padding rows may follow.

    Returns the tokenizer's size: ids from there on are padding.

    Raises:
        ModelFileError: the tokenizer has more tokens than the CT2 vocabulary, or
            spells an id differently.
    """
    tokens = tokenizer.get_vocab(with_added_tokens=True)
    if len(tokens) > len(vocab):
        raise ModelFileError(
            f"{path}: tokenizer.json has {len(tokens)} tokens but the CT2 vocabulary "
            f"has {len(vocab)}"
        )
    bad = [t for t, i in tokens.items() if i >= len(vocab) or vocab[i] != t]
    if bad:
        raise ModelFileError(
            f"{path}: the CT2 vocabulary disagrees with tokenizer.json "
            f"({len(bad)} tokens, e.g. {bad[:3]!r})"
        )
    return max(tokens.values(), default=-1) + 1


def load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ModelFileError(f"{path} is missing: a CT2 directory needs the model's tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as ex:  # tokenizers raises a bare Exception on a bad file
        raise ModelFileError(f"cannot load {path}: {ex}") from ex


class StepLogits:
    """Hand each batch index its own logits row from CTranslate2's step callback.

    CTranslate2 4.8.5 gives the first callback of a decoding step (the lowest
    batch index still running) the ``(active, vocab)`` logits of every example
    still running, in batch-index order, and the later callbacks of the same
    step an empty view (``numpy.asarray`` on it raises). When every prompt of the
    batch has the same length, the callbacks of one step arrive in increasing
    batch index, so the rows are handed out in arrival order until the next
    non-empty matrix starts a new step (checked against one-example runs,
    including batches where an earlier or a later example stopped first). With
    unequal prompts CT2 feeds the longer ones' extra tokens by constrained
    decoding and the rows no longer follow the callbacks: the backend batches
    only equal-length prompts when it reads logits.
    """

    __slots__ = ("_pending", "_vocab")

    def __init__(self, vocab_size: int) -> None:
        self._vocab = vocab_size
        self._pending: collections.deque[np.ndarray] = collections.deque()

    def row(self, logits: Any) -> np.ndarray:
        """Return this callback's ``(vocab,)`` float32 logits."""
        if len(logits.shape) and logits.shape[0]:
            rows = np.asarray(logits, dtype=np.float32).reshape(-1, self._vocab)
            self._pending = collections.deque(rows[1:])
            return rows[0]
        if not self._pending:
            raise RuntimeError("CTranslate2 gave a step callback no logits row")
        return self._pending.popleft()


class Emitting(Protocol):
    """What :func:`push_native` needs of a job (both CT2 backends' job records)."""

    stream: TokenStream
    emitted: int


def push_native(
    job: Emitting,
    token: int,
    log_prob: float,
    logprobs_of: Callable[[], np.ndarray] | None,
    *,
    limit: int,
    min_length: int,
    eos: frozenset[int] | set[int],
) -> bool:
    """Hand one token CT2 sampled to its stream; True when the stream ended (stop the index).

    ``logprobs_of`` gives the ``(vocab,)`` log-probabilities of the step (called
    only when the token is pushed), or is ``None`` when nobody asked for them:
    then CT2's own ``log_prob`` is the token's logprob.
    """
    stream = job.stream
    if token in eos and job.emitted >= min_length:
        stream.finish(FinishReason.STOP)
        return True
    if logprobs_of is None:
        step = Step(token, float(log_prob))
    else:
        lp = logprobs_of()
        step = Step(token, float(lp[token]), top_entries(lp, stream.request.params.logprobs))
    stream.put(step)
    job.emitted += 1
    if job.emitted >= limit:
        stream.finish(FinishReason.LENGTH)
        return True
    return False


def follow_step(
    stream: TokenStream,
    sampler: SequenceSampler,
    logits: np.ndarray,
    ct2_token: int,
    generated: list[int],
    *,
    limit: int,
    eos: frozenset[int] | set[int],
) -> tuple[bool, bool]:
    """One step of the stepwise path: our sampler picks from CT2's raw logits.

    Returns ``(stop, diverged)``: stop this CT2 call, and whether it stopped
    because CT2's greedy token differs from ours (restart from ``generated``).
    """
    step = sampler.sample(logits)
    if step.token_id in eos:
        stream.finish(FinishReason.STOP)
        return True, False
    stream.put(step)
    generated.append(step.token_id)
    if len(generated) >= limit:
        stream.finish(FinishReason.LENGTH)
        return True, False
    if step.token_id != ct2_token:  # CT2 went another way: restart from ours
        return True, True
    return False, False
