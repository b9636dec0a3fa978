"""When a tenant gets its own merged Deployment: a pure function of its request-rate history.

The operator scrapes ``loramux_requests_total{tenant=...}`` (every outcome, forwarded ones
included, summed over the pool's pods) on each timer tick and appends one
:class:`Sample` per tenant. :func:`decide` then says ``promote``, ``demote`` or ``hold``:

* ``Always`` promotes and ``Never`` demotes, at once;
* ``Auto`` promotes when every rate measured over the last ``promote_after_s`` seconds is
  above ``promote_above_rps``, and demotes when every rate over the last
  ``demote_after_s`` seconds is below ``demote_below_rps``;
* hysteresis: ``demote_below_rps`` must be lower than ``promote_above_rps``, so a rate
  between the two never changes anything;
* dwell: in ``Auto`` no change happens within ``min_dwell_s`` of the previous one, so a
  burst right after a demotion does not promote again at once;
* a window counts only when the samples cover it (an operator that restarted and has ten
  seconds of history does not decide about a sixty-second window), and a gap between two
  samples longer than ``max_gap_s`` (missed scrapes) resets the evidence.

Counter resets (a pod restarted) are read as a restart from zero, like Prometheus' rate().
No I/O here: the operator owns scraping and time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

Mode = Literal["Never", "Always", "Auto"]
Action = Literal["promote", "demote", "hold"]


@dataclass(frozen=True)
class Thresholds:
    promote_above_rps: float = 5.0
    promote_after_s: float = 60.0
    demote_below_rps: float = 1.0
    demote_after_s: float = 300.0
    min_dwell_s: float = 300.0
    max_gap_s: float = 120.0

    def __post_init__(self) -> None:
        if self.demote_below_rps >= self.promote_above_rps:
            raise ValueError(
                f"demoteBelowRps ({self.demote_below_rps}) must be lower than "
                f"promoteAboveRps ({self.promote_above_rps}), or the tenant would flap")
        for name in ("promote_after_s", "demote_after_s", "max_gap_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.min_dwell_s < 0 or self.promote_above_rps <= 0 or self.demote_below_rps < 0:
            raise ValueError("thresholds must not be negative")

    @classmethod
    def from_spec(cls, dedicated: dict | None) -> Thresholds:
        """From ``spec.dedicated`` of a LoraAdapter (camelCase keys; absent = default)."""
        d = dedicated or {}
        defaults = cls()
        return cls(
            promote_above_rps=float(d.get("promoteAboveRps", defaults.promote_above_rps)),
            promote_after_s=float(d.get("promoteAfterSeconds", defaults.promote_after_s)),
            demote_below_rps=float(d.get("demoteBelowRps", defaults.demote_below_rps)),
            demote_after_s=float(d.get("demoteAfterSeconds", defaults.demote_after_s)),
            min_dwell_s=float(d.get("minDwellSeconds", defaults.min_dwell_s)),
        )


@dataclass(frozen=True)
class Sample:
    at: float  # seconds (any monotonic clock the caller keeps)
    requests_total: float  # the tenant's request counter summed over the pool


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    rate_rps: float | None = None


def interval_rates(samples: list[Sample]) -> list[tuple[float, float, float]]:
    """``(start, end, requests/s)`` between consecutive samples; a counter that went down
    restarted from zero."""
    out = []
    for before, after in pairwise(samples):
        span = after.at - before.at
        if span <= 0:
            continue
        delta = after.requests_total - before.requests_total
        if delta < 0:
            delta = after.requests_total
        out.append((before.at, after.at, delta / span))
    return out


def sustained(samples: list[Sample], now: float, window_s: float, max_gap_s: float,
              above: float | None = None, below: float | None = None) -> tuple[bool, float | None]:
    """Whether every rate in the last ``window_s`` is above ``above`` (or below ``below``),
    with the window covered by samples without a gap longer than ``max_gap_s``.
    Returns the verdict and the mean rate over the window (None without data)."""
    start = now - window_s
    rates = [r for r in interval_rates(samples) if r[1] > start]
    if not rates:
        return False, None
    covered = rates[0][0] <= start
    gaps = any(end - begin > max_gap_s for begin, end, _ in rates)
    total_time = sum(end - max(begin, start) for begin, end, _ in rates)
    mean = sum(rate * (end - max(begin, start)) for begin, end, rate in rates) / total_time
    if not covered or gaps:
        return False, mean
    if above is not None:
        return all(rate > above for *_, rate in rates), mean
    assert below is not None
    return all(rate < below for *_, rate in rates), mean


def decide(mode: Mode, dedicated: bool, samples: list[Sample], thresholds: Thresholds,
           now: float, last_change_at: float | None) -> Decision:
    """What to do with one tenant now. ``dedicated`` is whether it has a dedicated
    Deployment; ``last_change_at`` when it was last promoted or demoted (None: unknown)."""
    if mode == "Never":
        return (Decision("demote", "mode Never") if dedicated
                else Decision("hold", "mode Never"))
    if mode == "Always":
        return (Decision("hold", "mode Always") if dedicated
                else Decision("promote", "mode Always"))
    t = thresholds
    if last_change_at is not None and now - last_change_at < t.min_dwell_s:
        return Decision("hold", f"changed {now - last_change_at:.0f}s ago, dwell "
                                f"{t.min_dwell_s:.0f}s")
    if not dedicated:
        ok, mean = sustained(samples, now, t.promote_after_s, t.max_gap_s,
                             above=t.promote_above_rps)
        if ok:
            return Decision("promote", f"above {t.promote_above_rps} req/s for "
                                       f"{t.promote_after_s:.0f}s", mean)
        return Decision("hold", "below the promotion threshold or not enough history", mean)
    ok, mean = sustained(samples, now, t.demote_after_s, t.max_gap_s, below=t.demote_below_rps)
    if ok:
        return Decision("demote", f"below {t.demote_below_rps} req/s for "
                                  f"{t.demote_after_s:.0f}s", mean)
    return Decision("hold", "above the demotion threshold or not enough history", mean)


class RateHistory:
    """Samples per tenant, trimmed to what the longest window needs."""

    def __init__(self, keep_s: float = 3600.0) -> None:
        self.keep_s = keep_s
        self._samples: dict[str, deque[Sample]] = {}

    def add(self, tenant: str, sample: Sample) -> None:
        samples = self._samples.setdefault(tenant, deque())
        if samples and sample.at <= samples[-1].at:
            return
        samples.append(sample)
        while len(samples) > 2 and samples[1].at < sample.at - self.keep_s:
            samples.popleft()

    def get(self, tenant: str) -> list[Sample]:
        return list(self._samples.get(tenant, ()))

    def tenants(self) -> list[str]:
        return list(self._samples)

    def forget(self, tenant: str) -> None:
        self._samples.pop(tenant, None)


__all__ = ["Decision", "RateHistory", "Sample", "Thresholds", "decide", "interval_rates",
           "sustained"]
