"""When a tenant gets its own merged Deployment: a pure function of its token-rate history.

What a tenant costs is the tokens it is served, not how many requests it sends: a thousand
one-token requests are cheap, ten 4,000-token ones are not. On each timer tick the operator
scrapes, from every pool pod's per-tenant metrics port, ``loramux_prompt_tokens_total`` +
``loramux_completion_tokens_total`` + ``loramux_forwarded_tokens_total`` (prompt plus
generated tokens of the requests the pool forwarded to the tenant's dedicated deployment,
read from their usage), sums them over the pool's pods and appends one :class:`Sample` per
tenant. :func:`decide` then says ``promote``, ``demote`` or ``hold``:

* ``Always`` promotes and ``Never`` demotes, at once;
* ``Auto`` promotes when every token rate measured over the last ``promote_after_s``
  seconds is above ``promote_above_tps``, and demotes when every rate over the last
  ``demote_after_s`` seconds is below ``demote_below_tps``;
* hysteresis: ``demote_below_tps`` must be lower than ``promote_above_tps``, so a rate
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
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

Mode = Literal["Never", "Always", "Auto"]
Action = Literal["promote", "demote", "hold"]

# spec.dedicated fields of the request-rate policy (before issue 16), and what replaced them.
# A request rate cannot be turned into a token rate without knowing the requests' sizes, so
# they are refused with the new name rather than guessed (see :meth:`Thresholds.from_spec`).
RENAMED_FIELDS = {"promoteAboveRps": "promoteAboveTokensPerSecond",
                  "demoteBelowRps": "demoteBelowTokensPerSecond"}


def renamed_field_problem(dedicated: Mapping[str, Any] | None) -> str | None:
    """Why ``spec.dedicated`` still uses a removed request-rate field, or None."""
    old = [name for name in RENAMED_FIELDS if name in (dedicated or {})]
    if not old:
        return None
    return "; ".join(
        f"spec.dedicated.{name} was removed: use {RENAMED_FIELDS[name]} (the policy counts "
        "tokens served per second, prompt plus generated, not requests)" for name in old)


@dataclass(frozen=True)
class Thresholds:
    """Token rates are prompt plus generated tokens per second, summed over the pool.

    Defaults: 2000 tokens/s to promote is the old default of 5 requests/s at a typical
    chat request of ~400 tokens (300 prompt, 100 generated): a sizeable share of what one
    GPU serves a 7B-class model at, so a dedicated GPU pays off. 400 tokens/s to demote
    keeps the old 5:1 hysteresis."""

    promote_above_tps: float = 2000.0
    promote_after_s: float = 60.0
    demote_below_tps: float = 400.0
    demote_after_s: float = 300.0
    min_dwell_s: float = 300.0
    max_gap_s: float = 120.0

    def __post_init__(self) -> None:
        if self.demote_below_tps >= self.promote_above_tps:
            raise ValueError(
                f"demoteBelowTokensPerSecond ({self.demote_below_tps:g}) must be lower than "
                f"promoteAboveTokensPerSecond ({self.promote_above_tps:g}), or the tenant "
                "would flap")
        for name in ("promote_after_s", "demote_after_s", "max_gap_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.min_dwell_s < 0 or self.promote_above_tps <= 0 or self.demote_below_tps < 0:
            raise ValueError("thresholds must not be negative")

    @classmethod
    def from_spec(cls, dedicated: Mapping[str, Any] | None) -> Thresholds:
        """From ``spec.dedicated`` of a LoraAdapter (camelCase keys; absent = default).
        Raises ValueError for the removed request-rate fields (naming the new ones)."""
        d = dedicated or {}
        problem = renamed_field_problem(d)
        if problem:
            raise ValueError(problem)
        defaults = cls()
        return cls(
            promote_above_tps=float(d.get("promoteAboveTokensPerSecond",
                                          defaults.promote_above_tps)),
            promote_after_s=float(d.get("promoteAfterSeconds", defaults.promote_after_s)),
            demote_below_tps=float(d.get("demoteBelowTokensPerSecond",
                                         defaults.demote_below_tps)),
            demote_after_s=float(d.get("demoteAfterSeconds", defaults.demote_after_s)),
            min_dwell_s=float(d.get("minDwellSeconds", defaults.min_dwell_s)),
        )


@dataclass(frozen=True)
class Sample:
    at: float  # seconds (any monotonic clock the caller keeps)
    tokens_total: float  # the tenant's tokens served (prompt + generated + forwarded), pool sum


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    rate_tps: float | None = None  # mean tokens/s over the window decided on
    invalid: bool = False  # the reason is an invalid spec.dedicated (the policy holds)


def interval_rates(samples: list[Sample]) -> list[tuple[float, float, float]]:
    """``(start, end, tokens/s)`` between consecutive samples; a counter that went down
    restarted from zero."""
    out = []
    for before, after in pairwise(samples):
        span = after.at - before.at
        if span <= 0:
            continue
        delta = after.tokens_total - before.tokens_total
        if delta < 0:
            delta = after.tokens_total
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
    if len(samples) < 2:
        return Decision("hold", "no token counts of this tenant from the pool yet (none "
                                "served, or its pods declare no container port named "
                                "metrics)")
    if not dedicated:
        ok, mean = sustained(samples, now, t.promote_after_s, t.max_gap_s,
                             above=t.promote_above_tps)
        if ok:
            return Decision("promote", f"above {t.promote_above_tps:g} tokens/s for "
                                       f"{t.promote_after_s:.0f}s", mean)
        return Decision("hold", "below the promotion threshold or not enough history", mean)
    ok, mean = sustained(samples, now, t.demote_after_s, t.max_gap_s, below=t.demote_below_tps)
    if ok:
        return Decision("demote", f"below {t.demote_below_tps:g} tokens/s for "
                                  f"{t.demote_after_s:.0f}s", mean)
    return Decision("hold", "above the demotion threshold or not enough history", mean)


class RateHistory:
    """Token-counter samples per tenant, trimmed to what the longest window needs."""

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


__all__ = ["RENAMED_FIELDS", "Decision", "RateHistory", "Sample", "Thresholds", "decide",
           "interval_rates", "renamed_field_problem", "sustained"]
