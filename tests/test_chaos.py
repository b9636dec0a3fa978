"""Chaos: one bad request, pod or token never takes anyone else down (issue 15).

The full stack of tests/k8s_harness.py - the kmock API server, moto S3, two inference pods
(each a real ``loramux serve`` on the tiny model plus a real ``loramux sync``) and the real
``loramux operator`` - serving three LoraAdapters, while

- a client loop per tenant sends ``/generate`` to the pods a Service would route to (a pod
  whose server is being restarted leaves the rotation until its adapters are loaded again,
  as its readiness probe would make it), and a hostile client sends garbage: bad JSON, a
  body over the limit, a prompt over the model's limit, invalid names, extreme and
  non-finite sampling values, a wrong content type, bad desired sets to a sidecar;
- the test kills (SIGKILL) and restarts the operator, a sidecar, and both servers (one of
  them with the operator down at the same time), after deleting an adapter's local files
  on that pod's volume.

What counts as a failure, precisely:

- a tenant request is **expected to fail** only when it failed at the transport level
  (connection refused/reset, the answer cut off) *and* it was in flight on a pod while that
  pod's server was being killed (from the moment the pod leaves the rotation until it is back
  in it). A client would retry it on another pod - the loop does, and counts the retry as a
  request of its own. Every other tenant request must be a 200 from the tenant's adapter;
- a hostile request must get a 4xx with the one error body (never a 5xx or a dropped
  connection), or a 200 when its values are extreme but valid (temperature 5, a tiny
  top_p); the same fault-window rule applies to its transport errors.

At the end every LoraAdapter must be Ready again on both pods; the numbers (requests by
outcome, faults injected, time to converge) are printed.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from factories import stage_adapter
from k8s_harness import (
    CRD_PATH,
    S3,
    InferencePod,
    K8s,
    OperatorProcess,
    _flag,
    inference_pod,
    start_pods,
)
from loramux.training.publish import push

LORA = ("loramux.io/v1alpha1", "loraadapters")
# The tokens live in files (mounted Secrets) shared by the processes; the test rotates them.
FIRST_TOKENS = {"sync": "chaos-sidecar-token", "admin": "chaos-admin-token"}
TOKENS = dict(FIRST_TOKENS)  # the current ones
TENANTS = ("legal", "medical", "finance")
POD_NAMES = ("chaos-a", "chaos-b")
PROMPT = "The quick brown fox"

pytestmark = pytest.mark.timeout(420)


def wait(fn: Callable[[], Any], what: str, timeout: float = 90, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except (httpx.HTTPError, AssertionError, KeyError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def lora(name: str, uri: str, sha256: str) -> dict[str, Any]:
    return {"apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"tenant": name, "version": "v1", "baseModel": "tiny-llama",
                     "source": {"uri": uri, "sha256": sha256},
                     "pool": {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}}}}


def all_ready(k8s: K8s) -> bool:
    """Every LoraAdapter Ready with v1 Ready on both pods, as of its current generation."""
    items = k8s.api.list(*LORA)["items"]
    if sorted(o["metadata"]["name"] for o in items) != sorted(TENANTS):
        return False
    for obj in items:
        st = obj.get("status") or {}
        rows = st.get("placements") or []
        if not (st.get("phase") == "Ready" and st.get("activeVersion") == "v1"
                and st.get("observedGeneration") == obj["metadata"]["generation"]
                and sorted(r["pod"] for r in rows) == sorted(POD_NAMES)
                and all(r["state"] == "Ready" and r["version"] == "v1" for r in rows)):
            return False
    return True


def rotate(path: Path, value: str) -> None:
    """As the kubelet swaps a mounted Secret: a new file behind the same path."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(value + "\n")
    fresh.replace(path)


def serving_all(pod: InferencePod) -> bool:
    """The pod's server answers and has every tenant's v1 ready (what its readiness gate
    waits for before the pod is back behind the Service)."""
    data = httpx.get(f"{pod.server_url}/admin/adapters", timeout=5,
                     headers={"Authorization": f"Bearer {TOKENS['admin']}"}).json()
    ready = {a["tenant"] for a in data["adapters"] if a["state"] == "ready" and a["active"]}
    return set(TENANTS) <= ready


def volume(pod: InferencePod) -> Path:
    assert pod.sidecar is not None
    return Path(_flag(pod.sidecar, "--root"))


# --------------------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
def stack(k8s: K8s, s3_server: S3, tiny_model_dir: Path, adapter_root: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    started = time.monotonic()
    assert k8s.kubectl is not None
    k8s.kubectl.apply(CRD_PATH)
    bucket = f"chaos-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    staging = tmp_path_factory.mktemp("chaos-stage")
    published: dict[str, tuple[str, str]] = {}
    for tenant in TENANTS:
        src, _ = stage_adapter(adapter_root, staging, tenant, "v1")
        uri = f"s3://{bucket}/pub/{tenant}/v1/"
        published[tenant] = (uri, push(src, uri, client=s3_server.client,
                                       progress=False).manifest_sha256)
    workdir = tmp_path_factory.mktemp("chaos-pods")
    TOKENS.update(FIRST_TOKENS)
    token_files = {kind: workdir / f"{kind}-token" for kind in TOKENS}
    for kind, path in token_files.items():
        path.write_text(TOKENS[kind] + "\n")
    args = ["--model", str(tiny_model_dir), "--quantization", "none", "--log-format", "text",
            "--admin-token-file", str(token_files["admin"])]
    sync_args = ["--token-file", str(token_files["sync"]),
                 "--server-token-file", str(token_files["admin"])]
    pods = {name: inference_pod(k8s.api, name, workdir, server_args=args,
                                sidecar_extra=sync_args, start=False) for name in POD_NAMES}
    errors = start_pods(pods.values())
    operator = OperatorProcess(
        k8s.kubeconfig, tmp_path_factory.mktemp("chaos-operator") / "operator.log",
        ["--namespace", "default", "--resync-seconds", "2", "--health-port", "0",
         "--sidecar-token-file", str(token_files["sync"]),
         "--server-token-file", str(token_files["admin"]), "--delete-timeout-seconds", "30"])
    try:
        assert not errors, errors
        operator.start()
        operator.wait_for_log("loramux operator started", 90)
        for tenant, (uri, digest) in published.items():
            k8s.api.create(lora(tenant, uri, digest))
        wait(lambda: all_ready(k8s), "the three LoraAdapters Ready on both pods", 120)
        for pod in pods.values():
            wait(lambda p=pod: serving_all(p), f"{pod.name} serving every tenant", 60)
        yield {"pods": pods, "operator": operator, "published": published,
               "token_files": token_files, "setup_seconds": time.monotonic() - started}
    finally:
        operator.stop()
        for pod in pods.values():
            pod.stop()


# --------------------------------------------------------------------------- traffic


@dataclass
class Record:
    kind: str  # tenant | hostile
    pod: str
    what: str  # the tenant, or the hostile case's name
    outcome: str
    detail: str = ""


@dataclass
class Traffic:
    """Routes requests like a Service (round robin over the pods in rotation) and classifies
    every answer; ``windows`` are the fault windows per pod (start, end or None)."""

    pods: dict[str, InferencePod]
    in_rotation: set[str] = field(default_factory=set)
    windows: dict[str, list[list[float | None]]] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    turn: int = 0

    def __post_init__(self) -> None:
        self.in_rotation = set(self.pods)
        self.windows = {name: [] for name in self.pods}

    # the chaos driver's side
    def fault_begins(self, key: str, leave_rotation: bool = True) -> None:
        """``key``: a pod (its server is in trouble) or ``<pod>/sync`` (its sidecar; the
        server stays in the rotation)."""
        with self.lock:
            if leave_rotation:
                self.in_rotation.discard(key)
            self.windows.setdefault(key, []).append([time.monotonic(), None])

    def leave_rotation(self, key: str) -> None:
        with self.lock:
            self.in_rotation.discard(key)

    def fault_ends(self, key: str) -> None:
        with self.lock:
            self.windows[key][-1][1] = time.monotonic()
            if key in self.pods:
                self.in_rotation.add(key)

    # the clients' side
    def pick(self, avoid: str | None = None) -> InferencePod | None:
        with self.lock:
            names = sorted(self.in_rotation - {avoid} if len(self.in_rotation) > 1
                           else self.in_rotation)
            if not names:
                return None
            self.turn += 1
            return self.pods[names[self.turn % len(names)]]

    def in_fault(self, pod: str, t0: float, t1: float) -> bool:
        with self.lock:
            return any(start <= t1 and (end is None or end >= t0)
                       for start, end in self.windows.get(pod, []))

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)

    def send(self, client: httpx.Client, kind: str, what: str, method: str, path: str,
             check: Callable[[httpx.Response], str | None], avoid: str | None = None,
             **kwargs: Any) -> str | None:
        """One request; returns the pod's name when it failed in a fault window (retry)."""
        pod = self.pick(avoid)
        if pod is None:
            time.sleep(0.1)
            return None
        t0 = time.monotonic()
        try:
            response = client.request(method, pod.server_url + path, **kwargs)
        except httpx.TransportError as exc:
            t1 = time.monotonic()
            if self.in_fault(pod.name, t0, t1):
                self.add(Record(kind, pod.name, what, "transport_error_in_fault_window",
                                type(exc).__name__))
                return pod.name
            self.add(Record(kind, pod.name, what, "UNEXPECTED", f"{type(exc).__name__}: {exc}"))
            return None
        problem = check(response)
        if problem is None:
            outcome = "ok" if kind == "tenant" else (
                "served" if response.status_code == 200 else f"rejected_{response.status_code}")
            self.add(Record(kind, pod.name, what, outcome))
        else:
            self.add(Record(kind, pod.name, what, "UNEXPECTED",
                            f"{problem}: {response.status_code} {response.text[:300]}"))
        return None


def tenant_loop(traffic: Traffic, tenant: str) -> None:
    def check(r: httpx.Response) -> str | None:
        if r.status_code != 200:
            return "not 200"
        body = r.json()
        if (body.get("tenant_id"), body.get("version")) != (tenant, "v1"):
            return "served by the wrong adapter"
        return None

    body = {"tenant_id": tenant, "prompt": PROMPT, "max_new_tokens": 3, "temperature": 0}
    with httpx.Client(timeout=90) as client:
        avoid: str | None = None
        while not traffic.stop.is_set():
            avoid = traffic.send(client, "tenant", tenant, "POST", "/generate", check,
                                 avoid=avoid, json=body)
            if avoid is None:
                time.sleep(0.05)


def _error_body(r: httpx.Response) -> str | None:
    if not 400 <= r.status_code < 500:
        return "not a 4xx"
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return "no error body"
    if not (error.get("message") and error.get("code") and error.get("status") == r.status_code):
        return "malformed error body"
    return None


def _served(r: httpx.Response) -> str | None:
    """A 200 with generated text (``/generate``'s or an OpenAI choice's)."""
    if r.status_code != 200:
        return "not served"
    body = r.json()
    choices = body.get("choices") or [{}]
    text = body.get("text", choices[0].get("text", (choices[0].get("message") or {}).get(
        "content")))
    return None if isinstance(text, str) else "no text"


JSON = {"Content-Type": "application/json"}
HOSTILE: list[tuple[str, str, dict[str, Any], Callable[[httpx.Response], str | None]]] = [
    ("bad_json", "/generate", {"content": b'{"tenant_id": "legal", "prompt": ', "headers": JSON},
     _error_body),
    ("not_an_object", "/generate", {"content": b"[1, 2, 3]", "headers": JSON}, _error_body),
    ("body_over_limit", "/generate",
     {"json": {"tenant_id": "legal", "prompt": "x" * (2 << 20), "max_new_tokens": 1}},
     _error_body),
    ("prompt_over_model_limit", "/generate",
     {"json": {"tenant_id": "legal", "prompt": "hello " * 30_000, "max_new_tokens": 1}},
     _error_body),
    ("path_traversal_tenant", "/generate",
     {"json": {"tenant_id": "../../etc/passwd", "prompt": PROMPT, "max_new_tokens": 1}},
     _error_body),
    ("nul_in_tenant", "/generate",
     {"json": {"tenant_id": "legal\u0000", "prompt": PROMPT, "max_new_tokens": 1}}, _error_body),
    ("bad_version", "/generate",
     {"json": {"tenant_id": "legal@../../v1", "prompt": PROMPT, "max_new_tokens": 1}},
     _error_body),
    ("unknown_tenant", "/generate",
     {"json": {"tenant_id": "nobody", "prompt": PROMPT, "max_new_tokens": 1}}, _error_body),
    ("huge_max_new_tokens", "/generate",
     {"json": {"tenant_id": "legal", "prompt": PROMPT, "max_new_tokens": 10**12}}, _error_body),
    ("zero_max_new_tokens", "/generate",
     {"json": {"tenant_id": "legal", "prompt": PROMPT, "max_new_tokens": 0}}, _error_body),
    ("huge_temperature", "/generate",
     {"json": {"tenant_id": "legal", "prompt": PROMPT, "temperature": 1e308}}, _error_body),
    ("negative_temperature", "/generate",
     {"json": {"tenant_id": "legal", "prompt": PROMPT, "temperature": -1}}, _error_body),
    ("nan_temperature", "/generate",
     {"content": b'{"tenant_id": "legal", "prompt": "hi", "temperature": NaN}',
      "headers": JSON}, _error_body),
    ("infinite_top_p", "/generate",
     {"content": b'{"tenant_id": "legal", "prompt": "hi", "top_p": Infinity}',
      "headers": JSON}, _error_body),
    ("zero_top_p", "/generate",
     {"json": {"tenant_id": "legal", "prompt": PROMPT, "top_p": 0}}, _error_body),
    ("huge_seed", "/generate",
     {"json": {"tenant_id": "legal", "prompt": PROMPT, "seed": 2**70}}, _error_body),
    ("form_body", "/generate", {"content": b"tenant_id=legal&prompt=hi",
                                "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
     _error_body),
    ("chat_no_messages", "/v1/chat/completions",
     {"json": {"model": "legal", "messages": []}}, _error_body),
    ("chat_bad_role", "/v1/chat/completions",
     {"json": {"model": "legal", "messages": [{"role": "root", "content": "hi"}]}}, _error_body),
    ("completion_many_prompts", "/v1/completions",
     {"json": {"model": "legal", "prompt": ["a", "b"], "max_tokens": 1}}, _error_body),
    # extreme but valid: served
    ("max_temperature_tiny_top_p", "/generate",
     {"json": {"tenant_id": "legal", "prompt": PROMPT, "max_new_tokens": 2,
               "temperature": 5.0, "top_p": 1e-9, "seed": 2**63 - 1}}, _served),
    ("max_temperature_chat", "/v1/chat/completions",
     {"json": {"model": "medical", "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 2, "temperature": 5.0}}, _served),
]


def hostile_loop(traffic: Traffic, pods: dict[str, InferencePod]) -> None:
    """Garbage at the servers (through the rotation) and at the sidecars' API."""
    turn = 0
    with httpx.Client(timeout=90) as client:
        while not traffic.stop.is_set():
            name, path, kwargs, check = HOSTILE[turn % len(HOSTILE)]
            traffic.send(client, "hostile", name, "POST", path, check, **kwargs)
            if turn % 5 == 0:  # the sidecar's API refuses bad desired sets before any change
                pod = pods[POD_NAMES[turn % 2]]
                cases = [("sidecar_no_token", {"json": {"adapters": []}}, 401),
                         ("sidecar_bad_json", {"content": b"{", "headers": {
                             **JSON, "Authorization": f"Bearer {TOKENS['sync']}"}}, None),
                         ("sidecar_bad_name", {"json": {"adapters": [
                             {"tenant": "Bad_Name", "version": "v1", "uri": "s3://b/x/"}]},
                             "headers": {"Authorization": f"Bearer {TOKENS['sync']}"}}, 422)]
                case, options, status = cases[(turn // 5) % len(cases)]
                t0 = time.monotonic()
                try:
                    r = client.put(pod.sync_url + "/v1/desired", **options)
                except httpx.TransportError as exc:
                    # only while that pod's sidecar is being killed
                    outcome = ("transport_error_in_fault_window"
                               if traffic.in_fault(pod.name + "/sync", t0, time.monotonic())
                               else "UNEXPECTED")
                    traffic.add(Record("hostile", pod.name + "/sync", case, outcome,
                                       type(exc).__name__))
                else:
                    problem = _error_body(r) or (
                        None if status is None or r.status_code == status else "wrong status")
                    outcome = f"rejected_{r.status_code}" if problem is None else "UNEXPECTED"
                    if (problem and r.status_code == 401
                            and traffic.in_fault("tokens", t0, time.monotonic())):
                        outcome = "rejected_401_token_in_rotation"  # sent as the file swapped
                    traffic.add(Record("hostile", pod.name + "/sync", case, outcome,
                                       f"{r.status_code} {r.text[:200]}"))
            turn += 1
            time.sleep(0.15)


# --------------------------------------------------------------------------- the test


def test_chaos_nobody_else_goes_down(k8s: K8s, stack: dict[str, Any]) -> None:
    pods: dict[str, InferencePod] = stack["pods"]
    operator: OperatorProcess = stack["operator"]
    traffic = Traffic(pods)
    faults: list[tuple[str, float]] = []  # what, seconds until recovered
    threads = [threading.Thread(target=tenant_loop, args=(traffic, t), daemon=True)
               for t in TENANTS]
    threads.append(threading.Thread(target=hostile_loop, args=(traffic, pods), daemon=True))
    began = time.monotonic()
    for t in threads:
        t.start()

    def ok_count() -> int:
        with traffic.lock:
            return sum(r.outcome == "ok" for r in traffic.records)

    def progress(what: str, more: int = 6, timeout: float = 60) -> None:
        """Tenant requests keep succeeding (``more`` of them since now)."""
        mark = ok_count()
        wait(lambda: ok_count() >= mark + more, f"requests succeeding {what}", timeout)

    def converged() -> bool:
        return all_ready(k8s) and all(serving_all(p) for p in pods.values())

    def server_crash(pod: InferencePod) -> float:
        """SIGKILL while the server is in the rotation (requests in flight die, new ones are
        refused); a probe period later it leaves the rotation; the container restarts; it
        is back in the rotation once its adapters are loaded again."""
        t0 = time.monotonic()
        traffic.fault_begins(pod.name, leave_rotation=False)
        assert pod.server is not None
        pod.server.stop(kill=True)
        time.sleep(1.0)  # the readiness probe's period: clients still send it requests
        traffic.leave_rotation(pod.name)
        pod.restart(server=True, sidecar=False, kill=True)  # start again, pod Ready
        wait(lambda: serving_all(pod), f"{pod.name}'s adapters reloaded", 120)
        traffic.fault_ends(pod.name)
        return time.monotonic() - t0

    try:
        progress("before any fault")

        # 1. the operator: SIGKILL, then a new process
        t0 = time.monotonic()
        operator.stop(kill=True)
        progress("with the operator dead")
        operator.start()
        operator.wait_for_log("loramux operator started", 90)
        wait(converged, "converged after the operator's restart", 90)
        faults.append(("operator SIGKILL + restart", time.monotonic() - t0))

        # 2. a sidecar: SIGKILL, then a new process (its server keeps serving meanwhile)
        pod_a, pod_b = pods["chaos-a"], pods["chaos-b"]
        t0 = time.monotonic()
        traffic.fault_begins(f"{pod_a.name}/sync")
        pod_a.restart(server=False, sidecar=True, kill=True)
        progress("while the sidecar restarts")
        wait(converged, "converged after the sidecar's restart", 90)
        traffic.fault_ends(f"{pod_a.name}/sync")
        faults.append(("sidecar SIGKILL + restart (chaos-a)", time.monotonic() - t0))

        # 3. the tokens rotate (one Secret swapped in every container): the old ones are
        # refused at once, and everybody keeps talking with the new ones (the operator to
        # the sidecars; the sidecars to their servers - steps 4 and 5 reload through it)
        t0 = time.monotonic()
        old = dict(TOKENS)
        traffic.fault_begins("tokens", leave_rotation=False)
        TOKENS.update(sync="chaos-sidecar-token-2", admin="chaos-admin-token-2")
        for kind, path in stack["token_files"].items():
            rotate(path, TOKENS[kind])
        time.sleep(0.5)
        traffic.fault_ends("tokens")
        for pod in pods.values():
            state = httpx.get(pod.sync_url + "/v1/state", timeout=10,
                              headers={"Authorization": f"Bearer {old['sync']}"})
            assert state.status_code == 401, state.text
            admin = httpx.get(pod.server_url + "/admin/adapters", timeout=10,
                              headers={"Authorization": f"Bearer {old['admin']}"})
            assert admin.status_code == 401, admin.text
        time.sleep(5)  # two of the operator's passes with the new token
        wait(converged, "converged after the token rotation", 60)
        faults.append(("sidecar and admin tokens rotated", time.monotonic() - t0))

        # 4. an adapter's local files deleted under a serving pod, then its server killed:
        # the sidecar must fetch the version again before the server can load it
        shutil.rmtree(volume(pod_b) / "legal" / "v1")
        progress("with legal's files deleted on chaos-b")
        back = server_crash(pod_b)
        wait(converged, "converged after chaos-b's server crash", 90)
        faults.append(("server SIGKILL + restart after legal's files were deleted (chaos-b)",
                       back))
        assert (volume(pod_b) / "legal" / "v1" / "manifest.json").is_file()
        progress("after chaos-b is back")

        # 5. the operator and a server down at the same time: the sidecar alone reloads
        t0 = time.monotonic()
        operator.stop(kill=True)
        back = server_crash(pod_a)
        operator.start()
        last_fault_end = time.monotonic()
        operator.wait_for_log("loramux operator started", 90)
        wait(converged, "converged after the operator came back", 120)
        converge_seconds = time.monotonic() - last_fault_end
        faults.append(("server SIGKILL + restart with the operator dead (chaos-a)", back))
        faults.append(("operator SIGKILL during the server crash, then restart",
                       time.monotonic() - t0))
        progress("after every fault", more=9)
    finally:
        traffic.stop.set()
        for t in threads:
            t.join(120)

    # the end state, after the traffic stopped
    wait(converged, "every LoraAdapter Ready again, every pod serving every tenant", 120)

    records = traffic.records
    by_outcome = Counter((r.kind, r.outcome) for r in records)
    by_case = Counter((r.what, r.outcome) for r in records if r.kind == "hostile")
    report = {
        "setup_seconds": round(stack["setup_seconds"], 1),
        "chaos_seconds": round(last_fault_end - began, 1),
        # each fault: seconds from its injection until converged again (every LoraAdapter
        # Ready on both pods; for a server, until its adapters were loaded again)
        "faults": [(what, round(seconds, 1)) for what, seconds in faults],
        "kills": {"operator": 2, "sidecar": 1, "server": 2, "token_rotations": 1},
        "requests_by_outcome": {f"{k}/{o}": n for (k, o), n in sorted(by_outcome.items())},
        "tenant_ok_by_tenant": dict(Counter(r.what for r in records if r.outcome == "ok")),
        "hostile_by_case": {f"{w}/{o}": n for (w, o), n in sorted(by_case.items())},
        # the failures aimed at the faults: transport errors on a pod whose server (or, for
        # the sidecar API cases, whose sidecar) was being killed; retried on another pod
        "expected_failures_by_kind_pod_error": dict(Counter(
            f"{r.kind}/{r.pod}/{r.detail}" for r in records
            if r.outcome == "transport_error_in_fault_window")),
        "seconds_to_converge_after_the_operator_came_back": round(converge_seconds, 1),
    }
    print("\nCHAOS REPORT\n" + json.dumps(report, indent=2))
    unexpected = [r for r in records if r.outcome == "UNEXPECTED"]
    assert not unexpected, unexpected[:10]
    assert by_outcome[("tenant", "ok")] >= 50, report
    assert sum(n for (k, o), n in by_outcome.items() if k == "hostile") >= len(HOSTILE), report
