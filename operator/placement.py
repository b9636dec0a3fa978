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

Both choose only *new* placements: an existing one stays while its pod is live. A placed
tenant changes pods only through a *move* (``status.move``, :class:`~model.Move`), which
follows the rollout discipline (:func:`advance_move`):

1. **load**: the target is placed as well (``replicas + 1`` holders; the source serves);
2. **route**: once the target holds the adapter Ready, it is the holder in the pool's
   placement tables and the source is left out of them (it still holds the adapter);
3. **drain**: the source is evicted once every pool pod's server holds a table without it
   and it reports no request of the tenant in flight, or after the drain timeout;
4. **evict**: the source leaves the placements (its sidecar evicts, the server finishing
   what is in flight; requests reaching it meanwhile are forwarded to the target).

A target that fails to load (or goes away) abandons the move: the target is dropped, the
source kept. Moves come from rebalancing by load (:func:`choose_moves`, ``leastLoaded``
with ``--rebalance``): at most one move in progress per pool, only when the pool's most
loaded pod is worth a download and a drain over its least loaded one, only when it
strictly narrows the pool's spread without making the target the new hot spot (the
hysteresis that keeps it from flapping), and a tenant moved recently stays put; and from
pods NotReady beyond a grace (:func:`choose_unready_moves`, ``--unready-grace-seconds``):
a pod briefly not Ready keeps its tenants, one that stays so hands them over the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from loramux.operator.model import (
    MOVE_ABANDONED,
    MOVE_DRAINING,
    MOVE_LOADING,
    MOVED,
    AdapterSpec,
    LastMove,
    Move,
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
    moves: Mapping[ObjectKey, Move] | None = None,
) -> dict[ObjectKey, list[PodKey]]:
    """Pods per adapter. ``specs`` are the valid, non-deleting adapters to place;
    ``excluded`` lists pods an adapter must not use (e.g. they serve another base model);
    ``rates`` are measured tokens/s per (namespace, tenant) (``leastLoaded``; absent = 0);
    ``device_slots`` is each pod's device adapter slots (``leastLoaded``; None: unlimited);
    ``moves``: adapters with a move in progress, whose target is placed *beyond* its
    ``replicas`` while the source is live (once the source is gone, the target is simply
    one of its placements)."""
    moves = moves or {}
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
        move = moves.get(spec.key) if spec.replicas is not None else None
        extra: PodKey | None = None
        if move is not None and (spec.namespace, move.source) in live:
            extra = (spec.namespace, move.target)
            previous = [p for p in previous if p != extra]
            if (spec.namespace, move.source) not in previous:
                previous.append((spec.namespace, move.source))
        if spec.replicas is None:
            picked = sorted(ready | set(previous), key=lambda p: p[1])
        else:
            picked = sorted(previous, key=lambda p: (p not in ready, p[1]))[: spec.replicas]
            if extra is not None and extra in live:
                picked = sorted([*picked, extra], key=lambda p: p[1])
        chosen[spec.key] = picked
        for pod in picked:
            add(pod, spec)

    # 2. fill the missing replicas, oldest adapter first
    for spec in ordered:
        if spec.replicas is None:
            continue
        move = moves.get(spec.key)
        moving = move is not None and (spec.namespace, move.target) in chosen[spec.key] \
            and (spec.namespace, move.source) in chosen[spec.key]
        need = spec.replicas - len(chosen[spec.key]) + (1 if moving else 0)
        if need <= 0:
            continue
        have = set(chosen[spec.key])
        candidates = [p for p in ready_of[spec.key] if p not in have]
        for pod in choose(candidates, load)[:need]:
            chosen[spec.key].append(pod)
            add(pod, spec)
        chosen[spec.key].sort(key=lambda p: p[1])
    return chosen


def pod_loads(specs: Sequence[AdapterSpec], placements: Mapping[ObjectKey, Sequence[PodKey]],
              rates: Mapping[tuple[str, str], float] | None = None) -> dict[PodKey, PodLoad]:
    """What each pod holds, as the policies count it (every placement at the tenant's full
    measured rate, as :func:`place` counts a new one)."""
    rates = rates or {}
    load: dict[PodKey, PodLoad] = {}
    for spec in specs:
        rate = max(0.0, rates.get((spec.namespace, spec.tenant), 0.0))
        for pod in placements.get(spec.key, ()):
            held = load.setdefault(pod, PodLoad())
            held.adapters += 1
            held.tokens_per_s += rate
    return load


# --------------------------------------------------------------------------- moves


@dataclass(frozen=True)
class MoveFacts:
    """What the pods said about one move, as :func:`advance_move` needs it.

    ``live``: the pool's live pods; ``target_ready``: the target's sidecar and server hold
    ``spec.version`` Ready; ``target_failed``: why the target failed to load it, if so;
    ``tables_updated``: every other live pool pod's server holds a placement table that
    leaves the source out; ``source_in_flight``: the source's requests of the tenant in
    flight at its last report (None: unknown)."""

    live: frozenset[PodKey]
    target_ready: bool = False
    target_failed: str | None = None
    tables_updated: bool = False
    source_in_flight: int | None = None


@dataclass(frozen=True)
class MoveStep:
    """The outcome of one pass for one move: the state to keep (None: no move in progress
    any more), how it ended (``done``), and the adapter's pods from now on."""

    move: Move | None
    done: LastMove | None
    placements: list[PodKey]


def advance_move(spec: AdapterSpec, move: Move, placements: Sequence[PodKey],
                 facts: MoveFacts, *, now: float, drain_timeout_s: float,
                 load_timeout_s: float) -> MoveStep:
    """One step of ``move`` (see the module doc). ``placements``: what :func:`place` chose
    for the adapter (the target included while the source is live)."""
    ns = spec.namespace
    source, target = (ns, move.source), (ns, move.target)
    pods = list(placements)

    def end(outcome: str, why: str, keep: list[PodKey]) -> MoveStep:
        reason = f"{spec.tenant}: {move.source} -> {move.target}: {why}"
        return MoveStep(None, LastMove(move.source, move.target, outcome, now, reason), keep)

    without_target = [p for p in pods if p != target]
    if spec.replicas is None:
        return end(MOVE_ABANDONED, "replicas is unset (the adapter is on every pod)", pods)
    if target not in facts.live:
        return end(MOVE_ABANDONED, f"the target pod {move.target} is gone", without_target)
    if source not in facts.live:
        return end(MOVED, f"the source pod {move.source} is gone; {move.target} keeps it",
                   pods)
    if move.phase == MOVE_LOADING:
        if facts.target_failed is not None:
            return end(MOVE_ABANDONED, f"the target failed to load {spec.version}: "
                       f"{facts.target_failed}", without_target)
        if facts.target_ready:
            return MoveStep(replace(move, phase=MOVE_DRAINING, since=now), None, pods)
        if now - move.since >= load_timeout_s:
            return end(MOVE_ABANDONED, f"the target did not load {spec.version} within "
                       f"{load_timeout_s:g} s", without_target)
        return MoveStep(move, None, pods)
    # MOVE_DRAINING: the target is the holder in the tables, the source drains.
    if not facts.target_ready:
        return end(MOVE_ABANDONED, f"the target no longer holds {spec.version} Ready; "
                   f"{move.source} keeps it", without_target)
    drained = facts.tables_updated and facts.source_in_flight == 0
    waited = now - move.since
    if drained or waited >= drain_timeout_s:
        why = ("every pool pod routes to the target and nothing is in flight on the source"
               if drained else f"drain timeout ({drain_timeout_s:g} s) reached")
        detail = f"; {move.reason}" if move.reason else ""
        return end(MOVED, f"{why}{detail}", [p for p in pods if p != source])
    return MoveStep(move, None, pods)


@dataclass(frozen=True)
class Rebalance:
    """Rebalancing settings (``--rebalance-*``)."""

    ratio: float = 1.5  # the most loaded pod above ratio x the least loaded one ...
    floor: float = 10.0  # ... plus this many tokens/s; a move must narrow the spread by it
    cooldown_s: float = 600.0  # a tenant moved (or whose move was abandoned) stays put


def choose_moves(
    specs: Sequence[AdapterSpec],
    placements: Mapping[ObjectKey, Sequence[PodKey]],
    candidates: Mapping[ObjectKey, Sequence[PodKey]],
    rates: Mapping[tuple[str, str], float],
    *,
    now: float,
    settings: Rebalance,
    ready_on: Mapping[ObjectKey, Collection[PodKey]],
    busy_pools: Collection[tuple[str, str]] = (),
    pinned_keys: Collection[ObjectKey] = (),
    device_slots: int | None = None,
) -> dict[ObjectKey, Move]:
    """New moves, at most one per pool (``(namespace, pool_key)``; pools in ``busy_pools``
    already have one in progress).

    ``candidates``: each adapter's Ready pool pods it may use; ``ready_on``: the pods where
    it is Ready now (only a Ready placement moves); ``pinned_keys``: adapters that never
    move (e.g. hot tenants on dedicated deployments). A pod's load is the sum over the
    tenants placed on it of their measured tokens/s divided by their number of pods.
    ``replicas`` absent (every pod) never moves."""
    load: dict[PodKey, float] = {}
    count: dict[PodKey, int] = {}
    for spec in specs:
        pods = placements.get(spec.key, ())
        share = max(0.0, rates.get((spec.namespace, spec.tenant), 0.0)) / max(1, len(pods))
        for pod in pods:
            load[pod] = load.get(pod, 0.0) + share
            count[pod] = count.get(pod, 0) + 1
    pools: dict[tuple[str, str], list[AdapterSpec]] = {}
    for spec in sorted(specs, key=lambda s: s.order):
        pools.setdefault((spec.namespace, spec.pool_key), []).append(spec)
    chosen: dict[ObjectKey, Move] = {}
    for pool, members in sorted(pools.items()):
        if pool in busy_pools:
            continue
        pods = sorted({p for s in members for p in candidates.get(s.key, ())},
                      key=lambda p: p[1])
        if len(pods) < 2:
            continue
        found = _best_move(members, pods, load, count, placements, candidates, rates, now,
                           settings, ready_on, pinned_keys, device_slots)
        if found is not None:
            chosen[found[0]] = found[1]
    return chosen


def _best_move(members: Sequence[AdapterSpec], pods: Sequence[PodKey],
               load: Mapping[PodKey, float], count: Mapping[PodKey, int],
               placements: Mapping[ObjectKey, Sequence[PodKey]],
               candidates: Mapping[ObjectKey, Sequence[PodKey]],
               rates: Mapping[tuple[str, str], float], now: float, settings: Rebalance,
               ready_on: Mapping[ObjectKey, Collection[PodKey]],
               pinned_keys: Collection[ObjectKey], device_slots: int | None
               ) -> tuple[ObjectKey, Move] | None:
    """One pool's move, or None: from its most loaded pod to its least loaded one."""
    loads = {p: load.get(p, 0.0) for p in pods}
    hi = max(pods, key=lambda p: (loads[p], p[1]))
    lo = min(pods, key=lambda p: (loads[p], p[1]))
    if not loads[hi] > settings.ratio * loads[lo] + settings.floor:
        return None
    if device_slots is not None and count.get(lo, 0) >= device_slots:
        return None  # the target would push a tenant off its device slots
    spread = loads[hi] - loads[lo]
    best: tuple[float, str, AdapterSpec, float, float] | None = None
    for spec in members:
        placed = placements.get(spec.key, ())
        if (spec.replicas is None or spec.key in pinned_keys or hi not in placed
                or lo in placed or lo not in candidates.get(spec.key, ())
                or hi not in ready_on.get(spec.key, ())):
            continue
        if spec.last_move is not None and now - spec.last_move.finished < settings.cooldown_s:
            continue
        share = max(0.0, rates.get((spec.namespace, spec.tenant), 0.0)) / max(1, len(placed))
        if share <= 0:
            continue
        after = dict(loads)
        after[hi] -= share
        after[lo] += share
        new_spread = max(after.values()) - min(after.values())
        if spread - new_spread < settings.floor:
            continue  # not worth a download and a drain
        if after[lo] > settings.ratio * after[hi] + settings.floor:
            continue  # the target would be the new hot spot (and the move would flap back)
        rank = (new_spread, spec.name)
        if best is None or rank < best[:2]:
            best = (new_spread, spec.name, spec, share, new_spread)
    if best is None:
        return None
    _, _, spec, share, new_spread = best
    reason = (f"rebalance: {hi[1]} serves {loads[hi]:.1f} tokens/s, {lo[1]} "
              f"{loads[lo]:.1f}; {spec.tenant} ({share:.1f} tokens/s) moves, the pool's "
              f"spread {spread:.1f} -> {new_spread:.1f} tokens/s")
    return spec.key, Move(source=hi[1], target=lo[1], phase=MOVE_LOADING, started=now,
                          since=now, reason=reason)


def choose_unready_moves(
    specs: Sequence[AdapterSpec],
    placements: Mapping[ObjectKey, Sequence[PodKey]],
    candidates: Mapping[ObjectKey, Sequence[PodKey]],
    unready_since: Mapping[PodKey, float],
    *,
    now: float,
    grace_s: float,
    moving: Collection[ObjectKey] = (),
    policy: str | Policy = "leastAdapters",
    rates: Mapping[tuple[str, str], float] | None = None,
    device_slots: int | None = None,
) -> dict[ObjectKey, Move]:
    """Moves off pods that have been NotReady longer than ``grace_s`` (``unready_since``:
    when each such pod's Ready condition turned False). A pod briefly not Ready keeps its
    placements (a restarting server must not make the sidecars re-download); one that
    stays so loses them through the same protocol as a rebalance: the target loads while the
    source (still live, perhaps still serving) is kept, then routes, drains, evicts.

    Each adapter (``replicas: N``, not already ``moving``) moves one placement at a time, to
    the pod its placement ``policy`` picks among ``candidates`` (its Ready pool pods) that
    do not hold it. Not limited to one move per pool: this is failover, not tuning."""
    if policy == "leastLoaded":
        choose: Policy = partial(least_loaded, device_slots=device_slots)
    else:
        choose = POLICIES[policy] if isinstance(policy, str) else policy
    load = pod_loads(specs, placements, rates)
    out: dict[ObjectKey, Move] = {}
    for spec in sorted(specs, key=lambda s: s.order):
        if spec.replicas is None or spec.key in moving:
            continue
        placed = placements.get(spec.key, ())
        stale = sorted((p for p in placed if p in unready_since
                        and now - unready_since[p] >= grace_s), key=lambda p: p[1])
        if not stale:
            continue
        free = [p for p in candidates.get(spec.key, ()) if p not in placed]
        if not free:
            continue
        source, target = stale[0], choose(free, load)[0]
        held = load.setdefault(target, PodLoad())
        held.adapters += 1
        held.tokens_per_s += max(0.0, (rates or {}).get((spec.namespace, spec.tenant), 0.0))
        waited = now - unready_since[source]
        reason = (f"{spec.tenant}: {source[1]} has been NotReady for {waited:.0f} s "
                  f"(grace {grace_s:g} s); {target[1]} is Ready")
        out[spec.key] = Move(source=source[1], target=target[1], phase=MOVE_LOADING,
                             started=now, since=now, reason=reason)
    return out
