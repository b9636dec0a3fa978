"""Kubernetes objects of a hot tenant's dedicated deployment (pure builders, no I/O).

One Deployment and one Service per tenant *version* (``lmx-<tenant>-<version>``), owned by
the LoraAdapter, so they are garbage-collected with it. A version rollout creates the new
pair beside the old one; routing switches only once the new Deployment is Ready, and the old
pair is deleted after that.

The pod runs the same image as the pool:

* init container ``fetch``: ``loramux fetch`` (the sync sidecar's verified, atomic
  download path: manifest, sha256 of every file, digest pin, no pickles) into the pod's
  ``adapters`` volume, with S3 credentials from the LoraAdapter's ``credentialsSecret``;
* container ``server``: ``loramux serve --auth keys --access-file <access.json>
  --merge-adapter /adapters/<tenant>/<version>``, the adapter merged into a dequantized
  base; probes on ``/healthz`` and ``/readyz`` (``--auth none`` only when the template's
  ``LORAMUX_AUTH`` says so, i.e. the pool runs without keys too).

Access: a Secret ``<deployment name>-access`` (owned by the LoraAdapter too, built by
:func:`build_access_secret`) holds ``access.json``, an :class:`~loramux.contracts.AccessFile`
with the tenant's :class:`~loramux.contracts.TenantAccess` (key hashes, weight, limits from
``spec.access``) and the pool-wide key grants (the chart's, from the Secret the template's
``loramux.io/pool-access-secret`` annotation names). It is mounted read-only; the operator
rewrites it when the access changes, the kubelet refreshes the mounted file and the server
re-reads it, so a key rotation needs no restart. Without ``spec.access`` the file holds the
pool-wide grants only, as on the pool: the dedicated server accepts exactly the keys the
pool would (the pool forwards the caller's request, key included).

Everything else of the pod (image, resources, GPU, node selection, model volume, env) comes
from a template the Helm chart renders from its values (``dedicated.podTemplate``), so the
operator never invents resources.
"""

from __future__ import annotations

import base64
import copy
import hashlib
from typing import Any

import kopf

from loramux.contracts import AccessFile
from loramux.names import validate_label
from loramux.operator.model import API_VERSION, KIND
from loramux.s3 import CREDENTIAL_KEYS

ADAPTERS_MOUNT = "/adapters"
SERVER_CONTAINER = "server"
HTTP_PORT = 8000
APP_LABEL = "loramux-dedicated"
TENANT_LABEL = "loramux.io/tenant"
VERSION_LABEL = "loramux.io/version"
OWNER_LABEL = "loramux.io/lora-adapter"
# A template annotation naming a Secret of S3 keys for the fetch step only (the chart sets it
# from the pool's S3 Secret); mounted as files, never as env of the server.
FETCH_SECRET_ANNOTATION = "loramux.io/fetch-s3-secret"
FETCH_SECRET_MOUNT = "/var/run/loramux/s3"
# A template annotation naming the pool's access Secret (key ``access.json``, an AccessFile):
# its key grants are copied into every dedicated deployment's own access file.
POOL_ACCESS_ANNOTATION = "loramux.io/pool-access-secret"
ACCESS_VOLUME = "tenant-access"
ACCESS_MOUNT = "/var/run/loramux/access"
ACCESS_FILE = "access.json"
ACCESS_SECRET_SUFFIX = "-access"


def dedicated_name(tenant: str, version: str) -> str:
    """``lmx-<tenant>-<version>``, shortened with a hash to stay a DNS-1123 label (a Service
    name must be one)."""
    validate_label(tenant, "tenant")
    validate_label(version, "version")
    name = f"lmx-{tenant}-{version}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(f"{tenant}@{version}".encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def access_secret_name(deployment: str) -> str:
    """The access Secret of dedicated Deployment ``deployment`` (a Secret name may be 253
    characters; a dedicated name is at most 63)."""
    return f"{deployment}{ACCESS_SECRET_SUFFIX}"


def pool_access_secret(template: dict[str, Any] | None) -> str | None:
    """The pool's access Secret the template's annotation names, or None."""
    annotations = ((template or {}).get("metadata") or {}).get("annotations") or {}
    name = annotations.get(POOL_ACCESS_ANNOTATION)
    return name if isinstance(name, str) and name else None


def auth_mode(server: dict[str, Any]) -> str:
    """The pool's auth mode, from the template's ``LORAMUX_AUTH`` (the chart's
    ``auth.mode``): ``none`` only when the template says so, else ``keys``. The pool forwards
    a hot tenant's requests as they came, so the dedicated server must ask what the pool
    asks."""
    for env in server.get("env") or []:
        if env.get("name") == "LORAMUX_AUTH" and env.get("value") == "none":
            return "none"
    return "keys"


def selector_labels(tenant: str, version: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP_LABEL, TENANT_LABEL: tenant, VERSION_LABEL: version}


def _owned(obj: dict[str, Any], cr: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the LoraAdapter as its controlling owner (garbage-collected with it)."""
    # A LoraAdapter read from a list may lack apiVersion/kind; the owner reference needs them.
    owner = {"apiVersion": cr.get("apiVersion") or API_VERSION, "kind": cr.get("kind") or KIND,
             "metadata": cr["metadata"]}
    kopf.append_owner_reference(obj, owner=owner)  # type: ignore[arg-type]
    return obj


def _fetch_env(template_env: list[dict[str, Any]], secret: str | None,
               secret_keys: set[str] | None) -> list[dict[str, Any]]:
    """The template's ``AWS_*`` settings, overridden by the keys the credentials Secret has
    (``secret_keys``: the key names the operator read; values stay in the Secret)."""
    from_secret = [k for k in CREDENTIAL_KEYS
                   if secret and (secret_keys is None or k in secret_keys)]
    env = [e for e in template_env
           if e.get("name", "").startswith("AWS_") and e.get("name") not in from_secret]
    return env + [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                  for key in from_secret]


def build_deployment(cr: dict[str, Any], template: dict[str, Any], *, replicas: int = 1,
                     secret_keys: set[str] | None = None) -> dict[str, Any]:
    """The dedicated Deployment of ``cr`` (a LoraAdapter as the API returns it).

    ``secret_keys`` are the keys present in ``source.credentialsSecret`` (None: all of
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
    ``AWS_ENDPOINT_URL``)."""
    spec = cr["spec"]
    tenant, version = spec["tenant"], spec["version"]
    name = dedicated_name(tenant, version)
    labels = selector_labels(tenant, version)
    pod = copy.deepcopy(template or {})
    pod_meta = pod.setdefault("metadata", {})
    annotations = dict(pod_meta.get("annotations") or {})
    fetch_secret = annotations.pop(FETCH_SECRET_ANNOTATION, None)
    annotations.pop(POOL_ACCESS_ANNOTATION, None)  # the operator's to read, not the pod's
    if annotations:
        pod_meta["annotations"] = annotations
    else:
        pod_meta.pop("annotations", None)
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **labels,
                          OWNER_LABEL: cr["metadata"]["name"]}
    pod_spec = pod.setdefault("spec", {})
    containers = pod_spec.setdefault("containers", [])
    server = next((c for c in containers if c.get("name") == SERVER_CONTAINER), None)
    if server is None:
        server = {"name": SERVER_CONTAINER}
        containers.insert(0, server)
    image = server.get("image")
    if not image:
        raise ValueError("the dedicated pod template has no image for container 'server'")
    adapter_dir = f"{ADAPTERS_MOUNT}/{tenant}/{version}"
    server["command"] = ["loramux"]
    server["args"] = ["serve", "--host", "0.0.0.0", "--port", str(HTTP_PORT),
                      "--auth", auth_mode(server), "--access-file",
                      f"{ACCESS_MOUNT}/{ACCESS_FILE}", "--merge-adapter", adapter_dir]
    server["ports"] = [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}]
    server["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": "http"},
                                "periodSeconds": 5, "failureThreshold": 3}
    server["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": "http"},
                               "periodSeconds": 10, "failureThreshold": 6}
    server["startupProbe"] = {"httpGet": {"path": "/healthz", "port": "http"},
                              "periodSeconds": 5, "failureThreshold": 120}
    mounts = [m for m in server.get("volumeMounts") or []
              if m.get("name") not in ("adapters", ACCESS_VOLUME)]
    server["volumeMounts"] = [*mounts, {"name": "adapters", "mountPath": ADAPTERS_MOUNT,
                                        "readOnly": True},
                              {"name": ACCESS_VOLUME, "mountPath": ACCESS_MOUNT,
                               "readOnly": True}]
    fetch_args = ["fetch", "--root", ADAPTERS_MOUNT, "--tenant", tenant, "--version", version,
                  "--uri", spec["source"]["uri"]]
    if spec["source"].get("sha256"):
        fetch_args += ["--sha256", spec["source"]["sha256"]]
    fetch = {"name": "fetch", "image": image,
             "imagePullPolicy": server.get("imagePullPolicy", "IfNotPresent"),
             "command": ["loramux"], "args": fetch_args,
             "env": _fetch_env(server.get("env") or [],
                               spec["source"].get("credentialsSecret"), secret_keys),
             "volumeMounts": [{"name": "adapters", "mountPath": ADAPTERS_MOUNT}],
             "securityContext": copy.deepcopy(server.get("securityContext") or {})}
    if not fetch["securityContext"]:
        del fetch["securityContext"]
    use_fetch_secret = fetch_secret and not spec["source"].get("credentialsSecret")
    if use_fetch_secret:
        fetch["env"].append({"name": "LORAMUX_FETCH_S3_CREDENTIALS_DIR",
                             "value": FETCH_SECRET_MOUNT})
        fetch["volumeMounts"].append({"name": "fetch-s3-credentials",
                                      "mountPath": FETCH_SECRET_MOUNT, "readOnly": True})
    # The template's own init containers (e.g. resolving a model from a cache) run first.
    inits = [c for c in pod_spec.get("initContainers") or [] if c.get("name") != "fetch"]
    pod_spec["initContainers"] = [*inits, fetch]
    volumes = [v for v in pod_spec.get("volumes") or []
               if v.get("name") not in ("adapters", "fetch-s3-credentials", ACCESS_VOLUME)]
    pod_spec["volumes"] = [*volumes, {"name": "adapters", "emptyDir": {}},
                           {"name": ACCESS_VOLUME,
                            "secret": {"secretName": access_secret_name(name)}}]
    if use_fetch_secret:
        pod_spec["volumes"].append({"name": "fetch-s3-credentials",
                                    "secret": {"secretName": fetch_secret}})
    return _owned({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": cr["metadata"]["namespace"],
                     "labels": {**labels, OWNER_LABEL: cr["metadata"]["name"]}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": pod,
                 "strategy": {"type": "RollingUpdate",
                              "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}},
    }, cr)


def build_access_secret(cr: dict[str, Any], deployment: str, version: str,
                        access: AccessFile) -> dict[str, Any]:
    """The access Secret of dedicated Deployment ``deployment`` (of ``version``): its
    ``access.json`` is ``access`` (key hashes only, never a key)."""
    tenant = cr["spec"]["tenant"]
    labels = {**selector_labels(tenant, version), OWNER_LABEL: cr["metadata"]["name"]}
    body = access.model_dump_json().encode()
    return _owned({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": access_secret_name(deployment),
                     "namespace": cr["metadata"]["namespace"], "labels": labels},
        "data": {ACCESS_FILE: base64.b64encode(body).decode()},
    }, cr)


def access_file_of(secret: dict[str, Any] | None) -> str | None:
    """The ``access.json`` text of an access Secret as read (None: absent or unreadable)."""
    raw = ((secret or {}).get("data") or {}).get(ACCESS_FILE)
    if not isinstance(raw, str):
        return None
    try:
        return base64.b64decode(raw, validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def build_service(cr: dict[str, Any]) -> dict[str, Any]:
    spec = cr["spec"]
    tenant, version = spec["tenant"], spec["version"]
    labels = selector_labels(tenant, version)
    return _owned({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": dedicated_name(tenant, version),
                     "namespace": cr["metadata"]["namespace"],
                     "labels": {**labels, OWNER_LABEL: cr["metadata"]["name"]}},
        "spec": {"selector": labels, "type": "ClusterIP",
                 "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http",
                            "protocol": "TCP"}]},
    }, cr)


def service_url(service: dict[str, Any], cluster_domain: str = "cluster.local") -> str:
    meta = service["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc.{cluster_domain}:{HTTP_PORT}"


def deployment_ready(deployment: dict[str, Any] | None) -> bool:
    """Ready = the controller saw the current spec and every wanted replica is available
    and updated."""
    if not deployment:
        return False
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    meta = deployment.get("metadata") or {}
    wanted = int(spec.get("replicas", 1))
    if status.get("observedGeneration", 0) < meta.get("generation", 0):
        return False
    return (wanted > 0 and int(status.get("availableReplicas") or 0) >= wanted
            and int(status.get("updatedReplicas") or 0) >= wanted)


__all__ = ["access_file_of", "access_secret_name", "build_access_secret", "build_deployment",
           "build_service", "dedicated_name", "deployment_ready", "pool_access_secret",
           "selector_labels", "service_url"]
