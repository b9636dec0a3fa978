"""Builders of a hot tenant's dedicated Deployment and Service (pure functions)."""

from __future__ import annotations

import pytest

from loramux.names import InvalidName
from loramux.operator.dedicated import (
    build_deployment,
    build_service,
    dedicated_name,
    deployment_ready,
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
    assert {m["name"] for m in server["volumeMounts"]} == {"model", "adapters"}
    assert {v["name"] for v in pod["volumes"]} == {"model", "adapters"}
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
