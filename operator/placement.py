"""Which pods hold which LoraAdapter: pure functions, no I/O.

- The candidates of an adapter are the live pods its ``spec.pool`` selects in its namespace.
- A *new* placement needs a Ready pod; an existing one (remembered in ``status.placements``)
  is kept while its pod is live, even when it is briefly not Ready (a restarting server), so
  a flapping readiness probe never makes the sidecar drop and re-download adapters.
- ``replicas`` absent: every Ready pod (plus the live pods already holding it).
- ``replicas: N``: keep up to N existing placements (Ready pods first, then by name), then
  fill the rest with the placement policy; ``leastAdapters`` picks the pods holding the
  fewest adapters, ties broken by pod name. A pod that disappears frees its slot, and the
  adapter is re-placed on the next pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from loramux.operator.model import (
    AdapterSpec,
    ObjectKey,
    PodKey,
    pod_is_ready,
    pod_key,
    pods_in_pool,
)

Policy = Callable[[Sequence[PodKey], Mapping[PodKey, int]], list[PodKey]]


def least_adapters(candidates: Sequence[PodKey], load: Mapping[PodKey, int]) -> list[PodKey]:
    """Fewest adapters first; ties by pod name, so the choice is stable across passes."""
    return sorted(candidates, key=lambda p: (load.get(p, 0), p[1], p[0]))


POLICIES: dict[str, Policy] = {"leastAdapters": least_adapters}


def place(
    specs: Sequence[AdapterSpec],
    pods: Sequence[Mapping[str, Any]],
    *,
    excluded: Mapping[ObjectKey, Collection[PodKey]] | None = None,
    policy: str | Policy = "leastAdapters",
) -> dict[ObjectKey, list[PodKey]]:
    """Pods per adapter. ``specs`` are the valid, non-deleting adapters to place;
    ``excluded`` lists pods an adapter must not use (e.g. they serve another base model)."""
    choose = POLICIES[policy] if isinstance(policy, str) else policy
    excluded = excluded or {}
    ordered = sorted(specs, key=lambda s: s.order)
    chosen: dict[ObjectKey, list[PodKey]] = {}
    ready_of: dict[ObjectKey, set[PodKey]] = {}
    load: Counter[PodKey] = Counter()

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
        load.update(picked)

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
            load[pod] += 1
        chosen[spec.key].sort(key=lambda p: p[1])
    return chosen
