"""Validation across adapters, and each LoraAdapter's status: pure functions, no I/O.

Status is computed only from what the pods' sidecars report (``GET /v1/state``) after the
desired sets were sent: a placement is Ready only when its pod's sidecar says so for that
version and its server is reachable. Phases are :class:`~loramux.contracts.AdapterPhase`
(``status.phase``) and :class:`~loramux.contracts.PlacementState` (``status.placements``).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loramux.contracts import AdapterPhase, AdapterState, DesiredAdapter, PlacementState, Residency
from loramux.operator.model import (
    MOVE_DRAINING,
    MOVED,
    AdapterSpec,
    ObjectKey,
    PodKey,
    pod_key,
    pods_in_pool,
)
from loramux.operator.rollout import PodObservation

CONDITION_TYPES = ("Validated", "Synced", "Ready")

# Reasons of Validated=False. All are permanent until the spec (or the pool) changes.
INVALID_SPEC = "InvalidSpec"
DUPLICATE_TENANT = "DuplicateTenant"
BASE_MODEL_MISMATCH = "BaseModelMismatch"


@dataclass(frozen=True)
class Rejection:
    reason: str
    message: str


@dataclass
class Validation:
    rejected: dict[ObjectKey, Rejection]
    excluded: dict[ObjectKey, set[PodKey]]  # pods an accepted adapter must not use


def validate(
    specs: Sequence[AdapterSpec],
    pods: Sequence[Mapping[str, Any]],
    observations: Mapping[PodKey, PodObservation],
) -> Validation:
    """Bad specs, duplicate tenants in one pool (the newer adapter loses), and base models
    the pool does not serve. Deleting adapters still hold their claim until they are gone."""
    rejected: dict[ObjectKey, Rejection] = {}
    excluded: dict[ObjectKey, set[PodKey]] = {}
    for spec in specs:
        if spec.error is not None:
            rejected[spec.key] = Rejection(INVALID_SPEC, spec.error)

    accepted: list[tuple[AdapterSpec, set[PodKey]]] = []
    for spec in sorted(specs, key=lambda s: s.order):
        if spec.key in rejected:
            continue
        members = {pod_key(p) for p in pods_in_pool(spec, pods)}
        clash = next((
            other for other, other_pods in accepted
            if other.namespace == spec.namespace and other.tenant == spec.tenant
            and (other.pool_key == spec.pool_key or members & other_pods)
        ), None)
        if clash is not None:
            rejected[spec.key] = Rejection(DUPLICATE_TENANT, (
                f"tenant {spec.tenant!r} is already claimed in this pool by LoraAdapter "
                f"{clash.name!r} (older); delete one of them"))
            continue
        accepted.append((spec, members))

        if spec.deleting:
            continue
        mismatched: set[PodKey] = set()
        served: set[str] = set()
        known = 0
        for pod in sorted(members):
            names = observations[pod].base_names if pod in observations else None
            if names is None:
                continue
            known += 1
            served |= names
            if spec.base_model not in names:
                mismatched.add(pod)
        if known and len(mismatched) == known:
            rejected[spec.key] = Rejection(BASE_MODEL_MISMATCH, (
                f"spec.baseModel {spec.base_model!r} is not served by the pool "
                f"(it serves {', '.join(sorted(served))})"))
        elif mismatched:
            excluded[spec.key] = mismatched
    return Validation(rejected=rejected, excluded=excluded)


# --------------------------------------------------------------------------- status


def placement_views(
    spec: AdapterSpec,
    pods: Sequence[PodKey],
    desired: Mapping[PodKey, Sequence[DesiredAdapter]],
    observations: Mapping[PodKey, PodObservation],
    put_errors: Mapping[PodKey, str],
) -> list[dict[str, Any]]:
    """``status.placements``: one row per (pod, version of this tenant desired there)."""
    rows: list[dict[str, Any]] = []
    for pod in sorted(pods, key=lambda p: p[1]):
        entries = [(e.version, e.active) for e in desired.get(pod, ()) if e.tenant == spec.tenant]
        obs = observations.get(pod)
        for version, active in entries or [(spec.version, True)]:
            row: dict[str, Any] = {"pod": pod[1], "version": version, "active": active}
            if pod in put_errors:
                row["state"] = PlacementState.UNKNOWN
                row["reason"] = f"desired set not delivered: {put_errors[pod]}"
            elif obs is None or not obs.sidecar_ok:
                row["state"] = PlacementState.UNKNOWN
                row["reason"] = f"sidecar did not answer: {obs.sidecar_error if obs else '?'}"
            else:
                reported = obs.adapters.get((spec.tenant, version))
                if reported is None:
                    row["state"] = PlacementState.PENDING
                    row["reason"] = "not reported by the sidecar yet"
                else:
                    row["state"] = PlacementState(reported.phase.value)
                    if reported.reason:
                        row["reason"] = reported.reason[:500]
                    if reported.digest:
                        row["digest"] = reported.digest
                    if (row["state"] == PlacementState.READY
                            and obs.server_reachable is False):
                        row["state"] = PlacementState.UNKNOWN
                        row["reason"] = "inference server unreachable"
                _add_residency(row, spec.tenant, version, obs)
            rows.append(row)
    return rows


def _add_residency(row: dict[str, Any], tenant: str, version: str,
                   obs: PodObservation) -> None:
    """The server's tier of a version it holds ready (device, host, disk) and its requests in
    flight there, as of the sidecar's last pass."""
    if obs.server is None or obs.server_reachable is False:
        return
    for view in obs.server.adapters:
        if view.tenant == tenant and view.version == version:
            if view.state == AdapterState.READY:
                row["residency"] = str(view.residency)
                row["inFlight"] = view.in_flight
            return


def damp_in_flight(rows: Sequence[dict[str, Any]],
                   previous: Mapping[str, Any] | None) -> None:
    """Keep each pod's last written ``inFlight`` while the new count stays near it.

    A busy tenant's in-flight count changes on nearly every pass; writing each change would
    patch its status (an API write, and a watch event to every watcher) once per pass for
    every busy tenant. The column says how hot a tenant is, not an exact count: a pod's figure
    is rewritten when it moves by more than max(2, 25 %) of the last written one, and always
    when it becomes 0 (idle is exact) or leaves 0."""
    old_rows = (previous or {}).get("placements") or []
    before = {r.get("pod"): r.get("inFlight") for r in old_rows if isinstance(r, Mapping)}
    for row in rows:
        new, old = row.get("inFlight"), before.get(row.get("pod"))
        if not isinstance(new, int) or not isinstance(old, int) or new == 0 or old == 0:
            continue
        if abs(new - old) <= max(2, old // 4):
            row["inFlight"] = old


RESIDENCY_ORDER = {Residency.DEVICE: 0, Residency.HOST: 1, Residency.DISK: 2}
RESIDENCY_LISTED = 3  # up to this many pods by name in status.residency, else counts


def residency_summary(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """``status.residency`` (the ``Residency`` column of ``kubectl get lora -o wide``): where
    the tenant is, each pod's best tier, e.g. ``pod-a:device,pod-b:host``; beyond
    :data:`RESIDENCY_LISTED` pods, counts per tier (``device:5,host:12,disk:3``). None when
    no pod holds it ready."""
    best: dict[str, Residency] = {}
    for row in rows:
        tier = row.get("residency")
        if tier is None:
            continue
        tier = Residency(tier)
        pod = str(row["pod"])
        if pod not in best or RESIDENCY_ORDER[tier] < RESIDENCY_ORDER[best[pod]]:
            best[pod] = tier
    if not best:
        return None
    if len(best) <= RESIDENCY_LISTED:
        return ",".join(f"{pod}:{best[pod]}" for pod in sorted(best))
    counts = Counter(best.values())
    return ",".join(f"{tier}:{counts[tier]}" for tier in Residency if counts[tier])


def _condition(ctype: str, ok: bool | None, reason: str, message: str, generation: int,
               previous: Mapping[str, Mapping[str, Any]], now: str) -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    old = previous.get(ctype)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    return {"type": ctype, "status": status, "reason": reason, "message": message[:1000],
            "lastTransitionTime": since or now, "observedGeneration": generation}


def compute_status(
    spec: AdapterSpec,
    *,
    rejection: Rejection | None,
    pods: Sequence[PodKey],
    desired: Mapping[PodKey, Sequence[DesiredAdapter]],
    observations: Mapping[PodKey, PodObservation],
    put_errors: Mapping[PodKey, str] | None = None,
    credentials_problem: str | None = None,
    previous: Mapping[str, Any] | None = None,
    now: str,
    extra: Collection[PodKey] = (),
) -> dict[str, Any]:
    """The whole ``status`` of one adapter (minus kopf's bookkeeping). ``extra``: pods of a
    move in progress beyond ``replicas`` (the target while it loads, the source while it
    drains): listed in ``placements`` but not counted in ``readyPods`` or the phase."""
    put_errors = put_errors or {}
    previous = previous or {}
    prev_conditions = {c.get("type"): c for c in previous.get("conditions") or []
                       if isinstance(c, Mapping)}
    gen = spec.generation

    def cond(ctype: str, ok: bool | None, reason: str, message: str) -> dict[str, Any]:
        return _condition(ctype, ok, reason, message, gen, prev_conditions, now)

    if rejection is not None:
        return {
            "phase": AdapterPhase.FAILED, "observedGeneration": gen,
            "conditions": [
                cond("Validated", False, rejection.reason, rejection.message),
                cond("Synced", False, "NotPlaced", "not placed on any pod: validation failed"),
                cond("Ready", False, rejection.reason, rejection.message),
            ],
            "placements": [], "readyPods": "0/0", "readyReplicas": 0, "targetReplicas": 0,
        }

    rows = placement_views(spec, pods, desired, observations, put_errors)
    damp_in_flight(rows, previous)
    skip = {p[1] for p in extra}
    counted = [p for p in pods if p[1] not in skip]
    current = {row["pod"]: row for row in rows
               if row["version"] == spec.version and row["pod"] not in skip}
    ready = sorted(p for p, row in current.items() if row["state"] == PlacementState.READY)
    failed = {p: row for p, row in current.items() if row["state"] == PlacementState.FAILED}
    total = len(counted)

    if not pods:
        synced = cond("Synced", False, "NoPods",
                      "no Ready pod matches spec.pool (or replicas could not be placed)")
    elif put_errors.keys() & set(pods) or any(r["state"] == PlacementState.UNKNOWN
                                              for r in rows):
        bad = sorted({r["pod"] for r in rows if r["state"] == PlacementState.UNKNOWN})
        synced = cond("Synced", False, "SyncFailed",
                      f"could not sync pod(s) {', '.join(bad)}; retrying")
    elif credentials_problem:
        synced = cond("Synced", False, "CredentialsUnavailable", credentials_problem)
    else:
        synced = cond("Synced", True, "Synced", f"desired set delivered to {total} pod(s)")

    # Which version do clients get? The active Ready one on every pod, when they agree.
    active_versions = Counter(r["version"] for r in rows
                              if r["active"] and r["state"] == PlacementState.READY)
    if counted and len(ready) == total:
        active: str | None = spec.version
    elif len(active_versions) == 1:
        active = next(iter(active_versions))
    elif active_versions:
        active = (spec.previous_active if spec.previous_active in active_versions
                  else active_versions.most_common(1)[0][0])
    else:
        # No sidecar reports an active Ready version right now (e.g. one re-settling an entry
        # whose only change is active=true): the servers' own answer (SyncState.server, the
        # version a bare tenant name resolves to) says what clients still get.
        serving = Counter(observations[p].serving[spec.tenant] for p in pods
                          if p in observations and spec.tenant in observations[p].serving)
        if spec.previous_active in serving:
            active = spec.previous_active
        elif serving:
            active = serving.most_common(1)[0][0]
        else:
            active = None

    if not pods:
        phase, ready_cond = AdapterPhase.PENDING, cond("Ready", False, "NoPods",
                                                       "no target pod")
    elif failed:
        detail = "; ".join(f"{p}: {row.get('reason') or 'failed'}" for p, row in
                           sorted(failed.items()))
        keeps = (f"; {active} keeps serving" if active and active != spec.version else "")
        phase = AdapterPhase.DEGRADED
        ready_cond = cond("Ready", False, "VersionFailed",
                          f"{spec.tenant}@{spec.version} failed on {len(failed)}/{total} "
                          f"pod(s): {detail}{keeps}")
    elif len(ready) == total:
        phase = AdapterPhase.READY
        ready_cond = cond("Ready", True, "AllPodsReady",
                          f"{spec.tenant}@{spec.version} is Ready on {total}/{total} pod(s)")
    else:
        phase = AdapterPhase.PROGRESSING
        waiting = sorted(set(current) - set(ready)) or sorted(p[1] for p in counted)
        ready_cond = cond("Ready", False, "Progressing",
                          f"{len(ready)}/{total} pod(s) Ready; waiting for {', '.join(waiting)}")

    status: dict[str, Any] = {
        "phase": phase, "observedGeneration": gen,
        "conditions": [cond("Validated", True, "Valid", "spec is valid"), synced, ready_cond],
        "placements": rows, "readyPods": f"{len(ready)}/{total}",
        "readyReplicas": len(ready), "targetReplicas": total,
    }
    residency = residency_summary(rows)
    if residency is not None:
        status["residency"] = residency
        status["inFlight"] = sum(int(r.get("inFlight") or 0) for r in rows)
    if active:
        status["activeVersion"] = active
    # The operator's memory of where the active version comes from (a later rollout re-sends
    # it from here): set when the spec's version becomes active, kept otherwise.
    source = spec.source if active == spec.version else spec.previous_source
    if source is not None:
        status["activeSource"] = source.view()
    return status


def status_events(old: Mapping[str, Any] | None, new: Mapping[str, Any]
                  ) -> list[tuple[str, str, str]]:
    """Kubernetes Events ``(type, reason, message)`` for a status change."""
    old = old or {}
    events: list[tuple[str, str, str]] = []
    old_phase, new_phase = old.get("phase"), new.get("phase")
    conds = {c["type"]: c for c in new.get("conditions") or []}
    old_conds = {c.get("type"): c for c in old.get("conditions") or [] if isinstance(c, Mapping)}
    validated = conds.get("Validated", {})
    if validated.get("status") == "False" and (
        old_conds.get("Validated", {}).get("reason") != validated.get("reason")
    ):
        events.append(("Warning", str(validated.get("reason")), str(validated.get("message"))))
    access = conds.get("AccessReady", {})
    old_access = old_conds.get("AccessReady", {})
    if access and (old_access.get("status"), old_access.get("reason")) != (
            access.get("status"), access.get("reason")):
        # spec.access: a refused key or a missing Secret (entry names only, never a key)
        if access.get("status") == "False":
            events.append(("Warning", str(access.get("reason")), str(access.get("message"))))
        elif access.get("status") == "True" and old_access:
            events.append(("Normal", str(access.get("reason")), str(access.get("message"))))
    if old_phase != new_phase:
        ready = conds.get("Ready", {})
        kind = ("Warning" if new_phase in (AdapterPhase.DEGRADED, AdapterPhase.FAILED)
                else "Normal")
        message = f"phase {old_phase or 'none'} -> {new_phase}: {ready.get('message', '')}"
        events.append((kind, str(new_phase), message))
    if (old.get("activeVersion") and new.get("activeVersion")
            and old["activeVersion"] != new["activeVersion"]):
        events.append(("Normal", "Activated",
                       f"active version {old['activeVersion']} -> {new['activeVersion']}"))
    events.extend(move_events(old, new))
    return events


def move_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``Moving`` when a move starts (from, to and why: the load figures), ``MoveRouted``
    when the target takes the traffic, ``Moved`` when the source is evicted and
    ``MoveAbandoned`` (Warning) when the target failed, each once."""
    events: list[tuple[str, str, str]] = []
    before = old.get("move") if isinstance(old.get("move"), Mapping) else {}
    after = new.get("move") if isinstance(new.get("move"), Mapping) else {}
    same = (before.get("from"), before.get("to"), before.get("started")) == (
        after.get("from"), after.get("to"), after.get("started"))
    if after and not same:
        events.append(("Normal", "Moving", f"{after.get('from')} -> {after.get('to')}: "
                       f"{after.get('reason', '')}"))
    if after.get("phase") == MOVE_DRAINING and (not same or before.get("phase") != MOVE_DRAINING):
        events.append(("Normal", "MoveRouted",
                       f"{after.get('to')} holds it Ready and takes its requests; "
                       f"{after.get('from')} drains"))
    last = new.get("lastMove") if isinstance(new.get("lastMove"), Mapping) else None
    if last and last != old.get("lastMove"):
        if last.get("outcome") == MOVED:
            events.append(("Normal", "Moved", str(last.get("reason", ""))))
        else:
            events.append(("Warning", "MoveAbandoned", str(last.get("reason", ""))))
    return events


def status_differs(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether ``new`` changes anything in ``old`` (kopf's own keys ignored)."""
    old = {k: v for k, v in (old or {}).items() if k != "kopf"}
    return any(old.get(k) != v for k, v in new.items()) or any(
        k not in new for k in old if k in FORGETTABLE)


# Status fields that disappear (``None`` in the merge patch) when a new status lacks them.
FORGETTABLE = ("activeVersion", "activeSource", "residency", "inFlight", "move", "canary")


def status_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch from ``old`` to ``new``: :data:`FORGETTABLE` fields ``new`` lacks
    are removed, and so are ``activeSource``'s and ``canary``'s own keys it no longer has
    (a merge patch merges nested objects)."""
    old = old or {}
    patch = dict(new)
    for key in FORGETTABLE:
        if key not in new and old.get(key):
            patch[key] = None
    for key in ("activeSource", "canary"):
        old_part, new_part = old.get(key), new.get(key)
        if isinstance(old_part, Mapping) and isinstance(new_part, Mapping):
            patch[key] = {**{k: None for k in old_part}, **new_part}
    return patch


def outranked(peering: Mapping[str, Any] | None, priority: int,
              now: dt.datetime | None = None) -> bool:
    """Whether a live peer in kopf's peering object has a higher priority than ours.

    kopf pauses its own handlers in that case; the reconcile loop (not a kopf handler)
    asks this before every pass, so only the leading replica writes. A peer is live until
    ``lastseen + lifetime``. Peers with our own priority are ignored: that is us (priorities
    are random per process unless set).
    """
    now = now or dt.datetime.now(dt.UTC)
    for info in ((peering or {}).get("status") or {}).values():
        if not isinstance(info, Mapping):
            continue
        try:
            other = int(info.get("priority", 0))
            lastseen = dt.datetime.fromisoformat(str(info["lastseen"]))
            lifetime = dt.timedelta(seconds=int(info.get("lifetime", 60)))
        except (KeyError, TypeError, ValueError):
            continue
        if lastseen.tzinfo is None:
            lastseen = lastseen.replace(tzinfo=dt.UTC)
        if other > priority and lastseen + lifetime > now:
            return True
    return False
