"""`Engine`: one scheduling step at a time, on the engine thread (no locks inside).

    step():  plan = policy.plan(view)        the policy decides, tfjax.sched.packer packs
             validate_plan(view, plan)        the contract of tfjax.sched.base
             work = kv.execute(plan)          pages and statuses
             tokens = runner.step(work)       ONE jitted call: prefill chunks + decode rows
             postprocess(tokens)              readers, detokenizing, stop checks, deltas
             kv.write_through(...)            if the plan asks: new full pages to the host

The engine owns every live `Request` (in arrival order: dict insertion order) and its
`Detokenizer`. Deltas leave through the `emit` callback, which must be cheap and thread-safe
(`AsyncEngine` forwards them to the asyncio loop). Submissions and aborts arrive from other
threads through `AsyncEngine`'s inbox, never by touching the engine directly.

Step costs are measured here (EWMA per decode batch size, also kept apart by the rows' mean
context; prefill seconds per token) and handed to the policy as `Costs`, so policies plan
with this machine's real numbers at the contexts the batch has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

import jax
import numpy as np

from models.attention import QUERY_TILE
from tfjax.api import Decision, Delta, TokenLogprob
from tfjax.config import EngineConfig
from tfjax.detokenizer import Decoder, Detokenizer
from tfjax.grammar import GrammarError
from tfjax.kv.manager import KVManager, Offload, PrefillWork, StepWork
from tfjax.kv.prefix import PrefixCache
from tfjax.qos import token_weights
from tfjax.request import FinishReason, Request, RequestStatus
from tfjax.sampling import TokenLogprobs, row_logprob
from tfjax.sched.base import (
    Costs,
    Plan,
    Policy,
    SchedulerView,
    context_bucket,
    validate_plan,
)
from tfjax.step_trace import StepTrace

log = logging.getLogger(__name__)

EWMA_ALPHA = 0.2  # weight of the newest step-time sample


class StepRunner(Protocol):
    """What the engine needs from `tfjax.runner.Runner` (and from test fakes)."""

    page_size: int
    num_pages: int
    max_model_len: int
    kv_bytes_per_token: int
    decode_step_s: dict[int, float]  # first estimates per batch size (from warm-up)
    prefill_token_s: float

    def step(self, prefill: Sequence[PrefillWork], decode: Sequence[Request]) -> jax.Array:
        """Token ids sampled after each prefill chunk, then after each decode row."""
        ...

    def step_scored(
        self, prefill: Sequence[PrefillWork], decode: Sequence[Request]
    ) -> tuple[jax.Array, TokenLogprobs]:
        """`step` plus raw logprobs per row; only called when a request asks for logprobs."""
        ...


class Tokenizer(Decoder, Protocol):
    eos_token_ids: frozenset[int]


class Engine:
    def __init__(
        self,
        runner: StepRunner,
        tokenizer: Tokenizer | None,
        config: EngineConfig,
        policy: Policy,
        *,
        emit: Callable[[str, Delta], None] | None,
        clock: Callable[[], float] = time.monotonic,
        offload: Offload | None = None,
        model_id: str = "",
    ) -> None:
        """`model_id` names the weights: it roots the prefix cache's page keys. `tokenizer`
        None: deltas carry token ids only, no text (the simulator; no stop strings, no EOS).
        `emit` None: no one reads deltas (the simulator reads the requests' timelines)."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.policy = policy
        self.emit = emit
        self.clock = clock
        # The pool may use fewer pages than the runner's array (benchmarks shrink it).
        num_pages = min(config.num_pages or runner.num_pages, runner.num_pages)
        prefix = PrefixCache(runner.page_size, model_id) if config.prefix_cache else None
        self.kv = KVManager(
            num_pages,
            runner.page_size,
            offload,
            swaps=policy.resumes_by_load,
            prefix=prefix,
            clock=clock,
        )
        self.requests: dict[str, Request] = {}
        self._detokenizers: dict[str, Detokenizer] = {}  # empty without a tokenizer
        self._eos_token_ids = tokenizer.eos_token_ids if tokenizer else frozenset()
        self.costs = Costs(
            kv_bytes_per_token=runner.kv_bytes_per_token,
            decode_step_s=dict(runner.decode_step_s),
            prefill_token_s=runner.prefill_token_s,
        )
        self.num_generated_tokens = 0
        self.num_steps = 0  # steps that ran something
        self.effective_tokens = 0.0  # paper §7.1.3 weights of finished requests' tokens
        self.last_decision: Decision | None = None  # the newest plan that moved a request
        self.trace = StepTrace.from_env()  # TFJAX_STEP_TRACE: one JSON line per step

    # -- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        if self.tokenizer is not None:
            detok = Detokenizer(self.tokenizer, request.sampling.stop)
            self._detokenizers[request.request_id] = detok
        elif request.sampling.stop:
            raise ValueError("stop strings need a tokenizer")

    def abort(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request, FinishReason.ABORT, RequestStatus.ABORTED)

    def fail_all(self, message: str) -> None:
        """End every live request with an error delta (the step raised)."""
        for request in list(self.requests.values()):
            self._finish(request, FinishReason.ERROR, RequestStatus.ABORTED, error=message)

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    def count(self, status: RequestStatus) -> int:
        return sum(1 for r in self.requests.values() if r.status is status)

    def check_idle(self) -> None:
        """Invariants that must hold between steps: page books balance, owners are live."""
        self.kv.check(self.requests)
        if not self.requests:
            assert self.kv.num_used_pages == 0, "pages in use with no live request"

    # -- the step ------------------------------------------------------------------------

    def step(self) -> bool:
        """Run one step; return False when the plan had nothing to run."""
        self.kv.complete_loads()
        view = self.view()
        plan = self.policy.plan(view)
        validate_plan(view, plan, self.requests)
        self._note_decision(view.now_s, plan)
        work = self.kv.execute(plan, self.requests, view.costs)
        if work.is_empty:
            return False
        self.num_steps += 1
        start = self.clock()
        sampled = self._run(work)
        now = self.clock()
        self._measure(work, now - start)
        if self.trace:
            fields = getattr(self.policy, "trace_fields", None)
            self.trace.record(start, now - start, plan, work, fields() if fields else None)
        self._postprocess(work, sampled, now)
        if plan.write_through:
            running = [r for r in work.decode if r.status is RequestStatus.RUNNING]
            self.kv.write_through(running, now, self.costs.decode_step_time(len(running)))
        return True

    def _postprocess(
        self, work: StepWork, sampled: list[tuple[int, TokenLogprob | None]], now: float
    ) -> None:
        """Advance each row's request by what the step computed and append its token."""
        prefill_out, decode_out = sampled[: len(work.prefill)], sampled[len(work.prefill) :]
        for w, (token, logprob) in zip(work.prefill, prefill_out, strict=True):
            request = w.request
            request.num_computed_tokens += w.num_tokens
            if request.num_uncomputed_prefill == 0:
                request.status = RequestStatus.RUNNING
                if not request.output_ids:  # a recomputed request already has its next token
                    self._append(request, token, now, logprob)
        for request, (token, logprob) in zip(work.decode, decode_out, strict=True):
            request.num_computed_tokens += 1
            self._append(request, token, now, logprob)

    def _run(self, work: StepWork) -> list[tuple[int, TokenLogprob | None]]:
        """Run the step on the device: each row's token id (prefill chunks first) and its
        logprobs if its request asked. Only steps with such a request run the runner's
        scored variant, so the others pay nothing for logprobs."""
        rows = [w.request for w in work.prefill] + list(work.decode)
        if all(r.sampling.logprobs is None for r in rows):
            ids = np.asarray(self.runner.step(work.prefill, work.decode))[: len(rows)].tolist()
            return [(token, None) for token in ids]
        ids, scores = jax.device_get(self.runner.step_scored(work.prefill, work.decode))
        sampled = []
        for i, (request, token) in enumerate(zip(rows, ids.tolist(), strict=False)):
            asked = request.sampling.logprobs
            sampled.append((token, None if asked is None else row_logprob(scores, i, token, asked)))
        return sampled

    def _note_decision(self, now_s: float, plan: Plan) -> None:
        """Keep a plan that admits, preempts or resumes (the dashboard's "last decision");
        plans that only decode or prefill happen every step and are not worth showing."""
        if plan.preempt or plan.resume or plan.admit:
            resumed = tuple(r.request_id for r in plan.resume)
            self.last_decision = Decision(now_s, plan.preempt, resumed, plan.admit)

    def view(self) -> SchedulerView:
        by_status: dict[RequestStatus, list[Request]] = {s: [] for s in RequestStatus}
        for request in self.requests.values():
            by_status[request.status].append(request)
        return SchedulerView(
            now_s=self.clock(),
            waiting=by_status[RequestStatus.WAITING],
            prefilling=by_status[RequestStatus.PREFILLING],
            running=by_status[RequestStatus.RUNNING],
            preempted=by_status[RequestStatus.PREEMPTED],
            page_size=self.runner.page_size,
            num_free_pages=self.kv.num_free_pages,
            num_total_pages=self.kv.device.num_usable,
            # LOADING requests hold their rows (and pages) until they rejoin the batch.
            max_batch_size=self.config.max_batch_size - len(by_status[RequestStatus.LOADING]),
            prefill_token_budget=self.config.prefill_token_budget,
            prefill_tile=QUERY_TILE,
            long_prefill_token_threshold=self.config.long_prefill_token_threshold,
            costs=self._costs_with_io(),
            host=self.kv.host,
            loading=by_status[RequestStatus.LOADING],
        )

    def _costs_with_io(self) -> Costs:
        if self.kv.offload is None:
            return self.costs
        links = self.kv.offload.transfers
        return replace(
            self.costs,
            d2h_bytes_per_s=links.d2h.bytes_per_s,
            h2d_bytes_per_s=links.h2d.bytes_per_s,
            io_backlog_s=links.backlog_s(),
        )

    # -- internals -----------------------------------------------------------------------

    def _append(
        self, request: Request, token: int, now: float, logprob: TokenLogprob | None = None
    ) -> None:
        self.kv.on_decoded(request)
        request.output_ids.append(token)
        request.reader.on_token(now)
        self.num_generated_tokens += 1
        params = request.sampling
        detok = self._detokenizers.get(request.request_id)
        finish = None
        text = ""
        try:
            grammar_done = request.grammar is not None and request.grammar.advance(token)
        except GrammarError as err:
            self._finish(request, FinishReason.ERROR, RequestStatus.ABORTED, error=str(err))
            return
        if (token in self._eos_token_ids and not params.ignore_eos) or (
            token in params.stop_token_ids
        ):
            finish = FinishReason.STOP
        else:
            if detok is not None:
                text = detok.push(token)
            if grammar_done or (detok is not None and detok.stopped):
                finish = FinishReason.STOP
            elif (
                request.num_output_tokens >= params.max_tokens
                or request.num_tokens >= self.runner.max_model_len
            ):
                finish = FinishReason.LENGTH
        logprobs = None if logprob is None else (logprob,)
        if finish is None:
            self._send(request, text, (token,), logprobs=logprobs)
        else:
            self._finish(
                request,
                finish,
                RequestStatus.FINISHED,
                text=text,
                token_ids=(token,),
                logprobs=logprobs,
            )

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        status: RequestStatus,
        *,
        text: str = "",
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] | None = None,
        error: str | None = None,
    ) -> None:
        detok = self._detokenizers.pop(request.request_id, None)
        if detok is not None and reason is not FinishReason.ERROR:
            text += detok.flush()
        request.finish_reason = reason
        request.status = status
        self.kv.release(request)
        del self.requests[request.request_id]
        reader = request.reader
        self.effective_tokens += float(token_weights(reader.buffers, reader.num_tokens).sum())
        self._send(request, text, token_ids, logprobs=logprobs, finish=reason, error=error)

    def _send(
        self,
        request: Request,
        text: str,
        token_ids: tuple[int, ...],
        *,
        logprobs: tuple[TokenLogprob, ...] | None = None,
        finish: FinishReason | None = None,
        error: str | None = None,
    ) -> None:
        request.sent_offset += len(text)
        if self.emit is None:
            return
        self.emit(
            request.request_id,
            Delta(
                text=text,
                token_ids=token_ids,
                num_prompt_tokens=request.num_prompt_tokens,
                num_output_tokens=request.num_output_tokens,
                finish_reason=finish,
                error=error,
                stall_s=request.reader.stall_s if finish else 0.0,
                num_preemptions=request.num_preemptions if finish else 0,
                num_cached_tokens=request.num_cached_prompt_tokens if finish else 0,
                logprobs=logprobs,
            ),
        )

    def _measure(self, work: StepWork, seconds: float) -> None:
        """Fold this step's time into the cost estimates the policies see. A mixed step's
        prefill share is what it took beyond the current estimate of its decode rows."""
        prefill_s = seconds
        if work.decode:
            batch = len(work.decode)
            context = sum(r.num_tokens for r in work.decode) / batch
            if work.prefill:
                prefill_s = seconds - self.costs.decode_step_time(batch, context)
            else:
                by_context = {c: dict(row) for c, row in self.costs.decode_by_context_s.items()}
                _ewma_into(by_context.setdefault(context_bucket(context), {}), batch, seconds)
                table = dict(self.costs.decode_step_s)
                _ewma_into(table, batch, seconds)
                self.costs = replace(
                    self.costs, decode_step_s=table, decode_by_context_s=by_context
                )
        if work.prefill and prefill_s > 0:
            old = self.costs.prefill_token_s
            sample = prefill_s / sum(w.num_tokens for w in work.prefill)
            self.costs = replace(self.costs, prefill_token_s=old + EWMA_ALPHA * (sample - old))


def _ewma_into(table: dict[int, float], key: int, sample: float) -> None:
    old = table.get(key, sample)
    table[key] = old + EWMA_ALPHA * (sample - old)
