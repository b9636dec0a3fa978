"""The sidecar's Prometheus metrics (``GET /metrics``), one registry per sidecar."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from loramux.contracts import SyncPhase


class SyncMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.phase = Gauge("loramux_sync_adapters", "Desired adapter versions by phase",
                           ["phase"], registry=self.registry)
        self.fetch_failures = Counter("loramux_sync_fetch_failures_total",
                                      "Failed fetch attempts by error code", ["code"],
                                      registry=self.registry)
        self.load_failures = Counter("loramux_sync_load_failures_total",
                                     "Adapters the server refused, by code", ["code"],
                                     registry=self.registry)
        self.server_errors = Counter("loramux_sync_server_errors_total",
                                     "Reports the server could not give (unreachable) or gave "
                                     "malformed (bad_response), by call and code",
                                     ["call", "code"], registry=self.registry)
        self.passes = Counter("loramux_sync_reconcile_passes_total", "Reconcile passes",
                              registry=self.registry)
        self.evictions = Counter("loramux_sync_evictions_total", "Versions evicted",
                                 registry=self.registry)
        self.fetch_seconds = Gauge("loramux_sync_last_fetch_seconds",
                                   "Duration of the last download", registry=self.registry)
        self.downloads = Counter("loramux_sync_downloads_total",
                                 "Versions downloaded from their source (not found on the volume)",
                                 registry=self.registry)
        self.downloaded_bytes = Counter("loramux_sync_downloaded_bytes_total",
                                        "Bytes downloaded and verified", registry=self.registry)
        for phase in SyncPhase:
            self.phase.labels(phase.value).set(0)

    def set_phases(self, phases: Iterable[SyncPhase]) -> None:
        counts = dict.fromkeys(SyncPhase, 0)
        for phase in phases:
            counts[phase] += 1
        for phase, count in counts.items():
            self.phase.labels(phase.value).set(count)


__all__ = ["SyncMetrics"]
