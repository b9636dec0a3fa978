"""End-to-end proof of issue 5 with real processes only.

- The Kubernetes API is the kmock emulator over HTTP (tests/k8s_harness.py), driven by the
  real ``kubectl`` binary where the issue says so.
- Two inference "pods": each a real ``loramux serve`` (tiny fp32 model) plus a real
  ``loramux sync`` with its own adapter volume, published as Pod objects (podIP 127.0.0.1,
  container ports named ``http`` and ``sync``).
- S3 is moto's server; the adapters are published with ``loramux push``.
- The operator is the real ``loramux operator`` process (kopf), resync every 2 s.

The pods, S3 and the operator are shared by the module; every test brings the LoraAdapters
it needs to the state it needs (``kubectl apply`` is idempotent) and deletes them at the end.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from factories import stage_adapter
from helpers import wait
from k8s_harness import (
    CRD_PATH,
    INFERENCE_LABELS,
    S3,
    InferencePod,
    K8s,
    OperatorProcess,
    _flag,
    inference_pod,
    pool_operator,
    start_pods,
)
from loramux.training.publish import push

LORA = ("loramux.io/v1alpha1", "loraadapters")
TOKEN = "e2e-sidecar-token"
# The trust boundary: the operator runs with --pool-owner-labels; the test pods carry it.
OWNER_LABELS = {"app.kubernetes.io/instance": "e2e"}
PROMPT = "The quick brown fox"
POD_NAMES = ("infer-a", "infer-b")
# credentialsSecret values: moto accepts any keys, so these are distinctive on purpose.
SECRET_KEY_ID = "AKIAE2EOPERATOR0001"
SECRET_VALUE = "e2e-secret-Vq93-never-print-me"

pytestmark = pytest.mark.timeout(600)


# --------------------------------------------------------------------------- helpers


def lora_yaml(name: str, tenant: str, version: str, uri: str, *, sha256: str | None = None,
              secret: str | None = None, replicas: int | None = None,
              base_model: str = "tiny-llama") -> str:
    source = {"uri": uri}
    if sha256:
        source["sha256"] = sha256
    if secret:
        source["credentialsSecret"] = secret
    spec: dict[str, Any] = {
        "tenant": tenant, "version": version, "source": source, "baseModel": base_model,
        "pool": {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}},
    }
    if replicas is not None:
        spec["replicas"] = replicas
    doc = {"apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
           "metadata": {"name": name, "namespace": "default"}, "spec": spec}
    return json.dumps(doc)


def get_lora(k8s: K8s, name: str) -> dict[str, Any] | None:
    return k8s.api.find(*LORA, name)


def status_of(k8s: K8s, name: str) -> dict[str, Any]:
    obj = get_lora(k8s, name)
    return (obj or {}).get("status") or {}


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), {})


def ready_on(k8s: K8s, name: str, version: str, pods: tuple[str, ...]) -> dict[str, Any] | None:
    """The status once phase is Ready, activeVersion is ``version`` and every one of ``pods``
    (and only those) holds exactly ``version`` Ready."""
    obj = get_lora(k8s, name)
    if obj is None:
        return None
    st = obj.get("status") or {}
    rows = st.get("placements") or []
    if (st.get("phase") == "Ready" and st.get("activeVersion") == version
            and st.get("observedGeneration") == obj["metadata"]["generation"]
            and sorted(r["pod"] for r in rows) == sorted(pods)
            and all(r["version"] == version and r["state"] == "Ready" for r in rows)):
        return st
    return None


def generate(pod: InferencePod, tenant: str) -> dict[str, Any]:
    r = httpx.post(f"{pod.server_url}/generate", json={
        "tenant_id": tenant, "prompt": PROMPT, "max_new_tokens": 8, "temperature": 0},
        timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def served(pod: InferencePod) -> set[str]:
    """tenant@version loaded on the pod's server (admin API, loopback)."""
    data = httpx.get(f"{pod.server_url}/admin/adapters", timeout=10).json()
    return {f"{a['tenant']}@{a['version']}" for a in data["adapters"]}


def volume(pod: InferencePod) -> Path:
    """The pod's adapter volume (the sidecar's --root)."""
    assert pod.sidecar is not None
    return Path(_flag(pod.sidecar, "--root"))


def sidecar(pod: InferencePod) -> httpx.Client:
    return httpx.Client(base_url=pod.sync_url, headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=10)


def sidecar_state(pod: InferencePod) -> dict[str, dict[str, Any]]:
    with sidecar(pod) as c:
        r = c.get("/v1/state")
    r.raise_for_status()
    return {f"{a['tenant']}@{a['version']}": a for a in r.json()["adapters"]}


def sidecar_desired(pod: InferencePod) -> set[str]:
    with sidecar(pod) as c:
        r = c.get("/v1/desired")
    r.raise_for_status()
    return {f"{a['tenant']}@{a['version']}" for a in r.json()["adapters"]}


def events_for(k8s: K8s, name: str) -> list[dict[str, Any]]:
    items = k8s.api.list("v1", "events")["items"]
    return [e for e in items if (e.get("involvedObject") or {}).get("name") == name
            and (e.get("involvedObject") or {}).get("kind") == "LoraAdapter"]


def reasons(k8s: K8s, name: str) -> set[tuple[str, str]]:
    return {(e.get("type"), e.get("reason")) for e in events_for(k8s, name)}


class StatusRecorder:
    """Every status a LoraAdapter goes through (a watch in a thread), for checks on the
    intermediate states of a rollout."""

    def __init__(self, k8s: K8s, name: str) -> None:
        self.k8s, self.name = k8s, name
        self.statuses: list[dict[str, Any]] = []
        obj = get_lora(k8s, name)
        assert obj is not None
        self.rv = obj["metadata"]["resourceVersion"]
        self.statuses.append(obj.get("status") or {})
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for event in self.k8s.api.watch(*LORA, resource_version=self.rv,
                                            timeout_seconds=1):
                obj = event["object"]
                self.rv = obj["metadata"]["resourceVersion"]
                if obj["metadata"]["name"] == self.name:
                    self.statuses.append(obj.get("status") or {})

    def close(self) -> list[dict[str, Any]]:
        self.stop.set()
        self.thread.join(15)
        return self.statuses


def delete_lora(k8s: K8s, *names: str) -> None:
    """``kubectl delete`` (waits for the finalizer), then make sure each object is gone."""
    assert k8s.kubectl is not None
    for name in names:
        if get_lora(k8s, name) is not None:
            k8s.kubectl("delete", "lora", name, "--ignore-not-found", "--timeout=60s",
                        timeout=90)
    for name in names:
        wait(lambda n=name: get_lora(k8s, n) is None, f"LoraAdapter {name} gone", 60)


# --------------------------------------------------------------------------- fixtures


def stage(adapter_root: Path, staging: Path, tenant: str, version: str,
          files_of: str | None = None) -> Path:
    """A copy of the session's adapter (``files_of``: another version's files) with its
    manifest, ready for `loramux push`."""
    return stage_adapter(adapter_root, staging, tenant, version, files_of=files_of)[0]


@pytest.fixture(scope="module")
def published(s3_server: S3, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Any]:
    """legal@v1 and legal@v2 through the real `loramux push` CLI (two processes at once);
    the other tenants through the same code as a function."""
    bucket = f"e2e-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    staging = tmp_path_factory.mktemp("stage")
    uris: dict[str, str] = {}
    digests: dict[str, str] = {}
    procs = {}
    for ref in ("legal@v1", "legal@v2"):
        tenant, version = ref.split("@")
        uris[ref] = f"s3://{bucket}/pub/{tenant}/{version}/"
        procs[ref] = subprocess.Popen(
            [sys.executable, "-P", "-m", "loramux.cli", "push",
             str(stage(adapter_root, staging, tenant, version)), uris[ref],
             "--endpoint-url", s3_server.endpoint, "--no-progress"],
            env={**os.environ, **s3_server.env}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    for ref, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        digests[ref] = err.rsplit("manifest sha256 ", 1)[1].split()[0]
    for ref in ("medical@v1", "finance@v1", "retail@v1", "support@v1", "travel@v1"):
        tenant, version = ref.split("@")
        uris[ref] = f"s3://{bucket}/pub/{tenant}/{version}/"
        digests[ref] = push(stage(adapter_root, staging, tenant, version), uris[ref],
                            client=s3_server.client, progress=False).manifest_sha256
    # legal@v4: a good push whose weights object is then corrupted in the bucket.
    uris["legal@v4"] = f"s3://{bucket}/pub/legal/v4/"
    push(stage(adapter_root, staging, "legal", "v4", files_of="v2"), uris["legal@v4"],
         client=s3_server.client, progress=False)
    s3_server.client.put_object(Bucket=bucket, Key="pub/legal/v4/adapter_model.safetensors",
                                Body=b"\0corrupted" * 1024)
    return {"bucket": bucket, "uris": uris, "digests": digests}


@pytest.fixture(scope="module")
def crd(k8s: K8s) -> None:
    assert k8s.kubectl is not None
    assert "loraadapters.loramux.io" in k8s.kubectl.apply(CRD_PATH)


@pytest.fixture(scope="module")
def pods(k8s: K8s, crd: None, s3_server: S3, tiny_model_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, InferencePod]]:
    """Two pods, their servers started at the same time (the model load dominates)."""
    workdir = tmp_path_factory.mktemp("pods")
    args = ["--model", str(tiny_model_dir), "--quantization", "none", "--log-format", "text"]
    made = {name: inference_pod(k8s.api, name, workdir, server_args=args,
                                sidecar_token=TOKEN, start=False,
                                labels={**INFERENCE_LABELS, **OWNER_LABELS})
            for name in POD_NAMES}
    errors = start_pods(made.values())
    try:
        assert not errors, errors
        yield made
    finally:
        for pod in made.values():
            pod.stop()


@pytest.fixture(scope="module")
def operator(k8s: K8s, pods: dict[str, InferencePod],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    # debug: the secret-leak check reads the most there is
    with pool_operator(k8s.kubeconfig, log, TOKEN, OWNER_LABELS, "--delete-timeout-seconds",
                       "60", "--log-level", "debug", resync_seconds=2) as proc:
        yield proc


@pytest.fixture(scope="module")
def secret(k8s: K8s, s3_server: S3) -> str:
    """A credentialsSecret for moto (any key is accepted), with distinctive values."""
    name = "s3-creds"
    data = {"AWS_ACCESS_KEY_ID": SECRET_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_VALUE,
            "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server.endpoint}
    k8s.api.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": name, "namespace": "default"},
                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
    return name


@pytest.fixture(scope="module")
def base_text(pods: dict[str, InferencePod]) -> str:
    texts = {generate(p, "tiny-llama")["text"] for p in pods.values()}
    assert len(texts) == 1, texts  # same model, greedy: the same text on both pods
    return texts.pop()


@pytest.fixture
def env(k8s: K8s, pods: dict[str, InferencePod], operator: OperatorProcess,
        published: dict[str, Any], secret: str) -> Iterator[Env]:
    e = Env(k8s, pods, operator, published, secret)
    yield e
    delete_lora(k8s, *e.created)


class Env:
    def __init__(self, k8s: K8s, pods: dict[str, InferencePod], operator: OperatorProcess,
                 published: dict[str, Any], secret: str) -> None:
        self.k8s, self.pods, self.operator = k8s, pods, operator
        self.published, self.secret = published, secret
        self.created: list[str] = []
        assert k8s.kubectl is not None
        self.kubectl = k8s.kubectl

    def apply(self, name: str, ref: str, **kwargs: Any) -> str:
        tenant, version = ref.split("@")
        uri = kwargs.pop("uri", None) or self.published["uris"][ref]
        out = self.kubectl.apply(lora_yaml(name, tenant, version, uri, **kwargs))
        if name not in self.created:
            self.created.append(name)
        return out

    def ready(self, name: str, version: str, pods: tuple[str, ...] = POD_NAMES,
              timeout: float = 60) -> dict[str, Any]:
        return wait(lambda: ready_on(self.k8s, name, version, pods),
                    f"{name} Ready with {version} on {pods}", timeout)


# --------------------------------------------------------------------------- scenarios


def test_kubectl_apply_ready_on_both_pods_and_generate(env: Env, base_text: str) -> None:
    out = env.apply("legal", "legal@v1", secret=env.secret)
    assert "loraadapter.loramux.io/legal created" in out, out
    status = env.ready("legal", "v1")
    digest = env.published["digests"]["legal@v1"]
    assert {r["digest"] for r in status["placements"]} == {digest}
    assert status["readyPods"] == "2/2"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Validated": "True", "Synced": "True", "Ready": "True"}
    for pod in env.pods.values():
        out = generate(pod, "legal")
        assert out["version"] == "v1" and out["tenant_id"] == "legal"
        assert out["text"] != base_text
        # The operator resolved the Secret and handed it to the sidecar with the entry.
        assert sidecar_state(pod)["legal@v1"]["credentials_source"] == "entry"
    assert ("Normal", "Ready") in wait(lambda: reasons(env.k8s, "legal"), "a Ready event")


def test_printer_columns(env: Env) -> None:
    env.apply("legal", "legal@v1", secret=env.secret)
    env.ready("legal", "v1")
    table = env.kubectl("get", "lora")
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "TENANT", "VERSION", "PHASE", "READY", "CANARY",
                                "WEIGHT", "ROLLOUT", "AGE"], table
    # no canary: its three cells are blank, so the row splits into the other six
    row = next(line.split() for line in lines[1:] if line.split()[0] == "legal")
    assert row[:5] == ["legal", "legal", "v1", "Ready", "2/2"], table
    assert row[5][-1] in "sm" and row[5][:-1].isdigit(), table  # e.g. 12s
    wide = env.kubectl("get", "lora", "legal", "-o", "jsonpath={.status.phase}")
    assert wide == "Ready"


def test_version_bump_rolls_out_without_failed_requests(env: Env) -> None:
    env.apply("legal", "legal@v1", secret=env.secret)
    env.ready("legal", "v1")
    v1_text = {generate(p, "legal")["text"] for p in env.pods.values()}
    assert len(v1_text) == 1
    seen: list[tuple[str, int, str | None, str]] = []
    stop = threading.Event()

    def loop(pod: InferencePod) -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"{pod.server_url}/generate", json={
                        "tenant_id": "legal", "prompt": PROMPT, "max_new_tokens": 8,
                        "temperature": 0})
                except httpx.HTTPError as exc:
                    seen.append((pod.name, 0, None, repr(exc)))
                    continue
                body = r.json() if r.status_code == 200 else {}
                seen.append((pod.name, r.status_code, body.get("version"),
                             body.get("text", r.text)))

    threads = [threading.Thread(target=loop, args=(p,), daemon=True)
               for p in env.pods.values()]
    for t in threads:
        t.start()
    recorder = StatusRecorder(env.k8s, "legal")
    try:
        wait(lambda: {s[0] for s in seen} == set(POD_NAMES), "requests on both pods", 30)
        env.kubectl("patch", "lora", "legal", "--type=merge", "-p",
                    json.dumps({"spec": {"version": "v2", "source": {
                        "uri": env.published["uris"]["legal@v2"]}}}))
        status = env.ready("legal", "v2", timeout=90)
        wait(lambda: all("legal@v1" not in served(p) for p in env.pods.values()),
             "v1 evicted from both servers", 30)
        count = len(seen)
        wait(lambda: len(seen) >= count + 4, "requests after the rollout", 30)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        history = recorder.close()
    assert status["activeVersion"] == "v2"
    # every placement reports the digest the sidecar verified for v2
    v2_digest = env.published["digests"]["legal@v2"]
    wait(lambda: {r.get("digest") for r in (get_lora(env.k8s, "legal") or {}).get(
        "status", {}).get("placements", [])} == {v2_digest}, "v2 digests in the placements", 20)
    # Progress per pod: while v2 loaded, both versions were listed and v1 kept serving.
    actives = [(h.get("phase"), h.get("activeVersion")) for h in history]
    assert all(a in ("v1", "v2") for _, a in actives), json.dumps([
        (h.get("phase"), h.get("activeVersion"), h.get("placements")) for h in history])
    both = [h for h in history if {r["version"] for r in h.get("placements") or []}
            == {"v1", "v2"}]
    assert both, actives
    for h in both:
        old = [r for r in h["placements"] if r["version"] == "v1"]
        assert all(r["active"] for r in old) or h["phase"] == "Ready", h
    failed = [s for s in seen if s[1] != 200]
    assert not failed, failed[:5]
    v2_text = {generate(p, "legal")["text"] for p in env.pods.values()}
    assert len(v2_text) == 1 and v2_text != v1_text
    expected = {"v1": v1_text.pop(), "v2": v2_text.pop()}
    wrong = [s for s in seen if s[2] not in expected or s[3] != expected[s[2]]]
    assert not wrong, wrong[:5]
    for name in POD_NAMES:
        versions = [s[2] for s in seen if s[0] == name]
        assert versions[0] == "v1" and versions[-1] == "v2", versions  # a real cutover
    for pod in env.pods.values():
        assert {r for r in served(pod) if r.startswith("legal@")} == {"legal@v2"}
        assert not (volume(pod) / "legal" / "v1").exists()
    assert ("Normal", "Activated") in reasons(env.k8s, "legal")


def test_bad_version_degrades_and_old_keeps_serving(env: Env) -> None:
    env.apply("legal", "legal@v2", secret=env.secret)
    env.ready("legal", "v2")
    v2_text = generate(env.pods["infer-a"], "legal")["text"]
    # v3 pins the digest of another version: the sidecar must refuse it.
    wrong_digest = env.published["digests"]["legal@v1"]
    env.apply("legal", "legal@v3", uri=env.published["uris"]["legal@v2"], sha256=wrong_digest,
              secret=env.secret)

    def degraded() -> dict[str, Any] | None:
        st = status_of(env.k8s, "legal")
        rows = [r for r in st.get("placements") or [] if r["version"] == "v3"]
        if (st.get("phase") == "Degraded" and len(rows) == 2
                and all(r["state"] == "Failed" for r in rows)):
            return st
        return None

    status = wait(degraded, "legal Degraded with v3 Failed on both pods", 60)
    ready = condition(status, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "VersionFailed", ready
    assert "v2 keeps serving" in ready["message"], ready
    assert status["activeVersion"] == "v2"
    for row in status["placements"]:
        if row["version"] == "v3":
            assert "digest" in row["reason"].lower() or "sha256" in row["reason"].lower(), row
        else:
            assert row == {**row, "version": "v2", "state": "Ready", "active": True}, row
    for pod in env.pods.values():
        for _ in range(3):
            out = generate(pod, "legal")
            assert (out["version"], out["text"]) == ("v2", v2_text)
        assert "legal@v3" not in served(pod)
    assert ("Warning", "Degraded") in wait(lambda: reasons(env.k8s, "legal"),
                                           "a Degraded event")
    # Back to v2: healthy again.
    env.apply("legal", "legal@v2", secret=env.secret)
    env.ready("legal", "v2")

    # A corrupted object (no digest pin): legal@v4's weights were overwritten after the push.
    env.apply("legal", "legal@v4", secret=env.secret)

    def degraded_v4() -> dict[str, Any] | None:
        st = status_of(env.k8s, "legal")
        rows = [r for r in st.get("placements") or [] if r["version"] == "v4"]
        if (st.get("phase") == "Degraded" and len(rows) == 2
                and all(r["state"] == "Failed" for r in rows)):
            return st
        return None

    status = wait(degraded_v4, "legal Degraded with the corrupted v4 Failed", 60)
    assert status["activeVersion"] == "v2"
    for row in status["placements"]:
        if row["version"] == "v4":
            assert "adapter_model.safetensors" in row["reason"], row
    for pod in env.pods.values():
        out = generate(pod, "legal")
        assert (out["version"], out["text"]) == ("v2", v2_text)
        assert "legal@v4" not in served(pod)
    env.apply("legal", "legal@v2", secret=env.secret)
    env.ready("legal", "v2")


def test_kubectl_delete_evicts_everywhere(env: Env) -> None:
    env.apply("legal", "legal@v1", secret=env.secret)
    env.ready("legal", "v1")
    for pod in env.pods.values():
        assert "legal@v1" in served(pod)
    out = env.kubectl("delete", "lora", "legal", "--timeout=60s", timeout=90)
    assert 'loraadapter.loramux.io "legal" deleted' in out, out
    # kubectl waited for the finalizer: by now the object is gone and the pods hold nothing.
    assert get_lora(env.k8s, "legal") is None
    for pod in env.pods.values():
        assert not any(r.startswith("legal@") for r in served(pod)), served(pod)
        assert not any(r.startswith("legal@") for r in sidecar_desired(pod))
        wait(lambda p=pod: not (volume(p) / "legal").exists()
             or not any((volume(p) / "legal").iterdir()), f"files gone on {pod.name}", 20)
    assert ("Normal", "Evicted") in reasons(env.k8s, "legal")


def test_restarted_pod_gets_its_adapters_back(env: Env) -> None:
    env.apply("medical", "medical@v1")
    env.ready("medical", "v1")
    pod = env.pods["infer-a"]
    expected = generate(pod, "medical")
    pod.restart()  # new server process (empty), new sidecar process, same volume
    wait(lambda: "medical@v1" in served(pod), "medical back on the restarted server", 90)
    out = generate(pod, "medical")
    assert (out["version"], out["text"]) == ("v1", expected["text"])
    assert sidecar_desired(pod) == {"medical@v1"}
    env.ready("medical", "v1")


def test_operator_restart_converges(env: Env, k8s: K8s) -> None:
    env.apply("medical", "medical@v1")
    env.ready("medical", "v1")
    pod_b = env.pods["infer-b"]
    env.operator.stop()
    try:
        # While the operator is down: a pod loses its adapters, and a new CR appears.
        with sidecar(pod_b) as c:
            assert c.put("/v1/desired", json={"adapters": []}).status_code == 202
        wait(lambda: "medical@v1" not in served(pod_b), "medical evicted from infer-b", 30)
        env.apply("retail", "retail@v1")
        time.sleep(1)
        assert not status_of(k8s, "retail"), "no operator: nobody should write a status"
    finally:
        env.operator.start()
    env.operator.wait_for_log("loramux operator started", 60)
    env.ready("retail", "v1")
    env.ready("medical", "v1")
    for pod in env.pods.values():
        assert {"medical@v1", "retail@v1"} <= served(pod)
        assert generate(pod, "retail")["version"] == "v1"


def test_passes_read_the_watches_not_a_list_of_the_world(env: Env, k8s: K8s) -> None:
    """Issue 17: a change to one resource does not make the operator list every LoraAdapter
    and pod again. kopf's watches feed the operator's index (operator/index.py); the
    operator's own client (the kubernetes package, User-Agent ``OpenAPI-Generator``) lists
    only at start and every ``--relist-seconds`` (default 300 s, longer than this test)."""
    env.apply("legal", "legal@v1")
    env.ready("legal", "v1")

    def operator_lists() -> dict[str, int]:
        counts = k8s.emulator.list_requests
        return {plural: counts[(plural, "OpenAPI-Generator")]
                for plural in ("loraadapters", "pods")}

    before = operator_lists()
    assert before["loraadapters"] >= 1 and before["pods"] >= 1, before  # the first pass
    env.apply("retail", "retail@v1")  # a new resource: a pass from the watch event
    env.ready("retail", "v1")
    env.apply("legal", "legal@v1", replicas=1)  # a spec change of another one
    env.ready("legal", "v1", ("infer-a",))
    wait(lambda: "legal@v1" not in served(env.pods["infer-b"]), "legal gone from infer-b", 30)
    time.sleep(5)  # and a few 2 s resync passes on top
    assert operator_lists() == before
    # kopf's watches are what delivered the changes: they listed once and kept streaming.
    assert k8s.emulator.list_requests[("loraadapters", "kopf")] >= 1


def test_replicas_one_least_adapters_and_moves_when_pod_goes(env: Env) -> None:
    env.apply("support", "support@v1", replicas=1)
    env.ready("support", "v1", ("infer-a",))  # a tie (0 adapters each): by name
    env.apply("finance", "finance@v1", replicas=1)
    env.ready("finance", "v1", ("infer-b",))  # leastAdapters: infer-a holds one already
    assert "finance@v1" in served(env.pods["infer-b"])
    assert "finance@v1" not in served(env.pods["infer-a"])
    assert "support@v1" not in served(env.pods["infer-b"])

    pod_b = env.pods["infer-b"]
    pod_b.terminate()  # deletionTimestamp set: no longer a target
    try:
        env.ready("finance", "v1", ("infer-a",), timeout=60)
        assert "finance@v1" in served(env.pods["infer-a"])
        assert generate(env.pods["infer-a"], "finance")["version"] == "v1"
    finally:
        pod_b.delete(stop=False)  # the object goes; the processes stay for the next pod
        pod_b.publish()  # the "new" pod with the same name
    # infer-b is back, empty of finance: the placement stays put (stability), and the
    # operator drops finance from infer-b's sidecar.
    wait(lambda: "finance@v1" not in served(pod_b), "finance evicted from the new infer-b", 30)
    st = env.ready("finance", "v1", ("infer-a",))
    assert [r["pod"] for r in st["placements"]] == ["infer-a"]


def test_duplicate_tenant_and_base_model_mismatch_are_rejected(env: Env) -> None:
    env.apply("travel-a", "travel@v1")
    env.ready("travel-a", "v1")
    env.apply("travel-b", "travel@v9", uri=env.published["uris"]["travel@v1"])
    env.apply("wrong-base", "retail@v1", base_model="some-70b-model")

    def rejected(name: str, reason: str) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            st = status_of(env.k8s, name)
            cond = condition(st, "Validated")
            return st if cond.get("status") == "False" and cond.get("reason") == reason \
                else None
        return check

    dup = wait(rejected("travel-b", "DuplicateTenant"), "travel-b rejected", 30)
    assert dup["phase"] == "Failed" and dup["placements"] == []
    assert "travel-a" in condition(dup, "Validated")["message"]
    bad = wait(rejected("wrong-base", "BaseModelMismatch"), "wrong-base rejected", 30)
    assert bad["phase"] == "Failed" and "some-70b-model" in condition(bad, "Validated")["message"]
    time.sleep(2.5)  # at least one more resync: still nothing on the pods
    for pod in env.pods.values():
        desired = sidecar_desired(pod)
        assert "travel@v1" in desired and "travel@v9" not in desired, desired
        assert not any(r.startswith("retail@") for r in desired | served(pod))
    assert ready_on(env.k8s, "travel-a", "v1", POD_NAMES) is not None  # the older one wins
    assert ("Warning", "DuplicateTenant") in reasons(env.k8s, "travel-b")
    assert ("Warning", "BaseModelMismatch") in reasons(env.k8s, "wrong-base")


def test_no_secret_in_status_events_or_operator_log(env: Env, k8s: K8s) -> None:
    env.apply("legal", "legal@v1", secret=env.secret)
    env.ready("legal", "v1")
    for pod in env.pods.values():
        assert sidecar_state(pod)["legal@v1"]["credentials_source"] == "entry"
    everything = json.dumps(k8s.api.list(*LORA)) + json.dumps(k8s.api.list("v1", "events"))
    log = env.operator.log()
    assert "loramux operator started" in log
    for value in (SECRET_VALUE, SECRET_KEY_ID, base64.b64encode(SECRET_VALUE.encode()).decode()):
        assert value not in everything
        assert value not in log


def test_a_pod_the_install_does_not_own_gets_nothing(env: Env, k8s: K8s) -> None:
    """A pod that spec.pool selects but that lacks the install's owner label: no request at
    all (so no token, no credentials), and the LoraAdapter's status says why."""
    import http.server

    seen: list[tuple[str, str | None]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("authorization")))
            self.send_response(500)
            self.end_headers()

        do_PUT = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    listener = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    port = listener.server_address[1]
    stranger = InferencePod(k8s.api, "stranger", labels=dict(INFERENCE_LABELS), dummy_port=port)
    try:
        stranger.publish()
        env.apply("legal", "legal@v1", secret=env.secret)
        env.ready("legal", "v1")

        def trusted() -> dict[str, Any] | None:
            status = k8s.api.get(*LORA, "legal").get("status") or {}
            return next((c for c in status.get("conditions") or []
                         if c["type"] == "PoolTrusted"), None)

        condition = wait(trusted, "PoolTrusted condition")
        assert condition["status"] == "False" and condition["reason"] == "UntrustedPods"
        assert "stranger: lacks the install's label(s) app.kubernetes.io/instance=e2e" in (
            condition["message"])
        status = k8s.api.get(*LORA, "legal")["status"]
        assert sorted(p["pod"] for p in status["placements"]) == sorted(POD_NAMES)
        assert seen == []
    finally:
        stranger.delete(stop=False)
        listener.shutdown()


def test_every_test_cleaned_up(k8s: K8s, pods: dict[str, InferencePod]) -> None:
    assert k8s.api.list(*LORA)["items"] == []
    for pod in pods.values():
        wait(lambda p=pod: not sidecar_desired(p), f"{pod.name} empty", 20)
