"""Measure a runner into a `CostProfile`: the step costs and host links the simulator needs.

Decode steps are timed at every decode bucket up to the batch cap (or the plan's batch sizes),
at a short context (the profile's decode table, keyed by the batch bucket the runner ran) and,
at the largest batch, at a long one too: the difference is what reading the extra KV costs
(the profile's effective `mem_bytes_per_s`, per key the backend reads: on the CPU kernel whole
key blocks, `grouped_decode_reads`). Prefill steps of one request are timed at a few
chunk sizes, and once more at the fewest tokens that run in the largest chunk's bucket: same
padded work, fewer attention pairs, so the difference prices a (token, key) pair
(`prefill_pair_s`; the CPU kernel reads only the keys each query tile attends to). Less their
pairs' price, the chunks' times are the profile's prefill table, keyed by the tokens the
runner computed (whole tiles of the chunk's bucket), fitted with a line whose intercept is
the fixed cost of a step (counted once when a step also decodes) and whose slope prices
prompts in profiles without a table. Host
links: gathered pages are copied to the host and back, bytes over seconds. Every figure is the
median of `repeats` runs, after one untimed run (`tfjax.timing.median_seconds`): the
simulator prices every step a server runs, so a typical one. Rows read pages that were never
written: timing does not depend on the values. Rows sample as an OpenAI request does by default
(temperature 1, no top-k or top-p), which is what `tfjax serve` runs when a client sends no
sampling fields.

Works on any `StepRunner` + `PageIO` with a `TransferIO`: `tfjax calibrate` gives it the real
runner, the tests the simulator's own `CostedRunner` on a virtual clock, which must give back
the profile it runs on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.attention import QUERY_TILE
from tfjax.config import EngineConfig
from tfjax.engine import StepRunner
from tfjax.kv.manager import PageIO, PrefillWork
from tfjax.kv.pages import pages_needed
from tfjax.kv.transfer import TransferIO
from tfjax.request import Request, RequestStatus, SamplingParams
from tfjax.sched.base import Costs, SchedulerView
from tfjax.sched.tokenflow import TokenFlowPolicy
from tfjax.sim.profiles import CostProfile, attention_pairs, decode_keys
from tfjax.timing import median_seconds


@dataclass(frozen=True, kw_only=True, slots=True)
class CalibrationPlan:
    batches: tuple[int, ...] = ()  # (): every decode bucket up to the batch cap
    contexts: tuple[int, int] = (64, 512)  # short (the table's), long (the KV read cost)
    chunks: tuple[int, ...] = (32, 128, 512)  # prefill tokens of one request
    copy_pages: int = 64
    plan_requests: int = 64  # live requests of the timed planning decision
    repeats: int = 5


def _rows(num_rows: int, context: int, page_size: int) -> list[Request]:
    """Decode rows of `context` tokens each on consecutive pages from page 1."""
    pages = pages_needed(context, page_size)
    rows = []
    for i in range(num_rows):
        r = Request(
            request_id=f"cal{i}",
            prompt_ids=[1] * (context - 1),
            sampling=SamplingParams(max_tokens=2, temperature=1.0, seed=0),
            arrival_s=0.0,
            consumption_rate=1.0,
        )
        r.output_ids = [1]
        r.num_computed_tokens = context - 1
        r.page_ids = list(range(1 + i * pages, 1 + (i + 1) * pages))
        rows.append(r)
    return rows


def _plan_decision(config: EngineConfig, page_size: int, num_pages: int, num: int) -> None:
    """One TokenFlow decision (the costliest plan any policy makes) over `num` requests, half
    running at 64 tokens of context, half waiting: what planning costs the engine thread."""
    running = _rows(num // 2, 64, page_size)
    for r in running:
        r.status = RequestStatus.RUNNING
    waiting = [
        Request(
            request_id=f"w{i}",
            prompt_ids=[1] * 64,
            sampling=SamplingParams(),
            arrival_s=0.0,
            consumption_rate=10.0,
        )
        for i in range(num - len(running))
    ]
    view = SchedulerView(
        now_s=1.0,
        waiting=waiting,
        prefilling=[],
        running=running,
        preempted=[],
        page_size=page_size,
        num_free_pages=num_pages - sum(len(r.page_ids) for r in running),
        num_total_pages=num_pages,
        max_batch_size=config.max_batch_size,
        prefill_token_budget=config.prefill_token_budget,
        costs=Costs(decode_step_s={1: 0.05, config.max_batch_size: 0.3}),
    )
    TokenFlowPolicy().plan(view)


def calibrate(
    runner: StepRunner,
    io: PageIO,
    transfers: TransferIO,
    config: EngineConfig,
    *,
    name: str,
    copies_share_compute: bool = False,
    grouped_decode_reads: bool = False,
    plan: CalibrationPlan = CalibrationPlan(),
    timer: Callable[[], float] = time.perf_counter,
    progress: Callable[[str], None] = lambda _: None,
) -> CostProfile:
    ps = runner.page_size

    def typical(run: Callable[[], object]) -> float:
        return median_seconds(run, plan.repeats, timer)

    def decode(batch: int, context: int) -> float:
        rows = _rows(batch, context, ps)
        return typical(lambda: np.asarray(runner.step((), rows)))

    usable = runner.num_pages - 1
    short, long = plan.contexts
    fits = usable // pages_needed(long, ps)  # rows of the long context the pool holds
    cap = min(config.max_batch_size, fits)  # the batch cap is always measured
    sizes = plan.batches or config.decode_batch_buckets()
    batches = sorted({b for b in sizes if b <= cap} | {cap})
    if cap < 1:
        raise ValueError(f"{usable} pages hold no decode batch of {long} tokens a row")
    table = []
    for b in batches:
        table.append((config.bucket_for((), b).rows, decode(b, short)))
        progress(f"decode batch {b} at {short} tokens: {table[-1][1] * 1e3:.1f} ms")
    top = batches[-1]
    long_s = decode(top, long)
    progress(f"decode batch {top} at {long} tokens: {long_s * 1e3:.1f} ms")
    rows = config.bucket_for((), top).rows
    extra_keys = decode_keys([long] * top, rows, grouped=grouped_decode_reads) - decode_keys(
        [short] * top, rows, grouped=grouped_decode_reads
    )
    per_key = max(long_s - table[-1][1], 1e-12) / extra_keys

    chunks = [
        n for n in plan.chunks if n <= config.prefill_token_budget and pages_needed(n, ps) <= usable
    ]

    def prefill(n: int) -> float:
        (row,) = _rows(1, n + 1, ps)
        row.output_ids, row.num_computed_tokens = [], 0
        row.prompt_ids = [1] * n
        work = (PrefillWork(row, n),)
        seconds = typical(lambda: np.asarray(runner.step(work, ())))
        progress(f"prefill {n} tokens: {seconds * 1e3:.1f} ms")
        return seconds

    prefill_s = [prefill(n) for n in chunks]
    top_chunk = chunks[-1]
    fewest = _fewest_tokens_in_bucket(config, top_chunk)
    pair_s = 0.0
    if fewest < top_chunk:
        saved = prefill_s[-1] - prefill(fewest)
        pair_s = max(saved, 0.0) / (attention_pairs(0, top_chunk) - attention_pairs(0, fewest))
    dense_s = [s - pair_s * attention_pairs(0, n) for n, s in zip(chunks, prefill_s, strict=True)]
    padded = [config.bucket_for([n], 0).tiles * QUERY_TILE for n in chunks]
    slope, intercept = _line(padded, dense_s)

    pages = list(range(1, 1 + min(plan.copy_pages, usable, io.max_gather_pages)))
    d2h_s = typical(lambda: transfers.offload(io.gather(pages)).result())
    host = transfers.offload(io.gather(pages))
    nbytes = len(pages) * io.page_bytes
    h2d_s = typical(lambda: transfers.load(host, nbytes).result())
    progress(f"copies of {nbytes / 1e6:.1f} MB: d2h {d2h_s * 1e3:.2f} ms, h2d {h2d_s * 1e3:.2f} ms")
    plan_s = typical(lambda: _plan_decision(config, ps, usable, plan.plan_requests))
    progress(f"tokenflow decision over {plan.plan_requests} requests: {plan_s * 1e3:.2f} ms")

    kvb = runner.kv_bytes_per_token
    mem_bytes_per_s = kvb / per_key
    d2h, h2d = nbytes / max(d2h_s, 1e-12), nbytes / max(h2d_s, 1e-12)
    source = "\n".join(
        [
            "tfjax calibrate on this machine: decode step "
            + " / ".join(f"{s * 1e3:.1f}" for _, s in table)
            + " ms at batch "
            + " / ".join(str(b) for b, _ in table)
            + f" with {short} tokens a row;",
            f"KV reads {mem_bytes_per_s / 1e9:.2f} GB/s effective (batch {top} at {long} tokens:"
            f" {long_s * 1e3:.1f} ms);",
            f"prefill {slope * 1e3:.3f} ms a token plus {intercept * 1e3:.1f} ms a step"
            f" (chunks {chunks}) plus {pair_s * 1e9:.1f} ns an attended (token, key) pair"
            f" ({top_chunk} against {fewest} tokens);",
            f"host copies d2h {d2h / 1e9:.2f} GB/s, h2d {h2d / 1e9:.2f} GB/s"
            f" ({nbytes / 1e6:.1f} MB, gather included)"
            + (", on the step's own cores" if copies_share_compute else "")
            + f"; planning {plan_s / plan.plan_requests * 1e6:.1f} us a live request"
            + "; engine flags as given",
        ]
    )
    return CostProfile(
        name=name,
        source=source,
        page_size=ps,
        num_device_pages=usable,
        num_host_pages=int(config.host_kv_gb * 1e9) // io.page_bytes,
        kv_bytes_per_token=kvb,
        max_batch_size=config.max_batch_size,
        prefill_token_budget=config.prefill_token_budget,
        overhead_s=max(intercept, 0.0),
        per_row_s=0.0,
        weight_bytes=0.0,
        mem_bytes_per_s=mem_bytes_per_s,
        flops_per_token=1.0,
        flops_per_s=1.0 / max(slope, 1e-12),
        d2h_bytes_per_s=d2h,
        h2d_bytes_per_s=h2d,
        decode_table_s=tuple(table),
        table_context_tokens=short,
        prefill_table_s=tuple(zip(padded, dense_s, strict=True)),
        prefill_pair_s=pair_s,
        host_copies_share_compute=copies_share_compute,
        grouped_decode_reads=grouped_decode_reads,
        plan_s_per_request=plan_s / plan.plan_requests,
    )


def _fewest_tokens_in_bucket(config: EngineConfig, num_tokens: int) -> int:
    """The smallest one-chunk prefill that runs in the bucket of `num_tokens` tokens."""
    bucket = config.bucket_for([num_tokens], 0)
    return next(n for n in range(1, num_tokens + 1) if config.bucket_for([n], 0) == bucket)


def _line(xs: Sequence[int], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept); one point: through the origin."""
    if len(xs) == 1:
        return ys[0] / xs[0], 0.0
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope), float(intercept)
