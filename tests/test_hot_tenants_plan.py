"""Planning a hot tenant's dedicated objects and routes (pure), and reading the tokens each
tenant was served from the pool pods' per-tenant /metrics."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest

from loramux.operator.dedicated import build_deployment, build_service
from loramux.operator.hot_policy import Decision
from loramux.operator.hot_tenants import (
    Existing,
    HotTenants,
    endpoint,
    metrics_url,
    parse_token_totals,
    plan,
    scrape_token_totals,
)
from loramux.operator.model import parse_adapter

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


def test_parse_token_totals_sums_prompt_generated_and_forwarded_tokens() -> None:
    text = """# HELP loramux_prompt_tokens_total Prompt tokens processed.
# TYPE loramux_prompt_tokens_total counter
loramux_prompt_tokens_total{tenant="legal"} 1200.0
loramux_prompt_tokens_total{tenant="medical"} 30.0
loramux_prompt_tokens_total{tenant="_base"} 5000.0
loramux_prompt_tokens_created{tenant="legal"} 1.7e9
loramux_completion_tokens_total{tenant="legal"} 300.0
loramux_completion_tokens_total{tenant="medical"} 2.5e1 1700000000000
loramux_forwarded_tokens_total{tenant="legal"} 4000.0
loramux_forwarded_tokens_total{tenant="bad"} NaN
loramux_forwarded_requests_total{outcome="forwarded",tenant="legal"} 30.0
loramux_requests_total{outcome="ok",tenant="legal"} 12.0
loramux_requests_total{outcome="ok",tenant="chatty"} 100000.0
loramux_tenant_limited_total{limit="max_queued",tenant="legal"} 7.0
"""
    # requests are not counted at all: "chatty" sent many, but was served no tokens
    assert parse_token_totals(text) == {"legal": 5500.0, "medical": 55.0}
    # the public port's sums over tenants carry no tenant: nothing to attribute
    summed = ("loramux_prompt_tokens_total 1200.0\n"
              "loramux_completion_tokens_total 300.0\n")
    assert parse_token_totals(summed) == {}


def test_invalid_thresholds_hold_with_an_invalid_spec_condition() -> None:
    """The removed request-rate fields: the adapter itself stays valid and placed; the
    policy holds what exists and the Dedicated condition names the new field."""
    obj = {"apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
           "metadata": {"name": "legal", "namespace": "ns", "uid": "u1"},
           "spec": {"tenant": "legal", "version": "v2", "baseModel": "tiny",
                    "source": {"uri": "s3://bucket/legal/v2/"},
                    "pool": {"matchLabels": {"app": "pool"}},
                    "dedicated": {"mode": "Auto", "promoteAboveRps": 5, "demoteBelowRps": 1}}}
    spec = parse_adapter(obj)
    assert spec.error is None
    assert "promoteAboveRps was removed: use promoteAboveTokensPerSecond" in (
        spec.dedicated.problem or "")
    hot = HotTenants(kube=None, template=TEMPLATE)  # type: ignore[arg-type]
    for dedicated_now, existing, status in ((False, Existing(), "False"),
                                            (True, _existing(("v2", True)), "True")):
        decision = hot.decide(spec, dedicated_now, 1000.0)
        assert decision.action == "hold" and decision.invalid
        p = plan(CR, decision, existing, TEMPLATE, routed_versions={"v2"},
                 pool_serves_version=True)
        assert p.create == [] and p.delete == []  # held: nothing created, nothing deleted
        assert p.condition["reason"] == "InvalidSpec" and p.condition["status"] == status
        assert "use demoteBelowTokensPerSecond" in p.condition["message"]
    valid = plan(CR, Decision("hold", "h"), Existing(), TEMPLATE, routed_versions=set(),
                 pool_serves_version=True)
    assert valid.condition["reason"] == "NotDedicated"


def _pod(name: str, ports: dict[str, int], ip: str = "10.1.2.3") -> dict:
    return {"metadata": {"name": name, "namespace": "ns"}, "status": {"podIP": ip},
            "spec": {"containers": [{"name": "server", "ports": [
                {"name": n, "containerPort": p} for n, p in ports.items()]}]}}


def test_scrape_targets_are_the_metrics_ports(caplog: pytest.LogCaptureFixture) -> None:
    with_port = _pod("a", {"http": 8000, "metrics": 8003})
    without = _pod("b", {"http": 8100}, ip="fd00::9")
    assert metrics_url(with_port, 8000) == ("http://10.1.2.3:8003/metrics", True)
    assert metrics_url(without, 8000) == ("http://[fd00::9]:8100/metrics", False)
    assert metrics_url(_pod("c", {}), 8000) == ("http://10.1.2.3:8000/metrics", False)
    hot = HotTenants(kube=None, template=None)  # type: ignore[arg-type]
    pods = {("ns", "a"): with_port, ("ns", "b"): without}
    with caplog.at_level("WARNING", logger="loramux.operator.hot"):
        for _ in range(3):
            targets = hot.scrape_targets(pods, 8000)
    assert targets == [("ns", "http://10.1.2.3:8003/metrics"),
                       ("ns", "http://[fd00::9]:8100/metrics")]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "ns/b" in warned[0] and "'metrics'" in warned[0]


class _Bodies(BaseHTTPRequestHandler):
    bodies: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        body = self.bodies.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metrics_server() -> Iterator[str]:
    """A real HTTP server on loopback answering ``/<name>/metrics`` from _Bodies.bodies."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Bodies)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_only_services_the_operator_built_for_the_adapter_are_routed_to() -> None:
    from loramux.operator.hot_tenants import not_ours

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


def test_token_totals_are_summed_over_pods_within_a_size_bound(metrics_server: str) -> None:
    _Bodies.bodies = {
        "/a/metrics": b'loramux_prompt_tokens_total{tenant="legal"} 300.0\n'
                      b'loramux_completion_tokens_total{tenant="legal"} 100.0\n',
        "/b/metrics": b'loramux_forwarded_tokens_total{tenant="legal"} 1000.0\n'
                      b'loramux_prompt_tokens_total{tenant="legal",} 0\n'
                      b'loramux_completion_tokens_total{tenant="legal"} 0\n',
        "/c/metrics": b'loramux_prompt_tokens_total{tenant="legal"} 3.0\n' + b"#" * 5000,
        "/summed/metrics": b"loramux_prompt_tokens_total 300.0\n",
    }

    async def scrape(*names: str) -> dict | None:
        async with httpx.AsyncClient() as http:
            return await scrape_token_totals(
                http, [("ns", f"{metrics_server}/{n}/metrics") for n in names],
                max_bytes=1000)

    assert asyncio.run(scrape("a")) == {("ns", "legal"): 400.0}
    assert asyncio.run(scrape("a", "b")) == {("ns", "legal"): 1400.0}
    assert asyncio.run(scrape("a", "summed")) == {("ns", "legal"): 400.0}
    assert asyncio.run(scrape("a", "c")) is None  # too big: no sample this pass
    assert asyncio.run(scrape("a", "gone")) is None  # a pod that does not answer: none
