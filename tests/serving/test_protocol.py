"""Request parsing details that the HTTP tests do not show."""

from __future__ import annotations

import pytest

from serving import protocol as p
from serving.errors import APIError


def test_batch_of_one_is_unwrapped() -> None:
    assert p.parse_completion({"prompt": ["hi"]})[0] == "hi"
    assert p.parse_completion({"prompt": [[1, 2]]})[0] == [1, 2]


def test_openai_defaults() -> None:
    _, options = p.parse_completion({"prompt": "hi"})
    assert (options.temperature, options.top_p, options.top_k) == (1.0, 1.0, 0)
    assert (options.stream, options.include_usage, options.max_tokens) == (False, False, None)
    assert options.consumption_rate is None and options.priority == 0


def test_top_k_minus_one_means_no_cut() -> None:
    assert p.parse_completion({"prompt": "hi", "top_k": -1})[1].top_k == 0


def test_max_completion_tokens_wins() -> None:
    _, options = p.parse_chat(
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 5,
            "max_completion_tokens": 9,
        }
    )
    assert options.max_tokens == 9


def test_assistant_content_may_be_null() -> None:
    messages, _ = p.parse_chat({"messages": [{"role": "assistant", "content": None}]})
    assert messages == [{"role": "assistant", "content": ""}]


def test_seed_is_folded_into_uint32() -> None:
    _, options = p.parse_completion({"prompt": "hi", "seed": -1})
    sampling = p.sampling_params(
        options, num_prompt_tokens=2, max_model_len=64, default_max_tokens=16
    )
    assert sampling.seed == 2**32 - 1


def test_prompt_filling_the_context_is_rejected() -> None:
    _, options = p.parse_chat({"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(APIError) as err:
        p.sampling_params(options, num_prompt_tokens=64, max_model_len=64, default_max_tokens=None)
    assert (err.value.status, err.value.param) == (400, "prompt")
    sampling = p.sampling_params(
        options, num_prompt_tokens=63, max_model_len=64, default_max_tokens=None
    )
    assert sampling.max_tokens == 1


def test_penalties_reach_the_sampling_params() -> None:
    body = {
        "prompt": "hi",
        "presence_penalty": 0.5,
        "frequency_penalty": -1,
        "repetition_penalty": 1.2,
        "min_p": 0.05,
        "logit_bias": {"50": -100, "7": 2.5},
    }
    _, options = p.parse_completion(body)
    sampling = p.sampling_params(
        options, num_prompt_tokens=2, max_model_len=64, default_max_tokens=16
    )
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -1.0)
    assert (sampling.repetition_penalty, sampling.min_p) == (1.2, 0.05)
    assert sampling.logit_bias == ((7, 2.5), (50, -100.0))
    assert sampling.has_penalties


def test_requests_without_penalties_have_none() -> None:
    _, options = p.parse_completion({"prompt": "hi", "presence_penalty": 0, "logit_bias": {}})
    sampling = p.sampling_params(
        options, num_prompt_tokens=2, max_model_len=64, default_max_tokens=16
    )
    assert not sampling.has_penalties
