"""Planning a hot tenant's dedicated objects and routes (pure), and reading the request
counter from a server's /metrics text."""

from __future__ import annotations

import copy

from loramux.operator.dedicated import build_deployment, build_service
from loramux.operator.hot_policy import Decision
from loramux.operator.hot_tenants import Existing, endpoint, parse_request_totals, plan

CR = {
    "apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
    "metadata": {"name": "legal", "namespace": "ns", "uid": "u1"},
    "spec": {"tenant": "legal", "version": "v2", "source": {"uri": "s3://b/legal/v2/"},
             "dedicated": {"mode": "Always", "replicas": 1}},
}
TEMPLATE = {"spec": {"containers": [{"name": "server", "image": "img:1"}]}}
PROMOTE, HOLD, DEMOTE = (Decision("promote", "p"), Decision("hold", "h"),
                         Decision("demote", "d"))


def _cr(version: str) -> dict:
    cr = copy.deepcopy(CR)
    cr["spec"]["version"] = version
    return cr


def _pair(version: str, ready: bool, ip: str = "10.0.0.7") -> tuple[dict, dict]:
    dep = build_deployment(_cr(version), TEMPLATE)
    dep["metadata"]["generation"] = 1
    dep["status"] = ({"observedGeneration": 1, "availableReplicas": 1, "updatedReplicas": 1}
                     if ready else {"observedGeneration": 1})
    svc = build_service(_cr(version))
    svc["spec"]["clusterIP"] = ip
    return dep, svc


def _existing(*pairs: tuple[str, bool]) -> Existing:
    out = Existing()
    for version, ready in pairs:
        out.deployments[version], out.services[version] = _pair(version, ready)
    return out


def test_promotion_creates_the_pair_and_routes_only_when_ready() -> None:
    first = plan(CR, PROMOTE, Existing(), TEMPLATE, routed_versions=set(),
                 pool_serves_version=True)
    assert [o["kind"] for o in first.create] == ["Deployment", "Service"]
    assert first.routes == {} and first.endpoint is None
    assert first.condition["status"] == "False" and first.condition["reason"] == "Starting"

    starting = plan(CR, HOLD, _existing(("v2", False)), TEMPLATE, routed_versions=set(),
                    pool_serves_version=True)
    assert starting.create == [] and starting.routes == {}

    ready = plan(CR, HOLD, _existing(("v2", True)), TEMPLATE, routed_versions=set(),
                 pool_serves_version=True)
    assert ready.routes == {"v2": "http://10.0.0.7:8000"}
    assert ready.endpoint == "http://10.0.0.7:8000"
    assert ready.condition == {"type": "Dedicated", "status": "True", "reason": "Ready",
                               "message": ready.condition["message"]}


def test_rollout_keeps_old_pair_until_new_ready_pool_switched_and_unrouted() -> None:
    both = _existing(("v1", True), ("v2", False))
    p = plan(CR, HOLD, both, TEMPLATE, routed_versions={"v1"}, pool_serves_version=False)
    assert p.delete == [] and p.routes == {"v1": "http://10.0.0.7:8000"}
    assert p.endpoint == "http://10.0.0.7:8000"  # still the old one, which is Ready

    both = _existing(("v1", True), ("v2", True))
    for routed, serves in (({"v1"}, True), (set(), False)):
        p = plan(CR, HOLD, both, TEMPLATE, routed_versions=routed, pool_serves_version=serves)
        assert p.delete == [], (routed, serves)
        assert set(p.routes) == {"v1", "v2"}
    p = plan(CR, HOLD, both, TEMPLATE, routed_versions={"v2"}, pool_serves_version=True)
    assert p.delete == [("Deployment", "ns", "lmx-legal-v1"), ("Service", "ns", "lmx-legal-v1")]


def test_demotion_unroutes_first_then_deletes() -> None:
    existing = _existing(("v2", True))
    routed = plan(CR, DEMOTE, existing, TEMPLATE, routed_versions={"v2"},
                  pool_serves_version=True)
    assert routed.routes == {} and routed.delete == []
    assert routed.condition["reason"] == "Demoting"
    gone = plan(CR, DEMOTE, existing, TEMPLATE, routed_versions=set(), pool_serves_version=True)
    assert gone.delete == [("Deployment", "ns", "lmx-legal-v2"), ("Service", "ns", "lmx-legal-v2")]
    nothing = plan(CR, HOLD, Existing(), TEMPLATE, routed_versions=set(),
                   pool_serves_version=True)
    assert nothing.create == [] and nothing.condition["reason"] == "NotDedicated"


def test_without_template_nothing_is_created() -> None:
    p = plan(CR, PROMOTE, Existing(), None, routed_versions=set(), pool_serves_version=True)
    assert p.create == [] and p.condition["reason"] == "NoPodTemplate"


def test_endpoint_prefers_cluster_ip_then_dns() -> None:
    _, svc = _pair("v2", True, ip="fd00::5")
    assert endpoint(svc) == "http://[fd00::5]:8000"
    svc["spec"].pop("clusterIP")
    assert endpoint(svc) == "http://lmx-legal-v2.ns.svc.cluster.local:8000"


def test_parse_request_totals() -> None:
    text = """# HELP loramux_requests_total Requests finished, by tenant and outcome.
# TYPE loramux_requests_total counter
loramux_requests_total{outcome="ok",tenant="legal"} 12.0
loramux_requests_total{outcome="forwarded",tenant="legal"} 30.0
loramux_requests_total{outcome="ok",tenant="medical"} 2.0
loramux_requests_total{outcome="ok",tenant="_base"} 5.0
loramux_requests_created{outcome="ok",tenant="legal"} 1.7e9
loramux_forwarded_requests_total{outcome="forwarded",tenant="legal"} 30.0
"""
    assert parse_request_totals(text) == {"legal": 42.0, "medical": 2.0}


def test_only_services_the_operator_built_for_the_adapter_are_routed_to() -> None:
    import asyncio

    from loramux.operator.hot_tenants import HotTenants, not_ours

    dep, svc = _pair("v2", True)
    assert not_ours(svc, "Service", "u1") is None and not_ours(dep, "Deployment", "u1") is None
    assert not_ours(svc, "Service", "other-uid") == "not controlled by its LoraAdapter"
    assert not_ours(svc, "Service", None) == "not controlled by its LoraAdapter"
    forged = copy.deepcopy(svc)
    forged["spec"] = {"type": "ExternalName", "externalName": "evil.example.com"}
    assert not_ours(forged, "Service", "u1") == "not a plain ClusterIP Service"
    elsewhere = copy.deepcopy(svc)
    elsewhere["spec"]["selector"] = {"app": "attacker"}
    assert "selects other pods" in (not_ours(elsewhere, "Service", "u1") or "")
    renamed = copy.deepcopy(svc)
    renamed["metadata"]["name"] = "lmx-legal-v2-x"
    assert "name is not" in (not_ours(renamed, "Service", "u1") or "")
    assert endpoint(svc) == "http://10.0.0.7:8000"

    class Kube:
        async def list_deployments(self, namespace, selector):
            return [dep]

        async def list_services(self, namespace, selector):
            return [forged]

    hot = HotTenants(Kube(), TEMPLATE)  # type: ignore[arg-type]
    seen = asyncio.run(hot.list_all(None, {("ns", "legal"): "u1"}))
    assert list(seen[("ns", "legal")].deployments) == ["v2"]
    assert seen[("ns", "legal")].services == {}  # the forged Service is ignored
    assert asyncio.run(hot.list_all(None, {})) == {}  # no LoraAdapter: nothing is ours


def test_request_totals_are_read_within_a_size_bound() -> None:
    import asyncio

    import httpx

    from loramux.operator.hot_tenants import scrape_request_totals

    line = 'loramux_requests_total{outcome="ok",tenant="legal"} 3.0\n'
    bodies = {"a": line.encode(), "b": line.encode() + b"#" * 5000}

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=bodies[request.url.host])

    async def scrape(*hosts: str) -> dict | None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            return await scrape_request_totals(http, [("ns", f"http://{h}") for h in hosts],
                                               max_bytes=1000)

    assert asyncio.run(scrape("a")) == {("ns", "legal"): 3.0}
    assert asyncio.run(scrape("a", "b")) is None  # too big: no sample this pass
