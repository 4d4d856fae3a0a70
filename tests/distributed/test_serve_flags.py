"""`tfjax serve`'s multi-host flags are checked before `jax.distributed` starts: a bad
combination is a one-line UserError, never a hang waiting for a coordinator."""

from __future__ import annotations

import argparse
import re

import pytest

from models.errors import UserError
from serving import serve_cmd


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cmd.add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_one_process_needs_no_coordinator() -> None:
    assert serve_cmd._join_cluster(serve_args()) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-processes", "2"], "need --coordinator-address"),
        (["--process-id", "1"], "need --coordinator-address"),
        (["--coordinator-address", "nohost", "--num-processes", "2"], "HOST:PORT"),
        (["--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
         "process_id must be in [0, 2)"),
        (["--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
          "--worker-timeout-s", "0"], "worker_timeout_s must be > 0"),
        (["--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
          "--step-timeout-s", "0"], "step_timeout_s must be > 0"),
    ],
)  # fmt: skip
def test_bad_multihost_flags_are_user_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        serve_cmd._join_cluster(serve_args(*argv))
