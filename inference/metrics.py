"""Prometheus metrics of one server process: two registries, both written on observation.

* ``registry`` (``/admin/metrics`` and the ``--metrics-port`` listener): every series, per
  tenant. Counters keep one series per tenant that had traffic (the operator reads the token
  counters per tenant to find hot tenants). Latency histograms are the bulk of a scrape
  (16 buckets each), so they keep a series for at most ``tenant_histograms`` tenants, the
  most recently observed; when a tenant drops out of that set, its buckets are added to the
  ``tenant="_other"`` series, so the per-tenant series plus ``_other`` still add up to the
  totals.
* ``public_registry`` (the public port's ``/metrics``): the same families without the
  ``tenant`` label. Tenant-free sums are updated at observation time, not summed at scrape
  time, so a scrape costs the number of tenant-free series whatever the number of tenants.

Tenant labels only ever carry validated DNS-1123 names (or ``_base`` for the base model,
``_other`` for the histogram overflow; neither is a valid tenant name), so a client cannot
blow up label cardinality with made-up names.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from loramux.contracts import STATS_BUCKETS, VersionStats

BASE_LABEL = "_base"
OTHER_LABEL = "_other"
DEFAULT_TENANT_HISTOGRAMS = 64

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_PUBLIC_SUFFIX = " Summed over tenants on this port; per tenant on the metrics port."


class Metrics:
    def __init__(self, tenant_histograms: int = DEFAULT_TENANT_HISTOGRAMS) -> None:
        """``tenant_histograms``: how many tenants keep their own latency histograms (the
        most recently observed); the others' observations are in ``tenant="_other"``."""
        self.registry = CollectorRegistry()
        self.public_registry = CollectorRegistry()
        r = _BothRegistries(self.registry, self.public_registry)
        self.requests = TenantCounter(
            "loramux_requests_total", "Requests finished, by tenant and outcome.",
            ["tenant", "outcome"], registry=r,
        )
        self.prompt_tokens = TenantCounter(
            "loramux_prompt_tokens_total", "Prompt tokens processed.", ["tenant"], registry=r
        )
        self.completion_tokens = TenantCounter(
            "loramux_completion_tokens_total", "Tokens generated.", ["tenant"], registry=r
        )
        self.ttft = TenantHistogram(
            "loramux_time_to_first_token_seconds", "Submission to first generated token.",
            _LATENCY_BUCKETS, tenant_histograms, registry=r,
        )
        self.e2e = TenantHistogram(
            "loramux_request_latency_seconds", "Submission to last token.",
            _LATENCY_BUCKETS, tenant_histograms, registry=r,
        )
        self.batch_size = Histogram(
            "loramux_batch_size", "Sequences in each decode step.",
            buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64), registry=r,
        )
        self.distinct_adapters = Histogram(
            "loramux_step_distinct_adapters", "Distinct adapters (base included) in each step.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r,
        )
        self.precision = Info(
            "loramux_precision", "Weight format and compute dtype of the base, and why.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "loramux_queue_depth", "Requests waiting to join the batch.", registry=r
        )
        self.running = Gauge("loramux_running_sequences", "Sequences decoding now.", registry=r)
        self.cache_hits = Counter(
            "loramux_adapter_cache_hits_total", "Adapter lookups served by a tier.", ["tier"],
            registry=r,
        )
        self.cache_misses = Counter(
            "loramux_adapter_cache_misses_total", "Adapter lookups a tier could not serve.",
            ["tier"], registry=r,
        )
        self.cache_evictions = Counter(
            "loramux_adapter_cache_evictions_total", "Adapters evicted from a tier.", ["tier"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "loramux_adapter_load_seconds", "Time to bring an adapter into a tier.",
            ["source", "target"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=r,
        )
        self.adapter_load_failures = Counter(
            "loramux_adapter_load_failures_total", "Adapters rejected or failed to load.",
            ["reason"], registry=r,
        )
        self.resident_adapters = Gauge(
            "loramux_resident_adapters", "Adapters resident per tier.", ["tier"], registry=r
        )
        self.resident_bytes = Gauge(
            "loramux_resident_adapter_bytes", "Adapter bytes resident per tier.", ["tier"],
            registry=r,
        )
        # Pre-create the tier series, so dashboards see 0 before the first event, not nothing.
        for tier in ("device", "host", "disk"):
            self.cache_hits.labels(tier)
            self.cache_misses.labels(tier)
            self.cache_evictions.labels(tier)
            self.resident_adapters.labels(tier)
            self.resident_bytes.labels(tier)
        self.forwarded_requests = TenantCounter(
            "loramux_forwarded_requests_total",
            "Requests of a routed (hot) tenant: forwarded to its dedicated deployment "
            "(outcome=forwarded) or served here because it could not answer (fallback).",
            ["tenant", "outcome"], registry=r,
        )
        self.row_failures = TenantCounter(
            "loramux_row_failures_total",
            "Rows ended alone by a fault of their own (stage: prefill, decode or sample); "
            "the rest of the batch went on.",
            ["tenant", "stage"], registry=r,
        )
        self.forwarded_tokens = TenantCounter(
            "loramux_forwarded_tokens_total",
            "Prompt plus generated tokens of a routed (hot) tenant's requests answered by its "
            "dedicated deployment, read from the usage of the forwarded answer.",
            ["tenant"], registry=r,
        )
        self.tenant_limited = TenantCounter(
            "loramux_tenant_limited_total",
            "Requests refused with 429 by a per-tenant limit (max_concurrent, "
            "tokens_per_minute, max_queued).",
            ["tenant", "limit"], registry=r,
        )
        self.requests_shed = TenantCounter(
            "loramux_requests_shed_total",
            "Requests refused with 429 for overload under --max-queue-wait-s: estimated_wait "
            "(refused at submission: the estimated wait for a row exceeded the bound), "
            "queue_wait (ended after waiting longer than the bound).",
            ["tenant", "reason"], registry=r,
        )
        self.auth_failures = Counter(
            "loramux_auth_failures_total",
            "Requests refused for their key: 401 (missing or unknown key) or 403 (the key "
            "does not grant the model asked for). No tenant label: it is not yet trusted.",
            ["status"], registry=r,
        )
        self.peer_forwarded_requests = Counter(
            "loramux_peer_forwarded_requests_total",
            "Requests for a tenant this server does not hold, by outcome: forwarded to a peer "
            "that holds it, holder_failed (one holder skipped, the next tried), holder_busy "
            "(a holder answered 429: the next tried), all_failed, no_holder (the table lists "
            "none Ready), not_held (a forwarded request, not forwarded again), failover_wait "
            "(a request began waiting for a holder), failover_expired (it waited in vain) or "
            "client_gone (its client left while it waited). No tenant label, and not the "
            "tenant's tokens: the holder counts those.",
            ["outcome"], registry=r,
        )
        for outcome in ("forwarded", "holder_failed", "holder_busy", "all_failed", "no_holder",
                        "not_held", "failover_wait", "failover_expired", "client_gone"):
            self.peer_forwarded_requests.labels(outcome)
        self._tenant_load: _TenantLoad | None = None
        self._versions: _CanaryVersions | None = None
        # What loramux_tenant_in_flight reads, kept as it changes instead of walked per
        # scrape: requests in flight per tenant (counted by the engine where it counts them
        # for fair shares) and the tenants with a version on the device (set by the adapter
        # cache with its gauges). Bounded by the queue and batch limits and the device slots.
        self._residents_lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._device_tenants: frozenset[str] = frozenset()
        self.fallback_requests = Counter(
            "loramux_base_fallback_requests_total",
            "Requests for an unknown tenant served by the base model (fallback mode).",
            registry=r,
        )


    def request_started(self, tenant: str) -> None:
        """One more request of ``tenant`` in flight (waiting or running)."""
        with self._residents_lock:
            self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1

    def request_ended(self, tenant: str) -> None:
        with self._residents_lock:
            left = self._in_flight.get(tenant, 0) - 1
            if left > 0:
                self._in_flight[tenant] = left
            else:
                self._in_flight.pop(tenant, None)

    def in_flight_by_tenant(self) -> dict[str, int]:
        """Tenants with requests in flight, and how many: O(tenants in flight)."""
        with self._residents_lock:
            return dict(self._in_flight)

    def set_device_tenants(self, tenants: Iterable[str]) -> None:
        """The tenants with a version on the device now (the adapter cache, on every change
        of the device tier)."""
        device = frozenset(tenants)
        with self._residents_lock:
            self._device_tenants = device

    def device_tenants(self) -> frozenset[str]:
        with self._residents_lock:
            return self._device_tenants

    def track_tenant_load(self, source: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """Publish ``loramux_tenant_in_flight{tenant,residency}`` from ``source`` (read at
        scrape time, never per decode step): (tenant, best tier, requests in flight) for
        the tenants with requests in flight or a version on the device only, so the series
        are bounded by the queue and batch limits plus the device slots, not by the
        number of registered tenants. Once per registry; a second call swaps the source."""
        if self._tenant_load is None:
            self._tenant_load = _TenantLoad(source)
            self.registry.register(self._tenant_load)
            self.public_registry.register(_SummedTenantLoad(self._tenant_load))
        else:
            self._tenant_load.source = source


    def track_canary_versions(
            self, source: Callable[[], Iterable[tuple[str, str, str, VersionStats]]]) -> None:
        """Publish per-version series (``loramux_version_requests_total``,
        ``loramux_version_ttft_seconds``, ``loramux_version_latency_seconds``) on the
        per-tenant registry, from ``source`` read at scrape time: (tenant, version, role,
        stats) for the tenants under a canary split only (role ``stable`` or ``canary``), so
        the series are bounded by two per tenant in a rollout, whatever the number of
        versions held. The same counts are in ``GET /admin/adapters`` (``stats``), which is
        what the operator's analysis reads."""
        if self._versions is None:
            self._versions = _CanaryVersions(source)
            self.registry.register(self._versions)
        else:
            self._versions.source = source


class _BothRegistries(CollectorRegistry):
    """Where :class:`Metrics` registers: a metric without a tenant label goes into both the
    per-tenant and the public registry (it is the same on both); :class:`TenantCounter`
    and :class:`TenantHistogram` register a view in each. A plain prometheus metric with a
    ``tenant`` label is refused, since it would show tenants on the public port."""

    def __init__(self, per_tenant: CollectorRegistry, public: CollectorRegistry) -> None:
        super().__init__()
        self.per_tenant = per_tenant
        self.public = public

    def register(self, collector: Collector) -> None:
        if "tenant" in getattr(collector, "_labelnames", ()):
            raise ValueError(f"{getattr(collector, '_name', collector)!r} has a tenant label: "
                             "use TenantCounter or TenantHistogram")
        self.per_tenant.register(collector)
        self.public.register(collector)

    def unregister(self, collector: Collector) -> None:
        self.per_tenant.unregister(collector)
        self.public.unregister(collector)


class _View(Collector):
    """One registry's view of a tenant metric (``describe`` lets the registry refuse a
    second metric of the same name)."""

    def __init__(self, collect: Callable[[], Metric], describe: Callable[[], Metric]) -> None:
        self._collect = collect
        self._describe = describe

    def collect(self) -> Iterator[Metric]:
        yield self._collect()

    def describe(self) -> Iterator[Metric]:
        yield self._describe()


class TenantCounter:
    """A counter whose first label is ``tenant``, kept twice on each ``inc``: per (tenant,
    other labels) for the per-tenant registry and per (other labels) for the public one, so
    the public scrape reads its sums instead of adding up every tenant's series.

    No ``_created`` series: they would double the per-tenant lines, and a sum over tenants
    has no one creation time (the public port never showed them). Per-tenant counters are
    not bounded: one series per tenant that had traffic (the operator reads the token
    counters per tenant to find hot tenants), cheap next to histograms."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: _BothRegistries) -> None:
        if not labelnames or labelnames[0] != "tenant":
            raise ValueError(f"{name}: the first label must be 'tenant'")
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._per_tenant: dict[tuple[str, ...], float] = {}
        self._summed: dict[tuple[str, ...], float] = {}
        registry.per_tenant.register(_View(self._collect_per_tenant,
                                           lambda: self._family(self.labelnames, "")))
        registry.public.register(_View(self._collect_summed,
                                       lambda: self._family(self.labelnames[1:],
                                                            _PUBLIC_SUFFIX)))

    def labels(self, *values: str) -> _CounterChild:
        """The series of these label values (created at 0, like prometheus_client's)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        with self._lock:
            self._per_tenant.setdefault(key, 0.0)
            self._summed.setdefault(key[1:], 0.0)
        return _CounterChild(self, key)

    def _inc(self, key: tuple[str, ...], amount: float) -> None:
        if amount < 0:
            raise ValueError("counters can only go up")
        with self._lock:
            self._per_tenant[key] = self._per_tenant.get(key, 0.0) + amount
            self._summed[key[1:]] = self._summed.get(key[1:], 0.0) + amount

    def value(self, *values: str) -> float:
        """One per-tenant series' value (0 if it has none)."""
        with self._lock:
            return self._per_tenant.get(tuple(values), 0.0)

    def _family(self, labelnames: Sequence[str], suffix: str) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation + suffix, labels=labelnames)

    def _collect_per_tenant(self) -> Metric:
        family = self._family(self.labelnames, "")
        with self._lock:
            rows = list(self._per_tenant.items())
        for key, value in rows:
            family.add_metric(key, value)
        return family

    def _collect_summed(self) -> Metric:
        family = self._family(self.labelnames[1:], _PUBLIC_SUFFIX)
        with self._lock:
            rows = list(self._summed.items())
        for key, value in rows:
            family.add_metric(key, value)
        return family


class _CounterChild:
    __slots__ = ("_key", "_parent")

    def __init__(self, parent: TenantCounter, key: tuple[str, ...]) -> None:
        self._parent = parent
        self._key = key

    def inc(self, amount: float = 1) -> None:
        self._parent._inc(self._key, amount)


class _Buckets:
    """One histogram series: observations per bucket (not cumulative; the last is +Inf)
    and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total = 0.0

    def add(self, other: _Buckets) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.total += other.total

    def cumulative(self, les: Sequence[str]) -> list[tuple[str, float]]:
        out, running = [], 0
        for le, n in zip(les, self.counts, strict=True):
            running += n
            out.append((le, float(running)))
        return out


class TenantHistogram:
    """A histogram with one label, ``tenant``, with a bounded number of per-tenant series.

    At most ``max_tenants`` tenants, the most recently observed, have their own series;
    observing a tenant outside that set admits it and drops the least recently observed
    one, whose buckets and sum are added to the ``tenant="_other"`` series (and its later
    observations, once readmitted, start a new series from 0: Prometheus reads that as a
    counter reset, which ``rate()`` handles). So the per-tenant series plus ``_other``
    always add up to the sum over tenants, which is kept as its own series for the public
    registry. ``max_tenants=0``: only ``_other``. Every observation is O(buckets), never
    O(tenants)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 max_tenants: int, registry: _BothRegistries) -> None:
        if max_tenants < 0:
            raise ValueError("max_tenants must be >= 0")
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(b) for b in buckets)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"{name}: buckets must increase")
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self.max_tenants = max_tenants
        self._lock = threading.Lock()
        self._tenants: OrderedDict[str, _Buckets] = OrderedDict()  # least recent first
        self._other: _Buckets | None = None
        self._summed = _Buckets(len(self._les))
        self.dropped_out = 0  # tenants whose series went into _other, ever
        registry.per_tenant.register(_View(self._collect_per_tenant,
                                           lambda: self._family(["tenant"], "")))
        registry.public.register(_View(self._collect_summed,
                                       lambda: self._family([], _PUBLIC_SUFFIX)))

    def labels(self, tenant: str) -> _HistogramChild:
        if tenant == OTHER_LABEL:
            raise ValueError(f"{OTHER_LABEL!r} is reserved for the tenants that dropped out")
        return _HistogramChild(self, str(tenant))

    def tenants(self) -> list[str]:
        """The tenants with their own series, least recently observed first."""
        with self._lock:
            return list(self._tenants)

    def _observe(self, tenant: str, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)  # the first bound >= value, else +Inf
        with self._lock:
            self._summed.counts[i] += 1
            self._summed.total += value
            own = self._tenants.get(tenant)
            if own is not None:
                self._tenants.move_to_end(tenant)
            elif self.max_tenants > 0:
                if len(self._tenants) >= self.max_tenants:
                    _, dropped = self._tenants.popitem(last=False)
                    self._overflow().add(dropped)
                    self.dropped_out += 1
                own = self._tenants[tenant] = _Buckets(len(self._les))
            else:
                own = self._overflow()
            own.counts[i] += 1
            own.total += value

    def _overflow(self) -> _Buckets:
        if self._other is None:
            self._other = _Buckets(len(self._les))
        return self._other

    def _family(self, labelnames: Sequence[str], suffix: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation + suffix,
                                     labels=labelnames)

    def _collect_per_tenant(self) -> Metric:
        family = self._family(["tenant"], "")
        with self._lock:
            rows = [(t, b.cumulative(self._les), b.total) for t, b in self._tenants.items()]
            if self._other is not None:
                rows.append((OTHER_LABEL, self._other.cumulative(self._les), self._other.total))
        for tenant, buckets, total in sorted(rows):
            family.add_metric([tenant], buckets, total)
        return family

    def _collect_summed(self) -> Metric:
        family = self._family([], _PUBLIC_SUFFIX)
        with self._lock:
            if sum(self._summed.counts):
                family.add_metric([], self._summed.cumulative(self._les), self._summed.total)
        return family


class _HistogramChild:
    __slots__ = ("_parent", "_tenant")

    def __init__(self, parent: TenantHistogram, tenant: str) -> None:
        self._parent = parent
        self._tenant = tenant

    def observe(self, amount: float) -> None:
        self._parent._observe(self._tenant, amount)


class _TenantLoad:
    """The collector behind :meth:`Metrics.track_tenant_load`."""

    NAME = "loramux_tenant_in_flight"
    HELP = ("Requests in flight (waiting or running) per tenant, with the tenant's best "
            "residency tier here; only tenants with requests in flight or a version on the "
            "device have a series.")

    def __init__(self, source: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.source = source

    def rows(self) -> list[tuple[str, str, int]]:
        try:
            return list(self.source())
        except Exception:  # a scrape must not fail because the engine is going away
            return []

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["tenant", "residency"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["tenant", "residency"])
        for tenant, residency, in_flight in self.rows():
            family.add_metric([tenant, residency], in_flight)
        yield family


class _CanaryVersions:
    """The collector behind :meth:`Metrics.track_canary_versions`."""

    LABELS: ClassVar[list[str]] = ["tenant", "version", "role"]

    def __init__(self, source: Callable[[], Iterable[tuple[str, str, str, VersionStats]]]
                 ) -> None:
        self.source = source

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        try:
            rows = list(self.source())
        except Exception:  # a scrape must not fail because the engine is going away
            rows = []
        requests = CounterMetricFamily(
            "loramux_version_requests", "Finished requests per version of a tenant under a "
            "canary split, by outcome (error: a server-side failure).",
            labels=[*self.LABELS, "outcome"])
        ttft = HistogramMetricFamily(
            "loramux_version_ttft_seconds", "Time to first token per version of a tenant "
            "under a canary split.", labels=self.LABELS)
        latency = HistogramMetricFamily(
            "loramux_version_latency_seconds", "End-to-end latency of successful requests "
            "per version of a tenant under a canary split.", labels=self.LABELS)
        for tenant, version, role, stats in rows:
            labels = [tenant, version, role]
            requests.add_metric([*labels, "ok"], stats.requests - stats.errors)
            requests.add_metric([*labels, "error"], stats.errors)
            for family, counts in ((ttft, stats.ttft), (latency, stats.latency)):
                buckets, total = [], 0
                for bound, count in zip([*STATS_BUCKETS, math.inf], counts, strict=True):
                    total += count
                    buckets.append((floatToGoString(bound), total))
                family.add_metric(labels, buckets, sum_value=None)
        yield requests
        yield ttft
        yield latency


class _SummedTenantLoad:
    """The public view of :class:`_TenantLoad`: requests in flight per residency tier.
    Summed at scrape time, which is fine here: its rows are bounded by the queue and batch
    limits and the device slots, not by the number of tenants."""

    HELP = _TenantLoad.HELP + _PUBLIC_SUFFIX

    def __init__(self, load: _TenantLoad) -> None:
        self.load = load

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(_TenantLoad.NAME, self.HELP, labels=["residency"])

    def collect(self) -> Iterator[Metric]:
        sums: dict[str, float] = {}
        for _, residency, in_flight in self.load.rows():
            sums[residency] = sums.get(residency, 0.0) + in_flight
        family = GaugeMetricFamily(_TenantLoad.NAME, self.HELP, labels=["residency"])
        for residency, value in sums.items():
            family.add_metric([residency], value)
        yield family
