"""End-to-end proof of issue 17's "placement that scales": a placed tenant moves to a pod
that joined the pool, under load, following the rollout discipline, with real processes.

- The Kubernetes API is the kmock emulator over HTTP (tests/k8s_harness.py); ``kubectl`` is
  the real binary.
- Two inference "pods": each a real ``loramux serve`` (tiny fp32 model, ``--metrics-port``:
  the per-tenant token counters the operator reads, declared as the container port named
  ``metrics`` as in the chart) plus a real ``loramux sync``. S3 is moto's server.
- The operator is the real ``loramux operator`` process: ``--placement-policy leastLoaded
  --rebalance``, resync every second.

The trigger is real load: two tenants (``replicas: 1``) sit on the only pod, ``infer-a``,
and a client loop sends them requests through a stand-in for the pool Service (each request
to a random pod among its endpoints, no retry). The operator measures each tenant's
tokens/s from the pods' counters. Then ``infer-b`` joins the pool, empty: ``infer-a``
serves all the tokens, ``infer-b`` none, so one tenant moves (two tenants: after one move
the pods are within the ratio, so exactly one). ``infer-b`` joins the Service's endpoints
once its placement table is in place (as a readiness gate would), so requests reach both
pods during the whole move: load on ``infer-b``, route to it, drain and evict ``infer-a``.

Asserted: zero failed requests, every answer from the tenant asked for, the moved tenant
ends on ``infer-b`` alone and ``infer-a``'s server no longer holds it, the Events
``Moving`` (with the load figures), ``MoveRouted`` and ``Moved``, ``kubectl get lora -o
wide`` showing both pods in RESIDENCY while the source drains, and the other tenant never
moved.

Then the same protocol as failover: ``infer-a`` turns NotReady (out of the Service's
endpoints, its processes still up) and stays so beyond ``--unready-grace-seconds``: what it
holds moves to ``infer-b``, under the same client loop, with zero failed requests.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
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
    free_port,
    inference_pod,
    pod_manifest,
    pool_operator,
    start_pods,
    table_rows,
)

LORA = ("loramux.io/v1alpha1", "loraadapters")
TOKEN = "rebalance-sidecar-token"
OWNER_LABELS = {"app.kubernetes.io/instance": "rebalance"}
TENANTS = ("legal", "medical")
PROMPT = "The quick brown fox"
T = TypeVar("T")

pytestmark = pytest.mark.timeout(300)


def wait(fn: Callable[[], T], what: str, timeout: float = 60, interval: float = 0.2) -> T:
    return helpers.wait(fn, what, timeout, interval)


@pytest.fixture(scope="module")
def published(s3_server: S3, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, str]:
    return publish_v1(s3_server, adapter_root, tmp_path_factory.mktemp("stage"), "rebalance",
                      TENANTS)


@pytest.fixture(scope="module")
def pods(k8s: K8s, s3_server: S3, tiny_model_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, InferencePod]]:
    """Both pods' processes started; only ``infer-a`` is published (a Pod object)."""
    assert k8s.kubectl is not None
    k8s.kubectl.apply(CRD_PATH)
    workdir = tmp_path_factory.mktemp("pods")
    made, metrics = {}, {}
    for name in ("infer-a", "infer-b"):
        metrics[name] = free_port()
        made[name] = inference_pod(
            k8s.api, name, workdir, sidecar_token=TOKEN, start=False,
            labels={**INFERENCE_LABELS, **OWNER_LABELS},
            server_args=["--model", str(tiny_model_dir), "--quantization", "none",
                         "--log-format", "text", "--metrics-port", str(metrics[name])])
    errors: list[BaseException] = []

    def processes(pod: InferencePod) -> None:
        try:
            assert pod.server is not None and pod.sidecar is not None
            pod.server.start()
            pod.sidecar.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=processes, args=(p,)) for p in made.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    try:
        assert not errors, errors
        for name, pod in made.items():
            pod.metrics_port = metrics[name]  # type: ignore[attr-defined]
        publish(k8s, made["infer-a"])
        yield made
    finally:
        for pod in made.values():
            pod.stop()


def publish(k8s: K8s, pod: InferencePod) -> None:
    """The Pod object, declaring the server's per-tenant metrics port as the chart does."""
    manifest = pod_manifest(pod.name, pod.server_port, pod.sync_port, labels=pod.labels)
    manifest["spec"]["containers"][0]["ports"].append(
        {"name": "metrics", "containerPort": pod.metrics_port,  # type: ignore[attr-defined]
         "protocol": "TCP"})
    k8s.api.create(manifest)
    assert not start_pods([pod])  # processes already up: sets the Pod Ready


@pytest.fixture(scope="module")
def operator(k8s: K8s, pods: dict[str, InferencePod],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with pool_operator(k8s.kubeconfig, log, TOKEN, OWNER_LABELS,
                       "--placement-policy", "leastLoaded", "--rebalance",
                       "--rebalance-ratio", "1.5", "--rebalance-floor-tokens-per-s", "1",
                       "--rebalance-cooldown-seconds", "600",
                       "--move-drain-timeout-seconds", "30",
                       "--unready-grace-seconds", "4") as proc:
        yield proc


def lora(tenant: str, uri: str) -> str:
    return json.dumps({
        "apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
        "metadata": {"name": tenant, "namespace": "default"},
        "spec": {"tenant": tenant, "version": "v1", "source": {"uri": uri},
                 "baseModel": "tiny-llama", "replicas": 1,
                 "pool": {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}}}})


def statuses(k8s: K8s) -> dict[str, dict[str, Any]]:
    return {o["spec"]["tenant"]: o.get("status") or {} for o in k8s.api.list(*LORA)["items"]}


def on_one_pod(k8s: K8s, tenant: str, pod: str) -> bool:
    st = statuses(k8s).get(tenant) or {}
    rows = st.get("placements") or []
    return (st.get("phase") == "Ready" and "move" not in st and len(rows) == 1
            and rows[0]["pod"] == pod and rows[0]["state"] == "Ready")


def routable(pod: InferencePod) -> bool:
    """The pod can answer every tenant: it holds it, or its table names a holder."""
    held = {a["tenant"] for a in httpx.get(f"{pod.server_url}/admin/adapters", timeout=10)
            .json()["adapters"] if a["state"] == "ready"}
    table = {t["tenant"]: t for t in httpx.get(f"{pod.server_url}/admin/peers", timeout=10)
             .json()["tenants"]}
    return all(t in held or (table.get(t) or {}).get("holders") for t in TENANTS)


def held_by(pod: InferencePod) -> set[str]:
    return {a["tenant"] for a in httpx.get(f"{pod.server_url}/admin/adapters", timeout=10)
            .json()["adapters"]}


class ServiceLoop:
    """Clients behind a stand-in for the pool Service: each request to a random pod of the
    endpoints, tenants in turn, three kinds of request; no retry."""

    KINDS = ("generate", "completions", "chat-stream")

    def __init__(self, pods: dict[str, InferencePod], endpoints: set[str],
                 clients: int = 2) -> None:
        self.pods = pods
        self.endpoints = set(endpoints)
        self.lock = threading.Lock()
        self.results: list[dict[str, Any]] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(clients)]

    def start(self) -> ServiceLoop:
        for thread in self.threads:
            thread.start()
        return self

    def add_endpoint(self, name: str) -> None:
        with self.lock:
            self.endpoints.add(name)

    def count(self, pod: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.results if pod is None or r["pod"] == pod)

    def stop(self) -> list[dict[str, Any]]:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(120)
        return self.results

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        with httpx.Client(timeout=60) as client:
            while not self.stop_event.is_set():
                tenant = TENANTS[(n + seed) % len(TENANTS)]
                kind = self.KINDS[(n // len(TENANTS)) % len(self.KINDS)]
                n += 1
                with self.lock:
                    pod = rng.choice(sorted(self.endpoints))
                result = {"tenant": tenant, "pod": pod, "kind": kind}
                try:
                    result.update(self._call(client, self.pods[pod].server_url, tenant, kind))
                except httpx.HTTPError as exc:
                    result.update(status=0, error=repr(exc))
                with self.lock:
                    self.results.append(result)

    @staticmethod
    def _call(client: httpx.Client, url: str, tenant: str, kind: str) -> dict[str, Any]:
        if kind in ("generate", "completions"):
            if kind == "generate":
                r = client.post(f"{url}/generate", json={
                    "tenant_id": tenant, "prompt": PROMPT, "max_new_tokens": 6,
                    "temperature": 0})
            else:
                r = client.post(f"{url}/v1/completions", json={
                    "model": tenant, "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
            body = r.json() if r.status_code == 200 else {}
            return {"status": r.status_code, "adapter": body.get("adapter"),
                    "routed": r.headers.get("x-loramux-routed"),
                    "error": r.text[:300] if r.status_code != 200 else None}
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


LONG_TOKENS = 400


def long_generation(pod: InferencePod, tenant: str, out: dict[str, Any]) -> None:
    """One long generation straight to ``pod`` (which holds ``tenant``)."""
    try:
        r = httpx.post(f"{pod.server_url}/generate", timeout=120, json={
            "tenant_id": tenant, "prompt": PROMPT, "max_new_tokens": LONG_TOKENS,
            "ignore_eos": True, "temperature": 0})
        body = r.json() if r.status_code == 200 else {}
        out.update(status=r.status_code, adapter=body.get("adapter"),
                   tokens=(body.get("usage") or {}).get("completion_tokens"),
                   error=None if r.status_code == 200 else r.text[:300])
    except httpx.HTTPError as exc:
        out.update(status=0, error=repr(exc))
    out["ended"] = time.time()


class WideWatcher:
    """``kubectl get lora -o wide`` in a loop: every RESIDENCY value seen per tenant."""

    def __init__(self, k8s: K8s) -> None:
        self.k8s = k8s
        self.seen: dict[str, set[str]] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[str] = []

    def start(self) -> WideWatcher:
        self.thread.start()
        return self

    def stop(self) -> dict[str, set[str]]:
        self.stop_event.set()
        self.thread.join(60)
        return self.seen

    def _run(self) -> None:
        assert self.k8s.kubectl is not None
        while not self.stop_event.is_set():
            try:
                out = self.k8s.kubectl("get", "lora", "-o", "wide")
            except Exception as exc:  # asserted by the test (watcher.errors)
                self.errors.append(repr(exc))
                continue
            for row in table_rows(out):
                self.seen.setdefault(row["TENANT"], set()).add(row.get("RESIDENCY", ""))


def test_a_tenant_moves_to_a_pod_that_joined_under_load_without_a_failed_request(
        k8s: K8s, pods: dict[str, InferencePod], operator: OperatorProcess,
        published: dict[str, str]) -> None:
    assert k8s.kubectl is not None
    for tenant in TENANTS:
        k8s.kubectl.apply(lora(tenant, published[tenant]))
    for tenant in TENANTS:
        wait(lambda t=tenant: on_one_pod(k8s, t, "infer-a"), f"{tenant} Ready on infer-a", 120)

    loop = ServiceLoop(pods, {"infer-a"}).start()
    watcher: WideWatcher | None = None
    long_request: dict[str, Any] = {}
    long_thread: threading.Thread | None = None
    try:
        # the load is measured: both tenants' tokens/s from infer-a's counters
        wait(lambda: loop.count() >= 30, "requests on infer-a", 60)
        # infer-b joins the pool, empty; it takes requests once its table is in place
        publish(k8s, pods["infer-b"])
        watcher = WideWatcher(k8s).start()
        wait(lambda: routable(pods["infer-b"]), "infer-b's placement table", 60)
        loop.add_endpoint("infer-b")

        def moving() -> dict[str, Any] | None:
            for tenant, st in statuses(k8s).items():
                if st.get("move"):
                    return {"tenant": tenant, **st["move"]}
            return None

        move = wait(moving, "a move to start", 90)
        moved = move["tenant"]
        stays = next(t for t in TENANTS if t != moved)
        assert (move["from"], move["to"]) == ("infer-a", "infer-b"), move
        assert "infer-a serves" in move["reason"] and "tokens/s" in move["reason"], move
        # A long request on the source while the target loads: the drain waits for it
        # (the pod reports it in flight), and it is answered in full.
        long_request.update(tenant=moved, started=time.time())
        long_thread = threading.Thread(target=long_generation,
                                       args=(pods["infer-a"], moved, long_request))
        long_thread.start()

        wait(lambda: on_one_pod(k8s, moved, "infer-b"), f"{moved} on infer-b alone", 90)
        wait(lambda: moved not in held_by(pods["infer-a"]), f"{moved} evicted from infer-a",
             60)
        last = statuses(k8s)[moved]["lastMove"]
        assert (last["from"], last["to"], last["outcome"]) == ("infer-a", "infer-b", "Moved")
        # requests go on reaching both pods after the eviction (infer-a forwards them)
        mark = {p: loop.count(p) for p in pods}
        wait(lambda: all(loop.count(p) >= mark[p] + 10 for p in pods),
             "requests through both pods after the move", 60)
    finally:
        results = loop.stop()
        seen = watcher.stop() if watcher is not None else {}
        if long_thread is not None:
            long_thread.join(120)
    assert watcher is not None and not watcher.errors, watcher.errors if watcher else None
    # the long request on the source: answered in full, and the source was evicted only
    # after it ended (the drain waited for it, not for the timeout)
    assert long_request.get("status") == 200, long_request
    assert long_request["adapter"] == f"{moved}@v1"
    assert long_request["tokens"] == LONG_TOKENS
    finished = datetime.fromisoformat(last["finished"].replace("Z", "+00:00")).timestamp()
    assert finished >= int(long_request["ended"]), (long_request, last)
    assert "nothing is in flight on the source" in last["reason"], last

    failed = [r for r in results if r.get("status") != 200]
    assert not failed, (len(failed), failed[:5])
    wrong = [r for r in results if r.get("adapter") != f"{r['tenant']}@v1"]
    assert not wrong, wrong[:5]
    assert {r["kind"] for r in results} == set(ServiceLoop.KINDS)
    by_pod = Counter(r["pod"] for r in results)
    assert by_pod["infer-b"] >= 10, by_pod

    # the other tenant stayed where it was; the moved one is on infer-b only
    assert on_one_pod(k8s, stays, "infer-a") and "lastMove" not in statuses(k8s)[stays]
    assert moved in held_by(pods["infer-b"]) and moved not in held_by(pods["infer-a"])
    # kubectl -o wide: both holders while the source drained, then the new pod alone
    assert any(v.startswith("infer-a:") and ",infer-b:" in v for v in seen.get(moved, ())), seen
    rows = {row["NAME"]: row for row in table_rows(k8s.kubectl("get", "lora", "-o", "wide"))}
    assert rows[moved]["RESIDENCY"].startswith("infer-b:"), rows
    assert "infer-a" not in rows[moved]["RESIDENCY"], rows

    events = [e for e in k8s.api.list("v1", "events")["items"]
              if (e.get("involvedObject") or {}).get("name") == moved]
    reasons = [e["reason"] for e in events]
    for reason in ("Moving", "MoveRouted", "Moved"):
        assert reasons.count(reason) == 1, reasons
    moving_event = next(e for e in events if e["reason"] == "Moving")
    assert "infer-a -> infer-b" in moving_event["message"]
    assert "tokens/s" in moving_event["message"]
    others = [e["reason"] for e in k8s.api.list("v1", "events")["items"]
              if (e.get("involvedObject") or {}).get("name") == stays]
    assert not [r for r in others if "Move" in r], others
    print(f"\nrebalance e2e: {len(results)} requests, 0 failed, {moved} moved "
          f"infer-a -> infer-b, by pod {dict(by_pod)}, move: {move['reason']}; a "
          f"{LONG_TOKENS}-token request on the source took "
          f"{long_request['ended'] - long_request['started']:.1f} s, evicted at "
          f"{last['finished']}")


def test_a_pod_not_ready_beyond_the_grace_hands_its_tenants_over_the_same_way(
        k8s: K8s, pods: dict[str, InferencePod], operator: OperatorProcess) -> None:
    on_a = [t for t in TENANTS if on_one_pod(k8s, t, "infer-a")]
    assert on_a and all(on_one_pod(k8s, t, "infer-b") for t in TENANTS if t not in on_a)
    loop = ServiceLoop(pods, {"infer-a", "infer-b"}).start()
    try:
        wait(lambda: loop.count() >= 10, "requests through both pods", 60)
        # NotReady: out of the Service's endpoints at once; its processes keep running
        loop.endpoints.discard("infer-a")
        pods["infer-a"].set_ready(False)
        for tenant in on_a:
            wait(lambda t=tenant: on_one_pod(k8s, t, "infer-b"), f"{tenant} on infer-b", 90)
        wait(lambda: not set(on_a) & held_by(pods["infer-a"]), f"{on_a} evicted from infer-a",
             60)
        mark = loop.count()
        wait(lambda: loop.count() >= mark + 10, "requests after the handover", 60)
    finally:
        results = loop.stop()
        pods["infer-a"].set_ready(True)
    failed = [r for r in results if r.get("status") != 200]
    assert not failed, (len(failed), failed[:5])
    wrong = [r for r in results if r.get("adapter") != f"{r['tenant']}@v1"]
    assert not wrong, wrong[:5]
    for tenant in on_a:
        last = statuses(k8s)[tenant]["lastMove"]
        assert (last["from"], last["to"], last["outcome"]) == ("infer-a", "infer-b", "Moved")
        events = [e for e in k8s.api.list("v1", "events")["items"]
                  if (e.get("involvedObject") or {}).get("name") == tenant
                  and e["reason"] == "Moving"]
        assert any("infer-a has been NotReady" in e["message"] for e in events), events
    print(f"\nunready e2e: {len(results)} requests, 0 failed, {on_a} moved infer-a -> infer-b")
