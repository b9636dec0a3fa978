"""The pure parts of the benchmark suite (``bench/suite.py``): request plans drawn from
fixed seeds, percentiles and summaries of measured requests, the issue-18 targets, and the
replacement of the suite's section in ``docs/benchmarks.md``.

Nothing here talks to a server or imports torch, so ``tests/test_bench_suite.py`` checks it
in milliseconds. Every draw uses its own ``random.Random`` seeded from a string, so a plan is
the same on every machine and every Python (string seeds hash through SHA-512).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

BEGIN_MARKER = "<!-- suite:begin -->"
END_MARKER = "<!-- suite:end -->"


# --------------------------------------------------------------------------- draws
def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of ranks 0..n-1: proportional to 1 / (rank + 1) ** s, summing to 1."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if s < 0:
        raise ValueError("s must be >= 0")
    raw = [1.0 / (i + 1) ** s for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def zipf_sample(n: int, s: float, k: int, seed: int | str) -> list[int]:
    """``k`` ranks in [0, n) drawn with Zipf(s) popularity (rank 0 the most popular)."""
    rng = random.Random(f"zipf:{seed}")
    return rng.choices(range(n), weights=zipf_weights(n, s), k=k)


def poisson_schedule(rate: float, duration_s: float, seed: int | str) -> list[float]:
    """Arrival times in [0, duration_s) of a Poisson process of ``rate`` per second."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    rng = random.Random(f"poisson:{seed}:{rate!r}")
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def draw_lengths(k: int, lo: int, hi: int, seed: int | str) -> list[int]:
    """``k`` integers drawn uniformly from [lo, hi] (both included)."""
    if not 1 <= lo <= hi:
        raise ValueError("need 1 <= lo <= hi")
    rng = random.Random(f"lengths:{seed}")
    return [rng.randint(lo, hi) for _ in range(k)]


@dataclass(frozen=True)
class PlannedRequest:
    at_s: float  # offset from the start of the run
    tenant: int  # popularity rank (0 = the most popular)
    prompt_tokens: int
    output_tokens: int


def open_loop_plan(rate: float, duration_s: float, tenants: int, zipf_s: float,
                   lengths: tuple[int, int], seed: int) -> list[PlannedRequest]:
    """The skewed open-loop workload at one offered rate.

    Arrivals depend on the rate; tenants and lengths are drawn from streams that do not, so
    the k-th request asks for the same tenant and lengths at every rate (a higher rate only
    brings it sooner and adds requests after it).
    """
    times = poisson_schedule(rate, duration_s, seed)
    k = len(times)
    who = zipf_sample(tenants, zipf_s, k, seed)
    ins = draw_lengths(k, *lengths, seed=f"{seed}:in")
    outs = draw_lengths(k, *lengths, seed=f"{seed}:out")
    return [PlannedRequest(t, w, i, o) for t, w, i, o in zip(times, who, ins, outs, strict=True)]


def uniform_tenants(k: int, tenants: int, seed: int | str) -> list[int]:
    """``k`` tenant indices drawn uniformly from [0, tenants)."""
    rng = random.Random(f"uniform:{seed}")
    return [rng.randrange(tenants) for _ in range(k)]


# --------------------------------------------------------------------------- summaries
def percentile(values: Sequence[float], pct: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None if empty."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * pct / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds from the start of the run."""

    tenant: str | None
    sent_s: float
    ttft_s: float | None = None  # to the first streamed token (non-streaming: the latency)
    latency_s: float | None = None  # None: not finished (cut off, or failed)
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    warm: bool | None = None  # churn: the adapter was on the device when it was sent
    # streamed: the longest wait between two tokens after the first (a stall, e.g. while
    # other requests' prompts are prefilled)
    max_gap_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency_s is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Summary:
    requests: int
    finished: int
    failed: int
    unfinished: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    p50_ttft_s: float | None
    p99_ttft_s: float | None
    p50_latency_s: float | None
    p99_latency_s: float | None
    # Requests still waiting for their first token (or their end) when the run was cut off
    # count with the time they had waited: such a percentile is only a lower bound.
    p50_ttft_lower: bool = False
    p99_ttft_lower: bool = False
    p50_latency_lower: bool = False
    p99_latency_lower: bool = False
    slo_ttft_s: float | None = None
    slo_share: float | None = None
    # over finished streamed requests: each one's longest wait between two tokens
    p50_max_gap_s: float | None = None
    p99_max_gap_s: float | None = None
    failure_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(records: Iterable[RequestRecord], wall_s: float, cutoff_s: float | None = None,
              slo_ttft_s: float | None = None) -> Summary:
    """Throughput and percentiles of one run.

    Failed requests (an HTTP error) are left out of the percentiles and count as misses of
    the SLO. Requests cut off at ``cutoff_s`` enter the percentiles with the time they had
    waited (a lower bound of their real value) and the result says so.
    """
    recs = list(records)
    failed = [r for r in recs if r.error is not None]
    live = [r for r in recs if r.error is None]
    finished = [r for r in live if r.latency_s is not None]
    unfinished = [r for r in live if r.latency_s is None]
    end = cutoff_s if cutoff_s is not None else wall_s
    ttfts: list[float] = []
    ttft_censored: list[float] = []
    for r in live:
        if r.ttft_s is not None:
            ttfts.append(r.ttft_s)
        else:
            ttft_censored.append(max(0.0, end - r.sent_s))
    lats = [r.latency_s for r in finished if r.latency_s is not None]
    lat_censored = [max(0.0, end - r.sent_s) for r in unfinished]

    def pct(known: list[float], censored: list[float], p: float) -> tuple[float | None, bool]:
        # A censored value (a wait so far) can only grow; the percentile moves with it
        # unless it already lies above both closest ranks the percentile interpolates.
        xs = sorted(known + censored)
        value = percentile(xs, p)
        if not censored or value is None:
            return value, False
        hi = min(math.floor((len(xs) - 1) * p / 100.0) + 1, len(xs) - 1)
        return value, min(censored) <= xs[hi]

    p50t, lb50t = pct(ttfts, ttft_censored, 50)
    p99t, lb99t = pct(ttfts, ttft_censored, 99)
    p50l, lb50l = pct(lats, lat_censored, 50)
    p99l, lb99l = pct(lats, lat_censored, 99)
    tokens = sum(r.completion_tokens for r in live)
    gaps = sorted(r.max_gap_s for r in finished if r.max_gap_s is not None)
    share = None
    if slo_ttft_s is not None and recs:
        share = sum(1 for r in live if r.ttft_s is not None and r.ttft_s <= slo_ttft_s) / len(recs)
    return Summary(
        requests=len(recs), finished=len(finished), failed=len(failed),
        unfinished=len(unfinished), completion_tokens=tokens, wall_s=wall_s,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        p50_ttft_s=p50t, p99_ttft_s=p99t, p50_latency_s=p50l, p99_latency_s=p99l,
        p50_ttft_lower=lb50t, p99_ttft_lower=lb99t, p50_latency_lower=lb50l,
        p99_latency_lower=lb99l,
        slo_ttft_s=slo_ttft_s, slo_share=share,
        p50_max_gap_s=percentile(gaps, 50), p99_max_gap_s=percentile(gaps, 99),
        failure_samples=[r.error or "" for r in failed[:3]],
    )


# --------------------------------------------------------------------------- targets
@dataclass
class Target:
    name: str
    measured: float | None  # the ratio or the time the target is about
    threshold: float
    comparison: str  # ">=", "<", "<="
    met: bool | None  # None: could not be evaluated (the reason says why)
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(value: float, comparison: str, threshold: float) -> bool:
    if comparison == ">=":
        return value >= threshold
    if comparison == "<=":
        return value <= threshold
    if comparison == "<":
        return value < threshold
    raise ValueError(comparison)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def evaluate_targets(closed: dict[str, dict[str, dict[int, float]]],
                     open_loop: dict[str, dict[float, float | None]],
                     churn: dict[str, float | None] | None,
                     distinct_bs: Sequence[int] = (8, 16),
                     seed_p99_limit_s: float = 10.0,
                     lmx_p99_limit_s: float = 2.0) -> list[Target]:
    """The issue's targets as ratios of numbers measured in one run.

    ``closed[workload][system][B]`` = tokens/s (workload "distinct" or "identical"; systems
    "loramux", "base", "seed", "vllm"); ``open_loop[system][rate]`` = p99 TTFT in seconds;
    ``churn`` = {"warm_p99_no_churn_s": ..., "warm_p99_churn_s": ...}.
    """
    out: list[Target] = []

    def ratio_target(workload: str, b: int, other: str, threshold: float) -> None:
        lmx = closed.get(workload, {}).get("loramux", {}).get(b)
        ref = closed.get(workload, {}).get(other, {}).get(b)
        name = f"{workload} B={b}: loramux / {other}"
        value = _ratio(lmx, ref)
        if value is None:
            why = "loramux not measured" if lmx is None else f"{other} not measured"
            out.append(Target(name, None, threshold, ">=", None, why))
            return
        out.append(Target(name, value, threshold, ">=", _check(value, ">=", threshold),
                          f"{lmx:.1f} / {ref:.1f} tok/s"))

    for b in distinct_bs:
        ratio_target("distinct", b, "base", 0.85)
        ratio_target("distinct", b, "seed", 6.0)
        ratio_target("distinct", b, "vllm", 2.0)
    for b in sorted(closed.get("identical", {}).get("loramux", {})):
        ratio_target("identical", b, "base", 0.9)

    name = (f"open loop: loramux p99 TTFT where the seed's p99 TTFT first exceeds "
            f"{seed_p99_limit_s:g} s")
    seed = open_loop.get("seed", {})
    lmx_rates = open_loop.get("loramux", {})
    over = sorted(r for r, v in seed.items() if v is not None and v > seed_p99_limit_s)
    if not seed or not lmx_rates:
        out.append(Target(name, None, lmx_p99_limit_s, "<", None,
                          "seed or loramux not measured in the open loop"))
    elif not over:
        known = sorted(r for r, v in seed.items() if v is not None)
        unknown = sorted(r for r, v in seed.items() if v is None)
        parts = []
        if known:
            parts.append(f"the seed's p99 TTFT stayed under {seed_p99_limit_s:g} s at "
                         f"{', '.join(f'{r:.3g}' for r in known)}/s")
        if unknown:
            parts.append(f"it is unknown at {', '.join(f'{r:.3g}' for r in unknown)}/s (no "
                         "request, or requests cut off before the limit)")
        detail = "; ".join(parts)
        out.append(Target(name, None, lmx_p99_limit_s, "<", None, detail))
    else:
        rate = over[0]
        value = lmx_rates.get(rate)
        if value is None:
            out.append(Target(name, None, lmx_p99_limit_s, "<", None,
                              f"loramux not measured at {rate:.3g}/s"))
        else:
            out.append(Target(name, value, lmx_p99_limit_s, "<",
                              _check(value, "<", lmx_p99_limit_s),
                              f"at {rate:.3g} req/s: seed p99 TTFT {seed[rate]:.1f} s, "
                              f"loramux {value:.2f} s"))

    name = "churn: warm p99 TTFT with churn / without"
    with_c = (churn or {}).get("warm_p99_churn_s")
    without = (churn or {}).get("warm_p99_no_churn_s")
    value = _ratio(with_c, without)
    if value is None:
        out.append(Target(name, None, 1.5, "<=", None, "churn not measured (or no warm "
                                                       "request in the churn run)"))
    else:
        out.append(Target(name, value, 1.5, "<=", _check(value, "<=", 1.5),
                          f"{with_c:.3f} s / {without:.3f} s"))
    return out


# --------------------------------------------------------------------------- docs
def replace_section(text: str, body: str, begin: str = BEGIN_MARKER,
                    end: str = END_MARKER) -> str:
    """``text`` with what lies between the markers replaced by ``body``; the markers are
    appended at the end when absent. Text outside the markers is kept byte for byte."""
    block = f"{begin}\n{body.strip(chr(10))}\n{end}"
    i = text.find(begin)
    j = text.find(end, i + len(begin)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        return text[:i] + block + text[j + len(end):]
    if i >= 0 or text.find(end) >= 0:
        raise ValueError("only one of the suite markers is present; fix the file by hand")
    sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return f"{text}{sep}{block}\n"


def rates_from_saturation(saturation: float, fractions: Sequence[float]) -> list[float]:
    """Offered rates (requests/s) as fractions of a saturation rate, rounded to 4 digits."""
    return [round(saturation * f, 4) for f in fractions]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None
