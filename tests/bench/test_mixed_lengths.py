"""`tfjax bench mixed-lengths`: what it sends, and the short streams' figures by hand."""

from __future__ import annotations

import pytest

from tfjax.bench import mixed_lengths as mixed
from tfjax.bench.client import RequestRecord


def test_the_long_prompt_goes_first_and_nothing_declares_a_rate() -> None:
    alone = mixed.requests(3, 17, 64, long_len=0)
    beside = mixed.requests(3, 17, 64, long_len=3000)
    assert [r.prompt_len for r in alone] == [17, 17, 17]
    assert [(r.index, r.prompt_len) for r in beside] == [
        (mixed.LONG, 3000),
        (1, 17),
        (2, 17),
        (3, 17),
    ]
    assert mixed.LONG not in {r.index for r in alone}
    assert all(r.arrival_s == 0.0 and r.output_len == 64 and not r.declared for r in beside)


def _record(index: int, first_s: float, end_s: float, tokens: int) -> RequestRecord:
    return RequestRecord(
        index=index,
        rate=15.0,
        prompt_len=17,
        max_tokens=tokens,
        scheduled_s=0.0,
        send_s=0.0,
        end_s=end_s,
        chunk_times_s=[first_s, end_s],
        chunk_tokens=[1, tokens - 1],
        output_tokens=tokens,
    )


def test_short_figures_leave_the_long_request_out() -> None:
    records = [
        _record(mixed.LONG, first_s=9.0, end_s=30.0, tokens=64),  # not counted
        _record(1, first_s=1.0, end_s=8.0, tokens=64),
        _record(2, first_s=3.0, end_s=10.0, tokens=64),
    ]
    figures = mixed.short_figures(records)
    assert figures["short_tok_s"] == pytest.approx(128 / 10.0)  # until the last short one ends
    assert figures["short_mean_ttft_s"] == pytest.approx(2.0)
    assert figures["short_max_ttft_s"] == pytest.approx(3.0)


def test_a_failed_short_request_fails_the_run() -> None:
    failed = _record(1, first_s=1.0, end_s=2.0, tokens=64)
    failed.error = "HTTP 503"
    with pytest.raises(RuntimeError, match="1 short requests failed: HTTP 503"):
        mixed.short_figures([failed, _record(2, 1.0, 2.0, 64)])


def test_long_figures_are_the_long_requests_first_token_and_end() -> None:
    records = [_record(mixed.LONG, first_s=9.0, end_s=30.0, tokens=64), _record(1, 1.0, 8.0, 64)]
    assert mixed.long_figures(records) == {"long_ttft_s": 9.0, "long_end_s": 30.0}
    records[0].error = "HTTP 500"
    with pytest.raises(RuntimeError, match="the long request failed: HTTP 500"):
        mixed.long_figures(records)
