"""`EngineConfig`: every engine knob in one frozen, checked place, and its CLI flags.

Bucket lists fix every dynamic shape the runner compiles (design rule: "Every dynamic shape is
bucketed ... compiled at start-up"): decode rows and prefill tiles (QUERY_TILE-token rows) of
the one ragged call per step. There are no page-table width buckets: the attention backends
read only each row's own pages, so the table always has the longest row's width. The ablation
switches of the host tier (offload, write-through, load-evict overlap) live here too, so that
the paper's Table 2 can be repeated from the command line.
"""

from __future__ import annotations

import argparse
import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

from models.attention import BACKEND_NAMES, QUERY_TILE
from models.config import QUANTIZATION_HELP, QUANTIZATIONS
from models.errors import UserError
from tfjax.sched.registry import POLICY_NAMES

DEFAULT_CPU_KV_PAGES = 2048  # x16 tokens = 32k tokens; 1.5 GB for SmolLM2-135M in float32


def geometric_buckets(lo: int, hi: int, factor: int = 2) -> tuple[int, ...]:
    """lo, lo*f, lo*f^2, ... below hi, then hi: the bucket sizes of one dynamic dimension."""
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= factor
    out.append(hi)
    return tuple(out)


def ceil_bucket(buckets: Sequence[int], n: int) -> int:
    """The smallest of the sorted `buckets` that holds `n`."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


@dataclass(frozen=True, slots=True)
class Bucket:
    """The padded shape of a step: the runner compiles one executable per bucket, and a step
    costs what its bucket costs (the simulator charges it so too)."""

    tiles: int  # prefill rows of QUERY_TILE tokens
    rows: int  # decode rows

    @property
    def num_tokens(self) -> int:
        return self.tiles * QUERY_TILE + self.rows


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None  # None: sized from free device memory (fixed on CPU)
    max_model_len: int | None = None  # None: min(model context, 2048)
    max_batch_size: int = 32  # decode rows per step
    prefill_token_budget: int = 512  # prompt tokens per step (chunked prefill)
    long_prefill_token_threshold: int = 0  # cap on one long prompt's chunk per step; 0: none
    max_waiting: int = 1024  # waiting requests before new submits are rejected
    policy: str = "tokenflow"
    policy_params: dict[str, float] = field(default_factory=dict)
    default_consumption_rate: float = 15.0  # tokens/s, used when a request names none
    offload: bool = True  # keep preempted KV on the host (else: recompute only)
    write_through: bool = True  # copy new KV to the host continuously (else: on preempt)
    overlap: bool = True  # let loads run while evictions are in flight
    host_kv_gb: float = 4.0
    prefix_cache: bool = True  # share full KV pages between requests with equal prefixes
    device_memory_fraction: float = 0.8  # of free device memory given to KV when sizing
    tensor_parallel: int = 1  # devices the model and KV are sharded over (models.sharding)
    attention_backend: str = "auto"  # models.attention backend; auto: by jax.default_backend()
    compile_in_background: bool = True  # serve after the start-up buckets (tfjax.compile_plan)

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.prefill_token_budget < self.page_size:
            raise ValueError("prefill_token_budget must be at least one page")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0 (0: no cap)")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError("num_pages must be >= 2 (page 0 is the padding page)")
        if self.default_consumption_rate <= 0:
            raise ValueError("default_consumption_rate must be > 0")
        if self.tensor_parallel < 1:
            raise ValueError("tensor_parallel must be >= 1")
        if self.attention_backend not in BACKEND_NAMES:
            raise ValueError(f"attention_backend must be one of {BACKEND_NAMES}")

    def decode_batch_buckets(self) -> tuple[int, ...]:
        return geometric_buckets(1, self.max_batch_size)

    def prefill_tile_buckets(self) -> tuple[int, ...]:
        """Prefill rows of QUERY_TILE tokens per step, x4 steps up to the budget's tiles: the
        packer counts a chunk's partial last tile against the budget
        (`SchedulerView.prefill_tile_budget`), so no step needs more."""
        return geometric_buckets(1, -(-self.prefill_token_budget // QUERY_TILE), 4)

    def mixed_decode_buckets(self) -> tuple[int, ...]:
        """Decode rows of a step that also prefills: x4 steps from 8, since the tiles'
        tokens dominate such a step and every (tiles, rows) pair is a compile."""
        return geometric_buckets(min(8, self.max_batch_size), self.max_batch_size, 4)

    def step_buckets(self) -> list[Bucket]:
        """Every bucket: decode-only, prefill-only and mixed steps; mixed ones pad decode rows
        coarsely (the prefill tiles dominate their cost), which keeps the table small."""
        tiles, mixed = self.prefill_tile_buckets(), self.mixed_decode_buckets()
        return (
            [Bucket(0, r) for r in self.decode_batch_buckets()]
            + [Bucket(t, 0) for t in tiles]
            + [Bucket(t, r) for t in tiles for r in mixed]
        )

    def bucket_for(self, prefill_tokens: Sequence[int], num_decode: int) -> Bucket:
        """The bucket of a step with prefill chunks of `prefill_tokens` tokens (each padded
        to whole tiles) and `num_decode` decode rows."""
        decode, tile, mixed = self._bucket_lists
        tiles = sum(-(-n // QUERY_TILE) for n in prefill_tokens)
        if not tiles:
            return Bucket(0, ceil_bucket(decode, num_decode))
        rows = ceil_bucket(mixed, num_decode) if num_decode else 0
        return Bucket(ceil_bucket(tile, tiles), rows)

    @functools.cached_property
    def _bucket_lists(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Decode, tile and mixed-decode buckets, built once: `bucket_for` runs every step."""
        return self.decode_batch_buckets(), self.prefill_tile_buckets(), self.mixed_decode_buckets()


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `tfjax serve`, the benchmarks and (model flags) `tfjax generate`."""
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument("--policy", default=d.policy, choices=POLICY_NAMES, help="scheduling policy")
    g.add_argument(
        "--kv-pages",
        type=int,
        default=None,
        dest="num_pages",
        help=f"device KV pages (default: from free memory; {DEFAULT_CPU_KV_PAGES} on CPU)",
    )
    g.add_argument("--page-size", type=int, default=d.page_size, help="tokens per KV page")
    g.add_argument("--max-model-len", type=int, default=None, help="context length cap")
    g.add_argument(
        "--max-batch-size", type=int, default=d.max_batch_size, help="decode rows per step"
    )
    g.add_argument(
        "--prefill-token-budget",
        type=int,
        default=d.prefill_token_budget,
        help="prompt tokens per step",
    )
    g.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        default=d.long_prefill_token_threshold,
        help="a prompt with more tokens left than this prefills at most this many per step, so "
        "the prompts queued behind it share the prefill budget and streams that decode "
        "alongside (every policy but fcfs) keep going; as vLLM's flag of that name. 0: no cap "
        "(default); a multiple of 32 wastes no padding",
    )
    g.add_argument(
        "--max-waiting",
        type=int,
        default=d.max_waiting,
        help="waiting requests before new ones get 429",
    )
    g.add_argument(
        "--default-consumption-rate",
        type=float,
        default=d.default_consumption_rate,
        help=f"reading pace (tokens/s, default {d.default_consumption_rate:g}) assumed for a "
        "streamed request that sends no consumption_rate; buffer-aware policies may pause a "
        "stream that is ahead of it. Non-streaming requests read at the end and are never "
        "paused for their buffer",
    )
    g.add_argument(
        "--host-kv-gb",
        type=float,
        default=d.host_kv_gb,
        help="pinned host memory for the KV host tier",
    )
    g.add_argument(
        "--no-offload",
        action="store_false",
        dest="offload",
        help="preempt by recompute only (no host KV tier)",
    )
    g.add_argument(
        "--no-write-through",
        action="store_false",
        dest="write_through",
        help="copy KV to the host only when preempting (write-back)",
    )
    g.add_argument(
        "--no-overlap",
        action="store_false",
        dest="overlap",
        help="no loads while evictions are in flight",
    )
    g.add_argument(
        "--no-prefix-cache",
        action="store_false",
        dest="prefix_cache",
        help="recompute every prompt (no KV pages shared between requests)",
    )
    g.add_argument(
        "--tensor-parallel",
        type=int,
        default=d.tensor_parallel,
        help="shard the model and KV over this many local devices",
    )
    g.add_argument(
        "--attention-backend",
        default=d.attention_backend,
        choices=BACKEND_NAMES,
        help="attention kernels (auto: Pallas on GPU/TPU, blockwise JAX on CPU)",
    )
    g.add_argument(
        "--compile-all-first",
        action="store_false",
        dest="compile_in_background",
        help="compile every step bucket before serving (a slower start; by default serving "
        "starts once the three largest buckets are compiled and the rest compile when steps "
        "pad enough to need them or the engine is idle, steps running padded meanwhile)",
    )
    g.add_argument("--quantization", default=None, choices=QUANTIZATIONS, help=QUANTIZATION_HELP)
    g.add_argument(
        "--schedule-interval",
        type=float,
        default=None,
        help="tokenflow: seconds between rebalancing passes",
    )
    g.add_argument(
        "--buffer-conservativeness",
        type=float,
        default=None,
        help="tokenflow: safety factor mu of the preemption rule",
    )


def engine_config_from_args(
    args: argparse.Namespace, base: EngineConfig | None = None
) -> EngineConfig:
    """`base` (default `EngineConfig()`) with the engine flags `args` holds (not None)."""
    names = {f.name for f in fields(EngineConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in names and v is not None}
    policy_params = {
        key: value
        for key, value in (
            ("schedule_interval_s", getattr(args, "schedule_interval", None)),
            ("buffer_conservativeness", getattr(args, "buffer_conservativeness", None)),
        )
        if value is not None
    }
    if policy_params and kwargs.get("policy", EngineConfig.policy) != "tokenflow":
        raise UserError("--schedule-interval and --buffer-conservativeness need --policy tokenflow")
    try:
        return replace(base or EngineConfig(), **kwargs, policy_params=policy_params)
    except ValueError as err:  # a flag out of range: one line for the user, not a traceback
        raise UserError(str(err)) from None
