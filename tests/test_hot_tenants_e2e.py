"""Hot tenants end to end (issue 7): promotion to a dedicated merged deployment, routing,
demotion, with real processes in the operator's harness.

- Kubernetes API: the kmock emulator over HTTP (tests/k8s_harness.py); the CRD and the
  LoraAdapter go in with the real kubectl.
- One pool "pod": a real `loramux serve` (tiny fp32 model) + `loramux sync`.
- S3: moto, the adapter published with `loramux push`'s push().
- The real `loramux operator` process with a dedicated pod template file.

What cannot exist here is simulated, and only that: no kubelet runs the dedicated
Deployment's pod, so the test runs the pod's own commands - the `fetch` init container's
`loramux fetch` args, then `loramux serve --merge-adapter` - as local processes, and then
does what the cluster would: reports the Deployment available (status patch, as the
Deployment controller would) and gives the Service a cluster IP and port that reach that
process (what kube-proxy would).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from k8s_harness import CRD_PATH, S3, K8s, OperatorProcess, inference_pod
from loramux.manifest import AdapterManifest, describe_files, write_manifest
from loramux.training.publish import push

LORA = ("loramux.io/v1alpha1", "loraadapters")
TOKEN = "hot-sidecar-token"
PROMPT = "Route me"
NAME = "lmx-legal-v1"
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


def cr_doc(mode: str) -> str:
    return json.dumps({
        "apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
        "metadata": {"name": "legal", "namespace": "default"},
        "spec": {"tenant": "legal", "version": "v1", "baseModel": "tiny-llama",
                 "source": {"uri": URI["legal"]},
                 "pool": {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}},
                 "dedicated": {"mode": mode, "replicas": 1}}})


URI: dict[str, str] = {}


def test_promotion_routing_and_demotion_without_failed_requests(
    k8s: K8s, s3_server: S3, tiny_model_dir: Path, adapter_root: Path, start_server,
    tmp_path: Path,
) -> None:
    assert k8s.kubectl is not None
    k8s.kubectl.apply(CRD_PATH)
    bucket = f"hot-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    src = tmp_path / "stage" / "legal" / "v1"
    src.parent.mkdir(parents=True)
    shutil.copytree(adapter_root / "legal" / "v1", src)
    config = json.loads((src / "adapter_config.json").read_text())
    write_manifest(src, AdapterManifest(
        tenant="legal", version="v1", base_model="tiny-llama", rank=config["r"],
        lora_alpha=float(config["lora_alpha"]), target_modules=config["target_modules"],
        files=describe_files(src)))
    URI["legal"] = f"s3://{bucket}/legal/v1/"
    push(src, URI["legal"], client=s3_server.client, progress=False)

    pod = inference_pod(k8s.api, "pool-a", tmp_path / "pods", sidecar_token=TOKEN,
                        server_args=["--model", str(tiny_model_dir), "--quantization", "none",
                                     "--log-format", "text", "--route-retry-s", "1"])
    template = tmp_path / "pod-template.yaml"
    template.write_text(yaml.safe_dump({"metadata": {"labels": {"team": "ml"}}, "spec": {
        "containers": [{"name": "server", "image": "loramux/inference:test",
                        "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}))
    operator = OperatorProcess(
        k8s.kubeconfig, tmp_path / "operator.log",
        ["--namespace", "default", "--resync-seconds", "1", "--health-port", "0",
         "--sidecar-token", TOKEN, "--dedicated-template-file", str(template)])
    operator.start()
    merged = None
    results: list[tuple[int, str, bool]] = []
    stop = threading.Event()
    try:
        operator.wait_for_log("loramux operator started", 60)
        k8s.kubectl.apply(cr_doc("Never"))
        wait(lambda: (k8s.api.find(*LORA, "legal") or {}).get("status", {}).get("phase")
             == "Ready", "legal Ready on the pool")
        local_text = httpx.post(f"{pod.server_url}/generate", timeout=60, json={
            "tenant_id": "legal", "prompt": PROMPT, "max_new_tokens": 8,
            "ignore_eos": True}).json()["text"]

        def loop() -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    r = client.post(f"{pod.server_url}/generate", json={
                        "tenant_id": "legal", "prompt": PROMPT, "max_new_tokens": 8,
                        "ignore_eos": True})
                    text = r.json().get("text", "") if r.status_code == 200 else r.text
                    results.append((r.status_code, text, "x-loramux-routed-to" in r.headers))

        client_thread = threading.Thread(target=loop, daemon=True)
        client_thread.start()

        # --- promotion: mode Always creates the pair, owned by the LoraAdapter
        k8s.kubectl.apply(cr_doc("Always"))
        cr = k8s.api.get(*LORA, "legal")
        dep = wait(lambda: k8s.api.find("apps/v1", "deployments", NAME), "Deployment created")
        svc = wait(lambda: k8s.api.find("v1", "services", NAME), "Service created")
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
        assert fetch["args"][0] == "fetch" and URI["legal"] in fetch["args"]
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        status = k8s.api.get(*LORA, "legal")["status"]
        dedicated = {c["type"]: c for c in status["conditions"]}["Dedicated"]
        assert dedicated["status"] == "False" and dedicated["reason"] == "Starting"
        assert "dedicatedEndpoint" not in status
        assert httpx.get(f"{pod.server_url}/admin/routes").json()["routes"] == []

        # --- "the kubelet": run the pod's own commands locally
        volume = tmp_path / "dedicated-volume"
        args = [a.replace("/adapters", str(volume)) for a in fetch["args"]]
        done = subprocess.run([sys.executable, "-P", "-m", "loramux.cli", *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        merge_dir = server["args"][server["args"].index("--merge-adapter") + 1]
        merged = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                              "--log-format", "text",
                              "--merge-adapter", merge_dir.replace("/adapters", str(volume)))
        merged_port = int(merged.url.rsplit(":", 1)[1])
        # ... "kube-proxy" and "the Deployment controller":
        k8s.api.patch("v1", "services", NAME, {"spec": {
            "clusterIP": "127.0.0.1",
            "ports": [{"name": "http", "port": merged_port, "targetPort": "http"}]}})
        generation = k8s.api.get("apps/v1", "deployments", NAME)["metadata"]["generation"]
        k8s.api.patch_status("apps/v1", "deployments", NAME, {
            "observedGeneration": generation, "replicas": 1, "readyReplicas": 1,
            "availableReplicas": 1, "updatedReplicas": 1})

        def routed() -> dict | None:
            routes = httpx.get(f"{pod.server_url}/admin/routes", timeout=5).json()["routes"]
            return routes[0] if routes else None

        route = wait(routed, "the pool server routes legal to the dedicated deployment")
        assert route["url"] == merged.url and route["version"] == "v1"
        status = wait(lambda: k8s.api.get(*LORA, "legal")["status"].get("dedicatedEndpoint")
                      and k8s.api.get(*LORA, "legal")["status"], "dedicatedEndpoint")
        assert status["dedicatedEndpoint"] == merged.url
        assert {c["type"]: c for c in status["conditions"]}["Dedicated"]["status"] == "True"
        wait(lambda: sum(1 for r in results if r[2]) >= 3, "requests served by the merged pod")
        # the merged pod really answered (its own request counter moved)
        assert "loramux_requests_total" in httpx.get(f"{merged.url}/metrics").text
        assert 'tenant="legal"' in httpx.get(f"{merged.url}/metrics").text

        # --- demotion: the route goes first, then the pair
        k8s.kubectl.apply(cr_doc("Never"))
        order_ok = True

        def demoted() -> bool:
            nonlocal order_ok
            route_now = routed()
            dep_now = k8s.api.find("apps/v1", "deployments", NAME)
            if dep_now is None and route_now is not None:
                order_ok = False  # deleted while still routed: would cost a fallback
            return dep_now is None and k8s.api.find("v1", "services", NAME) is None

        wait(demoted, "route removed and dedicated pair deleted", timeout=60)
        assert order_ok
        assert routed() is None
        status = wait(lambda: "dedicatedEndpoint" not in k8s.api.get(*LORA, "legal")["status"]
                      and k8s.api.get(*LORA, "legal")["status"], "endpoint cleared")
        assert {c["type"]: c for c in status["conditions"]}.get(
            "Dedicated", {}).get("status") != "True"
        count = len(results)
        wait(lambda: len(results) >= count + 3, "requests after demotion")
    finally:
        stop.set()
        if merged is not None:
            merged.stop()
        operator.stop()
        pod.stop()

    assert len(results) > 10
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:3]
    # merged (dedicated) and unmerged (pool) answers are the same text (fp32, greedy)
    assert {text for _, text, _ in results} == {local_text}
    assert any(r[2] for r in results) and not results[-1][2]
    events = k8s.api.list("v1", "events")["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"].get("name") == "legal"}
    assert {"Promoted", "Demoted"} <= reasons
