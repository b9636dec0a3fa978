"""The reconcile loop: the desired set, what each desired version's state is, and the passes
that close the gap between the desired set and the volume and server (see :mod:`loramux.sync`
for the whole story)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

from loramux.contracts import (
    AccessList,
    AccessView,
    ActivateRequest,
    AdapterList,
    AdapterState,
    AdapterView,
    DesiredAdapter,
    DesiredState,
    EvictionState,
    EvictResult,
    LoadAdapterRequest,
    PeerTable,
    PeerTableView,
    RouteList,
    RouteRequest,
    RouteView,
    SplitRequest,
    SyncPhase,
    SyncState,
    TenantAccess,
    VersionStatus,
    parse_error,
)
from loramux.inference.adapter_store import (
    FetchResult,
    fetch_adapter,
    list_local,
    purge_incoming,
    remove_adapter,
)
from loramux.names import AdapterRef
from loramux.s3 import S3Error
from loramux.sync.credentials import CREDENTIAL_CURABLE, CredentialResolver, fingerprint
from loramux.sync.metrics import SyncMetrics
from loramux.sync.settings import SyncSettings

log = logging.getLogger("loramux.sync")


@dataclass
class Status:
    """What the sidecar knows about one desired version."""

    phase: SyncPhase = SyncPhase.PENDING
    reason: str | None = None
    code: str | None = None
    digest: str | None = None
    bytes: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    spec: DesiredAdapter | None = None
    terminal: bool = False  # Failed and not worth retrying until the spec changes
    retry_after: float = 0.0  # monotonic time before which a non-terminal failure waits
    credentials_source: str | None = None  # entry, mounted or environment (last fetch)
    credentials_fp: str | None = None  # fingerprint of the credentials of the last fetch

    def view(self, ref: AdapterRef) -> VersionStatus:
        return VersionStatus(tenant=ref.tenant, version=ref.version, phase=self.phase,
                             reason=self.reason, code=self.code, digest=self.digest,
                             bytes=self.bytes, timings=dict(self.timings),
                             credentials_source=self.credentials_source)


class ServerError(Exception):
    """The inference server refused a call (``status``) or could not be reached (None)."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Reconciler:
    """Owns the desired set, the per-version status and the reconcile loop."""

    def __init__(self, settings: SyncSettings, *, s3_client: Any = None) -> None:
        self.settings = settings
        # Absolute: the server is told this path and refuses relative ones.
        self.root = Path(settings.root).absolute()
        self.desired: dict[AdapterRef, DesiredAdapter] = {}
        # Access of the pool's tenants this pod may be asked for but need not hold
        # (DesiredState.access: scale-out routing authenticates at the first pod).
        self.pool_access: dict[str, TenantAccess] = {}
        self.status: dict[AdapterRef, Status] = {}
        self.metrics = SyncMetrics()
        self.credentials = CredentialResolver(settings.s3_credentials_dir, s3_client=s3_client)
        self.retry = settings.retry_policy
        self._tasks: dict[AdapterRef, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._downloads = asyncio.Semaphore(settings.max_concurrent_downloads)
        self._loop_task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        # Read per call, not fixed in the client's headers: a rotated token file is used
        # from the next call on.
        self._server_token = settings.server_token_source()
        self.server_reachable = False
        self.last_pass: float | None = None
        # The server's own answer to GET /admin/adapters in the last pass (None: no answer).
        self.server_state: AdapterList | None = None
        # Until the first PUT /v1/desired an empty desired set means "not told yet", not
        # "remove everything": a restarted sidecar must not evict and delete what serves.
        self.desired_received = False
        self.routes: dict[str, RouteView] = {}  # the server's, as of the last pass
        # The server's GET /admin/access as of the last pass (None: no answer, or a server
        # without per-tenant access), reported in SyncState.access.
        self.access_state: AccessList | None = None
        # False while the server answers GET /admin/access with 404 (an older server:
        # logged once, nothing pushed).
        self.access_supported = True
        # tenant -> fingerprint of its admin-pushed access on the server, as last seen or
        # pushed (a load checks it, so access goes first even for a version that a pass
        # started before the desired set changed fetches and loads)
        self._access_fp: dict[str, str] = {}
        # Scale-out routing: the placement table the operator sent (None: leave the server's
        # as it is) and its fingerprint (computed once per PUT /v1/desired), the fingerprint
        # of the table the server holds (GET /admin/peers, or the answer to our PUT; None:
        # unknown), and whether the server has the peers API at all (404: an older one).
        self.desired_peers: PeerTable | None = None
        self.desired_peers_fingerprint: str | None = None
        self.peers_fingerprint: str | None = None
        self.peers_supported = True

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(purge_incoming, self.root)
        self._client = httpx.AsyncClient(
            base_url=self.settings.server_url.rstrip("/"),
            timeout=self.settings.server_timeout_seconds,
        )
        self._loop_task = asyncio.create_task(self._run(), name="loramux-sync-reconcile")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()

    @property
    def loop_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def set_desired(self, state: DesiredState) -> None:
        self.desired = {entry.ref: entry for entry in state.adapters}
        self.pool_access = dict(state.access)
        self.desired_received = True
        if state.peers is not None:
            self.desired_peers = state.peers
            self.desired_peers_fingerprint = state.peers.fingerprint()
        for ref, entry in self.desired.items():
            status = self.status.get(ref)
            if status is None or not entry.same_spec(status.spec):
                # New or changed entry: start over (a Failed one gets a fresh chance).
                self.status[ref] = Status(spec=entry)
            else:
                # Same spec, perhaps new credentials: used from the next fetch on; a Ready
                # version is left alone, a store failure is retried (_credentials_changed).
                status.spec = entry
        for ref in list(self.status):
            if ref not in self.desired:
                del self.status[ref]
        self._update_phase_metrics()
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.resync_seconds)

    # ----------------------------------------------------------------- server calls
    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "Reconciler.start() was not called"
        return self._client

    async def _server(self, method: str, path: str, body: BaseModel | None = None) -> Any:
        payload = body.model_dump(mode="json", exclude_unset=True) if body is not None else None
        token = self._server_token.current()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            response = await self.client.request(method, path, json=payload, headers=headers)
        except httpx.HTTPError as exc:
            raise ServerError(None, "unreachable", f"{method} {path}: {exc!r}") from exc
        if response.status_code >= 400:
            try:
                data: Any = response.json()
            except ValueError:
                data = None
            code, message = parse_error(data, "http_error", response.text[:500])
            raise ServerError(response.status_code, code, message)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:  # not JSON (or not UTF-8): a bad answer, not a crash
            raise ServerError(None, "bad_response",
                              f"{method} {path}: the answer is not JSON: "
                              f"{response.text[:200]!r}") from exc

    async def _server_report(self, path: str, model: type[Any]) -> Any:
        """``GET path`` parsed as ``model`` (a contract report); a malformed answer is a
        :class:`ServerError` like an unreachable server."""
        data = await self._server("GET", path)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise ServerError(None, "bad_response",
                              f"GET {path}: not a {model.__name__}: {exc.errors()[:1]}") from exc

    async def server_adapters(self) -> AdapterList:
        return await self._server_report("/admin/adapters", AdapterList)

    # ----------------------------------------------------------------- one pass
    async def reconcile_once(self) -> None:
        """One pass, from what is actually there (the volume and the server's answer):

        0. push each tenant's access to the server (and remove access no longer desired);
        1. fetch and load each desired version that is not ready on the server;
        2. switch each tenant's active version once its target is ready, and set each
           canary's share of its tenant's requests once the canary is ready;
        3. evict versions no longer desired (once their tenant has settled);
        4. set or remove hot tenants' routes to their dedicated deployments;
        5. delete local files of versions neither desired nor loaded.

        Steps 0 and 2-5 only run while the server answers; removals (of access, versions,
        routes, files) only after the first PUT /v1/desired.
        """
        self.metrics.passes.inc()
        self.last_pass = time.time()
        server: dict[AdapterRef, AdapterView] | None
        try:
            answer = await self.server_adapters()
        except ServerError as exc:
            # Unreachable, refused or malformed: this pass works without the server's
            # answer (nothing that needs it happens, Ready versions stay Ready); the next
            # pass asks again.
            self.server_reachable, self.server_state, server = False, None, None
            self.access_state, self.peers_fingerprint = None, None
            self.metrics.server_errors.labels("adapters", exc.code).inc()
            log.warning("inference server unavailable: %s", exc.message)
        else:
            self.server_reachable, self.server_state = True, answer
            server = {}
            for view in answer.adapters:
                with contextlib.suppress(ValueError):
                    # A working copy: the steps below update it, the answer stays as it was.
                    server[AdapterRef(view.tenant, view.version)] = view.model_copy()
        if server is not None:
            # 0. tenant access (key hashes, weight, limits) before anything is loaded or
            # activated: a tenant becomes callable with its keys already known.
            await self._sync_access()
            # 0b. the pool's placement table (scale-out routing)
            await self._sync_peers()
        local = await asyncio.to_thread(list_local, self.root)
        now = time.monotonic()

        # 1. fetch and load whatever is desired but not ready on the server
        for ref, spec in self.desired.items():
            status = self.status.setdefault(ref, Status(spec=spec))
            live = server.get(ref) if server is not None else None
            if live is not None and live.state == AdapterState.READY:
                if status.phase != SyncPhase.READY:
                    status.phase, status.reason, status.code = SyncPhase.READY, None, None
                    status.terminal = False
                if live.pinned != spec.pinned and ref not in self._tasks and self._owns(
                        live.path):
                    # Pinning changed on a loaded version: say so again, nothing reloads.
                    self._spawn(ref, self._repin(ref, spec, live.path), "repin")
                continue
            if status.phase == SyncPhase.READY and server is not None:
                status.phase, status.reason = SyncPhase.PENDING, "no longer ready on the server"
            if status.phase == SyncPhase.FAILED and self._credentials_changed(status):
                status.terminal, status.retry_after = False, 0.0
                status.phase = SyncPhase.PENDING
                status.reason = "credentials changed; trying again"
            if ref in self._tasks or status.terminal or now < status.retry_after:
                continue
            if server is None and ref in local:
                continue  # nothing to do until the server answers
            self._spawn(ref, self._sync_one(ref, spec), "sync")

        if server is not None and self.desired_received:
            # 2. activation, 3. eviction
            server = await self._activate_and_evict(server)
            # 2b. canary splits: a Ready canary's share of the bare tenant's requests
            await self._sync_splits(server)
            # 4. hot tenants' routes to their dedicated deployments
            await self._sync_routes()
            # 5. local files neither desired nor loaded
            for ref in local:
                if ref in self.desired or ref in server or ref in self._tasks:
                    continue
                try:
                    await asyncio.to_thread(remove_adapter, ref, self.root)
                    log.info("deleted local files of %s", ref)
                except (OSError, ValueError) as exc:
                    log.warning("could not delete %s: %s", ref, exc)
        self._update_phase_metrics()

    def _spawn(self, ref: AdapterRef, work: Any, kind: str) -> None:
        task = asyncio.create_task(work, name=f"{kind}-{ref}")
        self._tasks[ref] = task
        task.add_done_callback(lambda _t, r=ref: self._task_done(r))

    def _task_done(self, ref: AdapterRef) -> None:
        self._tasks.pop(ref, None)
        self.wake()

    def wanted_routes(self) -> dict[str, tuple[str, str]]:
        """tenant -> (url, version): a route is wanted while the tenant's active desired
        version carries one and is Ready here (the local copy is the fallback)."""
        wanted: dict[str, tuple[str, str]] = {}
        for tenant in sorted({ref.tenant for ref in self.desired}):
            target = self._target_active(tenant)
            if target is None:
                continue
            spec = self.desired[AdapterRef(tenant, target)]
            status = self.status.get(spec.ref)
            if spec.route and status is not None and status.phase == SyncPhase.READY:
                wanted[tenant] = (spec.route.rstrip("/"), target)
        return wanted

    async def _sync_routes(self) -> None:
        try:
            answer: RouteList = await self._server_report("/admin/routes", RouteList)
        except ServerError as exc:
            # Only the routes wait for a good answer; the rest of the pass goes on.
            self.metrics.server_errors.labels("routes", exc.code).inc()
            log.warning("cannot read the server's routes: %s", exc.message)
            return
        current = {route.tenant: route for route in answer.routes}
        self.routes = dict(current)
        wanted = self.wanted_routes()
        for tenant, (url, version) in wanted.items():
            have = current.get(tenant)
            if have and have.url == url and have.version == version:
                continue
            try:
                await self._server("PUT", f"/admin/tenants/{tenant}/route",
                                   RouteRequest(url=url, version=version))
                self.routes[tenant] = RouteView(tenant=tenant, url=url, version=version)
                log.info("routing %s@%s to its dedicated deployment %s", tenant, version, url)
            except (ServerError, ValidationError) as exc:
                log.warning("routing %s failed: %s", tenant, getattr(exc, "message", exc))
        for tenant in current:
            if tenant in wanted:
                continue
            try:
                await self._server("DELETE", f"/admin/tenants/{tenant}/route")
                self.routes.pop(tenant, None)
                log.info("%s served by the pool again (route removed)", tenant)
            except ServerError as exc:
                if exc.status != 404:
                    log.warning("removing the route of %s failed: %s", tenant, exc.message)

    async def _sync_peers(self) -> None:
        """Scale-out routing: when the operator sent a placement table
        (``DesiredState.peers``) and the server holds another one (compared by fingerprint,
        ``GET /admin/peers``), ``PUT /admin/peers``. A server answering 404 predates the
        peers API: logged once, skipped (asked again next pass). Failures count in
        ``loramux_sync_server_errors_total`` and are retried next pass. The server's table is
        read every pass (not only after a push): a restarted server starts with none."""
        table, want = self.desired_peers, self.desired_peers_fingerprint
        if table is None or want is None:
            return
        try:
            view: PeerTableView = await self._server_report("/admin/peers", PeerTableView)
        except ServerError as exc:
            self.peers_fingerprint = None
            if exc.status == 404:
                if self.peers_supported:
                    log.warning("the inference server has no GET /admin/peers (an older "
                                "server): the pool's placement table is not pushed")
                self.peers_supported = False
                return
            self.metrics.server_errors.labels("peers", exc.code).inc()
            log.warning("cannot read the server's placement table: %s", exc.message)
            return
        if not self.peers_supported:
            log.info("the inference server now answers GET /admin/peers")
        self.peers_supported = True
        self.peers_fingerprint = view.fingerprint
        if view.fingerprint == want:
            return
        try:
            reply = await self._server("PUT", "/admin/peers", table)
        except ServerError as exc:
            self.metrics.server_errors.labels("peers_push", exc.code).inc()
            log.warning("pushing the placement table failed: %s", exc.message,
                        extra={"code": exc.code})
            return
        try:
            self.peers_fingerprint = PeerTableView.model_validate(reply).fingerprint or want
        except ValidationError:
            self.peers_fingerprint = want
        if self.peers_fingerprint != want:
            log.warning("the server holds placement table %s after a push of %s",
                        self.peers_fingerprint, want)
        else:
            log.info("placement table set on the server: %d tenant(s), fingerprint %s",
                     len(table.tenants), want)

    def desired_access(self) -> dict[str, TenantAccess | None]:
        """tenant -> the access its desired entries carry: the active entry's, else any
        entry's (the operator sends the same on every entry of a tenant), else the pool's
        (``DesiredState.access``: tenants held elsewhere in the pool, reached through this
        pod); None when none carries one (then the sidecar removes what it pushed before)."""
        wanted: dict[str, TenantAccess | None] = dict(self.pool_access)
        # One pass in order: active entries first, then by version; the first access wins.
        seen: set[str] = set()
        for entry in sorted(self.desired.values(),
                            key=lambda e: (e.tenant, not e.active, e.version)):
            if entry.access is not None and entry.tenant not in seen:
                wanted[entry.tenant] = entry.access
                seen.add(entry.tenant)
            wanted.setdefault(entry.tenant, None)
        return wanted

    async def _sync_access(self) -> None:
        """Makes the server's admin-pushed access (``source == "admin"`` rows of
        ``GET /admin/access``) match :meth:`desired_access`: ``PUT`` where missing or its
        fingerprint differs, ``DELETE`` where no longer desired (only after the first
        ``PUT /v1/desired``). A server answering 404 predates per-tenant access: logged
        once, skipped. Failures count in ``loramux_sync_server_errors_total`` and are
        retried next pass. Only counts and fingerprints are logged, never the hashes."""
        try:
            answer: AccessList = await self._server_report("/admin/access", AccessList)
        except ServerError as exc:
            self.access_state = None
            if exc.status == 404:
                if self.access_supported:
                    log.warning("the inference server has no GET /admin/access (an older "
                                "server): tenant keys, weights and limits are not pushed")
                self.access_supported = False
                return
            self.metrics.server_errors.labels("access", exc.code).inc()
            log.warning("cannot read the server's tenant access: %s", exc.message)
            return
        if not self.access_supported:
            log.info("the inference server now answers GET /admin/access")
        self.access_supported = True
        self.access_state = answer
        pushed = {view.tenant: view for view in answer.tenants if view.source == "admin"}
        self._access_fp = {tenant: view.fingerprint for tenant, view in pushed.items()}
        wanted = self.desired_access()
        for tenant, access in wanted.items():
            if access is not None and self._access_fp.get(tenant) != access.fingerprint():
                await self._push_access(tenant, access)
        if not self.desired_received:
            return  # "not told yet" is not "no access": never remove before the first PUT
        for tenant in sorted(pushed):
            if wanted.get(tenant) is not None:
                continue
            try:
                await self._server("DELETE", f"/admin/tenants/{tenant}/access")
            except ServerError as exc:
                if exc.status != 404:  # 404: already gone
                    self.metrics.server_errors.labels("access_remove", exc.code).inc()
                    log.warning("removing the access of %s failed: %s", tenant, exc.message,
                                extra={"tenant": tenant, "code": exc.code})
                    continue
            self._record_access(tenant, None)
            log.info("access of %s removed from the server", tenant, extra={"tenant": tenant})

    async def _push_access(self, tenant: str, access: TenantAccess) -> bool:
        """``PUT /admin/tenants/{tenant}/access``; False (counted, logged) when it failed."""
        fingerprint = access.fingerprint()
        try:
            reply = await self._server("PUT", f"/admin/tenants/{tenant}/access", access)
        except ServerError as exc:
            self.metrics.server_errors.labels("access_push", exc.code).inc()
            log.warning("pushing the access of %s failed: %s", tenant, exc.message,
                        extra={"tenant": tenant, "code": exc.code})
            return False
        try:
            view = AccessView.model_validate(reply)
        except ValidationError:
            view = AccessView(tenant=tenant, keys=len(access.key_sha256),
                              fingerprint=fingerprint, weight=access.weight,
                              limits=access.limits, source="admin")
        self._record_access(tenant, view)
        log.info("access of %s set on the server: %d key(s), weight %g, fingerprint %s",
                 tenant, len(access.key_sha256), access.weight, fingerprint,
                 extra={"tenant": tenant})
        return True

    async def _access_before_load(self, tenant: str) -> None:
        """Pushes the tenant's desired access now if the server is not known to hold it: a
        version must not become loadable before its keys are known (availability only:
        with ``--auth keys`` a tenant without access answers no one)."""
        if not self.access_supported:
            return
        access = self.desired_access().get(tenant)
        if access is not None and self._access_fp.get(tenant) != access.fingerprint():
            await self._push_access(tenant, access)

    def _record_access(self, tenant: str, view: AccessView | None) -> None:
        """Updates the reported access list after a successful PUT (``view``) or DELETE."""
        if view is None:
            self._access_fp.pop(tenant, None)
        else:
            self._access_fp[tenant] = view.fingerprint
        if self.access_state is None:
            return
        rows = [v for v in self.access_state.tenants
                if not (v.tenant == tenant and v.source == "admin")]
        if view is not None:
            rows.append(view)
        rows.sort(key=lambda v: (v.tenant, v.source))
        self.access_state = self.access_state.model_copy(update={"tenants": rows})

    async def _repin(self, ref: AdapterRef, spec: DesiredAdapter, path: str) -> None:
        try:
            await self._server("PUT", f"/admin/adapters/{ref.tenant}/{ref.version}",
                               LoadAdapterRequest(path=path, pinned=spec.pinned))
            log.info("%s %s on the server", ref, "pinned" if spec.pinned else "unpinned")
        except ServerError as exc:
            log.warning("changing the pinning of %s failed: %s", ref, exc.message)

    def _target_active(self, tenant: str) -> str | None:
        versions = [e for e in self.desired.values() if e.tenant == tenant]
        for entry in versions:
            if entry.active:
                return entry.version
        return versions[0].version if len(versions) == 1 else None

    async def _activate_and_evict(
        self, server: dict[AdapterRef, AdapterView]
    ) -> dict[AdapterRef, AdapterView]:
        tenants = {ref.tenant for ref in self.desired} | {ref.tenant for ref in server}
        for tenant in sorted(tenants):
            desired_versions = {r.version for r in self.desired if r.tenant == tenant}
            target = self._target_active(tenant)
            if target is not None:
                live = server.get(AdapterRef(tenant, target))
                status = self.status.get(AdapterRef(tenant, target))
                ready = (live is not None and live.state == AdapterState.READY
                         and status is not None and status.phase == SyncPhase.READY)
                if ready and live is not None and not live.active:
                    try:
                        await self._server("PUT", f"/admin/tenants/{tenant}/active",
                                           ActivateRequest(version=target))
                        log.info("activated %s@%s", tenant, target)
                        for ref, item in server.items():
                            if ref.tenant == tenant:
                                item.active = ref.version == target
                    except ServerError as exc:
                        log.warning("activating %s@%s failed: %s", tenant, target, exc.message)
            # Settled: the tenant serves a desired version that is ready (the target one
            # when there is a target), so undesired versions can go without a gap.
            active = [r.version for r, item in server.items()
                      if r.tenant == tenant and item.active and item.state == AdapterState.READY]
            if not desired_versions:
                settled = True
            elif target is not None:
                settled = active == [target]
            else:
                settled = bool(active) and active[0] in desired_versions
            for ref, item in list(server.items()):
                if ref.tenant != tenant or ref.version in desired_versions:
                    continue
                if not self._owns(item.path):
                    continue  # loaded by someone else (e.g. `serve --adapter`): not ours
                if not settled and item.state != AdapterState.FAILED:
                    continue  # keep the old version serving until the new one is active
                if item.state == AdapterState.DRAINING:
                    continue
                try:
                    answer = await self._server("DELETE", f"/admin/adapters/{tenant}/"
                                                          f"{ref.version}")
                    self.metrics.evictions.inc()
                    state = _eviction_state(answer)
                    log.info("evicted %s (%s)", ref, state)
                    if state == EvictionState.EVICTED:
                        del server[ref]
                except ServerError as exc:
                    if exc.status == 404:
                        del server[ref]
                    else:
                        log.warning("evicting %s failed: %s", ref, exc.message)
        return server

    async def _sync_splits(self, server: dict[AdapterRef, AdapterView]) -> None:
        """Make each tenant's canary split on the server what is desired: the weight of its
        desired canary (an entry with ``weight``) once that version is Ready there, and no
        split for a tenant without a desired canary."""
        wanted = {e.tenant: e for e in self.desired.values() if e.weight is not None}
        live = {ref.tenant: (ref, view) for ref, view in server.items()
                if view.weight is not None}
        for tenant in sorted(set(wanted) | set(live)):
            entry = wanted.get(tenant)
            current = live.get(tenant)
            if entry is None:
                assert current is not None
                try:
                    await self._server("DELETE", f"/admin/tenants/{tenant}/split")
                    current[1].weight = None
                    log.info("removed the canary split of %s", tenant)
                except ServerError as exc:
                    log.warning("removing the split of %s failed: %s", tenant, exc.message)
                continue
            view = server.get(entry.ref)
            status = self.status.get(entry.ref)
            ready = (view is not None and view.state == AdapterState.READY and not view.active
                     and status is not None and status.phase == SyncPhase.READY)
            if not ready or (current is not None and current[0] == entry.ref
                             and current[1].weight == entry.weight):
                continue
            try:
                await self._server("PUT", f"/admin/tenants/{tenant}/split",
                                   SplitRequest(version=entry.version, weight=entry.weight))
                assert view is not None
                view.weight = entry.weight
                log.info("canary %s@%s takes %d%% of the tenant's requests", tenant,
                         entry.version, entry.weight,
                         extra={"tenant": tenant, "version": entry.version})
            except ServerError as exc:
                log.warning("setting the split of %s@%s failed: %s", tenant, entry.version,
                            exc.message)

    def _owns(self, path: str | None) -> bool:
        """Whether the server loaded this adapter (from ``path``) from under our root, i.e.
        the sidecar (or a predecessor on the same volume) put it there. Adapters the server
        was started with (``serve --adapter``) or that another client loaded from elsewhere
        are left alone: the sidecar evicts only what it manages."""
        if not isinstance(path, str) or not path.startswith("/"):
            return False
        norm = Path(os.path.normpath(path))
        roots = {Path(os.path.normpath(self.root.absolute())), self.root.resolve()}
        return any(norm != root and norm.is_relative_to(root) for root in roots)

    # ----------------------------------------------------------------- one version
    async def _sync_one(self, ref: AdapterRef, spec: DesiredAdapter) -> None:
        status = self.status.get(ref)
        if status is None or not spec.same_spec(status.spec):
            return
        result = await self._fetch(ref, status)
        if result is None or self.status.get(ref) is not status:
            return
        status.phase, status.reason = SyncPhase.LOADING, None
        await self._access_before_load(ref.tenant)
        started = time.monotonic()
        try:
            await self._server("PUT", f"/admin/adapters/{ref.tenant}/{ref.version}",
                               LoadAdapterRequest(path=str(result.path), pinned=spec.pinned))
        except ServerError as exc:
            if exc.status == 422:
                self.metrics.load_failures.labels(exc.code).inc()
                self._fail(status, exc.code, exc.message, terminal=True)
            else:
                # Unreachable, conflict (draining), 5xx: transient, retry on a later pass.
                self._fail(status, exc.code, exc.message, terminal=False)
            return
        status.timings["load_seconds"] = round(time.monotonic() - started, 4)
        status.phase, status.reason, status.code, status.terminal = (SyncPhase.READY, None,
                                                                     None, False)
        log.info("%s ready on the server", ref)

    async def _fetch(self, ref: AdapterRef, status: Status) -> FetchResult | None:
        """Fetch with the one retry policy (:class:`loramux.s3.RetryPolicy`): transient
        failures and not_found (the operator may name a version whose upload, manifest last,
        is still under way) are retried with backoff; disk_budget waits for a later pass
        (which may delete undesired versions); anything else fails for good."""
        for attempt in range(self.retry.attempts):
            if self.status.get(ref) is not status:
                return None  # no longer desired, or its spec changed: stop retrying
            status.phase = SyncPhase.DOWNLOADING
            status.timings["attempts"] = attempt + 1
            try:
                async with self._downloads:
                    result = await asyncio.to_thread(self._fetch_blocking, status)
            except S3Error as exc:  # FetchError, or the credentials could not be read
                self.metrics.fetch_failures.labels(exc.code).inc()
                verdict = self.retry.verdict(exc, attempt)
                if verdict != "retry":
                    self._fail(status, exc.code, exc.message, terminal=verdict == "give_up")
                    return None
                delay = self.retry.delay(attempt)
                status.phase, status.code = SyncPhase.PENDING, exc.code
                status.reason = self.credentials.scrub(exc.message, status.spec)
                log.info("fetch of %s failed (%s), retry in %.2fs: %s", ref, exc.code, delay,
                         status.reason[:300],
                         extra={"tenant": ref.tenant, "version": ref.version, "code": exc.code})
                await asyncio.sleep(delay)
                continue
            except Exception as exc:
                self._fail(status, "internal", f"{type(exc).__name__}: {exc}", terminal=False)
                return None
            status.phase = SyncPhase.VERIFYING
            status.digest, status.bytes = result.manifest_sha256, result.bytes
            status.timings["fetch_seconds"] = round(result.seconds, 4)
            if result.downloaded:
                self.metrics.fetch_seconds.set(result.seconds)
                self.metrics.downloads.inc()
                self.metrics.downloaded_bytes.inc(result.bytes)
            return result
        return None

    def _fetch_blocking(self, status: Status) -> FetchResult:
        spec = status.spec  # current: new credentials for the same spec apply to retries
        assert spec is not None
        client = None
        if spec.uri.startswith("s3://"):
            source, creds = self.credentials.resolve(spec)
            status.credentials_source = source
            status.credentials_fp = fingerprint(creds)
            client = self.credentials.lazy_client(creds)
        return fetch_adapter(
            spec.ref, spec.uri, self.root, expected_sha256=spec.sha256,
            max_bytes=self.settings.max_adapter_bytes, allow_pickle=self.settings.allow_pickle,
            s3_client=client, disk_budget_bytes=self.settings.disk_budget_bytes,
        )

    def _credentials_changed(self, status: Status) -> bool:
        """A store failure whose credentials (entry's or mounted) are no longer current."""
        if (status.code not in CREDENTIAL_CURABLE or status.spec is None
                or status.credentials_fp is None):
            return False
        current = self.credentials.current_fingerprint(status.spec)
        return current is not None and current != status.credentials_fp

    def _fail(self, status: Status, code: str, message: str, *, terminal: bool) -> None:
        message = self.credentials.scrub(message, status.spec)
        status.phase, status.code, status.reason = SyncPhase.FAILED, code, f"{code}: {message}"
        status.terminal = terminal
        if not terminal:
            status.retry_after = time.monotonic() + self.settings.resync_seconds
        log.warning("adapter failed: %s", status.reason)

    def _update_phase_metrics(self) -> None:
        self.metrics.set_phases(SyncPhase(status.phase) for status in self.status.values())

    # ----------------------------------------------------------------- reports
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether every version that ``require_ready_for`` selects is Ready, and what is not.

        A required version counts only while the server answered the last pass: a Ready
        status is stale when the server is gone.
        """
        mode = self.settings.require_ready_for
        required: list[AdapterRef] = []
        if mode != "none":
            for ref, spec in self.desired.items():
                if (mode == "all" or spec.pinned
                        or self._target_active(ref.tenant) == ref.version):
                    required.append(ref)
        missing: list[dict[str, Any]] = []
        for ref in sorted(required, key=str):
            status = self.status.get(ref) or Status()
            if status.phase != SyncPhase.READY:
                missing.append({"tenant": ref.tenant, "version": ref.version,
                                "phase": str(status.phase), "code": status.code,
                                "reason": status.reason})
        server_ok = mode == "none" or (self.server_reachable and self.last_pass is not None)
        told = mode == "none" or self.desired_received
        ready = server_ok and told and not missing
        body: dict[str, Any] = {"ready": ready, "require_ready_for": mode,
                                "desired_received": self.desired_received,
                                "required": len(required), "missing": missing,
                                "server_reachable": self.server_reachable}
        return ready, body

    def state(self) -> SyncState:
        """``GET /v1/state``: every desired version's status, the routes, and the server's
        own last answers (adapters, and tenant access: counts and fingerprints, never hashes;
        the operator reads a pod's state from here only)."""
        items = sorted(self.status.items(), key=lambda kv: str(kv[0]))
        return SyncState(adapters=[status.view(ref) for ref, status in items],
                         routes=[self.routes[t] for t in sorted(self.routes)],
                         server_reachable=self.server_reachable, last_pass=self.last_pass,
                         server=self.server_state, access=self.access_state,
                         peers_fingerprint=self.peers_fingerprint)


def _eviction_state(answer: Any) -> EvictionState | None:
    try:
        return EvictResult.model_validate(answer).state
    except ValidationError:
        return None


__all__ = ["Reconciler", "ServerError", "Status"]
