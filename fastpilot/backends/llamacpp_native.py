"""Thin helpers over llama-cpp-python's ctypes API for :mod:`fastpilot.backends.llamacpp`.

Library init and log routing, a NumPy-backed
``llama_batch``, the token piece table, and the embedding context. Importing this
module does not import ``llama_cpp``; :func:`load_library` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from fastpilot.backends.base import Step
from fastpilot.backends.prefill import kv_padded
from fastpilot.backends.sampling import log_softmax, top_entries
from fastpilot.backends.scheduler import BatchEntry, KvCopy, KvOp, KvShift
from fastpilot.errors import BackendError, ContextLengthExceeded

__all__ = [
    "GGML_TYPES",
    "Embedder",
    "NativeBatch",
    "PromptScorer",
    "apply_kv_ops",
    "can_shift_positions",
    "context_params",
    "decode_entries",
    "LogitsRows",
    "load_library",
    "new_context",
    "offload_layers",
    "on_own_thread",
    "release_openmp_team",
    "read_pieces",
    "real_vocab_size",
    "shift_min_chunk",
]

_native_log = logging.getLogger("fastpilot.backends.llamacpp.native")
T = TypeVar("T")


def on_own_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a new thread that ends with it; its result, or its exception re-raised.

    For every ``llama_decode`` that does not run on a backend's worker thread (the
    flash-attention calibration at load, embeddings): llama.cpp's CPU threads are an
    OpenMP team per calling thread, and libgomp keeps a thread's team for as long as
    the thread lives. Once the teams hold more threads than there are CPUs, libgomp
    throttles every team's spin-wait, and each of the many barriers of a decode step
    sleeps in a futex: tiny-py v2 on 2 threads decoded 102 tok/s over HTTP in a server
    that had calibrated on its loading thread, 326 in one that read the calibration from
    its cache (69 with ``OMP_WAIT_POLICY=passive``). A thread that ends frees its team.
    """
    out: list[Any] = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as ex:  # noqa: BLE001 - handed to the caller below
            out.append((False, ex))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


_gomp_pause: Any = None  # libgomp's omp_pause_resource_all, False when absent


def release_openmp_team() -> None:
    """Free the calling thread's OpenMP team, if llama.cpp's libgomp is loaded.

    The other half of :func:`on_own_thread`, for threads that live on: each backend's
    worker keeps a team for its life, and a second llama.cpp backend in the process that
    has decoded once keeps a second, so the teams outnumber the CPUs and libgomp throttles
    every spin-wait (tiny-py, 2 threads: backend A 327-351 tok/s alone, 97-109 once a
    backend B had decoded, 398-524 after B closed). A worker calls this when it goes idle
    (``omp_pause_resource_all(omp_pause_soft)`` frees the calling thread's pool; the next
    ``llama_decode`` starts a new team). Opened ``RTLD_NOLOAD``: a build without OpenMP
    loads no libgomp, and then this does nothing.
    """
    global _gomp_pause
    if _gomp_pause is None:
        try:
            gomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
            fn = gomp.omp_pause_resource_all
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            _gomp_pause = fn
        except (OSError, AttributeError):
            _gomp_pause = False
    if _gomp_pause:
        _gomp_pause(1)  # omp_pause_soft


_INIT_LOCK = threading.Lock()
_lib: Any = None
_log_callback: Any = None  # keep the ctypes callback alive for the process lifetime
# ggml_log_level (ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT) -> logging level;
# llama.cpp's INFO chatter (tensor lists, buffer sizes) goes to DEBUG.
_LOG_LEVELS = {
    0: logging.DEBUG,
    1: logging.DEBUG,
    2: logging.DEBUG,
    3: logging.WARNING,
    4: logging.ERROR,
}


def cxx_runtime_global() -> None:
    """Load the C++ runtime into the process's global symbol scope (Linux; a no-op where
    it cannot be loaded).

    Measured on the H200's CUDA 13 build: ``libggml-cuda.so`` carries its own static copy
    of libstdc++ (3,465 exported ``std::`` symbols, no ``libstdc++.so.6`` among its or
    ``libllama``'s NEEDED), and llama_cpp opens ``libllama`` ``RTLD_LOCAL``, so libllama's
    stream code bound to that copy. With NumPy imported first (fastpilot always does) the
    shared ``libstdc++.so.6`` is in the process too, and ``LD_DEBUG=bindings`` showed
    libllama's ``std::`` bindings split between the two (2 to libstdc++, 56 to the copy;
    the split is presumably the process-wide unique symbols such as the facets'
    ``locale::id``): every model load died in ``llama_model::print_info`` writing an int
    to a ``std::stringstream``. Definitions in the global scope come before every local
    one, so with libstdc++ loaded ``RTLD_GLOBAL`` first libllama's ``std::`` bindings all
    went to the one shared runtime (164) and the loads, tests and benchmarks ran.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6", ctypes.RTLD_GLOBAL)
    except OSError:
        pass  # no shared libstdc++: nothing for llama.cpp to bind to twice


def load_library() -> Any:
    """Import llama_cpp once, init the ggml backends and route native logs to ``logging``."""
    global _lib, _log_callback
    with _INIT_LOCK:
        if _lib is None:
            cxx_runtime_global()
            import llama_cpp

            last = [logging.DEBUG]

            def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
                # level 5 (GGML_LOG_LEVEL_CONT) continues the previous message.
                lvl = last[0] if level == 5 else _LOG_LEVELS.get(level, logging.DEBUG)
                last[0] = lvl
                if _native_log.isEnabledFor(lvl):
                    _native_log.log(lvl, "%s", text.decode("utf-8", "replace").rstrip("\n"))

            _log_callback = llama_cpp.llama_log_callback(_on_log)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
                _native_log.warning(
                    "this llama.cpp build uses AMX, whose matmul crashes the process on "
                    "Q4_K models in llama-cpp-python 0.3.36; rebuild it without AMX "
                    "(`make install` does: CFLAGS/CXXFLAGS=-mno-amx-tile -mno-amx-int8)"
                )
            _lib = llama_cpp
    return _lib


def offload_layers(lib: Any, device: str) -> int:
    """Layers to offload for ``device``: ``cpu`` none, ``cuda`` all, ``auto`` all when possible.

    Raises :class:`BackendError` for ``cuda`` on a build without GPU offload.
    """
    if device == "cpu":
        return 0
    if device == "cuda":
        if not lib.llama_supports_gpu_offload():
            raise BackendError("device='cuda' but this llama.cpp build has no GPU offload")
        return 999
    if device == "auto":
        return 999 if lib.llama_supports_gpu_offload() else 0
    raise ValueError(f"unknown device {device!r}; expected cpu, cuda or auto")


# ggml_type ids (ggml.h) of the KV cache types fastpilot accepts.
GGML_TYPES = {"f16": 1, "q8_0": 8}


def context_params(
    lib: Any,
    *,
    n_ctx: int,
    n_seq: int,
    n_batch: int,
    n_ubatch: int,
    threads: int,
    threads_batch: int,
    flash_attn: bool | None,
    kv_type: str = "f16",
) -> Any:
    """``llama_context_params`` with one KV stream per sequence; ``flash_attn`` None: AUTO.

    The one place fastpilot fills generation context parameters, so a calibration
    probe (:mod:`fastpilot.backends.llamacpp_probe`) measures what the backend runs.
    ``n_ubatch`` is clamped to ``n_batch`` (llama.cpp would clamp it too).
    """
    p = lib.llama_context_default_params()
    p.n_ctx = n_ctx
    p.n_seq_max = n_seq
    p.n_batch = n_batch
    p.n_ubatch = min(n_ubatch, n_batch)
    p.n_threads = threads
    p.n_threads_batch = threads_batch
    p.kv_unified = False  # one KV stream per slot: attention only over its own cells
    p.no_perf = True
    # enum llama_flash_attn_type: AUTO -1, DISABLED 0, ENABLED 1
    p.flash_attn_type = -1 if flash_attn is None else int(flash_attn)
    p.type_k = p.type_v = GGML_TYPES[kv_type]
    return p


def new_context(lib: Any, model: Any, per_slot: int, slots: int, kernels: Any) -> Any:
    """A generation context with one KV stream of ``per_slot`` cells per slot (NULL on failure).

    ``kernels`` is the :class:`~fastpilot.backends.llamacpp_tuning.KernelChoice`:
    batch sizes, threads, flash attention and KV type, exactly as given.
    """
    # llama.cpp pads each KV stream to a multiple of 256 cells; ask for that directly.
    params = context_params(
        lib,
        n_ctx=kv_padded(per_slot) * slots,
        n_seq=slots,
        n_batch=kernels.n_batch,
        n_ubatch=kernels.n_ubatch,
        threads=kernels.threads,
        threads_batch=kernels.threads_batch,
        flash_attn=kernels.flash_attn,
        kv_type=kernels.kv_type,
    )
    return lib.llama_init_from_model(model, params)


class NativeBatch:
    """A ``llama_batch`` whose arrays are NumPy buffers owned by Python.

    Filling it is a few vectorized slice assignments instead of five ctypes
    writes per token; the memory lives as long as this object. Every token
    belongs to exactly one sequence.
    """

    def __init__(self, lib: Any, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        # seq_id[i] points at seq[i]: (capacity,) pointers into one contiguous int32 array.
        i32p = ctypes.POINTER(ctypes.c_int32)
        base = self.seq.ctypes.data
        self._seq_ptrs = (i32p * capacity)(
            *(ctypes.cast(base + 4 * i, i32p) for i in range(capacity))
        )
        b = lib.llama_batch()
        b.n_tokens = 0
        b.token = self.token.ctypes.data_as(i32p)
        b.embd = None
        b.pos = self.pos.ctypes.data_as(i32p)
        b.n_seq_id = self.n_seq_id.ctypes.data_as(i32p)
        b.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(i32p))
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct = b
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, tokens: Sequence[int], pos0: int, seq_id: int, n_logits: int) -> int:
        """Append ``tokens`` at positions ``pos0...``, with logits for the last ``n_logits``
        of them (``bool`` works: one or none); returns the index of the last one."""
        k, n = len(tokens), self.n
        if k == 1:  # a decoding sequence's token: scalar writes, not five slice assignments
            self.token[n], self.pos[n], self.seq[n], self.logits[n] = (
                tokens[0],
                pos0,
                seq_id,
                1 if n_logits else 0,
            )
            self.n = n + 1
            return n
        self.token[n : n + k] = tokens
        self.pos[n : n + k] = np.arange(pos0, pos0 + k, dtype=np.int32)
        self.seq[n : n + k] = seq_id
        self.logits[n : n + k] = 0
        if n_logits:
            self.logits[n + k - min(int(n_logits), k) : n + k] = 1
        self.n = n + k
        return n + k - 1

    def ready(self) -> Any:
        self.struct.n_tokens = self.n
        return self.struct


def apply_kv_ops(lib: Any, mem: Any, ops: Sequence[KvOp]) -> list[int]:
    """Apply a plan's KV ops in order; returns the slots cleared because a partial
    removal was refused (memories that cannot drop a suffix: recurrent, SWA).

    A shift only moves positions; llama.cpp re-rotates the moved keys at the start of
    the next ``llama_decode`` (one RoPE pass over the slot's cells per layer).
    """
    restarted: list[int] = []
    for op in ops:
        if isinstance(op, KvCopy):
            lib.llama_memory_seq_cp(mem, op.src, op.dst, -1, -1)
        elif isinstance(op, KvShift):
            lib.llama_memory_seq_add(mem, op.seq_id, op.start, op.end, op.delta)
        elif not lib.llama_memory_seq_rm(mem, op.seq_id, op.start, op.end) and op.start >= 0:
            lib.llama_memory_seq_rm(mem, op.seq_id, -1, -1)
            restarted.append(op.seq_id)
    return restarted


def can_shift_positions(lib: Any, model: Any, mem: Any) -> bool:
    """Whether cached KV cells can be moved to other positions and stay valid.

    Needs rotary positions: llama.cpp then re-rotates the moved keys. Its own
    ``llama_memory_can_shift`` says yes for GPT-2 too (rope type NONE: the move is
    only relabelling), but GPT-2 adds a learned embedding of the *absolute* position
    to its input, so every cached key and value keeps the old position and moving
    them would be wrong -- GPT-2 keeps the prefix cache only.
    """
    rotary = int(lib.llama_model_rope_type(model)) != lib.LLAMA_ROPE_TYPE_NONE
    return rotary and bool(lib.llama_memory_can_shift(mem))


def shift_min_chunk(lib: Any, model: Any, mem: Any, cache_reuse: int) -> int:
    """``cache_reuse`` if this model's cached cells can move (:func:`can_shift_positions`),
    else 0 -- logged, so that a GPT-2 served with ``--cache-reuse`` says why it never slides."""
    if cache_reuse and not can_shift_positions(lib, model, mem):
        _native_log.info("no rotary positions: the prompt cache reuses prefixes only")
        return 0
    return cache_reuse


def decode_entries(
    lib: Any, ctx: Any, mem: Any, batch: NativeBatch, entries: Sequence[BatchEntry[Any]]
) -> int:
    """Fill ``batch`` with the plan's entries in order and ``llama_decode`` it; the status.

    A failed decode may leave some ubatches in memory: every entry's slot is
    rolled back to where the entry started.
    """
    batch.clear()
    for e in entries:
        batch.add(e.tokens, e.pos0, e.seq_id, e.n_logits)
    rc = int(lib.llama_decode(ctx, batch.ready()))
    if rc != 0:
        for e in entries:
            lib.llama_memory_seq_rm(mem, e.seq_id, e.pos0, -1)
    return rc


class LogitsRows:
    """NumPy views of a context's output logits rows, made without copying.

    ``np.ctypeslib.as_array`` builds a new ctypes array type and array per call
    (~8 µs); this asks llama.cpp for the row's address through a private function
    pointer that returns it as an int (the shared ``llama_cpp`` one returns a
    ``LP_c_float``) and keeps one view per address. A view stays valid while the
    address lies in the context's output buffer, which is true of every address
    ``llama_get_logits_ith`` just returned (a regrown buffer gives new addresses);
    read a row before the next decode. Not thread-safe: the worker owns it.

    The pointer is called the ``PyDLL`` way, keeping the GIL: the call only indexes a
    buffer, and a plain ctypes call lets go of the GIL, which a woken HTTP thread then
    holds while the worker waits for it between two rows of one step.
    """

    _CACHE = 4096  # distinct rows kept; a batch of more outputs just rebuilds views

    def __init__(self, lib: Any, ctx: Any, n_rows: int) -> None:
        cdll = lib.llama_cpp._lib
        pydll = ctypes.PyDLL(cdll._name, handle=cdll._handle)  # same library, GIL kept
        fn = pydll._FuncPtr(("llama_get_logits_ith", pydll))
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        fn.restype = ctypes.c_void_p
        self._fn = fn
        self._ctx = ctx
        self._row = ctypes.c_float * n_rows  # (n_rows,) float32: one output row
        self._views: dict[int, np.ndarray] = {}

    def __call__(self, i: int) -> np.ndarray:
        """The ``(n_rows,)`` float32 logits of batch output ``i`` (llama.cpp's index)."""
        addr = self._fn(self._ctx, i)
        if not addr:
            raise BackendError(f"llama.cpp has no logits for batch index {i}")
        view = self._views.get(addr)
        if view is None:
            if len(self._views) >= self._CACHE:
                self._views.clear()
            row: Any = self._row.from_address(addr)  # a ctypes array: the buffer protocol
            view = self._views[addr] = np.frombuffer(row, np.float32)
        return view


def real_vocab_size(lib: Any, vocab: Any, n_rows: int) -> int:
    """Rows up to the last one that is a token: trailing ``UNUSED`` entries are padding
    (converted CodeGen pads 50295 tokens to 51200 rows)."""
    n = n_rows
    while n > 1 and lib.llama_vocab_get_attr(vocab, n - 1) & lib.LLAMA_TOKEN_ATTR_UNUSED:
        n -= 1
    return n


def read_pieces(lib: Any, vocab: Any, n_vocab: int) -> list[bytes]:
    """The raw bytes of every token id; control tokens as their text ("<|endoftext|>").

    One ``llama_token_to_piece`` per id at load time (~50k ctypes calls for GPT-2,
    tens of milliseconds), so detokenizing later is a list lookup.
    """
    buf = ctypes.create_string_buffer(256)
    pieces: list[bytes] = []
    for tok in range(n_vocab):
        n = lib.llama_token_to_piece(vocab, tok, buf, len(buf), 0, True)
        if n < 0:  # longer than the buffer: -n is the size needed
            big = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(vocab, tok, big, len(big), 0, True)
            pieces.append(big.raw[:n])
        else:
            pieces.append(buf.raw[:n])
    return pieces


class PromptScorer:
    """Log-probabilities of prompt tokens, evaluated in chunks into one (cleared) slot.

    Counts its ``decodes`` and evaluated ``tokens`` for the backend's counters.
    Rows past ``vocab_size`` (a padded vocabulary) are left out of the softmax.
    """

    def __init__(self, lib: Any, ctx: Any, batch: NativeBatch, n_rows: int, vocab_size: int):
        self.lib, self.ctx, self.batch = lib, ctx, batch
        self.n_rows, self.vocab_size = n_rows, vocab_size
        self.decodes = self.tokens = 0

    def score(self, prompt: list[int], seq_id: int, chunk: int, top: int) -> list[Step | None]:
        """One entry per prompt token, ``None`` first; raises BackendError on a failed decode."""
        lib, batch = self.lib, self.batch
        out: list[Step | None] = [None]
        for start in range(0, len(prompt), chunk):
            part = prompt[start : start + chunk]
            batch.clear()
            batch.add(part, start, seq_id, 0)
            # Logits at position i score token i+1; the very last one is not needed.
            batch.logits[: batch.n] = 1
            if start + len(part) == len(prompt):
                batch.logits[batch.n - 1] = 0
            rc = int(lib.llama_decode(self.ctx, batch.ready()))
            self.decodes += 1
            if rc != 0:
                raise BackendError(f"llama_decode failed with status {rc} while scoring")
            self.tokens += batch.n
            for j in range(len(part)):
                if start + j + 1 >= len(prompt):
                    break
                ptr = lib.llama_get_logits_ith(self.ctx, j)
                row = np.ctypeslib.as_array(ptr, shape=(self.n_rows,))
                lp = log_softmax(row[: self.vocab_size])
                tok = prompt[start + j + 1]
                out.append(Step(tok, float(lp[tok]), top_entries(lp, top)))
        return out


class Embedder:
    """A second context on the same model with ``embeddings=True`` and mean pooling.

    Not thread-safe: the backend serializes calls. One text per ``llama_decode``
    (the whole text in one ubatch, so the mean covers every token).
    """

    def __init__(self, lib: Any, model: Any, n_ctx: int, threads: int) -> None:
        p = lib.llama_context_default_params()
        p.n_ctx = p.n_batch = p.n_ubatch = n_ctx
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = threads
        p.embeddings = True
        p.pooling_type = lib.LLAMA_POOLING_TYPE_MEAN
        p.no_perf = True
        self.ctx = lib.llama_init_from_model(model, p)
        if not self.ctx:
            raise BackendError("llama.cpp could not create the embedding context")
        self.lib, self.n_ctx = lib, n_ctx
        self.n_embd = int(lib.llama_model_n_embd(model))
        self.batch = NativeBatch(lib, n_ctx)

    def embed(self, ids: Sequence[int]) -> list[float]:
        """Mean of the final hidden states (after the last norm) over ``ids``; not normalized."""
        lib = self.lib
        if len(ids) > self.n_ctx:
            raise ContextLengthExceeded(
                f"input of {len(ids)} tokens exceeds the {self.n_ctx}-token context",
                param="input",
            )
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        self.batch.clear()
        self.batch.add(ids, 0, 0, 0)
        self.batch.logits[: self.batch.n] = 1  # pooling reads every token's hidden state
        rc = int(lib.llama_decode(self.ctx, self.batch.ready()))
        ptr = lib.llama_get_embeddings_seq(self.ctx, 0) if rc == 0 else None
        if not ptr:
            raise BackendError(f"llama.cpp embedding failed (status {rc})")
        # (n_embd,) float32 view into llama.cpp's buffer: copy out before the next decode.
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(float).tolist()

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.ctx = None
