"""CompletionRequest.from_dict: every error names its param; query strings coerce."""

from __future__ import annotations

import pytest

from fastpilot.engine.params import CompletionRequest, ContextMode, Limits
from fastpilot.errors import InvalidRequest


def test_query_string_values_coerce() -> None:
    req = CompletionRequest.from_dict(
        {
            "prompt": "def f",
            "max_tokens": "32",
            "n": "4",
            "temperature": "0.9",
            "echo": "false",
            "stream": "true",
            "logprobs": "2",
            "seed": "42",
            "logit_bias": {"50256": "-100"},
        }
    )
    assert (req.max_tokens, req.n, req.temperature, req.echo, req.stream) == (
        32,
        4,
        0.9,
        False,
        True,
    )
    assert req.logprobs == 2 and req.seed == 42
    assert req.logit_bias == ((50256, -100.0),)


def test_defaults_and_unknown_keys_ignored() -> None:
    req = CompletionRequest.from_dict(
        {"prompt": "x", "nwo": "a/b", "extra": {"language": "python"}}
    )
    assert req.max_tokens == 16 and req.temperature == 1.0 and req.n == 1
    assert req.context_mode is ContextMode.TRUNCATE


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": "lots"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"n": 0}, "n"),
        ({"n": 99}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
        ({"echo": "maybe"}, "echo"),
        ({"stop": 5}, "stop"),
        ({"stop": [f"s{i}" for i in range(33)]}, "stop"),
        ({"stop": ["x" * 300]}, "stop"),
        ({"logprobs": 9}, "logprobs"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"prompt": "x", "n_indent": -1}, "n_indent"),
        ({"t_max_predict_ms": "soon"}, "t_max_predict_ms"),
        ({"extra": {"trim_by_indentation": "maybe"}}, "extra.trim_by_indentation"),
        ({"suffix": 3}, "suffix"),
        ({"stream_options": "x"}, "stream_options"),
        ({"stream_options": {"include_usage": "perhaps"}}, "stream_options.include_usage"),
        ({"timeout": 0}, "timeout"),
        ({"seed": "abc"}, "seed"),
        ({"user": 1}, "user"),
        ({"min_tokens": -1}, "min_tokens"),
    ],
)
def test_every_error_names_its_param(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        CompletionRequest.from_dict({"prompt": "x", **body})
    assert err.value.param == param
    assert err.value.status == 400
    assert param.split(".")[0] in err.value.message


def test_limits_apply() -> None:
    with pytest.raises(InvalidRequest) as err:
        CompletionRequest.from_dict({"max_tokens": 100}, limits=Limits(max_tokens=50))
    assert err.value.param == "max_tokens"


def test_prompt_forms() -> None:
    assert CompletionRequest.from_dict({"prompt": ["hi"]}).prompt == "hi"
    assert CompletionRequest.from_dict({"prompt": [1, 2, 3]}).prompt == (1, 2, 3)
    assert CompletionRequest.from_dict({"prompt": [[4, 5]]}).prompt == (4, 5)


def test_stop_single_string_and_dedup() -> None:
    assert CompletionRequest.from_dict({"stop": "\n"}).stop == ("\n",)
    assert CompletionRequest.from_dict({"stop": ["a", "a", ""]}).stop == ("a",)


def test_truncate_flag_picks_context_mode() -> None:
    req = CompletionRequest.from_dict({"truncate": "false"})
    assert req.context_mode is ContextMode.ERROR
    req = CompletionRequest.from_dict({}, context_mode=ContextMode.ERROR)
    assert req.context_mode is ContextMode.ERROR
    req = CompletionRequest.from_dict({"truncate": True}, context_mode=ContextMode.ERROR)
    assert req.context_mode is ContextMode.TRUNCATE


def test_sampling_offsets_seed_per_sequence() -> None:
    req = CompletionRequest.from_dict({"seed": 10, "n": 3, "logprobs": 2})
    assert [req.sampling(i).seed for i in range(3)] == [10, 11, 12]
    assert req.sampling(0).logprobs == 2
    assert CompletionRequest.from_dict({}).sampling(1).seed is None


def test_chat_style_logprobs_true() -> None:
    assert CompletionRequest.from_dict({"logprobs": True}).logprobs == 0
    assert CompletionRequest.from_dict({"logprobs": False}).logprobs is None


def test_omitted_max_tokens_never_exceeds_the_server_cap():
    from fastpilot.engine.params import CompletionRequest, Limits

    assert CompletionRequest.from_dict({"prompt": "x"}).max_tokens == 16
    assert CompletionRequest.from_dict({"prompt": "x"}, limits=Limits(max_tokens=8)).max_tokens == 8


def test_sampling_params_are_the_request_fields_of_the_same_name() -> None:
    import dataclasses

    from fastpilot.backends.base import SamplingParams

    # Same defaults: a field added to SamplingParams without a request field (or with
    # another default) fails here instead of being copied by hand.
    assert CompletionRequest().sampling() == SamplingParams()
    req = CompletionRequest.from_dict(
        {
            "max_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 3,
            "min_tokens": 2,
            "logprobs": 4,
            "logit_bias": {"5": 1},
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "repetition_penalty": 1.3,
            "seed": 1,
            "ignore_eos": True,
        }
    )
    got = req.sampling(0)
    for f in dataclasses.fields(SamplingParams):
        if f.name == "token_logprob":  # no request field: the engine sets it (Run)
            assert got.token_logprob is True
            continue
        assert getattr(got, f.name) == getattr(req, f.name), f.name


def test_many_stop_strings_and_the_cap() -> None:
    stops = [f"s{i}" for i in range(32)]
    assert CompletionRequest.from_dict({"stop": stops}).stop == tuple(stops)
    with pytest.raises(InvalidRequest) as err:
        CompletionRequest.from_dict({"stop": stops[:5]}, limits=Limits(max_stop=4))
    assert err.value.param == "stop" and "--max-stop" in err.value.message


def test_several_prompts() -> None:
    req = CompletionRequest.from_dict({"prompt": ["a", "b"], "n": 2})
    assert req.prompts == ("a", "b") and req.prompt == "a"
    assert req.for_prompt(1).prompts == ("b",) and req.for_prompt(1).prompt == "b"
    req = CompletionRequest.from_dict({"prompt": [[1, 2], [3]]})
    assert req.prompts == ((1, 2), (3,))
    with pytest.raises(InvalidRequest) as err:
        CompletionRequest.from_dict({"prompt": ["a"] * 5, "n": 4})
    assert err.value.param == "prompt" and "--max-n" in err.value.message


def test_copilot_block_trimming_becomes_n_indent() -> None:
    extra = {"language": "python", "next_indent": 4, "trim_by_indentation": True}
    assert CompletionRequest.from_dict({"extra": extra}).n_indent == 5
    extra["trim_by_indentation"] = False
    assert CompletionRequest.from_dict({"extra": extra}).n_indent == 0
    req = CompletionRequest.from_dict({"n_indent": "2", "t_max_predict_ms": "250"})
    assert (req.n_indent, req.t_max_predict_ms) == (2, 250.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (1, True),
        ("1", True),
        ("TRUE", True),
        (" yes", True),
        ("on", True),
        (False, False),
        (0, False),
        ("0", False),
        ("false", False),
        ("", False),
        ("off", False),
    ],
)
def test_one_boolean_reading(value, expected) -> None:
    from fastpilot.engine.coerce import coerce_bool

    assert coerce_bool(value, "stream", None) is expected
    assert CompletionRequest.from_dict({"stream": value}).stream is expected
