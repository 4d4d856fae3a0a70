"""`tfjax simulate`: run a workload file through the engine on a profile's cost model.

    tfjax simulate --profile NAME_OR_PATH --workload W.json --policy P [engine flags] --out R.json
        [--replicas N --route round_robin|power_of_two] [--seed S]

The engine is the one `tfjax serve` runs (`tfjax.sim.simulate`), on a virtual clock. The
profile (a built-in name or a `tfjax calibrate` file) supplies the step costs, the link
bandwidths and the default engine flags (KV pools, batch cap, prefill budget); any engine
flag given here overrides them. Prompts in the file are token ids (or lengths); outputs run
to `max_tokens`. The summary is printed and the result file written. `--replicas N` puts N
such engines behind a router (the policies `vllm-router` calls round_robin and power_of_two).
`--seed` draws the step costs of a profile measured with step noise (`step_noise_sigma`) and
the power_of_two router's picks: one run is one draw.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.errors import UserError

# This command's own flags; every other one is an engine flag, defaulting to the profile's.
OWN_FLAGS = ("profile", "workload", "out", "help", "policy", "replicas", "route", "seed")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from tfjax.config import add_engine_arguments  # lazily, as serve_cmd: it imports JAX

    parser = subparsers.add_parser(
        "simulate", help="simulate a workload file on a cost profile (the real engine)"
    )
    parser.add_argument("--profile", required=True, help="built-in profile name or JSON file")
    parser.add_argument("--workload", required=True, type=Path, help="workload JSON file")
    parser.add_argument("--out", required=True, type=Path, help="result JSON file")
    parser.add_argument(
        "--replicas", type=int, default=1, help="engines behind a router (default 1)"
    )
    parser.add_argument(
        "--route",
        choices=("round_robin", "power_of_two"),
        default="round_robin",
        help="how the router picks a replica per request, as vllm-router names its policies",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="draws step-cost noise and router picks (default 0)"
    )
    add_engine_arguments(parser)
    # Engine flags default to the profile's values: only flags given on the command line count.
    for action in parser._actions:
        if action.dest not in OWN_FLAGS:
            action.default = None
    parser.set_defaults(run=run, offload=None, write_through=None, overlap=None)
    parser.set_defaults(prefix_cache=None)


def run(args: argparse.Namespace) -> int:
    from tfjax.config import engine_config_from_args
    from tfjax.sched.registry import make_policy
    from tfjax.sim import engine_config, simulate
    from tfjax.sim.driver import result_json
    from tfjax.sim.profiles import load_profile
    from tfjax.sim.workload import load_workload_file

    try:
        profile = load_profile(args.profile)
        requests = load_workload_file(args.workload)
        config = engine_config_from_args(args, engine_config(profile))
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.replicas < 1:
        raise UserError("--replicas must be >= 1")
    policy = make_policy(config.policy, **config.policy_params)
    result = simulate(
        policy,
        requests,
        profile,
        config,
        replicas=args.replicas,
        route=args.route,
        seed=args.seed,
    )
    report = result_json(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report))
    json.dump(report["summary"], sys.stdout, indent=1)
    print()
    return 0
