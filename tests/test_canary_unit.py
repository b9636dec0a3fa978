"""The canary's analysis rules and steps: pure functions over metric samples."""

from __future__ import annotations

import pytest

from loramux.contracts import STATS_BUCKETS
from loramux.operator import canary as c


def counts(requests: int, errors: int = 0, ttft: float = 0.07,
           latency: float = 0.7) -> c.Counts:
    """``requests`` outcomes, all with the given TTFT and latency (the bucket they fall in)."""
    import bisect

    n = len(STATS_BUCKETS) + 1
    t, lat = [0] * n, [0] * n
    t[bisect.bisect_left(STATS_BUCKETS, ttft)] = requests
    lat[bisect.bisect_left(STATS_BUCKETS, latency)] = requests - errors
    return c.Counts(requests, errors, tuple(t), tuple(lat))


ANALYSIS = c.Analysis(interval_s=10, min_requests=20, max_error_rate=0.05,
                      max_ttft_p99_ratio=1.5, max_latency_p99_ratio=1.5,
                      min_latency_delta_s=0.25)


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile():
    buckets = [0] * (len(STATS_BUCKETS) + 1)
    buckets[STATS_BUCKETS.index(1.0)] = 100  # all in (0.5, 1.0]
    assert c.quantile(buckets, 0.5) == pytest.approx(0.75)
    assert c.quantile(buckets, 0.99) == pytest.approx(0.995)
    assert c.quantile([0] * len(buckets), 0.99) is None
    overflow = [0] * len(buckets)
    overflow[-1] = 3
    assert c.quantile(overflow, 0.99) == STATS_BUCKETS[-1]


def test_error_rate_rule():
    assert c.error_rate_rule(counts(100, 5), ANALYSIS).passed
    failed = c.error_rate_rule(counts(100, 6), ANALYSIS)
    assert not failed.passed and "6.0%" in failed.message and "6/100" in failed.message
    assert c.error_rate_rule(c.Counts(), ANALYSIS).passed  # nothing finished, nothing failed


def test_ttft_rule_needs_both_the_ratio_and_the_absolute_gap():
    stable = counts(200, ttft=0.3)  # p99 within (0.25, 0.5]
    assert c.ttft_rule(counts(50, ttft=0.3), stable, ANALYSIS).passed
    slow = c.ttft_rule(counts(50, ttft=3.0), stable, ANALYSIS)  # (2.5, 5]: 10x, +2.5 s
    assert not slow.passed and "stable" in slow.message
    # 2x slower but only ~0.05 s apart: below minLatencyDeltaSeconds, not a failure
    fast_stable = counts(200, ttft=0.04)
    assert c.ttft_rule(counts(50, ttft=0.09), fast_stable, ANALYSIS).passed
    # without stable observations there is nothing to compare with
    assert c.ttft_rule(counts(50, ttft=3.0), c.Counts(), ANALYSIS).passed


def test_latency_rule():
    stable = counts(200, latency=0.7)
    assert c.latency_rule(counts(50, latency=0.8), stable, ANALYSIS).passed
    assert not c.latency_rule(counts(50, latency=8.0), stable, ANALYSIS).passed


def test_evaluate_is_inconclusive_below_min_requests_then_decides():
    stable = counts(200)
    assert c.evaluate(counts(19), stable, ANALYSIS).outcome == "inconclusive"
    assert c.evaluate(counts(20), stable, ANALYSIS).outcome == "passed"
    verdict = c.evaluate(counts(20, errors=5), stable, ANALYSIS)
    assert verdict.outcome == "failed"
    assert verdict.figures["errors"] == 5 and verdict.figures["errorRate"] == 0.25


def test_parse_canary_validates_and_completes_the_steps():
    src = {"uri": "s3://bucket-a/legal/v2/"}
    spec, error = c.parse_canary({"version": "v2", "source": src, "steps": [10, 50]}, "v1")
    assert error is None and spec is not None and spec.steps == (10, 50, 100)
    bad = [
        ({"version": "v1", "source": src}, "is spec.version"),
        ({"version": "V2!", "source": src}, "spec.canary.version"),
        ({"version": "v2"}, "source is required"),
        ({"version": "v2", "source": {"uri": "http://x"}}, "s3://"),
        ({"version": "v2", "source": src, "steps": [50, 10]}, "rise strictly"),
        ({"version": "v2", "source": src, "steps": [0]}, "rise strictly"),
        ({"version": "v2", "source": src, "analysis": {"maxErrorRate": 2}}, "within"),
        ({"version": "v2", "source": src, "analysis": {"minRequests": 1.5}}, "number"),
        ({"version": "v2", "source": src, "paused": "yes"}, "boolean"),
    ]
    for raw, why in bad:
        spec, error = c.parse_canary(raw, "v1")
        assert spec is None and error is not None and why in error, (raw, error)
    assert c.parse_canary(None, "v1") == (None, None)


SPEC = c.CanarySpec(version="v2", uri="s3://bucket-a/legal/v2/", steps=(10, 50, 100),
                    analysis=ANALYSIS)


def ready(canary: c.Counts, stable: c.Counts) -> c.CanaryFacts:
    return c.CanaryFacts(stable_ready=True, canary_ready=True, canary=canary, stable=stable)


def test_a_good_canary_walks_every_step_then_promotes():
    now = 1000.0
    step = c.advance(SPEC, None, None, c.CanaryFacts(stable_ready=False, canary_ready=False),
                     now)
    assert step.status["phase"] == c.PENDING and step.weight is None  # stable still rolling
    step = c.advance(SPEC, None, step.status, c.CanaryFacts(True, False), now)
    assert step.status["phase"] == c.LOADING and step.weight == 0
    base_c, base_s = counts(0), counts(100)
    step = c.advance(SPEC, None, step.status, ready(base_c, base_s), now)
    assert (step.status["phase"], step.weight) == (c.PROGRESSING, 10)
    assert step.events[0][1] == "CanaryStarted"
    weights = [10]
    served = 0
    for _ in range(3):
        # too early: the interval has not passed, whatever the counts say
        early = c.advance(SPEC, None, step.status, ready(counts(served + 30), base_s), now + 1)
        assert early.weight == step.weight and not early.promote
        served += 30
        now += ANALYSIS.interval_s + 1
        step = c.advance(SPEC, None, step.status, ready(counts(served), base_s + counts(50)),
                         now)
        weights.append(step.weight)
    assert weights == [10, 50, 100, 100]
    assert step.promote and step.status["phase"] == c.PROMOTING
    assert [h["result"] for h in step.status["history"]] == ["Passed"] * 3
    assert [h["weight"] for h in step.status["history"]] == [10, 50, 100]
    done = c.advance(None, None, step.status, c.CanaryFacts(True, False), now + 1)
    assert done.status["phase"] == c.PROMOTED and done.weight is None


def test_a_failing_window_rolls_back_with_the_figures():
    step = c.advance(SPEC, None, {"version": "v2", "phase": c.LOADING, "history": []},
                     ready(counts(0), counts(100)), 0.0)
    assert step.weight == 10
    bad = c.advance(SPEC, None, step.status, ready(counts(40, errors=10), counts(100)), 20.0)
    assert bad.weight is None and bad.status["phase"] == c.ROLLED_BACK
    assert bad.degraded is not None and "error rate 25.0%" in bad.degraded
    assert bad.events[0][:2] == ("Warning", "CanaryRolledBack")
    assert bad.status["history"][-1]["result"] == "Failed"
    assert bad.status["analysis"]["errors"] == 10
    # it stays rolled back (and Degraded) until the canary changes or is removed
    again = c.advance(SPEC, None, bad.status, ready(counts(40), counts(100)), 40.0)
    assert again.status["phase"] == c.ROLLED_BACK and again.weight is None and again.degraded
    removed = c.advance(None, None, again.status, ready(counts(40), counts(100)), 50.0)
    assert removed.degraded is None and removed.weight is None


def test_a_slow_canary_rolls_back_on_ttft():
    step = c.advance(SPEC, None, {"version": "v2", "phase": c.LOADING, "history": []},
                     ready(counts(0), counts(100, ttft=0.07)), 0.0)
    bad = c.advance(SPEC, None, step.status,
                    ready(counts(40, ttft=4.0), counts(100, ttft=0.07)), 20.0)
    assert bad.status["phase"] == c.ROLLED_BACK and "TTFT p99" in bad.degraded


def test_a_canary_that_fails_to_load_rolls_back():
    facts = c.CanaryFacts(stable_ready=True, canary_ready=False,
                          canary_failed="pod-1: digest mismatch")
    step = c.advance(SPEC, None, {"version": "v2", "phase": c.LOADING}, facts, 0.0)
    assert step.status["phase"] == c.ROLLED_BACK and "digest mismatch" in step.degraded


def test_pause_resume_and_abort():
    step = c.advance(SPEC, None, {"version": "v2", "phase": c.LOADING, "history": []},
                     ready(counts(0), counts(100)), 0.0)
    paused_spec = c.CanarySpec(**{**SPEC.__dict__, "paused": True})
    paused = c.advance(paused_spec, None, step.status, ready(counts(500), counts(100)), 99.0)
    assert paused.status["phase"] == c.PAUSED and paused.weight == 10
    held = c.advance(paused_spec, None, paused.status, ready(counts(900), counts(100)), 500.0)
    assert held.status["phase"] == c.PAUSED and held.weight == 10 and not held.events
    resumed = c.advance(SPEC, None, held.status, ready(counts(900), counts(100)), 501.0)
    assert resumed.status["phase"] == c.PROGRESSING and resumed.weight == 10
    assert resumed.status["window"]["canary"]["requests"] == 900  # a new window
    aborted = c.advance(None, None, resumed.status, ready(counts(900), counts(100)), 502.0)
    assert aborted.status["phase"] == c.ABORTED and aborted.weight is None
    # the same canary applied again starts over
    again = c.advance(SPEC, None, aborted.status, c.CanaryFacts(True, False), 503.0)
    assert again.status["phase"] == c.LOADING and again.status["history"] == []


def test_a_counter_reset_restarts_the_window_instead_of_judging_it():
    step = c.advance(SPEC, None, {"version": "v2", "phase": c.LOADING, "history": []},
                     ready(counts(100), counts(100)), 0.0)
    reset = c.advance(SPEC, None, step.status, ready(counts(5), counts(100)), 50.0)
    assert reset.status["phase"] == c.PROGRESSING and reset.weight == 10
    assert reset.status["window"]["canary"]["requests"] == 5 and not reset.events


def test_an_invalid_canary_is_reported_once_and_sends_nothing():
    step = c.advance(None, "spec.canary.version 'v1' is spec.version", None,
                     c.CanaryFacts(True, False), 0.0)
    assert step.status["phase"] == c.INVALID and step.weight is None and step.events
    again = c.advance(None, "spec.canary.version 'v1' is spec.version", step.status,
                      c.CanaryFacts(True, False), 1.0)
    assert again.status["phase"] == c.INVALID and not again.events
