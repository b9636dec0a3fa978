"""One "reconcile everything" pass, and the loop that runs it.

A pod's desired set aggregates every LoraAdapter placed on it, so the operator reconciles
the whole picture at once: list all LoraAdapters and pods, ask each pool pod what it holds
(sidecar ``GET /v1/state`` and ``GET /v1/desired``, server ``GET /v1/models``), validate,
place, ``PUT /v1/desired`` to every pool pod, read the state back and patch each
adapter's status. Passes are serialized (one at a time), debounced (a burst of events is
one pass) and level-triggered (nothing is remembered between passes but what the API
server and the pods say), so an operator restart converges from the current state.

Triggers: the kopf handlers (create/update/resume/delete of LoraAdapters), pod events, and
the resync timer; after a pass with transient failures the next one comes sooner
(exponential backoff up to ``resync_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from loramux.operator.credentials import credentials_from_secret
from loramux.operator.hot_tenants import Existing, HotTenants, Plan, plan, scrape_request_totals
from loramux.operator.kube import KubeApi, KubeError
from loramux.operator.model import (
    API_VERSION,
    KIND,
    AdapterSpec,
    ObjectKey,
    PodKey,
    container_port,
    parse_adapter,
    pod_ip,
    pod_is_live,
    pod_key,
    pods_in_pool,
    selector_matches,
)
from loramux.operator.placement import place
from loramux.operator.rollout import PodObservation, build_desired_sets
from loramux.operator.settings import OperatorSettings
from loramux.operator.status import (
    _condition,
    compute_status,
    outranked,
    status_differs,
    status_events,
    validate,
)

log = logging.getLogger("loramux.operator")


@dataclass
class PassResult:
    ok: bool = True
    error: str | None = None
    transient: bool = False
    finished: float = 0.0
    specs: dict[ObjectKey, AdapterSpec] = field(default_factory=dict)
    pods: dict[PodKey, Mapping[str, Any]] = field(default_factory=dict)
    observations: dict[PodKey, PodObservation] = field(default_factory=dict)
    desired: dict[PodKey, list[dict[str, Any]]] = field(default_factory=dict)
    put_errors: dict[PodKey, str] = field(default_factory=dict)
    statuses: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)


_AWS_NAMES = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY",
              "session_token": "AWS_SESSION_TOKEN", "region": "AWS_REGION",
              "endpoint_url": "AWS_ENDPOINT_URL"}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _base_url(pod: Mapping[str, Any], port: int) -> str:
    ip = pod_ip(pod) or "0.0.0.0"
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}"


def _short(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}: {exc.response.text[:300]}"
    return f"{type(exc).__name__}: {exc}"[:300]


class Reconciler:
    def __init__(self, settings: OperatorSettings, *, kube: KubeApi | None = None,
                 http: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.kube = kube
        self.http = http
        self._own_http = http is None
        self._sidecar_headers = self._auth(settings.resolved_sidecar_token())
        self._server_headers = self._auth(settings.resolved_server_token())
        self._wake = asyncio.Event()
        self._cond = asyncio.Condition()
        self._requested = 0
        self._completed = 0
        self._task: asyncio.Task[None] | None = None
        self._pools: set[tuple[str, str]] = set()  # (namespace, canonical selector)
        self._pool_selectors: list[tuple[str, Mapping[str, Any]]] = []
        self.last_result: PassResult | None = None
        self.last_ok: float | None = None
        self.passes = 0
        self.hot: HotTenants | None = None

    @staticmethod
    def _auth(token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self.kube is None:
            self.kube = KubeApi()
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=self.settings.request_timeout_seconds)
        self.hot = HotTenants(self.kube, self._dedicated_template(),
                              cluster_domain=self.settings.cluster_domain)
        self._task = asyncio.create_task(self._loop(), name="loramux-operator-reconcile")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._own_http and self.http is not None:
            await self.http.aclose()

    def _dedicated_template(self) -> dict[str, Any] | None:
        path = self.settings.dedicated_template_file
        if path is None:
            return None
        import yaml

        try:
            template = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            log.error("cannot read the dedicated pod template %s: %s", path, exc)
            return None
        if not isinstance(template, dict):
            log.error("the dedicated pod template %s is not a mapping", path)
            return None
        return template

    def trigger(self) -> None:
        self._requested += 1
        self._wake.set()

    async def reconcile_now(self, timeout: float | None = None) -> PassResult:
        """Ask for a pass and wait until one that started after this call has finished."""
        self.trigger()
        ticket = self._requested
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: self._completed >= ticket),
                                   timeout)
        assert self.last_result is not None
        return self.last_result

    def pod_is_relevant(self, pod: Mapping[str, Any]) -> bool:
        """Whether a pod event concerns any known pool (unknown pools: yes, to be safe)."""
        if not self._pool_selectors:
            return self.last_result is None
        namespace = pod_key(pod)[0]
        labels = (pod.get("metadata") or {}).get("labels")
        return any(ns == namespace and selector_matches(sel, labels)
                   for ns, sel in self._pool_selectors)

    async def _loop(self) -> None:
        wait = 0.0
        backoff = 1.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            if self.settings.debounce_seconds:
                await asyncio.sleep(self.settings.debounce_seconds)
            self._wake.clear()
            ticket = self._requested
            try:
                result = await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("reconcile pass failed")
                result = PassResult(ok=False, error=_short(exc), transient=True)
            result.finished = time.time()
            self.last_result = result
            self.passes += 1
            if result.ok:
                self.last_ok = result.finished
            async with self._cond:
                self._completed = max(self._completed, ticket)
                self._cond.notify_all()
            if result.transient:
                wait = min(self.settings.resync_seconds, backoff)
                backoff = min(backoff * 2, self.settings.resync_seconds)
            else:
                wait, backoff = self.settings.resync_seconds, 1.0

    # ----------------------------------------------------------------- pods
    async def _observe(self, pod: Mapping[str, Any]) -> PodObservation:
        key = pod_key(pod)
        assert self.http is not None
        sidecar = _base_url(pod, container_port(pod, "sync", self.settings.sidecar_port))
        server = _base_url(pod, container_port(pod, "http", self.settings.server_port))

        async def get(url: str, headers: dict[str, str]) -> Any:
            response = await self.http.get(url, headers=headers)  # type: ignore[union-attr]
            response.raise_for_status()
            return response.json()

        state, desired, models = await asyncio.gather(
            get(f"{sidecar}/v1/state", self._sidecar_headers),
            get(f"{sidecar}/v1/desired", self._sidecar_headers),
            get(f"{server}/v1/models", self._server_headers),
            return_exceptions=True,
        )
        if isinstance(state, BaseException) or not isinstance(state, Mapping):
            obs = PodObservation(key=key, sidecar_error=_short(state) if isinstance(
                state, BaseException) else "bad /v1/state body")
        else:
            obs = PodObservation.from_state(key, state)
        if isinstance(desired, Mapping):
            obs.add_desired(desired)
        if isinstance(models, Mapping):
            obs.add_models(models)
        return obs

    async def _put_desired(self, pod: Mapping[str, Any], entries: list[dict[str, Any]]
                           ) -> str | None:
        assert self.http is not None
        url = _base_url(pod, container_port(pod, "sync", self.settings.sidecar_port))
        try:
            response = await self.http.put(f"{url}/v1/desired", json={"adapters": entries},
                                           headers=self._sidecar_headers)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            return _short(exc)
        return None

    async def _read_state(self, pod: Mapping[str, Any], obs: PodObservation) -> None:
        assert self.http is not None
        url = _base_url(pod, container_port(pod, "sync", self.settings.sidecar_port))
        try:
            response = await self.http.get(f"{url}/v1/state", headers=self._sidecar_headers)
            response.raise_for_status()
            fresh = PodObservation.from_state(obs.key, response.json())
        except (httpx.HTTPError, ValueError) as exc:
            obs.sidecar_ok, obs.sidecar_error = False, _short(exc)
            return
        obs.sidecar_ok, obs.sidecar_error = True, None
        obs.adapters, obs.server_reachable = fresh.adapters, fresh.server_reachable

    # ----------------------------------------------------------------- credentials
    async def _credentials(self, specs: list[AdapterSpec]
                           ) -> tuple[dict[ObjectKey, dict[str, str]], dict[ObjectKey, str]]:
        creds: dict[ObjectKey, dict[str, str]] = {}
        problems: dict[ObjectKey, str] = {}
        assert self.kube is not None
        for spec in specs:
            if not spec.credentials_secret:
                continue
            try:
                secret = await self.kube.get_secret(spec.namespace, spec.credentials_secret)
            except KubeError as exc:
                problems[spec.key] = f"cannot read Secret {spec.credentials_secret!r}: {exc}"
                continue
            if secret is None:
                problems[spec.key] = f"Secret {spec.credentials_secret!r} not found"
                continue
            values, problem = credentials_from_secret(secret, spec.credentials_secret)
            if problem:
                problems[spec.key] = problem
            elif values:
                creds[spec.key] = values
        return creds, problems

    # ----------------------------------------------------------------- the pass
    async def run_pass(self) -> PassResult:
        assert self.kube is not None
        namespace = self.settings.namespace
        if self.settings.peering and self.settings.priority is not None:
            try:
                peering = await self.kube.get_peering(self.settings.peering, namespace)
            except KubeError as exc:
                log.warning("cannot read the peering object: %s", exc)
                return PassResult(ok=False, error=str(exc), transient=True)
            if outranked(peering, self.settings.priority):
                log.debug("another replica has a higher priority: standing by")
                return PassResult(ok=True)
        try:
            objects = await self.kube.list_adapters(namespace)
            pods = await self.kube.list_pods(namespace)
        except KubeError as exc:
            log.warning("cannot list from the API server: %s", exc)
            return PassResult(ok=False, error=str(exc), transient=True)
        by_key = {}
        for obj in objects:
            spec = parse_adapter(obj)
            by_key[spec.key] = (spec, obj)
        specs = [s for s, _ in by_key.values()]
        valid = [s for s in specs if s.error is None]
        self._pool_selectors = [(s.namespace, s.pool) for s in valid]

        relevant: dict[PodKey, Mapping[str, Any]] = {}
        for spec in valid:
            for pod in pods_in_pool(spec, pods):
                relevant[pod_key(pod)] = pod
        keys = list(relevant)
        observed = await asyncio.gather(*(self._observe(relevant[k]) for k in keys))
        observations = dict(zip(keys, observed, strict=True))

        validation = validate(specs, pods, observations)
        placeable = [s for s in specs if s.key not in validation.rejected and not s.deleting]
        placements = place(placeable, pods, excluded=validation.excluded,
                           policy=self.settings.placement_policy)
        creds, cred_problems = await self._credentials(placeable)
        routes: dict[tuple[str, str, str], str] = {}
        plans: dict[ObjectKey, Plan] = {}
        hot_transient = False
        if self.hot is not None:
            routes, plans, hot_transient = await self._hot_tenants(
                [s for s in placeable if s.error is None], by_key, placements, relevant,
                observations, creds)
        desired = build_desired_sets(placeable, placements, keys, observations,
                                     credentials=creds, routes=routes)

        puts = await asyncio.gather(*(self._put_desired(relevant[k], desired[k]) for k in keys))
        put_errors = {k: err for k, err in zip(keys, puts, strict=True) if err}
        for key, err in put_errors.items():
            log.warning("pod %s/%s: desired set not delivered: %s", key[0], key[1], err)
        await asyncio.gather(*(self._read_state(relevant[k], observations[k])
                               for k in keys if k not in put_errors))

        result = PassResult(specs={s.key: s for s in specs}, pods=dict(relevant),
                            observations=observations, desired=desired, put_errors=put_errors)
        transient = bool(put_errors) or bool(cred_problems) or hot_transient
        now = _now()
        for spec, obj in by_key.values():
            if spec.deleting:
                continue
            old = obj.get("status") or {}
            status = compute_status(
                spec, rejection=validation.rejected.get(spec.key),
                pods=placements.get(spec.key, []), desired=desired,
                observations=observations, put_errors=put_errors,
                credentials_problem=cred_problems.get(spec.key), previous=old, now=now,
            )
            todo = plans.get(spec.key)
            if todo is not None and todo.condition:
                prev = {c.get("type"): c for c in old.get("conditions") or []
                        if isinstance(c, Mapping)}
                c = todo.condition
                status.setdefault("conditions", []).append(_condition(
                    "Dedicated", c["status"] == "True", c["reason"], c["message"],
                    spec.generation, prev, now))
            if todo is not None and todo.endpoint:
                status["dedicatedEndpoint"] = todo.endpoint
            elif old.get("dedicatedEndpoint"):
                status["dedicatedEndpoint"] = None
            result.statuses[spec.key] = status
            if status["phase"] in ("Progressing", "Pending") or any(
                    r["state"] == "Unknown" for r in status.get("placements", [])):
                transient = True
            if not status_differs(old, status):
                continue
            patch = dict(status)
            if "activeVersion" not in status and old.get("activeVersion"):
                patch["activeVersion"] = None
            try:
                await self.kube.patch_adapter_status(spec.namespace, spec.name, patch)
            except KubeError as exc:
                log.warning("cannot patch status of %s/%s: %s", *spec.key, exc)
                transient = True
                continue
            if old.get("phase") != status["phase"]:
                log.info("%s/%s (%s@%s): %s -> %s", spec.namespace, spec.name, spec.tenant,
                         spec.version, old.get("phase"), status["phase"])
            body = {"apiVersion": obj.get("apiVersion") or API_VERSION,
                    "kind": obj.get("kind") or KIND, "metadata": obj.get("metadata") or {}}
            for type_, reason, message in status_events(old, status):
                await self.kube.post_event(body, type_, reason, message)
        result.transient = transient
        return result

    # ----------------------------------------------------------------- hot tenants
    async def _hot_tenants(
        self, specs: list[AdapterSpec],
        by_key: Mapping[ObjectKey, tuple[AdapterSpec, dict[str, Any]]],
        placements: Mapping[ObjectKey, list[PodKey]],
        relevant: Mapping[PodKey, Mapping[str, Any]],
        observations: Mapping[PodKey, PodObservation],
        creds: Mapping[ObjectKey, Mapping[str, str]],
    ) -> tuple[dict[tuple[str, str, str], str], dict[ObjectKey, Plan], bool]:
        """Promote, route, roll and demote dedicated deployments (see hot_tenants)."""
        hot = self.hot
        assert hot is not None and self.kube is not None
        now = time.monotonic()
        if any(((by_key[s.key][1].get("spec") or {}).get("dedicated") or {}).get("mode")
               == "Auto" for s in specs):  # only Auto needs the traffic
            targets = [(key[0], _base_url(pod, container_port(pod, "http",
                                                              self.settings.server_port)))
                       for key, pod in relevant.items()]
            totals = await scrape_request_totals(self.http, targets,
                                                 timeout=self.settings.request_timeout_seconds)
            if totals is not None:
                hot.record(totals, now)
        try:
            existing_all = await hot.list_all(self.settings.namespace)
        except KubeError as exc:
            log.warning("cannot list dedicated deployments: %s", exc)
            return {}, {}, True
        routes: dict[tuple[str, str, str], str] = {}
        plans: dict[ObjectKey, Plan] = {}
        transient = False
        for spec in specs:
            obj = by_key[spec.key][1]
            existing = existing_all.get(spec.key, Existing())
            mode = ((obj.get("spec") or {}).get("dedicated") or {}).get("mode", "Never")
            if mode == "Never" and existing.empty:
                continue
            decision = hot.decide(obj, not existing.empty, now)
            pods = placements.get(spec.key, [])
            routed = {obs.routes[spec.tenant] for k in pods
                      if (obs := observations.get(k)) is not None and spec.tenant in obs.routes}
            serves = bool(pods) and all(
                (obs := observations.get(k)) is not None
                and obs.serving.get(spec.tenant) == spec.version for k in pods)
            secret_keys = {_AWS_NAMES[k] for k in creds.get(spec.key, {}) if k in _AWS_NAMES}
            todo = plan(obj, decision, existing, hot.template, routed_versions=routed,
                        pool_serves_version=serves,
                        secret_keys=secret_keys if spec.credentials_secret else None,
                        cluster_domain=self.settings.cluster_domain)
            try:
                await hot.apply(obj, todo, decision, now)
            except KubeError as exc:
                log.warning("%s/%s: dedicated deployment: %s", *spec.key, exc)
                transient = True
            body = {"apiVersion": obj.get("apiVersion") or API_VERSION,
                    "kind": obj.get("kind") or KIND, "metadata": obj.get("metadata") or {}}
            if any(o["kind"] == "Deployment" for o in todo.create):
                await self.kube.post_event(body, "Normal", "Promoted",
                                           f"dedicated deployment for {spec.tenant}@"
                                           f"{spec.version}: {decision.reason}")
            if todo.delete and decision.action == "demote":
                await self.kube.post_event(body, "Normal", "Demoted",
                                           f"{spec.tenant} served by the pool again: "
                                           f"{decision.reason}")
            for version, url in todo.routes.items():
                routes[(spec.namespace, spec.tenant, version)] = url
            plans[spec.key] = todo
            if todo.create or todo.delete or todo.condition.get("reason") in (
                    "Starting", "Demoting"):
                transient = True
        return routes, plans, transient

    # ----------------------------------------------------------------- deletion
    def eviction_pending(self, spec: AdapterSpec, result: PassResult) -> list[str]:
        """Pods that still hold (or may hold) a deleted adapter's tenant, with why; empty
        when every live pod of its pool has dropped it (or is gone)."""
        pending: list[str] = []
        if not spec.tenant:
            return pending
        for key, pod in sorted(result.pods.items()):
            if key[0] != spec.namespace or not pod_is_live(pod):
                continue
            if not selector_matches(spec.pool, (pod.get("metadata") or {}).get("labels")):
                continue
            still_desired = any(e["tenant"] == spec.tenant for e in result.desired.get(key, []))
            if still_desired:
                continue  # another (valid) adapter owns this tenant on that pod now
            obs = result.observations.get(key)
            if key in result.put_errors:
                pending.append(f"{key[1]}: {result.put_errors[key]}")
            elif obs is None or not obs.sidecar_ok:
                pending.append(f"{key[1]}: sidecar did not answer")
            elif any(t == spec.tenant for t, _ in obs.adapters):
                pending.append(f"{key[1]}: sidecar still reports it")
            elif obs.server_ok and any(t == spec.tenant for t, _ in obs.served):
                pending.append(f"{key[1]}: still loaded on the server")
        return pending
