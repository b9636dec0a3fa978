"""Tenant access end to end through the operator (issue 16): ``spec.access`` names a Secret of
API keys; the operator hashes them into the pool's desired sets and into each dedicated
deployment's access Secret; the sidecar pushes them to its server; the server asks for them.

Real processes only, as in tests/test_operator_e2e.py:

- the Kubernetes API is the kmock emulator over HTTP (tests/k8s_harness.py), the CRD and the
  LoraAdapters applied with the real kubectl;
- one pool "pod": a real ``loramux serve --auth keys --access-file`` (tiny fp32 model; its
  access file grants one key the base model, as the chart's ``auth.keys`` would) and a real
  ``loramux sync``;
- S3 is moto's server, the adapters published with ``loramux push``'s push();
- the real ``loramux operator`` process (resync every 2 s: a rotated key is picked up on the
  next pass, since Secrets are not watched), with a dedicated pod template whose annotation
  names the pool's access Secret.

For the hot tenant, what has no kubelet here is done by the test, as in
tests/test_hot_tenants_e2e.py: it runs the Deployment's fetch and its merged server with the
access file the operator wrote into ``<deployment>-access`` (copied to disk as the kubelet
would mount it), and reports the Deployment available.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from factories import stage_adapter
from helpers import wait
from k8s_harness import (
    CRD_PATH,
    S3,
    InferencePod,
    K8s,
    OperatorProcess,
    inference_pod,
    resource_path,
    write_access_file,
)
from loramux.contracts import AccessFile, KeyGrant, hash_key
from loramux.training.publish import push

LORA = ("loramux.io/v1alpha1", "loraadapters")
TOKEN = "access-e2e-sidecar-token"
PROMPT = "Who may call me"
TENANTS = ("legal", "medical", "finance")

pytestmark = pytest.mark.timeout(600)


def new_key(label: str) -> str:
    """A distinctive key (easy to find in a log, were it ever written there)."""
    return f"lmxkey-{label}-{secrets.token_urlsafe(24)}"


# Keys of this module run; every one is checked against every log, status and Event.
KEYS = {
    "legal": new_key("legal"),
    "legal-rotated": new_key("legalrot"),
    "medical": new_key("medical"),
    "finance": new_key("finance"),
    "base": new_key("base"),
    "gateway": new_key("gateway"),
    "short": "short-" + secrets.token_hex(8),  # 22 characters: refused
}


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


@dataclass
class Env:
    k8s: K8s
    pod: InferencePod
    operator: OperatorProcess
    uris: dict[str, str]
    workdir: Path
    tiny_model_dir: Path
    start_server: Any
    merged: list[Any] = field(default_factory=list)

    # ----------------------------------------------------------------- objects
    def put_secret(self, name: str, entries: dict[str, str]) -> None:
        """Create or replace a Secret whose every entry is one API key."""
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": "default"},
                "data": {k: b64(v) for k, v in entries.items()}}
        current = self.k8s.api.find("v1", "secrets", name)
        if current is None:
            self.k8s.api.create(body)
        else:  # PUT (a merge patch would keep removed entries), as `kubectl replace` does
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.k8s.api._call("PUT", resource_path("v1", "secrets", "default", name),
                               json=body)

    def apply(self, tenant: str, access: dict[str, Any] | None,
              dedicated: dict[str, Any] | None = None) -> None:
        spec: dict[str, Any] = {
            "tenant": tenant, "version": "v1", "baseModel": "tiny-llama",
            "source": {"uri": self.uris[tenant]},
            "pool": {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}}}
        if access is not None:
            spec["access"] = access
        if dedicated is not None:
            spec["dedicated"] = dedicated
        assert self.k8s.kubectl is not None
        self.k8s.kubectl.apply(json.dumps({
            "apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
            "metadata": {"name": tenant, "namespace": "default"}, "spec": spec}))

    def status(self, name: str) -> dict[str, Any]:
        return (self.k8s.api.find(*LORA, name) or {}).get("status") or {}

    def condition(self, name: str, ctype: str) -> dict[str, Any]:
        return {c["type"]: c for c in self.status(name).get("conditions") or []}.get(ctype, {})

    def ready(self, name: str) -> dict[str, Any]:
        return wait(lambda: (st := self.status(name)).get("phase") == "Ready" and st,
                    f"{name} Ready", 90)

    def access_is(self, name: str, status: str, reason: str) -> dict[str, Any]:
        return wait(lambda: (c := self.condition(name, "AccessReady")).get("status") == status
                    and c.get("reason") == reason and c, f"{name} AccessReady={status} {reason}")

    def delete(self, *names: str) -> None:
        assert self.k8s.kubectl is not None
        for name in names:
            self.k8s.kubectl("delete", "lora", name, "--ignore-not-found", "--timeout=60s",
                             timeout=90)

    # ----------------------------------------------------------------- calls
    def call(self, model: str, key: str | None, url: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.post(f"{url or self.pod.server_url}/generate", headers=headers, timeout=60,
                          json={"tenant_id": model, "prompt": PROMPT, "max_new_tokens": 4,
                                "temperature": 0})

    def status_code(self, model: str, key: str | None) -> int:
        return self.call(model, key).status_code

    def becomes(self, model: str, key: str | None, code: int, timeout: float = 60) -> None:
        wait(lambda: self.status_code(model, key) == code,
             f"{model} answers {code} to that key", timeout)

    # ----------------------------------------------------------------- leaks
    def everything_written(self) -> str:
        """Every log of the module's processes, every LoraAdapter (status included) and
        every Event, as text."""
        assert self.pod.sidecar is not None and self.pod.server is not None
        parts = [self.operator.log(), self.pod.sidecar.log(), self.pod.server.log(),
                 json.dumps(self.k8s.api.list(*LORA)),
                 json.dumps(self.k8s.api.list("v1", "events"))]
        parts += [Path(m.log_path).read_text(errors="replace") for m in self.merged]
        return "\n".join(parts)

    def assert_no_key_leaked(self) -> None:
        text = self.everything_written()
        assert "loramux operator started" in text  # the logs are really there
        for label, key in KEYS.items():
            for form in (key, b64(key)):
                assert form not in text, f"the {label} key appears in a log, status or Event"
        # not even the hash of a refused key, nor the base64 of any entry value
        assert hash_key(KEYS["short"]) not in text


@pytest.fixture(scope="module")
def env(k8s: K8s, s3_server: S3, tiny_model_dir: Path, adapter_root: Path, start_server,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    assert k8s.kubectl is not None
    k8s.kubectl.apply(CRD_PATH)
    workdir = tmp_path_factory.mktemp("access")
    bucket = f"access-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    uris = {}
    for tenant in TENANTS:
        uris[tenant] = f"s3://{bucket}/{tenant}/v1/"
        push(stage_adapter(adapter_root, workdir / "stage", tenant, "v1")[0], uris[tenant],
             client=s3_server.client, progress=False)
    # The pool's grants (the chart's auth.keys): one key grants the base model only, a
    # gateway's key every tenant. The pool server reads them from its access file, and the
    # operator copies them into dedicated access files from the Secret the template names.
    gateway = KeyGrant(sha256=hash_key(KEYS["gateway"]), tenants=("*",), name="gateway")
    pool_file = AccessFile(grants=[KeyGrant(sha256=hash_key(KEYS["base"]), base=True,
                                            name="base-only"), gateway])
    pod = inference_pod(k8s.api, "pool-a", workdir / "pods", sidecar_token=TOKEN,
                        server_args=["--model", str(tiny_model_dir), "--quantization", "none",
                                     "--log-format", "text", "--route-retry-s", "1"],
                        auth="keys", access_file=pool_file)
    k8s.api.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": "pool-access", "namespace": "default"},
                    "data": {"access.json": b64(pool_file.model_dump_json())}})
    template = workdir / "pod-template.yaml"
    template.write_text(yaml.safe_dump({
        "metadata": {"annotations": {"loramux.io/pool-access-secret": "pool-access"}},
        "spec": {"containers": [{"name": "server", "image": "loramux/inference:test"}]}}))
    operator = OperatorProcess(
        k8s.kubeconfig, workdir / "operator.log",
        ["--namespace", "default", "--resync-seconds", "2", "--health-port", "0",
         "--sidecar-token", TOKEN, "--dedicated-template-file", str(template),
         "--log-level", "debug"])  # debug: the leak check reads the most there is
    operator.start()
    try:
        operator.wait_for_log("loramux operator started", 60)
        yield Env(k8s, pod, operator, uris, workdir, tiny_model_dir, start_server)
    finally:
        operator.stop()
        pod.stop()


# --------------------------------------------------------------------------- scenarios


def test_keys_from_the_secret_401_403_and_rotation_without_restart(env: Env) -> None:
    env.put_secret("legal-keys", {"primary": KEYS["legal"]})
    env.put_secret("medical-keys", {"primary": KEYS["medical"] + "\n"})  # echo's newline
    env.apply("legal", {"secretName": "legal-keys", "weight": 2,
                        "limits": {"maxConcurrent": 8}})
    env.apply("medical", {"secretName": "medical-keys"})
    try:
        env.ready("legal")
        env.ready("medical")
        cond = env.access_is("legal", "True", "KeysLoaded")
        assert "1 key from Secret 'legal-keys'" in cond["message"]
        # the sidecar reports the server's access: the hashes arrived as sent
        wait(lambda: "applied on 1/1 pod(s)" in env.condition("legal", "AccessReady")[
            "message"], "legal's access applied on the pod")
        env.access_is("medical", "True", "KeysLoaded")
        server_pid = env.pod.server.proc.pid if env.pod.server and env.pod.server.proc else 0
        sidecar_pid = env.pod.sidecar.proc.pid if env.pod.sidecar and env.pod.sidecar.proc \
            else 0

        # the right key
        env.becomes("legal", KEYS["legal"], 200)
        assert env.call("legal", KEYS["legal"]).json()["text"]
        env.becomes("medical", KEYS["medical"], 200)
        # a wrong key, no key: 401 (and the body names no key)
        wrong = env.call("legal", new_key("wrong"))
        assert wrong.status_code == 401, wrong.text
        assert wrong.headers.get("www-authenticate", "").lower().startswith("bearer")
        assert env.status_code("legal", None) == 401
        # another tenant's key: 403, both ways; the pool-wide base key grants no tenant
        other = env.call("legal", KEYS["medical"])
        assert other.status_code == 403, other.text
        assert env.status_code("medical", KEYS["legal"]) == 403
        assert env.status_code("legal", KEYS["base"]) == 403
        assert env.status_code("tiny-llama", KEYS["base"]) == 200
        assert env.status_code("tiny-llama", KEYS["legal"]) == 403
        # the server holds what the operator sent: hashes only, the spec's weight and limits
        access = {a["tenant"]: a for a in httpx.get(
            f"{env.pod.server_url}/admin/access", timeout=10).json()["tenants"]}
        assert access["legal"]["keys"] == 1 and access["legal"]["weight"] == 2
        assert access["legal"]["limits"]["max_concurrent"] == 8
        assert access["legal"]["source"] == "admin"

        # rotation through the Secret: the new key works, the old one is refused, nothing
        # restarts
        env.put_secret("legal-keys", {"primary": KEYS["legal-rotated"]})
        env.becomes("legal", KEYS["legal-rotated"], 200)
        env.becomes("legal", KEYS["legal"], 401)
        assert env.status_code("medical", KEYS["medical"]) == 200  # the others keep theirs
        assert env.pod.server is not None and env.pod.sidecar is not None
        assert env.pod.server.alive and env.pod.sidecar.alive
        assert (env.pod.server.starts, env.pod.sidecar.starts) == (1, 1)
        assert env.pod.server.proc is not None and env.pod.sidecar.proc is not None
        assert (env.pod.server.proc.pid, env.pod.sidecar.proc.pid) == (server_pid, sidecar_pid)
        assert env.status("legal")["phase"] == "Ready"

        env.assert_no_key_leaked()
    finally:
        env.delete("legal", "medical")


def test_missing_secret_and_short_keys_fail_closed(env: Env) -> None:
    """No Secret: nobody can call the tenant, which stays loaded; a short key is left out and
    the condition names its entry, never its value."""
    env.apply("finance", {"secretName": "finance-keys"})
    try:
        env.ready("finance")  # loaded, although no key can call it
        cond = env.access_is("finance", "False", "SecretNotFound")
        assert "finance-keys" in cond["message"]
        env.becomes("finance", KEYS["finance"], 401)
        assert env.status_code("finance", KEYS["base"]) == 403
        access = {a["tenant"]: a for a in httpx.get(
            f"{env.pod.server_url}/admin/access", timeout=10).json()["tenants"]}
        assert access["finance"]["keys"] == 0

        # the Secret appears, with one good key and one too short: the good one works at
        # once (no restart), the short one never
        env.put_secret("finance-keys", {"good": KEYS["finance"], "legacy": KEYS["short"]})
        cond = env.access_is("finance", "False", "KeyTooShort")
        assert "'legacy'" in cond["message"] and "'good'" not in cond["message"]
        env.becomes("finance", KEYS["finance"], 200)
        assert env.status_code("finance", KEYS["short"]) == 401
        events = [e for e in env.k8s.api.list("v1", "events")["items"]
                  if (e.get("involvedObject") or {}).get("name") == "finance"]
        assert {("Warning", "SecretNotFound"), ("Warning", "KeyTooShort")} <= {
            (e["type"], e["reason"]) for e in events}
        assert env.status("finance")["phase"] == "Ready"

        # the short key replaced by a long one: AccessReady=True
        env.put_secret("finance-keys", {"good": KEYS["finance"]})
        env.access_is("finance", "True", "KeysLoaded")
        env.assert_no_key_leaked()
    finally:
        env.delete("finance")


def _secret_file(env: Env, name: str) -> AccessFile | None:
    secret = env.k8s.api.find("v1", "secrets", name)
    if secret is None:
        return None
    return AccessFile.model_validate_json(base64.b64decode(secret["data"]["access.json"]))


def test_hot_tenant_dedicated_deployment_asks_the_same_keys(env: Env) -> None:
    """The dedicated deployment's access Secret holds the tenant's key hashes and the pool's
    grants; its merged server, run with that file, takes the forwarded requests of both, and
    follows a rotation when the file changes."""
    k8s = env.k8s
    name = "lmx-legal-v1"
    env.put_secret("legal-keys", {"primary": KEYS["legal"]})
    env.apply("legal", {"secretName": "legal-keys"}, {"mode": "Always"})
    try:
        env.ready("legal")
        dep = wait(lambda: k8s.api.find("apps/v1", "deployments", name), "the Deployment")
        written = wait(lambda: _secret_file(env, f"{name}-access"), "the access Secret")
        legal = written.tenants["legal"]
        assert legal.key_sha256 == (hash_key(KEYS["legal"]),)
        assert [g.name for g in written.grants] == ["base-only", "gateway"]
        cr = k8s.api.get(*LORA, "legal")
        secret = k8s.api.get("v1", "secrets", f"{name}-access")
        (owner,) = secret["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("LoraAdapter", cr["metadata"]["uid"])

        # be the kubelet: the fetch, then the merged server with the mounted access file
        pod_spec = dep["spec"]["template"]["spec"]
        (fetch,) = pod_spec["initContainers"]
        (server,) = pod_spec["containers"]
        volume = env.workdir / f"volume-{name}"
        args = [a.replace("/adapters", str(volume)) for a in fetch["args"]]
        done = subprocess.run([sys.executable, "-P", "-m", "loramux.cli", *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        sargs = server["args"]
        assert sargs[sargs.index("--auth") + 1] == "keys"
        mounted = sargs[sargs.index("--access-file") + 1]
        (access_volume,) = [v for v in pod_spec["volumes"] if v["name"] == "tenant-access"]
        assert access_volume["secret"]["secretName"] == f"{name}-access"
        access_path = write_access_file(env.workdir / f"mount-{name}" / Path(mounted).name,
                                        written)
        merge_dir = sargs[sargs.index("--merge-adapter") + 1]
        merged = env.start_server("--model", str(env.tiny_model_dir), "--quantization",
                                  "none", "--log-format", "text", "--auth", "keys",
                                  "--access-file", str(access_path), "--merge-adapter",
                                  merge_dir.replace("/adapters", str(volume)))
        env.merged.append(merged)
        port = int(merged.url.rsplit(":", 1)[1])
        k8s.api.patch("v1", "services", name, {"spec": {
            "clusterIP": "127.0.0.1", "ports": [{"name": "http", "port": port,
                                                 "targetPort": "http"}]}})
        k8s.api.patch_status("apps/v1", "deployments", name, {
            "observedGeneration": dep["metadata"]["generation"], "replicas": 1,
            "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1})

        # the dedicated server asks what the pool asks
        assert env.call("legal", KEYS["legal"], merged.url).status_code == 200
        assert env.call("legal", KEYS["gateway"], merged.url).status_code == 200
        assert env.call("legal", None, merged.url).status_code == 401
        assert env.call("legal", KEYS["base"], merged.url).status_code == 403
        assert env.call("legal", new_key("wrong"), merged.url).status_code == 401

        def routed(key: str) -> bool:
            r = env.call("legal", key)
            return r.status_code == 200 and r.headers.get("x-loramux-routed") == "dedicated"

        # through the pool: forwarded with the caller's key, accepted there
        wait(lambda: routed(KEYS["legal"]), "legal's key routed to the dedicated pod", 60)
        assert routed(KEYS["gateway"])
        assert env.status_code("legal", None) == 401  # refused by the pool already

        # rotation: the operator rewrites the access Secret; the kubelet's refresh (the
        # test's copy) is followed by the running server
        env.put_secret("legal-keys", {"primary": KEYS["legal-rotated"]})
        rotated = wait(lambda: (f := _secret_file(env, f"{name}-access")) is not None
                       and f.tenants["legal"].key_sha256 == (hash_key(KEYS["legal-rotated"]),)
                       and f, "the rotated access Secret", 30)
        write_access_file(access_path, rotated)
        wait(lambda: env.call("legal", KEYS["legal-rotated"], merged.url).status_code == 200,
             "the rotated key on the dedicated server", 30)
        wait(lambda: env.call("legal", KEYS["legal"], merged.url).status_code == 401,
             "the old key refused by the dedicated server", 30)
        assert merged.proc.poll() is None  # no restart
        env.assert_no_key_leaked()
    finally:
        env.delete("legal")
        for merged in env.merged:
            merged.stop()
