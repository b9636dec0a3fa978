"""Each pod's full desired set, and the per-pod rollout steps: pure functions, no I/O.

The sidecar's ``PUT /v1/desired`` takes every adapter a pod should hold:
``{adapters: [{tenant, version, uri, sha256?, pinned?, active?, credentials?}]}``.
The operator builds it from every LoraAdapter placed on the pod.

A change of ``spec.version`` is a rollout, stepped per pod from what that pod's sidecar
reports (``GET /v1/state``), so an operator restart resumes it from the pods themselves:

1. the new version is not Ready there, and an old version of the tenant is: desired =
   old (active) + new (not active); the old one keeps serving while the new one loads;
2. the new version is Ready there: desired = new (active); the sidecar activates it and
   only then evicts the old one;
3. the new version Failed there: step 1 holds (the old one stays active, the CR is Degraded)
   until the spec changes again;
4. no old version is Ready there (fresh pod): desired = new (active).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loramux.operator.model import AdapterSpec, ObjectKey, PodKey

READY = "Ready"
FAILED = "Failed"


@dataclass
class PodObservation:
    """What one pod answered during a pass (all optional: a pod may not answer)."""

    key: PodKey
    sidecar_ok: bool = False  # GET /v1/state answered
    sidecar_error: str | None = None
    server_reachable: bool | None = None  # the sidecar's view of its server
    adapters: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    base_names: frozenset[str] | None = None  # from the server's GET /v1/models
    served: frozenset[tuple[str, str]] = frozenset()  # tenant@version Ready on the server
    serving: dict[str, str] = field(default_factory=dict)  # tenant -> version a bare name gets
    server_ok: bool = False
    desired: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # GET /v1/desired
    routes: dict[str, str] = field(default_factory=dict)  # tenant -> version routed elsewhere

    @classmethod
    def from_state(cls, key: PodKey, state: Mapping[str, Any]) -> PodObservation:
        """From the sidecar's ``GET /v1/state`` body."""
        adapters: dict[tuple[str, str], dict[str, Any]] = {}
        for item in state.get("adapters") or []:
            if isinstance(item, Mapping) and item.get("tenant") and item.get("version"):
                adapters[(str(item["tenant"]), str(item["version"]))] = dict(item)
        reachable = state.get("server_reachable")
        routes = {str(r["tenant"]): str(r.get("version") or "")
                  for r in state.get("routes") or []
                  if isinstance(r, Mapping) and r.get("tenant")}
        return cls(key=key, sidecar_ok=True, adapters=adapters, routes=routes,
                   server_reachable=reachable if isinstance(reachable, bool) else None)

    def add_desired(self, body: Mapping[str, Any]) -> None:
        """Record the sidecar's ``GET /v1/desired`` body (the set it was last told)."""
        self.desired = {
            (str(i["tenant"]), str(i["version"])): dict(i) for i in body.get("adapters") or []
            if isinstance(i, Mapping) and i.get("tenant") and i.get("version")
        }

    def phase(self, tenant: str, version: str) -> str | None:
        item = self.adapters.get((tenant, version))
        return str(item.get("phase")) if item else None

    def add_models(self, body: Mapping[str, Any]) -> None:
        """Record the server's ``GET /v1/models`` body: base names and served adapters."""
        names = {str(n) for n in body.get("base_model_aliases") or [] if n}
        if body.get("base_model"):
            names.add(str(body["base_model"]))
        self.base_names = frozenset(names) if names else None
        served = set()
        for item in body.get("data") or []:
            if isinstance(item, Mapping) and item.get("tenant") and item.get("version"):
                served.add((str(item["tenant"]), str(item["version"])))
                if item.get("id") == item["tenant"]:  # the bare tenant name: its active one
                    self.serving[str(item["tenant"])] = str(item["version"])
        self.served = frozenset(served)
        self.server_ok = True


def entry(
    spec: AdapterSpec, version: str, *, active: bool,
    credentials: Mapping[str, str] | None = None, route: str | None = None,
) -> dict[str, Any]:
    """One desired-set entry (the sidecar's DesiredAdapter contract)."""
    item: dict[str, Any] = {"tenant": spec.tenant, "version": version, "uri": spec.uri,
                            "pinned": spec.pinned, "active": active}
    if version == spec.version and spec.sha256:
        item["sha256"] = spec.sha256
    if credentials:
        item["credentials"] = dict(credentials)
    if route:
        item["route"] = route
    return item


def old_version(spec: AdapterSpec, observation: PodObservation | None) -> tuple[str, dict] | None:
    """The tenant's other version that this pod holds Ready (the one still serving), if any,
    with its last desired entry as the sidecar reported it."""
    if observation is None:
        return None
    olds = sorted(
        v for (t, v), item in observation.adapters.items()
        if t == spec.tenant and v != spec.version and item.get("phase") == READY
    )
    if not olds:
        return None
    version = spec.previous_active if spec.previous_active in olds else olds[-1]
    return version, observation.adapters[(spec.tenant, version)]


def desired_entries(
    spec: AdapterSpec,
    observation: PodObservation | None,
    *,
    credentials: Mapping[str, str] | None = None,
    routes: Mapping[tuple[str, str, str], str] | None = None,
) -> list[dict[str, Any]]:
    """This adapter's entries on one pod (rollout step included, see the module doc).

    The pod's current desired set (``observation.desired``) supplies the old version's
    uri/sha256 during a rollout, since the CR only knows the new one. Without it the old
    version is simply not re-sent: the sidecar still keeps it serving until the new one is
    active (it never evicts before that), so this is only less explicit, not less safe.
    """
    routes = routes or {}

    def route_of(version: str) -> str | None:
        """Hot tenants: the dedicated deployment serving this version, when Ready."""
        return routes.get((spec.namespace, spec.tenant, version))

    new_phase = observation.phase(spec.tenant, spec.version) if observation else None
    old = old_version(spec, observation)
    # A hot tenant whose old version is served by its dedicated deployment stays there until
    # the new version's dedicated deployment is Ready too: its traffic moves in one step
    # instead of flooding the pool in between.
    dedicated_waiting = (old is not None and route_of(old[0]) is not None
                         and route_of(spec.version) is None)
    if (new_phase != READY or dedicated_waiting) and old is not None:
        version, _ = old
        prior = observation.desired.get((spec.tenant, version)) if observation else None
        if prior is not None and prior.get("uri"):
            keep: dict[str, Any] = {"tenant": spec.tenant, "version": version,
                                    "uri": prior["uri"], "pinned": spec.pinned,
                                    "active": True}
            if prior.get("sha256"):
                keep["sha256"] = prior["sha256"]
            if credentials:
                keep["credentials"] = dict(credentials)
            if route_of(version):
                keep["route"] = route_of(version)
            return [keep, entry(spec, spec.version, active=False, credentials=credentials,
                                route=route_of(spec.version))]
    return [entry(spec, spec.version, active=True, credentials=credentials,
                  route=route_of(spec.version))]


def build_desired_sets(
    specs: Iterable[AdapterSpec],
    placements: Mapping[ObjectKey, Sequence[PodKey]],
    pods: Iterable[PodKey],
    observations: Mapping[PodKey, PodObservation],
    *,
    credentials: Mapping[ObjectKey, Mapping[str, str]] | None = None,
    routes: Mapping[tuple[str, str, str], str] | None = None,
) -> dict[PodKey, list[dict[str, Any]]]:
    """The full desired set of every pod in ``pods`` (an empty list is a real answer: the
    pod should hold nothing). Entries are sorted by tenant then version; a tenant claimed
    twice on one pod keeps the first adapter's entries only (duplicates are rejected before)."""
    credentials = credentials or {}
    sets: dict[PodKey, list[dict[str, Any]]] = {pod: [] for pod in pods}
    tenants: dict[PodKey, set[str]] = {pod: set() for pod in sets}
    for spec in sorted(specs, key=lambda s: s.order):
        for pod in placements.get(spec.key, ()):
            if pod not in sets or spec.tenant in tenants[pod]:
                continue
            tenants[pod].add(spec.tenant)
            sets[pod].extend(desired_entries(
                spec, observations.get(pod), credentials=credentials.get(spec.key),
                routes=routes,
            ))
    for items in sets.values():
        items.sort(key=lambda e: (e["tenant"], e["version"]))
    return sets
