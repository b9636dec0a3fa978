"""Smoke tests of the Kubernetes harness (tests/k8s_harness.py): the emulated API server with
the real kubectl binary, a real `kopf run` process, and the pod helpers. No operator needed."""

from __future__ import annotations

import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from k8s_harness import (
    CRD_PATH,
    INFERENCE_LABELS,
    K8s,
    KubeApiError,
    inference_pod,
    kopf_process,
)

LORA = ("loramux.io/v1alpha1", "loraadapters")

# Used only while crds/loraadapter.yaml does not exist yet; the real CRD wins when present.
MINIMAL_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: loraadapters.loramux.io}
spec:
  group: loramux.io
  scope: Namespaced
  names: {kind: LoraAdapter, listKind: LoraAdapterList, plural: loraadapters,
          singular: loraadapter, shortNames: [lora]}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      subresources: {status: {}}
      additionalPrinterColumns:
        - {name: Tenant, type: string, jsonPath: .spec.tenant}
        - {name: Version, type: string, jsonPath: .spec.version}
        - {name: Phase, type: string, jsonPath: .status.phase}
        - {name: Ready, type: string, jsonPath: .status.readyPods}
        - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
            status: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""


def lora_yaml(name: str, tenant: str, version: str = "v1") -> str:
    return textwrap.dedent(f"""
        apiVersion: loramux.io/v1alpha1
        kind: LoraAdapter
        metadata:
          name: {name}
          namespace: default
        spec:
          tenant: {tenant}
          version: {version}
          source:
            uri: s3://adapters/{tenant}/{version}/
          baseModel: tiny-llama
          pool:
            matchLabels:
              app.kubernetes.io/name: loramux-inference
        """)


@pytest.fixture(scope="module")
def crd(k8s: K8s) -> str:
    """The LoraAdapter CRD applied with `kubectl apply -f` (registers the resource)."""
    assert k8s.kubectl is not None
    out = k8s.kubectl.apply(CRD_PATH if CRD_PATH.exists() else MINIMAL_CRD)
    assert "loraadapters.loramux.io" in out
    return out


def test_kubectl_and_helm_binaries_run(k8s: K8s, k8s_binaries: tuple[Path, Path]) -> None:
    assert k8s.kubectl is not None
    assert "Client Version: v1.35" in k8s.kubectl("version", "--client")
    assert "Server Version" in k8s.kubectl("version")
    import subprocess

    helm = subprocess.run([str(k8s_binaries[1]), "version", "--short"], capture_output=True,
                          text=True, timeout=30, env={"HOME": "/tmp", "PATH": "/usr/bin:/bin"})
    assert helm.returncode == 0 and helm.stdout.startswith("v"), helm.stderr


def test_kubectl_apply_get_patch_delete(k8s: K8s, crd: str) -> None:
    kubectl = k8s.kubectl
    assert kubectl is not None
    assert "created" in kubectl.apply(lora_yaml("legal", "legal"))

    obj = k8s.api.get(*LORA, "legal")
    meta = obj["metadata"]
    assert meta["uid"] and meta["resourceVersion"].isdigit() and meta["generation"] == 1
    assert meta["creationTimestamp"].endswith("Z")
    assert obj["spec"]["tenant"] == "legal"

    # shortName from discovery; printer columns rendered by the server-side Table.
    k8s.api.patch_status(*LORA, "legal", {"phase": "Ready", "readyPods": "2/2"})
    table = kubectl("get", "lora")
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "TENANT", "VERSION", "PHASE", "READY", "CANARY", "WEIGHT",
                              "ROLLOUT", "AGE"]
    assert row.split()[:5] == ["legal", "legal", "v1", "Ready", "2/2"]
    assert "tenant: legal" in kubectl("get", "lora", "legal", "-o", "yaml")

    # Re-apply with a new version (kubectl's merge patch), then kubectl patch.
    assert "configured" in kubectl.apply(lora_yaml("legal", "legal", "v2"))
    assert k8s.api.get(*LORA, "legal")["metadata"]["generation"] == 2
    kubectl("patch", "lora", "legal", "--type=merge", "-p", '{"spec":{"replicas":1}}')
    obj = k8s.api.get(*LORA, "legal")
    assert obj["spec"]["replicas"] == 1 and obj["metadata"]["generation"] == 3
    assert obj["status"]["phase"] == "Ready"  # spec writes keep the status

    assert "deleted" in kubectl("delete", "lora", "legal")
    assert k8s.api.find(*LORA, "legal") is None
    assert "No resources found" in kubectl.run("get", "lora").stderr


def test_schema_defaults_and_rejections(k8s: K8s, crd: str) -> None:
    if not CRD_PATH.exists():
        pytest.skip("the minimal CRD has no schema to validate against")
    kubectl = k8s.kubectl
    assert kubectl is not None
    bad = kubectl.run("apply", "-f", "-", input=lora_yaml("bad", "Not_A_Label"), check=False)
    assert bad.returncode != 0 and "spec.tenant" in bad.stderr, bad.stderr
    assert k8s.api.find(*LORA, "bad") is None

    kubectl.apply(lora_yaml("defaults", "defaults"))
    obj = k8s.api.get(*LORA, "defaults")
    assert obj["spec"]["pinned"] is False  # schema default applied
    with pytest.raises(KubeApiError) as err:
        k8s.api.patch_status(*LORA, "defaults", {"phase": "NotAPhase"})
    assert err.value.status == 422
    k8s.api.delete(*LORA, "defaults")


def test_generation_resource_version_and_status_subresource(k8s: K8s, crd: str) -> None:
    k8s.api.create({"apiVersion": LORA[0], "kind": "LoraAdapter",
                    "metadata": {"name": "gen"},
                    "spec": {"tenant": "gen", "version": "v1", "baseModel": "m",
                             "source": {"uri": "s3://adapters/gen/v1/"}, "pool": {}},
                    "status": {"phase": "Ready"}})
    obj = k8s.api.get(*LORA, "gen")
    assert "status" not in obj  # status is set through /status only
    rv0, gen0 = int(obj["metadata"]["resourceVersion"]), obj["metadata"]["generation"]

    obj = k8s.api.patch_status(*LORA, "gen", {"phase": "Progressing"})
    assert obj["status"]["phase"] == "Progressing"
    assert obj["metadata"]["generation"] == gen0
    rv1 = int(obj["metadata"]["resourceVersion"])
    assert rv1 > rv0

    obj = k8s.api.patch(*LORA, "gen", {"metadata": {"labels": {"a": "b"}}})
    assert obj["metadata"]["generation"] == gen0  # metadata does not bump generation
    rv2 = int(obj["metadata"]["resourceVersion"])
    assert rv2 > rv1

    obj = k8s.api.patch(*LORA, "gen", {"spec": {"version": "v2"}, "status": {"phase": "Ready"}})
    assert obj["metadata"]["generation"] == gen0 + 1
    assert obj["status"]["phase"] == "Progressing"  # the main resource ignores status
    assert int(obj["metadata"]["resourceVersion"]) > rv2

    # /status ignores everything but status.
    obj = k8s.api.patch(*LORA, "gen", {"spec": {"version": "v9"}, "status": {"phase": "Ready"}},
                        subresource="status")
    assert obj["spec"]["version"] == "v2" and obj["status"]["phase"] == "Ready"

    # JSON patch with a stale resourceVersion test fails (422), as kopf relies on.
    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": str(rv0)},
             {"op": "replace", "path": "/spec/version", "value": "v3"}]
    with pytest.raises(KubeApiError) as err:
        k8s.api.patch(*LORA, "gen", stale, patch_type="json")
    assert err.value.status == 422
    # A merge patch carrying a stale resourceVersion is a 409 Conflict.
    with pytest.raises(KubeApiError) as err:
        k8s.api.patch(*LORA, "gen", {"metadata": {"resourceVersion": str(rv0)},
                                     "spec": {"version": "v3"}})
    assert err.value.status == 409
    k8s.api.delete(*LORA, "gen")


def test_finalizers_and_deletion_timestamp(k8s: K8s, crd: str) -> None:
    kubectl = k8s.kubectl
    assert kubectl is not None
    kubectl.apply(lora_yaml("fin", "fin"))
    k8s.api.patch(*LORA, "fin", {"metadata": {"finalizers": ["loramux.io/evict"]}})
    kubectl("delete", "lora", "fin", "--wait=false")
    obj = k8s.api.get(*LORA, "fin")
    assert obj["metadata"]["deletionTimestamp"]
    with pytest.raises(KubeApiError):  # no new finalizers once terminating
        k8s.api.patch(*LORA, "fin", {"metadata": {"finalizers": ["loramux.io/evict", "x/y"]}})
    k8s.api.patch(*LORA, "fin", {"metadata": {"finalizers": []}})
    assert k8s.api.find(*LORA, "fin") is None


def test_pod_label_selectors(k8s: K8s, tmp_path: Path) -> None:
    pods = [inference_pod(k8s.api, f"infer-{i}", tmp_path, with_server=False,
                          with_sidecar=False) for i in range(2)]
    other = inference_pod(k8s.api, "other", tmp_path, with_server=False, with_sidecar=False,
                          labels={"app": "other"})
    selector = ",".join(f"{k}={v}" for k, v in INFERENCE_LABELS.items())

    def names(selector: str) -> list[str]:
        return [p["metadata"]["name"]
                for p in k8s.api.list("v1", "pods", label_selector=selector)["items"]]

    assert names(selector) == ["infer-0", "infer-1"]
    assert names("app=other") == ["other"]
    assert names("app notin (other)") == ["infer-0", "infer-1"]
    assert names("!app") == ["infer-0", "infer-1"]
    assert names("app in (other,x),app") == ["other"]

    pod = k8s.api.get("v1", "pods", "infer-0")
    assert pod["status"]["podIP"] == "127.0.0.1" and pod["status"]["phase"] == "Running"
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"
    ports = {c["name"]: c["ports"][0]["name"] for c in pod["spec"]["containers"]}
    assert ports == {"server": "http", "sync": "sync"}

    pods[0].set_ready(False)
    pod = k8s.api.get("v1", "pods", "infer-0")
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "False"
    pods[1].terminate()
    assert k8s.api.get("v1", "pods", "infer-1")["metadata"]["deletionTimestamp"]
    assert "infer-1" in k8s.kubectl("get", "pods", "-l", selector)  # type: ignore[misc]
    for pod_ in (*pods, other):
        pod_.delete()
    assert names("") == []


def test_watch_streams_events_with_resource_versions(k8s: K8s) -> None:
    start_rv = k8s.api.list("v1", "secrets")["metadata"]["resourceVersion"]
    events: list[dict[str, Any]] = []

    def watch() -> None:
        for event in k8s.api.watch("v1", "secrets", resource_version=start_rv,
                                   label_selector="watched=yes", timeout_seconds=1.5):
            events.append(event)

    thread = threading.Thread(target=watch)
    thread.start()
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "w", "labels": {"watched": "yes"}}, "stringData": {"token": "abc"}}
    k8s.api.create(secret)
    k8s.api.create({**secret, "metadata": {"name": "ignored"}})
    k8s.api.patch("v1", "secrets", "w", {"metadata": {"annotations": {"x": "1"}}})
    k8s.api.patch("v1", "secrets", "w", {"metadata": {"labels": {"watched": "no"}}})
    k8s.api.patch("v1", "secrets", "w", {"metadata": {"labels": {"watched": "yes"}}})
    k8s.api.delete("v1", "secrets", "w")
    thread.join(10)

    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w"), ("ADDED", "w"), ("DELETED", "w")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs) and rvs[0] > int(start_rv)
    assert events[0]["object"]["data"] == {"token": "YWJj"}  # stringData folded into data

    # Resuming from a resourceVersion replays what happened after it.
    replay = list(k8s.api.watch("v1", "secrets", resource_version=str(rvs[2]),
                                label_selector="watched=yes", timeout_seconds=0.5))
    assert [e["type"] for e in replay] == ["ADDED", "DELETED"]
    k8s.api.delete("v1", "secrets", "ignored")


HANDLERS = '''
import kopf

@kopf.on.startup()
def configure(settings, **_):
    settings.posting.level = 0
    settings.watching.server_timeout = 30

@kopf.on.create("loramux.io", "v1alpha1", "loraadapters")
def created(spec, patch, **_):
    patch.status["phase"] = "Pending"
    patch.status["activeVersion"] = spec["version"]

@kopf.on.update("loramux.io", "v1alpha1", "loraadapters", field="spec.version")
def updated(new, patch, **_):
    patch.status["phase"] = "Progressing"
    patch.status["activeVersion"] = new

@kopf.on.delete("loramux.io", "v1alpha1", "loraadapters")
def deleted(name, **_):
    open(MARKER, "a").write(name + "\\n")
'''


def test_real_kopf_operator_create_update_delete(k8s: K8s, crd: str, tmp_path: Path) -> None:
    marker = tmp_path / "deleted.txt"
    handlers = tmp_path / "handlers.py"
    handlers.write_text(HANDLERS.replace("MARKER", repr(str(marker))))
    kopf = kopf_process(handlers, k8s.kubeconfig, tmp_path / "kopf.log").start()
    try:
        kopf.wait_for_log("watch-stream for loraadapters", timeout=20)
        assert k8s.kubectl is not None
        k8s.kubectl.apply(lora_yaml("kopfed", "kopfed"))
        obj = k8s.api.wait_for(*LORA, "kopfed", lambda o: bool(
            o and (o.get("status") or {}).get("phase") == "Pending" and o["metadata"].get(
                "finalizers")), timeout=20, what="kopf's create handler")
        assert obj["status"]["activeVersion"] == "v1"

        k8s.kubectl.apply(lora_yaml("kopfed", "kopfed", "v2"))
        k8s.api.wait_for(*LORA, "kopfed", lambda o: bool(
            o and o["status"].get("phase") == "Progressing"
            and o["status"].get("activeVersion") == "v2"), timeout=20,
            what="kopf's update handler")

        k8s.kubectl("delete", "lora", "kopfed", timeout=30)  # waits for the finalizer
        assert k8s.api.find(*LORA, "kopfed") is None
        assert marker.read_text().split() == ["kopfed"]
        assert "Traceback" not in kopf.log(), kopf.log()[-3000:]
    finally:
        kopf.stop()
    assert kopf.proc is not None and kopf.proc.returncode is not None


def test_sidecar_pod_process_restart(k8s: K8s, tmp_path: Path) -> None:
    """A pod with a real `loramux sync` process (no model server): ports in the Pod object,
    restart keeps the port and bumps restartCount."""
    pod = inference_pod(k8s.api, "sync-only", tmp_path, with_server=False)
    try:
        import httpx

        assert pod.sidecar is not None
        port = pod.sync_port
        assert httpx.get(f"{pod.sync_url}/healthz", timeout=5).status_code in (200, 503)
        obj = k8s.api.get("v1", "pods", "sync-only")
        sync = next(c for c in obj["spec"]["containers"] if c["name"] == "sync")
        assert sync["ports"][0]["containerPort"] == port
        pod.restart()
        assert pod.sidecar.starts == 2 and pod.sync_port == port
        status = k8s.api.get("v1", "pods", "sync-only")["status"]
        assert status["containerStatuses"][0]["restartCount"] == 1
        assert httpx.get(f"{pod.sync_url}/healthz", timeout=5).status_code in (200, 503)
    finally:
        pod.delete()
    assert sys.executable  # the processes ran with this interpreter
