"""Builders of a hot tenant's dedicated Deployment and Service (pure functions)."""

from __future__ import annotations

import pytest

from loramux.contracts import AccessFile, KeyGrant, TenantAccess, hash_key
from loramux.names import InvalidName
from loramux.operator.dedicated import (
    access_file_of,
    build_access_secret,
    build_deployment,
    build_service,
    dedicated_name,
    deployment_ready,
    pool_access_secret,
    service_url,
)

SHA = "a" * 64
CR = {
    "apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
    "metadata": {"name": "legal", "namespace": "team-a", "uid": "uid-1"},
    "spec": {"tenant": "legal", "version": "v2",
             "source": {"uri": "s3://bucket/adapters/legal/v2/", "sha256": SHA,
                        "credentialsSecret": "s3-creds"},
             "baseModel": "HuggingFaceTB/SmolLM2-135M-Instruct",
             "pool": {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}},
             "dedicated": {"mode": "Always", "replicas": 2}},
}
TEMPLATE = {
    "metadata": {"labels": {"team": "ml"}},
    "spec": {"nodeSelector": {"gpu": "a100"},
             "containers": [{"name": "server", "image": "ghcr.io/x/loramux-inference:1",
                             "resources": {"limits": {"nvidia.com/gpu": 1}},
                             "env": [{"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"},
                                     {"name": "LORAMUX_MODEL", "value": "/models/base"}],
                             "volumeMounts": [{"name": "model", "mountPath": "/models"}]}],
             "volumes": [{"name": "model", "persistentVolumeClaim": {"claimName": "m"}}]},
}


def test_names_are_dns_labels_even_for_long_tenants() -> None:
    assert dedicated_name("legal", "v2") == "lmx-legal-v2"
    long = dedicated_name("t" * 63, "v" * 63)
    assert len(long) <= 63 and long.startswith("lmx-ttt") and not long.endswith("-")
    assert long != dedicated_name("t" * 63, "v" * 62)  # the hash tells them apart
    with pytest.raises(InvalidName):
        dedicated_name("Bad_Name", "v1")


def test_deployment_runs_verified_fetch_then_merged_server() -> None:
    dep = build_deployment(CR, TEMPLATE, replicas=2,
                           secret_keys={"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
    meta, spec = dep["metadata"], dep["spec"]
    assert meta["name"] == "lmx-legal-v2" and meta["namespace"] == "team-a"
    owner = meta["ownerReferences"][0]
    assert owner == {"apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
                     "name": "legal", "uid": "uid-1", "controller": True,
                     "blockOwnerDeletion": True}
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"]["team"] == "ml"
    assert pod["nodeSelector"] == {"gpu": "a100"}
    (fetch,) = pod["initContainers"]
    assert fetch["args"][:1] == ["fetch"]
    assert fetch["args"][fetch["args"].index("--uri") + 1] == "s3://bucket/adapters/legal/v2/"
    assert fetch["args"][fetch["args"].index("--sha256") + 1] == SHA
    env = {e["name"]: e for e in fetch["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert "LORAMUX_MODEL" not in env  # only the S3 settings reach the fetch step
    assert "AWS_SESSION_TOKEN" not in env  # not in the Secret
    # keys the Secret has override the template's (no duplicate names)
    with_endpoint = build_deployment(CR, TEMPLATE, secret_keys={"AWS_ENDPOINT_URL"})
    fetch_env = with_endpoint["spec"]["template"]["spec"]["initContainers"][0]["env"]
    assert [e["name"] for e in fetch_env] == ["AWS_ENDPOINT_URL"]
    assert "valueFrom" in fetch_env[0]
    (server,) = pod["containers"]
    assert server["args"][server["args"].index("--merge-adapter") + 1] == "/adapters/legal/v2"
    assert server["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {m["name"] for m in server["volumeMounts"]} == {"model", "adapters", "tenant-access"}
    assert {v["name"] for v in pod["volumes"]} == {"model", "adapters", "tenant-access"}
    # the template is not modified in place
    assert "initContainers" not in TEMPLATE["spec"]
    # a template's own init containers are kept, before the fetch
    with_init = {"spec": {**TEMPLATE["spec"], "initContainers": [{"name": "resolve-model",
                                                                  "image": "x"}]}}
    inits = build_deployment(CR, with_init)["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["resolve-model", "fetch"]


def test_service_selects_exactly_this_versions_pods() -> None:
    svc = build_service(CR)
    dep = build_deployment(CR, TEMPLATE)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert service_url(svc) == "http://lmx-legal-v2.team-a.svc.cluster.local:8000"
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_template_without_image_is_refused() -> None:
    with pytest.raises(ValueError, match="image"):
        build_deployment(CR, {"spec": {"containers": [{"name": "server"}]}})


@pytest.mark.parametrize(("status", "generation", "ready"), [
    ({"observedGeneration": 2, "availableReplicas": 2, "updatedReplicas": 2}, 2, True),
    ({"observedGeneration": 1, "availableReplicas": 2, "updatedReplicas": 2}, 2, False),
    ({"observedGeneration": 2, "availableReplicas": 1, "updatedReplicas": 2}, 2, False),
    ({"observedGeneration": 2, "availableReplicas": 2, "updatedReplicas": 1}, 2, False),
    ({}, 1, False),
])
def test_deployment_ready(status: dict, generation: int, ready: bool) -> None:
    dep = {"metadata": {"generation": generation}, "spec": {"replicas": 2}, "status": status}
    assert deployment_ready(dep) is ready
    assert deployment_ready(None) is False


def test_dedicated_server_asks_for_keys_from_its_mounted_access_file() -> None:
    dep = build_deployment(CR, TEMPLATE)
    pod = dep["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    args = server["args"]
    assert args[args.index("--auth") + 1] == "keys"
    assert args[args.index("--access-file") + 1] == "/var/run/loramux/access/access.json"
    assert args[-2:] == ["--merge-adapter", "/adapters/legal/v2"]
    mount = next(m for m in server["volumeMounts"] if m["name"] == "tenant-access")
    assert mount == {"name": "tenant-access", "mountPath": "/var/run/loramux/access",
                     "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "tenant-access")
    assert volume == {"name": "tenant-access", "secret": {"secretName": "lmx-legal-v2-access"}}
    # the fetch step never sees it
    assert not any(m["name"] == "tenant-access" for m in pod["initContainers"][0]["volumeMounts"])
    # a pool without keys (the chart's auth.mode=none): the dedicated server asks none either
    open_template = {"spec": {"containers": [{**TEMPLATE["spec"]["containers"][0], "env": [
        {"name": "LORAMUX_AUTH", "value": "none"}]}]}}
    open_args = build_deployment(CR, open_template)["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert open_args[open_args.index("--auth") + 1] == "none"
    # the pool's access Secret annotation is the operator's to read, not the pod's
    annotated = {**TEMPLATE, "metadata": {"labels": {"team": "ml"}, "annotations": {
        "loramux.io/pool-access-secret": "rel-loramux-access", "keep": "me"}}}
    assert pool_access_secret(annotated) == "rel-loramux-access"
    assert pool_access_secret(TEMPLATE) is None
    meta = build_deployment(CR, annotated)["spec"]["template"]["metadata"]
    assert meta["annotations"] == {"keep": "me"}


def test_access_secret_holds_hashes_only_and_is_owned_by_the_lora_adapter() -> None:
    key = "legal-key-0123456789-0123456789-abcdef"
    access = AccessFile(
        grants=[KeyGrant(sha256=hash_key("gateway-" + key), tenants=("*",), name="gateway")],
        tenants={"legal": TenantAccess(key_sha256=(hash_key(key),), weight=2)})
    secret = build_access_secret(CR, "lmx-legal-v2", "v2", access)
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
    meta = secret["metadata"]
    assert meta["name"] == "lmx-legal-v2-access" and meta["namespace"] == "team-a"
    assert meta["ownerReferences"][0]["uid"] == "uid-1"
    assert meta["labels"]["loramux.io/lora-adapter"] == "legal"
    assert meta["labels"]["loramux.io/version"] == "v2"
    text = access_file_of(secret)
    assert text is not None and AccessFile.model_validate_json(text) == access
    assert key not in repr(secret) and key not in text
    assert access_file_of(None) is None
    assert access_file_of({"data": {"access.json": "%%%"}}) is None
