"""llama.cpp context settings: chosen (user, calibrated, default), reported, and prefill sizing.

Real llama.cpp on the tiny GPT-2 GGUF files of ``tests/conftest.py``. What the
context was created with is read back from llama.cpp itself: its getters
(``llama_n_batch`` ...) and the parameter lines it logs when a context is created
(routed to the ``fastpilot.backends.llamacpp.native`` logger at DEBUG).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

import falcon.testing
import pytest

from fastpilot.backends.base import GenerationRequest, SamplingParams
from fastpilot.backends.llamacpp_probe import MID_DEPTHS
from fastpilot.settings import SettingsError, load_settings

pytestmark = pytest.mark.timeout(300)

NATIVE = "fastpilot.backends.llamacpp.native"


@pytest.fixture(autouse=True)
def _native_log_to_logging() -> None:
    """Point llama.cpp's log back at fastpilot's logger before each test.

    llama.cpp holds one process-wide log callback; an earlier test (the FIM reference in
    ``tests/fim_models.py``) may have replaced fastpilot's with a silent one, and these
    tests read the context parameters from the log lines.
    """
    import ctypes

    import llama_cpp

    from fastpilot.backends import llamacpp_native as native

    native.load_library()
    llama_cpp.llama_log_set(native._log_callback, ctypes.c_void_p(0))


def _backend(path: Path, cache: Path | None, **kw):
    from fastpilot.backends.llamacpp import LlamaCppBackend

    kw.setdefault("threads", 1)
    return LlamaCppBackend(path, kernel_cache=cache, **kw)


def _native_params(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    """The ``llama_context: name = value`` lines of every context created, in order."""
    out: list[dict[str, str]] = []
    for rec in caplog.records:
        if rec.name != NATIVE:
            continue
        m = re.match(r"llama_context: (\w+)\s+= (\S+)", rec.getMessage())
        if m and m.group(1) == "n_seq_max":
            out.append({})
        if m and out:
            out[-1][m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize("asked", ["on", "off"])
def test_the_report_is_what_llama_cpp_created(tiny_gpt2_models, tmp_path, caplog, asked) -> None:
    caplog.set_level(logging.DEBUG, logger=NATIVE)
    b = _backend(tiny_gpt2_models["gguf-f32"], tmp_path, flash_attn=asked, n_ubatch=64)
    try:
        k = b.info.extra["kernels"]
        created = _native_params(caplog)
        # No flash-attention probes: the flag decided. The one context before the
        # generation context timed the batch widths (speculation is on by default).
        assert len(created) == 2 and k["batch_cost"]["cached"] is False
        native = created[-1]
        assert created[0]["flash_attn"] == native["flash_attn"]  # the shape of this kernel
        assert native["flash_attn"] == {"on": "enabled", "off": "disabled"}[asked]
        assert k["flash_attn"] == asked and k["source"]["flash_attn"] == "user"
        assert int(native["n_batch"]) == k["n_batch"] == b.kernels.n_batch
        assert int(native["n_ubatch"]) == k["n_ubatch"] == 64
        assert k["source"]["n_ubatch"] == "user" and k["source"]["kv_type"] == "default"
        assert k["threads"] == k["threads_batch"] == 1
        assert "calibration" not in k
        assert not (tmp_path / "kernels").exists()
        # A prompt alone is prefilled in steps sized by the kernel (prefill.alone_tokens).
        alone = {"on": 1024, "off": 256}[asked]
        assert b.info.extra["prefill_batch"] == b._sched.prefill_alone == alone
        assert k["prefill_batch"] == alone  # /v1/models says it beside the kernels
    finally:
        b.close()


def test_calibration_is_measured_once_cached_and_reused(tiny_gpt2_models, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=NATIVE)
    path = tiny_gpt2_models["gguf-f32"]
    for _ in range(5):  # a busy CPU can make a measurement inconclusive: then it is redone
        caplog.clear()
        b = _backend(path, tmp_path)
        first = b.info.extra["kernels"]
        b.close()
        cal = first["calibration"]
        assert cal["cached"] is False
        # Probe contexts in on/off pairs were created before the generation context, then
        # the batch widths' (once: cached by the first load).
        created = [c["flash_attn"] for c in _native_params(caplog)]
        assert created[:2] == ["enabled", "disabled"] and len(created) in (3, 4, 5, 6, 7)
        assert created[-len(contexts(b)) :] == contexts(b)
        if cal["conclusive"]:
            break
        assert first["source"]["flash_attn"] == "default" and first["flash_attn"] == "on"
        assert "file" not in cal and not list(tmp_path.glob("kernels/*.json"))
    assert first["source"]["flash_attn"] == "calibrated"
    assert {p["flash_attn"] for p in cal["probes"]} == {"on", "off"}
    assert all(p["short_ms"] > 0 and p["deep_ms"] > 0 for p in cal["probes"])
    for p in cal["probes"]:  # the depths timed on the way from short to deep
        between = {d for d in MID_DEPTHS if p["short"] + 7 < d < p["deep"]}
        assert {int(d) for d in p["mid_ms"]} == between and all(v > 0 for v in p["mid_ms"].values())
    # The crossover the short lane is sized by (its arithmetic: test_short_lane.py). With
    # a tiny model's nearly parallel lines it swings far on microseconds, so only its
    # side of the short point is checked here.
    below = cal["flash_faster_below"]
    short_ms = {
        on: min(p["short_ms"] for p in cal["probes"] if p["flash_attn"] == on)
        for on in ("on", "off")
    }
    assert isinstance(below, int) and below >= 0
    if short_ms["on"] > short_ms["off"] + 0.002:
        assert below == 0  # on is slower already at a short KV
    elif short_ms["on"] < short_ms["off"] - 0.002:
        assert below >= 16
    saved = Path(cal["file"])
    assert json.loads(saved.read_text())["flash_attn"] == first["flash_attn"]

    # The cached file decides the next load, without a probe: flip it to see that.
    record = json.loads(saved.read_text())
    flipped = "off" if record["flash_attn"] == "on" else "on"
    saved.write_text(json.dumps({**record, "flash_attn": flipped}))
    caplog.clear()
    b = _backend(path, tmp_path)
    try:
        again = b.info.extra["kernels"]
        assert again["flash_attn"] == flipped and again["source"]["flash_attn"] == "calibrated"
        assert again["calibration"]["cached"] is True
        created = [c["flash_attn"] for c in _native_params(caplog)]
        assert created[-len(contexts(b)) :] == contexts(b)
        # No probes; at most the batch widths of the flipped kernel, not timed before.
        assert created[: -len(contexts(b))] in ([], [first_native(again)])
    finally:
        b.close()


def first_native(report: dict) -> str:
    return {"on": "enabled", "off": "disabled", "auto": "auto"}[report["flash_attn"]]


def contexts(b) -> list[str]:
    """The generation contexts ``b`` created, as llama.cpp logs their flash attention:
    the main one, then the short lane's (always on) when it has one."""
    return [first_native(b.info.extra["kernels"])] + ["enabled"] * (b.short_lane is not None)


def test_the_batch_cost_is_measured_once_cached_and_steers_the_drafts(
    tiny_gpt2_models, tmp_path, caplog
) -> None:
    """The widths a speculative step can have are timed at load (logits for every
    token), cached per model, kernel and machine, reported, and handed to the draft
    policy; with speculation off nothing is timed."""
    from fastpilot.backends.llamacpp_tuning import BATCH_WIDTHS

    caplog.set_level(logging.DEBUG, logger=NATIVE)
    path = tiny_gpt2_models["gguf-f32"]
    b = _backend(path, tmp_path, flash_attn="off")
    try:
        bc = b.info.extra["kernels"]["batch_cost"]
        assert bc["cached"] is False and bc["widths"] == list(BATCH_WIDTHS)
        assert len(bc["ms"]) == len(BATCH_WIDTHS) and all(v > 0 for v in bc["ms"])
        ms = json.loads(Path(bc["file"]).read_text())["ms"]  # the report rounds them
        assert ms == pytest.approx(bc["ms"], abs=1e-3)
        shape = b.kernels.batch_shape
        assert shape is not None and len(shape) == BATCH_WIDTHS[-1] and shape[0] == 1.0
        assert shape[63] == pytest.approx(ms[-1] / ms[0])
        med = [sorted(ms[i - 1 : i + 2])[1] for i in (15, 16)]  # widths 16 and 20, smoothed
        assert shape[17] == pytest.approx((med[0] + med[1]) / 2 / ms[0])  # 18: between them
        # The scheduler's cost is that shape until a step is timed.
        assert b._sched.draft_cost.relative(64) == pytest.approx(shape[63])
    finally:
        b.close()
    caplog.clear()
    b = _backend(path, tmp_path, flash_attn="off")
    try:
        again = b.info.extra["kernels"]["batch_cost"]
        assert again["cached"] is True and again["ms"] == bc["ms"]
        assert len(_native_params(caplog)) == 1  # only the generation context
        assert b.kernels.batch_shape == shape
    finally:
        b.close()
    b = _backend(path, tmp_path, flash_attn="off", speculative="off")
    try:
        assert "batch_cost" not in b.info.extra["kernels"] and b.kernels.batch_shape is None
    finally:
        b.close()


def test_one_width_timed_far_off_is_smoothed_a_step_in_the_cost_is_kept() -> None:
    from fastpilot.backends.llamacpp_tuning import _dense

    widths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    ms = [10.0, 15, 20, 25, 12, 35, 40, 70, 71, 72]  # 5 tokens timed at 12 ms: noise
    shape = _dense(widths, ms)
    assert shape[4] == 2.5 and shape[3] == 2.0  # medians of 25, 12, 35 and of 20, 25, 12
    assert shape[6] == 4.0 and shape[7] == 7.0 and shape[-1] == 7.2  # the step at 8 stays
    assert _dense([1, 2, 4], [10.0, 14, 22]) == (1.0, 1.4, 1.8, 2.2)  # 3: interpolated


def test_the_user_s_flag_wins_over_a_cached_calibration(tiny_gpt2_models, tmp_path) -> None:
    path = tiny_gpt2_models["gguf-f32"]
    _backend(path, tmp_path).close()  # calibrates and caches
    for asked in ("on", "off"):
        b = _backend(path, tmp_path, flash_attn=asked)
        try:
            assert b.kernels.flash_attn is (asked == "on")
            assert b.info.extra["kernels"]["source"]["flash_attn"] == "user"
        finally:
            b.close()


def test_bad_kernel_values_are_clear_errors(tiny_gpt2_models, tmp_path) -> None:
    path = tiny_gpt2_models["gguf-f32"]
    with pytest.raises(ValueError, match="flash_attn must be auto, on or off, not 'maybe'"):
        _backend(path, tmp_path, flash_attn="maybe")
    with pytest.raises(ValueError, match="kv_type must be one of f16, q8_0, not 'q4'"):
        _backend(path, tmp_path, kv_type="q4")
    with pytest.raises(ValueError, match="q8_0 KV cache needs flash attention"):
        _backend(path, tmp_path, kv_type="q8_0", flash_attn="off")
    with pytest.raises(SettingsError, match="--flash-attn must be one of auto, on, off"):
        load_settings(["--flash-attn", "maybe"], environ={}).check()
    with pytest.raises(SettingsError, match="--kv-type must be one of f16, q8_0"):
        load_settings(["--kv-type", "q4"], environ={}).check()
    with pytest.raises(SettingsError, match="--kv-type q8_0 needs flash attention"):
        load_settings(["--kv-type", "q8_0", "--flash-attn", "off"], environ={}).check()
    for flag in ("--ubatch", "--threads-batch", "--prefill-batch"):
        with pytest.raises(SettingsError, match=flag):
            load_settings([flag, "0"], environ={}).check()
    env = {"FASTPILOT_FLASH_ATTN": "off", "FASTPILOT_UBATCH": "128"}
    s = load_settings([], environ=env)
    assert (s.flash_attn, s.ubatch) == ("off", 128)


def test_a_q8_0_kv_cache_runs_with_flash_attention(tiny_gpt2_models, tmp_path) -> None:
    b = _backend(tiny_gpt2_models["gguf-f32"], tmp_path, kv_type="q8_0")
    try:
        k = b.info.extra["kernels"]
        assert (k["kv_type"], k["flash_attn"]) == ("q8_0", "on")
        assert k["source"]["kv_type"] == "user" and k["source"]["flash_attn"] == "default"
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        assert len(list(b.submit(GenerationRequest([1, 2, 3], params)))) == 4
    finally:
        b.close()


def test_models_listing_and_startup_line_report_the_kernels(tiny_gpt2_models) -> None:
    from fastpilot.app import create_app
    from fastpilot.models import Registry
    from fastpilot.serve import load_models
    from fastpilot.settings import Settings
    from tests.test_api_support import LOCAL

    settings = Settings(
        model=(f"g={tiny_gpt2_models['gguf-f32']}",), threads=1, flash_attn="off", ubatch=32
    )
    registry, said = Registry(), []
    load_models(settings, registry, say=said.append)
    try:
        client = falcon.testing.TestClient(create_app(settings, registry), headers=dict(LOCAL))
        k = client.simulate_get("/v1/models").json["data"][0]["kernels"]
        assert k == client.simulate_get("/v1/models/g").json["kernels"]
        backend = registry.get("g").backend
        # flash off: 256-token prefill steps; forced off, nothing measured: no short lane
        assert k == dict(backend.kernels.to_json(), prefill_batch=256, short_lane=None)
        assert (k["flash_attn"], k["n_ubatch"]) == ("off", 32)
        assert k["source"]["flash_attn"] == k["source"]["n_ubatch"] == "user"
        line = said[-1]
        assert "flash_attn off (user)" in line and "n_ubatch 32 (user)" in line, line
    finally:
        registry.close_all()


def test_a_prompt_alone_is_prefilled_in_fewer_decodes_with_the_same_output(
    tiny_gpt2_models, tmp_path
) -> None:
    path = tiny_gpt2_models["gguf-f32"]
    # Before: every step holds at most prompt_chunk prompt tokens; after: 64 when alone.
    old = _backend(path, tmp_path, flash_attn="off", prompt_chunk=16, prefill_batch=16)
    new = _backend(path, tmp_path, flash_attn="off", prompt_chunk=16, prefill_batch=64)
    try:
        prompt = [int(t) for t in range(5, 105)]  # 100 tokens
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
        out = {}
        for name, b in (("old", old), ("new", new)):
            steps0 = b.stats()["decode_steps"]
            steps = list(b.submit(GenerationRequest(prompt, params)))
            out[name] = (steps, b.stats()["decode_steps"] - steps0)
        (old_steps, old_calls), (new_steps, new_calls) = out["old"], out["new"]
        assert old_calls == 7 + 5 and new_calls == 2 + 5  # ceil(100/16), ceil(100/64); 5 decodes
        assert [s.token_id for s in new_steps] == [s.token_id for s in old_steps]
        for a, b_ in zip(old_steps, new_steps, strict=True):
            assert b_.logprob == pytest.approx(a.logprob, abs=1e-5)
            assert [t for t, _ in b_.top_logprobs] == [t for t, _ in a.top_logprobs]
    finally:
        old.close()
        new.close()


def test_a_calibration_past_its_budget_keeps_the_default(
    tiny_gpt2_models, tmp_path, monkeypatch
) -> None:
    from fastpilot.backends import llamacpp_tuning

    monkeypatch.setattr(llamacpp_tuning, "BUDGET_S", 0.0)  # every probe ends past it
    b = _backend(tiny_gpt2_models["gguf-f32"], tmp_path)
    try:
        k = b.info.extra["kernels"]
        assert (k["flash_attn"], k["source"]["flash_attn"]) == ("on", "default")
        assert k["calibration"]["over_budget"] is True and k["calibration"]["probes"] == []
        assert not list(tmp_path.glob("kernels/*.json"))  # measured again next time
    finally:
        b.close()


def test_native_work_off_the_worker_runs_on_threads_that_end(
    tiny_gpt2_models, tmp_path, monkeypatch
):
    """libgomp keeps an OpenMP team per thread that ran llama.cpp and throttles every
    team's spin-wait once they outnumber the CPUs (tiny-py decoded at a third of its
    speed in a server that had calibrated on its loading thread): the calibration's
    probes and embeddings run on a thread of their own, which ends with them."""
    from fastpilot.backends import llamacpp_native, llamacpp_tuning

    ran: list[threading.Thread] = []
    real_probe, real_embed = llamacpp_tuning.probe, llamacpp_native.Embedder.embed

    def probe(*a, **kw):
        ran.append(threading.current_thread())
        return real_probe(*a, **kw)

    def embed(self, ids):
        ran.append(threading.current_thread())
        return real_embed(self, ids)

    monkeypatch.setattr(llamacpp_tuning, "probe", probe)
    monkeypatch.setattr(llamacpp_native.Embedder, "embed", embed)
    b = _backend(tiny_gpt2_models["gguf-f32"], tmp_path)
    try:
        assert ran and {t.name for t in ran} == {"fastpilot-calibration"}
        assert len(set(ran)) == 1 and not ran[0].is_alive()
        ran.clear()
        vectors = b.embed(["def f(x):", "return x"])
        assert len(vectors) == 2 and all(len(v) == len(vectors[0]) > 0 for v in vectors)
        assert [t.name for t in ran] == ["fastpilot-embed"] * 2 and not ran[0].is_alive()
        assert threading.current_thread() not in ran
    finally:
        b.close()


def test_an_idle_worker_holds_no_openmp_team(tiny_gpt2_models, tmp_path) -> None:
    """Each backend's worker frees its OpenMP team when it goes idle: a team kept for the
    worker's life made a second llama.cpp backend in the process (two teams, more threads
    than CPUs) throttle both (tiny-py: 327-351 tok/s alone, 97-109 beside a backend that
    had decoded once). With 2 threads a team is the worker plus one libgomp thread, which
    is there after a request and gone once the worker idles; the next request works."""
    import time
    from pathlib import Path as P

    from fastpilot.backends.llamacpp_native import release_openmp_team

    def threads() -> int:
        return len(list(P("/proc/self/task").iterdir()))

    release_openmp_team()  # this thread's own team, if an earlier test made one here
    b = _backend(tiny_gpt2_models["gguf-f32"], tmp_path, threads=2, slots=1)
    try:
        before = threads()
        got = [
            s.token_id
            for s in b.submit(
                GenerationRequest([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
            )
        ]
        assert len(got) == 4
        deadline = time.monotonic() + 30
        while threads() > before and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker idles right after the last token
        assert threads() == before
        again = [
            s.token_id
            for s in b.submit(
                GenerationRequest([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
            )
        ]
        assert again == got
    finally:
        b.close()
