"""QoS metrics on timelines small enough to compute by hand."""

from __future__ import annotations

import pytest

from tfjax.qos import TokenTimeline, summarize, token_weights


def timeline(arrival: float, rate: float, gen: list[float]) -> TokenTimeline:
    return TokenTimeline.from_gen_times(arrival, rate, gen)


def test_token_weights_thresholds() -> None:
    # L = 20: weight 1 up to B = 2, linear to 0 at B = 4, 0 beyond.
    assert token_weights([0, 2, 3, 4, 5, 100], 20).tolist() == [1.0, 1.0, 0.5, 0.0, 0.0, 0.0]
    assert token_weights([], 5).tolist() == []


def test_hand_computed_run() -> None:
    # rate 10, arrival 0, tokens at 1.0, 1.0, 1.0, 1.5, 2.0: B = [0, 0, 1, 0, 0], L = 5 so
    # tau = 0.5 and the third token weighs 1 - (1 - 0.5)/0.5 = 0. Stall 0.2 + 0.4.
    tl = timeline(0.0, 10.0, [1.0, 1.0, 1.0, 1.5, 2.0])
    s = summarize([tl])
    assert s["mean_ttft_s"] == pytest.approx(1.0)
    assert s["effective_tokens"] == pytest.approx(4.0)
    assert s["span_s"] == pytest.approx(2.0)
    assert s["effective_throughput"] == pytest.approx(2.0)
    assert s["raw_throughput"] == pytest.approx(2.5)
    assert s["mean_stall_s"] == pytest.approx(0.6)
    assert s["stall_ratio"] == pytest.approx(0.6 / 0.5)  # reading time L / r = 0.5 s
    assert s["qos"] == pytest.approx((4.0 - 1.0 - 0.6) / 2.0)
    assert s["qos"] != summarize([tl], lam=2.0)["qos"]


def test_burst_of_tokens_loses_weight() -> None:
    # 20 tokens at once, rate 1: token 1 is read at once, so B = [0, 0, 1, 2, ..., 18];
    # tau = 2: four tokens weigh 1, the one at B = 3 weighs 0.5, the rest 0.
    tl = timeline(0.0, 1.0, [0.0] * 20)
    assert tl.reader.buffers[:5] == [0, 0, 1, 2, 3]
    s = summarize([tl])
    assert s["effective_tokens"] == pytest.approx(4.5)
    assert s["span_s"] == 0.0
    assert s["effective_throughput"] == 0.0  # no span: defined as 0


def test_one_token_output() -> None:
    s = summarize([timeline(0.0, 5.0, [0.3])])
    assert s["effective_tokens"] == 1.0  # B = 0 <= 0.1 * 1
    assert s["mean_ttft_s"] == pytest.approx(0.3)
    assert s["effective_throughput"] == pytest.approx(1 / 0.3)
    assert s["stall_ratio"] == 0.0


def test_rejects_bad_rate() -> None:
    with pytest.raises(ValueError):
        timeline(0.0, 0.0, [1.0])
    with pytest.raises(ValueError):
        timeline(0.0, -3.0, [1.0])


def test_unstarted_requests_count_censored() -> None:
    done = timeline(0.0, 1.0, [1.0, 2.0])
    never = timeline(0.5, 1.0, [])
    s = summarize([done, never])
    assert s["num_unstarted"] == 1
    # Censored at the last token of the run (2.0): TTFT >= 1.5.
    assert s["mean_ttft_s"] == pytest.approx((1.0 + 1.5) / 2)
    assert s["p99_ttft_s"] == pytest.approx(1.0 + 0.99 * 0.5)
    assert s["max_ttft_s"] == pytest.approx(1.5)
    assert s["num_tokens"] == 2
    assert summarize([done, never], end_s=10.0)["max_ttft_s"] == pytest.approx(9.5)
    # A run where nothing started: everything censored at the first arrival, no span.
    s = summarize([never])
    assert s["mean_ttft_s"] == 0.0 and s["raw_throughput"] == 0.0


def test_span_starts_at_first_arrival() -> None:
    a = timeline(0.0, 10.0, [1.0])
    b = timeline(3.0, 10.0, [4.0])
    s = summarize([a, b])
    assert s["span_s"] == pytest.approx(4.0)
    assert s["raw_throughput"] == pytest.approx(0.5)


def test_explicit_output_length() -> None:
    # L given as 100 (e.g. the request is cut short): tau = 10, all of these weigh 1.
    tl = TokenTimeline(arrival_s=0.0, reader=timeline(0.0, 1.0, [0.0] * 5).reader, output_len=100)
    assert summarize([tl])["effective_tokens"] == 5.0


def test_empty_rejected() -> None:
    with pytest.raises(ValueError):
        summarize([])
