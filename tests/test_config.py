"""Engine flags: a value out of range is one line for the user, not a traceback."""

from __future__ import annotations

import argparse

import pytest

from models.errors import UserError
from tfjax.config import EngineConfig, add_engine_arguments, engine_config_from_args


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(list(flags))


def test_flags_reach_the_config() -> None:
    config = engine_config_from_args(parse("--long-prefill-token-threshold", "128"))
    assert config.long_prefill_token_threshold == 128
    assert engine_config_from_args(parse()) == EngineConfig()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--long-prefill-token-threshold", "-1"), "long_prefill_token_threshold must be >= 0"),
        (("--max-batch-size", "0"), "max_batch_size must be >= 1"),
        (("--page-size", "12"), "page_size must be a power of two"),
    ],
)
def test_out_of_range_flags_are_user_errors(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(UserError, match=message):
        engine_config_from_args(parse(*flags))
