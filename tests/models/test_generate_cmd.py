"""`tfjax generate`: flags, streaming output and the one-line error for a bad model path."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from models.errors import ModelLoadError
from serving import generate_cmd


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tfjax")
    generate_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_flags_and_defaults() -> None:
    args = _parse(["generate", "--prompt", "hi"])
    assert (args.model, args.max_tokens, args.chat, args.dtype) == ("default", 64, False, None)
    assert args.run is generate_cmd.run


def test_missing_model_raises_model_load_error(tmp_path: Path) -> None:
    args = _parse(["generate", "--model", "/nonexistent", "--prompt", "hi"])
    with pytest.raises(ModelLoadError, match="/nonexistent does not exist"):
        args.run(args)


def test_cli_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture) -> None:
    from serving import cli

    assert cli.main(["generate", "--model", "/nonexistent", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/nonexistent does not exist" in err


def test_generate_streams_text(
    tiny_qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = _parse(
        ["generate", "--model", str(tiny_qwen2_dir), "--prompt", "hello", "--max-tokens", "5"]
    )
    args.cache_dir = tmp_path
    assert args.run(args) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_takes_the_engine_flags_serve_takes() -> None:
    args = _parse(
        ["generate", "--prompt", "hi", "--attention-backend", "tpu", "--tensor-parallel", "2"]
    )
    assert (args.attention_backend, args.tensor_parallel) == ("tpu", 2)


@pytest.mark.slow  # the Pallas kernels interpreted on CPU: ~30 s per backend
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernel_backends_give_the_cpu_backends_greedy_text(
    backend: str, tiny_qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def text(name: str) -> str:
        argv = ["generate", "--model", str(tiny_qwen2_dir), "--prompt", "hello"]
        args = _parse([*argv, "--max-tokens", "4", "--attention-backend", name])
        args.cache_dir = tmp_path
        assert args.run(args) == 0
        return capsys.readouterr().out

    assert text(backend) == text("cpu")
