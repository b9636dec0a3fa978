"""Prometheus metrics of one server process, on its own registry.

Tenant labels only ever carry validated DNS-1123 names (or ``_base`` for the base model), so
a client cannot blow up label cardinality with made-up names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

BASE_LABEL = "_base"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loramux_requests_total", "Requests finished, by tenant and outcome.",
            ["tenant", "outcome"], registry=r,
        )
        self.prompt_tokens = Counter(
            "loramux_prompt_tokens_total", "Prompt tokens processed.", ["tenant"], registry=r
        )
        self.completion_tokens = Counter(
            "loramux_completion_tokens_total", "Tokens generated.", ["tenant"], registry=r
        )
        self.ttft = Histogram(
            "loramux_time_to_first_token_seconds", "Submission to first generated token.",
            ["tenant"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "loramux_request_latency_seconds", "Submission to last token.",
            ["tenant"], buckets=_LATENCY_BUCKETS, registry=r,
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
        self.forwarded_requests = Counter(
            "loramux_forwarded_requests_total",
            "Requests of a routed (hot) tenant: forwarded to its dedicated deployment "
            "(outcome=forwarded) or served here because it could not answer (fallback).",
            ["tenant", "outcome"], registry=r,
        )
        self.row_failures = Counter(
            "loramux_row_failures_total",
            "Rows ended alone by a fault of their own (stage: prefill, decode or sample); "
            "the rest of the batch went on.",
            ["tenant", "stage"], registry=r,
        )
        self.forwarded_tokens = Counter(
            "loramux_forwarded_tokens_total",
            "Prompt plus generated tokens of a routed (hot) tenant's requests answered by its "
            "dedicated deployment, read from the usage of the forwarded answer.",
            ["tenant"], registry=r,
        )
        self.tenant_limited = Counter(
            "loramux_tenant_limited_total",
            "Requests refused with 429 by a per-tenant limit (max_concurrent, "
            "tokens_per_minute, max_queued).",
            ["tenant", "limit"], registry=r,
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
            "that holds it, holder_failed (one holder skipped, the next tried), all_failed, "
            "no_holder (the table lists none Ready) or not_held (a forwarded request, not "
            "forwarded again). No tenant label, and not the tenant's tokens: the holder "
            "counts those.",
            ["outcome"], registry=r,
        )
        for outcome in ("forwarded", "holder_failed", "all_failed", "no_holder", "not_held"):
            self.peer_forwarded_requests.labels(outcome)
        self._tenant_load: _TenantLoad | None = None
        self.fallback_requests = Counter(
            "loramux_base_fallback_requests_total",
            "Requests for an unknown tenant served by the base model (fallback mode).",
            registry=r,
        )


    def track_tenant_load(self, source: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """Publish ``loramux_tenant_in_flight{tenant,residency}`` from ``source`` (read at
        scrape time, never per decode step): (tenant, best tier, requests in flight) for
        the tenants with requests in flight or a version on the device only, so the series
        are bounded by the queue and batch limits plus the device slots, not by the
        number of registered tenants. Once per registry; a second call swaps the source."""
        if self._tenant_load is None:
            self._tenant_load = _TenantLoad(source)
            self.registry.register(self._tenant_load)
        else:
            self._tenant_load.source = source


class _TenantLoad:
    """The collector behind :meth:`Metrics.track_tenant_load`."""

    NAME = "loramux_tenant_in_flight"
    HELP = ("Requests in flight (waiting or running) per tenant, with the tenant's best "
            "residency tier here; only tenants with requests in flight or a version on the "
            "device have a series.")

    def __init__(self, source: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.source = source

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["tenant", "residency"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["tenant", "residency"])
        try:
            rows = list(self.source())
        except Exception:  # a scrape must not fail because the engine is going away
            rows = []
        for tenant, residency, in_flight in rows:
            family.add_metric([tenant, residency], in_flight)
        yield family


class _SummedOverTenants:
    """A registry view: every family with a ``tenant`` label, summed over it (counters,
    gauges and histogram buckets add up); ``_created`` timestamps are dropped, since they do
    not. For the public port, where one tenant must not see another's traffic."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if not any("tenant" in sample.labels for sample in family.samples):
                yield family
                continue
            sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                      if k != "tenant"))
                key = (sample.name, labels)
                sums[key] = sums.get(key, 0.0) + sample.value
            out = Metric(family.name, f"{family.documentation} Summed over tenants on this "
                         "port; per tenant on the metrics port.", family.type, family.unit)
            for (name, labels), value in sums.items():
                out.add_sample(name, dict(labels), value)
            yield out


def summed_over_tenants(registry: CollectorRegistry) -> _SummedOverTenants:
    return _SummedOverTenants(registry)
