"""Which pods hold which LoraAdapter: pure functions, no I/O.

- The candidates of an adapter are the live pods its ``spec.pool`` selects in its namespace.
- A *new* placement needs a Ready pod; an existing one (remembered in ``status.placements``)
  is kept while its pod is live, even when it is briefly not Ready (a restarting server), so
  a flapping readiness probe never makes the sidecar drop and re-download adapters.
- ``replicas`` absent: every Ready pod (plus the live pods already holding it).
- ``replicas: N``: keep up to N existing placements (Ready pods first, then by name), then
  fill the rest with the placement policy. A pod that disappears frees its slot, and the
  adapter is re-placed on the next pass.

Policies (``--placement-policy``):

- ``leastAdapters`` picks the pods holding the fewest adapters, ties broken by pod name;
- ``leastLoaded`` balances what the adapters cost: each pod's load is the sum of the
  measured tokens/s of the tenants placed on it (the operator's per-tenant token history,
  the same counters hot-tenant promotion reads), and a pod whose adapters already fill its
  device slots (``--placement-device-slots``) comes after every pod with a free slot, so
  a busy tenant lands where it can stay on the device. Ties: fewer adapters, then name.

Both choose only *new* placements: an existing one stays (moving a serving tenant would cost
a download, a load and a drain). Rebalancing placed tenants by load is not done.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from loramux.operator.model import (
    AdapterSpec,
    ObjectKey,
    PodKey,
    pod_is_ready,
    pod_key,
    pods_in_pool,
)


@dataclass
class PodLoad:
    """What a pod holds, as placement counts it."""

    adapters: int = 0
    tokens_per_s: float = 0.0


Policy = Callable[[Sequence[PodKey], Mapping[PodKey, PodLoad]], list[PodKey]]
_IDLE = PodLoad()


def least_adapters(candidates: Sequence[PodKey], load: Mapping[PodKey, PodLoad]
                   ) -> list[PodKey]:
    """Fewest adapters first; ties by pod name, so the choice is stable across passes."""
    return sorted(candidates, key=lambda p: (load.get(p, _IDLE).adapters, p[1], p[0]))


def least_loaded(candidates: Sequence[PodKey], load: Mapping[PodKey, PodLoad],
                 device_slots: int | None = None) -> list[PodKey]:
    """Pods with a free device slot first, then the least measured tokens/s, then fewest
    adapters, then name."""
    def key(pod: PodKey) -> tuple[bool, float, int, str, str]:
        held = load.get(pod, _IDLE)
        full = device_slots is not None and held.adapters >= device_slots
        return (full, round(held.tokens_per_s, 6), held.adapters, pod[1], pod[0])

    return sorted(candidates, key=key)


POLICIES: dict[str, Policy] = {"leastAdapters": least_adapters, "leastLoaded": least_loaded}


def place(
    specs: Sequence[AdapterSpec],
    pods: Sequence[Mapping[str, Any]],
    *,
    excluded: Mapping[ObjectKey, Collection[PodKey]] | None = None,
    policy: str | Policy = "leastAdapters",
    rates: Mapping[tuple[str, str], float] | None = None,
    device_slots: int | None = None,
) -> dict[ObjectKey, list[PodKey]]:
    """Pods per adapter. ``specs`` are the valid, non-deleting adapters to place;
    ``excluded`` lists pods an adapter must not use (e.g. they serve another base model);
    ``rates`` are measured tokens/s per (namespace, tenant) (``leastLoaded``; absent = 0);
    ``device_slots`` is each pod's device adapter slots (``leastLoaded``; None: unlimited)."""
    if policy == "leastLoaded":
        choose: Policy = partial(least_loaded, device_slots=device_slots)
    else:
        choose = POLICIES[policy] if isinstance(policy, str) else policy
    rates = rates or {}
    excluded = excluded or {}
    ordered = sorted(specs, key=lambda s: s.order)
    chosen: dict[ObjectKey, list[PodKey]] = {}
    ready_of: dict[ObjectKey, set[PodKey]] = {}
    load: dict[PodKey, PodLoad] = {}

    def add(pod: PodKey, spec: AdapterSpec) -> None:
        held = load.setdefault(pod, PodLoad())
        held.adapters += 1
        held.tokens_per_s += max(0.0, rates.get((spec.namespace, spec.tenant), 0.0))

    # 1. what stays where it is (stability), and the "every pod" adapters
    for spec in ordered:
        skip = set(excluded.get(spec.key, ()))
        pool = [p for p in pods_in_pool(spec, pods) if pod_key(p) not in skip]
        live = {pod_key(p) for p in pool}
        ready = {pod_key(p) for p in pool if pod_is_ready(p)}
        ready_of[spec.key] = ready
        previous = [(spec.namespace, name) for name in spec.previous_pods]
        previous = [p for p in dict.fromkeys(previous) if p in live]
        if spec.replicas is None:
            picked = sorted(ready | set(previous), key=lambda p: p[1])
        else:
            picked = sorted(previous, key=lambda p: (p not in ready, p[1]))[: spec.replicas]
        chosen[spec.key] = picked
        for pod in picked:
            add(pod, spec)

    # 2. fill the missing replicas, oldest adapter first
    for spec in ordered:
        if spec.replicas is None:
            continue
        need = spec.replicas - len(chosen[spec.key])
        if need <= 0:
            continue
        have = set(chosen[spec.key])
        candidates = [p for p in ready_of[spec.key] if p not in have]
        for pod in choose(candidates, load)[:need]:
            chosen[spec.key].append(pod)
            add(pod, spec)
        chosen[spec.key].sort(key=lambda p: p[1])
    return chosen
