"""Which step buckets (and page-copy sizes) to compile before serving, in what order the
rest compile, and how a step runs while its own bucket is not compiled yet.

A replica added under load must answer soon after it starts, and at full speed, but compiling
every bucket of `EngineConfig.step_buckets()` takes about a minute on a small CPU even from
the persistent XLA cache (tracing, lowering and loading each executable, README "Start-up
output"). So the runner compiles `startup_buckets` first -- the three largest, which hold any
step: a full batch decoding, a full prefill chunk alone, and beside a full batch -- and starts
serving. The others compile on a thread (`Executables.compile_rest_in_background`): a bucket
once the steps that lacked it have wasted more on padding than its compile costs
(`PaddingLedger`), the rest in `background_order` while the engine is idle. A compile takes
the cores from the steps, so a burst at start-up, which runs in the startup buckets with
little padding, keeps the CPU to itself, and a light load soon gets its small buckets. Page
copies (the host tier's gather and scatter, one pair per size) start with
`startup_page_copies`.

Until then a step whose bucket is missing runs in compiled ones (`calls_for`): padded up to a
compiled bucket that holds it, or split into several calls, whichever costs fewer padded
tokens (each call counts `CALL_OVERHEAD_TOKENS` more, for reading every weight once more). Splitting
is exact: decode rows are independent, and a prompt chunk split at a tile boundary runs its
tiles in order, each call writing the KV pages the next one reads (`split_step`, and
`merge_rows` puts the calls' outputs back in the step's row order). No JAX calls here: this
is bookkeeping over `Bucket`s and host arrays, shared by the runner and its tests.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from models.attention import QUERY_TILE
from tfjax.config import Bucket, EngineConfig
from tfjax.kv.manager import PrefillWork
from tfjax.request import Request

CALL_OVERHEAD_TOKENS = QUERY_TILE  # one more call reads the weights once more: ~ a tile's cost
NO_ROW = -1  # a call output no step row reads: a prompt piece that ends mid-chunk
# A compile costs about as much as this many calls of the bucket a step pads up to: 1-7 s on
# the 2-core CPU, against steps of 30-700 ms (README "Start-up output").
COMPILE_COST_CALLS = 16


@dataclass(frozen=True, slots=True)
class Chunk:
    """Prompt tokens start .. start + num_tokens of `request`, one call's share of a prefill
    chunk (all of it, or a tile-aligned piece); the call samples a token after them."""

    request: Request
    start: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Call:
    """One call of a step: a compiled bucket, the prompt pieces and decode rows it runs, and
    for each of its outputs (pieces first, then rows) the step row it answers, or NO_ROW."""

    bucket: Bucket
    chunks: list[Chunk]
    decode: list[Request]
    targets: np.ndarray  # [len(chunks) + len(decode)] int32

    @staticmethod
    def padding(bucket: Bucket) -> Call:
        """A call of padding only (writes only the padding page): to time a bucket."""
        return Call(bucket, [], [], np.zeros(0, np.int32))


def startup_buckets(config: EngineConfig) -> list[Bucket]:
    """The buckets compiled before serving: the largest decode step, the largest prefill
    chunk alone, and beside the largest batch. Together they run every step in one call,
    padded, and a burst's steps in their own buckets: its prefill steps, which admit prompts
    before any stream decodes, ran 10-25 % slower padded with 32 decode rows."""
    tiles = config.prefill_tile_buckets()[-1]
    return [
        Bucket(0, config.decode_batch_buckets()[-1]),
        Bucket(tiles, 0),
        Bucket(tiles, config.mixed_decode_buckets()[-1]),
    ]


class PaddingLedger:
    """The padded tokens each missing bucket's steps have run, to decide when to compile it:
    once its steps have wasted COMPILE_COST_CALLS times the tokens of a call they ran in (a
    step of one decode row padded up to 32 rows: after 17 steps; a one-off step or one padded
    by a few percent: not until the engine is idle)."""

    def __init__(self) -> None:
        self.wasted: dict[Bucket, int] = {}

    def record(self, bucket: Bucket, calls: Sequence[Bucket]) -> bool:
        """Count a step of `bucket` run as `calls`; whether `bucket` is now worth compiling."""
        ran = sum(b.num_tokens for b in calls) + CALL_OVERHEAD_TOKENS * (len(calls) - 1)
        wasted = self.wasted.get(bucket, 0) + ran - bucket.num_tokens
        self.wasted[bucket] = wasted
        return wasted >= COMPILE_COST_CALLS * max(b.num_tokens for b in calls)


def startup_page_copies(sizes: Sequence[int]) -> list[int]:
    """The page-copy sizes compiled before serving: one page (what the write-through copies
    while larger sizes compile, `Executables.max_gather_pages`) and the largest, which any copy
    pads up to meanwhile (a preempted request's tail, rare on a fresh replica)."""
    return sorted({sizes[0], sizes[-1]})


def background_order(buckets: Collection[Bucket], compiled: Collection[Bucket]) -> list[Bucket]:
    """The buckets not compiled yet, smallest first: small ones compile fastest, and small
    steps (decoding a few streams) are where padding up to a startup bucket costs the most in
    relative terms."""
    return sorted((b for b in buckets if b not in compiled), key=_size)


def _size(bucket: Bucket) -> tuple[int, int]:
    """Sort key: padded tokens, then tiles (a total order, so choices are deterministic)."""
    return bucket.num_tokens, bucket.tiles


@functools.lru_cache(maxsize=4096)
def calls_for(tiles: int, rows: int, compiled: frozenset[Bucket]) -> tuple[Bucket, ...]:
    """The compiled buckets to run a step of `tiles` prefill tiles and `rows` decode rows in:
    their tiles and rows add up to at least the step's, at the fewest padded tokens plus
    CALL_OVERHEAD_TOKENS per call (one bucket that holds the step when that is cheapest,
    else a split), most tiles first. Raises ValueError
    if `compiled` cannot run the step at all (no bucket with tiles, or none with rows).

    An exact search over what is left to run: at most (tiles + 1) * (rows + 1) states, and it
    runs once per step shape and compiled set (cached)."""
    best: dict[tuple[int, int], tuple[int, tuple[Bucket, ...]]] = {(0, 0): (0, ())}

    def cheapest(t: int, r: int) -> tuple[int, tuple[Bucket, ...]]:
        if (t, r) not in best:
            options = [
                (b.num_tokens + CALL_OVERHEAD_TOKENS + rest_cost, (b, *rest))
                for b in compiled
                if min(b.tiles, t) or min(b.rows, r)
                for rest_cost, rest in [cheapest(max(0, t - b.tiles), max(0, r - b.rows))]
                if rest_cost >= 0
            ]
            best[(t, r)] = min(options, key=lambda o: (o[0], len(o[1])), default=(-1, ()))
        return best[(t, r)]

    total, calls = cheapest(tiles, rows)
    if total < 0:
        raise ValueError(f"no compiled buckets run {tiles} tiles and {rows} decode rows")
    return tuple(sorted(calls, key=lambda b: (-b.tiles, -b.rows)))


def split_step(
    prefill: Sequence[PrefillWork], decode: Sequence[Request], buckets: Sequence[Bucket]
) -> list[Call]:
    """The step's prefill chunks and decode rows as calls of `buckets`, filled in order:
    chunks split at tile boundaries, each piece in a call after the one before it (so later
    tiles see the KV earlier ones wrote); only a chunk's last piece answers its row."""
    calls, work, placed, row = [], 0, 0, 0  # placed: tokens of prefill[work] in calls so far
    for bucket in buckets:
        chunks: list[Chunk] = []
        targets: list[int] = []
        room = bucket.tiles
        while room and work < len(prefill):
            w = prefill[work]
            n = min(room * QUERY_TILE, w.num_tokens - placed)
            chunks.append(Chunk(w.request, w.request.num_computed_tokens + placed, n))
            room -= -(-n // QUERY_TILE)
            placed += n
            targets.append(work if placed == w.num_tokens else NO_ROW)
            if placed == w.num_tokens:
                work, placed = work + 1, 0
        rows = list(decode[row : row + bucket.rows])
        targets += range(len(prefill) + row, len(prefill) + row + len(rows))
        row += len(rows)
        if chunks or rows:
            calls.append(Call(bucket, chunks, rows, np.asarray(targets, np.int32)))
    assert work == len(prefill) and row == len(decode), "the buckets do not hold the step"
    return calls


def merge_rows(calls: Sequence[Call], parts: Sequence[np.ndarray], num_rows: int) -> np.ndarray:
    """One output of the step, [num_rows, ...] in its row order, from each call's `parts`
    (that output of the call, [>= len(call.targets), ...])."""
    out = np.empty((num_rows, *parts[0].shape[1:]), parts[0].dtype)
    for call, part in zip(calls, parts, strict=True):
        read = call.targets != NO_ROW
        out[call.targets[read]] = part[: len(call.targets)][read]
    return out
