"""The lock-step protocol of `tfjax.distributed` in one process, over an in-memory stand-in
for the coordinator's key-value store: step messages round-trip exactly, a follower replaying
them ends with the leader's KV and sampled tokens, and the watchdog fails the run (and exits
with WORKER_LOST_EXIT_CODE) once a worker's heartbeat stands still, but not after `stop`."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

from models.weights import init_random
from tests.fakes import FakeTokenizer, drive
from tests.test_engine import Recorder
from tests.test_runner_engine import MAX_LEN, PAGE_SIZE, TINY, requests_for
from tfjax.config import Bucket, EngineConfig
from tfjax.distributed import (
    KEPT_MESSAGES,
    WORKER_LOST_EXIT_CODE,
    Cluster,
    Leader,
    decode,
    encode_step,
    encode_stop,
    follow,
)
from tfjax.engine import Engine
from tfjax.request import SamplingParams
from tfjax.runner import Runner
from tfjax.sched.fcfs import FcfsPolicy

CONFIG = EngineConfig(page_size=PAGE_SIZE, prefill_token_budget=16, max_batch_size=4)
NUM_PAGES = 64


class MemoryStore:
    """The calls `tfjax.distributed` makes on the coordinator's client, in memory. Deleted
    keys are only recorded, so that a follower running behind still finds every message."""

    def __init__(self) -> None:
        self.values: dict[str, bytes | str] = {}
        self.deleted: list[str] = []
        self._changed = threading.Condition()

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None:
        with self._changed:
            assert allow_overwrite or key not in self.values, f"{key} written twice"
            self.values[key] = value
            self._changed.notify_all()

    key_value_set = key_value_set_bytes

    def key_value_try_get(self, key: str) -> str:
        if key not in self.values:
            raise jax.errors.JaxRuntimeError(f"NOT_FOUND: {key}")
        return self.values[key]

    def key_value_delete(self, key: str) -> None:
        self.deleted.append(key)

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes:
        with self._changed:
            if not self._changed.wait_for(lambda: key in self.values, timeout_in_ms / 1000):
                raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: {key}")
            return self.values[key]


def cluster(worker_timeout_s: float = 10.0, step_timeout_s: float = 120.0) -> Cluster:
    return Cluster(
        coordinator_address="127.0.0.1:1",
        num_processes=2,
        process_id=0,
        worker_timeout_s=worker_timeout_s,
        step_timeout_s=step_timeout_s,
    )


class RecordingRunner(Runner):
    """A runner that keeps the tokens of every step it runs (synchronously, on the host)."""

    def __init__(self, weights) -> None:
        super().__init__(TINY, weights, CONFIG, num_pages=NUM_PAGES, max_model_len=MAX_LEN)
        self.outputs: list[list[int]] = []

    def run_inputs(self, bucket, inputs, *, scored=False):
        result = super().run_inputs(bucket, inputs, scored=scored)
        tokens = result[0] if scored else result
        self.outputs.append(np.asarray(tokens).tolist())
        return result


@pytest.fixture(scope="module")
def weights():
    return init_random(TINY, jax.random.key(0), scale=0.5)


def test_step_message_round_trips(weights) -> None:
    runner = Runner(TINY, weights, CONFIG, num_pages=NUM_PAGES, max_model_len=MAX_LEN)
    bucket = Bucket(2, 0)
    inputs = runner.host_inputs(bucket, [], [])
    header, arrays = decode(encode_step(bucket, inputs, scored=True))
    assert (header["op"], header["bucket"], header["scored"]) == ("step", [2, 0], True)
    assert header["penalties"] is False and header["masked"] is False
    sent = jax.tree.leaves(inputs)
    # Host arrays only: process 0 would put a device array without the equality collective
    # that a worker's `device_put` of the same data runs (a mismatch that hangs or aborts).
    assert all(isinstance(leaf, np.ndarray) for leaf in sent)
    assert len(arrays) == len(sent)
    for got, want in zip(arrays, sent, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    rebuilt = jax.tree.unflatten(
        runner.input_structure(bucket, with_penalties=False, masked=False), arrays
    )
    assert jax.tree.structure(rebuilt) == jax.tree.structure(inputs)
    assert decode(encode_stop())[0]["op"] == "stop"


def test_follower_replays_the_leaders_steps(weights) -> None:
    """Greedy, seeded and penalised requests, with logprobs on one (the scored sampler):
    the follower, fed only the broadcast messages, computes the same tokens and KV."""
    store = MemoryStore()
    leader_runner, follower_runner = RecordingRunner(weights), RecordingRunner(weights)
    leader = Leader(cluster(), client=store)
    leader_runner.lockstep = leader
    policy = FcfsPolicy(chunked=True)
    engine = Engine(leader_runner, FakeTokenizer(), CONFIG, policy, emit=Recorder())
    requests = requests_for(4, max_tokens=6)
    requests[1].sampling = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8, seed=7)
    requests[2].sampling = SamplingParams(
        max_tokens=6, ignore_eos=True, repetition_penalty=1.3, logit_bias=((5, 3.0),)
    )
    requests[3].sampling = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)
    exit_codes: list[int] = []
    follower = threading.Thread(
        target=lambda: exit_codes.append(follow(follower_runner, client=store))
    )
    follower.start()
    try:
        drive(engine, requests)
    finally:
        leader.stop()
        follower.join(timeout=120)
    assert exit_codes == [0]
    assert len(leader_runner.outputs) > KEPT_MESSAGES
    assert follower_runner.outputs == leader_runner.outputs
    kv_pairs = zip(
        jax.tree.leaves(leader_runner.kv), jax.tree.leaves(follower_runner.kv), strict=True
    )
    for ours, theirs in kv_pairs:
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert store.deleted[0] == "tfjax/step/0"
    assert len(store.deleted) == len(leader_runner.outputs) + 1 - KEPT_MESSAGES


def test_watchdog_fails_the_run_when_a_worker_goes_silent() -> None:
    store = MemoryStore()
    store.key_value_set("tfjax/alive/1", "0", allow_overwrite=True)
    leader = Leader(cluster(worker_timeout_s=0.4), client=store)
    lost: list[str] = []
    exits: list[int] = []
    start = time.monotonic()
    leader.watch(lost.append, exit_process=exits.append).join(timeout=10)
    assert exits == [WORKER_LOST_EXIT_CODE]
    assert lost == ["worker process 1 sent no heartbeat for 0.4 s"]
    assert 0.4 < time.monotonic() - start < 5


def test_watchdog_fails_the_run_when_a_step_never_completes(weights) -> None:
    """The worker still beats (alive but wedged): the step in flight gives it away."""
    store = MemoryStore()
    leader = Leader(cluster(worker_timeout_s=0.4, step_timeout_s=0.6), client=store)
    runner = Runner(TINY, weights, CONFIG, num_pages=NUM_PAGES, max_model_len=MAX_LEN)
    lost: list[str] = []
    exits: list[int] = []
    watchdog = leader.watch(lost.append, exit_process=exits.append)
    leader.send(Bucket(0, 1), runner.host_inputs(Bucket(0, 1), [], []), scored=False)
    for beat in range(30):
        store.key_value_set("tfjax/alive/1", str(beat), allow_overwrite=True)
        time.sleep(0.1)
        if exits:
            break
    watchdog.join(timeout=5)
    assert exits == [WORKER_LOST_EXIT_CODE]
    assert lost == ["a step has not completed in 0.6 s"]


def test_watchdog_keeps_quiet_while_workers_beat_and_after_stop(weights) -> None:
    """Steps that complete, however many, and beats that keep coming never trip it."""
    store = MemoryStore()
    leader = Leader(cluster(worker_timeout_s=0.4, step_timeout_s=0.3), client=store)
    inputs = Runner(TINY, weights, CONFIG, num_pages=NUM_PAGES, max_model_len=MAX_LEN).host_inputs(
        Bucket(0, 1), [], []
    )
    exits: list[int] = []
    watchdog = leader.watch(lambda _: None, exit_process=exits.append)
    for beat in range(12):  # 1.2 s of beats and steps, three timeouts of each
        store.key_value_set("tfjax/alive/1", str(beat), allow_overwrite=True)
        leader.send(Bucket(0, 1), inputs, scored=False)
        time.sleep(0.1)
        leader.completed()
    leader.stop()
    watchdog.join(timeout=5)
    assert not watchdog.is_alive()
    assert exits == []
