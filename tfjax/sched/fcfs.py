"""First-come-first-served continuous batching: the SGLang-style baseline.

FCFS is the packer's empty decision (`tfjax.sched.packer`): requests are served in queue order
(lower `priority` first, ties by arrival: vLLM's priority scheduling, `base.queue_key`), pages
are allocated as tokens are generated (no reservation of the whole output), and a request is
preempted only when the running set needs a page that does not exist: the last resident in
queue order goes first, by recompute, and nothing is admitted or resumed in a step that
preempted. Preempted requests come back before newer waiting ones because they arrived first.
Admission leaves one page of headroom per running request and, after a preemption, the
retract backoff's reserve (`packer.RetractBackoff`).

Two variants, as in the paper's baselines:
- `fcfs` (prefill-first, SGLang's default): while prompt work is pending, steps run prefill
  only, up to the prefill token budget; running streams pause meanwhile.
- `fcfs-chunked` (SGLang with chunked prefill mixed into decode): every step decodes all
  running requests and spends the prefill token budget on pending prompts alongside.
"""

from __future__ import annotations

from tfjax.sched.base import SchedulerView
from tfjax.sched.packer import Decision, Packer, PackingPolicy


class FcfsPolicy(PackingPolicy):
    resumes_by_load = False  # always recomputes

    def __init__(
        self,
        *,
        chunked: bool = False,
        headroom_pages_per_running: int = 1,
        retract_backoff: bool = True,
    ) -> None:
        super().__init__(
            Packer(
                headroom_pages_per_running=headroom_pages_per_running,
                retract_backoff=retract_backoff,
            )
        )
        self.chunked = chunked
        self.name = "fcfs-chunked" if chunked else "fcfs"
        self._decision = Decision(prefill_first=not chunked)

    def decide(self, view: SchedulerView) -> Decision:
        return self._decision
