"""Progressive delivery of an adapter version: ``spec.canary``, its analysis and its steps.

Pure functions, no I/O: the reconciler gathers the facts (readiness of both versions on the
tenant's pods, and their outcome counts, :class:`~loramux.contracts.VersionStats`, summed over
those pods) and applies what :func:`advance` decides.

The API (why a ``canary`` block and not a ``versions`` list with weights): ``spec.version``
stays the one version that is *the* tenant's, as every other part of loramux (placement,
hot tenants, ``status.activeVersion``) already reads it; a canary is a temporary second
version with a plan (steps, analysis) that ends in one of two states, promoted (it becomes
``spec.version``) or rolled back (it goes away). A free list of weights would let two
versions share traffic indefinitely with no verdict, which is not what a rollout is.

Phases (``status.canary.phase``)::

    Pending ─▶ Loading ─▶ Progressing ⇄ Paused
                  │            │  ├─▶ Promoting ─▶ Promoted   (the spec is patched)
                  │            │  └─▶ RolledBack             (analysis failed)
                  └────────────┴────▶ RolledBack             (the canary failed to load)
    (any active phase) ─▶ Aborted                             (spec.canary removed)
    Invalid                                                   (spec.canary is malformed)

``Pending``: the stable version is still rolling out; nothing is loaded for the canary yet.
``Loading``: the canary is desired on every pod of the tenant with weight 0. Each step
holds ``steps[i]`` percent for at least ``analysis.intervalSeconds`` and until the canary
answered ``analysis.minRequests`` requests in that window; then the rules below decide.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loramux.contracts import STATS_BUCKETS, VersionStats
from loramux.names import InvalidName, validate_label

SHA256 = re.compile(r"^[0-9a-f]{64}$")

PENDING = "Pending"
LOADING = "Loading"
PROGRESSING = "Progressing"
PAUSED = "Paused"
PROMOTING = "Promoting"
PROMOTED = "Promoted"
ROLLED_BACK = "RolledBack"
ABORTED = "Aborted"
INVALID = "Invalid"
ACTIVE_PHASES = (PENDING, LOADING, PROGRESSING, PAUSED, PROMOTING)
HISTORY_KEPT = 20


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Analysis:
    """``spec.canary.analysis``: how long a step lasts and what fails it."""

    interval_s: float = 60.0  # intervalSeconds: the least time a step holds
    min_requests: int = 20  # minRequests: the canary's requests a window needs for a verdict
    max_error_rate: float = 0.01  # maxErrorRate: the canary's share of 5xx outcomes
    max_ttft_p99_ratio: float = 1.5  # maxTtftP99Ratio: canary p99 TTFT / stable p99 TTFT
    max_latency_p99_ratio: float = 1.5  # maxLatencyP99Ratio: the same for end-to-end latency
    # minLatencyDeltaSeconds: a p99 this close to the stable one never fails (the
    # histograms' resolution, and noise at low latencies)
    min_latency_delta_s: float = 0.25


@dataclass(frozen=True)
class CanarySpec:
    version: str
    uri: str
    sha256: str | None = None
    steps: tuple[int, ...] = (10, 50, 100)
    analysis: Analysis = field(default_factory=Analysis)
    paused: bool = False


_ANALYSIS_FIELDS: dict[str, tuple[str, type, float, float]] = {
    # CRD name -> (attribute, type, minimum, maximum)
    "intervalSeconds": ("interval_s", float, 1, 86_400),
    "minRequests": ("min_requests", int, 1, 1_000_000),
    "maxErrorRate": ("max_error_rate", float, 0, 1),
    "maxTtftP99Ratio": ("max_ttft_p99_ratio", float, 1, 1000),
    "maxLatencyP99Ratio": ("max_latency_p99_ratio", float, 1, 1000),
    "minLatencyDeltaSeconds": ("min_latency_delta_s", float, 0, 3600),
}


def parse_canary(raw: Any, stable_version: str) -> tuple[CanarySpec | None, str | None]:
    """``spec.canary`` parsed: (spec, None), (None, None) when absent, or (None, why) when
    malformed. A malformed canary never touches the stable version."""
    if raw is None:
        return None, None
    if not isinstance(raw, Mapping):
        return None, "spec.canary must be an object"
    try:
        version = validate_label(raw.get("version"), "spec.canary.version")  # type: ignore[arg-type]
    except InvalidName as exc:
        return None, str(exc)
    if version == stable_version:
        return None, f"spec.canary.version {version!r} is spec.version; a canary is another one"
    source = raw.get("source")
    if not isinstance(source, Mapping):
        return None, "spec.canary.source is required (uri, sha256?)"
    from loramux.operator.model import source_uri_problem  # model imports this module

    problem = source_uri_problem(source.get("uri"))
    if problem is not None:
        return None, ("spec.canary.source.uri must be s3://bucket/prefix/ or file:///path: "
                      f"{problem}")
    sha = source.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not SHA256.fullmatch(sha)):
        return None, "spec.canary.source.sha256 must be 64 lower-case hex digits"
    steps_raw = raw.get("steps", [10, 50, 100])
    if (not isinstance(steps_raw, list) or not 1 <= len(steps_raw) <= 20
            or any(isinstance(s, bool) or not isinstance(s, int) for s in steps_raw)):
        return None, "spec.canary.steps must be a list of 1 to 20 integer percentages"
    steps = tuple(steps_raw)
    if any(not 1 <= s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
        return None, "spec.canary.steps must rise strictly, each from 1 to 100"
    if steps[-1] != 100:
        steps = (*steps, 100)  # promotion is decided at full weight
    analysis_raw = raw.get("analysis") or {}
    if not isinstance(analysis_raw, Mapping):
        return None, "spec.canary.analysis must be an object"
    values: dict[str, Any] = {}
    for name, (attr, kind, low, high) in _ANALYSIS_FIELDS.items():
        if name not in analysis_raw:
            continue
        value = analysis_raw[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                kind is int and not isinstance(value, int)):
            return None, f"spec.canary.analysis.{name} must be a number"
        if not low <= value <= high:
            return None, f"spec.canary.analysis.{name} must be within [{low}, {high}]"
        values[attr] = kind(value)
    paused = raw.get("paused", False)
    if not isinstance(paused, bool):
        return None, "spec.canary.paused must be a boolean"
    return CanarySpec(version=version, uri=str(source["uri"]), sha256=sha, steps=steps,
                      analysis=Analysis(**values), paused=paused), None


# --------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class Counts:
    """Outcome counts of one version (summed over pods, or a difference of two sums)."""

    requests: int = 0
    errors: int = 0
    ttft: tuple[int, ...] = (0,) * (len(STATS_BUCKETS) + 1)
    latency: tuple[int, ...] = (0,) * (len(STATS_BUCKETS) + 1)

    @classmethod
    def of(cls, stats: VersionStats) -> Counts:
        return cls(stats.requests, stats.errors, _fit(stats.ttft), _fit(stats.latency))

    @classmethod
    def from_status(cls, raw: Any) -> Counts | None:
        if not isinstance(raw, Mapping):
            return None
        try:
            return cls(int(raw["requests"]), int(raw["errors"]),
                       _fit([int(v) for v in raw["ttft"]]),
                       _fit([int(v) for v in raw["latency"]]))
        except (KeyError, TypeError, ValueError):
            return None

    def view(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "ttft": list(self.ttft),
                "latency": list(self.latency)}

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.requests + other.requests, self.errors + other.errors,
                      tuple(a + b for a, b in zip(self.ttft, other.ttft, strict=True)),
                      tuple(a + b for a, b in zip(self.latency, other.latency, strict=True)))

    def __sub__(self, other: Counts) -> Counts:
        return Counts(self.requests - other.requests, self.errors - other.errors,
                      tuple(a - b for a, b in zip(self.ttft, other.ttft, strict=True)),
                      tuple(a - b for a, b in zip(self.latency, other.latency, strict=True)))

    @property
    def negative(self) -> bool:
        """A difference that went down: a pod restarted or reloaded (its counts reset)."""
        return (self.requests < 0 or self.errors < 0 or min(self.ttft) < 0
                or min(self.latency) < 0)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else 0.0


def _fit(values: Sequence[int]) -> tuple[int, ...]:
    n = len(STATS_BUCKETS) + 1
    return tuple(list(values)[:n]) + (0,) * max(0, n - len(values))


def quantile(buckets: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of per-bucket counts over :data:`STATS_BUCKETS` (plus overflow),
    interpolated linearly inside its bucket as Prometheus' ``histogram_quantile`` does;
    None without observations. The overflow bucket answers its lower bound."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for i, count in enumerate(buckets):
        upper = STATS_BUCKETS[i] if i < len(STATS_BUCKETS) else math.inf
        if count > 0 and seen + count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
        lower = upper
    return lower


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class RuleResult:
    rule: str
    passed: bool
    message: str


def error_rate_rule(canary: Counts, analysis: Analysis) -> RuleResult:
    """The canary's share of server-side failures stays at most ``maxErrorRate``."""
    rate = canary.error_rate
    return RuleResult("errorRate", rate <= analysis.max_error_rate,
                      f"error rate {rate:.1%} ({canary.errors}/{canary.requests}), "
                      f"limit {analysis.max_error_rate:.1%}")


def _p99_rule(name: str, label: str, canary: Sequence[int], stable: Sequence[int],
              ratio: float, min_delta: float) -> RuleResult:
    mine, theirs = quantile(canary, 0.99), quantile(stable, 0.99)
    if mine is None:
        return RuleResult(name, True, f"{label} p99: no canary observations")
    if theirs is None:
        return RuleResult(name, True, f"{label} p99 {mine:.3f}s: no stable observations to "
                                      "compare with")
    bad = mine > theirs * ratio and mine - theirs > min_delta
    return RuleResult(name, not bad, f"{label} p99 {mine:.3f}s vs stable {theirs:.3f}s "
                                     f"(limit x{ratio:g}, +{min_delta:g}s)")


def ttft_rule(canary: Counts, stable: Counts, analysis: Analysis) -> RuleResult:
    """The canary's p99 time to first token is at most ``maxTtftP99Ratio`` times the
    stable version's (and more than ``minLatencyDeltaSeconds`` above it, to fail)."""
    return _p99_rule("ttftP99", "TTFT", canary.ttft, stable.ttft,
                     analysis.max_ttft_p99_ratio, analysis.min_latency_delta_s)


def latency_rule(canary: Counts, stable: Counts, analysis: Analysis) -> RuleResult:
    """The same as :func:`ttft_rule` for end-to-end latency of successful requests."""
    return _p99_rule("latencyP99", "latency", canary.latency, stable.latency,
                     analysis.max_latency_p99_ratio, analysis.min_latency_delta_s)


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "passed" | "failed" | "inconclusive"
    results: tuple[RuleResult, ...]
    figures: dict[str, Any]

    @property
    def message(self) -> str:
        return "; ".join(r.message for r in self.results)


def evaluate(canary: Counts, stable: Counts, analysis: Analysis) -> Verdict:
    """One window's verdict. ``canary``: the canary's counts in the window; ``stable``: the
    stable version's since the rollout started, or since it was loaded when that is too
    little (at full canary weight it gets no traffic, so the window alone would leave
    nothing to compare with)."""
    figures = {
        "requests": canary.requests, "errors": canary.errors,
        "errorRate": round(canary.error_rate, 4),
        "ttftP99": _rounded(quantile(canary.ttft, 0.99)),
        "latencyP99": _rounded(quantile(canary.latency, 0.99)),
        "stableRequests": stable.requests,
        "stableErrorRate": round(stable.error_rate, 4),
        "stableTtftP99": _rounded(quantile(stable.ttft, 0.99)),
        "stableLatencyP99": _rounded(quantile(stable.latency, 0.99)),
    }
    if canary.requests < analysis.min_requests:
        return Verdict("inconclusive", (RuleResult(
            "minRequests", True, f"{canary.requests}/{analysis.min_requests} requests"),),
            figures)
    results = (error_rate_rule(canary, analysis), ttft_rule(canary, stable, analysis),
               latency_rule(canary, stable, analysis))
    return Verdict("passed" if all(r.passed for r in results) else "failed", results, figures)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# --------------------------------------------------------------------------- the steps


@dataclass(frozen=True)
class CanaryFacts:
    """What the reconciler saw of the tenant's pods this pass."""

    stable_ready: bool  # spec.version is Ready and active on every placed pod
    canary_ready: bool  # the canary is Ready on every placed pod
    canary_failed: str | None = None  # a placed pod failed to load the canary: why
    canary: Counts | None = None  # summed over the placed pods (None: a pod did not say)
    stable: Counts | None = None


@dataclass
class CanaryStep:
    """What :func:`advance` decided: ``status.canary`` (None: leave it out), the canary's
    weight on the pods (None: the canary is not desired), Events, and whether to promote."""

    status: dict[str, Any] | None
    weight: int | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)
    promote: bool = False
    degraded: str | None = None  # a rollback's message: the resource reports Degraded
    transient: bool = False  # look again soon (a window is open, something is loading)


def _iso(when: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def advance(spec: CanarySpec | None, error: str | None, prev: Mapping[str, Any] | None,
            facts: CanaryFacts, now: float) -> CanaryStep:
    """The next state of a tenant's canary (see the module doc)."""
    prev = dict(prev or {})
    phase = prev.get("phase")
    if error is not None:
        status = {"phase": INVALID, "message": error[:1000], "weight": 0,
                  "version": prev.get("version"), "history": prev.get("history") or []}
        events = [] if phase == INVALID and prev.get("message") == status["message"] else [
            ("Warning", "CanaryInvalid", error[:1000])]
        return CanaryStep(status, None, events)
    if spec is None:
        if phase in (PENDING, LOADING, PROGRESSING, PAUSED):
            status = {**prev, "phase": ABORTED, "weight": 0,
                      "message": "spec.canary was removed: the canary is evicted"}
            return CanaryStep(status, None, [("Normal", "CanaryAborted", status["message"])])
        if phase == PROMOTING:
            status = {**prev, "phase": PROMOTED, "weight": 100,
                      "message": f"{prev.get('version')} is spec.version now"}
            return CanaryStep(status, None)
        if phase == INVALID:
            return CanaryStep(None)
        return CanaryStep(prev or None)

    fresh = (not prev or prev.get("version") != spec.version
             or phase in (ABORTED, INVALID, None))
    if fresh:
        prev = {"version": spec.version, "phase": PENDING, "weight": 0, "step": -1,
                "startedAt": _iso(now), "history": []}
        phase = PENDING
    status = {**prev, "steps": list(spec.steps)}

    def roll_back(message: str, figures: Mapping[str, Any] | None = None) -> CanaryStep:
        status.update(phase=ROLLED_BACK, weight=0, message=message[:1000],
                      finishedAt=_iso(now))
        if figures is not None:
            status["analysis"] = dict(figures)
        _record(status, now, "Failed", message, figures)
        return CanaryStep(status, None, [("Warning", "CanaryRolledBack", message[:1000])],
                          degraded=message[:1000])

    if phase == ROLLED_BACK:
        return CanaryStep(status, None, degraded=str(status.get("message") or "rolled back"))
    if phase == PROMOTED:
        return CanaryStep(status, None)
    if phase == PROMOTING:
        return CanaryStep(status, 100, promote=True, transient=True)
    if phase == PENDING:
        if not facts.stable_ready:
            status["message"] = "waiting for spec.version to be Ready on every pod"
            return CanaryStep(status, None, transient=True)
        status.update(phase=LOADING, message=f"loading {spec.version} beside the stable "
                                             "version on every pod", weight=0)
        return CanaryStep(status, 0, [("Normal", "CanaryLoading", status["message"])],
                          transient=True)
    if facts.canary_failed is not None:
        return roll_back(f"{spec.version} failed to load: {facts.canary_failed}")
    if phase == LOADING:
        if not (facts.canary_ready and facts.stable_ready and facts.canary is not None
                and facts.stable is not None):
            return CanaryStep(status, 0, transient=True)
        return _start_step(status, spec, 0, facts, now)
    if spec.paused:
        if phase != PAUSED:
            status.update(phase=PAUSED, message=f"paused at {status.get('weight')}%")
            return CanaryStep(status, int(status.get("weight") or 0),
                              [("Normal", "CanaryPaused", status["message"])])
        return CanaryStep(status, int(status.get("weight") or 0))
    step = int(status.get("step") or 0)
    if phase == PAUSED:  # resumed: the step's window starts again
        return _start_step(status, spec, step, facts, now, event="CanaryResumed")
    # PROGRESSING
    weight = int(status.get("weight") or 0)
    if facts.canary is None or facts.stable is None:
        return CanaryStep(status, weight, transient=True)  # a pod did not report
    base_canary = Counts.from_status((status.get("window") or {}).get("canary"))
    base_stable = Counts.from_status(status.get("stableBaseline"))
    opened = float((status.get("window") or {}).get("openedAt") or 0)
    if base_canary is None or base_stable is None:
        return _start_step(status, spec, step, facts, now)
    window = facts.canary - base_canary
    stable = facts.stable - base_stable
    if not stable.negative and stable.requests < spec.analysis.min_requests:
        # Too little stable traffic since the rollout began (a quiet tenant, or the canary
        # already takes most of it): compare with everything the stable answered here.
        stable = facts.stable
    if window.negative or stable.negative:
        # A pod's counts were reset (restart, reload): start the step's window again.
        return _start_step(status, spec, step, facts, now, restart=True)
    verdict = evaluate(window, stable, spec.analysis)
    status["analysis"] = verdict.figures
    if now - opened < spec.analysis.interval_s or verdict.outcome == "inconclusive":
        status["message"] = (f"step {step + 1}/{len(spec.steps)} at {weight}%: "
                             f"{verdict.message}")
        return CanaryStep(status, weight, transient=True)
    if verdict.outcome == "failed":
        failed = "; ".join(r.message for r in verdict.results if not r.passed)
        return roll_back(f"analysis failed at {weight}%: {failed}", verdict.figures)
    _record(status, now, "Passed", verdict.message, verdict.figures)
    if step + 1 >= len(spec.steps):
        status.update(phase=PROMOTING, weight=100,
                      message=f"every step passed: promoting {spec.version}")
        return CanaryStep(status, 100, [("Normal", "CanaryPromoted", status["message"])],
                          promote=True, transient=True)
    return _start_step(status, spec, step + 1, facts, now, event="CanaryStep",
                       passed=verdict.message)


def _start_step(status: dict[str, Any], spec: CanarySpec, step: int, facts: CanaryFacts,
                now: float, *, event: str = "CanaryStep", passed: str | None = None,
                restart: bool = False) -> CanaryStep:
    assert facts.canary is not None and facts.stable is not None
    weight = spec.steps[step]
    first = status.get("phase") == LOADING
    status.update(phase=PROGRESSING, step=step, weight=weight,
                  window={"openedAt": now, "canary": facts.canary.view()})
    if first or "stableBaseline" not in status:
        status["stableBaseline"] = facts.stable.view()
    status["message"] = (f"step {step + 1}/{len(spec.steps)}: {weight}% to {spec.version}"
                         + (" (window restarted: a pod's counts were reset)" if restart
                            else ""))
    events = []
    if not restart:
        text = status["message"] + (f" (previous step: {passed})" if passed else "")
        events.append(("Normal", "CanaryStarted" if first else event, text[:1000]))
    return CanaryStep(status, weight, events, transient=True)


def _record(status: dict[str, Any], now: float, result: str, message: str,
            figures: Mapping[str, Any] | None) -> None:
    """Append the finished step to ``status.canary.history`` (the last 20 kept)."""
    window = status.get("window") or {}
    opened = window.get("openedAt")
    entry: dict[str, Any] = {
        "step": int(status.get("step") or 0) + 1, "weight": int(status.get("weight") or 0),
        "result": result, "finishedAt": _iso(now), "message": message[:500],
    }
    if opened:
        entry["startedAt"] = _iso(float(opened))
    if figures:
        entry.update({k: v for k, v in figures.items() if v is not None})
    history = [*(status.get("history") or []), entry]
    status["history"] = history[-HISTORY_KEPT:]


__all__ = [
    "ACTIVE_PHASES",
    "Analysis",
    "CanaryFacts",
    "CanarySpec",
    "CanaryStep",
    "Counts",
    "RuleResult",
    "Verdict",
    "advance",
    "error_rate_rule",
    "evaluate",
    "latency_rule",
    "parse_canary",
    "quantile",
    "ttft_rule",
]
