"""Each pod's full desired set, and the per-pod rollout steps: pure functions, no I/O.

The sidecar's ``PUT /v1/desired`` takes every adapter a pod should hold
(:class:`~loramux.contracts.DesiredState`); the operator builds its
:class:`~loramux.contracts.DesiredAdapter` entries from every LoraAdapter placed on the pod.

A change of ``spec.version`` is a rollout, stepped per pod from what that pod's sidecar
reports (``GET /v1/state``, :class:`~loramux.contracts.SyncState`), so an operator restart
resumes it from the pods themselves:

1. the new version is not Ready there, and an old version of the tenant is: desired =
   old (active) + new (not active); the old one keeps serving while the new one loads;
2. the new version is Ready there: desired = new (active); the sidecar activates it and
   only then evicts the old one;
3. the new version Failed there: step 1 holds (the old one stays active, the CR is Degraded)
   until the spec changes again;
4. no old version is Ready there (fresh pod): desired = new (active).

The old version's source (uri, sha256) is the operator's own memory: ``status.activeSource``,
the source of the last version that became active (:attr:`AdapterSpec.previous_source`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from loramux.contracts import (
    AdapterList,
    AdapterState,
    DesiredAdapter,
    EntryCredentials,
    SyncPhase,
    SyncState,
    VersionStatus,
)
from loramux.operator.canary import CanarySpec
from loramux.operator.model import AdapterSpec, ObjectKey, PodKey

Routes = Mapping[tuple[str, str, str], str]  # (namespace, tenant, version) -> dedicated URL


@dataclass
class PodObservation:
    """What one pod's sidecar answered during a pass (``GET /v1/state``, the one source of a
    pod's state); all optional: a pod may not answer."""

    key: PodKey
    sidecar_ok: bool = False  # GET /v1/state answered
    sidecar_error: str | None = None
    server_reachable: bool | None = None  # the sidecar's view of its server
    adapters: dict[tuple[str, str], VersionStatus] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)  # tenant -> version routed elsewhere
    server: AdapterList | None = None  # the server's GET /admin/adapters, via the sidecar
    peers_fingerprint: str | None = None  # of the placement table the server holds

    @classmethod
    def from_state(cls, key: PodKey, state: SyncState) -> PodObservation:
        """From the sidecar's ``GET /v1/state`` body, parsed."""
        return cls(
            key=key, sidecar_ok=True, server_reachable=state.server_reachable,
            adapters={(a.tenant, a.version): a for a in state.adapters},
            routes={r.tenant: r.version or "" for r in state.routes},
            server=state.server, peers_fingerprint=state.peers_fingerprint,
        )

    @property
    def server_ok(self) -> bool:
        """The sidecar had the server's own answer (else: unknown, never "holds nothing")."""
        return self.server is not None

    @property
    def base_names(self) -> frozenset[str] | None:
        """The names of the server's base model (None: unknown)."""
        return self.server.base_names if self.server is not None else None

    @property
    def served(self) -> frozenset[tuple[str, str]]:
        """tenant@version Ready on the server."""
        if self.server is None:
            return frozenset()
        return frozenset((a.tenant, a.version) for a in self.server.adapters
                         if a.state == AdapterState.READY)

    @property
    def serving(self) -> dict[str, str]:
        """tenant -> the version its bare name gets on the server (its active Ready one)."""
        if self.server is None:
            return {}
        return {a.tenant: a.version for a in self.server.adapters
                if a.state == AdapterState.READY and a.active}

    def in_flight(self, tenant: str) -> int | None:
        """The tenant's requests in flight on the server (every version), None: unknown."""
        if self.server is None or self.server_reachable is False:
            return None
        return sum(max(0, a.in_flight) for a in self.server.adapters if a.tenant == tenant)

    def phase(self, tenant: str, version: str) -> SyncPhase | None:
        item = self.adapters.get((tenant, version))
        return item.phase if item is not None else None


def old_version(spec: AdapterSpec, observation: PodObservation | None) -> str | None:
    """The tenant's other version that this pod holds Ready (the one still serving), if any."""
    if observation is None:
        return None
    olds = sorted(v for (t, v), item in observation.adapters.items()
                  if t == spec.tenant and v != spec.version and item.phase == SyncPhase.READY)
    if not olds:
        return None
    return spec.previous_active if spec.previous_active in olds else olds[-1]


def desired_entries(
    spec: AdapterSpec,
    observation: PodObservation | None,
    *,
    credentials: EntryCredentials | None = None,
    routes: Routes | None = None,
    canary: tuple[CanarySpec, int] | None = None,
) -> list[DesiredAdapter]:
    """This adapter's entries on one pod (rollout step included, see the module doc).

    ``canary``: the canary version and its weight (operator/canary.py), sent as a second,
    inactive entry with ``weight`` once the stable version is the only one here.

    The old version's uri/sha256 come from ``status.activeSource`` (the source of the last
    version that became active), since the spec only knows the new one. Without it (no
    source recorded for that version) the old version is simply not re-sent: the
    sidecar still keeps it serving until the new one is active (it never evicts before
    that), so this is only less explicit, not less safe.
    """
    routes = routes or {}

    def route_of(version: str) -> str | None:
        """Hot tenants: the dedicated deployment serving this version, when Ready."""
        return routes.get((spec.namespace, spec.tenant, version))

    new = DesiredAdapter(tenant=spec.tenant, version=spec.version, uri=spec.uri,
                         sha256=spec.sha256, pinned=spec.pinned, active=True,
                         credentials=credentials, route=route_of(spec.version))
    new_phase = observation.phase(spec.tenant, spec.version) if observation else None
    old = old_version(spec, observation)
    # A hot tenant whose old version is served by its dedicated deployment stays there until
    # the new version's dedicated deployment is Ready too: its traffic moves in one step
    # instead of flooding the pool in between.
    dedicated_waiting = (old is not None and route_of(old) is not None
                         and route_of(spec.version) is None)
    source = spec.previous_source
    if source is not None and source.version != old:
        source = None
    if (new_phase != SyncPhase.READY or dedicated_waiting) and source is not None:
        keep = DesiredAdapter(tenant=spec.tenant, version=source.version, uri=source.uri,
                              sha256=source.sha256, pinned=spec.pinned, active=True,
                              credentials=credentials, route=route_of(source.version))
        return [keep, new.model_copy(update={"active": False})]
    if canary is not None:
        spec_c, weight = canary
        return [new, DesiredAdapter(tenant=spec.tenant, version=spec_c.version, uri=spec_c.uri,
                                    sha256=spec_c.sha256, pinned=spec.pinned, active=False,
                                    credentials=credentials, weight=weight)]
    return [new]


def build_desired_sets(
    specs: Iterable[AdapterSpec],
    placements: Mapping[ObjectKey, Sequence[PodKey]],
    pods: Iterable[PodKey],
    observations: Mapping[PodKey, PodObservation],
    *,
    credentials: Mapping[ObjectKey, EntryCredentials] | None = None,
    routes: Routes | None = None,
    canaries: Mapping[ObjectKey, tuple[CanarySpec, int]] | None = None,
) -> dict[PodKey, list[DesiredAdapter]]:
    """The full desired set of every pod in ``pods`` (an empty list is a real answer: the
    pod should hold nothing). Entries are sorted by tenant then version; a tenant claimed
    twice on one pod keeps the first adapter's entries only (duplicates are rejected before)."""
    credentials = credentials or {}
    canaries = canaries or {}
    sets: dict[PodKey, list[DesiredAdapter]] = {pod: [] for pod in pods}
    tenants: dict[PodKey, set[str]] = {pod: set() for pod in sets}
    for spec in sorted(specs, key=lambda s: s.order):
        for pod in placements.get(spec.key, ()):
            if pod not in sets or spec.tenant in tenants[pod]:
                continue
            tenants[pod].add(spec.tenant)
            sets[pod].extend(desired_entries(
                spec, observations.get(pod), credentials=credentials.get(spec.key),
                routes=routes, canary=canaries.get(spec.key),
            ))
    for items in sets.values():
        items.sort(key=lambda e: (e.tenant, e.version))
    return sets
