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
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
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
        ({"prompt": ["a", "b"]}, "prompt"),
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
