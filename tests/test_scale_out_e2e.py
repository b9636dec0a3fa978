"""End-to-end proof of issue 17 (scale-out routing) with real processes only.

- The Kubernetes API is the kmock emulator over HTTP (tests/k8s_harness.py); ``kubectl`` is
  the real binary.
- Three inference "pods": each a real ``loramux serve`` (tiny fp32 model) plus a real
  ``loramux sync``, published as Pod objects (podIP 127.0.0.1, ports named ``http`` and
  ``sync``). S3 is moto's server.
- The operator is the real ``loramux operator`` process, resync every 2 s.

Six tenants, each ``replicas: 1``: every pod holds two of them, and a client loop sends
requests for every tenant through a stand-in for the pool Service: each request goes to a
random pod among the Service's endpoints. A pod is then deleted in the middle: like the
endpoints controller, the stand-in stops choosing it the moment it is terminating (its
deletionTimestamp is set), while the pod goes on serving in its grace period; its tenants
are placed on the other pods (the existing placement logic), and once they are Ready there
the pod's processes stop and its object goes. The loop runs through all of it.

The pods run with ``--auth keys`` and every tenant has its own key (``spec.access``): a
request is authenticated by the pod it reaches, which may not hold the tenant, so every pool
pod must know every pool tenant's key hashes (``DesiredState.access``); the holder checks
the key again. A tenant's key is refused for another tenant.

What is asserted: zero failed requests (no retry anywhere in the client), every answer's
``adapter`` is the tenant asked for, some answers came through a peer (the pod asked did
not hold the tenant), and ``kubectl get lora -o wide`` shows where each tenant is.

A second test does the same through a hard kill (SIGKILL of a pod's processes, then its Pod
object deleted as a node controller would): the surviving pods hold the requests for the
dead pod's tenants (``--peer-failover-s``) until the operator has re-placed them.
"""

from __future__ import annotations

import base64
import json
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

import helpers
from factories import publish_v1
from k8s_harness import (
    CRD_PATH,
    INFERENCE_LABELS,
    S3,
    InferencePod,
    K8s,
    OperatorProcess,
    inference_pod,
    pool_operator,
    start_pods,
    table_rows,
)

LORA = ("loramux.io/v1alpha1", "loraadapters")
TOKEN = "scale-out-sidecar-token"
OWNER_LABELS = {"app.kubernetes.io/instance": "scale-out"}
POD_NAMES = ("infer-a", "infer-b", "infer-c")
TENANTS = ("legal", "medical", "finance", "retail", "support", "travel")
PROMPT = "The quick brown fox"
T = TypeVar("T")

FAILOVER_S = 60  # the pods' --peer-failover-s: generous for a loaded CI machine

pytestmark = pytest.mark.timeout(600)


def wait(fn: Callable[[], T], what: str, timeout: float = 90, interval: float = 0.2) -> T:
    return helpers.wait(fn, what, timeout, interval)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def published(s3_server: S3, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, str]:
    """tenant -> the s3:// URI of its v1 (pushed with the same code as `loramux push`)."""
    return publish_v1(s3_server, adapter_root, tmp_path_factory.mktemp("stage"), "scale-out",
                      TENANTS)


@pytest.fixture(scope="module")
def pods(k8s: K8s, s3_server: S3, tiny_model_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, InferencePod]]:
    assert k8s.kubectl is not None
    assert "loraadapters.loramux.io" in k8s.kubectl.apply(CRD_PATH)
    workdir = tmp_path_factory.mktemp("pods")
    made = {name: new_pod(k8s, name, workdir, tiny_model_dir) for name in POD_NAMES}
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
    with pool_operator(k8s.kubeconfig, log, TOKEN, OWNER_LABELS,
                       "--delete-timeout-seconds", "30", resync_seconds=2) as proc:
        yield proc


def new_pod(k8s: K8s, name: str, workdir: Path, model_dir: Path) -> InferencePod:
    """An inference pod of the pool, not started."""
    args = ["--model", str(model_dir), "--quantization", "none", "--log-format", "text",
            "--peer-failover-s", str(FAILOVER_S)]
    return inference_pod(k8s.api, name, workdir, server_args=args, sidecar_token=TOKEN,
                         start=False, auth="keys", labels={**INFERENCE_LABELS, **OWNER_LABELS})


# --------------------------------------------------------------------------- helpers


def key_of(tenant: str) -> str:
    return f"{tenant}-key-0123456789abcdef0123456789abcdef"


def key_secret(tenant: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": f"{tenant}-keys", "namespace": "default"},
            "data": {"app": base64.b64encode(key_of(tenant).encode()).decode()}}


def lora(tenant: str, uri: str) -> str:
    return json.dumps({
        "apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
        "metadata": {"name": tenant, "namespace": "default"},
        "spec": {"tenant": tenant, "version": "v1", "source": {"uri": uri},
                 "baseModel": "tiny-llama", "replicas": 1,
                 "access": {"secretName": f"{tenant}-keys"},
                 "pool": {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}}}})


def placements(k8s: K8s, among: set[str]) -> dict[str, str] | None:
    """tenant -> its one pod, once every tenant is Ready with v1 on one pod of ``among``."""
    found: dict[str, str] = {}
    for obj in k8s.api.list(*LORA)["items"]:
        st = obj.get("status") or {}
        rows = st.get("placements") or []
        if (st.get("phase") != "Ready" or len(rows) != 1 or rows[0]["state"] != "Ready"
                or rows[0]["pod"] not in among
                or st.get("observedGeneration") != obj["metadata"]["generation"]):
            return None
        found[obj["spec"]["tenant"]] = rows[0]["pod"]
    return found if set(found) == set(TENANTS) else None


def routable(pods: dict[str, InferencePod], among: set[str]) -> bool:
    """Every pod of ``among`` can answer every tenant without any other pod: it holds the
    tenant ready, or its placement table names a holder in ``among``."""
    for name in among:
        url = pods[name].server_url
        held = {a["tenant"] for a in httpx.get(f"{url}/admin/adapters", timeout=10)
                .json()["adapters"] if a["state"] == "ready"}
        table = {t["tenant"]: t for t in httpx.get(f"{url}/admin/peers", timeout=10)
                 .json()["tenants"]}
        for tenant in TENANTS:
            if tenant in held:
                continue
            holders = {h["pod"] for h in (table.get(tenant) or {}).get("holders", [])}
            if not holders & (among - {name}):
                return False
    return True


class ServiceLoop:
    """Clients behind a stand-in for the pool Service: each request goes to a random pod of
    ``endpoints`` (the pods that are Ready and not terminating, as the endpoints controller
    keeps them). No retry: every request's first answer is its answer."""

    KINDS = ("generate", "completions", "chat-stream")

    def __init__(self, pods: dict[str, InferencePod], endpoints: set[str],
                 clients: int = 2) -> None:
        self.pods = pods
        self.endpoints = set(endpoints)
        self.lock = threading.Lock()
        self.results: list[dict[str, Any]] = []
        self.in_flight: Counter[str] = Counter()  # requests sent to each pod, not answered
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(clients)]

    def start(self) -> ServiceLoop:
        for thread in self.threads:
            thread.start()
        return self

    def remove_endpoint(self, name: str) -> None:
        with self.lock:
            self.endpoints.discard(name)

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def in_flight_to(self, name: str) -> int:
        with self.lock:
            return self.in_flight[name]

    def stop(self) -> list[dict[str, Any]]:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(120)
        return self.results

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        # A request may wait up to the pods' failover time for a holder: a longer timeout.
        with httpx.Client(timeout=FAILOVER_S + 60) as client:
            while not self.stop_event.is_set():
                tenant = TENANTS[(n + seed) % len(TENANTS)]  # every tenant, in turn
                kind = self.KINDS[(n // len(TENANTS)) % len(self.KINDS)]
                n += 1
                with self.lock:
                    pod = rng.choice(sorted(self.endpoints))
                    self.in_flight[pod] += 1
                result = {"tenant": tenant, "pod": pod, "kind": kind,
                          "start": time.monotonic()}
                try:
                    result.update(self._call(client, self.pods[pod].server_url, tenant, kind))
                except httpx.HTTPError as exc:
                    result.update(status=0, error=repr(exc))
                result["end"] = time.monotonic()
                with self.lock:
                    self.in_flight[pod] -= 1
                    self.results.append(result)

    @staticmethod
    def _call(client: httpx.Client, url: str, tenant: str, kind: str) -> dict[str, Any]:
        client.headers["Authorization"] = f"Bearer {key_of(tenant)}"
        if kind == "generate":
            r = client.post(f"{url}/generate", json={
                "tenant_id": tenant, "prompt": PROMPT, "max_new_tokens": 6, "temperature": 0})
            body = r.json() if r.status_code == 200 else {}
            return {"status": r.status_code, "adapter": body.get("adapter"),
                    "routed": r.headers.get("x-loramux-routed"), "error": r.text[:300]
                    if r.status_code != 200 else None}
        if kind == "completions":
            r = client.post(f"{url}/v1/completions", json={
                "model": tenant, "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
            body = r.json() if r.status_code == 200 else {}
            return {"status": r.status_code, "adapter": body.get("adapter"),
                    "routed": r.headers.get("x-loramux-routed"), "error": r.text[:300]
                    if r.status_code != 200 else None}
        with client.stream("POST", f"{url}/v1/chat/completions", json={
                "model": tenant, "max_tokens": 6, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": PROMPT}]}) as r:
            text = r.read().decode(errors="replace")
            routed = r.headers.get("x-loramux-routed")
        chunks = [json.loads(line[6:]) for line in text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        problems = [c["error"] for c in chunks if "error" in c]
        adapters = {c.get("adapter") for c in chunks if "error" not in c}
        ok = (r.status_code == 200 and not problems and text.rstrip().endswith("[DONE]")
              and len(adapters) == 1)
        return {"status": r.status_code if ok else -1, "routed": routed,
                "adapter": adapters.pop() if len(adapters) == 1 else sorted(map(str, adapters)),
                "error": None if ok else text[:300]}


# --------------------------------------------------------------------------- the proof


def test_any_pod_answers_any_tenant_through_a_pod_deletion(
        k8s: K8s, pods: dict[str, InferencePod], operator: OperatorProcess,
        published: dict[str, str]) -> None:
    assert k8s.kubectl is not None
    for tenant in TENANTS:
        k8s.api.create(key_secret(tenant))
        k8s.kubectl.apply(lora(tenant, published[tenant]))
    every = set(POD_NAMES)
    where = wait(lambda: placements(k8s, every), "six tenants Ready, one pod each", 180)
    assert Counter(where.values()) == dict.fromkeys(POD_NAMES, 2), where  # leastAdapters
    wait(lambda: routable(pods, every), "every pod's placement table", 60)

    # Every pod knows every tenant's key (held there or not); a key grants its tenant only.
    for name in POD_NAMES:
        url = pods[name].server_url
        access = httpx.get(f"{url}/admin/access", timeout=10).json()
        assert {row["tenant"] for row in access["tenants"]} == set(TENANTS), (name, access)
        other = httpx.post(f"{url}/generate", headers={
            "Authorization": f"Bearer {key_of('legal')}"}, json={
            "tenant_id": "medical", "prompt": PROMPT, "max_new_tokens": 2})
        assert other.status_code == 403, other.text
        assert httpx.post(f"{url}/generate", json={
            "tenant_id": "medical", "prompt": PROMPT, "max_new_tokens": 2}).status_code == 401

    # kubectl get lora -o wide: where each tenant is (each pod's best tier) and how hot
    def wide() -> dict[str, dict[str, str]] | None:
        out = k8s.kubectl("get", "lora", "-o", "wide")
        header = out.splitlines()[0].split()
        if header[-2:] != ["RESIDENCY", "INFLIGHT"]:
            raise AssertionError(out)
        rows = {row["NAME"]: row for row in table_rows(out)}
        done = all(re.fullmatch(rf"{where[t]}:(device|host|disk)", rows[t]["RESIDENCY"])
                   and rows[t]["INFLIGHT"].isdigit() for t in TENANTS)
        return rows if done else None

    rows = wait(wide, "the Residency column filled", 30)
    assert [rows[t]["TENANT"] for t in TENANTS] == list(TENANTS)
    plain = k8s.kubectl("get", "lora").splitlines()[0].split()
    assert "RESIDENCY" not in plain and "INFLIGHT" not in plain  # -o wide only

    loop = ServiceLoop(pods, every).start()
    try:
        wait(lambda: loop.count() >= 36, "requests through every pod before the deletion", 120)
        victim = "infer-c"
        moved = sorted(t for t, pod in where.items() if pod == victim)
        # The pod is deleted: terminating (out of the Service's endpoints at once), still
        # serving in its grace period while its tenants are placed on the other pods.
        loop.remove_endpoint(victim)
        pods[victim].terminate()
        rest = every - {victim}
        after = wait(lambda: placements(k8s, rest), f"{moved} Ready on the other pods", 180)
        assert all(after[t] in rest for t in moved), after
        wait(lambda: routable(pods, rest), "the tables without the deleted pod", 60)
        mark = loop.count()
        # The grace period ends: the processes stop and the object goes.
        pods[victim].delete(stop=True)
        wait(lambda: loop.count() >= mark + 36, "requests after the deletion", 120)
        # the operator has dropped the gone pod from every table
        wait(lambda: all(victim not in json.dumps(
            httpx.get(f"{pods[p].server_url}/admin/peers", timeout=10).json())
            for p in rest), "the deleted pod out of the tables", 60)
    finally:
        results = loop.stop()

    failed = [r for r in results if r.get("status") != 200]
    assert not failed, (len(failed), failed[:5])
    wrong = [r for r in results if r.get("adapter") != f"{r['tenant']}@v1"]
    assert not wrong, wrong[:5]
    assert Counter(r["tenant"] for r in results).keys() == set(TENANTS)
    assert {r["kind"] for r in results} == set(ServiceLoop.KINDS)
    peer = [r for r in results if r.get("routed") == "peer"]
    assert peer, "no answer came through a peer"
    print(f"\nscale-out e2e: {len(results)} requests, 0 failed, {len(peer)} through a peer, "
          f"by pod {dict(Counter(r['pod'] for r in results))}")


def test_any_pod_answers_any_tenant_through_a_hard_kill(
        k8s: K8s, pods: dict[str, InferencePod], operator: OperatorProcess,
        published: dict[str, str], tiny_model_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A pod dies abruptly (node lost, kill -9) under the client loop; ``replicas: 1``.

    Three pool pods (after the test above deleted ``infer-c``, a new ``infer-d`` joins; it
    holds nothing until the operator places the dead pod's tenants). The pod holding the
    most tenants is the victim. What is real and what is mocked:

    - the stand-in Service drops the victim's endpoint first, and the test waits until no
      request of the loop that *entered* the victim is still in flight: a request being
      served by a process that is killed is lost in any system (and the endpoint of a dead
      node goes anyway);
    - the victim's server and sidecar are SIGKILLed (real processes, no drain, no goodbye);
    - its Pod object is then deleted by the test, as the node controller would once the
      node is gone (this is the mocked kubelet / node part); the operator, real, re-places
      the tenants, and the surviving pods get the new tables through their sidecars.

    Until then, the surviving pods hold the requests for the victim's tenants (the failover
    wait, ``--peer-failover-s``) instead of answering 503. Every request succeeds with the
    right adapter, except that a stream the victim was relaying *for another pod* at the
    instant of the kill breaks (its answer had begun: nothing can replay it): such a request
    is told apart exactly (relayed through a peer, ``upstream_stream_broken``, the kill
    inside its lifetime, a tenant of the victim) and at most one per client can exist.
    """
    assert k8s.kubectl is not None
    for tenant in TENANTS:  # (already there after the test above)
        if k8s.api.find("v1", "secrets", f"{tenant}-keys", "default") is None:
            k8s.api.create(key_secret(tenant))
        k8s.kubectl.apply(lora(tenant, published[tenant]))
    live = {name for name, pod in pods.items() if pod.get() is not None}
    if len(live) < 3:
        extra = new_pod(k8s, "infer-d", tmp_path_factory.mktemp("pod-d"), tiny_model_dir)
        pods["infer-d"] = extra  # the pods fixture stops it at the end
        extra.start()
        live.add("infer-d")
    where = wait(lambda: placements(k8s, live), "six tenants Ready", 180)
    wait(lambda: routable(pods, live), "every pod's placement table", 60)
    victim = Counter(where.values()).most_common(1)[0][0]
    moved = sorted(t for t, pod in where.items() if pod == victim)
    rest = live - {victim}
    waits_before = sum(_peer_outcome(pods[p], "failover_wait") for p in rest)

    loop = ServiceLoop(pods, live).start()
    try:
        wait(lambda: loop.count() >= 36, "requests through every pod before the kill", 120)
        loop.remove_endpoint(victim)
        wait(lambda: loop.in_flight_to(victim) == 0, "the victim's own requests answered", 60,
             0.01)
        killed_at = time.monotonic()
        for proc in (pods[victim].server, pods[victim].sidecar):
            assert proc is not None
            proc.proc.send_signal(signal.SIGKILL)
        for proc in (pods[victim].server, pods[victim].sidecar):
            proc.proc.wait(10)
        mark = loop.count()
        time.sleep(3)  # the node controller is not instant: the tables still name the pod
        pods[victim].delete(stop=False)  # as the node controller would
        after = wait(lambda: placements(k8s, rest), f"{moved} Ready on the other pods", 180)
        assert all(after[t] in rest for t in moved), after
        wait(lambda: routable(pods, rest), "the tables without the killed pod", 60)
        wait(lambda: loop.count() >= mark + 36, "requests after the re-placement", 120)
    finally:
        results = loop.stop()
        pods[victim].stop()  # closes the logs of the killed processes

    def lost_with_the_victim(r: dict[str, Any]) -> bool:
        return (r["kind"] == "chat-stream" and r.get("routed") == "peer"
                and r["tenant"] in moved and r["start"] <= killed_at <= r["end"]
                and "upstream_stream_broken" in (r.get("error") or ""))

    lost = [r for r in results if lost_with_the_victim(r)]
    assert len(lost) <= len(loop.threads), lost
    failed = [r for r in results if r.get("status") != 200 and r not in lost]
    assert not failed, (len(failed), failed[:5])
    wrong = [r for r in results if r.get("adapter") != f"{r['tenant']}@v1" and r not in lost]
    assert not wrong, wrong[:5]
    during = [r for r in results if r["tenant"] in moved and r["end"] > killed_at]
    assert during, "no request for a moved tenant after the kill"
    waited = sum(_peer_outcome(pods[p], "failover_wait") for p in rest) - waits_before
    assert waited > 0, "no request had to wait for the re-placement"
    slowest = max(r["end"] - r["start"] for r in during)
    print(f"\nscale-out hard kill of {victim} ({moved}): {len(results)} requests, "
          f"0 failed, {len(lost)} relayed stream(s) lost with the victim, {waited:g} "
          f"waited for the re-placement, the slowest {slowest:.1f}s")


def _peer_outcome(pod: InferencePod, outcome: str) -> float:
    text = httpx.get(f"{pod.server_url}/admin/metrics", timeout=10).text
    return helpers.metric_value(text, "loramux_peer_forwarded_requests_total",
                                outcome=outcome)
