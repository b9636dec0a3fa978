"""End-to-end proof of progressive delivery (``spec.canary``), with real processes.

- The Kubernetes API is the kmock emulator over HTTP (tests/k8s_harness.py); ``kubectl`` is
  the real binary. S3 is moto's server; versions are pushed with ``loramux push``'s code.
- Two inference "pods": each a real ``loramux serve`` (tiny fp32 model) and a real
  ``loramux sync``. The servers run with ``LORAMUX_TEST_FAULTS=prefill:legal@v3``: the hook
  that makes version v3 of ``legal`` fail every generation (a bad fine-tune, as far as its
  clients can tell), and nothing else.
- The operator is the real ``loramux operator`` process, resync every second.

A client loop sends bare ``legal`` requests (OpenAI completions with a fresh ``user`` each,
and ``/generate`` with a fresh ``X-Loramux-Split-Key`` each) to a random pod, no retries,
while a watcher records each server's canary weight (``GET /admin/adapters``) over time.
Each request is attributed to the weight its server had for its whole lifetime.

1. A good canary (v1 -> v2) walks 10% -> 50% -> 100% and is promoted: zero failed
   requests, and at each step the share answered by v2 lies within a binomial bound of the
   weight.
2. A bad canary (v2 -> v3) is rolled back by the analysis at its first step: the resource is
   Degraded with the measured figures and an Event, v3 is evicted, and the only failed
   requests are the ones v3 itself answered; the stable version never failed one.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import uuid
from collections.abc import Iterator
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
    pool_operator,
    table_rows,
)
from k8s_harness import inference_pod as make_pod

LORA = ("loramux.io/v1alpha1", "loraadapters")
TOKEN = "canary-sidecar-token"
OWNER_LABELS = {"app.kubernetes.io/instance": "canary"}
PODS = ("infer-a", "infer-b")
BAD = "prefill:legal@v3"
ANALYSIS = {"intervalSeconds": 4, "minRequests": 10, "maxErrorRate": 0.01,
            "maxTtftP99Ratio": 3, "maxLatencyP99Ratio": 3, "minLatencyDeltaSeconds": 1.0}
pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def uris(s3_server: S3, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, str]:
    """legal v1, v2 and v3 pushed (v3 carries v1's files: it is bad only through the hook)."""
    from loramux.training.publish import push

    s3_server.create_bucket("canary")
    staging = tmp_path_factory.mktemp("stage")
    out = {}
    for version, files in (("v1", "v1"), ("v2", "v2"), ("v3", "v1")):
        out[version] = f"s3://canary/pub/legal/{version}/"
        src, _ = stage_adapter(adapter_root, staging, "legal", version, files_of=files)
        push(src, out[version], client=s3_server.client, progress=False)
    return out


@pytest.fixture(scope="module")
def pods(k8s: K8s, s3_server: S3, tiny_model_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, InferencePod]]:
    assert k8s.kubectl is not None
    k8s.kubectl.apply(CRD_PATH)
    workdir = tmp_path_factory.mktemp("pods")
    made: dict[str, InferencePod] = {}
    try:
        for name in PODS:
            made[name] = make_pod(
                k8s.api, name, workdir, sidecar_token=TOKEN,
                labels={**INFERENCE_LABELS, **OWNER_LABELS},
                server_env={"LORAMUX_TEST_FAULTS": BAD},
                server_args=["--model", str(tiny_model_dir), "--quantization", "none",
                             "--log-format", "text"])
        yield made
    finally:
        for pod in made.values():
            pod.stop()


@pytest.fixture(scope="module")
def operator(k8s: K8s, pods: dict[str, InferencePod],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with pool_operator(k8s.kubeconfig, log, TOKEN, OWNER_LABELS) as proc:
        yield proc


def lora(version: str, uri: str, canary: dict[str, Any] | None = None) -> str:
    spec: dict[str, Any] = {
        "tenant": "legal", "version": version, "source": {"uri": uri},
        "baseModel": "tiny-llama",
        "pool": {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}}}
    if canary is not None:
        spec["canary"] = canary
    return json.dumps({"apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
                       "metadata": {"name": "legal", "namespace": "default"}, "spec": spec})


def obj(k8s: K8s) -> dict[str, Any]:
    return k8s.api.get(*LORA, "legal")


def served(pod: InferencePod) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{pod.server_url}/admin/adapters", timeout=10)
    return {a["version"]: a for a in r.json()["adapters"] if a["tenant"] == "legal"}


class Traffic:
    """The client loop, and a watcher of each server's canary weight."""

    def __init__(self, pods: dict[str, InferencePod], k8s: K8s, clients: int = 3) -> None:
        self.pods = pods
        self.k8s = k8s
        self.lock = threading.Lock()
        self.results: list[dict[str, Any]] = []
        # pod -> (asked at, answered at, weight, canary version)
        self.weights: dict[str, list[tuple[float, float, int | None, str | None]]] = {
            p: [] for p in pods}
        self.kubectl_lines: list[str] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(clients)]
        self.threads.append(threading.Thread(target=self._watch, daemon=True))

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(60)

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        with httpx.Client(timeout=60) as client:
            while not self.stop_event.is_set():
                pod = rng.choice(PODS)
                url = self.pods[pod].server_url
                key = uuid.uuid4().hex
                started = time.monotonic()
                try:
                    if n % 2:
                        r = client.post(f"{url}/v1/completions", json={
                            "model": "legal", "prompt": "Hello", "max_tokens": 2,
                            "temperature": 0, "user": key})
                    else:
                        r = client.post(f"{url}/generate", headers={
                            "X-Loramux-Split-Key": key}, json={
                            "tenant_id": "legal", "prompt": "Hello", "max_new_tokens": 2})
                    body = r.json() if r.status_code == 200 else {}
                    adapter = body.get("adapter") or r.headers.get("x-loramux-adapter")
                    result = {"status": r.status_code, "adapter": adapter,
                              "error": None if r.status_code == 200 else r.text[:200]}
                except httpx.HTTPError as exc:
                    result = {"status": 0, "adapter": None, "error": repr(exc)}
                result.update(pod=pod, started=started, ended=time.monotonic())
                n += 1
                with self.lock:
                    self.results.append(result)

    def _watch(self) -> None:
        last_kubectl = 0.0
        while not self.stop_event.is_set():
            for name, pod in self.pods.items():
                asked = time.monotonic()
                try:
                    views = served(pod)
                except httpx.HTTPError:
                    continue
                canary = [(v, a["weight"]) for v, a in views.items()
                          if a.get("weight") is not None]
                version, weight = canary[0] if canary else (None, None)
                with self.lock:
                    self.weights[name].append((asked, time.monotonic(), weight, version))
            if time.monotonic() - last_kubectl > 1.0:
                last_kubectl = time.monotonic()
                line = self.k8s.kubectl("get", "lora").splitlines()
                with self.lock:
                    self.kubectl_lines.append("\n".join(line))
            time.sleep(0.1)

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def by_weight(self) -> dict[tuple[int | None, str | None], list[dict[str, Any]]]:
        """Requests whose server had one (weight, canary) from before it started until after
        it ended, grouped by that weight. A sample's state was read somewhere between when
        it was asked and when it answered: "before" samples answered before the request
        started, "after" samples were asked after it ended."""
        out: dict[tuple[int | None, str | None], list[dict[str, Any]]] = {}
        with self.lock:
            results = list(self.results)
            weights = {p: list(w) for p, w in self.weights.items()}
        for result in results:
            samples = weights[result["pod"]]
            before = [s for s in samples if s[1] <= result["started"]]
            after = [s for s in samples if s[0] >= result["ended"]]
            if not before or not after:
                continue
            during = [s for s in samples if before[-1][0] <= s[0] <= after[0][0]]
            states = {(s[2], s[3]) for s in during}
            if len(states) == 1:
                out.setdefault(states.pop(), []).append(result)
        return out


def within_binomial(n: int, k: int, weight: int) -> bool:
    p = weight / 100
    return abs(k - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1


def events(k8s: K8s) -> list[dict[str, Any]]:
    return [e for e in k8s.api.list("v1", "events")["items"]
            if (e.get("involvedObject") or {}).get("name") == "legal"]


def test_a_good_canary_walks_its_steps_under_load_and_is_promoted(
        k8s: K8s, pods: dict[str, InferencePod], operator: OperatorProcess,
        uris: dict[str, str]) -> None:
    assert k8s.kubectl is not None
    k8s.kubectl.apply(lora("v1", uris["v1"]))
    wait(lambda: obj(k8s).get("status", {}).get("phase") == "Ready"
         and all("v1" in served(p) for p in pods.values()), "legal@v1 Ready on both pods", 90)
    with Traffic(pods, k8s) as traffic:
        wait(lambda: traffic.count() >= 20, "traffic before the canary", 30)
        k8s.kubectl.apply(lora("v1", uris["v1"], {
            "version": "v2", "source": {"uri": uris["v2"]}, "steps": [10, 50, 100],
            "analysis": ANALYSIS}))
        progressing = wait(lambda: (obj(k8s).get("status", {}).get("canary") or {}).get(
            "phase") == "Progressing" and obj(k8s), "the canary Progressing", 90)
        assert progressing["status"]["canary"]["weight"] == 10
        # tenant@version still pins a version, whatever the split says
        for version in ("v1", "v2"):
            for _ in range(5):
                r = httpx.post(f"{pods['infer-b'].server_url}/generate", timeout=30, json={
                    "tenant_id": f"legal@{version}", "prompt": "Hi", "max_new_tokens": 1})
                assert r.status_code == 200 and r.json()["adapter"] == f"legal@{version}"
        # Per-version series on the per-tenant metrics endpoint while both versions serve.
        def scrape() -> str | None:
            text = httpx.get(f"{pods['infer-a'].server_url}/admin/metrics", timeout=10).text
            return text if 'role="canary"' in text else None

        metrics = wait(scrape, "per-version metrics", 30)
        for version, role in (("v2", "canary"), ("v1", "stable")):
            # (the exposition format sorts labels by name)
            labels = f'role="{role}",tenant="legal",version="{version}"'
            assert f'loramux_version_requests_total{{outcome="ok",{labels}}}' in metrics
            assert f'loramux_version_ttft_seconds_bucket{{le="+Inf",{labels}}}' in metrics
        promoted = wait(lambda: obj(k8s)["spec"]["version"] == "v2" and obj(k8s),
                        "the canary promoted into spec.version", 180)
        assert "canary" not in promoted["spec"]
        assert promoted["spec"]["source"]["uri"] == uris["v2"]
        wait(lambda: all(set(served(p)) == {"v2"} for p in pods.values()),
             "v1 drained and evicted from both pods", 60)
        done = wait(lambda: (st := obj(k8s)["status"]).get("canary", {}).get("phase")
                    == "Promoted" and st.get("activeVersion") == "v2" and st, "Promoted", 60)
        count = traffic.count()
        wait(lambda: traffic.count() >= count + 20, "traffic after the promotion", 30)
    results = traffic.results
    failed = [r for r in results if r["status"] != 200]
    assert not failed, failed[:5]
    assert {r["adapter"] for r in results} == {"legal@v1", "legal@v2"}
    assert all(r["adapter"] == "legal@v2" for r in results[-10:])

    # The share each version answered at each step lies within a binomial bound.
    groups = traffic.by_weight()
    for weight in (10, 50, 100):
        group = groups.get((weight, "v2"), [])
        assert len(group) >= 10, (weight, {k: len(v) for k, v in groups.items()})
        k = sum(1 for r in group if r["adapter"] == "legal@v2")
        print(f"weight {weight}%: {k}/{len(group)} requests answered by v2")
        assert within_binomial(len(group), k, weight), (weight, len(group), k)
    # Weight 0 (loaded, no share yet): the stable version answered everything.
    assert all(r["adapter"] == "legal@v1" for r in groups.get((0, "v2"), []))

    history = done["canary"]["history"]
    assert [(h["weight"], h["result"]) for h in history] == [
        (10, "Passed"), (50, "Passed"), (100, "Passed")]
    assert all(h["requests"] >= ANALYSIS["minRequests"] and h["errors"] == 0
               for h in history)
    reasons = [e["reason"] for e in events(k8s)]
    for reason in ("CanaryLoading", "CanaryStarted", "CanaryPromoted"):
        assert reason in reasons, reasons
    assert reasons.count("CanaryStep") == 2, reasons
    # kubectl showed the rollout: the canary, its weight and its phase
    lines = "\n".join(traffic.kubectl_lines)
    assert "CANARY" in lines and "WEIGHT" in lines and "ROLLOUT" in lines
    assert any("v2" in line and "Progressing" in line for line in lines.splitlines())


def test_a_bad_canary_is_rolled_back_and_the_stable_version_never_fails(
        k8s: K8s, pods: dict[str, InferencePod], operator: OperatorProcess,
        uris: dict[str, str]) -> None:
    assert k8s.kubectl is not None
    stable = obj(k8s)["spec"]["version"]
    assert stable == "v2"  # the previous test promoted it
    wait(lambda: all(set(served(p)) == {"v2"} for p in pods.values()), "v2 alone", 60)
    with Traffic(pods, k8s) as traffic:
        wait(lambda: traffic.count() >= 20, "traffic before the canary", 30)
        k8s.kubectl.apply(lora("v2", uris["v2"], {
            "version": "v3", "source": {"uri": uris["v3"]}, "steps": [10, 50, 100],
            "analysis": ANALYSIS}))
        rolled = wait(lambda: (st := obj(k8s).get("status", {})).get("canary", {}).get(
            "phase") == "RolledBack" and st, "the bad canary rolled back", 120)
        rolled_at = time.monotonic()
        wait(lambda: all("v3" not in served(p) for p in pods.values()),
             "v3 evicted from both pods", 60)
        evicted_at = time.monotonic()
        wait(lambda: traffic.count() >= 40 and traffic.results[-1]["started"] > evicted_at + 2,
             "traffic after the rollback", 30)
    results = traffic.results
    assert obj(k8s)["spec"]["version"] == "v2"
    assert obj(k8s)["spec"]["canary"]["version"] == "v3"  # the spec is the user's
    # Failures are the canary's own answers; the stable version failed nothing.
    failed = [r for r in results if r["status"] != 200]
    assert failed and all(r["adapter"] == "legal@v3" for r in failed), failed[:5]
    assert all(r["status"] == 200 for r in results if r["adapter"] == "legal@v2")
    assert all(r["status"] == 200 and r["adapter"] == "legal@v2"
               for r in results if r["started"] > evicted_at)
    assert any(r["adapter"] == "legal@v2" for r in results if r["started"] > rolled_at)
    # Degraded, with the measured figures, and an Event.
    assert rolled["phase"] == "Degraded"
    condition = next(c for c in rolled["conditions"] if c["type"] == "Canary")
    assert condition["status"] == "False" and condition["reason"] == "RolledBack"
    assert "error rate" in condition["message"]
    figures = rolled["canary"]["analysis"]
    assert figures["errors"] >= ANALYSIS["minRequests"] and figures["errorRate"] > 0.5
    assert rolled["canary"]["weight"] == 0
    assert rolled["canary"]["history"][-1]["result"] == "Failed"
    rollback = [e for e in events(k8s) if e["reason"] == "CanaryRolledBack"]
    assert len(rollback) == 1 and rollback[0]["type"] == "Warning"
    assert "error rate" in rollback[0]["message"]
    (row,) = table_rows(k8s.kubectl("get", "lora", "legal"))
    assert (row["PHASE"], row["CANARY"], row["WEIGHT"], row["ROLLOUT"]) == (
        "Degraded", "v3", "0", "RolledBack"), row
    # Removing spec.canary clears the verdict: Ready again, v2 alone.
    k8s.kubectl("patch", "lora", "legal", "--type=json",
                "-p", '[{"op": "remove", "path": "/spec/canary"}]')
    wait(lambda: obj(k8s)["status"]["phase"] == "Ready", "Ready after removing the canary", 60)
