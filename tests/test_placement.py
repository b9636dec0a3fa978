"""Placement policies: ``leastLoaded`` balances measured tokens/s within device slots.

Pure functions over LoraAdapter and Pod dicts (the helpers of test_operator_unit.py)."""

from __future__ import annotations

from test_operator_unit import cr, k, pod

from loramux.operator.model import parse_adapter
from loramux.operator.placement import PodLoad, least_loaded, place


def _specs(*tenants: str, created: str = "2026-01-01T00:00:0{}Z") -> list:
    return [parse_adapter(cr(t, t, created=created.format(i), replicas=1))
            for i, t in enumerate(tenants)]


def test_least_loaded_puts_a_new_tenant_beside_the_cold_ones_not_the_hot_one():
    pods = [pod("p1"), pod("p2")]
    new = parse_adapter(cr("new", "new", created="2026-02-01T00:00:00Z", replicas=1))
    hot = parse_adapter(cr("hot", "hot", replicas=1, status={"placements": [{"pod": "p1"}]}))
    c1 = parse_adapter(cr("cold1", "cold1", replicas=1, status={"placements": [{"pod": "p2"}]}))
    c2 = parse_adapter(cr("cold2", "cold2", replicas=1, status={"placements": [{"pod": "p2"}]}))
    rates = {("default", "hot"): 900.0, ("default", "cold1"): 5.0, ("default", "cold2"): 5.0}
    by_count = place([hot, c1, c2, new], pods)
    by_load = place([hot, c1, c2, new], pods, policy="leastLoaded", rates=rates)
    assert by_count[new.key] == [k("p1")]  # fewest adapters: next to the hot tenant
    assert by_load[new.key] == [k("p2")]  # least tokens/s: with the two cold ones
    # existing placements never move, whatever the policy
    assert by_load[hot.key] == [k("p1")] and by_load[c1.key] == by_load[c2.key] == [k("p2")]


def test_least_loaded_fills_free_device_slots_before_load():
    pods = [pod("p1"), pod("p2")]
    a = parse_adapter(cr("a", "a", replicas=1, status={"placements": [{"pod": "p1"}]}))
    b = parse_adapter(cr("b", "b", replicas=1, status={"placements": [{"pod": "p2"}]}))
    c = parse_adapter(cr("c", "c", replicas=1, status={"placements": [{"pod": "p2"}]}))
    new = parse_adapter(cr("new", "new", created="2026-02-01T00:00:00Z", replicas=1))
    rates = {("default", "a"): 100.0}  # p1 is busier, but p2's two slots are full
    got = place([a, b, c, new], pods, policy="leastLoaded", rates=rates, device_slots=2)
    assert got[new.key] == [k("p1")]
    got = place([a, b, c, new], pods, policy="leastLoaded", rates=rates, device_slots=None)
    assert got[new.key] == [k("p2")]


def test_least_loaded_spreads_a_batch_of_new_tenants_by_their_measured_cost():
    pods = [pod("p1"), pod("p2"), pod("p3")]
    specs = _specs("t0", "t1", "t2", "t3", "t4", "t5")
    rates = {("default", f"t{i}"): r for i, r in enumerate([600, 300, 300, 100, 100, 100])}
    got = place(specs, pods, policy="leastLoaded", rates=rates)
    per_pod: dict = {}
    for spec in specs:
        (where,) = got[spec.key]
        per_pod[where] = per_pod.get(where, 0) + rates[("default", spec.tenant)]
    # Oldest first, each to the least loaded pod: 600 | 300+100+100 | 300+100.
    assert sorted(per_pod.values()) == [400, 500, 600]
    # With no measurements it is leastAdapters: two per pod.
    unmeasured = place(specs, pods, policy="leastLoaded")
    counts: dict = {}
    for spec in specs:
        counts[unmeasured[spec.key][0]] = counts.get(unmeasured[spec.key][0], 0) + 1
    assert sorted(counts.values()) == [2, 2, 2]


def test_least_loaded_order_is_stable_and_ignores_negative_rates():
    load = {k("p1"): PodLoad(adapters=1, tokens_per_s=10.0), k("p2"): PodLoad(adapters=3)}
    assert least_loaded([k("p1"), k("p2"), k("p3")], load) == [k("p3"), k("p2"), k("p1")]
    a = _specs("a")[0]
    got = place([a], [pod("p1"), pod("p2")], policy="leastLoaded",
                rates={("default", "a"): -5.0})
    assert got[a.key] == [k("p1")]


def test_measured_rates_for_least_loaded_come_from_the_token_history():
    from loramux.operator.hot_tenants import HotTenants

    hot = HotTenants(None, None)  # type: ignore[arg-type]  # no I/O: history only
    for at, legal, retail in [(0, 0, 0), (60, 6000, 60), (120, 18000, 120), (180, 18000, 180)]:
        hot.record({("default", "legal"): legal, ("default", "retail"): retail}, at)
    rates = hot.rates(180.0, window_s=120.0)
    # legal: 200 tokens/s then 0 over the last 120 s; retail: 1 token/s throughout.
    assert rates[("default", "legal")] == 100.0
    assert rates[("default", "retail")] == 1.0
    assert hot.rates(180.0, window_s=30.0)[("default", "legal")] == 0.0
    # a counter reset (a pod restarted) is a restart from zero, never a negative rate
    hot.record({("default", "legal"): 50}, 240)
    assert hot.rates(240.0, window_s=60.0)[("default", "legal")] == 50 / 60
