"""The hot-tenant promote/demote policy, in tokens served per second: thresholds,
hysteresis, dwell, coverage, resets, and why tokens rather than requests."""

from __future__ import annotations

import pytest

from loramux.operator.hot_policy import (
    RateHistory,
    Sample,
    Thresholds,
    decide,
    interval_rates,
    renamed_field_problem,
)

T = Thresholds(promote_above_tps=500, promote_after_s=60, demote_below_tps=100,
               demote_after_s=120, min_dwell_s=300, max_gap_s=30)


def series(rates: list[float], step: float = 10.0, start: float = 0.0) -> list[Sample]:
    """Token-counter samples every ``step`` s whose interval rates (tokens/s) are ``rates``."""
    samples, total = [Sample(start, 0.0)], 0.0
    for i, rate in enumerate(rates):
        total += rate * step
        samples.append(Sample(start + (i + 1) * step, total))
    return samples


def traffic(requests_per_s: float, tokens_per_request: int, seconds: int,
            step: int = 10) -> tuple[list[Sample], int]:
    """What the operator would scrape every ``step`` s from a tenant that sends
    ``requests_per_s`` requests of ``tokens_per_request`` tokens (prompt + generated) each:
    the token counter, and how many requests that was."""
    samples, tokens, requests = [Sample(0.0, 0.0)], 0, 0
    for t in range(1, seconds + 1):
        due = int(t * requests_per_s) - requests  # whole requests finished by second t
        requests += due
        tokens += due * tokens_per_request
        if t % step == 0:
            samples.append(Sample(float(t), float(tokens)))
    return samples, requests


def test_many_cheap_requests_do_not_promote_few_expensive_ones_do() -> None:
    """The point of counting tokens: 50 one-line classifications a second (8 tokens each,
    400 tokens/s) cost less than one long-document summary every two seconds (3000 prompt +
    500 generated tokens, 1750 tokens/s), though the first sends 100x the requests."""
    cheap, cheap_requests = traffic(50, 8, 120)
    dear, dear_requests = traffic(0.5, 3500, 120)
    assert cheap_requests == 100 * dear_requests
    now = 120.0
    held = decide("Auto", False, cheap, T, now, None)
    assert held.action == "hold" and held.rate_tps == pytest.approx(400)
    promoted = decide("Auto", False, dear, T, now, None)
    assert promoted.action == "promote" and promoted.rate_tps == pytest.approx(1750)
    assert "tokens/s" in promoted.reason
    # the same holds on the way down: a dedicated tenant that now sends many tiny requests
    # (40 req/s of 2 tokens = 80 tokens/s) is demoted, however many requests that is
    chatter, _ = traffic(40, 2, 200)
    assert decide("Auto", True, chatter, T, 200.0, None).action == "demote"
    # ... and one that sends few long ones (0.2 req/s of 2000 tokens = 400 tokens/s) is kept
    few_long, _ = traffic(0.2, 2000, 200)
    assert decide("Auto", True, few_long, T, 200.0, None).action == "hold"


def test_promotes_only_when_sustained_for_the_whole_window() -> None:
    hot = series([800] * 7)  # 70 s above 500 tokens/s
    now = hot[-1].at
    d = decide("Auto", False, hot, T, now, None)
    assert d.action == "promote" and d.rate_tps == pytest.approx(800)
    # one dip inside the window blocks promotion
    dip = series([800, 800, 800, 200, 800, 800, 800])
    assert decide("Auto", False, dip, T, dip[-1].at, None).action == "hold"
    # a dip before the window does not
    early = series([200, 800, 800, 800, 800, 800, 800, 800])
    assert decide("Auto", False, early, T, early[-1].at, None).action == "promote"


def test_not_enough_history_holds() -> None:
    short = series([5000] * 3)  # 30 s of history, window is 60 s
    assert decide("Auto", False, short, T, short[-1].at, None).action == "hold"
    for samples in ([], [Sample(0, 0)]):
        d = decide("Auto", False, samples, T, 100.0, None)
        assert d.action == "hold" and "no token counts" in d.reason
        assert decide("Auto", True, samples, T, 100.0, None).action == "hold"


def test_gaps_from_missed_scrapes_reset_the_evidence() -> None:
    # 50 s gap (max 30 s) in a stream of 1000 tokens/s
    samples = [Sample(0, 0), Sample(10, 10_000), Sample(60, 60_000), Sample(70, 70_000)]
    assert decide("Auto", False, samples, T, 70, None).action == "hold"


def test_hysteresis_band_never_flaps() -> None:
    """A rate that oscillates between the thresholds changes nothing, whichever state."""
    band = series([400, 200, 490, 150, 300] * 10)
    for dedicated in (False, True):
        for i in range(2, len(band)):
            d = decide("Auto", dedicated, band[: i + 1], T, band[i].at, None)
            assert d.action == "hold", (dedicated, i, d)


def test_demotes_after_sustained_low_traffic_and_respects_dwell() -> None:
    quiet = series([20] * 13)  # 130 s below 100 tokens/s
    now = quiet[-1].at
    d = decide("Auto", True, quiet, T, now, None)
    assert d.action == "demote" and "below 100 tokens/s" in d.reason
    assert d.rate_tps == pytest.approx(20)
    assert decide("Auto", True, quiet, T, now, last_change_at=now - 100).action == "hold"
    assert decide("Auto", True, quiet, T, now, last_change_at=now - 301).action == "demote"
    # one busy interval in the window keeps it
    busy = series([20] * 6 + [300] + [20] * 6)
    assert decide("Auto", True, busy, T, busy[-1].at, None).action == "hold"


def test_burst_after_demotion_does_not_promote_within_dwell() -> None:
    burst = series([2000] * 10)
    now = burst[-1].at
    assert decide("Auto", False, burst, T, now, last_change_at=now - 60).action == "hold"
    assert decide("Auto", False, burst, T, now, last_change_at=now - 400).action == "promote"


def test_always_and_never_ignore_traffic_and_dwell() -> None:
    idle = series([0] * 20)
    assert decide("Always", False, idle, T, 200, last_change_at=199).action == "promote"
    assert decide("Always", True, idle, T, 200, None).action == "hold"
    hot = series([10_000] * 20)
    assert decide("Never", True, hot, T, 200, last_change_at=199).action == "demote"
    assert decide("Never", False, hot, T, 200, None).action == "hold"


def test_counter_reset_reads_as_restart_from_zero() -> None:
    samples = [Sample(0, 100_000), Sample(10, 108_000), Sample(20, 3_000), Sample(30, 11_000)]
    rates = [r for *_, r in interval_rates(samples)]
    assert rates == pytest.approx([800.0, 300.0, 800.0])


def test_thresholds_validation_and_from_spec() -> None:
    with pytest.raises(ValueError, match="flap"):
        Thresholds(promote_above_tps=200, demote_below_tps=200)
    with pytest.raises(ValueError):
        Thresholds(promote_after_s=0)
    with pytest.raises(ValueError, match="negative"):
        Thresholds(promote_above_tps=500, demote_below_tps=-1)
    t = Thresholds.from_spec({"promoteAboveTokensPerSecond": 1000, "promoteAfterSeconds": 30,
                              "demoteBelowTokensPerSecond": 50.5, "demoteAfterSeconds": 90})
    assert (t.promote_above_tps, t.promote_after_s, t.demote_below_tps, t.demote_after_s) == (
        1000, 30, 50.5, 90)
    assert Thresholds.from_spec(None) == Thresholds()
    defaults = Thresholds()
    assert defaults.demote_below_tps < defaults.promote_above_tps
    # only one threshold set, below the other's default: refused, naming both fields
    with pytest.raises(ValueError, match=r"demoteBelowTokensPerSecond .*promoteAboveTokens"):
        Thresholds.from_spec({"promoteAboveTokensPerSecond": 300})


def test_the_request_rate_fields_are_refused_with_their_new_names() -> None:
    """Pre-1.0 rename: a request rate cannot be turned into tokens/s without knowing the
    requests' sizes, so the old fields are an error that names the new field, not a guess."""
    with pytest.raises(ValueError, match="promoteAboveRps was removed: use "
                                         "promoteAboveTokensPerSecond"):
        Thresholds.from_spec({"promoteAboveRps": 5})
    problem = renamed_field_problem({"demoteBelowRps": 1, "promoteAboveTokensPerSecond": 900})
    assert problem is not None and "use demoteBelowTokensPerSecond" in problem
    assert "promoteAboveRps" not in problem
    both = renamed_field_problem({"promoteAboveRps": 5, "demoteBelowRps": 1}) or ""
    assert "promoteAboveTokensPerSecond" in both and "demoteBelowTokensPerSecond" in both
    assert renamed_field_problem({"promoteAboveTokensPerSecond": 900}) is None
    assert renamed_field_problem(None) is None


def test_rate_history_trims_and_ignores_out_of_order() -> None:
    history = RateHistory(keep_s=100)
    for t in range(0, 500, 10):
        history.add("legal", Sample(float(t), float(t)))
    history.add("legal", Sample(5.0, 0.0))  # older than the newest: ignored
    kept = history.get("legal")
    assert kept[-1].at == 490 and kept[0].at >= 380
    assert history.get("unknown") == []
    history.forget("legal")
    assert history.get("legal") == []
