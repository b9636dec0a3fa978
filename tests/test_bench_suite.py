"""The pure parts of the benchmark suite (bench/workloads.py): draws fixed by their seed,
summaries with cut-off requests, the issue-18 targets, and the docs section writer."""

from __future__ import annotations

import itertools
import statistics
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from workloads import (
    BEGIN_MARKER,
    END_MARKER,
    RequestRecord,
    draw_lengths,
    evaluate_targets,
    open_loop_plan,
    percentile,
    poisson_schedule,
    replace_section,
    summarize,
    uniform_tenants,
    zipf_sample,
    zipf_weights,
)


def test_zipf_is_deterministic_and_skewed() -> None:
    a = zipf_sample(100, 1.0, 5000, seed=7)
    assert a == zipf_sample(100, 1.0, 5000, seed=7)
    assert a != zipf_sample(100, 1.0, 5000, seed=8)
    assert all(0 <= x < 100 for x in a)
    counts = Counter(a)
    # Rank 0 is the most popular, about twice rank 1 (s = 1) and far above the tail.
    assert counts[0] == max(counts.values())
    assert 1.6 < counts[0] / counts[1] < 2.5
    w = zipf_weights(100, 1.0)
    assert sum(w) == pytest.approx(1.0)
    assert w[0] / w[9] == pytest.approx(10.0)
    assert zipf_weights(4, 0.0) == [0.25] * 4
    with pytest.raises(ValueError):
        zipf_weights(0, 1.0)


def test_poisson_schedule_is_deterministic_with_the_right_rate() -> None:
    t = poisson_schedule(2.0, 1000.0, seed=3)
    assert t == poisson_schedule(2.0, 1000.0, seed=3)
    assert t != poisson_schedule(2.0, 1000.0, seed=4)
    assert t == sorted(t) and t[0] >= 0 and t[-1] < 1000.0
    assert 1800 < len(t) < 2200  # 2/s over 1000 s
    gaps = [b - a for a, b in itertools.pairwise(t)]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.1)
    # Exponential gaps: the standard deviation equals the mean.
    assert statistics.stdev(gaps) == pytest.approx(0.5, rel=0.15)
    with pytest.raises(ValueError):
        poisson_schedule(0.0, 10.0, seed=1)


def test_lengths_are_deterministic_and_in_range() -> None:
    a = draw_lengths(2000, 8, 256, seed=1)
    assert a == draw_lengths(2000, 8, 256, seed=1)
    assert a != draw_lengths(2000, 8, 256, seed=2)
    assert min(a) == 8 and max(a) == 256  # both ends reachable in 2000 draws
    assert statistics.mean(a) == pytest.approx(132, rel=0.05)
    assert draw_lengths(3, 5, 5, seed=0) == [5, 5, 5]
    with pytest.raises(ValueError):
        draw_lengths(1, 10, 9, seed=0)
    u = uniform_tenants(1000, 200, seed=1)
    assert u == uniform_tenants(1000, 200, seed=1) and set(u) <= set(range(200))


def test_open_loop_plan_keeps_requests_across_rates() -> None:
    slow = open_loop_plan(0.5, 60, 100, 1.0, (8, 256), seed=18)
    fast = open_loop_plan(2.0, 60, 100, 1.0, (8, 256), seed=18)
    assert slow == open_loop_plan(0.5, 60, 100, 1.0, (8, 256), seed=18)
    assert len(fast) > len(slow)
    # The k-th request asks for the same tenant and lengths at every rate.
    for a, b in zip(slow, fast, strict=False):
        assert (a.tenant, a.prompt_tokens, a.output_tokens) == (
            b.tenant, b.prompt_tokens, b.output_tokens)
    assert all(8 <= p.prompt_tokens <= 256 and 8 <= p.output_tokens <= 256 for p in fast)


def test_percentile_is_linear() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_summary_counts_cut_off_requests_as_lower_bounds() -> None:
    recs = [RequestRecord("a", sent_s=0.0, ttft_s=0.1, latency_s=1.0, completion_tokens=10)
            for _ in range(8)]
    recs.append(RequestRecord("b", sent_s=1.0, ttft_s=None, latency_s=None))  # cut off
    recs.append(RequestRecord("c", sent_s=0.0, error="HTTP 503"))
    s = summarize(recs, wall_s=10.0, cutoff_s=10.0, slo_ttft_s=0.5)
    assert (s.requests, s.finished, s.unfinished, s.failed) == (10, 8, 1, 1)
    assert s.tokens_per_s == pytest.approx(8.0)
    assert s.p99_ttft_s is not None and s.p99_ttft_s > 8  # the cut-off one waited 9 s
    assert s.p99_ttft_lower and s.p99_latency_lower and not s.p50_ttft_lower
    assert s.p50_ttft_s == pytest.approx(0.1)
    assert s.slo_share == pytest.approx(0.8)  # 8 of 10 sent
    # A cut-off request far above the 99th percentile's ranks does not make it a bound.
    many = [RequestRecord("a", sent_s=0.0, ttft_s=0.1 * i, latency_s=1.0) for i in range(300)]
    tail = summarize([*many, RequestRecord("b", sent_s=0.0)], wall_s=100.0, cutoff_s=100.0)
    assert not tail.p99_ttft_lower and tail.p50_ttft_s == pytest.approx(15.0)
    clean = summarize(recs[:8], wall_s=10.0)
    assert not clean.p99_ttft_lower and clean.p99_latency_s == pytest.approx(1.0)


def test_stall_percentiles_cover_finished_streamed_requests_only() -> None:
    """Each request's longest wait between two tokens; requests without one (not streamed,
    one token, cut off, failed) are left out."""
    recs = [RequestRecord("a", sent_s=0.0, ttft_s=0.1, latency_s=1.0, max_gap_s=0.01 * i)
            for i in range(1, 101)]
    recs.append(RequestRecord("b", sent_s=0.0, ttft_s=0.1, latency_s=0.1))  # one token
    recs.append(RequestRecord("c", sent_s=0.0, ttft_s=0.1, max_gap_s=9.0))  # cut off
    recs.append(RequestRecord("d", sent_s=0.0, max_gap_s=9.0, error="HTTP 503"))
    s = summarize(recs, wall_s=10.0, cutoff_s=10.0)
    assert s.p50_max_gap_s == pytest.approx(0.505)
    assert s.p99_max_gap_s == pytest.approx(0.9901)
    assert summarize(recs[100:101], wall_s=1.0).p99_max_gap_s is None


def _closed(lmx: float, base: float, seed: float, vllm: float | None) -> dict:
    systems = {"loramux": {8: lmx, 16: lmx}, "base": {8: base, 16: base},
               "seed": {8: seed, 16: seed}}
    if vllm is not None:
        systems["vllm"] = {8: vllm, 16: vllm}
    return {"distinct": systems, "identical": {"loramux": {8: lmx}, "base": {8: base}}}


def test_targets_met_and_not_met() -> None:
    open_loop = {"seed": {0.1: 5.0, 0.2: 12.0, 0.4: 40.0},
                 "loramux": {0.1: 0.2, 0.2: 0.9, 0.4: 3.0}}
    churn = {"warm_p99_no_churn_s": 0.2, "warm_p99_churn_s": 0.25}
    ts = {t.name: t for t in evaluate_targets(_closed(90, 100, 14, 40), open_loop, churn)}
    assert ts["distinct B=8: loramux / base"].met is True  # 0.90 >= 0.85
    assert ts["distinct B=16: loramux / seed"].met is True  # 6.43 >= 6
    assert ts["distinct B=8: loramux / vllm"].met is True  # 2.25 >= 2
    assert ts["identical B=8: loramux / base"].met is True  # 0.9 >= 0.9
    open_t = next(t for t in ts.values() if t.name.startswith("open loop"))
    # The first rate where the seed's p99 exceeds 10 s is 0.2/s: loramux 0.9 s < 2 s.
    assert open_t.met is True and open_t.measured == pytest.approx(0.9)
    assert ts["churn: warm p99 TTFT with churn / without"].measured == pytest.approx(1.25)

    ts = {t.name: t for t in evaluate_targets(_closed(80, 100, 20, None),
                                              {"seed": {0.1: 11.0}, "loramux": {0.1: 2.5}},
                                              {"warm_p99_no_churn_s": 0.2,
                                               "warm_p99_churn_s": 0.4})}
    assert ts["distinct B=8: loramux / base"].met is False  # 0.8
    assert ts["distinct B=8: loramux / seed"].met is False  # 4
    assert ts["distinct B=8: loramux / vllm"].met is None  # not measured: not evaluated
    assert ts["identical B=8: loramux / base"].met is False
    assert next(t for t in ts.values() if t.name.startswith("open loop")).met is False
    assert ts["churn: warm p99 TTFT with churn / without"].met is False  # 2.0


def test_targets_not_evaluable_are_none() -> None:
    ts = evaluate_targets({}, {"seed": {0.1: 3.0}, "loramux": {0.1: 0.1}}, None)
    assert all(t.met is None for t in ts)
    open_t = next(t for t in ts if t.name.startswith("open loop"))
    assert "stayed under" in open_t.detail
    ts = evaluate_targets({}, {"seed": {0.1: 3.0, 0.2: None}, "loramux": {0.1: 0.1}}, None)
    open_t = next(t for t in ts if t.name.startswith("open loop"))
    assert open_t.met is None and "unknown at 0.2/s" in open_t.detail


def test_replace_section_keeps_outside_text() -> None:
    before = "# Benchmarks\n\nsome text\n"
    once = replace_section(before, "## Suite\nrow 1\n")
    assert once.startswith(before)
    assert once.endswith(f"{BEGIN_MARKER}\n## Suite\nrow 1\n{END_MARKER}\n")
    after = once + "\n## Later section\nkept\n"
    twice = replace_section(after, "## Suite\nrow 2")
    assert twice == after.replace("row 1", "row 2")
    assert twice.count(BEGIN_MARKER) == 1 and twice.endswith("## Later section\nkept\n")
    assert replace_section("", "x") == f"{BEGIN_MARKER}\nx\n{END_MARKER}\n"
    assert replace_section("no newline", "x").startswith("no newline\n\n")
    with pytest.raises(ValueError):
        replace_section(f"a {END_MARKER} b", "x")
