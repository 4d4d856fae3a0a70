"""Cost models of (hardware, model) pairs for the simulator, each figure with its source.

A step that decodes B rows with C context tokens in total and prefills P prompt tokens takes

    step_s = overhead_s + per_row_s * B + max(mem_s, compute_s) + prefill_pair_s * A
    mem_s = (weight_bytes + C * kv_bytes_per_token) / mem_bytes_per_s
    compute_s = (B + P) * flops_per_token / flops_per_s

a roofline: decode reads all weights and the batch's KV once per step; prefill and large
batches are bound by matmul FLOPs (2 * params per token). A counts the (prompt token, key)
pairs the prefill chunks attend to (`attention_pairs`): attention's quadratic term, which
follows the chunks' real tokens and context, not their padded bucket (the CPU kernel loops
only over the key blocks a query tile reads). Built-in profiles leave it out (0).
`mem_bytes_per_s` and `flops_per_s` are effective rates: peak times the efficiency stated in
each profile's `source`. `Costs` handed to the policies are derived from the same
formula, as the engine's EWMA measurements would be.

A profile measured on the machine itself (`decode_table_s`, from `tfjax bench engine` or `tfjax
calibrate`) replaces the decode part of the roofline: the measured step time at B rows (linear
between measured sizes, as the engine interpolates its own measurements), plus reading the KV
keys beyond those of `table_context_tokens` a row the benchmark ran at (a CPU profile counts
the keys its kernel reads, `grouped_decode_reads`: each group of rows to its longest row, in
whole blocks, so uneven rows cost more than their mean), plus the prompt
tokens' price (the measured prefill table, dense work by padded tokens) and their attention
pairs. The CPU's step time is not roofline-shaped (a batch-32 step costs twice a batch-8
one), and it is that shape that decides whether a smaller batch pays.

A profile measured behind a server also carries `served_step_factor`: steps behind `tfjax
serve` cost more than the runner alone, because the server's HTTP and streaming threads (and a
client on the same machine) take CPU from the cores the step runs on; the simulator multiplies
every step by it. And its `step_noise_sigma`: served steps of one size scatter from one to the
next (other threads, caches, the client's bursts), and a workload's tail can hinge on whether
two arrivals a few milliseconds apart meet the same step. With it the simulator draws each
step's cost around its price (log-normal, mean kept; `tfjax simulate --seed`), so simulations
with different seeds spread as live replays of one workload do, and their median is what a
median of live replays is compared with.

Never tune a profile to make a policy win: change a figure only with a better public source or
an engine measurement (`tfjax bench engine`, `tfjax calibrate`), and say so in `source`.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models.attention import cpu_decode_keys
from tfjax.sched.base import Costs

GIB = 1024**3
LLAMA3_8B_PARAMS = 8.03e9
LLAMA3_8B_KV_BYTES = 32 * 8 * 128 * 2 * 2  # layers * kv heads * head dim * (K, V) * bf16 = 128 KiB


@dataclass(frozen=True, kw_only=True, slots=True)
class CostProfile:
    name: str
    source: str  # one line per figure: value and where it comes from
    page_size: int
    num_device_pages: int  # usable KV pages on the device (the pad page comes on top)
    num_host_pages: int  # pinned-host KV pool, in pages
    kv_bytes_per_token: int
    max_batch_size: int
    prefill_token_budget: int
    overhead_s: float  # per step: launch, sampling, scheduling
    per_row_s: float  # per decode row, for backends that are not roofline-shaped (CPU)
    weight_bytes: float
    mem_bytes_per_s: float  # effective
    flops_per_token: float
    flops_per_s: float  # effective
    d2h_bytes_per_s: float
    h2d_bytes_per_s: float
    decode_table_s: tuple[tuple[int, float], ...] = ()  # measured (batch, step s); () roofline
    table_context_tokens: int = 0  # context per row the table was measured at
    # measured (padded prompt tokens, seconds of a prefill-only step less its attention
    # pairs' `prefill_pair_s` price); () the line above
    prefill_table_s: tuple[tuple[int, float], ...] = ()
    # The CPU kernel's decode reads: each group of rows reads its longest row's keys in whole
    # blocks (`models.attention.cpu_decode_keys`); False: every row reads its own context.
    grouped_decode_reads: bool = False
    # Host copies run on the step's cores (a CPU): each copy's time delays the steps too.
    host_copies_share_compute: bool = False
    # Host time of planning a step, per live request (the engine thread's, before the step).
    plan_s_per_request: float = 0.0
    # Seconds per (prompt token, key) pair a prefill chunk attends to (`attention_pairs`),
    # beyond the prefill table's dense price of its padded tokens; 0: left out.
    prefill_pair_s: float = 0.0
    # What every step costs behind `tfjax serve` over the runner alone: the HTTP server's and
    # the streaming client's CPU on the step's cores. Measured from a live step trace of a
    # calibration workload (`python -m tfjax.sim.trace_diff --write-served`); 1: not measured.
    served_step_factor: float = 1.0
    # How far a served step's cost scatters, step to step: the deviation of log(measured /
    # price) between back-to-back traced steps of one size, from the same calibration traces
    # (`--write-served`); 0: every step costs exactly its price.
    step_noise_sigma: float = 0.0

    @property
    def device_kv_tokens(self) -> int:
        return self.num_device_pages * self.page_size

    def step_s(
        self,
        *,
        num_decode: int,
        decode_contexts: Sequence[int] = (),
        num_prefill: int = 0,
        prefill_pairs: int = 0,
    ) -> float:
        """A step of `num_decode` rows (a bucket; padding rows have no context) whose real rows
        hold `decode_contexts` tokens, and `num_prefill` (padded) prompt tokens whose chunks
        attend to `prefill_pairs` (token, key) pairs."""
        if num_decode == 0 and num_prefill == 0:
            return 0.0
        attention = self.prefill_pair_s * prefill_pairs
        keys = decode_keys(decode_contexts, num_decode, grouped=self.grouped_decode_reads)
        if self.decode_table_s:
            measured = Costs(decode_step_s=dict(self.decode_table_s))
            decode = measured.decode_step_time(num_decode) if num_decode else self.overhead_s
            table = [self.table_context_tokens] * num_decode
            table_keys = decode_keys(table, num_decode, grouped=self.grouped_decode_reads)
            kv = max(0, keys - table_keys) * self.kv_bytes_per_token / self.mem_bytes_per_s
            return decode + kv + self._prefill_extra_s(num_prefill) + attention
        mem = (self.weight_bytes + keys * self.kv_bytes_per_token) / self.mem_bytes_per_s
        compute = (num_decode + num_prefill) * self.flops_per_token / self.flops_per_s
        return self.overhead_s + self.per_row_s * num_decode + max(mem, compute) + attention

    def _prefill_extra_s(self, num_tokens: int) -> float:
        """What `num_tokens` prompt tokens add to a step beyond `overhead_s`: piecewise linear
        over the measured prefill table (the last segment's slope beyond it, a line from the
        overhead below its first point), else the fitted seconds per token."""
        if not (self.prefill_table_s and num_tokens):
            return num_tokens * self.flops_per_token / self.flops_per_s
        points = [(0, self.overhead_s), *self.prefill_table_s]
        i = min(bisect.bisect_left(points, (num_tokens,)), len(points) - 1)  # segment's end
        (n0, s0), (n1, s1) = points[i - 1], points[i]
        return s0 + (s1 - s0) * (num_tokens - n0) / (n1 - n0) - self.overhead_s

    def costs(self, mean_context_tokens: float) -> Costs:
        """What the engine would have measured at this mean context length."""
        sizes = sorted(
            {1 << k for k in range(int(math.log2(self.max_batch_size)) + 1)} | {self.max_batch_size}
        )
        return Costs(
            decode_step_s={
                b: self.step_s(num_decode=b, decode_contexts=[int(mean_context_tokens)] * b)
                for b in sizes
            },
            prefill_token_s=self.flops_per_token / self.flops_per_s,
            kv_bytes_per_token=self.kv_bytes_per_token,
            d2h_bytes_per_s=self.d2h_bytes_per_s,
            h2d_bytes_per_s=self.h2d_bytes_per_s,
        )


def decode_keys(contexts: Sequence[int], num_rows: int, *, grouped: bool) -> int:
    """Keys a decode step of `num_rows` rows reads for rows holding `contexts` tokens: the CPU
    kernel's grouped reads (`grouped`), else each row's own context."""
    return cpu_decode_keys(contexts, num_rows) if grouped and num_rows else sum(contexts)


def attention_pairs(context_before: int, num_tokens: int) -> int:
    """The (query, key) pairs a causal prefill chunk of `num_tokens` tokens reads after
    `context_before` computed tokens: each token attends to all before it and itself."""
    return num_tokens * context_before + num_tokens * (num_tokens + 1) // 2


def _pages(kv_bytes: float, kv_bytes_per_token: int, page_size: int) -> int:
    return int(kv_bytes // (kv_bytes_per_token * page_size))


# SmolLM2-135M on this repo's 2-core CPU, float32: 30 layers * 3 kv heads * 64 dim * 2 * 4 B.
_SMOL_KV = 30 * 3 * 64 * 2 * 4
CPU_SMOLLM2 = CostProfile(
    name="cpu-smollm2",
    source="""measured with scripts/bench_engine.py --no-hf --batches 1,8,32 on this machine, idle
(README, "Engine microbenchmark"; prompt 128, 64 new tokens, so ~160 tokens of context per row):
decode step 46.2 / 136.3 / 290.9 ms at batch 1 / 8 / 32; prefill 363 tok/s at batch 32
(2 * 134.5M FLOP/token at 97.7 GFLOP/s effective); copy bandwidth 22.3 GB/s (KV reads beyond the
measured context). Engine defaults of `tfjax serve` on this CPU: 2047 usable pages of 16 tokens
(the live run in issue 13 reported 2,047 free pages), batch cap 32, prefill budget 512 tokens/step;
host tier 4 GB (--host-kv-gb default) = 5689 pages of 46 KiB/token (f32);
host copies ~10 GB/s (memcpy on this CPU, assumption), on the step's own cores; a prefill-only
step has the batch-1 step's overhead, 46.2 ms minus one token's FLOPs (assumption)""",
    page_size=16,
    num_device_pages=2047,
    num_host_pages=_pages(4e9, _SMOL_KV, 16),
    kv_bytes_per_token=_SMOL_KV,
    max_batch_size=32,
    prefill_token_budget=512,
    overhead_s=46.2e-3 - 2 * 134.5e6 / 97.7e9,
    per_row_s=0.0,
    weight_bytes=538e6,
    mem_bytes_per_s=22.3e9,
    flops_per_token=2 * 134.5e6,
    flops_per_s=97.7e9,
    d2h_bytes_per_s=10e9,
    h2d_bytes_per_s=10e9,
    decode_table_s=((1, 46.2e-3), (8, 136.3e-3), (32, 290.9e-3)),
    table_context_tokens=160,
    host_copies_share_compute=True,
)

_4090_MEM = 24 * GIB
_4090_STATIC = 0.88 * _4090_MEM
RTX4090_LLAMA3_8B = CostProfile(
    name="rtx4090-llama3-8b",
    source="""RTX 4090 + Llama-3-8B bf16 (paper §7.1 setup):
memory bandwidth 1008 GB/s (NVIDIA spec), 80% effective (assumption);
bf16 dense tensor 165.2 TFLOP/s with FP32 accumulate (NVIDIA Ada whitepaper), 50% MFU (assumption);
24 GiB, static memory fraction 0.88 (assumption, SGLang-style mem-frac for a 24 GB card)
minus 16.06 GB of weights (8.03B params * 2 B) leaves ~6.6 GB = ~50k tokens of KV at 128 KiB/token
(32 layers * 8 kv heads * 128 dim * K,V * 2 B);
PCIe 4.0 x16 ~25 GB/s effective each way; host KV pool 64 GiB (assumption: half of a
128 GB workstation); batch cap 256 (vLLM's default max_num_seqs);
prefill budget 2048 tokens/step (assumption, a common chunked-prefill size for 24 GB cards);
1 ms per-step overhead (assumption)""",
    page_size=16,
    num_device_pages=_pages(_4090_STATIC - 2 * LLAMA3_8B_PARAMS, LLAMA3_8B_KV_BYTES, 16),
    num_host_pages=_pages(64 * GIB, LLAMA3_8B_KV_BYTES, 16),
    kv_bytes_per_token=LLAMA3_8B_KV_BYTES,
    max_batch_size=256,
    prefill_token_budget=2048,
    overhead_s=1e-3,
    per_row_s=0.0,
    weight_bytes=2 * LLAMA3_8B_PARAMS,
    mem_bytes_per_s=0.8 * 1008e9,
    flops_per_token=2 * LLAMA3_8B_PARAMS,
    flops_per_s=0.5 * 165.2e12,
    d2h_bytes_per_s=25e9,
    h2d_bytes_per_s=25e9,
)

_H200_MEM = 141e9
H200_LLAMA3_8B = CostProfile(
    name="h200-llama3-8b",
    source="""H200 SXM + Llama-3-8B bf16 (paper §7.1 setup):
memory bandwidth 4.8 TB/s (NVIDIA spec), 80% effective (assumption);
bf16 dense tensor 989 TFLOP/s (NVIDIA spec, without sparsity), 50% MFU (assumption);
141 GB with mem-frac 0.3 as in the paper: 42.3 GB static minus 16.06 GB of weights leaves
~26.2 GB = ~200k tokens of KV at 128 KiB/token;
PCIe 5.0 x16 ~50 GB/s effective each way; host KV pool 256 GiB (assumption: an 8-GPU H200
server has 2 TB of RAM); batch cap 256 (vLLM's default max_num_seqs);
prefill budget 8192 tokens/step (assumption, a common chunked-prefill size for large GPUs);
1 ms per-step overhead (assumption)""",
    page_size=16,
    num_device_pages=_pages(0.3 * _H200_MEM - 2 * LLAMA3_8B_PARAMS, LLAMA3_8B_KV_BYTES, 16),
    num_host_pages=_pages(256 * GIB, LLAMA3_8B_KV_BYTES, 16),
    kv_bytes_per_token=LLAMA3_8B_KV_BYTES,
    max_batch_size=256,
    prefill_token_budget=8192,
    overhead_s=1e-3,
    per_row_s=0.0,
    weight_bytes=2 * LLAMA3_8B_PARAMS,
    mem_bytes_per_s=0.8 * 4.8e12,
    flops_per_token=2 * LLAMA3_8B_PARAMS,
    flops_per_s=0.5 * 989e12,
    d2h_bytes_per_s=50e9,
    h2d_bytes_per_s=50e9,
)

PROFILES = {p.name: p for p in (CPU_SMOLLM2, RTX4090_LLAMA3_8B, H200_LLAMA3_8B)}


def get_profile(name: str) -> CostProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}") from None


def profile_to_json(profile: CostProfile) -> dict[str, object]:
    return {f: getattr(profile, f) for f in CostProfile.__dataclass_fields__}


def profile_from_json(data: dict[str, object]) -> CostProfile:
    """The inverse of `profile_to_json` (JSON turns the tables into lists)."""
    fields = dict(data)
    for table in ("decode_table_s", "prefill_table_s"):
        fields[table] = tuple(
            (int(n), float(s))
            for n, s in fields.get(table, ())  # type: ignore[union-attr]
        )
    try:
        return CostProfile(**fields)  # type: ignore[arg-type]
    except TypeError as e:
        raise ValueError(f"bad profile: {e}") from None


def load_profile(name_or_path: str) -> CostProfile:
    """A built-in profile by name, else a JSON file (`tfjax calibrate --out`)."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"{name_or_path!r} is neither a profile file nor one of {', '.join(PROFILES)}"
        )
    return profile_from_json(json.loads(path.read_text()))
