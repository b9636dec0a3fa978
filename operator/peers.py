"""The pool's placement table for scale-out routing: pure functions, no I/O.

Every pool pod forwards a request for a tenant it does not hold to a pod that does (the
server's rule is in :class:`~loramux.contracts.PeerTable`). The operator builds that table
each pass from what it observed, and hands each pod its copy in the same
``PUT /v1/desired`` as its desired set (``DesiredState.peers``); the sidecar pushes it to the
server (``PUT /admin/peers``).

- A tenant's holders are the pods of its pool whose sidecar reports one of its versions
  Ready *and* whose server reports that version ready (``SyncState.server``), each with its
  public server URL (pod IP and the container port named ``http``), the versions held, the
  best residency among them, and the pod's load (queue depth, running rows) at its report.
- Pods that are terminating but still answer (their grace period: out of the Service's
  endpoints, still serving) stay holders until they are gone, so a tenant whose only pod
  is being deleted keeps being served while it is placed (and loaded) elsewhere.
- A tenant with no holder gets a ``reason`` (e.g. ``no Ready placement: legal@v1 is
  Downloading on pod-a``); the server answers 503 with it, never the base model.
- Each pod's copy leaves the pod itself out of the holders.
- A live pool pod is a holder only of the tenants *placed* on it: a pod whose placement
  ended (a move's source, a lowered ``replicas``) still reports the tenant Ready while its
  sidecar evicts it, and must not be sent requests it is about to stop taking. A pod
  ``hidden`` for a tenant (a move's source while it drains: see
  :mod:`loramux.operator.placement`) is left out although it is placed and holds it.

Deterministic (tenants by name, holders by pod name), so a table that did not change has
the same fingerprint, and cheap: one :class:`PeerTenant` per tenant per pass, shared by every
pod that does not hold it (1,000 tenants x 20 pods is 1,000 tenants built, not 20,000).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from loramux.contracts import (
    AdapterState,
    PeerHolder,
    PeerTable,
    PeerTenant,
    Residency,
    SyncPhase,
)
from loramux.operator.model import AdapterSpec, ObjectKey, PodKey
from loramux.operator.rollout import PodObservation

RESIDENCY_RANK = {Residency.DEVICE: 0, Residency.HOST: 1, Residency.DISK: 2}
MAX_HOLDERS = 256  # PeerTenant.holders' bound
MAX_VERSIONS = 64  # PeerHolder.versions' bound
MAX_REASON = 512  # PeerTenant.reason's bound


def best_residency(tiers: Iterable[Residency]) -> Residency | None:
    """The best tier (device before host before disk), None when there is none."""
    return min(tiers, key=RESIDENCY_RANK.__getitem__, default=None)


def held(observation: PodObservation | None) -> dict[str, tuple[tuple[str, ...], Residency]]:
    """tenant -> (the versions a pod holds Ready: its sidecar says Ready and its server says
    ready, sorted; the best residency among them). Empty when the pod did not answer or its
    server is unreachable. One walk over the pod's report."""
    if (observation is None or not observation.sidecar_ok or observation.server is None
            or observation.server_reachable is False):
        return {}
    found: dict[str, list[tuple[str, Residency]]] = {}
    for view in observation.server.adapters:
        if view.state != AdapterState.READY:
            continue
        item = observation.adapters.get((view.tenant, view.version))
        if item is not None and item.phase == SyncPhase.READY:
            found.setdefault(view.tenant, []).append((view.version, view.residency))
    return {tenant: (tuple(sorted(v for v, _ in rows)),
                     best_residency(r for _, r in rows) or Residency.DISK)
            for tenant, rows in found.items()}


@dataclass(frozen=True)
class PoolTables:
    """The placement table of every pool, per tenant (``full``: every holder), and which
    tenants each pool pod should see. :meth:`for_pod` gives one pod's copy."""

    full: dict[ObjectKey, PeerTenant]  # per LoraAdapter
    tenants_of: dict[PodKey, tuple[ObjectKey, ...]]  # the adapters each pod sees, by tenant
    holder_pods: dict[ObjectKey, frozenset[str]] = field(default_factory=dict)
    _json: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict, repr=False,
                                                   compare=False)

    def for_pod(self, pod: PodKey) -> PeerTable:
        """``pod``'s table: the tenants its pools serve, the pod itself left out."""
        tenants: list[PeerTenant] = []
        for key in self.tenants_of.get(pod, ()):
            entry = self.full[key]
            if pod[1] in self.holder_pods.get(key, ()):
                entry = self._project(entry, pod)
            tenants.append(entry)
        return PeerTable.model_construct(tenants=tuple(tenants))

    @staticmethod
    def _project(entry: PeerTenant, pod: PodKey) -> PeerTenant:
        """``entry`` as ``pod`` sees it: itself left out of the holders."""
        others = tuple(h for h in entry.holders if h.pod != pod[1])
        reason = None if others else (
            f"no Ready placement on another pod: {entry.tenant} is held only by {pod[1]}")
        return PeerTenant.model_construct(tenant=entry.tenant, holders=others, reason=reason)

    def wire_for(self, pod: PodKey) -> dict[str, Any]:
        """:meth:`for_pod` as the JSON the sidecar receives (``DesiredState.peers``); each
        tenant's JSON is made once and shared by every pod that does not hold it."""
        cache = self._json
        tenants: list[dict[str, Any]] = []
        holder_pods = self.holder_pods
        for key in self.tenants_of.get(pod, ()):
            entry = self.full[key]
            if pod[1] in holder_pods.get(key, ()):
                tenants.append(self._project(entry, pod).model_dump(mode="json"))
                continue
            if key not in cache:
                cache[key] = entry.model_dump(mode="json")
            tenants.append(cache[key])
        return {"tenants": tenants}

    def signature(self) -> dict[ObjectKey, tuple[tuple[str, tuple[str, ...]], ...]]:
        """Who holds what (pods and versions only, not their tiers or load): when this
        differs between the start and the end of a pass, the next pass should come soon, so
        the pods learn of a new holder (or a lost one) at once."""
        return {key: tuple((h.pod, h.versions) for h in entry.holders)
                for key, entry in self.full.items()}


def build_pool_tables(
    specs: Sequence[AdapterSpec],
    placements: Mapping[ObjectKey, Sequence[PodKey]],
    members: Mapping[ObjectKey, Sequence[PodKey]],
    recipients: Iterable[PodKey],
    observations: Mapping[PodKey, PodObservation],
    url_of: Callable[[PodKey], str | None],
    *,
    live: Collection[PodKey] = (),
    hidden: Mapping[ObjectKey, Collection[str]] | None = None,
) -> PoolTables:
    """The placement tables of one pass.

    ``specs``: the placed LoraAdapters (valid, not deleting); ``placements``: their pods;
    ``members``: the pods each one's pool selects (live ones, and terminating ones that
    still answer), the candidate holders; ``recipients``: the pool pods that get a table;
    ``observations``: every pod's report; ``url_of``: a pod's public server URL (None: it
    cannot be reached, never a holder); ``live``: the live pool pods (a holder only where
    placed; the others, terminating ones, wherever they hold); ``hidden``: pod names never
    listed as holders of an adapter (a move's source while it drains)."""
    hidden = hidden or {}
    live = set(live)
    full: dict[ObjectKey, PeerTenant] = {}
    holder_pods: dict[ObjectKey, frozenset[str]] = {}
    index: dict[PodKey, dict[str, tuple[tuple[str, ...], Residency]]] = {}
    ordered = sorted(specs, key=lambda s: (s.namespace, s.tenant, s.order))
    sorted_members: dict[int, list[PodKey]] = {}  # pools share their member lists
    for spec in ordered:
        key = spec.key
        pool = members.get(key, ())
        if id(pool) not in sorted_members:
            sorted_members[id(pool)] = sorted(set(pool), key=lambda p: p[1])
        holders: list[PeerHolder] = []
        placed = set(placements.get(key, ()))
        hide = hidden.get(key, ())
        for pod in sorted_members[id(pool)]:
            if (pod in live and pod not in placed) or pod[1] in hide:
                continue
            if pod not in index:
                index[pod] = held(observations.get(pod))
            found = index[pod].get(spec.tenant)
            if found is None:
                continue
            holder = _holder(pod, found, observations[pod], url_of)
            if holder is not None:
                holders.append(holder)
        if len(holders) > MAX_HOLDERS:  # the best ones (a pool larger than the bound)
            holders = sorted(holders, key=lambda h: (RESIDENCY_RANK[h.residency],
                                                     h.queue_depth + h.running,
                                                     h.pod))[:MAX_HOLDERS]
            holders.sort(key=lambda h: h.pod)
        reason = None if holders else no_holder_reason(
            spec, placements.get(key, ()), observations)
        failed = not holders and every_placement_failed(spec, placements.get(key, ()),
                                                        observations)
        full[key] = PeerTenant(tenant=spec.tenant, holders=tuple(holders), reason=reason,
                               failed=failed)
        if holders:
            holder_pods[key] = frozenset(h.pod for h in holders)

    wanted = set(recipients)
    seen_tenants: dict[PodKey, set[str]] = {pod: set() for pod in wanted}
    tenants_of: dict[PodKey, list[ObjectKey]] = {pod: [] for pod in wanted}
    for spec in ordered:
        key, tenant = spec.key, spec.tenant
        for pod in members.get(key, ()):
            if pod in wanted and tenant not in seen_tenants[pod]:
                seen_tenants[pod].add(tenant)
                tenants_of[pod].append(key)
    return PoolTables(full=full, holder_pods=holder_pods,
                      tenants_of={pod: tuple(keys) for pod, keys in tenants_of.items()})


def table_fingerprint(wire: Mapping[str, Any]) -> str:
    """The fingerprint a pod's sidecar reports once its server holds ``wire`` (one pod's
    table as :meth:`PoolTables.wire_for` sends it): the same computation as the sidecar's."""
    return PeerTable.model_validate(wire).fingerprint()


def _holder(pod: PodKey, found: tuple[tuple[str, ...], Residency],
            observation: PodObservation, url_of: Callable[[PodKey], str | None]
            ) -> PeerHolder | None:
    versions, tier = found
    url = url_of(pod)
    if url is None or observation.server is None:
        return None
    try:
        return PeerHolder(pod=pod[1], url=url, versions=versions[-MAX_VERSIONS:],
                          residency=tier, queue_depth=max(0, observation.server.queue_depth),
                          running=max(0, observation.server.running))
    except ValidationError:  # e.g. a pod IP no URL can hold: never a holder, never a crash
        return None


def every_placement_failed(spec: AdapterSpec, pods: Sequence[PodKey],
                           observations: Mapping[PodKey, PodObservation]) -> bool:
    """Whether the tenant is placed and its version is Failed on every placement (the
    table's ``failed``: servers then answer 503 at once instead of waiting for a holder)."""
    if not pods:
        return False
    for pod in pods:
        obs = observations.get(pod)
        item = obs.adapters.get((spec.tenant, spec.version)) if obs is not None else None
        if obs is None or not obs.sidecar_ok or item is None or item.phase != SyncPhase.FAILED:
            return False
    return True


def no_holder_reason(spec: AdapterSpec, pods: Sequence[PodKey],
                     observations: Mapping[PodKey, PodObservation]) -> str:
    """Why no pod holds the tenant Ready, from its placements' reports."""
    ref = f"{spec.tenant}@{spec.version}"
    if not pods:
        return (f"no Ready placement: {ref} is not placed on any pod (no Ready pod in its "
                f"pool, or none that serves {spec.base_model})")[:MAX_REASON]
    parts: list[str] = []
    for pod in sorted(pods, key=lambda p: p[1]):
        obs = observations.get(pod)
        if obs is None or not obs.sidecar_ok:
            parts.append(f"unknown on {pod[1]} (its sidecar did not answer)")
            continue
        if obs.server_reachable is False or obs.server is None:
            parts.append(f"unknown on {pod[1]} (its server is unreachable)")
            continue
        item = obs.adapters.get((spec.tenant, spec.version))
        if item is None:
            parts.append(f"Pending on {pod[1]}")
        elif item.phase == SyncPhase.FAILED:
            why = f" ({item.reason[:120]})" if item.reason else ""
            parts.append(f"Failed on {pod[1]}{why}")
        elif item.phase == SyncPhase.READY:
            loaded = any(a.tenant == spec.tenant and a.version == spec.version
                         and a.state == AdapterState.READY for a in obs.server.adapters)
            parts.append(f"Ready on {pod[1]}, which has no usable address" if loaded
                         else f"not ready on the server of {pod[1]}")
        else:
            parts.append(f"{item.phase} on {pod[1]}")
    return f"no Ready placement: {ref} is {', '.join(parts)}"[:MAX_REASON]


__all__ = [
    "PoolTables",
    "best_residency",
    "build_pool_tables",
    "every_placement_failed",
    "held",
    "no_holder_reason",
    "table_fingerprint",
]
