"""Hot tenants end to end (issue 7): promotion to a dedicated merged deployment, routing,
version rollout, traffic-driven (Auto) promotion and demotion, with real processes in the
operator's harness. Auto counts tokens served (issue 16), read from the pool pod's
per-tenant metrics port (its container port named ``metrics``): the public port's /metrics
only shows sums over tenants.

- Kubernetes API: the kmock emulator over HTTP (tests/k8s_harness.py); the CRD and the
  LoraAdapters go in with the real kubectl.
- One pool "pod": a real `loramux serve` (tiny fp32 model, `--metrics-port`) +
  `loramux sync`; the Pod object declares the metrics port, as the chart's does.
- S3: moto, the adapters published with `loramux push`'s push().
- The real `loramux operator` process with a dedicated pod template file.

What cannot exist here is simulated, and only that: no kubelet runs the dedicated
Deployment's pod, so the test runs the pod's own commands - the `fetch` init container's
`loramux fetch` args, then `loramux serve --merge-adapter` - as local processes, and then
does what the cluster would: reports the Deployment available (status patch, as the
Deployment controller would) and gives the Service a cluster IP and port that reach that
process (what kube-proxy would).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from factories import stage_adapter
from k8s_harness import (
    CRD_PATH,
    S3,
    InferencePod,
    K8s,
    OperatorProcess,
    free_port,
    inference_pod,
    pod_manifest,
)
from loramux.operator.hot_tenants import scrape_token_totals
from loramux.training.publish import push

LORA = ("loramux.io/v1alpha1", "loraadapters")
TOKEN = "hot-sidecar-token"
PROMPT = "Route me"
T = TypeVar("T")

pytestmark = pytest.mark.timeout(400)


def wait(fn: Callable[[], T], what: str, timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (httpx.HTTPError, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@dataclass
class Hot:
    k8s: K8s
    pod: InferencePod
    uris: dict[str, str]
    tiny_model_dir: Path
    start_server: Any
    workdir: Path
    metrics_url: str  # the pool pod's per-tenant /metrics (its "metrics" container port)
    merged: list[Any] = field(default_factory=list)

    def apply(self, version: str, dedicated: dict[str, Any]) -> None:
        assert self.k8s.kubectl is not None
        self.k8s.kubectl.apply(json.dumps({
            "apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
            "metadata": {"name": "legal", "namespace": "default"},
            "spec": {"tenant": "legal", "version": version, "baseModel": "tiny-llama",
                     "source": {"uri": self.uris[version]},
                     "pool": {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}},
                     "dedicated": dedicated}}))

    def status(self) -> dict[str, Any]:
        return (self.k8s.api.find(*LORA, "legal") or {}).get("status") or {}

    def dedicated_condition(self) -> dict[str, Any]:
        return {c["type"]: c for c in self.status().get("conditions", [])}.get("Dedicated", {})

    def route(self) -> dict[str, Any] | None:
        routes = httpx.get(f"{self.pod.server_url}/admin/routes", timeout=5).json()["routes"]
        return routes[0] if routes else None

    def tokens_served(self) -> float:
        """The pool's tokens served to legal, read as the operator reads them."""
        async def scrape() -> dict[tuple[str, str], float] | None:
            async with httpx.AsyncClient() as http:
                return await scrape_token_totals(http, [("default", self.metrics_url)])

        totals = asyncio.run(scrape())
        assert totals is not None, "the metrics port did not answer"
        return totals.get(("default", "legal"), 0.0)

    def generate(self) -> httpx.Response:
        return httpx.post(f"{self.pod.server_url}/generate", timeout=60, json={
            "tenant_id": "legal", "prompt": PROMPT, "max_new_tokens": 8, "ignore_eos": True})

    def run_dedicated_pod(self, name: str) -> Any:
        """Be the kubelet for Deployment ``name``: run its fetch and its merged server, then
        be kube-proxy and the Deployment controller. Returns the server process."""
        dep = self.k8s.api.get("apps/v1", "deployments", name)
        pod_spec = dep["spec"]["template"]["spec"]
        (fetch,) = pod_spec["initContainers"]
        (server,) = pod_spec["containers"]
        volume = self.workdir / f"volume-{name}"
        args = [a.replace("/adapters", str(volume)) for a in fetch["args"]]
        done = subprocess.run([sys.executable, "-P", "-m", "loramux.cli", *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        merge_dir = server["args"][server["args"].index("--merge-adapter") + 1]
        merged = self.start_server("--model", str(self.tiny_model_dir), "--quantization",
                                   "none", "--log-format", "text", "--merge-adapter",
                                   merge_dir.replace("/adapters", str(volume)))
        self.merged.append(merged)
        port = int(merged.url.rsplit(":", 1)[1])
        self.k8s.api.patch("v1", "services", name, {"spec": {
            "clusterIP": "127.0.0.1",
            "ports": [{"name": "http", "port": port, "targetPort": "http"}]}})
        generation = dep["metadata"]["generation"]
        self.k8s.api.patch_status("apps/v1", "deployments", name, {
            "observedGeneration": generation, "replicas": 1, "readyReplicas": 1,
            "availableReplicas": 1, "updatedReplicas": 1})
        return merged

    def delete_cr(self) -> None:
        assert self.k8s.kubectl is not None
        self.k8s.kubectl("delete", "lora", "legal", "--ignore-not-found", "--wait=true",
                         "--timeout=60s")
        for merged in self.merged:
            merged.stop()
        self.merged.clear()


class ClientLoop:
    """Requests for the hot tenant through the pool server, until stopped."""

    def __init__(self, hot: Hot) -> None:
        self.hot = hot
        self.results: list[tuple[int, str, str | None]] = []  # status, text, routed
        self.tokens = 0  # prompt + generated tokens of the answers (their usage)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                r = client.post(f"{self.hot.pod.server_url}/generate", json={
                    "tenant_id": "legal", "prompt": PROMPT, "max_new_tokens": 8,
                    "ignore_eos": True})
                text = r.json().get("text", "") if r.status_code == 200 else r.text
                if r.status_code == 200:
                    usage = r.json()["usage"]
                    self.tokens += usage["prompt_tokens"] + usage["completion_tokens"]
                # Forwarded to a dedicated pod: "X-Loramux-Routed: dedicated" (the URL is
                # internal and never shown), or the older "X-Loramux-Routed-To: <url>".
                routed = (r.headers.get("x-loramux-routed")
                          or r.headers.get("x-loramux-routed-to"))
                self.results.append((r.status_code, text, routed))

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def more(self, n: int, what: str) -> None:
        count = len(self.results)
        wait(lambda: len(self.results) >= count + n, what)


@pytest.fixture(scope="module")
def hot(k8s: K8s, s3_server: S3, tiny_model_dir: Path, adapter_root: Path, start_server,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hot]:
    assert k8s.kubectl is not None
    k8s.kubectl.apply(CRD_PATH)
    workdir = tmp_path_factory.mktemp("hot")
    bucket = f"hot-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    uris = {}
    for version in ("v1", "v2"):
        uris[version] = f"s3://{bucket}/legal/{version}/"
        push(stage_adapter(adapter_root, workdir / "stage", "legal", version)[0],
             uris[version], client=s3_server.client, progress=False)
    metrics_port = free_port()
    pod = inference_pod(k8s.api, "pool-a", workdir / "pods", sidecar_token=TOKEN,
                        server_args=["--model", str(tiny_model_dir), "--quantization", "none",
                                     "--log-format", "text", "--route-retry-s", "1",
                                     "--metrics-port", str(metrics_port)], start=False)
    assert pod.server is not None and pod.sidecar is not None
    pod.server.start()
    pod.sidecar.start()
    # The Pod declares the server's per-tenant metrics port, named "metrics" as in the
    # chart: the operator reads tokens served there. (start() then only sets its status.)
    manifest = pod_manifest(pod.name, pod.server_port, pod.sync_port)
    manifest["spec"]["containers"][0]["ports"].append(
        {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"})
    k8s.api.create(manifest)
    pod.start()
    template = workdir / "pod-template.yaml"
    template.write_text(yaml.safe_dump({"metadata": {"labels": {"team": "ml"}}, "spec": {
        "containers": [{"name": "server", "image": "loramux/inference:test",
                        "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}))
    operator = OperatorProcess(
        k8s.kubeconfig, workdir / "operator.log",
        ["--namespace", "default", "--resync-seconds", "1", "--health-port", "0",
         "--sidecar-token", TOKEN, "--dedicated-template-file", str(template)])
    operator.start()
    try:
        operator.wait_for_log("loramux operator started", 60)
        yield Hot(k8s, pod, uris, tiny_model_dir, start_server, workdir,
                  f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        operator.stop()
        pod.stop()


def test_promotion_routing_and_demotion_without_failed_requests(hot: Hot) -> None:
    k8s = hot.k8s
    name = "lmx-legal-v1"
    hot.apply("v1", {"mode": "Never"})
    wait(lambda: hot.status().get("phase") == "Ready", "legal Ready on the pool")
    local_text = hot.generate().json()["text"]
    served_before = hot.tokens_served()
    try:
        with ClientLoop(hot) as loop:
            # --- promotion: mode Always creates the pair, owned by the LoraAdapter
            hot.apply("v1", {"mode": "Always", "replicas": 1})
            cr = k8s.api.get(*LORA, "legal")
            dep = wait(lambda: k8s.api.find("apps/v1", "deployments", name), "Deployment")
            svc = wait(lambda: k8s.api.find("v1", "services", name), "Service created")
            for obj in (dep, svc):
                (owner,) = obj["metadata"]["ownerReferences"]
                assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
                    "LoraAdapter", "legal", cr["metadata"]["uid"], True)
            pod_spec = dep["spec"]["template"]["spec"]
            (server,) = pod_spec["containers"]
            assert server["image"] == "loramux/inference:test"
            assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert "--merge-adapter" in server["args"]
            (fetch,) = pod_spec["initContainers"]
            assert fetch["args"][0] == "fetch" and hot.uris["v1"] in fetch["args"]
            assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
            condition = wait(hot.dedicated_condition, "Dedicated condition")
            assert condition["status"] == "False" and condition["reason"] == "Starting"
            assert "dedicatedEndpoint" not in hot.status()
            assert hot.route() is None  # not Ready: no routing yet

            merged = hot.run_dedicated_pod(name)
            route = wait(hot.route, "the pool server routes legal to the dedicated pod")
            assert route["url"] == merged.url and route["version"] == "v1"
            wait(lambda: hot.status().get("dedicatedEndpoint") == merged.url,
                 "dedicatedEndpoint")
            assert hot.dedicated_condition()["status"] == "True"
            wait(lambda: sum(1 for r in loop.results if r[2]) >= 3, "requests served merged")
            # a server without a metrics port has its per-tenant series at /admin/metrics
            assert 'tenant="legal"' in httpx.get(f"{merged.url}/admin/metrics").text

            # --- demotion: the route goes first, then the pair
            hot.apply("v1", {"mode": "Never"})
            order_ok = True

            def demoted() -> bool:
                nonlocal order_ok
                route_now, dep_now = hot.route(), k8s.api.find("apps/v1", "deployments", name)
                if dep_now is None and route_now is not None:
                    order_ok = False  # deleted while still routed
                return dep_now is None and k8s.api.find("v1", "services", name) is None

            wait(demoted, "route removed and dedicated pair deleted")
            assert order_ok and hot.route() is None
            wait(lambda: "dedicatedEndpoint" not in hot.status(), "endpoint cleared")
            assert hot.dedicated_condition().get("status") != "True"
            loop.more(3, "requests after demotion")
    finally:
        hot.delete_cr()
    results = loop.results
    assert len(results) > 10
    assert not [r for r in results if r[0] != 200], results[:3]
    # merged (dedicated) and unmerged (pool) answers are the same text (fp32, greedy)
    assert {text for _, text, _ in results} == {local_text}
    assert any(r[2] for r in results) and results[-1][2] is None
    events = k8s.api.list("v1", "events")["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"].get("name") == "legal"}
    assert {"Promoted", "Demoted"} <= reasons
    # What Auto would have counted: every answer's tokens exactly once, whether the pool
    # served it or forwarded it to the dedicated pod (forwarded tokens, from the usage).
    wait(lambda: hot.tokens_served() - served_before == loop.tokens,
         f"{loop.tokens} tokens counted on the metrics port", timeout=10)
    public = httpx.get(f"{hot.pod.server_url}/metrics", timeout=5).text
    assert 'tenant="legal"' not in public  # per-tenant series only on the metrics port
    per_tenant = httpx.get(hot.metrics_url, timeout=5).text
    assert 'loramux_forwarded_tokens_total{tenant="legal"}' in per_tenant


def test_version_rollout_rolls_the_dedicated_deployment_and_switches_when_ready(
        hot: Hot) -> None:
    k8s = hot.k8s
    hot.apply("v1", {"mode": "Always"})
    try:
        wait(lambda: k8s.api.find("apps/v1", "deployments", "lmx-legal-v1"), "v1 Deployment")
        merged_v1 = hot.run_dedicated_pod("lmx-legal-v1")
        wait(lambda: (hot.route() or {}).get("url") == merged_v1.url, "routed to v1")
        texts = {}
        with ClientLoop(hot) as loop:
            loop.more(2, "requests on v1")
            hot.apply("v2", {"mode": "Always"})
            wait(lambda: k8s.api.find("apps/v1", "deployments", "lmx-legal-v2"),
                 "v2 Deployment created beside v1")
            # the v2 pair is not Ready: the old route stays and v1's pair is kept
            time.sleep(2)
            assert k8s.api.find("apps/v1", "deployments", "lmx-legal-v1") is not None
            assert (hot.route() or {}).get("url") == merged_v1.url
            merged_v2 = hot.run_dedicated_pod("lmx-legal-v2")
            wait(lambda: (hot.route() or {}).get("url") == merged_v2.url
                 and hot.route()["version"] == "v2", "routed to v2 once Ready")
            wait(lambda: k8s.api.find("apps/v1", "deployments", "lmx-legal-v1") is None,
                 "the v1 pair deleted after the switch")
            assert k8s.api.find("v1", "services", "lmx-legal-v1") is None
            wait(lambda: hot.status().get("dedicatedEndpoint") == merged_v2.url,
                 "endpoint on v2")
            loop.more(3, "requests on v2")
        for status, text, routed in loop.results:
            assert status == 200, text
            if routed:
                texts.setdefault(text, 0)
                texts[text] += 1
        # two merged models answered (v1's, then v2's: a new merged model), one text each
        assert len(texts) == 2, texts
        for merged in (merged_v1, merged_v2):
            assert 'tenant="legal"' in httpx.get(f"{merged.url}/admin/metrics").text
    finally:
        hot.delete_cr()


def test_auto_mode_promotes_on_sustained_traffic_and_demotes_when_it_stops(hot: Hot) -> None:
    """Auto on tokens/s: each request here is ~12 tokens (a short prompt, 8 generated),
    so a client looping on them is well above 4 tokens/s, and silence below 1."""
    k8s = hot.k8s
    thresholds = {"mode": "Auto", "promoteAboveTokensPerSecond": 4, "promoteAfterSeconds": 3,
                  "demoteBelowTokensPerSecond": 1, "demoteAfterSeconds": 3,
                  "minDwellSeconds": 5}
    hot.apply("v1", thresholds)
    try:
        wait(lambda: hot.status().get("phase") == "Ready", "legal Ready")
        time.sleep(4)  # idle: no promotion
        assert k8s.api.find("apps/v1", "deployments", "lmx-legal-v1") is None
        assert hot.dedicated_condition().get("reason") == "NotDedicated"
        with ClientLoop(hot) as loop:
            wait(lambda: k8s.api.find("apps/v1", "deployments", "lmx-legal-v1"),
                 "promoted by sustained traffic", timeout=60)
            rate = len(loop.results)
        assert rate > 3
        wait(lambda: k8s.api.find("apps/v1", "deployments", "lmx-legal-v1") is None,
             "demoted once traffic stopped", timeout=60)
        events = k8s.api.list("v1", "events")["items"]
        messages = [e["message"] for e in events
                    if e["involvedObject"].get("name") == "legal" and e["reason"] == "Promoted"]
        assert any("tokens/s" in m for m in messages), messages
    finally:
        hot.delete_cr()


def test_the_request_rate_thresholds_are_refused_naming_the_token_fields(hot: Hot) -> None:
    """promoteAboveRps/demoteBelowRps were renamed (pre-1.0): a real API server refuses them
    (the CRD's CEL rule); where none checks (this emulator, objects stored before the
    upgrade), the operator holds the hot-tenant policy and says which field to use, while
    the adapter itself keeps being served by the pool."""
    hot.apply("v1", {"mode": "Auto", "promoteAboveRps": 5, "demoteBelowRps": 1,
                     "promoteAfterSeconds": 3, "demoteAfterSeconds": 3, "minDwellSeconds": 5})
    try:
        wait(lambda: hot.status().get("phase") == "Ready", "legal Ready on the pool")
        condition = wait(lambda: hot.dedicated_condition().get("reason") == "InvalidSpec"
                         and hot.dedicated_condition(), "Dedicated InvalidSpec")
        assert condition["status"] == "False"
        assert "use promoteAboveTokensPerSecond" in condition["message"]
        assert "use demoteBelowTokensPerSecond" in condition["message"]
        assert hot.generate().status_code == 200
        assert hot.k8s.api.find("apps/v1", "deployments", "lmx-legal-v1") is None
    finally:
        hot.delete_cr()
