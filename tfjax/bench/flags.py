"""The flags that `tfjax bench serve` and `tfjax bench compare` share, named as
`vllm bench serve` names them where they mean the same, so a user's scripts carry over.

- Arrivals: `--request-rate` (requests/s; `inf`, the default, sends all `--num-prompts` at once
  as one burst) and `--burstiness` (vLLM's gamma shape k: 1 is Poisson, < 1 burstier), or
  `--trace-file` to replay an Azure or BurstGPT trace.
- Lengths: `--random-input-len`, `--random-output-len` (means of normal laws; the `-std` flags
  set their spread, mean / 4 by default, so lengths are mixed; or `--random-range-ratio` r,
  vLLM's uniform law over mean x [1 - r, 1 + r]), `--random-prefix-len` (tokens every prompt
  shares).
- Reading: `--rate-mix`, the declared consumption rates and their shares (TokenFlow's
  extension; `--no-extensions` sends none, for servers that reject unknown fields).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from models.errors import UserError
from tfjax.bench.client import CHAT_COMPLETIONS, COMPLETIONS, ClientConfig
from tfjax.bench.workload import ClientRequest, read_trace, synthetic_requests, trace_requests
from tfjax.sim.workload import LengthDist

DEFAULT_NUM_PROMPTS = 32
BACKEND_ENDPOINTS = {"openai": COMPLETIONS, "vllm": COMPLETIONS, "openai-chat": CHAT_COMPLETIONS}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as the description, and every flag's default (argparse shows
    defaults only beside a help text, so a flag without one gets its default as its help)."""

    def _format_action(self, action: argparse.Action) -> str:
        shown = action.default not in (None, argparse.SUPPRESS)
        if action.option_strings and not action.help and shown and type(action.default) is not bool:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help=f"requests (default {DEFAULT_NUM_PROMPTS}; with --trace-file: a cap, default none)",
    )
    g.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s; inf: one burst"
    )
    g.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape k: 1 Poisson, < 1 burstier"
    )
    g.add_argument("--random-input-len", type=int, default=128, help="mean prompt tokens")
    g.add_argument("--random-input-len-std", type=float, default=None, help="default: mean / 4")
    g.add_argument("--random-output-len", type=int, default=128, help="mean output tokens")
    g.add_argument("--random-output-len-std", type=float, default=None, help="default: mean / 4")
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=None,
        help="as vllm bench serve: lengths uniform within mean x [1 - r, 1 + r], 0 <= r < 1 "
        "(instead of the normal laws and their -std flags)",
    )
    g.add_argument("--random-prefix-len", type=int, default=0, help="tokens all prompts share")
    g.add_argument(
        "--rate-mix", default="15:0.4,20:0.6", help="consumption rates (tokens/s) and their shares"
    )
    g.add_argument("--seed", type=int, default=0)
    t = parser.add_argument_group("trace replay (with --trace-file; --num-prompts caps it)")
    t.add_argument(
        "--trace-file",
        type=Path,
        default=None,
        help="CSV/JSONL with Azure (TIMESTAMP,ContextTokens,GeneratedTokens) or "
        "BurstGPT (Timestamp,Request tokens,Response tokens) columns",
    )
    t.add_argument("--trace-start", type=float, default=0.0, help="trace seconds to skip")
    t.add_argument("--trace-duration", type=float, default=None, help="trace seconds to keep")
    t.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival gaps")
    t.add_argument("--length-scale", type=float, default=1.0, help="multiply lengths")
    t.add_argument("--max-input-len", type=int, default=None, help="cap prompt lengths")
    t.add_argument("--max-output-len", type=int, default=None, help="cap output lengths")


def arrival_of(args: argparse.Namespace) -> str:
    """The arrival process the flags choose: burst, poisson, gamma or trace."""
    if args.trace_file is not None:
        return "trace"
    if math.isinf(args.request_rate):
        return "burst"
    return "poisson" if args.burstiness == 1.0 else "gamma"


def requests_from_args(args: argparse.Namespace) -> list[ClientRequest]:
    """The run's requests, the same for the same flags and seed."""
    arrival = arrival_of(args)
    if arrival == "trace":
        requests = trace_requests(
            read_trace(args.trace_file),
            start_s=args.trace_start,
            duration_s=args.trace_duration,
            limit=args.num_prompts,
            time_scale=args.time_scale,
            length_scale=args.length_scale,
            max_input_len=args.max_input_len,
            max_output_len=args.max_output_len,
            rate_mix=args.rate_mix,
            seed=args.seed,
        )
    else:
        requests = synthetic_requests(
            arrival=arrival,
            num_requests=args.num_prompts or DEFAULT_NUM_PROMPTS,
            input_len=_length(args.random_input_len, args.random_input_len_std, args),
            output_len=_length(args.random_output_len, args.random_output_len_std, args),
            request_rate=1.0 if arrival == "burst" else args.request_rate,
            burstiness=args.burstiness,
            rate_mix=args.rate_mix,
            seed=args.seed,
        )
    if args.random_prefix_len:
        prefix = args.random_prefix_len
        requests = [
            replace(r, prompt_len=r.prompt_len + prefix, shared_prefix_len=prefix) for r in requests
        ]
    return requests


def _length(mean: int, std: float | None, args: argparse.Namespace) -> LengthDist:
    try:
        return LengthDist(mean=mean, std=std, range_ratio=args.random_range_ratio)
    except ValueError as err:
        raise UserError(f"--random-range-ratio: {err}") from None


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("client")
    g.add_argument(
        "--backend",
        choices=sorted(BACKEND_ENDPOINTS),
        default="openai",
        help="vLLM's name for the API: openai (completions) or openai-chat",
    )
    g.add_argument("--endpoint", default=None, help="default: the --backend's")
    g.add_argument(
        "--prompt-mode",
        choices=["ids", "text"],
        default="ids",
        help="prompt as a token-id list, or as random words (about 1 token each)",
    )
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        default=True,
        help="force max_tokens (the default here; vLLM's flag, accepted)",
    )
    g.add_argument("--no-ignore-eos", action="store_false", dest="ignore_eos")
    g.add_argument(
        "--no-extensions",
        action="store_false",
        dest="extensions",
        help="send neither consumption_rate nor ignore_eos",
    )
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        help="JSON merged into every request body (vLLM's flag), e.g. "
        '\'{"response_format": {"type": "json_object"}}\'',
    )
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--max-concurrency", type=int, default=None, help="requests in flight")
    g.add_argument("--metric-percentiles", default="99", help="e.g. 50,90,99")
    g.add_argument("--disable-tqdm", action="store_false", dest="progress", help="no progress bar")


def client_config(args: argparse.Namespace, base_url: str, model: str) -> ClientConfig:
    return ClientConfig(
        base_url=base_url.rstrip("/"),
        model=model,
        endpoint=args.endpoint or BACKEND_ENDPOINTS[args.backend],
        prompt_mode=args.prompt_mode,
        ignore_eos=args.ignore_eos,
        extensions=args.extensions,
        temperature=args.temperature,
        request_timeout_s=args.request_timeout,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        extra_body=args.extra_body,
    )


def percentiles_of(args: argparse.Namespace) -> list[float]:
    return [float(p) for p in args.metric_percentiles.split(",") if p]


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of a run as strict JSON values (paths and `inf` as strings), stored with its
    result."""
    return {k: _json_value(v) for k, v in vars(args).items() if not callable(v)}


def _json_value(value: Any) -> Any:
    if isinstance(value, Path) or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    return value
