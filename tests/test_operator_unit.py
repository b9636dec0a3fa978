"""Operator logic as pure functions (no server), the CRD schema, and the operator's imports."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from loramux.contracts import DesiredAdapter, EntryCredentials, SyncState
from loramux.operator.credentials import credentials_from_secret
from loramux.operator.model import (
    MAX_DEDICATED_REPLICAS,
    MIN_DWELL_SECONDS,
    canonical_selector,
    container_port,
    parse_adapter,
    pod_is_live,
    pod_is_ready,
    selector_matches,
)
from loramux.operator.placement import place
from loramux.operator.rollout import PodObservation, build_desired_sets, desired_entries
from loramux.operator.status import (
    BASE_MODEL_MISMATCH,
    DUPLICATE_TENANT,
    INVALID_SPEC,
    compute_status,
    status_events,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "loraadapter.yaml"
SHA = "a" * 64
POOL = {"matchLabels": {"app": "infer"}}
NS = "default"


def cr(name: str, tenant: str = "legal", version: str = "v1", *,
       created: str = "2026-01-01T00:00:00Z", replicas: int | None = None,
       pool: dict | None = None, status: dict | None = None,
       deleting: bool = False, **spec_extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"tenant": tenant, "version": version, "baseModel": "smollm2",
                            "source": {"uri": f"s3://adapters/{tenant}/{version}/", "sha256": SHA},
                            "pool": pool if pool is not None else POOL}
    if replicas is not None:
        spec["replicas"] = replicas
    spec.update(spec_extra)
    meta: dict[str, Any] = {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1,
                            "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    obj = {"apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter", "metadata": meta,
           "spec": spec}
    if status is not None:
        obj["status"] = status
    return obj


def pod(name: str, *, ready: bool = True, labels: dict | None = None, ip: str | None = "127.0.0.1",
        deleting: bool = False, ports: dict[str, int] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS,
                            "labels": labels if labels is not None else {"app": "infer"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    status: dict[str, Any] = {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    container = {"name": "server", "ports": [{"name": n, "containerPort": p}
                                             for n, p in (ports or {}).items()]}
    return {"metadata": meta, "spec": {"containers": [container]}, "status": status}


def k(name: str) -> tuple[str, str]:
    return (NS, name)


def obs(name: str, states: dict[tuple[str, str], str] | None = None, *, base: str = "smollm2",
        served: list[dict] | None = None) -> PodObservation:
    """A pod as its sidecar's GET /v1/state describes it (``served``: the server's own
    adapters, as in GET /admin/adapters)."""
    return PodObservation.from_state(k(name), SyncState.model_validate({
        "server_reachable": True,
        "adapters": [
            {"tenant": t, "version": v, "phase": ph, "reason": "boom" if ph == "Failed" else None,
             "digest": SHA if ph == "Ready" else None}
            for (t, v), ph in (states or {}).items()],
        "server": {"base_model": base, "base_model_aliases": [base, "alias-" + base],
                   "adapters": served or []},
    }))


def wired(entries: list[DesiredAdapter]) -> list[dict[str, Any]]:
    """Desired entries as the sidecar receives them (PUT /v1/desired)."""
    return [e.wire() for e in entries]


def source_status(version: str, uri: str, sha256: str | None = None) -> dict[str, Any]:
    """A status whose active version (and its recorded source) is ``version``."""
    return {"activeVersion": version, "activeSource": {
        "version": version, "uri": uri, **({"sha256": sha256} if sha256 else {})}}


# --------------------------------------------------------------------------- selection


def test_selector_semantics():
    labels = {"app": "infer", "tier": "gpu"}
    assert selector_matches({"matchLabels": {"app": "infer"}}, labels)
    assert not selector_matches({"matchLabels": {"app": "other"}}, labels)
    expr = lambda op, vals=None: {"matchExpressions": [  # noqa: E731
        {"key": "tier", "operator": op, **({"values": vals} if vals else {})}]}
    assert selector_matches(expr("In", ["gpu", "cpu"]), labels)
    assert not selector_matches(expr("In", ["cpu"]), labels)
    assert selector_matches(expr("NotIn", ["cpu"]), labels)
    assert not selector_matches(expr("NotIn", ["gpu"]), labels)
    assert selector_matches(expr("NotIn", ["gpu"]), {"app": "infer"})  # absent key: NotIn holds
    assert selector_matches(expr("Exists"), labels)
    assert not selector_matches(expr("DoesNotExist"), labels)
    assert selector_matches(expr("DoesNotExist"), {"app": "x"})
    # invalid selectors match nothing (an empty one would select every pod)
    assert not selector_matches({}, labels)
    assert not selector_matches(expr("In"), labels)
    assert not selector_matches({"matchExpressions": [{"key": "a", "operator": "Bogus"}]}, labels)
    assert canonical_selector({"matchLabels": {"b": "1", "a": "2"}}) == canonical_selector(
        {"matchLabels": {"a": "2", "b": "1"}})


def test_pod_liveness_readiness_and_ports():
    assert pod_is_ready(pod("a"))
    assert pod_is_live(pod("a", ready=False)) and not pod_is_ready(pod("a", ready=False))
    assert not pod_is_live(pod("a", deleting=True))
    assert not pod_is_live(pod("a", ip=None))
    p = pod("a", ports={"sync": 9101, "http": 9100})
    assert container_port(p, "sync", 8001) == 9101 and container_port(p, "http", 8000) == 9100
    assert container_port(pod("b"), "sync", 8001) == 8001


@pytest.mark.parametrize(("patch", "fragment"), [
    ({"tenant": "Legal"}, "spec.tenant"),
    ({"version": "v_1"}, "spec.version"),
    ({"source": {"uri": "http://x/y"}}, "spec.source.uri"),
    ({"source": {"uri": "s3://adapters/x/", "sha256": "XYZ"}}, "sha256"),
    ({"source": {"uri": "s3://adapters/x/", "credentialsSecret": "Bad_Name"}}, "credentialsSecret"),
    ({"replicas": 0}, "replicas"),
    ({"pool": {}}, "spec.pool"),
    ({"baseModel": ""}, "baseModel"),
    ({"dedicated": {"mode": "Always", "replicas": 9}}, "--max-dedicated-replicas"),
    ({"dedicated": {"mode": "Auto", "minDwellSeconds": 0}}, "minDwellSeconds"),
    ({"pool": {"matchLabels": {f"k{i}": "v" for i in range(33)}}}, "more than 32 labels"),
    ({"pool": {"matchLabels": {"app": "x" * 64}}}, "spec.pool.matchLabels"),
    ({"pool": {"matchExpressions": [{"key": "a", "operator": "In", "values": ["v"] * 65}]}},
     "values"),
    ({"pool": {"matchExpressions": [{"key": "a", "operator": "Exists"}] * 17}},
     "more than 16 terms"),
])
def test_invalid_specs_are_reported(patch, fragment):
    obj = cr("a")
    obj["spec"].update(patch)
    spec = parse_adapter(obj)
    assert spec.error and fragment in spec.error
    v = validate([spec], [pod("p1")], {})
    assert v.rejected[spec.key].reason == INVALID_SPEC


# --------------------------------------------------------------------------- placement


def test_all_pods_when_replicas_absent_ready_only_and_kept_when_placed():
    pods = [pod("p1"), pod("p2"), pod("p3", ready=False), pod("p4", deleting=True),
            pod("other", labels={"app": "else"})]
    spec = parse_adapter(cr("a"))
    assert place([spec], pods)[spec.key] == [k("p1"), k("p2")]
    # an existing placement on a live-but-unready pod stays (no churn on a flapping probe)
    spec = parse_adapter(cr("a", status={"placements": [
        {"pod": "p3", "version": "v1", "state": "Ready"},
        {"pod": "p4", "version": "v1", "state": "Ready"}]}))
    assert place([spec], pods)[spec.key] == [k("p1"), k("p2"), k("p3")]


def test_replicas_least_adapters_ties_by_name_and_stability():
    pods = [pod("p1"), pod("p2"), pod("p3")]
    a = parse_adapter(cr("a", "ta", created="2026-01-01T00:00:00Z", replicas=1))
    b = parse_adapter(cr("b", "tb", created="2026-01-02T00:00:00Z", replicas=1))
    c = parse_adapter(cr("c", "tc", created="2026-01-03T00:00:00Z", replicas=2))
    got = place([c, b, a], pods)
    assert got[a.key] == [k("p1")]  # ties by name
    assert got[b.key] == [k("p2")]  # p1 already holds one
    assert got[c.key] == [k("p1"), k("p3")]  # p3 (empty), then p1 (ties with p2, by name)
    # stability: a placed adapter stays where it is even if a less loaded pod appears
    a2 = parse_adapter(cr("a", "ta", replicas=1, status={"placements": [{"pod": "p3"}]}))
    assert place([a2], [*pods, pod("p0")])[a2.key] == [k("p3")]


def test_replicas_replaced_when_placed_pod_disappears():
    a = parse_adapter(cr("a", replicas=1, status={"placements": [{"pod": "p1"}]}))
    assert place([a], [pod("p1"), pod("p2")])[a.key] == [k("p1")]
    assert place([a], [pod("p2")])[a.key] == [k("p2")]
    assert place([a], [pod("p1", deleting=True), pod("p2")])[a.key] == [k("p2")]
    # scale down keeps the Ready ones first, then by name
    b = parse_adapter(cr("b", replicas=1, status={"placements": [{"pod": "p1"}, {"pod": "p2"}]}))
    assert place([b], [pod("p1", ready=False), pod("p2")])[b.key] == [k("p2")]


def test_excluded_pods_and_custom_policy():
    a = parse_adapter(cr("a"))
    assert place([a], [pod("p1"), pod("p2")], excluded={a.key: {k("p1")}})[a.key] == [k("p2")]
    b = parse_adapter(cr("b", replicas=1))
    reverse = lambda cands, load: sorted(cands, reverse=True)  # noqa: E731
    assert place([b], [pod("p1"), pod("p2")], policy=reverse)[b.key] == [k("p2")]


# --------------------------------------------------------------------------- desired sets


def test_desired_entry_contract_and_credentials():
    spec = parse_adapter(cr("a", pinned=True))
    creds = {"access_key_id": "AK", "secret_access_key": "SK"}
    (e,) = wired(desired_entries(spec, None, credentials=EntryCredentials(**creds)))
    assert e == {"tenant": "legal", "version": "v1", "uri": "s3://adapters/legal/v1/",
                 "sha256": SHA, "pinned": True, "active": True, "credentials": creds}
    (e,) = wired(desired_entries(parse_adapter(cr("b")), None))
    assert "credentials" not in e and e["pinned"] is False


def test_rollout_steps_per_pod():
    old_entry = {"tenant": "legal", "version": "v1", "uri": "s3://adapters/legal/v1/",
                 "sha256": "b" * 64, "pinned": False, "active": True}
    # the old version's source is the operator's memory: status.activeSource
    spec = parse_adapter(cr("a", version="v2", status=source_status(
        "v1", old_entry["uri"], old_entry["sha256"])))
    # 1. old Ready, new loading: both, old active
    o = obs("p1", {("legal", "v1"): "Ready", ("legal", "v2"): "Downloading"})
    got = wired(desired_entries(spec, o))
    assert [(e["version"], e["active"]) for e in got] == [("v1", True), ("v2", False)]
    assert got[0]["uri"] == old_entry["uri"] and got[0]["sha256"] == "b" * 64
    assert got[1]["sha256"] == SHA
    # first step of a rollout: the sidecar still holds only v1
    o = obs("p1", {("legal", "v1"): "Ready"})
    assert [(e["version"], e["active"]) for e in wired(desired_entries(spec, o))] == [
        ("v1", True), ("v2", False)]
    # 3. new failed: old stays active
    o = obs("p1", {("legal", "v1"): "Ready", ("legal", "v2"): "Failed"})
    assert [(e["version"], e["active"]) for e in wired(desired_entries(spec, o))] == [
        ("v1", True), ("v2", False)]
    # 2. new Ready: new only, active (the sidecar activates, then evicts v1)
    o = obs("p1", {("legal", "v1"): "Ready", ("legal", "v2"): "Ready"})
    assert [(e["version"], e["active"]) for e in wired(desired_entries(spec, o))] == [
        ("v2", True)]
    # 4. fresh pod
    assert [(e["version"], e["active"]) for e in wired(desired_entries(spec, obs("p2")))] == [
        ("v2", True)]


def test_rollout_of_a_routed_hot_tenant_waits_for_the_new_dedicated_deployment():
    old_entry = {"tenant": "legal", "version": "v1", "uri": "s3://adapters/legal/v1/",
                 "pinned": False, "active": True}
    spec = parse_adapter(cr("a", version="v2", status=source_status("v1", old_entry["uri"])))
    ns = spec.namespace
    o = obs("p1", {("legal", "v1"): "Ready", ("legal", "v2"): "Ready"})
    only_old = {(ns, "legal", "v1"): "http://10.0.0.1:8000"}
    got = wired(desired_entries(spec, o, routes=only_old))
    # v2 is Ready in the pool, but v1 keeps serving (routed) until v2's dedicated is Ready
    assert [(e["version"], e["active"], e.get("route")) for e in got] == [
        ("v1", True, "http://10.0.0.1:8000"), ("v2", False, None)]
    both = {**only_old, (ns, "legal", "v2"): "http://10.0.0.2:8000"}
    got = wired(desired_entries(spec, o, routes=both))
    assert [(e["version"], e["active"], e.get("route")) for e in got] == [
        ("v2", True, "http://10.0.0.2:8000")]


def test_build_desired_sets_aggregates_and_sends_empty_sets():
    a = parse_adapter(cr("a", "legal"))
    b = parse_adapter(cr("b", "medical", replicas=1))
    placements = {a.key: [k("p1"), k("p2")], b.key: [k("p2")]}
    built = build_desired_sets(
        [a, b], placements, [k("p1"), k("p2"), k("p3")], {},
        credentials={b.key: EntryCredentials(access_key_id="x", secret_access_key="y")})
    sets = {pod: wired(entries) for pod, entries in built.items()}
    assert [e["tenant"] for e in sets[k("p1")]] == ["legal"]
    assert [e["tenant"] for e in sets[k("p2")]] == ["legal", "medical"]
    assert "credentials" in sets[k("p2")][1] and "credentials" not in sets[k("p2")][0]
    assert sets[k("p3")] == []


# --------------------------------------------------------------------------- validation


def test_duplicate_tenant_rejects_the_newer():
    old = parse_adapter(cr("old", "legal", created="2026-01-01T00:00:00Z"))
    new = parse_adapter(cr("new", "legal", "v2", created="2026-01-02T00:00:00Z"))
    other_pool = parse_adapter(cr("elsewhere", "legal", created="2026-01-03T00:00:00Z",
                                  pool={"matchLabels": {"app": "other"}}))
    pods = [pod("p1"), pod("q1", labels={"app": "other"})]
    v = validate([new, old, other_pool], pods, {})
    assert set(v.rejected) == {new.key}
    assert v.rejected[new.key].reason == DUPLICATE_TENANT and "'old'" in v.rejected[new.key].message
    # same timestamp: the name decides
    x = parse_adapter(cr("x", "t"))
    y = parse_adapter(cr("y", "t"))
    assert set(validate([y, x], pods, {}).rejected) == {y.key}
    # overlapping pods with different selectors also clash
    z = parse_adapter(cr("z", "legal", created="2026-01-05T00:00:00Z",
                         pool={"matchExpressions": [{"key": "app", "operator": "Exists"}]}))
    assert z.key in validate([old, z], pods, {}).rejected


def test_base_model_checked_against_pool():
    spec = parse_adapter(cr("a"))
    pods = [pod("p1"), pod("p2")]
    ok = validate([spec], pods, {k("p1"): obs("p1"), k("p2"): obs("p2")})
    assert not ok.rejected and not ok.excluded
    alias = parse_adapter(cr("b", baseModel="alias-smollm2"))
    assert not validate([alias], pods, {k("p1"): obs("p1")}).rejected
    bad = validate([spec], pods, {k("p1"): obs("p1", base="llama"),
                                  k("p2"): obs("p2", base="llama")})
    assert bad.rejected[spec.key].reason == BASE_MODEL_MISMATCH
    assert "llama" in bad.rejected[spec.key].message
    mixed = validate([spec], pods, {k("p1"): obs("p1", base="llama"), k("p2"): obs("p2")})
    assert not mixed.rejected and mixed.excluded[spec.key] == {k("p1")}
    unknown = validate([spec], pods, {})  # no server answered yet: not a mismatch
    assert not unknown.rejected


# --------------------------------------------------------------------------- status


def _status(spec, pods, observations, **kw):
    sets = build_desired_sets([spec], {spec.key: pods}, pods, observations)
    return compute_status(spec, rejection=None, pods=pods, desired=sets,
                          observations=observations, now="2026-01-01T00:00:00Z", **kw)


def conds(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_ready_only_when_sidecars_report_ready():
    spec = parse_adapter(cr("a"))
    pods = [k("p1"), k("p2")]
    both = {k("p1"): obs("p1", {("legal", "v1"): "Ready"}),
            k("p2"): obs("p2", {("legal", "v1"): "Ready"})}
    st = _status(spec, pods, both)
    assert st["phase"] == "Ready" and st["readyPods"] == "2/2" and st["activeVersion"] == "v1"
    assert conds(st) == {"Validated": ("True", "Valid"), "Synced": ("True", "Synced"),
                         "Ready": ("True", "AllPodsReady")}
    assert st["placements"][0] == {"pod": "p1", "version": "v1", "active": True,
                                   "state": "Ready", "digest": SHA}
    one = {k("p1"): obs("p1", {("legal", "v1"): "Ready"}),
           k("p2"): obs("p2", {("legal", "v1"): "Downloading"})}
    st = _status(spec, pods, one)
    assert st["phase"] == "Progressing" and st["readyPods"] == "1/2"
    # a sidecar that does not answer is never Ready
    silent = {k("p1"): obs("p1", {("legal", "v1"): "Ready"}),
              k("p2"): PodObservation(key=k("p2"), sidecar_error="refused")}
    st = _status(spec, pods, silent)
    assert st["phase"] == "Progressing" and conds(st)["Synced"] == ("False", "SyncFailed")
    assert st["placements"][1]["state"] == "Unknown"
    # Ready but the server is gone: not Ready
    gone = obs("p1", {("legal", "v1"): "Ready"})
    gone.server_reachable = False
    st = _status(spec, [k("p1")], {k("p1"): gone})
    assert st["placements"][0]["state"] == "Unknown" and st["phase"] != "Ready"
    # PUT failed
    st = _status(spec, [k("p1")], {k("p1"): obs("p1", {("legal", "v1"): "Ready"})},
                 put_errors={k("p1"): "HTTP 401"})
    assert st["phase"] != "Ready" and conds(st)["Synced"][0] == "False"


def test_status_rollout_progress_and_degraded():
    old_entry = {"tenant": "legal", "version": "v1", "uri": "s3://adapters/legal/v1/"}
    spec = parse_adapter(cr("a", version="v2", status=source_status("v1", old_entry["uri"])))
    pods = [k("p1"), k("p2")]
    mid = {k("p1"): obs("p1", {("legal", "v1"): "Ready", ("legal", "v2"): "Ready"}),
           k("p2"): obs("p2", {("legal", "v1"): "Ready", ("legal", "v2"): "Loading"})}
    st = _status(spec, pods, mid)
    assert st["phase"] == "Progressing" and st["readyPods"] == "1/2"
    rows = {(r["pod"], r["version"]): r for r in st["placements"]}
    assert rows[("p2", "v1")]["active"] and not rows[("p2", "v2")]["active"]
    assert rows[("p1", "v2")]["active"] and ("p1", "v1") not in rows
    failed = {k("p1"): obs("p1", {("legal", "v1"): "Ready", ("legal", "v2"): "Failed"}),
              k("p2"): obs("p2", {("legal", "v1"): "Ready", ("legal", "v2"): "Failed"})}
    st = _status(spec, pods, failed)
    assert st["phase"] == "Degraded" and st["activeVersion"] == "v1"
    assert conds(st)["Ready"] == ("False", "VersionFailed")
    ready_msg = next(c["message"] for c in st["conditions"] if c["type"] == "Ready")
    assert "boom" in ready_msg and "v1 keeps serving" in ready_msg
    events = status_events({"phase": "Progressing"}, st)
    assert ("Warning", "Degraded") in [(t, r) for t, r, _ in events]


def test_active_version_kept_while_sidecars_resettle_an_activation():
    """Found end to end: right after the PUT that makes v2 active, a sidecar may report v2
    Pending for a moment (it restarts an entry whose only change is active=true) while its
    server still answers the bare tenant with v1. activeVersion must not blank out then
    (it would also lose the Activated event); the servers' own answer (SyncState.server)
    says what clients get."""
    spec = parse_adapter(cr("a", version="v2", status={"activeVersion": "v1"}))
    pods = [k("p1"), k("p2")]
    served = [{"tenant": "legal", "version": "v1", "state": "ready", "active": True},
              {"tenant": "legal", "version": "v2", "state": "ready", "active": False}]
    observations = {k(name): obs(name, {("legal", "v2"): "Pending"}, served=served)
                    for name in ("p1", "p2")}
    assert observations[k("p1")].serving == {"legal": "v1"}
    st = _status(spec, pods, observations)
    assert st["phase"] == "Progressing" and st["activeVersion"] == "v1"
    # nothing served and nothing Ready: no active version (not a stale one)
    empty = {k(n): obs(n, {("legal", "v2"): "Pending"}) for n in ("p1", "p2")}
    assert "activeVersion" not in _status(spec, pods, empty)


def test_status_rejected_and_no_pods_and_transition_times():
    spec = parse_adapter(cr("a"))
    v = validate([spec], [pod("p1")], {k("p1"): obs("p1", base="llama")})
    st = compute_status(spec, rejection=v.rejected[spec.key], pods=[], desired={},
                        observations={}, now="T1")
    assert st["phase"] == "Failed" and conds(st)["Validated"] == ("False", BASE_MODEL_MISMATCH)
    events = status_events(None, st)
    assert events[0][:2] == ("Warning", BASE_MODEL_MISMATCH)
    st = _status(spec, [], {})
    assert st["phase"] == "Pending" and conds(st)["Synced"] == ("False", "NoPods")
    again = _status(spec, [], {}, previous={"conditions": [
        {"type": "Synced", "status": "False", "lastTransitionTime": "T0"}]})
    synced = next(c for c in again["conditions"] if c["type"] == "Synced")
    assert synced["lastTransitionTime"] == "T0"


# --------------------------------------------------------------------------- credentials


def test_credentials_from_secret_never_leak_into_problems():
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    secret = {"data": {"AWS_ACCESS_KEY_ID": b64("AKIA\n"), "AWS_SECRET_ACCESS_KEY": b64("s3cr3t"),
                       "AWS_REGION": b64("eu-west-1")},
              "stringData": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}}
    creds, problem = credentials_from_secret(secret, "s3")
    assert problem is None
    assert creds == {"access_key_id": "AKIA", "secret_access_key": "s3cr3t",
                     "region": "eu-west-1", "endpoint_url": "http://127.0.0.1:9000"}
    creds, problem = credentials_from_secret({"data": {"AWS_ACCESS_KEY_ID": b64("AKIA")}}, "s3")
    assert creds is None and "AWS_SECRET_ACCESS_KEY" in problem
    bad = {"stringData": {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
                          "AWS_REGION": "Not A Region s3cr3t"}}
    creds, problem = credentials_from_secret(bad, "s3")
    assert creds is None and "s3cr3t" not in problem


# --------------------------------------------------------------------------- the CRD


def crd_version() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "loramux.io" and crd["spec"]["scope"] == "Namespaced"
    names = crd["spec"]["names"]
    assert names["kind"] == "LoraAdapter" and names["plural"] == "loraadapters"
    assert names["shortNames"] == ["lora"]
    assert crd["metadata"]["name"] == "loraadapters.loramux.io"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    return version


def test_crd_schema_patterns_enums_status_and_columns():
    import re

    from loramux.names import _DNS1123_LABEL

    version = crd_version()
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Tenant", "Version", "Phase", "Ready", "Canary", "Weight",
                             "Rollout", "Age", "Residency", "InFlight"]
    # scale-out routing: only `kubectl get lora -o wide` shows where a tenant is
    assert [c.get("priority", 0) for c in columns.values()] == [0] * 8 + [1, 1]
    assert columns["Canary"]["jsonPath"] == ".status.canary.version"
    assert columns["Weight"]["jsonPath"] == ".status.canary.weight"
    assert columns["Rollout"]["jsonPath"] == ".status.canary.phase"
    assert columns["Residency"]["jsonPath"] == ".status.residency"
    assert columns["InFlight"]["jsonPath"] == ".status.inFlight"
    assert columns["Tenant"]["jsonPath"] == ".spec.tenant"
    assert columns["Ready"]["jsonPath"] == ".status.readyPods"
    assert columns["Age"]["type"] == "date"
    schema = version["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]["properties"]
    assert spec["tenant"]["pattern"] == _DNS1123_LABEL.pattern == spec["version"]["pattern"]
    assert spec["tenant"]["maxLength"] == 63
    uri = re.compile(spec["source"]["properties"]["uri"]["pattern"])
    assert uri.match("s3://adapters/prod/legal/v1/") and uri.match("file:///adapters/legal/v1")
    assert not uri.match("http://evil/") and not uri.match("s3:/x")
    assert spec["source"]["properties"]["sha256"]["pattern"] == "^[0-9a-f]{64}$"
    assert spec["replicas"]["minimum"] == 1
    ded = spec["dedicated"]["properties"]
    assert ded["mode"]["enum"] == ["Never", "Always", "Auto"] and ded["mode"]["default"] == "Never"
    assert ded["replicas"]["minimum"] == 1
    for key in ("promoteAboveTokensPerSecond", "demoteBelowTokensPerSecond"):
        assert ded[key]["minimum"] == 0
    assert ded["minDwellSeconds"]["minimum"] == MIN_DWELL_SECONDS
    assert ded["replicas"]["maximum"] == MAX_DEDICATED_REPLICAS
    pool = spec["pool"]["properties"]
    assert pool["matchLabels"]["maxProperties"] == 32
    assert pool["matchLabels"]["additionalProperties"]["maxLength"] == 63
    assert pool["matchExpressions"]["maxItems"] == 16
    term = pool["matchExpressions"]["items"]["properties"]
    assert term["key"]["maxLength"] == 317 and term["values"]["maxItems"] == 64
    assert schema["x-kubernetes-validations"] == [{
        "rule": "self.metadata.name.size() <= 63",
        "message": "the name is at most 63 characters (it is a label value of the dedicated "
                   "objects)"}]
    for key in ("promoteAfterSeconds", "demoteAfterSeconds"):  # windows: at least 1 s
        assert ded[key]["minimum"] == 1
    ops = spec["pool"]["properties"]["matchExpressions"]["items"]["properties"]["operator"]
    assert ops["enum"] == ["In", "NotIn", "Exists", "DoesNotExist"]
    status = schema["properties"]["status"]
    assert "x-kubernetes-preserve-unknown-fields" not in status
    assert status["properties"]["kopf"]["x-kubernetes-preserve-unknown-fields"] is True
    assert status["properties"]["phase"]["enum"] == [
        "Pending", "Progressing", "Ready", "Degraded", "Failed"]
    placement = status["properties"]["placements"]["items"]["properties"]
    assert {"pod", "version", "state", "digest", "reason"} <= set(placement)
    for key in ("observedGeneration", "conditions", "activeVersion", "dedicatedEndpoint"):
        assert key in status["properties"]


def _validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = crd_version()["schema"]["openAPIV3Schema"]

    def strip(node: Any) -> Any:  # OpenAPI extensions are not JSON Schema keywords
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return jsonschema.Draft7Validator(strip(schema))


def test_render_cr_output_validates_against_the_crd():
    from loramux.manifest import AdapterManifest
    from loramux.training.publish import render_cr

    fields = AdapterManifest.model_fields
    assert "tenant" in fields
    manifest = AdapterManifest.model_construct(tenant="legal", version="v1",
                                               base_model="SmolLM2-135M-Instruct")
    doc = yaml.safe_load(render_cr(manifest, "s3://adapters/prod/legal/v1/", SHA, namespace="team"))
    assert doc["apiVersion"] == "loramux.io/v1alpha1" and doc["kind"] == "LoraAdapter"
    validator = _validator()
    assert not list(validator.iter_errors(doc))
    spec = parse_adapter(doc)
    assert spec.error is None, spec.error


def test_crd_schema_rejects_what_the_operator_rejects():
    validator = _validator()
    assert not list(validator.iter_errors(cr("a", replicas=2, pinned=True,
                                             dedicated={"mode": "Auto", "replicas": 1})))
    for patch in ({"tenant": "Legal"}, {"replicas": 0}, {"dedicated": {"mode": "Sometimes"}},
                  {"source": {"uri": "ftp://x/"}},
                  {"source": {"uri": "s3://b/x", "sha256": "A" * 64}},
                  {"dedicated": {"replicas": 65}}, {"dedicated": {"minDwellSeconds": 4}},
                  {"pool": {"matchLabels": {f"k{i}": "v" for i in range(33)}}}):
        obj = cr("a")
        obj["spec"].update(patch)
        assert list(validator.iter_errors(obj)), patch


# --------------------------------------------------------------------------- process-level


def test_operator_help_and_no_torch_import():
    env_cmd = [sys.executable, "-P"]
    out = subprocess.run([*env_cmd, "-m", "loramux.cli", "operator", "--help"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "--sidecar-port" in out.stdout and "--resync-seconds" in out.stdout
    assert "operator" in subprocess.run([*env_cmd, "-m", "loramux.cli", "--help"],
                                        capture_output=True, text=True, timeout=60).stdout
    probe = ("import sys, loramux.operator.handlers, loramux.operator.main; "
             "bad = [m for m in ('torch', 'transformers', 'peft', 'fastapi') if m in sys.modules]; "
             "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([*env_cmd, "-c", probe], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_settings_env_names(monkeypatch):
    from loramux.operator.main import parse

    monkeypatch.setenv("LORAMUX_OPERATOR_SIDECAR_PORT", "9001")
    monkeypatch.setenv("LORAMUX_OPERATOR_NAMESPACE", "team")
    s = parse(["--resync-seconds", "5"])
    assert s.sidecar_port == 9001 and s.namespace == "team" and s.resync_seconds == 5
    assert s.server_port == 8000 and s.health_port == 8080 and s.peering is None
    # issue 15: the trust boundary and the tokens Secret, checked at start
    s = parse(["--pool-owner-labels", "app.kubernetes.io/instance=rel,a=b",
               "--pool-owner-deployment", "ns/rel-loramux-inference",
               "--tokens-secret", "ns/rel-tokens", "--max-dedicated-replicas", "4"])
    assert s.pool_owner_labels == "app.kubernetes.io/instance=rel,a=b"
    assert s.max_dedicated_replicas == 4 and s.tokens_secret == "ns/rel-tokens"
    for bad in (["--pool-owner-labels", "no-value"], ["--pool-owner-deployment", "no-ns"],
                ["--tokens-secret", "Bad/Name"], ["--max-dedicated-replicas", "65"]):
        with pytest.raises(SystemExit):
            parse(bad)


# --------------------------------------------------------------------------- one pass, faked I/O


class FakeKube:
    def __init__(self, adapters, pods, secrets=None):
        self.adapters, self.pods, self.secrets = adapters, pods, secrets or {}
        self.created: list[dict] = []
        self.patches: list[tuple[str, dict]] = []
        self.events: list[tuple[str, str, str]] = []

    async def list_adapters(self, namespace):
        return self.adapters

    async def list_pods(self, namespace):
        return self.pods

    async def get_secret(self, namespace, name):
        return self.secrets.get(name)

    async def create_secret(self, body):
        self.created.append(body)
        self.secrets[body["metadata"]["name"]] = body

    async def patch_adapter_status(self, namespace, name, status):
        self.patches.append((name, status))
        for obj in self.adapters:
            if obj["metadata"]["name"] == name:
                obj["status"] = {k: v for k, v in status.items() if v is not None}

    async def post_event(self, obj, type_, reason, message):
        self.events.append((type_, reason, message))


class FakeSidecars:
    """Each pod's sidecar (port 'sync') and server (port 'http') as an httpx transport."""

    def __init__(self):
        self.desired: dict[int, list[dict]] = {}
        self.ready: set[tuple[int, str, str]] = set()
        self.headers: list[str | None] = []
        self.calls: set[tuple[str, str]] = set()
        self.push_access = False
        # scale-out routing: the placement table each pod got (DesiredState.peers), how
        # many PUTs each port got, versions that become Ready when their pod gets a PUT,
        # each version's residency on its server ((port, tenant, version) -> tier) and each
        # server's load (port -> (queue_depth, running))
        self.peers: dict[int, dict | None] = {}
        self.puts: dict[int, int] = {}
        self.ready_on_put: set[tuple[int, str, str]] = set()
        self.residency: dict[tuple[int, str, str], str] = {}
        self.load: dict[int, tuple[int, int]] = {}

    def __call__(self, request):
        import httpx

        port = request.url.port
        self.headers.append(request.headers.get("authorization"))
        self.calls.add((request.method, request.url.path))
        if request.method == "PUT":
            import json

            body = json.loads(request.content)
            self.desired[port] = body["adapters"]
            self.peers[port] = body.get("peers")
            self.puts[port] = self.puts.get(port, 0) + 1
            self.ready |= {r for r in self.ready_on_put if r[0] == port}
            return httpx.Response(202, json={})
        adapters = [{"tenant": e["tenant"], "version": e["version"],
                     "phase": "Ready" if (port, e["tenant"], e["version"]) in self.ready
                     else "Downloading"} for e in self.desired.get(port, [])]
        queue_depth, running = self.load.get(port, (0, 0))
        server = {"base_model": "smollm2", "queue_depth": queue_depth, "running": running,
                  "adapters": [
                      {"tenant": e["tenant"], "version": e["version"], "state": "ready",
                       "active": e["active"],
                       "residency": self.residency.get((port, e["tenant"], e["version"]),
                                                       "disk")}
                      for e in self.desired.get(port, [])
                      if (port, e["tenant"], e["version"]) in self.ready]}
        body = {"adapters": adapters, "server_reachable": True, "server": server}
        if self.push_access:  # the sidecar pushed each tenant's access (GET /admin/access)
            from loramux.contracts import TenantAccess

            body["access"] = {"auth": "keys", "tenants": [
                {"tenant": e["tenant"], "keys": len(e["access"]["key_sha256"]),
                 "fingerprint": TenantAccess.model_validate(e["access"]).fingerprint(),
                 "source": "admin"}
                for e in self.desired.get(port, []) if e.get("access") and e["active"]]}
        return httpx.Response(200, json=body)


async def test_one_pass_puts_desired_sets_and_patches_status():
    import httpx

    from loramux.operator.reconcile import Reconciler
    from loramux.operator.settings import OperatorSettings

    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    adapter = cr("a")
    adapter["spec"]["source"]["credentialsSecret"] = "s3"
    kube = FakeKube(
        [adapter],
        [pod("p1", ports={"sync": 9101, "http": 9100}), pod("p2", ports={"sync": 9201})],
        {"s3": {"data": {"AWS_ACCESS_KEY_ID": b64("AK"), "AWS_SECRET_ACCESS_KEY": b64("SK")}}},
    )
    fake = FakeSidecars()
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    rec = Reconciler(OperatorSettings(sidecar_token="tok"), kube=kube, http=http)
    result = await rec.run_pass()
    assert result.ok and not result.put_errors
    assert set(fake.desired) == {9101, 9201}  # named port, and p2's named sync port
    (entry,) = fake.desired[9101]
    assert entry["credentials"] == {"access_key_id": "AK", "secret_access_key": "SK"}
    assert "Bearer tok" in fake.headers
    status = kube.patches[-1][1]
    assert status["phase"] == "Progressing" and status["readyPods"] == "0/2"
    assert "SK" not in repr(kube.patches) and "SK" not in repr(kube.events)
    fake.ready |= {(9101, "legal", "v1"), (9201, "legal", "v1")}
    await rec.run_pass()
    status = kube.patches[-1][1]
    assert status["phase"] == "Ready" and status["readyPods"] == "2/2"
    assert [r for _, r, _ in kube.events][-1] == "Ready"
    # a version bump: both pods get v1 (active) + v2, then v2 alone once Ready
    adapter["spec"]["version"] = "v2"
    await rec.run_pass()
    assert [(e["version"], e["active"]) for e in fake.desired[9101]] == [("v1", True),
                                                                         ("v2", False)]
    fake.ready.add((9101, "legal", "v2"))
    await rec.run_pass()
    assert [(e["version"], e["active"]) for e in fake.desired[9101]] == [("v2", True)]
    assert [(e["version"], e["active"]) for e in fake.desired[9201]] == [("v1", True),
                                                                         ("v2", False)]
    assert kube.patches[-1][1]["readyPods"] == "1/2"
    # deletion: the adapter leaves every desired set
    adapter["metadata"]["deletionTimestamp"] = "2026-01-03T00:00:00Z"
    result = await rec.run_pass()
    assert fake.desired == {9101: [], 9201: []}
    assert rec.eviction_pending(parse_adapter(adapter), result) == []
    # the pods' one source of state is the sidecar's GET /v1/state
    assert fake.calls == {("GET", "/v1/state"), ("PUT", "/v1/desired")}
    await http.aclose()


def test_outranked_by_a_live_higher_priority_peer_only() -> None:
    import datetime as dt

    from loramux.operator.status import outranked

    now = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
    fresh = (now - dt.timedelta(seconds=10)).isoformat()
    stale = (now - dt.timedelta(seconds=120)).isoformat()
    peering = {"status": {
        "me@host": {"priority": 500, "lifetime": 60, "lastseen": fresh},
        "other@host": {"priority": 900, "lifetime": 60, "lastseen": fresh},
    }}
    assert outranked(peering, 500, now) is True
    assert outranked(peering, 900, now) is False  # the leader itself
    peering["status"]["other@host"]["lastseen"] = stale  # dead peer: we lead
    assert outranked(peering, 500, now) is False
    peering["status"]["junk"] = {"priority": "x", "lastseen": "never"}
    assert outranked(peering, 500, now) is False
    assert outranked(None, 1, now) is False and outranked({}, 1, now) is False


def test_dedicated_pods_are_never_pool_members():
    from loramux.operator.model import pods_in_pool

    spec = parse_adapter(cr("a"))
    pool = pod("p1")
    dedicated = pod("lmx-legal-v1-abc", labels={
        "app": "infer", "app.kubernetes.io/name": "loramux-dedicated"})
    assert [p["metadata"]["name"] for p in pods_in_pool(spec, [pool, dedicated])] == ["p1"]


# --------------------------------------------------------------------------- typed spec.dedicated


def test_dedicated_spec_is_parsed_once_and_invalid_thresholds_hold():
    from loramux.operator.hot_policy import Thresholds
    from loramux.operator.hot_tenants import HotTenants
    from loramux.operator.model import DedicatedSpec

    assert parse_adapter(cr("a")).dedicated == DedicatedSpec()  # absent: Never
    spec = parse_adapter(cr("a", dedicated={"mode": "Auto", "replicas": 2,
                                            "promoteAboveTokensPerSecond": 10,
                                            "demoteBelowTokensPerSecond": 2}))
    assert spec.dedicated.mode == "Auto" and spec.dedicated.replicas == 2
    assert spec.dedicated.thresholds == Thresholds(promote_above_tps=10, demote_below_tps=2)
    assert spec.dedicated.problem is None
    flapping = parse_adapter(cr("b", dedicated={"mode": "Auto",
                                                "promoteAboveTokensPerSecond": 1,
                                                "demoteBelowTokensPerSecond": 3}))
    assert flapping.error is None  # the adapter itself stays valid
    hot = HotTenants(kube=None, template=None)  # type: ignore[arg-type]
    decision = hot.decide(flapping, True, 0.0)
    assert decision.action == "hold" and decision.reason.startswith("invalid thresholds: ")
    always = parse_adapter(cr("c", dedicated={"mode": "Always"}))
    assert hot.decide(always, False, 0.0).action == "promote"


def test_rate_history_is_pruned_for_gone_and_never_tenants():
    from loramux.operator.hot_tenants import HotTenants

    hot = HotTenants(kube=None, template=None)  # type: ignore[arg-type]
    auto = parse_adapter(cr("a", "legal", dedicated={"mode": "Auto"}))
    never = parse_adapter(cr("b", "medical"))
    hot.record({(NS, "legal"): 1.0, (NS, "medical"): 1.0, (NS, "gone"): 1.0}, 10.0)
    hot.last_change.update({(NS, "medical"): 1.0, (NS, "gone"): 1.0})
    hot.prune([auto, never])
    assert hot.history.tenants() == [f"{NS}/legal"]
    assert set(hot.last_change) == {(NS, "medical")}  # dwell memory while the CR exists
    hot.prune([])
    assert hot.history.tenants() == [] and hot.last_change == {}


# --------------------------------------------------------------------------- operator memory


def test_active_source_is_recorded_kept_and_merge_patched():
    from loramux.operator.status import status_patch

    pods = [k("p1")]
    spec = parse_adapter(cr("a"))
    st = _status(spec, pods, {k("p1"): obs("p1", {("legal", "v1"): "Ready"})})
    assert st["activeVersion"] == "v1"
    assert st["activeSource"] == {"version": "v1", "uri": "s3://adapters/legal/v1/",
                                  "sha256": SHA}
    # a rollout to v2 (no sha256 pin): v1 still active, its source kept and re-sent
    bumped = cr("a", version="v2", status=st)
    del bumped["spec"]["source"]["sha256"]
    spec = parse_adapter(bumped)
    mid = {k("p1"): obs("p1", {("legal", "v1"): "Ready", ("legal", "v2"): "Loading"})}
    st2 = _status(spec, pods, mid)
    assert st2["activeVersion"] == "v1" and st2["activeSource"] == st["activeSource"]
    entries = build_desired_sets([spec], {spec.key: pods}, pods, mid)[k("p1")]
    assert [(e.version, e.uri, e.sha256) for e in entries] == [
        ("v1", "s3://adapters/legal/v1/", SHA), ("v2", "s3://adapters/legal/v2/", None)]
    # v2 Ready: its source replaces v1's; the merge patch drops the old sha256
    done = _status(spec, pods, {k("p1"): obs("p1", {("legal", "v2"): "Ready"})})
    assert done["activeSource"] == {"version": "v2", "uri": "s3://adapters/legal/v2/"}
    patch = status_patch(st2, done)
    assert patch["activeSource"] == {"version": "v2", "uri": "s3://adapters/legal/v2/",
                                     "sha256": None}
    # rejected: no active version, and nothing to remember
    assert status_patch(done, {"phase": "Failed"})["activeSource"] is None
    # a hand-edited source is not trusted
    junk = parse_adapter(cr("a", version="v2", status={
        "activeVersion": "v1", "activeSource": {"version": "v1", "uri": "http://x/"}}))
    assert junk.previous_source is None


def test_crd_has_the_active_source():
    status = crd_version()["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(status["activeSource"]["properties"]) == {"version", "uri", "sha256"}


def test_sidecar_state_is_the_one_source_of_a_pod():
    o = obs("p1", {("legal", "v1"): "Ready"}, served=[
        {"tenant": "legal", "version": "v1", "state": "ready", "active": True},
        {"tenant": "legal", "version": "v0", "state": "draining"}])
    assert o.base_names == {"smollm2", "alias-smollm2"} and o.server_ok
    assert o.served == {("legal", "v1")} and o.serving == {"legal": "v1"}
    unknown = PodObservation.from_state(k("p1"), SyncState(server_reachable=False))
    assert unknown.base_names is None and not unknown.server_ok and unknown.served == set()


# --------------------------------------------------------------------------- issue 15: trust


def test_names_too_long_for_a_label_value_are_rejected_up_front():
    spec = parse_adapter(cr("a" * 64))
    assert spec.error and "metadata.name" in spec.error and "63" in spec.error
    assert parse_adapter(cr("a" * 63)).error is None
    # the operator's limit of dedicated replicas comes from its setting (the chart's value)
    wide = cr("b", dedicated={"mode": "Always", "replicas": 20})
    assert "at most 8" in (parse_adapter(wide).error or "")
    assert parse_adapter(wide, max_dedicated_replicas=32).error is None
    assert "at most 64" in (parse_adapter(cr("c", dedicated={"replicas": 65}),
                                          max_dedicated_replicas=64).error or "")


class GarbageSidecars(FakeSidecars):
    """FakeSidecars, but the pods on ``bad`` ports answer ``GET /v1/state`` with junk."""

    def __init__(self, bad: dict[int, Any]):
        super().__init__()
        self.bad = bad

    def __call__(self, request):
        import httpx

        junk = self.bad.get(request.url.port)
        if request.method == "GET" and junk is not None:
            return junk() if callable(junk) else httpx.Response(200, content=junk)
        return super().__call__(request)


async def test_one_malformed_sidecar_answer_counts_against_that_pod_only():
    import httpx

    from loramux.operator.reconcile import Reconciler
    from loramux.operator.settings import OperatorSettings

    huge = b'{"adapters": [], "pad": "' + b"x" * 5000 + b'"}'
    bad = {
        9201: b"<html>not json</html>",
        9301: b'{"adapters": "ready", "server_reachable": "maybe"}',  # wrong types
        9401: huge,  # beyond max_state_bytes
        9501: b"[" * 100_000 + b"]" * 100_000,  # nested past the recursion limit
        9601: b'{"adapters": [{"tenant": 7, "version": null, "phase": "Exploded"}]}',
        9701: lambda: httpx.Response(200, content=huge, headers={"content-length": "9999999"}),
    }
    pods = [pod("p1", ports={"sync": 9101})] + [
        pod(f"p{port // 100 - 90}", ports={"sync": port}) for port in bad]
    kube = FakeKube([cr("a", "legal"), cr("b", "medical")], pods)
    fake = GarbageSidecars(bad)
    fake.ready |= {(9101, "legal", "v1"), (9101, "medical", "v1")}
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    rec = Reconciler(OperatorSettings(max_state_bytes=4096), kube=kube, http=http)
    await rec.run_pass()
    result = await rec.run_pass()
    assert result.ok  # the pass went through: every adapter got its status
    assert set(result.statuses) == {k("a"), k("b")}
    for status in result.statuses.values():
        rows = {r["pod"]: r for r in status["placements"]}
        assert rows["p1"]["state"] == "Ready"
        for name in ("p3", "p4", "p5", "p6", "p7", "p2"):
            row = rows[name]
            assert row["state"] == "Unknown", row
            assert "bad /v1/state body" in row["reason"], row
        assert status["readyPods"] == "1/7"
    assert len(result.observations[k("p4")].sidecar_error or "") <= 400
    assert "4096" in (result.observations[k("p4")].sidecar_error or "")
    # the healthy pod got both adapters delivered as usual
    assert {e["tenant"] for e in fake.desired[9101]} == {"legal", "medical"}
    await http.aclose()


def owned_pod(name: str, *, label: bool = True, controller: str | None = "rel-inference",
              namespace: str = NS, **kwargs: Any) -> dict[str, Any]:
    p = pod(name, **kwargs)
    p["metadata"]["namespace"] = namespace
    p["metadata"]["labels"]["pod-template-hash"] = "abc12"
    if label:
        p["metadata"]["labels"]["app.kubernetes.io/instance"] = "rel"
    if controller:
        p["metadata"]["ownerReferences"] = [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{controller}-abc12",
            "uid": "rs-uid", "controller": True}]
    return p


def test_pool_owner_checks_labels_and_the_controlling_replicaset():
    from loramux.operator.model import PoolOwner

    owner = PoolOwner.parse("app.kubernetes.io/instance=rel", f"{NS}/rel-inference")
    assert owner.enforced and owner.why_not(owned_pod("p1")) is None
    assert "lacks the install's label" in owner.why_not(owned_pod("p2", label=False))
    assert "not controlled" in owner.why_not(owned_pod("p3", controller=None))
    assert "not controlled" in owner.why_not(owned_pod("p4", controller="other"))
    assert "namespace" in owner.why_not(owned_pod("p5", namespace="elsewhere"))
    assert not PoolOwner.parse(None, None).enforced
    for bad in (("novalue", None), (None, "no-namespace")):
        with pytest.raises(ValueError):
            PoolOwner.parse(*bad)


async def test_pods_the_install_does_not_own_get_no_token_credentials_or_set():
    import httpx

    from loramux.operator.reconcile import Reconciler
    from loramux.operator.settings import OperatorSettings

    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    adapter = cr("a")
    adapter["spec"]["source"]["credentialsSecret"] = "s3"
    pods = [owned_pod("p1", ports={"sync": 9101}),
            owned_pod("p2", label=False, ports={"sync": 9201}),  # someone else's pod
            owned_pod("p3", controller=None, ports={"sync": 9301})]  # a bare pod
    kube = FakeKube([adapter], pods, {"s3": {"data": {
        "AWS_ACCESS_KEY_ID": b64("AK"), "AWS_SECRET_ACCESS_KEY": b64("SK")}}})
    fake = FakeSidecars()
    ports: list[int] = []
    http = httpx.AsyncClient(transport=httpx.MockTransport(
        lambda r: (ports.append(r.url.port), fake(r))[1]))
    settings = OperatorSettings(sidecar_token="tok",
                                pool_owner_labels="app.kubernetes.io/instance=rel",
                                pool_owner_deployment=f"{NS}/rel-inference")
    rec = Reconciler(settings, kube=kube, http=http)
    result = await rec.run_pass()
    assert set(ports) == {9101}  # not even a GET (with the token) to the others
    assert set(fake.desired) == {9101}
    status = result.statuses[k("a")]
    assert [r["pod"] for r in status["placements"]] == ["p1"]
    trusted = next(c for c in status["conditions"] if c["type"] == "PoolTrusted")
    assert trusted["status"] == "False" and trusted["reason"] == "UntrustedPods"
    assert "p2: lacks the install's label" in trusted["message"]
    assert "p3: not controlled by a ReplicaSet" in trusted["message"]
    # no owned pod at all: the status says why nothing is placed
    kube.pods[:] = pods[1:]
    status = (await rec.run_pass()).statuses[k("a")]
    synced = next(c for c in status["conditions"] if c["type"] == "Synced")
    assert synced["reason"] == "UntrustedPods" and "p2" in synced["message"]
    await http.aclose()


async def test_sidecar_token_file_rotates_without_a_restart(tmp_path):
    import os

    import httpx

    from loramux.operator.reconcile import Reconciler
    from loramux.operator.settings import OperatorSettings

    token = tmp_path / "sidecar-token"
    token.write_text("first\n")
    fake = FakeSidecars()
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    kube = FakeKube([cr("a")], [pod("p1", ports={"sync": 9101})])
    rec = Reconciler(OperatorSettings(sidecar_token_file=token), kube=kube, http=http)
    await rec.run_pass()
    assert set(fake.headers) == {"Bearer first"}
    fresh = tmp_path / "new"  # the kubelet swaps the file: a new inode behind the same path
    fresh.write_text("second\n")
    os.replace(fresh, token)
    fake.headers.clear()
    await rec.run_pass()
    assert set(fake.headers) == {"Bearer second"}
    await http.aclose()


async def test_tokens_secret_is_created_once_and_followed():
    import httpx

    from loramux.operator.reconcile import Reconciler
    from loramux.operator.settings import OperatorSettings

    fake = FakeSidecars()
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    kube = FakeKube([cr("a")], [pod("p1", ports={"sync": 9101})])
    rec = Reconciler(OperatorSettings(tokens_secret=f"{NS}/rel-tokens"), kube=kube, http=http)
    await rec.run_pass()
    (created,) = kube.created
    assert created["metadata"] == {"name": "rel-tokens", "namespace": NS, "labels": {
        "app.kubernetes.io/managed-by": "loramux-operator"}}
    values = created["stringData"]
    assert set(values) == {"admin-token", "sidecar-token"} and len(values["sidecar-token"]) > 40
    assert values["admin-token"] != values["sidecar-token"]
    assert set(fake.headers) == {f"Bearer {values['sidecar-token']}"}
    # rotated in the API: the next pass sends the new one; nothing is created again
    kube.secrets["rel-tokens"] = {"data": {
        "sidecar-token": base64.b64encode(b"rotated").decode(), "admin-token": "eA=="}}
    fake.headers.clear()
    await rec.run_pass()
    assert set(fake.headers) == {"Bearer rotated"} and len(kube.created) == 1
    await http.aclose()


# --------------------------------------------------------------------------- spec.access

KEY_A = "tenant-a-key-0123456789abcdefghijklmnop"  # 38 characters
KEY_B = "tenant-a-key-rotated-ZYXWVUTSRQPONMLKJIH"
SHORT = "short-key-never-in-status"  # 25 characters: refused


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def test_access_spec_is_parsed_and_bad_access_is_invalid():
    from loramux.contracts import TenantLimits

    spec = parse_adapter(cr("a", access={"secretName": "legal-keys", "weight": 2.5, "limits": {
        "maxConcurrent": 4, "tokensPerMinute": 60000, "maxQueued": 1}}))
    assert spec.error is None
    assert spec.access is not None and spec.access.secret_name == "legal-keys"
    assert spec.access.weight == 2.5
    assert spec.access.limits == TenantLimits(max_concurrent=4, tokens_per_minute=60000,
                                              max_queued=1)
    plain = parse_adapter(cr("a", access={"secretName": "k"}))
    assert plain.access is not None and plain.access.weight == 1.0
    assert plain.access.limits == TenantLimits()
    assert parse_adapter(cr("a")).access is None
    for bad, fragment in [
        ({}, "secretName"), ({"secretName": "Bad_Name"}, "secretName"),
        ({"secretName": "k", "weight": 0}, "weight"),
        ({"secretName": "k", "weight": 1001}, "weight"),
        ({"secretName": "k", "weight": True}, "weight"),
        ({"secretName": "k", "weight": float("nan")}, "weight"),
        ({"secretName": "k", "limits": {"maxConcurrent": 0}}, "maxConcurrent"),
        ({"secretName": "k", "limits": {"maxQueued": 0}}, "maxQueued"),
        ({"secretName": "k", "limits": {"tokensPerMinute": 1.5}}, "tokensPerMinute"),
        ({"secretName": "k", "limits": {"rps": 3}}, "unknown"),
        ({"secretName": "k", "keys": ["inline"]}, "unknown"),
        ("legal-keys", "object"),
    ]:
        spec = parse_adapter(cr("a", access=bad))
        assert spec.error is not None and fragment in spec.error, (bad, spec.error)
        assert spec.access is None


def test_crd_access_schema_matches_the_operator():
    spec = crd_version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    access = spec["access"]
    assert access["required"] == ["secretName"]
    props = access["properties"]
    assert props["weight"]["default"] == 1 and props["weight"]["maximum"] == 1000
    # > 0: a CEL rule (a boolean exclusiveMinimum trips JSON Schema tools), and the operator
    assert props["weight"]["minimum"] == 0
    assert props["weight"]["x-kubernetes-validations"] == [
        {"rule": "self > 0.0", "message": "spec.access.weight must be greater than 0"}]
    limits = props["limits"]["properties"]
    assert set(limits) == {"maxConcurrent", "tokensPerMinute", "maxQueued"}
    assert limits["maxConcurrent"]["minimum"] == 1 and limits["maxQueued"]["minimum"] == 1
    # both copies of the CRD are one file
    chart_crd = ROOT / "charts" / "loramux" / "crds" / "loraadapter.yaml"
    assert chart_crd.read_bytes() == CRD.read_bytes()
    validator = _validator()
    good = cr("a", access={"secretName": "legal-keys", "weight": 0.5,
                           "limits": {"maxConcurrent": 2, "maxQueued": 1}})
    assert not list(validator.iter_errors(good))
    for bad in ({}, {"secretName": "k", "weight": -1}, {"secretName": "k", "weight": 1001},
                {"secretName": "k", "limits": {"maxConcurrent": 0}},
                {"secretName": "Bad_Name"}):
        obj = cr("a", access=bad)
        assert list(validator.iter_errors(obj)), bad
        assert parse_adapter(obj).error is not None, bad
    # weight 0 passes the schema's minimum (the CEL rule refuses it) and the operator
    assert parse_adapter(cr("a", access={"secretName": "k", "weight": 0})).error is not None


def test_access_from_secret_hashes_keys_and_names_refused_entries_only():
    from loramux.contracts import hash_key
    from loramux.operator.credentials import access_from_secret
    from loramux.operator.model import AccessSpec

    spec, _ = AccessSpec.parse({"secretName": "legal-keys", "weight": 3})
    assert spec is not None
    ok = access_from_secret({"data": {"primary": b64(KEY_A + "\n")},
                             "stringData": {"secondary": KEY_B}}, spec)
    assert ok.ok is True and ok.reason == "KeysLoaded" and ok.keys == 2
    assert set(ok.access.key_sha256) == {hash_key(KEY_A), hash_key(KEY_B)}
    assert ok.access.weight == 3
    short = access_from_secret({"data": {"primary": b64(KEY_A), "old-one": b64(SHORT),
                                         "garbled": "%%%not-base64"}}, spec)
    assert short.ok is False and short.reason == "KeyTooShort"
    assert short.access.key_sha256 == (hash_key(KEY_A),)  # fail closed: the rest is used
    assert "'old-one'" in short.message and "'garbled'" in short.message
    assert SHORT not in short.message and KEY_A not in short.message
    assert hash_key(SHORT) not in repr(short)
    missing = access_from_secret(None, spec)
    assert missing.ok is False and missing.reason == "SecretNotFound"
    assert missing.access.key_sha256 == () and missing.access.weight == 3
    empty = access_from_secret({"data": {}}, spec)
    assert empty.ok is False and empty.reason == "NoKeys" and empty.keys == 0


class SecretKube(FakeKube):
    """FakeKube whose get_secret fails for the names in ``broken`` (an API server error)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.broken: set[str] = set()

    async def get_secret(self, namespace, name):
        from loramux.operator.kube import KubeError

        if name in self.broken:
            raise KubeError(500, "500 Internal Server Error")
        return await super().get_secret(namespace, name)


async def test_access_reaches_every_entry_of_the_tenant_and_rotates_each_pass():
    import httpx

    from loramux.contracts import hash_key
    from loramux.operator.reconcile import Reconciler
    from loramux.operator.settings import OperatorSettings

    adapter = cr("a", access={"secretName": "legal-keys", "weight": 2,
                              "limits": {"maxConcurrent": 3}})
    other = cr("b", tenant="medical")
    kube = SecretKube([adapter, other], [pod("p1", ports={"sync": 9101})],
                      {"legal-keys": {"data": {"primary": b64(KEY_A)}}})
    fake = FakeSidecars()
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    rec = Reconciler(OperatorSettings(sidecar_token="tok"), kube=kube, http=http)

    def access_of(tenant: str) -> list[Any]:
        return [e.get("access") for e in fake.desired[9101] if e["tenant"] == tenant]

    def access_cond() -> dict[str, Any]:
        status = [st for name, st in kube.patches if name == "a"][-1]
        return {c["type"]: c for c in status["conditions"]}["AccessReady"]

    result = await rec.run_pass()
    assert "applied on 0/1 pod(s)" in access_cond()["message"] and result.transient
    fake.push_access = True  # the sidecar pushed it; the server reports its fingerprint
    await rec.run_pass()
    assert "1 key from Secret 'legal-keys'; applied on 1/1 pod(s)" in access_cond()["message"]
    (sent,) = access_of("legal")
    assert sent == {"key_sha256": [hash_key(KEY_A)], "weight": 2.0,
                    "limits": {"max_concurrent": 3}}  # unset limits: the server's default
    assert access_of("medical") == [None]  # no spec.access: no keys of its own
    assert access_cond()["status"] == "True" and access_cond()["reason"] == "KeysLoaded"
    # a rollout: both entries of the tenant carry the access
    fake.ready.add((9101, "legal", "v1"))
    await rec.run_pass()
    adapter["spec"]["version"] = "v2"
    await rec.run_pass()
    assert [e["version"] for e in fake.desired[9101] if e["tenant"] == "legal"] == ["v1", "v2"]
    assert all(a == sent for a in access_of("legal"))
    # rotation: the next pass sends the new key's hash only
    kube.secrets["legal-keys"] = {"data": {"primary": b64(KEY_B)}}
    await rec.run_pass()
    assert {tuple(a["key_sha256"]) for a in access_of("legal")} == {(hash_key(KEY_B),)}
    # a short key is left out, and the condition names its entry
    kube.secrets["legal-keys"] = {"data": {"primary": b64(KEY_B), "legacy": b64(SHORT)}}
    await rec.run_pass()
    assert {tuple(a["key_sha256"]) for a in access_of("legal")} == {(hash_key(KEY_B),)}
    cond = access_cond()
    assert cond["status"] == "False" and cond["reason"] == "KeyTooShort"
    assert "'legacy'" in cond["message"]
    assert ("Warning", "KeyTooShort") in {(t, r) for t, r, _ in kube.events}
    # the API server failing: the last hashes read are kept, the condition is Unknown
    kube.broken = {"legal-keys"}
    result = await rec.run_pass()
    kube.broken = set()
    assert {tuple(a["key_sha256"]) for a in access_of("legal")} == {(hash_key(KEY_B),)}
    assert access_cond()["status"] == "Unknown" and result.transient
    # the Secret deleted: no key at all (fail closed), the adapter stays desired
    del kube.secrets["legal-keys"]
    result = await rec.run_pass()
    assert [a["key_sha256"] for a in access_of("legal")] == [[], []]
    cond = access_cond()
    assert cond["status"] == "False" and cond["reason"] == "SecretNotFound"
    assert "legal-keys" in cond["message"] and result.transient
    # no key, no hash of a refused key, in any status or event
    for value in (KEY_A, KEY_B, SHORT, b64(KEY_A), b64(SHORT), hash_key(SHORT)):
        assert value not in repr(kube.patches) and value not in repr(kube.events)
    # spec.access removed: no AccessReady, no access in the entries
    del adapter["spec"]["access"]
    await rec.run_pass()
    assert set(map(repr, access_of("legal"))) == {"None"}
    status = [st for name, st in kube.patches if name == "a"][-1]
    assert "AccessReady" not in {c["type"] for c in status["conditions"]}
    await http.aclose()


def test_dedicated_access_secrets_follow_the_access_and_the_pool_grants():
    from loramux.contracts import AccessFile, KeyGrant, hash_key
    from loramux.operator.credentials import access_from_secret, access_unreadable
    from loramux.operator.dedicated import access_file_of
    from loramux.operator.hot_policy import Decision
    from loramux.operator.hot_tenants import Existing, Plan
    from loramux.operator.reconcile import HotStep, Observed, plan_dedicated_access

    obj = cr("a", access={"secretName": "legal-keys"}, dedicated={"mode": "Always"})
    spec = parse_adapter(obj)
    assert spec.access is not None
    outcome = access_from_secret({"data": {"k": b64(KEY_A)}}, spec.access)
    grant = KeyGrant(sha256=hash_key("gateway-key-" + "x" * 32), tenants=("*",), name="gw")
    deployment = {"kind": "Deployment", "metadata": {
        "name": "lmx-legal-v1", "labels": {"loramux.io/version": "v1"}}}

    def seen(grants: Any = (grant,), existing: Existing | None = None) -> Observed:
        return Observed(adapters={spec.key: (spec, obj)}, pods=[], pool_pods={},
                        observations={},
                        pool_grants={NS: list(grants) if grants is not None else None},
                        dedicated={spec.key: existing or Existing()})

    def files(writes: list) -> list[tuple[str, AccessFile, bool]]:
        return [(body["metadata"]["name"], AccessFile.model_validate_json(
            access_file_of(body) or ""), create_only) for body, create_only in writes]

    step = HotStep(spec=spec, obj=obj, decision=Decision("promote", "Always"),
                   todo=Plan(create=[deployment]))
    want = AccessFile(grants=[grant], tenants={"legal": outcome.access})
    # promotion: the Secret is written (before the Deployment that mounts it is created)
    writes, deletes = plan_dedicated_access(seen(), {spec.key: step}, {spec.key: outcome})
    assert files(writes) == [("lmx-legal-v1-access", want, False)] and deletes == []
    body = writes[0][0]
    assert body["metadata"]["ownerReferences"][0]["uid"] == "uid-a"
    assert KEY_A not in repr(body)
    # rotated: the next pass writes the new hash (every pass writes: level-triggered)
    existing = Existing(deployments={"v1": {"metadata": {"name": "lmx-legal-v1"}}})
    held = HotStep(spec=spec, obj=obj, decision=Decision("hold", "Always"), todo=Plan())
    rotated = access_from_secret({"data": {"k": b64(KEY_B)}}, spec.access)
    ((name, file, create_only),) = files(plan_dedicated_access(
        seen(existing=existing), {spec.key: held}, {spec.key: rotated})[0])
    assert name == "lmx-legal-v1-access" and not create_only
    assert file.tenants["legal"].key_sha256 == (hash_key(KEY_B),)
    # the pool grants or the tenant's keys unknown this pass (API errors): create only, so
    # an existing file is left as it is
    ((_, _, create_only),) = files(plan_dedicated_access(
        seen(grants=None, existing=existing), {spec.key: held}, {spec.key: rotated})[0])
    assert create_only
    unknown = access_unreadable(spec.access, "500", None)
    ((_, file, create_only),) = files(plan_dedicated_access(
        seen(existing=existing), {spec.key: held}, {spec.key: unknown})[0])
    assert create_only and file.tenants["legal"].key_sha256 == ()
    # without spec.access: the pool-wide grants only, as on the pool
    ((_, file, _),) = files(plan_dedicated_access(seen(existing=existing), {spec.key: held},
                                                  {})[0])
    assert file == AccessFile(grants=[grant])
    # a deleted Deployment's Secret goes with it
    demote = HotStep(spec=spec, obj=obj, decision=Decision("demote", "Never"),
                     todo=Plan(delete=[("Deployment", NS, "lmx-legal-v1"),
                                       ("Service", NS, "lmx-legal-v1")]))
    assert plan_dedicated_access(seen(existing=existing), {spec.key: demote},
                                 {spec.key: outcome}) == ([], [(NS, "lmx-legal-v1-access")])


# --------------------------------------------------------------------------- scale-out routing


def served_view(tenant: str, version: str = "v1", *, state: str = "ready",
                residency: str = "disk", in_flight: int = 0) -> dict[str, Any]:
    """One version as the server's GET /admin/adapters lists it."""
    return {"tenant": tenant, "version": version, "state": state, "active": True,
            "residency": residency, "in_flight": in_flight}


def pool_obs(name: str, states: dict[tuple[str, str], str], served: list[dict], *,
             queue_depth: int = 0, running: int = 0) -> PodObservation:
    o = obs(name, states, served=served)
    assert o.server is not None
    o.server = o.server.model_copy(update={"queue_depth": queue_depth, "running": running})
    return o


def url(pod_key: tuple[str, str]) -> str:
    return f"http://127.0.0.1:{9000 + int(pod_key[1][1:])}"


def test_peer_tables_list_ready_holders_with_tier_and_load_and_say_why_not():
    from loramux.contracts import PeerTable
    from loramux.operator.peers import build_pool_tables

    specs = [parse_adapter(cr(t, t, replicas=1)) for t in
             ("legal", "medical", "finance", "retail", "travel")]
    pods = [k("p1"), k("p2"), k("p3")]
    placements = {k("legal"): [k("p1")], k("medical"): [k("p2")], k("finance"): [k("p3")],
                  k("retail"): [k("p1"), k("p2")], k("travel"): [k("p3")]}
    observations = {
        k("p1"): pool_obs("p1", {("legal", "v1"): "Ready", ("retail", "v1"): "Ready"},
                          [served_view("legal", residency="device"),
                           served_view("retail", residency="host")],
                          queue_depth=2, running=5),
        k("p2"): pool_obs("p2", {("medical", "v1"): "Ready", ("retail", "v1"): "Ready",
                                 ("retail", "v0"): "Ready"},
                          [served_view("medical", residency="host"),
                           served_view("retail", residency="disk"),
                           served_view("retail", "v0", residency="device")], running=1),
        # finance still downloading; travel Ready in the sidecar but loading on the server
        k("p3"): pool_obs("p3", {("finance", "v1"): "Downloading", ("travel", "v1"): "Ready"},
                          [served_view("travel", state="loading")]),
    }
    members = {s.key: pods for s in specs}
    tables = build_pool_tables(specs, placements, members, pods, observations, url)

    def view(pod: str) -> dict[str, dict[str, Any]]:
        table = tables.for_pod(k(pod))
        return {t.tenant: t.model_dump(mode="json") for t in table.tenants}

    p3 = view("p3")
    assert list(p3) == ["finance", "legal", "medical", "retail", "travel"]  # sorted
    assert p3["legal"] == {"tenant": "legal", "reason": None, "failed": False, "holders": [
        {"pod": "p1", "url": "http://127.0.0.1:9001", "versions": ["v1"],
         "residency": "device", "queue_depth": 2, "running": 5}]}
    # retail on two pods: each with its best tier among the versions it holds
    assert [(h["pod"], h["versions"], h["residency"]) for h in p3["retail"]["holders"]] == [
        ("p1", ["v1"], "host"), ("p2", ["v0", "v1"], "device")]
    # no Ready placement: the reason names the version, its phase and its pod
    assert p3["finance"]["holders"] == []
    assert p3["finance"]["reason"] == "no Ready placement: finance@v1 is Downloading on p3"
    assert p3["travel"]["reason"] == ("no Ready placement: travel@v1 is not ready on the "
                                      "server of p3")
    # each pod is left out of its own copy
    p1 = view("p1")
    assert p1["legal"]["holders"] == []
    assert p1["legal"]["reason"] == "no Ready placement on another pod: legal is held only by p1"
    assert [h["pod"] for h in p1["retail"]["holders"]] == ["p2"]
    assert [h["pod"] for h in view("p2")["retail"]["holders"]] == ["p1"]
    # what the sidecar receives is that same table, and the fingerprint is stable: the same
    # observations in another order give the same table
    for pod in pods:
        assert PeerTable.model_validate(tables.wire_for(pod)) == tables.for_pod(pod)
    again = build_pool_tables(list(reversed(specs)), placements,
                              {s.key: list(reversed(pods)) for s in specs}, pods,
                              dict(reversed(list(observations.items()))), url)
    for pod in pods:
        assert again.for_pod(pod).fingerprint() == tables.for_pod(pod).fingerprint()
    # a pod that does not answer, or whose server is gone, holds nothing
    silent = dict(observations)
    silent[k("p1")] = PodObservation(key=k("p1"), sidecar_error="refused")
    gone = pool_obs("p2", {("medical", "v1"): "Ready"}, [served_view("medical")])
    gone.server_reachable = False
    silent[k("p2")] = gone
    quiet = build_pool_tables(specs, placements, members, pods, silent, url).for_pod(k("p3"))
    rows = {t.tenant: t for t in quiet.tenants}
    assert rows["legal"].holders == () and "unknown on p1 (its sidecar did not answer)" in (
        rows["legal"].reason or "")
    assert rows["medical"].holders == () and "unknown on p2 (its server is unreachable)" in (
        rows["medical"].reason or "")
    # a pod whose address no URL can hold is never a holder (and the pass goes on)
    odd = build_pool_tables(specs, placements, members, pods, observations,
                            lambda p: "http://bad host:1" if p == k("p1") else url(p))
    rows = {t.tenant: t for t in odd.for_pod(k("p3")).tenants}
    assert rows["legal"].holders == () and [h.pod for h in rows["retail"].holders] == ["p2"]
    assert rows["legal"].reason == ("no Ready placement: legal@v1 is Ready on p1, which has "
                                    "no usable address")
    assert not any(t.failed for t in quiet.tenants)  # unknown may pass: servers wait
    # Failed on every placement: "failed", so servers answer 503 at once; Failed on one
    # of two placements while the other downloads is not
    broken = dict(observations)
    broken[k("p3")] = pool_obs("p3", {("finance", "v1"): "Failed", ("travel", "v1"): "Ready"},
                               [served_view("travel", state="loading")])
    rows = {t.tenant: t for t in build_pool_tables(specs, placements, members, pods, broken,
                                                   url).for_pod(k("p1")).tenants}
    assert rows["finance"].failed and "Failed on p3" in (rows["finance"].reason or "")
    assert not rows["travel"].failed
    two = {**placements, k("finance"): [k("p2"), k("p3")]}
    rows = {t.tenant: t for t in build_pool_tables(specs, two, members, pods, broken,
                                                   url).for_pod(k("p1")).tenants}
    assert rows["finance"].holders == () and not rows["finance"].failed  # Pending on p2
    # not placed anywhere
    nowhere = build_pool_tables(specs[:1], {}, members, pods, {}, url).for_pod(k("p2"))
    assert not nowhere.tenants[0].failed
    assert nowhere.tenants[0].reason == ("no Ready placement: legal@v1 is not placed on any "
                                         "pod (no Ready pod in its pool, or none that serves "
                                         "smollm2)")


def test_peer_tables_only_for_the_pools_that_select_the_pod():
    from loramux.operator.peers import build_pool_tables

    gpu = {"matchLabels": {"app": "infer", "tier": "gpu"}}
    legal = parse_adapter(cr("legal", "legal", replicas=1))
    medical = parse_adapter(cr("medical", "medical", replicas=1, pool=gpu))
    observations = {k("p1"): pool_obs("p1", {("legal", "v1"): "Ready"}, [served_view("legal")]),
                    k("p2"): pool_obs("p2", {("medical", "v1"): "Ready"},
                                      [served_view("medical")])}
    members = {legal.key: [k("p1"), k("p2"), k("p3")], medical.key: [k("p2"), k("p3")]}
    tables = build_pool_tables([legal, medical], {legal.key: [k("p1")],
                                                  medical.key: [k("p2")]},
                               members, [k("p1"), k("p2"), k("p3")], observations, url)
    assert [t.tenant for t in tables.for_pod(k("p1")).tenants] == ["legal"]
    assert [t.tenant for t in tables.for_pod(k("p3")).tenants] == ["legal", "medical"]
    assert tables.for_pod(k("p9")).tenants == ()  # a pod no pool selects


async def test_each_pod_gets_the_table_in_its_one_put_and_a_draining_pod_stays_a_holder():
    import httpx

    from loramux.contracts import PeerTable
    from loramux.operator.reconcile import Reconciler
    from loramux.operator.settings import OperatorSettings

    legal, medical = cr("legal", "legal", replicas=1), cr("medical", "medical", replicas=1)
    pods = [pod("p1", ports={"sync": 9101, "http": 9100}),
            pod("p2", ports={"sync": 9201, "http": 9200})]
    kube = FakeKube([legal, medical], pods)
    fake = FakeSidecars()
    fake.residency[(9201, "medical", "v1")] = "device"
    fake.load[9201] = (3, 4)
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    rec = Reconciler(OperatorSettings(sidecar_token="tok"), kube=kube, http=http)

    def table(port: int) -> dict[str, Any]:
        got = fake.peers[port]
        assert got is not None
        return {t.tenant: t for t in PeerTable.model_validate(got).tenants}

    await rec.run_pass()  # legal -> p1, medical -> p2 (leastAdapters, ties by name)
    assert fake.puts == {9101: 1, 9201: 1}
    # built from what the pods said before this pass's PUT: not even reported yet
    assert table(9101)["medical"].reason == "no Ready placement: medical@v1 is Pending on p2"
    await rec.run_pass()
    assert table(9101)["medical"].reason == ("no Ready placement: medical@v1 is Downloading "
                                             "on p2")
    fake.ready |= {(9101, "legal", "v1"), (9201, "medical", "v1")}
    await rec.run_pass()
    assert fake.puts == {9101: 3, 9201: 3}  # one PUT per pod per pass, the table in it
    (holder,) = table(9101)["medical"].holders
    assert holder.model_dump(mode="json") == {
        "pod": "p2", "url": "http://127.0.0.1:9200", "versions": ["v1"],
        "residency": "device", "queue_depth": 3, "running": 4}
    assert [h.pod for h in table(9201)["legal"].holders] == ["p1"]
    assert table(9101)["legal"].holders == ()  # itself left out
    statuses = {name: st for name, st in kube.patches}
    assert statuses["medical"]["placements"][0]["residency"] == "device"
    assert statuses["medical"]["residency"] == "p2:device"

    # p2 is deleted: in its grace period it gets nothing more, but it still serves medical,
    # so it stays medical's holder while medical is placed (and loads) on p1
    pods[1]["metadata"]["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    await rec.run_pass()
    assert fake.puts == {9101: 4, 9201: 3}
    assert {e["tenant"] for e in fake.desired[9101]} == {"legal", "medical"}
    assert [h.pod for h in table(9101)["medical"].holders] == ["p2"]
    # medical becomes Ready on p1 during the pass: the pods must hear of it soon, even
    # though every LoraAdapter is Ready (nothing else would make the next pass come early)
    fake.ready_on_put.add((9101, "medical", "v1"))
    result = await rec.run_pass()
    assert result.transient
    assert all(st["phase"] == "Ready" for st in result.statuses.values())
    # p2 is gone: p1 holds medical alone
    pods.pop()
    result = await rec.run_pass()
    assert table(9101)["medical"].holders == ()
    assert not result.transient
    assert fake.puts == {9101: 6, 9201: 3}
    await http.aclose()


def test_status_shows_each_pods_residency_and_in_flight():
    from k8s_harness import prune

    spec = parse_adapter(cr("a"))
    pods = [k("p1"), k("p2")]
    observations = {
        k("p1"): obs("p1", {("legal", "v1"): "Ready"},
                     served=[served_view("legal", residency="device", in_flight=3)]),
        k("p2"): obs("p2", {("legal", "v1"): "Ready"},
                     served=[served_view("legal", residency="host", in_flight=1)])}
    st = _status(spec, pods, observations)
    assert [(r["pod"], r["residency"], r["inFlight"]) for r in st["placements"]] == [
        ("p1", "device", 3), ("p2", "host", 1)]
    assert st["residency"] == "p1:device,p2:host" and st["inFlight"] == 4
    # the CRD's status schema keeps them (an API server prunes unknown fields)
    schema = crd_version()["schema"]["openAPIV3Schema"]
    obj = {**cr("a"), "status": st}
    kept = prune(obj, schema, root=True)["status"]
    assert kept["residency"] == "p1:device,p2:host" and kept["inFlight"] == 4
    assert kept["placements"][0]["residency"] == "device"
    assert kept["placements"][0]["inFlight"] == 3
    assert not list(_validator().iter_errors(obj))
    # a version not ready on the server has no tier; none at all: no summary, and the
    # merge patch removes the old one
    loading = {k("p1"): obs("p1", {("legal", "v1"): "Loading"},
                            served=[served_view("legal", state="loading")])}
    st2 = _status(spec, [k("p1")], loading)
    assert "residency" not in st2["placements"][0] and "residency" not in st2
    from loramux.operator.status import status_differs, status_patch

    assert status_differs(st, st2)
    patch = status_patch(st, st2)
    assert patch["residency"] is None and patch["inFlight"] is None
    # beyond three pods: counts per tier, short
    many = [k(f"p{i}") for i in range(1, 6)]
    tiers = ["device", "host", "host", "disk", "device"]
    observations = {p: obs(p[1], {("legal", "v1"): "Ready"},
                           served=[served_view("legal", residency=t)])
                    for p, t in zip(many, tiers, strict=True)}
    st = _status(spec, many, observations)
    assert st["residency"] == "device:2,host:2,disk:1"


def test_in_flight_in_status_is_damped_so_busy_tenants_are_not_rewritten_every_pass():
    from loramux.operator.status import damp_in_flight

    previous = {"placements": [{"pod": "a", "inFlight": 10}, {"pod": "b", "inFlight": 0},
                               {"pod": "c", "inFlight": 3}, {"pod": "d", "inFlight": 40}]}
    rows = [{"pod": "a", "inFlight": 12}, {"pod": "b", "inFlight": 1},
            {"pod": "c", "inFlight": 0}, {"pod": "d", "inFlight": 51},
            {"pod": "e", "inFlight": 5}, {"pod": "f"}]
    damp_in_flight(rows, previous)
    assert [r.get("inFlight") for r in rows] == [
        10,  # within max(2, 25 %) of the last written 10: kept, no status write
        1,  # leaving idle is always written
        0,  # becoming idle is always written
        51,  # 11 away from 40 (> 10): written
        5,  # a new pod's row: as observed
        None,  # no count reported: nothing invented
    ]
    damp_in_flight(rows, None)  # a first status: as observed
    assert rows[0]["inFlight"] == 10
