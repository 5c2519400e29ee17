"""The short lane: a second llama.cpp context with flash attention on, for short requests.

The rules (crossover from the calibration probes, which requests the lane takes) are pure
functions; the backend tests run the real llama.cpp on the tiny GPT-2 GGUF with the main
context's flash attention off and a lane forced, so they do not depend on what a
calibration on a busy CPU measures.
"""

from __future__ import annotations

import threading

import pytest

from fastpilot.backends.base import GenerationRequest, SamplingParams
from fastpilot.backends.llamacpp_probe import Probe
from fastpilot.backends.llamacpp_tuning import (
    SHORT_LANE_MIN,
    KernelChoice,
    ShortLane,
    Source,
    flash_faster_below,
    short_lane_for,
)
from fastpilot.settings import SettingsError, load_settings


def _probe(on: bool, short_ms: float, deep_ms: float, short: int = 16, deep: int = 256) -> Probe:
    return Probe(on, 512, "f16", short, deep, short_ms, deep_ms, 1.0)


def test_the_crossover_is_where_the_two_measured_lines_meet() -> None:
    # on: 6 ms at 16 cells, +4 ms over 240 cells; off: 7.5 ms, +0.6 ms.
    on, off = _probe(True, 6.0, 10.0), _probe(False, 7.5, 8.1)
    below = flash_faster_below(on, off)
    assert below == 16 + int(1.5 / (4.0 / 240 - 0.6 / 240))  # 121
    slope_on, slope_off = 4.0 / 240, 0.6 / 240
    assert 6.0 + slope_on * (below - 16) == pytest.approx(7.5 + slope_off * (below - 16), abs=0.02)
    assert flash_faster_below(_probe(True, 8.0, 9.0), off) == 0  # on slower at a short KV
    assert flash_faster_below(_probe(True, 6.0, 6.5), off) == 256  # on never loses in range


def test_the_crossover_follows_the_steps_timed_between_short_and_deep() -> None:
    # Flash attention's step time is flat, then steep (CodeGen-350M measured on / off
    # 0.94 at 16 cells, 0.92 at 64, 1.02 at 128, 1.42 at 256): the crossover lies between
    # the last depth on was faster and the next, not where the 16-256 line puts it.
    on = Probe(True, 512, "f16", 16, 256, 6.0, 12.0, 1.0, ((64, 6.2), (128, 7.0)))
    off = Probe(False, 512, "f16", 16, 256, 7.5, 8.1, 1.0, ((64, 7.6), (128, 7.7)))
    assert flash_faster_below(on, off) == 128 + int(128 * 0.7 / (0.7 + 3.9))  # 147
    two_points = flash_faster_below(_probe(True, 6.0, 12.0), _probe(False, 7.5, 8.1))
    assert two_points == 16 + int(240 * 1.5 / (1.5 + 3.9))  # 82: the line alone
    # Slower at a middle depth already: the first crossing counts.
    mid_slow = Probe(True, 512, "f16", 16, 256, 6.0, 7.0, 1.0, ((64, 7.8), (128, 7.2)))
    assert flash_faster_below(mid_slow, off) == 16 + int(48 * 1.5 / (1.5 + 0.2))  # 58
    # Faster everywhere: the last segments are extended past the deep point.
    on_fast = Probe(True, 512, "f16", 16, 256, 6.0, 7.9, 1.0, ((64, 6.2), (128, 6.6)))
    assert flash_faster_below(on_fast, off) == 256 + int(0.2 / ((1.3 - 0.4) / 128))  # 284


def _kernels(flash: bool | None, source: Source, below: int | None) -> KernelChoice:
    calibration = {} if below is None else {"flash_faster_below": below}
    return KernelChoice(
        flash, 1024, 512, 2, 2, "f16", sources={"flash_attn": source}, calibration=calibration
    )


def test_a_lane_only_beside_a_flash_off_context_and_sized_by_the_crossover() -> None:
    calibrated_off = _kernels(False, Source.CALIBRATED, 127)
    assert short_lane_for(calibrated_off, 1024, None) == ShortLane(127, 256)
    assert short_lane_for(_kernels(False, Source.CALIBRATED, 300), 1024, None) == ShortLane(
        300, 768
    )
    assert short_lane_for(_kernels(False, Source.CALIBRATED, 300), 512, None) == ShortLane(
        300, 512
    )  # never more cells than a slot of the main context
    assert short_lane_for(calibrated_off, 1024, 0) is None  # --short-lane 0
    low = _kernels(False, Source.CALIBRATED, SHORT_LANE_MIN - 1)
    assert short_lane_for(low, 1024, None) is None  # not worth a second context
    assert short_lane_for(_kernels(True, Source.CALIBRATED, 127), 1024, None) is None
    assert short_lane_for(_kernels(None, Source.LLAMA_CPP, None), 1024, None) is None  # GPU
    user_off = _kernels(False, Source.USER, None)
    assert short_lane_for(user_off, 1024, None) is None  # nothing measured
    assert short_lane_for(user_off, 1024, 64) == ShortLane(64, 256)  # asked for


def test_which_requests_the_lane_takes() -> None:
    lane = ShortLane(cells=100, context=256)
    # Both contexts idle (or both busy): the mean depth decides.
    assert lane.takes(20, 128, False, False)  # 20 + 64 <= 100
    assert not lane.takes(40, 128, False, False)  # 40 + 64 > 100
    assert lane.takes(40, 128, True, True) is False
    # One busy: a request that fits joins it rather than start a second decode per step.
    assert lane.takes(40, 128, False, True)
    assert not lane.takes(20, 16, True, False)
    # Never past the lane's context.
    assert not lane.takes(200, 100, False, True)
    assert lane.takes(156, 100, False, True)


def test_the_short_lane_flag() -> None:
    assert load_settings([], environ={}).short_lane is None
    assert load_settings(["--short-lane", "0"], environ={}).short_lane == 0
    with pytest.raises(SettingsError, match="--short-lane"):
        load_settings(["--short-lane", "-1"], environ={}).check()


# --------------------------------------------------------------------------- backend


def _backend(path, tmp_path, **kw):
    from fastpilot.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(path, threads=1, kernel_cache=tmp_path, speculative="off", **kw)


def _lanes_of_decodes(b) -> list[str]:
    """Patch ``b`` to record which context every ``llama_decode`` ran on."""
    seen: list[str] = []
    decode = b._decode

    def recording(lane, entries):  # the worker thread
        seen.append("short" if lane is b._short else "main")
        return decode(lane, entries)

    b._decode = recording
    return seen


def _run(b, prompt: list[int], max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=3)
    return list(b.submit(GenerationRequest(prompt, params)))


def _same_steps(a, b) -> None:
    assert [s.token_id for s in a] == [s.token_id for s in b]
    for x, y in zip(a, b, strict=True):
        assert y.logprob == pytest.approx(x.logprob, abs=1e-4)


def test_short_requests_decode_with_flash_attention_long_ones_without(
    tiny_gpt2_models, tmp_path
) -> None:
    path = tiny_gpt2_models["gguf-f32"]
    lane = _backend(path, tmp_path, flash_attn="off", short_lane=64)
    flash_on = _backend(path, tmp_path, flash_attn="on", short_lane=0)
    flash_off = _backend(path, tmp_path, flash_attn="off", short_lane=0)
    try:
        # The tiny model's slots hold 128 cells: the lane holds no more.
        assert lane.short_lane == ShortLane(64, 128)
        lane_json = {"flash_attn": "on", "cells": 64, "context": 128}
        assert lane.info.extra["kernels"]["short_lane"] == lane_json  # /v1/models shows it
        assert flash_on.short_lane is flash_off.short_lane is None
        assert flash_off.info.extra["kernels"]["short_lane"] is None
        seen = _lanes_of_decodes(lane)
        short, long_ = list(range(5, 15)), list(range(5, 105))
        got_short = _run(lane, short, 24)  # mean depth 10 + 12 < 64
        assert seen and set(seen) == {"short"}
        _same_steps(_run(flash_on, short, 24), got_short)
        seen.clear()
        got_long = _run(lane, long_, 8)  # 100 + 4 > 64
        assert seen and set(seen) == {"main"}
        _same_steps(_run(flash_off, long_, 8), got_long)
        # The lanes' prompt caches are their own; the counters add up over both.
        stats = lane.stats()
        assert stats["prompt_tokens_evaluated"] == len(short) + len(long_)
    finally:
        for b in (lane, flash_on, flash_off):
            b.close()


def test_a_short_request_joins_the_busy_main_context(tiny_gpt2_models, tmp_path) -> None:
    """Two busy contexts cost two decodes a step: a request that fits the main context
    while only that one has work goes there, even when it is short."""
    b = _backend(tiny_gpt2_models["gguf-f32"], tmp_path, flash_attn="off", short_lane=64)
    try:
        seen = _lanes_of_decodes(b)
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        short = GenerationRequest(list(range(5, 15)), params)
        with b._cond:  # the worker takes both at once: the long one is routed first
            streams = [b.submit(GenerationRequest(list(range(5, 105)), params)), b.submit(short)]
        outs: list[list] = [[], []]
        threads = [
            threading.Thread(target=outs[i].extend, args=(s,)) for i, s in enumerate(streams)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [len(o) for o in outs] == [24, 24]
        assert seen and set(seen) == {"main"}
        assert b._short is not None and not b._short.sched.busy
        # Alone, the same short request goes to the lane.
        seen.clear()
        assert len(list(b.submit(short))) == 24
        assert seen and set(seen) == {"short"}
    finally:
        b.close()


def test_the_models_listing_and_the_startup_line_say_the_lane(tiny_gpt2_models) -> None:
    import falcon.testing

    from fastpilot.app import create_app
    from fastpilot.models import Registry
    from fastpilot.serve import load_models
    from fastpilot.settings import Settings
    from tests.test_api_support import LOCAL

    model = f"g={tiny_gpt2_models['gguf-f32']}"
    settings = Settings(model=(model,), threads=1, flash_attn="off", short_lane=64)
    registry, said = Registry(), []
    load_models(settings, registry, say=said.append)
    try:
        client = falcon.testing.TestClient(create_app(settings, registry), headers=dict(LOCAL))
        k = client.simulate_get("/v1/models/g").json["kernels"]
        assert k["short_lane"] == {"flash_attn": "on", "cells": 64, "context": 128}
        assert "; short lane: flash_attn on below 64 cells (128 per slot)" in said[-1]
    finally:
        registry.close_all()
