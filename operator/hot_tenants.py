"""Hot tenants: promote a LoraAdapter to a dedicated merged Deployment, route to it, demote.

Each reconcile pass:

1. :func:`scrape_token_totals` reads the tokens served per tenant from every pool pod's
   per-tenant ``/metrics`` (the container port named ``metrics``; the public port only
   shows sums over tenants) and sums them per (namespace, tenant): prompt + generated
   tokens the pod served itself, plus the tokens of the requests it forwarded to the
   tenant's dedicated deployment (``loramux_forwarded_tokens_total``, from the forwarded
   answers' usage), so a promoted tenant's traffic still counts.
   :class:`HotTenants` keeps the history.
2. :func:`hot_policy.decide` turns ``spec.dedicated`` (:class:`~model.DedicatedSpec`) and
   the history into promote, demote or hold.
3. :func:`plan` (pure) turns that decision and what exists (the CR's dedicated Deployments
   and Services, one pair per version, see :mod:`dedicated`) into objects to create, objects
   to delete, and the routes the pool pods' sidecars get:

   * a route to a version exists only while that version's Deployment is Ready;
   * after a version rollout the old pair is deleted only once the new one is Ready, every
     pool pod serves the new version and no pod routes to the old one any more;
   * on demotion the routes go first; the pair is deleted only once no pod routes to it.

The shared pool keeps the adapter loaded the whole time (it stays in every desired set),
so a pool server can always answer the tenant itself. The history of a tenant whose
LoraAdapter is gone or whose mode is Never is forgotten (:meth:`HotTenants.prune`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loramux.names import InvalidName
from loramux.operator.dedicated import (
    APP_LABEL,
    HTTP_PORT,
    OWNER_LABEL,
    TENANT_LABEL,
    VERSION_LABEL,
    build_deployment,
    build_service,
    dedicated_name,
    deployment_ready,
    selector_labels,
    service_url,
)
from loramux.operator.hot_policy import (
    Decision,
    RateHistory,
    Sample,
    decide,
    interval_rates,
)
from loramux.operator.kube import KubeApi
from loramux.operator.model import AdapterSpec, PodKey, container_port, pod_ip

log = logging.getLogger("loramux.operator.hot")

# The counters whose sum is what a tenant is served: tokens, not requests. Forwarded tokens
# are those of requests this pod passed to the tenant's dedicated deployment (the pod did not
# run them, so they are not in the other two).
TOKEN_COUNTERS = ("loramux_prompt_tokens_total", "loramux_completion_tokens_total",
                  "loramux_forwarded_tokens_total")
METRICS_PORT_NAME = "metrics"  # the pod's container port of the per-tenant /metrics

# One sample line of the Prometheus text format for those counters (an optional timestamp
# after the value). The operator image carries no prometheus_client; these lines are simple
# enough to read directly.
_TOKENS = re.compile(
    r'^(?:' + "|".join(TOKEN_COUNTERS) + r')\{([^}]*)\}[ \t]+([0-9.eE+-]+)(?:[ \t]+-?\d+)?'
    r'[ \t]*$', re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_token_totals(text: str) -> dict[str, float]:
    """tenant -> tokens served (the sum of :data:`TOKEN_COUNTERS`) from one server's
    per-tenant ``/metrics`` text. Series without a tenant label (the public port's sums over
    tenants) and ``_base`` (the base model, never promoted) are left out."""
    totals: dict[str, float] = {}
    for labels, value in _TOKENS.findall(text):
        tenant = dict(_LABEL.findall(labels)).get("tenant")
        if tenant and not tenant.startswith("_"):  # "_base": the base model
            try:
                number = float(value)
            except ValueError:
                continue
            if number == number and number >= 0:  # not NaN, not negative
                totals[tenant] = totals.get(tenant, 0.0) + number
    return totals


def metrics_url(pod: Mapping[str, Any], server_port: int) -> tuple[str, bool]:
    """Where a pool pod's per-tenant counters are: ``/metrics`` on its container port named
    ``metrics``, and True. A pod without one: its server port's ``/metrics`` and False
    (that only has sums over tenants, so the pod contributes no tenant's tokens)."""
    ip = pod_ip(pod) or "0.0.0.0"
    host = f"[{ip}]" if ":" in ip else ip
    port = container_port(pod, METRICS_PORT_NAME, 0)
    if port > 0:
        return f"http://{host}:{port}/metrics", True
    return f"http://{host}:{container_port(pod, 'http', server_port)}/metrics", False


@dataclass
class Existing:
    """The dedicated objects a LoraAdapter owns, by version."""

    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.deployments and not self.services


def endpoint(service: Mapping[str, Any], cluster_domain: str = "cluster.local") -> str:
    """The Service's URL: its cluster IP and port once allocated, else its DNS name (only
    Services that :func:`not_ours` accepts, the operator's own, get here)."""
    spec = service.get("spec") or {}
    ip = spec.get("clusterIP")
    ports = spec.get("ports") or [{}]
    port = ports[0].get("port", HTTP_PORT) if isinstance(ports[0], Mapping) else HTTP_PORT
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        port = HTTP_PORT
    if isinstance(ip, str) and ip and ip != "None":
        host = f"[{ip}]" if ":" in ip else ip
        return f"http://{host}:{port}"
    return service_url(dict(service), cluster_domain)


def not_ours(item: Mapping[str, Any], kind: str, owner_uid: str | None) -> str | None:
    """Why a listed dedicated Deployment or Service is not one this operator made for the
    LoraAdapter of uid ``owner_uid``, or None. Only such objects are ever routed to (a route
    URL is built from our own Service) or deleted; anyone able to create a Service with the
    right labels could otherwise point a tenant's traffic at any host."""
    meta = item.get("metadata") or {}
    labels = meta.get("labels") or {}
    tenant, version = labels.get(TENANT_LABEL), labels.get(VERSION_LABEL)
    try:
        name = dedicated_name(str(tenant), str(version))
    except InvalidName:
        return "bad tenant/version labels"
    if meta.get("name") != name:
        return f"name is not {name}"
    if not owner_uid or not any(
            isinstance(ref, Mapping) and ref.get("controller") is True
            and ref.get("kind") == "LoraAdapter" and ref.get("uid") == owner_uid
            for ref in meta.get("ownerReferences") or []):
        return "not controlled by its LoraAdapter"
    if kind == "Service":
        spec = item.get("spec") or {}
        if spec.get("type", "ClusterIP") != "ClusterIP" or spec.get("externalName") \
                or spec.get("externalIPs"):
            return "not a plain ClusterIP Service"
        if dict(spec.get("selector") or {}) != selector_labels(str(tenant), str(version)):
            return "selects other pods than the dedicated Deployment's"
    return None


@dataclass
class Plan:
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, ns, name)
    routes: dict[str, str] = field(default_factory=dict)  # version -> url
    endpoint: str | None = None
    condition: dict[str, str] = field(default_factory=dict)


def _condition(ok: bool, reason: str, message: str) -> dict[str, str]:
    return {"type": "Dedicated", "status": "True" if ok else "False", "reason": reason,
            "message": message}


def plan(cr: Mapping[str, Any], decision: Decision, existing: Existing,
         template: Mapping[str, Any] | None, *, routed_versions: set[str],
         pool_serves_version: bool, replicas: int = 1, secret_keys: set[str] | None = None,
         cluster_domain: str = "cluster.local") -> Plan:
    """What to do for one LoraAdapter (pure).

    ``routed_versions``: versions of this tenant that some pool pod's server routes to now
    (from the sidecars' state). ``pool_serves_version``: every pool pod serves
    ``spec.version`` (the rollout there is finished). ``replicas``: the dedicated
    Deployment's (``spec.dedicated.replicas``). A decision on an invalid ``spec.dedicated``
    (``decision.invalid``) holds what exists, and the condition's reason is InvalidSpec with
    the problem in the message (its status still says whether a dedicated one serves).
    """
    out = _plan(cr, decision, existing, template, routed_versions=routed_versions,
                pool_serves_version=pool_serves_version, replicas=replicas,
                secret_keys=secret_keys, cluster_domain=cluster_domain)
    if decision.invalid:
        out.condition = _condition(out.condition.get("status") == "True", "InvalidSpec",
                                   f"{decision.reason}; the hot-tenant policy holds what "
                                   "exists until it is fixed")
    return out


def _plan(cr: Mapping[str, Any], decision: Decision, existing: Existing,
          template: Mapping[str, Any] | None, *, routed_versions: set[str],
          pool_serves_version: bool, replicas: int, secret_keys: set[str] | None,
          cluster_domain: str) -> Plan:
    spec = cr["spec"]
    namespace = cr["metadata"]["namespace"]
    version = spec["version"]
    out = Plan()
    ready = {v: endpoint(existing.services[v], cluster_domain)
             for v, dep in existing.deployments.items()
             if deployment_ready(dep) and v in existing.services}
    want = decision.action == "promote" or (decision.action == "hold" and not existing.empty)
    if not want:
        # Demotion: routes first; the objects go once no pool server routes to them.
        if not existing.empty and not routed_versions:
            out.delete = _all(existing, namespace)
        out.condition = _condition(False, "Demoting" if not existing.empty else "NotDedicated",
                                   decision.reason)
        return out
    if template is None:
        out.condition = _condition(False, "NoPodTemplate",
                                   "the operator has no dedicated pod template "
                                   "(--dedicated-template-file)")
        out.routes = dict(ready)
        return out
    if version not in existing.deployments:
        out.create.append(build_deployment(dict(cr), dict(template), replicas=replicas,
                                           secret_keys=secret_keys))
    if version not in existing.services:
        out.create.append(build_service(dict(cr)))
    out.routes = dict(ready)
    for old in sorted(set(existing.deployments) | set(existing.services)):
        if old == version:
            continue
        if version in ready and pool_serves_version and old not in routed_versions:
            name = dedicated_name(spec["tenant"], old)
            out.delete += [("Deployment", namespace, name), ("Service", namespace, name)]
    if version in ready:
        out.endpoint = ready[version]
        out.condition = _condition(True, "Ready", f"dedicated deployment for {version} is "
                                                  f"Ready; {decision.reason}")
    else:
        out.endpoint = next((ready[v] for v in sorted(ready)), None)
        out.condition = _condition(False, "Starting",
                                   f"waiting for the dedicated deployment of {version}")
    return out


def _all(existing: Existing, namespace: str) -> list[tuple[str, str, str]]:
    out = []
    for version, dep in sorted(existing.deployments.items()):
        out.append(("Deployment", namespace, dep["metadata"].get("name") or version))
    for version, svc in sorted(existing.services.items()):
        out.append(("Service", namespace, svc["metadata"].get("name") or version))
    return out


class HotTenants:
    """The I/O side: listing, creating and deleting; state is only the history."""

    def __init__(self, kube: KubeApi, template: Mapping[str, Any] | None, *,
                 cluster_domain: str = "cluster.local") -> None:
        self.kube = kube
        self.template = template
        self.cluster_domain = cluster_domain
        self.history = RateHistory()
        self.last_change: dict[tuple[str, str], float] = {}
        self._no_metrics_port: set[PodKey] = set()  # pool pods already warned about

    def scrape_targets(self, pool_pods: Mapping[PodKey, Mapping[str, Any]],
                       server_port: int) -> list[tuple[str, str]]:
        """``(namespace, metrics URL)`` of every pool pod (:func:`metrics_url`); a pod that
        declares no ``metrics`` container port is warned about once: its server's public
        ``/metrics`` is read instead, which has no per-tenant series, so its tenants' tokens
        are missing and Auto holds for lack of data."""
        targets = []
        for key, pod in pool_pods.items():
            url, per_tenant = metrics_url(pod, server_port)
            if not per_tenant and key not in self._no_metrics_port:
                log.warning("pool pod %s/%s declares no container port named %r: reading "
                            "its server port's /metrics, which has only sums over tenants, "
                            "so Auto hot-tenant promotion gets no tenant's tokens from it",
                            key[0], key[1], METRICS_PORT_NAME)
            if not per_tenant:
                self._no_metrics_port.add(key)
            targets.append((key[0], url))
        self._no_metrics_port &= set(pool_pods)
        return targets

    def record(self, totals: Mapping[tuple[str, str], float], now: float) -> None:
        """One sample of tokens served per (namespace, tenant), taken at ``now``."""
        for key, total in totals.items():
            self.history.add(_history_key(key), Sample(now, total))

    def rates(self, now: float, window_s: float = 120.0) -> dict[tuple[str, str], float]:
        """Mean tokens/s per (namespace, tenant) over the last ``window_s`` (the
        ``leastLoaded`` placement policy's measure); tenants without samples are absent."""
        out: dict[tuple[str, str], float] = {}
        for name in self.history.tenants():
            spans = [(max(a, now - window_s), b, r)
                     for a, b, r in interval_rates(self.history.get(name)) if b > now - window_s]
            total = sum(b - a for a, b, _ in spans)
            if total > 0:
                namespace, _, tenant = name.partition("/")
                out[(namespace, tenant)] = sum((b - a) * r for a, b, r in spans) / total
        return out

    def prune(self, specs: Iterable[AdapterSpec], keep_all: bool = False) -> None:
        """Forget the token history of tenants whose LoraAdapter is gone (or going) or
        whose mode is Never (unless ``keep_all``: the ``leastLoaded`` placement policy
        weighs every tenant), and the last change of tenants without a LoraAdapter."""
        specs = [s for s in specs if s.tenant and not s.deleting]
        watched = {_history_key((s.namespace, s.tenant)) for s in specs
                   if keep_all or s.dedicated.mode != "Never"}
        for name in self.history.tenants():
            if name not in watched:
                self.history.forget(name)
        known = {(s.namespace, s.tenant) for s in specs}
        for key in [k for k in self.last_change if k not in known]:
            del self.last_change[key]

    def decide(self, spec: AdapterSpec, dedicated_now: bool, now: float) -> Decision:
        dedicated = spec.dedicated
        if dedicated.problem:
            return Decision("hold", dedicated.problem, invalid=True)
        key = (spec.namespace, spec.tenant)
        return decide(dedicated.mode, dedicated_now, self.history.get(_history_key(key)),
                      dedicated.thresholds, now, self.last_change.get(key))

    async def list_all(self, namespace: str | None,
                       owners: Mapping[tuple[str, str], str] | None = None,
                       ) -> dict[tuple[str, str], Existing]:
        """Every dedicated Deployment and Service, by owning LoraAdapter (namespace, name):
        one list call each per pass, so a CR switched to Never or deleted is still seen.
        ``owners`` (LoraAdapter key -> uid): only objects that LoraAdapter controls and that
        look as the operator built them count (:func:`not_ours`); None: no check."""
        selector = f"app.kubernetes.io/name={APP_LABEL}"
        deps = await self.kube.list_deployments(namespace, selector)
        svcs = await self.kube.list_services(namespace, selector)
        out: dict[tuple[str, str], Existing] = {}
        for items, attr in ((deps, "deployments"), (svcs, "services")):
            for item in items:
                meta = item.get("metadata") or {}
                labels = meta.get("labels") or {}
                owner, version = labels.get(OWNER_LABEL), labels.get(VERSION_LABEL)
                if owner and version:
                    key = (meta.get("namespace") or "default", owner)
                    if owners is not None:
                        why = not_ours(item, attr[:-1].capitalize() if attr == "deployments"
                                       else "Service", owners.get(key))
                        if why is not None:
                            log.warning("ignoring %s %s/%s: %s", attr[:-1], key[0],
                                        meta.get("name"), why)
                            continue
                    existing = out.setdefault(key, Existing())
                    getattr(existing, attr)[version] = item
        return out

    async def apply(self, spec: AdapterSpec, todo: Plan, decision: Decision,
                    now: float) -> None:
        for obj in todo.create:
            if obj["kind"] == "Deployment":
                await self.kube.create_deployment(obj)
            else:
                await self.kube.create_service(obj)
            log.info("created dedicated %s %s/%s for %s@%s", obj["kind"],
                     obj["metadata"]["namespace"], obj["metadata"]["name"], spec.tenant,
                     spec.version)
        for kind, ns, name in todo.delete:
            delete = (self.kube.delete_deployment if kind == "Deployment"
                      else self.kube.delete_service)
            if await delete(ns, name):
                log.info("deleted dedicated %s %s/%s", kind, ns, name)
        if decision.action in ("promote", "demote") and (todo.create or todo.delete):
            self.last_change[(spec.namespace, spec.tenant)] = now


def _history_key(key: tuple[str, str]) -> str:
    return f"{key[0]}/{key[1]}"


async def scrape_token_totals(http: Any, targets: Iterable[tuple[str, str]],
                              timeout: float = 5.0, headers: Mapping[str, str] | None = None,
                              max_bytes: int = 16 * 1024 * 1024,
                              ) -> dict[tuple[str, str], float] | None:
    """Sum the tokens served (:func:`parse_token_totals`) per (namespace, tenant) over
    ``(namespace, metrics_url)`` targets (:meth:`HotTenants.scrape_targets`). ``None`` when a
    pod did not answer: a partial sum would read as a counter reset, so such a pass records
    no sample (the policy treats the gap as missing data)."""
    targets = list(targets)

    async def one(url: str) -> str | None:
        """The body, or None (no answer, an error status, beyond ``max_bytes`` or slower
        than twice ``timeout``)."""
        async def read() -> str | None:
            async with http.stream("GET", url, timeout=timeout,
                                   headers=dict(headers or {})) as response:
                if response.status_code != 200:
                    return None
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        log.warning("%s is larger than %d bytes: ignored", url,
                                    max_bytes)
                        return None
            return body.decode("utf-8", "replace")

        try:
            return await asyncio.wait_for(read(), timeout * 2)
        except Exception:
            return None

    texts = await asyncio.gather(*(one(url) for _, url in targets))
    totals: dict[tuple[str, str], float] = {}
    if any(text is None for text in texts):
        return None
    for (namespace, _), text in zip(targets, texts, strict=True):
        assert text is not None
        for tenant, value in parse_token_totals(text).items():
            totals[(namespace, tenant)] = totals.get((namespace, tenant), 0.0) + value
    return totals


__all__ = ["METRICS_PORT_NAME", "TOKEN_COUNTERS", "Existing", "HotTenants", "Plan", "endpoint",
           "metrics_url", "not_ours", "parse_token_totals", "plan", "scrape_token_totals"]
