"""`tfjax bench`: every command is reachable from the console script and its --help says what
it measures (its module docstring) with the defaults."""

from __future__ import annotations

import pytest

from serving.cli import main as tfjax
from tfjax.bench.cli import COMMANDS


@pytest.mark.parametrize(
    "argv",
    [[name] for name in COMMANDS]
    + [["engine", "tp"], ["engine", "xla-cpu"], ["engine", "pieces"], ["sim", "sched"]],
    ids=lambda argv: " ".join(argv),
)
def test_every_command_has_a_help_with_its_defaults(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tfjax(["bench", *argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: tfjax bench {' '.join(argv)}" in text
    assert "(default:" in text


@pytest.mark.parametrize("command", ["generate", "serve", "simulate", "calibrate", "bench"])
def test_every_tfjax_command_prints_its_help(command: str, capsys) -> None:
    """A help string's %(default) on a flag whose default a command overrides with None once
    crashed `tfjax simulate --help`."""
    with pytest.raises(SystemExit) as exit_info:
        tfjax([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: tfjax {command}" in capsys.readouterr().out


def test_the_bench_help_lists_the_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        tfjax(["bench", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in COMMANDS)


def test_serve_dry_run_prints_the_workload_and_sends_nothing(capsys) -> None:
    argv = ["bench", "serve", "--base-url", "http://127.0.0.1:9", "--dry-run"]
    assert tfjax([*argv, "--num-prompts", "5", "--request-rate", "2"]) == 0
    err = capsys.readouterr().err
    assert '"num_requests": 5' in err


def test_vllm_client_flags_carry_over() -> None:
    from tfjax.bench.flags import client_config
    from tfjax.bench.serve import build_parser

    def config(*argv: str):
        return client_config(build_parser().parse_args(list(argv)), "http://h/", "m")

    assert config().endpoint == "/v1/completions" and config().ignore_eos
    assert config("--backend", "openai-chat").endpoint == "/v1/chat/completions"
    assert config("--backend", "openai-chat", "--endpoint", "/v2/x").endpoint == "/v2/x"
    assert config("--ignore-eos").ignore_eos and not config("--no-ignore-eos").ignore_eos
    assert config().base_url == "http://h"


def test_random_range_ratio_sets_uniform_lengths() -> None:
    from models.errors import UserError
    from tfjax.bench.flags import requests_from_args
    from tfjax.bench.serve import build_parser

    def lengths(*argv: str) -> set[int]:
        args = build_parser().parse_args(["--num-prompts", "200", *argv])
        return {r.prompt_len for r in requests_from_args(args)}

    assert lengths("--random-input-len", "40", "--random-range-ratio", "0.5") <= set(range(20, 61))
    assert lengths("--random-input-len", "40", "--random-range-ratio", "0") == {40}
    with pytest.raises(UserError, match="random-range-ratio"):
        lengths("--random-input-len-std", "2", "--random-range-ratio", "0.5")


def test_an_unreachable_server_is_one_line_not_a_traceback(capsys) -> None:
    argv = ["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"]
    assert tfjax(argv) == 2
    err = capsys.readouterr().err
    assert "tfjax: error: no model listed at http://127.0.0.1:9/v1/models" in err


def test_python_m_tfjax_bench_runs_without_the_server_modules() -> None:
    """What scripts/gpu_check.sh runs on a bare image."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "tfjax.bench", "gpu-check", "--help"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0 and "usage: tfjax bench gpu-check" in result.stdout
    probe = (
        "import sys, tfjax.bench.cli as cli\n"
        "try:\n    cli.main(['gpu-check', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('imported serving:', any(m.startswith('serving') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True)
    assert result.stdout.strip().endswith("imported serving: False")
