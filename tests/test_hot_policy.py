"""The hot-tenant promote/demote policy: thresholds, hysteresis, dwell, coverage, resets."""

from __future__ import annotations

import pytest

from loramux.operator.hot_policy import (
    RateHistory,
    Sample,
    Thresholds,
    decide,
    interval_rates,
)

T = Thresholds(promote_above_rps=5, promote_after_s=60, demote_below_rps=1,
               demote_after_s=120, min_dwell_s=300, max_gap_s=30)


def series(rates: list[float], step: float = 10.0, start: float = 0.0) -> list[Sample]:
    """Counter samples every ``step`` s whose interval rates are ``rates``."""
    samples, total = [Sample(start, 0.0)], 0.0
    for i, rate in enumerate(rates):
        total += rate * step
        samples.append(Sample(start + (i + 1) * step, total))
    return samples


def test_promotes_only_when_sustained_for_the_whole_window() -> None:
    hot = series([8] * 7)  # 70 s above 5 req/s
    now = hot[-1].at
    d = decide("Auto", False, hot, T, now, None)
    assert d.action == "promote" and d.rate_rps == pytest.approx(8)
    # one dip inside the window blocks promotion
    dip = series([8, 8, 8, 2, 8, 8, 8])
    assert decide("Auto", False, dip, T, dip[-1].at, None).action == "hold"
    # a dip before the window does not
    early = series([2, 8, 8, 8, 8, 8, 8, 8])
    assert decide("Auto", False, early, T, early[-1].at, None).action == "promote"


def test_not_enough_history_holds() -> None:
    short = series([50] * 3)  # 30 s of history, window is 60 s
    assert decide("Auto", False, short, T, short[-1].at, None).action == "hold"
    assert decide("Auto", False, [], T, 100.0, None).action == "hold"
    assert decide("Auto", False, [Sample(0, 0)], T, 100.0, None).action == "hold"


def test_gaps_from_missed_scrapes_reset_the_evidence() -> None:
    samples = [Sample(0, 0), Sample(10, 100), Sample(60, 600), Sample(70, 700)]  # 50 s gap
    assert decide("Auto", False, samples, T, 70, None).action == "hold"


def test_hysteresis_band_never_flaps() -> None:
    """A rate that oscillates between the thresholds changes nothing, whichever state."""
    band = series([4, 2, 4.9, 1.5, 3] * 10)
    for dedicated in (False, True):
        for i in range(2, len(band)):
            d = decide("Auto", dedicated, band[: i + 1], T, band[i].at, None)
            assert d.action == "hold", (dedicated, i, d)


def test_demotes_after_sustained_low_traffic_and_respects_dwell() -> None:
    quiet = series([0.2] * 13)  # 130 s below 1 req/s
    now = quiet[-1].at
    assert decide("Auto", True, quiet, T, now, None).action == "demote"
    assert decide("Auto", True, quiet, T, now, last_change_at=now - 100).action == "hold"
    assert decide("Auto", True, quiet, T, now, last_change_at=now - 301).action == "demote"
    # one busy interval in the window keeps it
    busy = series([0.2] * 6 + [3] + [0.2] * 6)
    assert decide("Auto", True, busy, T, busy[-1].at, None).action == "hold"


def test_burst_after_demotion_does_not_promote_within_dwell() -> None:
    burst = series([20] * 10)
    now = burst[-1].at
    assert decide("Auto", False, burst, T, now, last_change_at=now - 60).action == "hold"
    assert decide("Auto", False, burst, T, now, last_change_at=now - 400).action == "promote"


def test_always_and_never_ignore_traffic_and_dwell() -> None:
    idle = series([0] * 20)
    assert decide("Always", False, idle, T, 200, last_change_at=199).action == "promote"
    assert decide("Always", True, idle, T, 200, None).action == "hold"
    hot = series([100] * 20)
    assert decide("Never", True, hot, T, 200, last_change_at=199).action == "demote"
    assert decide("Never", False, hot, T, 200, None).action == "hold"


def test_counter_reset_reads_as_restart_from_zero() -> None:
    samples = [Sample(0, 1000), Sample(10, 1080), Sample(20, 30), Sample(30, 110)]
    rates = [r for *_, r in interval_rates(samples)]
    assert rates == pytest.approx([8.0, 3.0, 8.0])


def test_thresholds_validation_and_from_spec() -> None:
    with pytest.raises(ValueError, match="flap"):
        Thresholds(promote_above_rps=2, demote_below_rps=2)
    with pytest.raises(ValueError):
        Thresholds(promote_after_s=0)
    t = Thresholds.from_spec({"promoteAboveRps": 10, "promoteAfterSeconds": 30,
                              "demoteBelowRps": 0.5, "demoteAfterSeconds": 90})
    assert (t.promote_above_rps, t.promote_after_s, t.demote_below_rps, t.demote_after_s) == (
        10, 30, 0.5, 90)
    assert Thresholds.from_spec(None) == Thresholds()


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
