"""One "reconcile everything" pass, and the loop that runs it.

A pod's desired set aggregates every LoraAdapter placed on it, so the operator reconciles
the whole picture at once. A pass (:meth:`Reconciler.run_pass`) is four steps, each a
method that reads alone:

1. :meth:`~Reconciler.observe` (reads only): every LoraAdapter and pod, each pool pod's
   sidecar ``GET /v1/state`` (:class:`~loramux.contracts.SyncState`, the one source of a
   pod's state, its server's own answer included; terminating pool pods' too, with a short
   timeout: what they still hold), the credentials and API-key Secrets, hot tenants'
   dedicated objects (and the pool's key grants) and the pool's request counters;
2. :meth:`~Reconciler.plan` (no I/O): validation, placement, each hot tenant's dedicated
   deployment, every pool pod's desired set, and the pool's placement table for
   scale-out routing (:mod:`loramux.operator.peers`);
3. :meth:`~Reconciler.deliver` (writes): dedicated access Secrets written, dedicated objects
   created or deleted, ``PUT /v1/desired`` to every pool pod (its desired set and its copy
   of the placement table, ``DesiredState.peers``: one PUT per pod per pass), its state
   read back;
4. :meth:`~Reconciler.report`: each LoraAdapter's status (merge-patched: placements with
   each pod's residency and requests in flight) and its Events; when the holders changed
   during the pass, the next pass comes soon, so the pods hear of it.

Passes are serialized (one at a time), debounced (a burst of events is one pass) and
level-triggered: nothing is remembered between passes but what the API server (the
LoraAdapters' status: placements, ``activeVersion`` and its ``activeSource``, a move in
progress ``move`` and the last one ``lastMove``) and the pods say, so an operator restart
converges from the current state. The only memory in the process is the token history
(hot tenants, ``leastLoaded``) and the fingerprints of the placement tables sent while a
move drains (lost on a restart: that drain waits one table more).

Moves (:mod:`loramux.operator.placement`): a placed tenant changes pods only by loading on
the new pod first, then routing to it, then draining and evicting the old one; they come
from rebalancing by measured load (``leastLoaded`` with ``--rebalance``) and from pods
NotReady beyond ``--unready-grace-seconds``.

Triggers: the kopf handlers (create/update/resume/delete of LoraAdapters), pod events, and
the resync timer; after a pass with transient failures the next one comes sooner
(exponential backoff up to ``resync_seconds``).

Access (``spec.access``): every pass reads the Secret it names (every entry one API key)
and puts only the keys' SHA-256 hashes, with the tenant's weight and limits, into each of
the tenant's desired entries (:class:`~loramux.contracts.TenantAccess`) and into its
dedicated deployments' access Secrets; ``AccessReady`` says whether every entry was used,
and on how many of its pods the server holds the hashes as sent (the sidecars' reports).
A rotated key therefore reaches the servers within one resync period (Secrets are not
watched: that would need list/watch on every Secret of the namespace, where the operator
now only gets the Secrets it is told about). A missing Secret means no key at all (fail
closed, the adapter stays loaded); a Secret the API server fails to return keeps the hashes
last read by this process (a blip must not lock a tenant out), none after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from loramux.contracts import (
    AccessFile,
    AdapterPhase,
    DesiredAdapter,
    DesiredState,
    EntryCredentials,
    KeyGrant,
    PlacementState,
    SyncPhase,
    SyncState,
    TenantAccess,
)
from loramux.operator.canary import INVALID as CANARY_INVALID
from loramux.operator.canary import CanaryFacts, CanaryStep, Counts, advance
from loramux.operator.credentials import (
    SECRET_NOT_FOUND,
    AccessOutcome,
    access_from_secret,
    access_unreadable,
    entry_credentials,
    pool_grants_from_secret,
    secret_keys,
)
from loramux.operator.dedicated import (
    VERSION_LABEL,
    access_secret_name,
    build_access_secret,
    dedicated_name,
    pool_access_secret,
)
from loramux.operator.hot_policy import Decision
from loramux.operator.hot_tenants import (
    Existing,
    HotTenants,
    Plan,
    plan,
    scrape_token_totals,
)
from loramux.operator.index import WatchIndex
from loramux.operator.kube import KubeApi, KubeError
from loramux.operator.model import (
    API_VERSION,
    KIND,
    MOVE_ABANDONED,
    MOVE_DRAINING,
    MOVE_LOADING,
    AdapterSpec,
    LastMove,
    Move,
    ObjectKey,
    PodKey,
    PoolOwner,
    container_port,
    parse_adapter,
    pod_ip,
    pod_is_live,
    pod_is_ready,
    pod_key,
    pod_unready_since,
    pods_draining_in_pool,
    pods_in_pool,
    selector_matches,
)
from loramux.operator.peers import PoolTables, build_pool_tables, held, table_fingerprint
from loramux.operator.placement import (
    MoveFacts,
    Rebalance,
    advance_move,
    choose_moves,
    choose_unready_moves,
    place,
)
from loramux.operator.rollout import PodObservation, build_desired_sets
from loramux.operator.settings import OperatorSettings
from loramux.operator.status import (
    Validation,
    _condition,
    compute_status,
    outranked,
    status_differs,
    status_events,
    status_patch,
    validate,
)

log = logging.getLogger("loramux.operator")


@dataclass
class Observed:
    """Step 1, observe: what the API server and the pool pods say at the start of a pass."""

    adapters: dict[ObjectKey, tuple[AdapterSpec, dict[str, Any]]]  # parsed, and as read
    pods: list[dict[str, Any]]  # every pod of the watched namespace(s)
    pool_pods: dict[PodKey, Mapping[str, Any]]  # live pods of some valid adapter's pool
    # (only pods this install owns: see PoolOwner)
    observations: dict[PodKey, PodObservation]  # their sidecars' GET /v1/state
    credentials: dict[ObjectKey, EntryCredentials] = field(default_factory=dict)
    credential_problems: dict[ObjectKey, str] = field(default_factory=dict)
    access: dict[ObjectKey, AccessOutcome] = field(default_factory=dict)  # spec.access
    # the pool-wide grants copied into dedicated access files, per namespace (None: they
    # could not be read this pass)
    pool_grants: dict[str, list[KeyGrant] | None] = field(default_factory=dict)
    dedicated: dict[ObjectKey, Existing] | None = None  # None: not listed (hot tenants off)
    dedicated_error: str | None = None  # they could not be listed
    clock: float = 0.0  # time.monotonic() of the pass, the hot-tenant policy's clock
    # pods an adapter's pool selects that this install does not own, with why (they get
    # nothing: no token, no credentials, no desired set)
    untrusted: dict[ObjectKey, dict[str, str]] = field(default_factory=dict)
    # pods of some valid adapter's pool in their grace period (terminating, still with an
    # IP): they get nothing, but what they still hold Ready stays in the peer tables until
    # they are gone (see loramux.operator.peers)
    draining: dict[PodKey, Mapping[str, Any]] = field(default_factory=dict)
    draining_observations: dict[PodKey, PodObservation] = field(default_factory=dict)

    @property
    def specs(self) -> list[AdapterSpec]:
        return [spec for spec, _ in self.adapters.values()]


@dataclass
class HotStep:
    """One LoraAdapter's dedicated deployment this pass: the policy's decision and the plan."""

    spec: AdapterSpec
    obj: dict[str, Any]
    decision: Decision
    todo: Plan


@dataclass
class MovePlan:
    """Moves of placed tenants between pods this pass (see :mod:`placement`)."""

    moves: dict[ObjectKey, Move] = field(default_factory=dict)  # in progress: status.move
    done: dict[ObjectKey, LastMove] = field(default_factory=dict)  # ended: status.lastMove
    started: set[ObjectKey] = field(default_factory=set)  # begun this pass

    def hidden(self) -> dict[ObjectKey, set[str]]:
        """Sources left out of the placement tables: those of draining moves."""
        return {k: {m.source} for k, m in self.moves.items() if m.phase == MOVE_DRAINING}

    def extra(self, key: ObjectKey) -> set[PodKey]:
        """The adapter's pod beyond its replicas while it moves (not counted as Ready)."""
        move = self.moves.get(key)
        if move is None:
            return set()
        return {(key[0], move.target if move.phase == MOVE_LOADING else move.source)}


@dataclass
class PassPlan:
    """Step 2, plan: everything decided, nothing done yet."""

    validation: Validation
    placements: dict[ObjectKey, list[PodKey]]
    desired: dict[PodKey, list[DesiredAdapter]]  # every pool pod's full desired set
    hot: dict[ObjectKey, HotStep] = field(default_factory=dict)
    credential_problems: dict[ObjectKey, str] = field(default_factory=dict)
    untrusted: dict[ObjectKey, dict[str, str]] = field(default_factory=dict)
    access: dict[ObjectKey, AccessOutcome] = field(default_factory=dict)
    # dedicated access Secrets to write ((body, create only)) and delete ((namespace, name))
    access_writes: list[tuple[dict[str, Any], bool]] = field(default_factory=list)
    access_deletes: list[tuple[str, str]] = field(default_factory=list)
    transient: bool = False  # something is known to change by itself: look again soon
    # scale-out routing: the pool's placement tables (each pool pod gets its copy in
    # DesiredState.peers; compared with the pods' state after delivery)
    tables: PoolTables | None = None
    # every pool pod: the access of each tenant its pool holds (DesiredState.access), since
    # a request is authenticated by the first pod it reaches, holder or not
    pool_access: dict[PodKey, dict[str, TenantAccess]] = field(default_factory=dict)
    moves: MovePlan = field(default_factory=MovePlan)
    # the fingerprint of the table each pod of a pool with a draining move is sent, and the
    # (tenant, source pod) pairs that table leaves out (remembered once delivered)
    peer_prints: dict[PodKey, tuple[str, frozenset[tuple[str, str]]]] = field(
        default_factory=dict)
    canaries: dict[ObjectKey, CanaryStep] = field(default_factory=dict)


@dataclass
class Delivery:
    """Step 3, deliver: what could not be delivered, and the pods' state read back."""

    put_errors: dict[PodKey, str]
    observations: dict[PodKey, PodObservation]
    transient: bool = False


@dataclass
class PassResult:
    """Step 4, report: the outcome of a pass (the handlers and tests read it)."""

    ok: bool = True
    error: str | None = None
    transient: bool = False
    finished: float = 0.0
    specs: dict[ObjectKey, AdapterSpec] = field(default_factory=dict)
    pods: dict[PodKey, Mapping[str, Any]] = field(default_factory=dict)
    observations: dict[PodKey, PodObservation] = field(default_factory=dict)
    desired: dict[PodKey, list[DesiredAdapter]] = field(default_factory=dict)
    put_errors: dict[PodKey, str] = field(default_factory=dict)
    statuses: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)


TOKEN_KEYS = ("admin-token", "sidecar-token")
SENT_TABLES_KEPT = 8  # per pod: the fingerprints of the last tables sent during moves
DRAINING_TIMEOUT_SECONDS = 2.0  # GET /v1/state of a terminating pod (it may be gone)
UNTRUSTED_PODS = "UntrustedPods"  # a pool selects pods this install does not own
ACCESS_READY = "AccessReady"  # condition: spec.access's keys are in use (reasons: credentials)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _base_url(pod: Mapping[str, Any], port: int) -> str:
    ip = pod_ip(pod) or "0.0.0.0"
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}"


def _event_target(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A LoraAdapter as an Event's involvedObject (a listed item may lack apiVersion/kind)."""
    return {"apiVersion": obj.get("apiVersion") or API_VERSION, "kind": obj.get("kind") or KIND,
            "metadata": obj.get("metadata") or {}}


def with_access(desired: Mapping[PodKey, list[DesiredAdapter]],
                access: Mapping[tuple[str, str], TenantAccess]
                ) -> dict[PodKey, list[DesiredAdapter]]:
    """Every entry of a tenant with ``spec.access`` carries its access ((namespace, tenant)
    -> TenantAccess); the others none (only pool-wide grants reach them)."""
    return {pod: [entry.model_copy(update={"access": access.get((pod[0], entry.tenant))})
                  for entry in entries]
            for pod, entries in desired.items()}


def pool_access(seen: Observed, placeable: Sequence[AdapterSpec],
                access: Mapping[ObjectKey, AccessOutcome]
                ) -> dict[PodKey, dict[str, TenantAccess]]:
    """Each pool pod: the access of every tenant with ``spec.access`` whose pool selects the
    pod, placed there or not (scale-out routing authenticates at the first pod)."""
    out: dict[PodKey, dict[str, TenantAccess]] = {}
    pools: dict[tuple[str, str], list[PodKey]] = {}
    for spec in placeable:
        outcome = access.get(spec.key)
        if outcome is None or outcome.access is None:
            continue
        pool = (spec.namespace, spec.pool_key)
        if pool not in pools:
            pools[pool] = [pod_key(p) for p in pods_in_pool(spec, seen.pods)
                           if pod_key(p) in seen.pool_pods]
        for pod in pools[pool]:
            out.setdefault(pod, {})[spec.tenant] = outcome.access
    return out


def plan_dedicated_access(seen: Observed, hot: Mapping[ObjectKey, HotStep],
                          access: Mapping[ObjectKey, AccessOutcome]
                          ) -> tuple[list[tuple[dict[str, Any], bool]], list[tuple[str, str]]]:
    """The access Secrets of hot tenants' dedicated Deployments: one per Deployment that
    exists or is created this pass, written every pass (level-triggered: the operator may
    write these Secrets but never reads them), and deleted with their Deployment. While the
    tenant's keys or the pool-wide grants are unknown (the API server failed), a Secret is
    only created if absent ("create only": an existing file is left as it is)."""
    writes: list[tuple[dict[str, Any], bool]] = []
    deletes: list[tuple[str, str]] = []
    for key, step in hot.items():
        spec = step.spec
        outcome = access.get(key)
        grants = seen.pool_grants.get(spec.namespace, [])
        file = AccessFile(grants=list(grants or []),
                          tenants={spec.tenant: outcome.access} if outcome else {})
        unknown = (outcome is not None and outcome.ok is None) or (
            spec.namespace in seen.pool_grants and grants is None)
        deleted = {name for kind, _, name in step.todo.delete if kind == "Deployment"}
        existing = seen.dedicated.get(key) if seen.dedicated else None
        versions = {v: str(d["metadata"].get("name") or dedicated_name(spec.tenant, v))
                    for v, d in (existing.deployments if existing else {}).items()}
        for obj in step.todo.create:
            if obj["kind"] == "Deployment":
                labels = obj["metadata"].get("labels") or {}
                versions[str(labels.get(VERSION_LABEL, spec.version))] = obj["metadata"]["name"]
        for version, name in sorted(versions.items()):
            if name in deleted:
                deletes.append((spec.namespace, access_secret_name(name)))
            else:
                writes.append((build_access_secret(step.obj, name, version, file), unknown))
    return writes, deletes


class _BadState(Exception):
    """A sidecar's GET /v1/state body the operator refuses to parse."""


def _short(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}: {exc.response.text[:300]}"
    return f"{type(exc).__name__}: {exc}"[:300]


def _start_moves(started: Mapping[ObjectKey, Move], placements: dict[ObjectKey, list[PodKey]],
                 out: MovePlan) -> None:
    """Record moves chosen this pass: each target is placed beside its source (load)."""
    for key, move in started.items():
        out.moves[key] = move
        out.started.add(key)
        placements[key] = sorted([*placements.get(key, []), (key[0], move.target)],
                                 key=lambda p: p[1])
        log.info("%s/%s: moving %s -> %s: %s", *key, move.source, move.target, move.reason)


class Reconciler:
    def __init__(self, settings: OperatorSettings, *, kube: KubeApi | None = None,
                 http: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.kube = kube
        self.http = http
        self._own_http = http is None
        # Read per request (.current()), so a rotated token file takes effect at once.
        self._sidecar_token = settings.sidecar_token_source()
        self._server_token = settings.server_token_source()
        self._managed_sidecar_token: str | None = None  # from --tokens-secret, every pass
        self.owner = PoolOwner.parse(settings.pool_owner_labels,
                                     settings.pool_owner_deployment)
        if not self.owner.enforced:
            log.warning("no --pool-owner-labels / --pool-owner-deployment: every pod a "
                        "LoraAdapter's spec.pool selects gets the sidecar token and S3 keys")
        self._wake = asyncio.Event()
        self._cond = asyncio.Condition()
        self._requested = 0
        self._completed = 0
        self._task: asyncio.Task[None] | None = None
        self._pool_selectors: list[tuple[str, Mapping[str, Any]]] = []
        self.last_result: PassResult | None = None
        self.last_ok: float | None = None
        self.passes = 0
        self.hot: HotTenants | None = None
        # LoraAdapters and pods as kopf's watches deliver them (operator/index.py).
        self.index = WatchIndex(settings.relist_seconds)
        # The last access read per LoraAdapter (its Secret's name, the hashes): used only
        # while the API server fails to return that Secret.
        self._last_access: dict[ObjectKey, tuple[str, TenantAccess]] = {}
        self._access_warned: dict[ObjectKey, str] = {}
        self._last_grants: dict[str, list[KeyGrant]] = {}
        # Each pod's server's admin-pushed access (tenant -> fingerprint), from the last
        # GET /v1/state that carried it (SyncState.access): whether the hashes arrived.
        self._pod_access: dict[PodKey, dict[str, str]] = {}
        # Moves: per pod, the fingerprints of the tables sent while a move drained, each
        # with the (tenant, source pod) pairs it leaves out. A pod whose reported
        # SyncState.peers_fingerprint is one of them no longer routes to that source. Lost
        # on a restart: the next tables are remembered, a drain waits one pass more.
        self._sent_peers: dict[PodKey, dict[str, frozenset[tuple[str, str]]]] = {}

    @staticmethod
    def _auth(token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def _sidecar_headers(self) -> dict[str, str]:
        return self._auth(self._sidecar_token.current() or self._managed_sidecar_token)

    @property
    def _server_headers(self) -> dict[str, str]:
        return self._auth(self._server_token.current())

    async def _ensure_tokens(self) -> str | None:
        """``--tokens-secret``: read the tokens Secret, creating it with random tokens when
        absent (so a chart rendered by ``helm template`` holds no token at all, and two
        renders are identical). Its sidecar token is used when no token flag or file is
        set. Returns a problem, or None."""
        ref = self.settings.tokens_secret
        if not ref:
            return None
        assert self.kube is not None
        namespace, _, name = ref.rpartition("/")
        namespace = namespace or self.settings.namespace or "default"
        try:
            secret = await self.kube.get_secret(namespace, name)
            if secret is None:
                body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": name, "namespace": namespace,
                                     "labels": {"app.kubernetes.io/managed-by":
                                                "loramux-operator"}},
                        "stringData": {k: secrets.token_urlsafe(36) for k in TOKEN_KEYS}}
                try:
                    await self.kube.create_secret(body)
                    log.info("created the tokens Secret %s/%s", namespace, name)
                except KubeError as exc:
                    if exc.status != 409:  # 409: a peer created it first
                        raise
                secret = await self.kube.get_secret(namespace, name)
        except KubeError as exc:
            return f"cannot read or create the tokens Secret {namespace}/{name}: {exc}"
        from loramux.operator.credentials import secret_values

        token = secret_values(secret or {}).get("sidecar-token", "").strip()
        if not token:
            return f"the tokens Secret {namespace}/{name} has no sidecar-token"
        self._managed_sidecar_token = token
        return None

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

    # ----------------------------------------------------------------- the pass
    async def run_pass(self) -> PassResult:
        """One pass: observe → plan → deliver → report (a standby replica only checks that
        it still stands by)."""
        standby = await self._standby()
        if standby is not None:
            return standby
        problem = await self._ensure_tokens()
        if problem is not None and not self._managed_sidecar_token:
            log.warning("%s", problem)
            return PassResult(ok=False, error=problem, transient=True)
        try:
            seen = await self.observe()
        except KubeError as exc:
            log.warning("cannot list from the API server: %s", exc)
            return PassResult(ok=False, error=str(exc), transient=True)
        todo = self.plan(seen)
        delivered = await self.deliver(seen, todo)
        return await self.report(seen, todo, delivered)

    async def _standby(self) -> PassResult | None:
        """With kopf peering: a result (and nothing else done) while a live replica has a
        higher priority. kopf pauses its own handlers then; this loop is not one of them."""
        if not (self.settings.peering and self.settings.priority is not None):
            return None
        assert self.kube is not None
        try:
            peering = await self.kube.get_peering(self.settings.peering, self.settings.namespace)
        except KubeError as exc:
            log.warning("cannot read the peering object: %s", exc)
            return PassResult(ok=False, error=str(exc), transient=True)
        if outranked(peering, self.settings.priority):
            log.debug("another replica has a higher priority: standing by")
            return PassResult(ok=True)
        return None

    # ----------------------------------------------------------------- 1. observe
    async def observe(self) -> Observed:
        """Read everything a pass decides from; raises :class:`KubeError` only when the
        LoraAdapters or pods cannot be listed."""
        assert self.kube is not None
        objects, listed = await self._objects()
        adapters: dict[ObjectKey, tuple[AdapterSpec, dict[str, Any]]] = {}
        for obj in objects:
            spec = parse_adapter(obj,
                                 max_dedicated_replicas=self.settings.max_dedicated_replicas)
            adapters[spec.key] = (spec, obj)
        valid = [s for s, _ in adapters.values() if s.error is None]
        self._pool_selectors = [(s.namespace, s.pool) for s in valid]
        # The trust boundary: pods this install does not own never take part in a pass.
        distrust = {pod_key(pod): why for pod in listed
                    if (why := self.owner.why_not(pod)) is not None}
        pods = [pod for pod in listed if pod_key(pod) not in distrust]
        untrusted = {}
        for spec in valid:
            selected = {pod_key(p)[1]: distrust[pod_key(p)]
                        for p in pods_in_pool(spec, listed) if pod_key(p) in distrust}
            if selected:
                untrusted[spec.key] = selected
        pool_pods = {pod_key(pod): pod for spec in valid for pod in pods_in_pool(spec, pods)}
        keys = list(pool_pods)
        for gone in [k for k in self._pod_access if k not in pool_pods]:
            del self._pod_access[gone]
        pools = {(s.namespace, s.pool_key): s for s in valid}  # one spec per distinct pool
        draining = {pod_key(pod): pod for spec in pools.values()
                    for pod in pods_draining_in_pool(spec, pods)}
        drained = list(draining)
        states = await asyncio.gather(
            *(self._pod_state(pool_pods[k]) for k in keys),
            *(self._pod_state(draining[k], draining=True) for k in drained))
        live = [s for s in valid if not s.deleting]
        credentials, problems = await self._credentials(live)
        seen = Observed(adapters=adapters, pods=pods, pool_pods=pool_pods,
                        observations=dict(zip(keys, states[:len(keys)], strict=True)),
                        credentials=credentials, credential_problems=problems,
                        access=await self._access(live),
                        clock=time.monotonic(), untrusted=untrusted, draining=draining,
                        draining_observations=dict(zip(drained, states[len(keys):],
                                                       strict=True)))
        if self.hot is not None:
            await self._observe_traffic(seen, live)
            try:
                owners = {s.key: s.uid for s in seen.specs}
                seen.dedicated = await self.hot.list_all(self.settings.namespace, owners)
            except KubeError as exc:
                log.warning("cannot list dedicated deployments: %s", exc)
                seen.dedicated_error = str(exc)
            if seen.dedicated is not None:
                await self._observe_pool_grants(seen, live)
        return seen

    async def _objects(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every LoraAdapter and pod: from the watch-fed index while it is fresh, else one
        full list of each (which refreshes the index)."""
        assert self.kube is not None
        if self.index.fresh():
            return self.index.adapters(), self.index.pods()
        self.index.begin_list()
        try:
            objects = await self.kube.list_adapters(self.settings.namespace)
            listed = await self.kube.list_pods(self.settings.namespace)
        except BaseException:
            self.index.abort_list()
            raise
        self.index.replace(objects, listed)
        log.debug("listed %d LoraAdapters and %d pods", len(objects), len(listed))
        return objects, listed

    async def _access(self, specs: list[AdapterSpec]) -> dict[ObjectKey, AccessOutcome]:
        """Each ``spec.access``: its Secret's keys, hashed (see the module docstring)."""
        assert self.kube is not None
        out: dict[ObjectKey, AccessOutcome] = {}
        for spec in specs:
            access = spec.access
            if access is None:
                self._last_access.pop(spec.key, None)
                continue
            try:
                secret = await self.kube.get_secret(spec.namespace, access.secret_name)
            except KubeError as exc:
                last = self._last_access.get(spec.key)
                kept = last[1] if last is not None and last[0] == access.secret_name else None
                if kept is not None:  # the weight and limits are the spec's, always
                    kept = kept.model_copy(update={"weight": access.weight,
                                                   "limits": access.limits})
                out[spec.key] = access_unreadable(access, str(exc), kept)
                continue
            outcome = access_from_secret(secret, access)
            if outcome.ok is False and outcome.reason != SECRET_NOT_FOUND:
                # Once per problem, not every pass (the condition and its Event stay).
                if self._access_warned.get(spec.key) != outcome.message:
                    log.warning("%s/%s: access: %s", *spec.key, outcome.message)
                self._access_warned[spec.key] = outcome.message
            else:
                self._access_warned.pop(spec.key, None)
            self._last_access[spec.key] = (access.secret_name, outcome.access)
            out[spec.key] = outcome
        live = {s.key for s in specs}
        for key in [k for k in self._last_access if k not in live]:
            del self._last_access[key]
        for key in [k for k in self._access_warned if k not in live]:
            del self._access_warned[key]
        return out

    async def _observe_pool_grants(self, seen: Observed, live: Sequence[AdapterSpec]) -> None:
        """Hot tenants: the pool-wide grants (the Secret the pod template's annotation names)
        of each namespace with dedicated deployments."""
        assert self.hot is not None and seen.dedicated is not None
        pool_secret = pool_access_secret(self.hot.template)
        if not pool_secret:
            self._last_grants.clear()
            return
        for spec in live:
            existing = seen.dedicated.get(spec.key, Existing())
            if spec.dedicated.mode == "Never" and existing.empty:
                continue
            if spec.namespace not in seen.pool_grants:
                seen.pool_grants[spec.namespace] = await self._pool_grants(
                    spec.namespace, pool_secret)

    async def _pool_grants(self, namespace: str, name: str) -> list[KeyGrant] | None:
        """The pool-wide grants of ``namespace`` (a missing or bad Secret: none, logged; the
        API server failing: the last ones read, else None = hold the files as they are)."""
        assert self.kube is not None
        try:
            secret = await self.kube.get_secret(namespace, name)
        except KubeError as exc:
            log.warning("cannot read the pool access Secret %s/%s: %s", namespace, name, exc)
            return self._last_grants.get(namespace)
        if secret is None:
            log.warning("the pool access Secret %s/%s is not found: dedicated deployments "
                        "get no pool-wide key", namespace, name)
            grants: list[KeyGrant] = []
        else:
            found, problem = pool_grants_from_secret(secret, name)
            if found is None:
                log.warning("%s: dedicated deployments get no pool-wide key", problem)
            grants = found or []
        self._last_grants[namespace] = grants
        return grants

    async def _pod_state(self, pod: Mapping[str, Any], draining: bool = False
                         ) -> PodObservation:
        """The pod's sidecar's ``GET /v1/state``, parsed (never raises). Whatever the pod
        answers (not JSON, wrong types, a body beyond ``max_state_bytes``, a trickle slower
        than the request timeout) counts against that pod alone: its observation carries the
        error, and its placements are Unknown with it as the reason. A ``draining`` pod (in
        its grace period: only asked what it still holds, for the peer tables) gets a short
        timeout, as it may be gone already."""
        key = pod_key(pod)
        timeout = self.settings.request_timeout_seconds * 2
        if draining:
            timeout = min(DRAINING_TIMEOUT_SECONDS, timeout)
        try:
            state = await asyncio.wait_for(self._read_state(pod), timeout)
        except _BadState as exc:
            return PodObservation(key=key, sidecar_error=f"bad /v1/state body: {exc}"[:300])
        except ValueError as exc:  # not JSON, or not a SyncState
            return PodObservation(key=key, sidecar_error=f"bad /v1/state body: {_short(exc)}")
        except Exception as exc:  # refused, timed out, HTTP error status
            return PodObservation(key=key, sidecar_error=_short(exc))
        if draining:
            pass  # not a pool member any more: its access is not counted
        elif state.access is not None:
            self._pod_access[key] = {view.tenant: view.fingerprint
                                     for view in state.access.tenants if view.source == "admin"}
        else:
            self._pod_access.pop(key, None)
        try:
            return PodObservation.from_state(key, state)
        except Exception as exc:  # a SyncState the operator cannot use
            return PodObservation(key=key, sidecar_error=f"bad /v1/state body: {_short(exc)}")

    async def _read_state(self, pod: Mapping[str, Any]) -> SyncState:
        assert self.http is not None
        url = _base_url(pod, container_port(pod, "sync", self.settings.sidecar_port))
        limit = self.settings.max_state_bytes
        headers = {**self._sidecar_headers, "Accept-Encoding": "identity"}
        async with self.http.stream("GET", f"{url}/v1/state", headers=headers) as response:
            response.raise_for_status()
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _BadState(f"{declared} bytes, more than {limit}")
            body = bytearray()
            async for chunk in response.aiter_bytes():  # decoded, counted as they come
                body += chunk
                if len(body) > limit:
                    raise _BadState(f"more than {limit} bytes")
        try:
            data = json.loads(bytes(body))
        except RecursionError:
            raise _BadState("JSON nested too deeply") from None
        return SyncState.model_validate(data)

    async def _credentials(self, specs: list[AdapterSpec]
                           ) -> tuple[dict[ObjectKey, EntryCredentials], dict[ObjectKey, str]]:
        """Each spec's ``source.credentialsSecret``, or why it cannot be used."""
        creds: dict[ObjectKey, EntryCredentials] = {}
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
            values, problem = entry_credentials(secret, spec.credentials_secret)
            if values is not None:
                creds[spec.key] = values
            else:
                problems[spec.key] = problem or "unusable Secret"
        return creds, problems

    async def _observe_traffic(self, seen: Observed, live: Sequence[AdapterSpec]) -> None:
        """Hot tenants: record the tokens each tenant was served, from the pool pods'
        per-tenant metrics ports (only Auto needs them), and forget the history nothing
        needs any more."""
        hot = self.hot
        assert hot is not None
        by_load = self.settings.placement_policy == "leastLoaded"
        if by_load or any(spec.dedicated.mode == "Auto" for spec in live):
            targets = hot.scrape_targets(seen.pool_pods, self.settings.server_port)
            totals = await scrape_token_totals(self.http, targets,
                                               timeout=self.settings.request_timeout_seconds,
                                               headers=self._server_headers)
            if totals is not None:
                hot.record(totals, seen.clock)
        hot.prune(seen.specs, keep_all=by_load)

    # ----------------------------------------------------------------- 2. plan
    def plan(self, seen: Observed) -> PassPlan:
        """Decide without I/O: validation, placement, hot tenants' dedicated deployments
        (and so their routes), and every pool pod's full desired set."""
        specs = seen.specs
        validation = validate(specs, seen.pods, seen.observations)
        placeable = [s for s in specs if s.key not in validation.rejected and not s.deleting]
        rates = (self.hot.rates(seen.clock) if self.hot is not None
                 and self.settings.placement_policy == "leastLoaded" else None)
        placements = place(placeable, seen.pods, excluded=validation.excluded,
                           policy=self.settings.placement_policy, rates=rates,
                           device_slots=self.settings.placement_device_slots,
                           moves={s.key: s.move for s in placeable if s.move is not None})
        moves = self._plan_moves(seen, validation.excluded, placeable, placements, rates,
                                 time.time())
        keys = {spec.key for spec in placeable}
        credentials = {k: c for k, c in seen.credentials.items() if k in keys}
        problems = {k: p for k, p in seen.credential_problems.items() if k in keys}
        hot, hot_transient = self._plan_hot(seen, placeable, placements, credentials)
        routes = {(step.spec.namespace, step.spec.tenant, version): url
                  for step in hot.values() for version, url in step.todo.routes.items()}
        canaries = {spec.key: self._plan_canary(spec, placements.get(spec.key, []),
                                                seen.observations)
                    for spec in placeable if spec.canary or spec.canary_error
                    or spec.canary_status}
        weights = {spec.key: (spec.canary, step.weight) for spec in placeable
                   if spec.canary is not None
                   and (step := canaries[spec.key]).weight is not None}
        desired = build_desired_sets(placeable, placements, list(seen.pool_pods),
                                     seen.observations, credentials=credentials, routes=routes,
                                     canaries=weights)
        access = {k: a for k, a in seen.access.items() if k in keys}
        desired = with_access(desired, {(s.namespace, s.tenant): access[s.key].access
                                        for s in placeable if s.key in access})
        writes, deletes = plan_dedicated_access(seen, hot, access)
        access_transient = any(a.ok is None or a.reason == SECRET_NOT_FOUND
                               for a in access.values())
        hidden = moves.hidden()
        tables = self.peer_tables(seen, placeable, placements, seen.observations, hidden)
        return PassPlan(validation=validation, placements=placements, desired=desired, hot=hot,
                        credential_problems=problems, untrusted=seen.untrusted,
                        access=access, access_writes=writes, access_deletes=deletes,
                        transient=(hot_transient or bool(problems) or access_transient
                                   or bool(moves.moves) or bool(moves.done)
                                   or any(c.transient for c in canaries.values())),
                        tables=tables, pool_access=pool_access(seen, placeable, access),
                        moves=moves,
                        peer_prints=self._peer_prints(seen, placeable, moves, tables),
                        canaries=canaries)

    @staticmethod
    def _plan_canary(spec: AdapterSpec, pods: Sequence[PodKey],
                     observations: Mapping[PodKey, PodObservation]) -> CanaryStep:
        """The canary's next step, from what the tenant's placed pods report."""
        stable_ready = bool(pods)
        canary_ready = bool(pods)
        failed: str | None = None
        stable = canary = Counts() if pods else None
        version = spec.canary.version if spec.canary is not None else None
        for pod in pods:
            obs = observations.get(pod)
            if obs is None or not obs.server_ok:
                stable_ready = canary_ready = False
                stable = canary = None
                continue
            assert obs.server is not None
            if obs.serving.get(spec.tenant) != spec.version:
                stable_ready = False
            views = {a.version: a for a in obs.server.adapters if a.tenant == spec.tenant}
            if version is not None:
                if obs.phase(spec.tenant, version) == SyncPhase.FAILED:
                    item = obs.adapters.get((spec.tenant, version))
                    failed = f"{pod[1]}: {item.reason if item else 'failed'}"
                if (spec.tenant, version) not in obs.served or obs.phase(
                        spec.tenant, version) != SyncPhase.READY:
                    canary_ready = False
            mine, theirs = views.get(version or ""), views.get(spec.version)
            stable = (stable + Counts.of(theirs.stats) if stable is not None
                      and theirs is not None and theirs.stats is not None else None)
            canary = (canary + Counts.of(mine.stats) if canary is not None
                      and mine is not None and mine.stats is not None else None)
        facts = CanaryFacts(stable_ready=stable_ready, canary_ready=canary_ready,
                            canary_failed=failed, canary=canary, stable=stable)
        return advance(spec.canary, spec.canary_error, spec.canary_status, facts, time.time())

    def _plan_moves(self, seen: Observed, excluded: Mapping[ObjectKey, set[PodKey]],
                    placeable: Sequence[AdapterSpec],
                    placements: dict[ObjectKey, list[PodKey]],
                    rates: Mapping[tuple[str, str], float] | None, now: float) -> MovePlan:
        """Advance every move in progress one step, then (``--rebalance`` with
        ``leastLoaded``) start at most one per pool; ``placements`` is updated in place."""
        out = MovePlan()
        members: dict[ObjectKey, list[PodKey]] = {}
        by_pool: dict[tuple[str, str], list[PodKey]] = {}
        for spec in placeable:
            pool = (spec.namespace, spec.pool_key)
            if pool not in by_pool:
                by_pool[pool] = [pod_key(p) for p in pods_in_pool(spec, seen.pods)
                                 if pod_key(p) in seen.pool_pods]
            skip = excluded.get(spec.key, set())
            members[spec.key] = [p for p in by_pool[pool] if p not in skip]
        holding: dict[PodKey, dict[str, tuple[tuple[str, ...], Any]]] = {}

        def holds(pod: PodKey, spec: AdapterSpec) -> bool:
            if pod not in holding:
                holding[pod] = held(seen.observations.get(pod))
            found = holding[pod].get(spec.tenant)
            return found is not None and spec.version in found[0]

        settings = self.settings
        for spec in placeable:
            move = spec.move
            if move is None:
                continue
            step = advance_move(spec, move, placements.get(spec.key, []),
                                self._move_facts(spec, move, members[spec.key], holds, seen),
                                now=now, drain_timeout_s=settings.move_drain_timeout_seconds,
                                load_timeout_s=settings.move_load_timeout_seconds)
            placements[spec.key] = step.placements
            if step.move is not None:
                out.moves[spec.key] = step.move
                if step.move.phase != move.phase:
                    log.info("%s/%s: move %s -> %s routed: %s drains", *spec.key,
                             move.source, move.target, move.source)
            if step.done is not None:
                out.done[spec.key] = step.done
                log.info("%s/%s: move ended (%s): %s", *spec.key, step.done.outcome,
                         step.done.reason)
        ready_pods = {k for k, p in seen.pool_pods.items() if pod_is_ready(p)}
        candidates = {s.key: [p for p in members[s.key] if p in ready_pods] for s in placeable}
        if settings.unready_grace_seconds > 0:
            self._plan_unready(seen, placeable, placements, candidates, rates, now, out)
        if not (settings.rebalance and settings.placement_policy == "leastLoaded"
                and rates is not None):
            return out
        changed = set(out.moves) | set(out.done)
        busy = {(s.namespace, s.pool_key) for s in placeable if s.key in changed}
        pinned = set(changed)
        for spec in placeable:
            existing = seen.dedicated.get(spec.key) if seen.dedicated else None
            if spec.dedicated.mode == "Always" or (existing is not None and not existing.empty):
                pinned.add(spec.key)  # a hot tenant: its dedicated deployment serves it
        ready_on = {s.key: {p for p in placements.get(s.key, ()) if holds(p, s)}
                    for s in placeable}
        started = choose_moves(
            placeable, placements, candidates, rates, now=now,
            settings=Rebalance(ratio=settings.rebalance_ratio,
                               floor=settings.rebalance_floor_tokens_per_s,
                               cooldown_s=settings.rebalance_cooldown_seconds),
            ready_on=ready_on, busy_pools=busy, pinned_keys=pinned,
            device_slots=settings.placement_device_slots)
        _start_moves(started, placements, out)
        return out

    def _plan_unready(self, seen: Observed, placeable: Sequence[AdapterSpec],
                      placements: dict[ObjectKey, list[PodKey]],
                      candidates: Mapping[ObjectKey, Sequence[PodKey]],
                      rates: Mapping[tuple[str, str], float] | None, now: float,
                      out: MovePlan) -> None:
        """Moves off pods NotReady beyond ``--unready-grace-seconds`` (see
        :func:`choose_unready_moves`); an adapter whose move was abandoned within the grace
        (its target failed) waits, so a failing target is not retried every pass."""
        grace = self.settings.unready_grace_seconds
        unready = {k: since for k, p in seen.pool_pods.items()
                   if (since := pod_unready_since(p)) is not None}
        if not unready:
            return
        waiting = set(out.moves) | set(out.done) | {
            s.key for s in placeable if s.last_move is not None
            and s.last_move.outcome == MOVE_ABANDONED and now - s.last_move.finished < grace}
        started = choose_unready_moves(
            placeable, placements, candidates, unready, now=now, grace_s=grace,
            moving=waiting, policy=self.settings.placement_policy, rates=rates,
            device_slots=self.settings.placement_device_slots)
        _start_moves(started, placements, out)

    def _move_facts(self, spec: AdapterSpec, move: Move, members: Sequence[PodKey],
                    holds: Any, seen: Observed) -> MoveFacts:
        """What the pool's pods say about ``move`` (see :class:`MoveFacts`)."""
        ns = spec.namespace
        source, target = (ns, move.source), (ns, move.target)
        target_obs = seen.observations.get(target)
        failed = None
        if target_obs is not None and target_obs.sidecar_ok:
            item = target_obs.adapters.get((spec.tenant, spec.version))
            if item is not None and item.phase == SyncPhase.FAILED:
                failed = item.reason or "failed"
        updated = all(
            (spec.tenant, move.source) in self._sent_peers.get(pod, {}).get(
                (obs.peers_fingerprint or ""), frozenset())
            for pod in members if pod != source
            for obs in [seen.observations.get(pod) or PodObservation(key=pod)])
        source_obs = seen.observations.get(source)
        in_flight = (source_obs.in_flight(spec.tenant)
                     if source_obs is not None and source_obs.sidecar_ok else None)
        return MoveFacts(live=frozenset(members), target_ready=holds(target, spec),
                         target_failed=failed, tables_updated=updated,
                         source_in_flight=in_flight)

    def _peer_prints(self, seen: Observed, placeable: Sequence[AdapterSpec], moves: MovePlan,
                     tables: PoolTables) -> dict[PodKey, tuple[str, frozenset[tuple[str, str]]]]:
        """The fingerprints of the tables sent to the pods of pools with a draining move
        (only those pools: a fingerprint costs a serialisation of the pod's table)."""
        draining = {k: m for k, m in moves.moves.items() if m.phase == MOVE_DRAINING}
        if not draining:
            return {}
        pairs: dict[PodKey, set[tuple[str, str]]] = {}
        for spec in placeable:
            move = draining.get(spec.key)
            if move is None:
                continue
            for pod in pods_in_pool(spec, seen.pods):
                key = pod_key(pod)
                if key in seen.pool_pods:
                    pairs.setdefault(key, set()).add((spec.tenant, move.source))
        return {pod: (table_fingerprint(tables.wire_for(pod)), frozenset(found))
                for pod, found in pairs.items()}

    def peer_tables(self, seen: Observed, placeable: Sequence[AdapterSpec],
                    placements: Mapping[ObjectKey, Sequence[PodKey]],
                    observations: Mapping[PodKey, PodObservation],
                    hidden: Mapping[ObjectKey, set[str]] | None = None) -> PoolTables:
        """Scale-out routing: the pool's placement tables from ``observations`` (the pool
        pods') and the draining pods' (see :mod:`loramux.operator.peers`); a live pod is a
        holder only where placed, and ``hidden`` (moves' sources) never."""
        every = {**seen.draining, **seen.pool_pods}
        members: dict[ObjectKey, list[PodKey]] = {}
        by_pool: dict[tuple[str, str], list[PodKey]] = {}
        draining = list(seen.draining.values())
        for spec in placeable:
            pool = (spec.namespace, spec.pool_key)
            if pool not in by_pool:
                by_pool[pool] = [pod_key(p) for p in pods_in_pool(spec, seen.pods)
                                 if pod_key(p) in seen.pool_pods] + [
                    pod_key(p) for p in pods_draining_in_pool(spec, draining)]
            members[spec.key] = by_pool[pool]
        urls: dict[PodKey, str | None] = {}

        def url_of(key: PodKey) -> str | None:
            if key not in urls:
                pod = every.get(key)
                urls[key] = (_base_url(pod, container_port(pod, "http",
                                                           self.settings.server_port))
                             if pod is not None and pod_ip(pod) else None)
            return urls[key]

        return build_pool_tables(placeable, placements, members, seen.pool_pods,
                                 {**seen.draining_observations, **observations}, url_of,
                                 live=seen.pool_pods, hidden=hidden)

    def _plan_hot(
        self, seen: Observed, specs: Sequence[AdapterSpec],
        placements: Mapping[ObjectKey, list[PodKey]],
        credentials: Mapping[ObjectKey, EntryCredentials],
    ) -> tuple[dict[ObjectKey, HotStep], bool]:
        """Promote, route, roll and demote dedicated deployments (see hot_tenants); the flag
        says whether one is changing (or could not be seen)."""
        hot = self.hot
        if hot is None:
            return {}, False
        if seen.dedicated is None:
            return {}, True
        steps: dict[ObjectKey, HotStep] = {}
        transient = False
        for spec in specs:
            existing = seen.dedicated.get(spec.key, Existing())
            if spec.dedicated.mode == "Never" and existing.empty:
                continue
            obj = seen.adapters[spec.key][1]
            decision = hot.decide(spec, not existing.empty, seen.clock)
            pods = placements.get(spec.key, [])
            routed = {obs.routes[spec.tenant] for k in pods
                      if (obs := seen.observations.get(k)) is not None
                      and spec.tenant in obs.routes}
            serves = bool(pods) and all(
                (obs := seen.observations.get(k)) is not None
                and obs.serving.get(spec.tenant) == spec.version for k in pods)
            creds = credentials.get(spec.key)
            keys = (secret_keys(creds) if creds is not None else set()) \
                if spec.credentials_secret else None
            todo = plan(obj, decision, existing, hot.template, routed_versions=routed,
                        pool_serves_version=serves, replicas=spec.dedicated.replicas,
                        secret_keys=keys, cluster_domain=self.settings.cluster_domain)
            steps[spec.key] = HotStep(spec=spec, obj=obj, decision=decision, todo=todo)
            if todo.create or todo.delete or todo.condition.get("reason") in (
                    "Starting", "Demoting"):
                transient = True
        return steps, transient

    # ----------------------------------------------------------------- 3. deliver
    async def deliver(self, seen: Observed, todo: PassPlan) -> Delivery:
        """Act on the plan: dedicated objects first, then every pool pod's desired set
        (``PUT /v1/desired``), then each pod's state read back for the report."""
        transient = await self._apply_access(todo.access_writes, ())
        transient = await self._apply_hot(todo.hot, seen.clock) or transient
        transient = await self._apply_access((), todo.access_deletes) or transient
        keys = list(seen.pool_pods)
        tables = todo.tables
        puts = await asyncio.gather(*(self._put_desired(
            seen.pool_pods[k], todo.desired[k],
            tables.wire_for(k) if tables is not None else None,
            todo.pool_access.get(k)) for k in keys))
        put_errors = {k: err for k, err in zip(keys, puts, strict=True) if err}
        for key, err in put_errors.items():
            log.warning("pod %s/%s: desired set not delivered: %s", key[0], key[1], err)
        delivered = [k for k in keys if k not in put_errors]
        after = await asyncio.gather(*(self._pod_state(seen.pool_pods[k]) for k in delivered))
        observations = dict(seen.observations)
        for key, fresh in zip(delivered, after, strict=True):
            # A pod that does not answer now keeps what it said before, marked unanswered.
            observations[key] = fresh if fresh.sidecar_ok else dataclasses.replace(
                observations[key], sidecar_ok=False, sidecar_error=fresh.sidecar_error)
        return Delivery(put_errors=put_errors, observations=observations,
                        transient=transient or bool(put_errors))

    async def _apply_hot(self, steps: Mapping[ObjectKey, HotStep], clock: float) -> bool:
        """Create and delete dedicated objects, with Promoted/Demoted Events."""
        transient = False
        for step in steps.values():
            spec, todo, decision = step.spec, step.todo, step.decision
            assert self.hot is not None and self.kube is not None
            try:
                await self.hot.apply(spec, todo, decision, clock)
            except KubeError as exc:
                log.warning("%s/%s: dedicated deployment: %s", *spec.key, exc)
                transient = True
            target = _event_target(step.obj)
            if any(o["kind"] == "Deployment" for o in todo.create):
                await self.kube.post_event(target, "Normal", "Promoted",
                                           f"dedicated deployment for {spec.tenant}@"
                                           f"{spec.version}: {decision.reason}")
            if todo.delete and decision.action == "demote":
                await self.kube.post_event(target, "Normal", "Demoted",
                                           f"{spec.tenant} served by the pool again: "
                                           f"{decision.reason}")
        return transient

    async def _apply_access(self, writes: Sequence[tuple[dict[str, Any], bool]],
                            deletes: Sequence[tuple[str, str]]) -> bool:
        """Write dedicated access Secrets (merge-patch, else create; "create only": create,
        an existing one is left alone) and delete them; True when one failed. The operator
        never reads them (its RBAC has no get on them)."""
        kube = self.kube
        assert kube is not None
        failed = False
        for body, create_only in writes:
            meta = body["metadata"]
            where = f"{meta['namespace']}/{meta['name']}"
            try:
                if not create_only:
                    patch = {"metadata": {"labels": meta["labels"],
                                          "ownerReferences": meta["ownerReferences"]},
                             "data": body["data"]}
                    try:
                        await kube.merge_patch_secret(meta["namespace"], meta["name"], patch)
                        log.debug("access Secret %s written", where)
                        continue
                    except KubeError as exc:
                        if exc.status != 404:
                            raise
                try:
                    await kube.create_secret(body)
                    log.info("created access Secret %s", where)
                except KubeError as exc:
                    if exc.status != 409 or not create_only:
                        raise
            except KubeError as exc:
                log.warning("cannot write access Secret %s: %s", where, exc)
                failed = True
        for namespace, name in deletes:
            try:
                if await kube.delete_secret(namespace, name):
                    log.info("deleted access Secret %s/%s", namespace, name)
            except KubeError as exc:
                log.warning("cannot delete access Secret %s/%s: %s", namespace, name, exc)
                failed = True
        return failed

    async def _put_desired(self, pod: Mapping[str, Any], entries: list[DesiredAdapter],
                           peers: dict[str, Any] | None = None,
                           access: Mapping[str, TenantAccess] | None = None) -> str | None:
        """``PUT /v1/desired``: the pod's desired set, its copy of the placement table
        (``peers``, already JSON: see :meth:`PoolTables.wire_for`) and its pool's tenant
        access."""
        assert self.http is not None
        url = _base_url(pod, container_port(pod, "sync", self.settings.sidecar_port))
        body = DesiredState(adapters=entries, access=dict(access or {})).wire()
        if peers is not None:
            body["peers"] = peers
        try:
            response = await self.http.put(f"{url}/v1/desired", json=body,
                                           headers=self._sidecar_headers)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            return _short(exc)
        return None

    # ----------------------------------------------------------------- 4. report
    async def report(self, seen: Observed, todo: PassPlan, delivered: Delivery) -> PassResult:
        """Each LoraAdapter's status from what the pods said after delivery, merge-patched
        when it changed, with an Event per transition."""
        result = PassResult(specs={s.key: s for s in seen.specs}, pods=dict(seen.pool_pods),
                            observations=delivered.observations, desired=todo.desired,
                            put_errors=delivered.put_errors)
        transient = todo.transient or delivered.transient
        if todo.tables is not None and not transient:
            # A holder gained or lost since the tables were built: send them again soon.
            placeable = [s for s in seen.specs if s.key in todo.placements]
            after = self.peer_tables(seen, placeable, todo.placements, delivered.observations,
                                     todo.moves.hidden())
            if after.signature() != todo.tables.signature():
                transient = True
        self._remember_tables(seen, todo, delivered)
        now = _now()
        for spec, obj in seen.adapters.values():
            if spec.deleting:
                continue
            old = obj.get("status") or {}
            status = self._status(spec, old, todo, delivered, now)
            result.statuses[spec.key] = status
            if status["phase"] in (AdapterPhase.PROGRESSING, AdapterPhase.PENDING) or any(
                    r["state"] == PlacementState.UNKNOWN for r in status.get("placements", [])):
                transient = True
            applied, total = self.access_applied(spec, todo)
            if spec.key in todo.access and applied < total:
                transient = True  # the sidecars have not pushed the new hashes yet
            if status_differs(old, status) and not await self._write_status(spec, obj, status):
                transient = True
            elif spec.key in todo.canaries:
                await self._canary_effects(spec, obj, todo.canaries[spec.key])
        result.transient = transient
        return result

    async def _canary_effects(self, spec: AdapterSpec, obj: Mapping[str, Any],
                              step: CanaryStep) -> None:
        """After the status is written: the canary's Events, and its promotion (the spec
        takes the canary's version and source; the stable rollout does the rest)."""
        assert self.kube is not None
        for type_, reason, message in step.events:
            await self.kube.post_event(_event_target(obj), type_, reason, message)
        canary = spec.canary
        if not step.promote or canary is None:
            return
        patch = {"spec": {"version": canary.version, "canary": None,
                          "source": {"uri": canary.uri, "sha256": canary.sha256}}}
        try:
            written = await self.kube.patch_adapter(spec.namespace, spec.name, patch)
        except KubeError as exc:
            log.warning("cannot promote %s@%s: %s", spec.tenant, canary.version, exc,
                        extra={"tenant": spec.tenant, "version": canary.version})
            return
        if written is not None:
            self.index.apply("adapter", "MODIFIED", written)
            log.info("promoted %s@%s to spec.version", spec.tenant, canary.version,
                     extra={"tenant": spec.tenant, "version": canary.version})

    def _remember_tables(self, seen: Observed, todo: PassPlan, delivered: Delivery) -> None:
        """Remember the fingerprints of the tables delivered during moves (and forget the
        pods that are gone)."""
        for pod, (fingerprint, pairs) in todo.peer_prints.items():
            if pod in delivered.put_errors:
                continue
            sent = self._sent_peers.setdefault(pod, {})
            sent.pop(fingerprint, None)
            sent[fingerprint] = pairs
            while len(sent) > SENT_TABLES_KEPT:
                del sent[next(iter(sent))]
        for gone in [k for k in self._sent_peers if k not in seen.pool_pods]:
            del self._sent_peers[gone]

    def _status(self, spec: AdapterSpec, old: Mapping[str, Any], todo: PassPlan,
                delivered: Delivery, now: str) -> dict[str, Any]:
        status = compute_status(
            spec, rejection=todo.validation.rejected.get(spec.key),
            pods=todo.placements.get(spec.key, []), desired=todo.desired,
            observations=delivered.observations, put_errors=delivered.put_errors,
            credentials_problem=todo.credential_problems.get(spec.key), previous=old, now=now,
            extra=todo.moves.extra(spec.key),
        )
        move = todo.moves.moves.get(spec.key)
        if move is not None:
            status["move"] = move.view()
        last = todo.moves.done.get(spec.key) or spec.last_move
        if last is not None:
            status["lastMove"] = last.view()
        untrusted = todo.untrusted.get(spec.key)
        if untrusted:
            # Pods the pool selects that this install does not own: they get nothing.
            prev = {c.get("type"): c for c in old.get("conditions") or []
                    if isinstance(c, Mapping)}
            detail = "; ".join(f"{pod}: {why}" for pod, why in sorted(untrusted.items()))
            message = (f"{len(untrusted)} pod(s) match spec.pool but are not owned by this "
                       f"install and get no token, credentials or adapters ({detail})")
            status.setdefault("conditions", []).append(_condition(
                "PoolTrusted", False, UNTRUSTED_PODS, message, spec.generation, prev, now))
            for c in status["conditions"]:
                if c["type"] in ("Synced", "Ready") and c["reason"] == "NoPods":
                    c["reason"], c["message"] = UNTRUSTED_PODS, message[:1000]
        access = todo.access.get(spec.key)
        if access is not None:
            prev = {c.get("type"): c for c in old.get("conditions") or []
                    if isinstance(c, Mapping)}
            applied, total = self.access_applied(spec, todo)
            message = f"{access.message}; applied on {applied}/{total} pod(s)"
            status.setdefault("conditions", []).append(_condition(
                ACCESS_READY, access.ok, access.reason, message, spec.generation, prev, now))
        step = todo.hot.get(spec.key)
        if step is not None and step.todo.condition:
            prev = {c.get("type"): c for c in old.get("conditions") or []
                    if isinstance(c, Mapping)}
            c = step.todo.condition
            status.setdefault("conditions", []).append(_condition(
                "Dedicated", c["status"] == "True", c["reason"], c["message"],
                spec.generation, prev, now))
        if step is not None and step.todo.endpoint:
            status["dedicatedEndpoint"] = step.todo.endpoint
        elif old.get("dedicatedEndpoint"):
            status["dedicatedEndpoint"] = None
        self._canary_status(spec, old, todo.canaries.get(spec.key), status, now)
        return status

    @staticmethod
    def _canary_status(spec: AdapterSpec, old: Mapping[str, Any], step: CanaryStep | None,
                       status: dict[str, Any], now: str) -> None:
        """``status.canary`` and the ``Canary`` condition; a rollback makes a Ready resource
        Degraded (the stable version still serves, the figures say why)."""
        if step is None or step.status is None:
            return
        status["canary"] = step.status
        phase = step.status.get("phase")
        message = str(step.status.get("message") or phase)
        prev = {c.get("type"): c for c in old.get("conditions") or [] if isinstance(c, Mapping)}
        healthy = step.degraded is None and phase != CANARY_INVALID
        status.setdefault("conditions", []).append(_condition(
            "Canary", healthy, str(phase), message, spec.generation, prev, now))
        if step.degraded is not None and status.get("phase") == AdapterPhase.READY:
            status["phase"] = AdapterPhase.DEGRADED

    def access_applied(self, spec: AdapterSpec, todo: PassPlan) -> tuple[int, int]:
        """(pods whose server holds the tenant's access as sent, pods it is placed on), from
        the sidecars' reports (``SyncState.access`` fingerprints)."""
        access = todo.access.get(spec.key)
        pods = todo.placements.get(spec.key, [])
        if access is None:
            return 0, len(pods)
        want = access.access.fingerprint()
        return sum(1 for pod in pods
                   if self._pod_access.get(pod, {}).get(spec.tenant) == want), len(pods)

    async def _write_status(self, spec: AdapterSpec, obj: Mapping[str, Any],
                            status: dict[str, Any]) -> bool:
        """Merge-patch the status, then post its Events; False when the patch failed."""
        assert self.kube is not None
        old = obj.get("status") or {}
        try:
            written = await self.kube.patch_adapter_status(spec.namespace, spec.name,
                                                           status_patch(old, status))
        except KubeError as exc:
            log.warning("cannot patch status of %s/%s: %s", *spec.key, exc)
            return False
        if written is not None:
            # The next pass must see the placements just written, watch event or not.
            self.index.apply("adapter", "MODIFIED", written)
        if old.get("phase") != status["phase"]:
            log.info("%s/%s (%s@%s): %s -> %s", spec.namespace, spec.name, spec.tenant,
                     spec.version, old.get("phase"), status["phase"])
        for type_, reason, message in status_events(old, status):
            await self.kube.post_event(_event_target(obj), type_, reason, message)
        return True

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
            still_desired = any(e.tenant == spec.tenant for e in result.desired.get(key, []))
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
