"""The one place that wires an `Engine`: runner, policy, host tier and transfer links.

`tfjax serve` (`async_engine.build_engine`), the simulator (`tfjax.sim.driver`), scripts and
tests all build engines here, so the host budget, the write-through and overlap switches and
the policy's LOAD ability are derived the same way everywhere; only the runner, the clock and
the transfer links differ (real ones, or the cost model's on a virtual clock).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax

from tfjax.api import Delta
from tfjax.config import EngineConfig
from tfjax.engine import Engine, StepRunner, Tokenizer
from tfjax.kv.host import HostTier
from tfjax.kv.manager import Offload, PageIO
from tfjax.kv.transfer import TransferIO, Transfers
from tfjax.sched.base import Policy
from tfjax.sched.registry import make_policy

MAX_OFFLOAD_BYTES_IN_FLIGHT = 256 << 20  # caps pinned staging memory held by queued copies


def device_transfers(pages_sharding: jax.sharding.Sharding) -> Callable[[], Transfers]:
    """Real links (worker threads) for a runner's gathered pages (`Runner.pages_sharding`):
    what `tfjax serve` and the scripts pass as `transfers`."""
    return lambda: Transfers(pages_sharding, max_bytes_in_flight=MAX_OFFLOAD_BYTES_IN_FLIGHT)


def build_offload(
    config: EngineConfig,
    io: PageIO,
    transfers: Callable[[], TransferIO],
    copies_share_compute: bool | None = None,
) -> Offload | None:
    """The host tier of `config.host_kv_gb` with its links (None under `--no-offload`).
    `copies_share_compute` None: true on a CPU backend, where "host" copies run on the cores
    and memory the step uses."""
    if not config.offload:
        return None
    if copies_share_compute is None:
        copies_share_compute = jax.default_backend() == "cpu"
    return Offload(
        host=HostTier(int(config.host_kv_gb * 1e9) // io.page_bytes, config.page_size),
        transfers=transfers(),
        io=io,
        write_through=config.write_through,
        overlap=config.overlap,
        copies_share_compute=copies_share_compute,
    )


def assemble_engine(
    runner: StepRunner,
    io: PageIO,
    tokenizer: Tokenizer | None,
    config: EngineConfig,
    *,
    transfers: Callable[[], TransferIO],
    emit: Callable[[str, Delta], None] | None,
    clock: Callable[[], float] = time.monotonic,
    policy: Policy | None = None,
    model_id: str = "",
    copies_share_compute: bool | None = None,
) -> Engine:
    """An engine for `config`; `policy` None: `config.policy` with its parameters.
    `transfers` is called only when offload is on (`build_offload`)."""
    return Engine(
        runner,
        tokenizer,
        config,
        policy or make_policy(config.policy, **config.policy_params),
        emit=emit,
        clock=clock,
        offload=build_offload(config, io, transfers, copies_share_compute),
        model_id=model_id,
    )
