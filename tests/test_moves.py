"""Moving a placed tenant between pods, and rebalancing by load: pure functions.

The protocol (``placement.advance_move``): load on the target (both placed), route (the
target is the holder in the tables, the source left out), drain (every pool pod holds the
new table and nothing is in flight on the source, or the drain timeout), evict (the source
leaves the placements). The decision (``placement.choose_moves``): one move per pool, only
when worth it, never one that flaps. Then the operator's plan over several passes, its
state kept only in the LoraAdapter's status (a fresh operator each pass resumes it).
"""

from __future__ import annotations

from typing import Any

from test_operator_unit import cr, k, pod, pool_obs, served_view, url

from loramux.contracts import DesiredState, PeerTable
from loramux.operator.model import (
    MOVE_ABANDONED,
    MOVE_DRAINING,
    MOVE_LOADING,
    MOVED,
    LastMove,
    Move,
    parse_adapter,
)
from loramux.operator.peers import build_pool_tables, table_fingerprint
from loramux.operator.placement import (
    MoveFacts,
    Rebalance,
    advance_move,
    choose_moves,
    place,
)
from loramux.operator.status import compute_status, move_events, status_events

T0 = 1_800_000_000.0  # a wall-clock time (epoch seconds)
LIVE = frozenset({k("p1"), k("p2"), k("p3")})


def moving(phase: str = MOVE_LOADING, since: float = T0, source: str = "p1",
           target: str = "p2") -> Move:
    return Move(source=source, target=target, phase=phase, started=T0, since=since,
                reason="rebalance: test")


def legal(**status: Any) -> Any:
    return parse_adapter(cr("legal", "legal", replicas=1, status=status or None))


def step(move: Move, facts: MoveFacts, now: float = T0 + 5, spec: Any = None):
    spec = spec or legal()
    return advance_move(spec, move, [k("p1"), k("p2")], facts, now=now, drain_timeout_s=60,
                        load_timeout_s=600)


# --------------------------------------------------------------------------- state


def test_move_state_round_trips_through_the_status_and_junk_is_ignored():
    move = moving(MOVE_DRAINING, since=T0 + 7)
    assert Move.from_status(move.view()) == move
    last = LastMove("p1", "p2", MOVED, T0 + 9, "legal: done")
    assert LastMove.from_status(last.view()) == last
    spec = legal(placements=[{"pod": "p1"}, {"pod": "p2"}], move=move.view(),
                 lastMove=last.view())
    assert spec.move == move and spec.last_move == last
    for junk in ({**move.view(), "phase": "Teleporting"}, {**move.view(), "to": "p1"},
                 {**move.view(), "started": "yesterday"}, "p1->p2", None):
        assert Move.from_status(junk) is None
    assert LastMove.from_status({**last.view(), "outcome": "Maybe"}) is None


# --------------------------------------------------------------------------- place


def test_place_keeps_source_and_target_while_moving_then_the_target_alone():
    pods = [pod("p1"), pod("p2"), pod("p3")]
    status = {"placements": [{"pod": "p1"}, {"pod": "p2"}], "move": moving().view()}
    spec = legal(**status)
    # replicas 1, yet both: the target beyond its replicas while the source is live
    assert place([spec], pods, moves={spec.key: spec.move})[spec.key] == [k("p1"), k("p2")]
    # a pod listed first by name must not squeeze the source out (p0 < p1)
    other = legal(placements=[{"pod": "p1"}, {"pod": "p0"}],
                  move=moving(target="p0").view())
    got = place([other], [*pods, pod("p0")], moves={other.key: other.move})
    assert got[other.key] == [k("p0"), k("p1")]
    # the source gone: the target is its one placement, nothing else is added
    assert place([spec], [pod("p2"), pod("p3")], moves={spec.key: spec.move})[spec.key] == [
        k("p2")]
    # without the move, the same status is cut to replicas (the move is the memory)
    assert place([spec], pods)[spec.key] == [k("p1")]


# --------------------------------------------------------------------------- protocol


def test_loading_waits_for_the_target_then_routes_to_it():
    waiting = step(moving(), MoveFacts(live=LIVE))
    assert waiting.move == moving() and waiting.done is None
    assert waiting.placements == [k("p1"), k("p2")]  # both placed: the source serves
    routed = step(moving(), MoveFacts(live=LIVE, target_ready=True), now=T0 + 8)
    assert routed.move is not None and routed.move.phase == MOVE_DRAINING
    assert routed.move.since == T0 + 8 and routed.done is None
    assert routed.placements == [k("p1"), k("p2")]  # the source still holds it


def test_a_target_that_fails_to_load_abandons_the_move_and_keeps_the_source():
    failed = step(moving(), MoveFacts(live=LIVE, target_failed="sha256 mismatch"))
    assert failed.move is None and failed.placements == [k("p1")]
    assert failed.done is not None and failed.done.outcome == MOVE_ABANDONED
    assert "p1 -> p2" in failed.done.reason and "sha256 mismatch" in failed.done.reason
    slow = step(moving(), MoveFacts(live=LIVE), now=T0 + 601)
    assert slow.done is not None and slow.done.outcome == MOVE_ABANDONED
    assert "within 600 s" in slow.done.reason and slow.placements == [k("p1")]
    gone = step(moving(), MoveFacts(live=frozenset({k("p1")})))
    assert gone.done is not None and gone.done.outcome == MOVE_ABANDONED
    assert gone.placements == [k("p1")]
    # a target lost while draining: the source is back in the tables (move over, kept)
    lost = step(moving(MOVE_DRAINING), MoveFacts(live=LIVE, target_ready=False))
    assert lost.done is not None and lost.done.outcome == MOVE_ABANDONED
    assert lost.placements == [k("p1")]


def test_the_source_gone_leaves_the_target_as_the_placement():
    done = step(moving(), MoveFacts(live=frozenset({k("p2"), k("p3")})))
    assert done.done is not None and done.done.outcome == MOVED and done.move is None
    assert done.placements == [k("p1"), k("p2")]  # place() already dropped a gone pod


def test_drain_waits_for_every_table_and_no_request_in_flight_or_the_timeout():
    draining = moving(MOVE_DRAINING, since=T0)
    for facts in (MoveFacts(live=LIVE, target_ready=True, tables_updated=False,
                            source_in_flight=0),
                  MoveFacts(live=LIVE, target_ready=True, tables_updated=True,
                            source_in_flight=2),
                  MoveFacts(live=LIVE, target_ready=True, tables_updated=True,
                            source_in_flight=None)):  # unknown is not zero
        held = step(draining, facts, now=T0 + 59)
        assert held.move == draining and held.done is None
        assert held.placements == [k("p1"), k("p2")]
        late = step(draining, facts, now=T0 + 60)  # the bounded drain
        assert late.move is None and late.placements == [k("p2")]
        assert late.done is not None and "drain timeout (60 s)" in late.done.reason
    evicted = step(draining, MoveFacts(live=LIVE, target_ready=True, tables_updated=True,
                                       source_in_flight=0), now=T0 + 3)
    assert evicted.move is None and evicted.placements == [k("p2")]
    assert evicted.done is not None and evicted.done.outcome == MOVED
    assert "every pool pod routes to the target" in evicted.done.reason
    assert "rebalance: test" in evicted.done.reason  # why it moved, in the Moved Event


def test_unset_replicas_ends_a_move():
    spec = parse_adapter(cr("legal", "legal"))
    done = step(moving(), MoveFacts(live=LIVE, target_ready=True), spec=spec)
    assert done.done is not None and done.done.outcome == MOVE_ABANDONED


# --------------------------------------------------------------------------- decision


def _pool(rates: dict[str, float], where: dict[str, str], *, replicas: int = 1,
          last: dict[str, LastMove] | None = None) -> tuple[list, dict, dict, dict]:
    specs = []
    for i, tenant in enumerate(sorted(where)):
        status = {"lastMove": last[tenant].view()} if last and tenant in last else None
        specs.append(parse_adapter(cr(tenant, tenant, replicas=replicas, status=status,
                                      created=f"2026-01-01T00:00:0{i}Z")))
    placements = {s.key: [k(p) for p in where[s.tenant].split(",")] for s in specs}
    candidates = {s.key: sorted(LIVE) for s in specs}
    ready_on = {s.key: set(placements[s.key]) for s in specs}
    return specs, placements, candidates, {("default", t): r for t, r in rates.items()} | {
        "_ready_on": ready_on}  # type: ignore[dict-item]


def choose(rates: dict[str, float], where: dict[str, str], *, settings: Rebalance | None = None,
           now: float = T0, **kw: Any) -> dict:
    specs, placements, candidates, measured = _pool(rates, where, last=kw.pop("last", None))
    ready_on = measured.pop("_ready_on")
    return choose_moves(specs, placements, candidates, measured, now=now,
                        settings=settings or Rebalance(ratio=1.5, floor=10, cooldown_s=600),
                        ready_on=kw.pop("ready_on", ready_on), **kw)


def test_a_pool_piled_on_one_pod_moves_one_tenant_to_the_idle_pod():
    got = choose({"a": 100, "b": 100, "c": 100}, {"a": "p1", "b": "p1", "c": "p1"})
    assert list(got) == [k("a")]  # one move per pool; ties by name
    move = got[k("a")]
    assert (move.source, move.phase) == ("p1", MOVE_LOADING)
    assert move.target in ("p2", "p3") and move.started == move.since == T0
    # the why, with the load figures
    assert "p1 serves 300.0 tokens/s" in move.reason and "a (100.0 tokens/s)" in move.reason
    assert "300.0 -> 200.0" in move.reason


def test_below_the_ratio_plus_floor_nothing_moves():
    where = {"a": "p1", "b": "p2", "c": "p3"}
    assert choose({"a": 140, "b": 100, "c": 100}, where) == {}  # 140 < 1.5 x 100 + 10
    assert choose({"a": 5, "b": 0, "c": 0}, {"a": "p1", "b": "p1", "c": "p2"}) == {}  # floor
    # unmeasured: nothing to gain
    assert choose({}, {"a": "p1", "b": "p1", "c": "p1"}) == {}


def test_a_move_that_only_shifts_the_hot_spot_or_gains_too_little_is_not_made():
    # one big tenant: moving it makes the target the hot spot; moving the small one gains
    # less than the floor
    two = [k("p1"), k("p2")]
    specs, placements, _, measured = _pool({"big": 200, "small": 4},
                                           {"big": "p1", "small": "p1"})
    ready_on = measured.pop("_ready_on")
    got = choose_moves(specs, placements, {s.key: two for s in specs}, measured, now=T0,
                       settings=Rebalance(ratio=1.5, floor=10, cooldown_s=600),
                       ready_on=ready_on)
    assert got == {}


def test_the_move_that_narrows_the_spread_most_is_chosen():
    where = {"a": "p1", "b": "p1", "c": "p1", "d": "p2", "e": "p3"}
    got = choose({"a": 30, "b": 60, "c": 90, "d": 60, "e": 60}, where)
    # p1 = 180, p2 = p3 = 60: moving b (60) makes 120/120/60 (spread 60), a 150/90 (90),
    # c 90/150 (90)
    assert list(got) == [k("b")] and got[k("b")].target == "p2"


def test_no_flapping_after_a_move_the_pool_is_left_alone():
    rates = {"a": 100, "b": 100, "c": 100}
    first = choose(rates, {"a": "p1", "b": "p1", "c": "p1"},
                   settings=Rebalance(ratio=1.5, floor=10, cooldown_s=0))
    target = first[k("a")].target
    # applied (and no cool-down at all): the next pass finds nothing worth moving ...
    after = {"a": target, "b": "p1", "c": "p1"}
    second = choose(rates, after, settings=Rebalance(ratio=1.5, floor=10, cooldown_s=0))
    third_pod = ({"p2", "p3"} - {target}).pop()
    assert list(second) == [k("b")] and second[k("b")].target == third_pod
    settled = {"a": target, "b": third_pod, "c": "p1"}
    assert choose(rates, settled, settings=Rebalance(ratio=1.5, floor=10, cooldown_s=0)) == {}
    # ... and noise of a few tokens/s does not bring one back
    noisy = {"a": 92, "b": 97, "c": 111}
    assert choose(noisy, settled, settings=Rebalance(ratio=1.5, floor=10, cooldown_s=0)) == {}


def test_never_moved_every_pod_pinned_cooling_down_unready_or_into_full_slots():
    rates = {"a": 100, "b": 100, "c": 100}
    piled = {"a": "p1", "b": "p1", "c": "p1"}
    # replicas absent (every pod): never moves
    every = [parse_adapter(cr(t, t)) for t in piled]
    placements = {s.key: [k("p1")] for s in every}
    measured = {("default", t): r for t, r in rates.items()}
    assert choose_moves(every, placements, {s.key: sorted(LIVE) for s in every}, measured,
                        now=T0, settings=Rebalance(), ready_on=placements) == {}
    # pinned (a hot tenant on its dedicated deployment)
    got = choose(rates, piled, pinned_keys={k("a")})
    assert list(got) == [k("b")]
    # a tenant moved within the cool-down stays; after it, it may move again
    recent = {"a": LastMove("p2", "p1", MOVED, T0 - 100)}
    assert list(choose(rates, piled, last=recent)) == [k("b")]
    assert list(choose(rates, piled, last=recent, now=T0 + 600)) == [k("a")]
    # only a Ready placement moves
    assert choose(rates, piled, ready_on={}) == {}
    # a pool with a move in progress waits
    assert choose(rates, piled, busy_pools={("default", parse_adapter(cr("a", "a")).pool_key)}
                  ) == {}
    # the target's device slots are full: no move that pushes a tenant off the device
    specs, placements, _, measured = _pool(
        {"a": 100, "b": 100, "c": 100, "x": 0, "y": 0},
        {"a": "p1", "b": "p1", "c": "p1", "x": "p2", "y": "p2"})
    ready_on = measured.pop("_ready_on")
    two = {s.key: [k("p1"), k("p2")] for s in specs}
    assert choose_moves(specs, placements, two, measured, now=T0, settings=Rebalance(),
                        ready_on=ready_on, device_slots=2) == {}
    assert choose_moves(specs, placements, two, measured, now=T0, settings=Rebalance(),
                        ready_on=ready_on, device_slots=3) != {}


def test_a_tenant_on_several_pods_counts_its_share_and_never_moves_onto_a_holder():
    specs, placements, candidates, measured = _pool(
        {"wide": 300, "a": 100}, {"wide": "p1,p2", "a": "p1"}, replicas=2)
    ready_on = measured.pop("_ready_on")
    got = choose_moves(specs, placements, candidates, measured, now=T0,
                       settings=Rebalance(), ready_on=ready_on, pinned_keys={k("a")})
    # p1 = 150 + 100 (a pinned), p2 = 150, p3 = 0: wide moves from p1 (the most loaded) to
    # p3, never onto p2 (a holder already)
    assert list(got) == [k("wide")] and (got[k("wide")].source, got[k("wide")].target) == (
        "p1", "p3")


# --------------------------------------------------------------------------- tables


def test_tables_list_the_target_hide_the_draining_source_and_skip_unplaced_pods():
    spec = legal()
    pods = [k("p1"), k("p2"), k("p3")]
    observations = {
        k("p1"): pool_obs("p1", {("legal", "v1"): "Ready"}, [served_view("legal")]),
        k("p2"): pool_obs("p2", {("legal", "v1"): "Ready"}, [served_view("legal")]),
        k("p3"): pool_obs("p3", {}, []),
    }
    members = {spec.key: pods}

    def holders(placements: list, **kw: Any) -> list[str]:
        tables = build_pool_tables([spec], {spec.key: placements}, members, pods,
                                   observations, url, live=pods, **kw)
        return [h.pod for h in tables.for_pod(k("p3")).tenants[0].holders]

    assert holders([k("p1"), k("p2")]) == ["p1", "p2"]  # loading done: both hold it
    assert holders([k("p1"), k("p2")], hidden={spec.key: {"p1"}}) == ["p2"]  # route
    # evicted from the placements, still reporting it while its sidecar evicts: not a holder
    assert holders([k("p2")]) == ["p2"]
    # a terminating pod (not live) that still holds it stays a holder until it is gone
    tables = build_pool_tables([spec], {spec.key: [k("p2")]}, members, [k("p2"), k("p3")],
                               observations, url, live=[k("p2"), k("p3")])
    assert [h.pod for h in tables.for_pod(k("p3")).tenants[0].holders] == ["p1", "p2"]


def test_the_table_fingerprint_is_the_one_the_sidecar_reports():
    spec = legal()
    pods = [k("p1"), k("p2")]
    observations = {k("p1"): pool_obs("p1", {("legal", "v1"): "Ready"},
                                      [served_view("legal", residency="device")],
                                      queue_depth=3)}
    tables = build_pool_tables([spec], {spec.key: [k("p1")]}, {spec.key: pods}, pods,
                               observations, url)
    wire = tables.wire_for(k("p2"))
    # the sidecar: DesiredState parsed from the PUT body, then its table's fingerprint
    received = DesiredState.model_validate({"adapters": [], "peers": wire}).peers
    assert received is not None
    assert table_fingerprint(wire) == received.fingerprint()
    assert table_fingerprint(wire) == PeerTable.model_validate(wire).fingerprint()


# --------------------------------------------------------------------------- status


def test_status_counts_replicas_not_the_extra_pod_and_events_say_each_step_once():
    spec = legal()
    served = pool_obs("p1", {("legal", "v1"): "Ready"}, [served_view("legal")])
    loading = pool_obs("p2", {("legal", "v1"): "Downloading"}, [])
    observations = {k("p1"): served, k("p2"): loading}
    status = compute_status(spec, rejection=None, pods=[k("p1"), k("p2")], desired={},
                            observations=observations, now="2026-01-01T00:00:00Z",
                            extra={k("p2")})
    assert (status["phase"], status["readyPods"]) == ("Ready", "1/1")
    assert [r["pod"] for r in status["placements"]] == ["p1", "p2"]  # both listed
    # while the source drains, both hold it: RESIDENCY names both pods
    observations[k("p2")] = pool_obs("p2", {("legal", "v1"): "Ready"},
                                     [served_view("legal", residency="device")])
    status = compute_status(spec, rejection=None, pods=[k("p1"), k("p2")], desired={},
                            observations=observations, now="2026-01-01T00:00:00Z",
                            extra={k("p1")})
    assert status["residency"] == "p1:disk,p2:device" and status["readyPods"] == "1/1"

    base = {"phase": "Ready"}
    load = {**base, "move": moving().view()}
    route = {**base, "move": moving(MOVE_DRAINING, since=T0 + 4).view()}
    done = {**base, "lastMove": LastMove("p1", "p2", MOVED, T0 + 9, "legal: ok").view()}
    assert [e[1] for e in move_events(base, load)] == ["Moving"]
    assert "p1 -> p2: rebalance: test" in move_events(base, load)[0][2]
    assert move_events(load, load) == []  # once
    assert [e[1] for e in move_events(load, route)] == ["MoveRouted"]
    assert move_events(route, route) == []
    assert [e[:2] for e in status_events(route, done)] == [("Normal", "Moved")]
    assert move_events(done, done) == []
    gave_up = {**base, "lastMove": LastMove("p1", "p2", MOVE_ABANDONED, T0, "x").view()}
    assert [e[:2] for e in move_events(load, gave_up)] == [("Warning", "MoveAbandoned")]


# --------------------------------------------------------------------------- the plan


def _seen(objs: list[dict], pods: list[dict], observations: dict) -> Any:
    from loramux.operator.reconcile import Observed

    adapters = {}
    for obj in objs:
        spec = parse_adapter(obj)
        adapters[spec.key] = (spec, obj)
    return Observed(adapters=adapters, pods=pods,
                    pool_pods={(p["metadata"]["namespace"], p["metadata"]["name"]): p
                               for p in pods},
                    observations=observations, clock=60.0)


def _reconciler() -> Any:
    from loramux.operator.hot_tenants import HotTenants
    from loramux.operator.reconcile import Reconciler
    from loramux.operator.settings import OperatorSettings

    r = Reconciler(OperatorSettings(placement_policy="leastLoaded", rebalance=True,
                                    rebalance_floor_tokens_per_s=1, health_port=0))
    r.hot = HotTenants(None, None)  # type: ignore[arg-type]  # the token history only
    r.hot.record({("default", t): 0 for t in "abc"}, 0.0)
    r.hot.record({("default", t): 6000 for t in "abc"}, 60.0)  # 100 tokens/s each
    return r


def _pass(r: Any, objs: list[dict], pods: list[dict], observations: dict
          ) -> tuple[Any, dict[str, dict], list[tuple[str, str, str]]]:
    """One pass without I/O: plan, then each status as report() computes it (the pods'
    state read back = ``observations``), written into ``objs`` for the next pass."""
    from loramux.operator.reconcile import Delivery

    seen = _seen(objs, pods, observations)
    todo = r.plan(seen)
    delivered = Delivery(put_errors={}, observations=observations)
    r._remember_tables(seen, todo, delivered)
    statuses, events = {}, []
    for spec, obj in seen.adapters.values():
        status = r._status(spec, obj.get("status") or {}, todo, delivered,
                           "2026-01-01T00:00:00Z")
        events += status_events(obj.get("status") or {}, status)
        obj["status"] = status
        statuses[spec.name] = status
    return todo, statuses, events


def test_the_operator_moves_one_tenant_to_a_new_pod_through_every_step():
    pods = [pod(f"p{i}", ports={"sync": 9100 + i, "http": 9000 + i}) for i in (1, 2, 3)]
    objs = [cr(t, t, replicas=1, created=f"2026-01-01T00:00:0{i}Z",
               status={"placements": [{"pod": "p1", "version": "v1", "state": "Ready"}]})
            for i, t in enumerate("abc")]
    held = {("a", "v1"): "Ready", ("b", "v1"): "Ready", ("c", "v1"): "Ready"}
    p1 = pool_obs("p1", held, [served_view(t) for t in "abc"])
    p3 = pool_obs("p3", {}, [])
    r = _reconciler()

    # 1. the rebalance: a (oldest) starts loading on p2, p1 keeps serving it
    todo, st, events = _pass(r, objs, pods, {k("p1"): p1, k("p2"): pool_obs("p2", {}, []),
                                             k("p3"): p3})
    assert todo.placements[k("a")] == [k("p1"), k("p2")]
    assert [e.tenant for e in todo.desired[k("p2")]] == ["a"]
    assert st["a"]["move"]["phase"] == MOVE_LOADING and st["a"]["readyPods"] == "1/1"
    assert ("Normal", "Moving") in [e[:2] for e in events]
    assert "p1 serves 300.0 tokens/s, p2 0.0" in st["a"]["move"]["reason"]
    assert todo.transient  # the next pass comes soon
    assert [h.pod for h in todo.tables.full[k("a")].holders] == ["p1"]
    assert not todo.peer_prints  # no draining move: no fingerprint computed

    # 2. (after an operator restart) p2 holds it Ready: the tables name p2 only, p1 still
    # holds it
    r = _reconciler()
    p2 = pool_obs("p2", {("a", "v1"): "Ready"}, [served_view("a", residency="device")])
    observations = {k("p1"): p1, k("p2"): p2, k("p3"): p3}
    todo, st, events = _pass(r, objs, pods, observations)
    assert st["a"]["move"]["phase"] == MOVE_DRAINING
    assert todo.placements[k("a")] == [k("p1"), k("p2")]
    assert [h.pod for h in todo.tables.full[k("a")].holders] == ["p2"]
    assert st["a"]["residency"] == "p1:disk,p2:device"  # two holders while it drains
    assert [e[1] for e in events] == ["MoveRouted"]
    assert set(todo.peer_prints) == {k("p1"), k("p2"), k("p3")}

    # 3. p3 has not confirmed the new table (it reports an older one): p1 stays placed.
    # p1's own table does not count: its copy never listed itself.
    p1.peers_fingerprint = "0123456789abcdef"
    p2.peers_fingerprint = todo.peer_prints[k("p2")][0]
    p3.peers_fingerprint = "fedcba9876543210"
    todo, st, _ = _pass(r, objs, pods, observations)
    assert st["a"]["move"]["phase"] == MOVE_DRAINING and k("p1") in todo.placements[k("a")]
    # 4. every table confirmed, but a request in flight on p1: it waits
    p3.peers_fingerprint = todo.peer_prints[k("p3")][0]
    observations[k("p1")] = pool_obs("p1", held, [served_view("a", in_flight=2),
                                                  served_view("b"), served_view("c")])
    todo, st, _ = _pass(r, objs, pods, observations)
    assert st["a"]["move"]["phase"] == MOVE_DRAINING and k("p1") in todo.placements[k("a")]
    # 5. drained: p1 leaves the placements, its desired set drops a, the move is over
    observations[k("p1")] = p1
    todo, st, events = _pass(r, objs, pods, observations)
    assert todo.placements[k("a")] == [k("p2")] and "move" not in st["a"]
    assert [e.tenant for e in todo.desired[k("p1")]] == ["b", "c"]
    assert st["a"]["lastMove"]["outcome"] == MOVED and [e[:2] for e in events] == [
        ("Normal", "Moved")]
    assert "every pool pod routes to the target" in st["a"]["lastMove"]["reason"]
    # p1 still reports a while its sidecar evicts it: not a holder any more
    assert [h.pod for h in todo.tables.full[k("a")].holders] == ["p2"]
    # 6. p1 = 200, p2 = 100, p3 = 0 tokens/s: b moves to p3 next (one at a time), then the
    # pool is settled (100 each) and nothing moves again
    observations[k("p1")] = pool_obs("p1", {("b", "v1"): "Ready", ("c", "v1"): "Ready"},
                                     [served_view("b"), served_view("c")])
    todo, st, events = _pass(r, objs, pods, observations)
    assert st["b"]["move"]["to"] == "p3" and "move" not in st["a"] and "move" not in st["c"]
    assert st["a"]["lastMove"]["outcome"] == MOVED  # the cool-down's memory stays
    settled = [cr(t, t, replicas=1, created=f"2026-01-01T00:00:0{i}Z", status={
        "placements": [{"pod": f"p{i + 1}", "version": "v1", "state": "Ready"}]})
        for i, t in enumerate("abc")]
    spread = {k(f"p{i + 1}"): pool_obs(f"p{i + 1}", {(t, "v1"): "Ready"}, [served_view(t)])
              for i, t in enumerate("abc")}
    todo, st, events = _pass(r, settled, pods, spread)
    assert not todo.moves.moves and not [e for e in events if "Move" in e[1]]


def test_a_restarted_operator_resumes_a_drain_and_waits_one_table_more():
    pods = [pod("p1", ports={"sync": 9101, "http": 9001}),
            pod("p2", ports={"sync": 9201, "http": 9002})]
    move = Move("p1", "p2", MOVE_DRAINING, started=T0, since=9e9, reason="rebalance: x")
    objs = [cr("a", "a", replicas=1, status={
        "placements": [{"pod": "p1", "version": "v1", "state": "Ready"},
                       {"pod": "p2", "version": "v1", "state": "Ready"}],
        "move": move.view()})]
    p1 = pool_obs("p1", {("a", "v1"): "Ready"}, [served_view("a")])
    p2 = pool_obs("p2", {("a", "v1"): "Ready"}, [served_view("a")])
    p2.peers_fingerprint = "fedcba9876543210"  # a table from before the restart
    r = _reconciler()
    todo, st, _ = _pass(r, objs, pods, {k("p1"): p1, k("p2"): p2})
    assert st["a"]["move"]["phase"] == MOVE_DRAINING  # unknown table: not confirmed
    assert [h.pod for h in todo.tables.full[k("a")].holders] == ["p2"]
    p2.peers_fingerprint = todo.peer_prints[k("p2")][0]
    todo, st, _ = _pass(r, objs, pods, {k("p1"): p1, k("p2"): p2})
    assert "move" not in st["a"] and todo.placements[k("a")] == [k("p2")]


def test_a_target_that_fails_is_dropped_and_a_warning_says_why():
    pods = [pod("p1", ports={"sync": 9101, "http": 9001}),
            pod("p2", ports={"sync": 9201, "http": 9002})]
    objs = [cr("a", "a", replicas=1, status={
        "placements": [{"pod": "p1", "version": "v1", "state": "Ready"},
                       {"pod": "p2", "version": "v1", "state": "Downloading"}],
        "move": Move("p1", "p2", MOVE_LOADING, started=T0, since=9e9).view()})]
    p1 = pool_obs("p1", {("a", "v1"): "Ready"}, [served_view("a")])
    p2 = pool_obs("p2", {("a", "v1"): "Failed"}, [])
    todo, st, events = _pass(_reconciler(), objs, pods, {k("p1"): p1, k("p2"): p2})
    assert todo.placements[k("a")] == [k("p1")] and "move" not in st["a"]
    assert st["a"]["lastMove"]["outcome"] == MOVE_ABANDONED
    warning = [e for e in events if e[1] == "MoveAbandoned"]
    assert warning and warning[0][0] == "Warning" and "boom" in warning[0][2]
    # the cool-down: the same pass does not start it again
    assert not todo.moves.moves


# --------------------------------------------------------------------------- NotReady pods


def _unready_pod(name: str, since: str) -> dict[str, Any]:
    p = pod(name, ready=False)
    p["status"]["conditions"][0]["lastTransitionTime"] = since
    return p


def test_a_pod_not_ready_says_since_when_and_a_ready_or_silent_one_does_not():
    from loramux.operator.model import pod_unready_since

    assert pod_unready_since(_unready_pod("p1", "2027-01-15T08:00:00Z")) == T0
    assert pod_unready_since(pod("p1")) is None  # Ready
    assert pod_unready_since(pod("p1", ready=False)) is None  # no time: no grace counted
    assert pod_unready_since(pod("p1", ready=False, deleting=True)) is None  # terminating


def test_placements_on_a_pod_not_ready_beyond_the_grace_move_through_the_protocol():
    from loramux.operator.placement import choose_unready_moves

    specs = [parse_adapter(cr(t, t, replicas=1, created=f"2026-01-01T00:00:0{i}Z"))
             for i, t in enumerate("abc")]
    every = [parse_adapter(cr("e", "e", created="2026-01-01T00:00:09Z"))]
    placements = {k("a"): [k("p1")], k("b"): [k("p1")], k("c"): [k("p2")],
                  k("e"): [k("p1"), k("p2"), k("p3")]}
    candidates = {s.key: [k("p2"), k("p3")] for s in [*specs, *every]}
    unready = {k("p1"): T0}

    def run(now: float, **kw: Any) -> dict:
        return choose_unready_moves([*specs, *every], placements, candidates, unready,
                                    now=now, grace_s=120, **kw)

    assert run(T0 + 119) == {}  # within the grace: a restarting server keeps its tenants
    got = run(T0 + 120)
    assert set(got) == {k("a"), k("b")}  # every adapter at once (failover), not e (every pod)
    # spread by the placement policy: a to p3 (p2 holds c), then b to p2
    assert (got[k("a")].source, got[k("a")].target) == ("p1", "p3")
    assert got[k("b")].target == "p2"
    assert got[k("a")].phase == MOVE_LOADING
    assert "p1 has been NotReady for 120 s (grace 120 s)" in got[k("a")].reason
    # an adapter already moving, or with no Ready pod free, waits
    assert set(run(T0 + 120, moving={k("a")})) == {k("b")}
    assert choose_unready_moves(specs, placements, {s.key: [] for s in specs}, unready,
                                now=T0 + 999, grace_s=120) == {}


def test_the_operator_moves_tenants_off_a_pod_that_stays_not_ready():
    pods = [_unready_pod("p1", "2026-01-01T00:00:00Z"),
            pod("p2", ports={"sync": 9102, "http": 9002})]
    objs = [cr("a", "a", replicas=1, status={
        "placements": [{"pod": "p1", "version": "v1", "state": "Ready"}]})]
    p1 = pool_obs("p1", {("a", "v1"): "Ready"}, [served_view("a")])
    observations = {k("p1"): p1, k("p2"): pool_obs("p2", {}, [])}
    r = _reconciler()
    todo, st, events = _pass(r, objs, pods, observations)
    assert todo.placements[k("a")] == [k("p1"), k("p2")]
    assert st["a"]["move"]["from"] == "p1" and "NotReady" in st["a"]["move"]["reason"]
    assert ("Normal", "Moving") in [e[:2] for e in events]
    # a failed target: abandoned, and not retried within the grace
    observations[k("p2")] = pool_obs("p2", {("a", "v1"): "Failed"}, [])
    todo, st, events = _pass(r, objs, pods, observations)
    assert "move" not in st["a"] and st["a"]["lastMove"]["outcome"] == MOVE_ABANDONED
    todo, st, events = _pass(r, objs, pods, observations)
    assert "move" not in st["a"] and todo.placements[k("a")] == [k("p1")]
