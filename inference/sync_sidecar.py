"""The adapter-sync sidecar: makes the inference server's adapters match a desired set.

The desired set (``PUT /v1/desired``) lists ``tenant``/``version``/``uri`` entries. A
level-triggered reconcile loop compares it with what is actually there - the verified
versions on the shared volume (:func:`list_local`) and the server's ``GET /admin/adapters``
- and closes the gap, one pass at a time:

1. every desired version that is not yet on the server is fetched (atomic, verified:
   :func:`fetch_adapter`, retried with backoff when the failure is transient) and then
   loaded with ``PUT /admin/adapters/{tenant}/{version}``;
2. a tenant's active version (``active: true``, or its only desired version) is switched
   with ``PUT /admin/tenants/{tenant}/active`` once that version is ready on the server;
3. versions loaded on the server but no longer desired are evicted - for a tenant that is
   still desired only after its active version is ready and active (load new, activate,
   evict old; when the new version fails, the old one stays loaded and active) - and never
   before the first ``PUT /v1/desired`` (a restarted sidecar does not mistake "not told
   yet" for "nothing"). Only versions the server loaded from under ``root`` are the
   sidecar's to evict; ones it was started with (``serve --adapter``) are left alone;
4. local files of versions neither desired nor loaded are deleted (same condition).

``GET /readyz`` is 200 only when the versions selected by ``require_ready_for`` are Ready
(default: pinned ones and each tenant's active or only version); otherwise 503 with what is
missing and why.

S3 credentials, per fetch: the entry's own ``credentials`` (sent by the operator from the
LoraAdapter's ``source.credentialsSecret``), else the mounted secret directory
``s3_credentials_dir`` (re-read for every fetch, so rotation works), else the standard AWS
environment. Parts an entry leaves unset (region, endpoint) come from the mounted secret,
then the environment. Clients are cached by a digest of the credentials. Secrets are never
logged nor returned (``GET /v1/desired`` masks them), a change of credentials alone does
not restart a Ready version, and a version that failed to reach the store
(access_denied, not_found, io_error) is tried again as soon as its credentials change.

Because every pass re-reads the actual state, the sidecar converges after a restart of
itself or of the server. One failing adapter never blocks the others: each fetch-and-load
runs as its own task.

Importable in the inference image: no kopf, no kubernetes, nothing from ``loramux.training``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    DirectoryPath,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from loramux.inference.adapter_store import (
    FetchError,
    FetchResult,
    S3Credentials,
    fetch_adapter,
    list_local,
    make_s3_client,
    purge_incoming,
    read_credentials_dir,
    remove_adapter,
)
from loramux.inference.json_body import UnsupportedMediaType, require_json_body
from loramux.names import AdapterRef, TenantName, VersionName
from loramux.tokens import read_token

log = logging.getLogger("loramux.sync")

Phase = Literal["Pending", "Downloading", "Verifying", "Loading", "Ready", "Failed"]
PHASES: tuple[str, ...] = ("Pending", "Downloading", "Verifying", "Loading", "Ready", "Failed")
SERVER_READY = "ready"
MASK = "***"
# Failures of reaching the store that other credentials (or another endpoint) can cure: a
# Failed entry with one of these codes gets a fresh try when its credentials change.
CREDENTIAL_CURABLE = frozenset({"access_denied", "not_found", "io_error"})
MAX_CACHED_CLIENTS = 32


class SyncSettings(BaseSettings):
    """One sidecar beside one inference server, sharing the adapter volume ``root``."""

    model_config = SettingsConfigDict(env_prefix="LORAMUX_SYNC_", extra="forbid")

    root: Path = Field(description="Adapter volume: <root>/<tenant>/<version>/.")
    server_url: str = "http://127.0.0.1:8000"
    server_token: str | None = Field(None, description="Bearer token of the server's /admin.")
    server_token_file: Path | None = None
    token: str | None = Field(None, description="Bearer token for this sidecar's /v1 API.")
    token_file: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=0, le=65535)
    resync_seconds: float = Field(10.0, gt=0)
    max_adapter_bytes: int = Field(2 * 1024**3, ge=1)
    disk_budget_bytes: int | None = Field(
        None, ge=1, description="Bytes the adapter volume may hold (downloads included); a "
                                "version that would exceed it fails with disk_budget and is "
                                "tried again once other versions are gone.")
    retries: int = Field(4, ge=0, description="Retries of a transient fetch failure.")
    backoff_seconds: float = Field(0.5, ge=0, description="Base of the exponential backoff.")
    max_concurrent_downloads: int = Field(2, ge=1)
    allow_pickle: bool = False
    s3_credentials_dir: DirectoryPath | None = Field(
        None,
        description="Mounted secret with files AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
                    "optional AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL; re-read for "
                    "every new S3 client (rotation). Unset: the standard AWS environment.",
    )
    server_timeout_seconds: float = Field(120.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    require_ready_for: Literal["pinned-or-active", "all", "none"] = Field(
        "pinned-or-active",
        description="Which desired versions GET /readyz waits for: pinned ones and each "
                    "tenant's active (or only) version, every one, or none.",
    )

    def resolved_server_token(self) -> str | None:
        return read_token(self.server_token, self.server_token_file)

    def resolved_token(self) -> str | None:
        return read_token(self.token, self.token_file)



# --------------------------------------------------------------------------- API models


class EntryCredentials(BaseModel):
    """S3 credentials for one desired entry, resolved by the operator from the LoraAdapter's
    ``source.credentialsSecret`` (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional
    AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL). Never logged and never returned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    access_key_id: str = Field(min_length=1, max_length=256, repr=False)
    secret_access_key: SecretStr = Field(min_length=1, max_length=1024)
    session_token: SecretStr | None = Field(None, min_length=1, max_length=8192)
    region: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    endpoint_url: str | None = Field(None, max_length=2048)

    @field_validator("access_key_id", "secret_access_key", "session_token", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        # Secret data copied with `echo` ends in a newline, which would break the signature.
        return value.strip() if isinstance(value, str) else value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError("must not contain whitespace or control characters")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry user:password (send them as the keys)")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value

    def to_s3(self) -> S3Credentials:
        return S3Credentials(
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key.get_secret_value(),
            session_token=(self.session_token.get_secret_value()
                           if self.session_token is not None else None),
            region=self.region, endpoint_url=self.endpoint_url,
        )

    def public_view(self) -> dict[str, Any]:
        return {"access_key_id": MASK, "secret_access_key": MASK,
                "session_token": MASK if self.session_token is not None else None,
                "region": self.region, "endpoint_url": self.endpoint_url}


class DesiredAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: TenantName
    version: VersionName
    uri: str = Field(min_length=1, max_length=2048)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    pinned: bool = False
    active: bool = False
    credentials: EntryCredentials | None = None
    route: str | None = Field(
        None, max_length=512, pattern=r"^https?://[A-Za-z0-9.\-\[\]:]+(:\d+)?/?$",
        description="Hot tenant: the dedicated deployment's URL. While this (active) version "
                    "is Ready here, the server forwards the tenant's requests there and "
                    "serves them itself whenever that deployment cannot.")

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.tenant, self.version)

    def same_spec(self, other: DesiredAdapter | None) -> bool:
        """Equal apart from credentials, route, ``active`` and ``pinned``: none of them
        restarts a version (activation and pinning are applied to the loaded version)."""
        skip = {"credentials", "route", "active", "pinned"}
        return other is not None and (self.model_dump(exclude=skip)
                                      == other.model_dump(exclude=skip))

    def public_view(self) -> dict[str, Any]:
        view = self.model_dump(mode="json", exclude={"credentials"})
        view["credentials"] = (self.credentials.public_view()
                               if self.credentials is not None else None)
        return view


class DesiredState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapters: list[DesiredAdapter] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _check(self) -> DesiredState:
        seen: set[tuple[str, str]] = set()
        active: set[str] = set()
        for entry in self.adapters:
            key = (entry.tenant, entry.version)
            if key in seen:
                raise ValueError(f"{entry.tenant}@{entry.version} is listed twice")
            seen.add(key)
            if entry.active:
                if entry.tenant in active:
                    raise ValueError(f"tenant {entry.tenant} has more than one active version")
                active.add(entry.tenant)
        return self


# --------------------------------------------------------------------------- status


@dataclass
class Status:
    """What the sidecar knows about one desired version."""

    phase: str = "Pending"
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

    def view(self, ref: AdapterRef) -> dict[str, Any]:
        return {"tenant": ref.tenant, "version": ref.version, "phase": self.phase,
                "reason": self.reason, "code": self.code, "digest": self.digest,
                "bytes": self.bytes, "timings": dict(self.timings),
                "credentials_source": self.credentials_source}


class ServerError(Exception):
    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.phase = Gauge("loramux_sync_adapters", "Desired adapter versions by phase",
                           ["phase"], registry=self.registry)
        self.fetch_failures = Counter("loramux_sync_fetch_failures_total",
                                      "Failed fetch attempts by error code", ["code"],
                                      registry=self.registry)
        self.load_failures = Counter("loramux_sync_load_failures_total",
                                     "Adapters the server refused, by code", ["code"],
                                     registry=self.registry)
        self.passes = Counter("loramux_sync_reconcile_passes_total", "Reconcile passes",
                              registry=self.registry)
        self.evictions = Counter("loramux_sync_evictions_total", "Versions evicted",
                                 registry=self.registry)
        self.fetch_seconds = Gauge("loramux_sync_last_fetch_seconds",
                                   "Duration of the last download", registry=self.registry)
        self.downloads = Counter("loramux_sync_downloads_total",
                                 "Versions downloaded from their source (not found on the volume)",
                                 registry=self.registry)
        self.downloaded_bytes = Counter("loramux_sync_downloaded_bytes_total",
                                        "Bytes downloaded and verified", registry=self.registry)
        for phase in PHASES:
            self.phase.labels(phase).set(0)


# --------------------------------------------------------------------------- reconciler


class Reconciler:
    """Owns the desired set, the per-version status and the reconcile loop."""

    def __init__(self, settings: SyncSettings, *, s3_client: Any = None) -> None:
        self.settings = settings
        # Absolute: the server is told this path and refuses relative ones.
        self.root = Path(settings.root).absolute()
        self.desired: dict[AdapterRef, DesiredAdapter] = {}
        self.status: dict[AdapterRef, Status] = {}
        self.metrics = _Metrics()
        self._s3_client = s3_client
        self._s3_clients: OrderedDict[str, Any] = OrderedDict()
        self._s3_lock = threading.Lock()
        self._tasks: dict[AdapterRef, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._downloads = asyncio.Semaphore(settings.max_concurrent_downloads)
        self._loop_task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self.server_reachable = False
        self.last_pass: float | None = None
        # Until the first PUT /v1/desired an empty desired set means "not told yet", not
        # "remove everything": a restarted sidecar must not evict and delete what serves.
        self.desired_received = False
        self.routes: dict[str, dict[str, Any]] = {}  # the server's, as of the last pass

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(purge_incoming, self.root)
        headers = {}
        token = self.settings.resolved_server_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.AsyncClient(
            base_url=self.settings.server_url.rstrip("/"), headers=headers,
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

    def set_desired(self, state: DesiredState) -> None:
        self.desired = {entry.ref: entry for entry in state.adapters}
        self.desired_received = True
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

    async def _server(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = await self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ServerError(None, "unreachable", f"{method} {path}: {exc!r}") from exc
        if response.status_code >= 400:
            code, message = "http_error", response.text[:500]
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                err = response.json()["error"]
                code, message = str(err.get("code", code)), str(err.get("message", message))
            raise ServerError(response.status_code, code, message)
        return response.json() if response.content else None

    async def server_adapters(self) -> dict[AdapterRef, dict[str, Any]]:
        data = await self._server("GET", "/admin/adapters")
        found: dict[AdapterRef, dict[str, Any]] = {}
        for item in data.get("adapters", []):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                found[AdapterRef(item["tenant"], item["version"])] = item
        return found

    # ----------------------------------------------------------------- one pass
    async def reconcile_once(self) -> None:
        self.metrics.passes.inc()
        self.last_pass = time.time()
        try:
            server = await self.server_adapters()
            self.server_reachable = True
        except ServerError as exc:
            self.server_reachable = False
            log.warning("inference server unavailable: %s", exc.message)
            server = None
        local = await asyncio.to_thread(list_local, self.root)
        now = time.monotonic()

        # 1. fetch and load whatever is desired but not ready on the server
        for ref, spec in self.desired.items():
            status = self.status.setdefault(ref, Status(spec=spec))
            live = server.get(ref) if server is not None else None
            if live is not None and live.get("state") == SERVER_READY:
                if status.phase != "Ready":
                    status.phase, status.reason, status.code = "Ready", None, None
                    status.terminal = False
                if (bool(live.get("pinned")) != spec.pinned and ref not in self._tasks
                        and self._owns(live)):
                    # Pinning changed on a loaded version: say so again, nothing reloads.
                    task = asyncio.create_task(self._repin(ref, spec, str(live["path"])),
                                               name=f"repin-{ref}")
                    self._tasks[ref] = task
                    task.add_done_callback(lambda _t, r=ref: self._task_done(r))
                continue
            if status.phase == "Ready" and server is not None:
                status.phase, status.reason = "Pending", "no longer ready on the server"
            if status.phase == "Failed" and self._credentials_changed(status):
                status.terminal, status.retry_after = False, 0.0
                status.phase, status.reason = "Pending", "credentials changed; trying again"
            if ref in self._tasks or status.terminal or now < status.retry_after:
                continue
            if server is None and ref in local:
                continue  # nothing to do until the server answers
            task = asyncio.create_task(self._sync_one(ref, spec), name=f"sync-{ref}")
            self._tasks[ref] = task
            task.add_done_callback(lambda _t, r=ref: self._task_done(r))

        if server is not None and self.desired_received:
            # 2. activation, 3. eviction
            server = await self._activate_and_evict(server)
            # 5. hot tenants' routes to their dedicated deployments
            await self._sync_routes()
            # 4. local files neither desired nor loaded
            for ref in local:
                if ref in self.desired or ref in server or ref in self._tasks:
                    continue
                try:
                    await asyncio.to_thread(remove_adapter, ref, self.root)
                    log.info("deleted local files of %s", ref)
                except (OSError, ValueError) as exc:
                    log.warning("could not delete %s: %s", ref, exc)
        self._update_phase_metrics()

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
            if spec.route and status is not None and status.phase == "Ready":
                wanted[tenant] = (spec.route.rstrip("/"), target)
        return wanted

    async def _sync_routes(self) -> None:
        try:
            data = await self._server("GET", "/admin/routes")
        except ServerError as exc:
            log.warning("cannot read the server's routes: %s", exc.message)
            return
        current = {r["tenant"]: r for r in (data or {}).get("routes", [])
                   if isinstance(r, dict) and "tenant" in r}
        self.routes = dict(current)
        wanted = self.wanted_routes()
        for tenant, (url, version) in wanted.items():
            have = current.get(tenant)
            if have and have.get("url") == url and have.get("version") == version:
                continue
            try:
                await self._server("PUT", f"/admin/tenants/{tenant}/route",
                                   {"url": url, "version": version})
                self.routes[tenant] = {"tenant": tenant, "url": url, "version": version}
                log.info("routing %s@%s to its dedicated deployment %s", tenant, version, url)
            except ServerError as exc:
                log.warning("routing %s failed: %s", tenant, exc.message)
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

    async def _repin(self, ref: AdapterRef, spec: DesiredAdapter, path: str) -> None:
        try:
            await self._server("PUT", f"/admin/adapters/{ref.tenant}/{ref.version}",
                               {"path": path, "pinned": spec.pinned})
            log.info("%s %s on the server", ref, "pinned" if spec.pinned else "unpinned")
        except ServerError as exc:
            log.warning("changing the pinning of %s failed: %s", ref, exc.message)

    def _task_done(self, ref: AdapterRef) -> None:
        self._tasks.pop(ref, None)
        self.wake()

    def _target_active(self, tenant: str) -> str | None:
        versions = [e for e in self.desired.values() if e.tenant == tenant]
        for entry in versions:
            if entry.active:
                return entry.version
        return versions[0].version if len(versions) == 1 else None

    async def _activate_and_evict(
        self, server: dict[AdapterRef, dict[str, Any]]
    ) -> dict[AdapterRef, dict[str, Any]]:
        tenants = {ref.tenant for ref in self.desired} | {ref.tenant for ref in server}
        for tenant in sorted(tenants):
            desired_versions = {r.version for r in self.desired if r.tenant == tenant}
            target = self._target_active(tenant)
            if target is not None:
                live = server.get(AdapterRef(tenant, target))
                status = self.status.get(AdapterRef(tenant, target))
                ready = (live is not None and live.get("state") == SERVER_READY
                         and status is not None and status.phase == "Ready")
                if ready and not live.get("active"):
                    try:
                        await self._server("PUT", f"/admin/tenants/{tenant}/active",
                                           {"version": target})
                        log.info("activated %s@%s", tenant, target)
                        for ref, item in server.items():
                            if ref.tenant == tenant:
                                item["active"] = ref.version == target
                    except ServerError as exc:
                        log.warning("activating %s@%s failed: %s", tenant, target, exc.message)
            # Settled: the tenant serves a desired version that is ready (the target one
            # when there is a target), so undesired versions can go without a gap.
            active = [r.version for r, item in server.items()
                      if r.tenant == tenant and item.get("active")
                      and item.get("state") == SERVER_READY]
            if not desired_versions:
                settled = True
            elif target is not None:
                settled = active == [target]
            else:
                settled = bool(active) and active[0] in desired_versions
            for ref, item in list(server.items()):
                if ref.tenant != tenant or ref.version in desired_versions:
                    continue
                if not self._owns(item):
                    continue  # loaded by someone else (e.g. `serve --adapter`): not ours
                if not settled and item.get("state") != "failed":
                    continue  # keep the old version serving until the new one is active
                if item.get("state") == "draining":
                    continue
                try:
                    result = await self._server("DELETE", f"/admin/adapters/{tenant}/"
                                                          f"{ref.version}")
                    self.metrics.evictions.inc()
                    log.info("evicted %s (%s)", ref, (result or {}).get("state"))
                    if (result or {}).get("state") == "evicted":
                        del server[ref]
                except ServerError as exc:
                    if exc.status == 404:
                        del server[ref]
                    else:
                        log.warning("evicting %s failed: %s", ref, exc.message)
        return server

    def _owns(self, item: dict[str, Any]) -> bool:
        """Whether the server loaded this adapter from under our root, i.e. the sidecar (or
        a predecessor on the same volume) put it there. Adapters the server was started
        with (``serve --adapter``) or that another client loaded from elsewhere are left
        alone: the sidecar evicts only what it manages."""
        path = item.get("path")
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
        result = await self._fetch(ref, spec, status)
        if result is None or self.status.get(ref) is not status:
            return
        status.phase, status.reason = "Loading", None
        started = time.monotonic()
        try:
            await self._server("PUT", f"/admin/adapters/{ref.tenant}/{ref.version}",
                               {"path": str(result.path), "pinned": spec.pinned})
        except ServerError as exc:
            if exc.status == 422:
                self.metrics.load_failures.labels(exc.code).inc()
                self._fail(status, exc.code, exc.message, terminal=True)
            else:
                # Unreachable, conflict (draining), 5xx: transient, retry on a later pass.
                self._fail(status, exc.code, exc.message, terminal=False)
            return
        status.timings["load_seconds"] = round(time.monotonic() - started, 4)
        status.phase, status.reason, status.code, status.terminal = "Ready", None, None, False
        log.info("%s ready on the server", ref)

    async def _fetch(
        self, ref: AdapterRef, spec: DesiredAdapter, status: Status
    ) -> FetchResult | None:
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            if self.status.get(ref) is not status:
                return None  # no longer desired, or its spec changed: stop retrying
            status.phase = "Downloading"
            status.timings["attempts"] = attempt + 1
            try:
                async with self._downloads:
                    result = await asyncio.to_thread(self._fetch_blocking, ref, status)
            except FetchError as exc:
                self.metrics.fetch_failures.labels(exc.code).inc()
                # not_found is retried too: the operator may name a version whose upload
                # (manifest last) is still under way.
                if exc.code == "disk_budget":
                    # Not now, but maybe after the next pass deletes undesired versions.
                    self._fail(status, exc.code, exc.message, terminal=False)
                    return None
                if not exc.retryable and exc.code != "not_found":
                    self._fail(status, exc.code, exc.message, terminal=True)
                    return None
                if attempt + 1 >= attempts:
                    self._fail(status, exc.code, exc.message, terminal=False)
                    return None
                delay = self.settings.backoff_seconds * (2**attempt)
                delay += random.uniform(0, delay / 2 if delay else 0)
                status.phase, status.code = "Pending", exc.code
                status.reason = self._scrub(exc.message, status)
                log.info("fetch of %s failed (%s), retry in %.2fs: %s", ref, exc.code, delay,
                         status.reason[:300])
                await asyncio.sleep(delay)
                continue
            except Exception as exc:
                self._fail(status, "internal", f"{type(exc).__name__}: {exc}", terminal=False)
                return None
            status.phase = "Verifying"
            status.digest, status.bytes = result.manifest_sha256, result.bytes
            status.timings["fetch_seconds"] = round(result.seconds, 4)
            if result.downloaded:
                self.metrics.fetch_seconds.set(result.seconds)
                self.metrics.downloads.inc()
                self.metrics.downloaded_bytes.inc(result.bytes)
            return result
        return None

    # ----------------------------------------------------------------- credentials
    def _credentials_for(self, spec: DesiredAdapter) -> tuple[str, S3Credentials | None]:
        """Which credentials an entry's fetch uses: its own (parts it leaves unset come
        from the mounted secret), else the mounted secret, else the AWS environment (None).
        Reads the mounted directory afresh, so a rotated Secret is picked up."""
        mounted = None
        if self.settings.s3_credentials_dir is not None:
            mounted = read_credentials_dir(self.settings.s3_credentials_dir)
        if spec.credentials is not None:
            return "entry", spec.credentials.to_s3().over(mounted)
        if mounted is not None:
            return "mounted", mounted
        return "environment", None

    def _credentials_changed(self, status: Status) -> bool:
        """A store failure whose credentials (entry's or mounted) are no longer current."""
        if (status.code not in CREDENTIAL_CURABLE or status.spec is None
                or status.credentials_fp is None):
            return False
        try:
            _, creds = self._credentials_for(status.spec)
        except FetchError:
            return False
        return (creds.fingerprint() if creds else "environment") != status.credentials_fp

    def _client_for(self, creds: S3Credentials | None) -> Any:
        """A cached S3 client per set of credentials (keyed by their digest)."""
        if creds is None and self._s3_client is not None:
            return self._s3_client  # given by the caller (tests, embedding)
        key = creds.fingerprint() if creds is not None else "environment"
        with self._s3_lock:
            client = self._s3_clients.get(key)
            if client is not None:
                self._s3_clients.move_to_end(key)
                return client
        client = make_s3_client(creds)
        with self._s3_lock:
            self._s3_clients[key] = client
            while len(self._s3_clients) > MAX_CACHED_CLIENTS:
                self._s3_clients.popitem(last=False)
        return client

    def _fetch_blocking(self, ref: AdapterRef, status: Status) -> FetchResult:
        spec = status.spec  # current: new credentials for the same spec apply to retries
        assert spec is not None
        client = None
        if spec.uri.startswith("s3://"):
            source, creds = self._credentials_for(spec)
            status.credentials_source = source
            status.credentials_fp = creds.fingerprint() if creds else "environment"
            client = _LazyClient(lambda c=creds: self._client_for(c))
        return fetch_adapter(
            ref, spec.uri, self.root, expected_sha256=spec.sha256,
            max_bytes=self.settings.max_adapter_bytes, allow_pickle=self.settings.allow_pickle,
            s3_client=client, disk_budget_bytes=self.settings.disk_budget_bytes,
        )

    def _scrub(self, text: str, status: Status) -> str:
        """``text`` without any secret of the entry's or the mounted credentials (defence in
        depth: an S3-compatible store might echo a key id in its error message)."""
        secrets: list[str] = []
        spec = status.spec
        if spec is not None and spec.credentials is not None:
            secrets += spec.credentials.to_s3().secrets()
        if self.settings.s3_credentials_dir is not None:
            with contextlib.suppress(FetchError):
                secrets += read_credentials_dir(self.settings.s3_credentials_dir).secrets()
        for secret in sorted(set(secrets), key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, MASK)
        return text

    def _fail(self, status: Status, code: str, message: str, *, terminal: bool) -> None:
        message = self._scrub(message, status)
        status.phase, status.code, status.reason = "Failed", code, f"{code}: {message}"
        status.terminal = terminal
        if not terminal:
            status.retry_after = time.monotonic() + self.settings.resync_seconds
        log.warning("adapter failed: %s", status.reason)

    def _update_phase_metrics(self) -> None:
        counts = dict.fromkeys(PHASES, 0)
        for status in self.status.values():
            counts[status.phase] = counts.get(status.phase, 0) + 1
        for phase, count in counts.items():
            self.metrics.phase.labels(phase).set(count)

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
            if status.phase != "Ready":
                missing.append({"tenant": ref.tenant, "version": ref.version,
                                "phase": status.phase, "code": status.code,
                                "reason": status.reason})
        server_ok = mode == "none" or (self.server_reachable and self.last_pass is not None)
        told = mode == "none" or self.desired_received
        ready = server_ok and told and not missing
        body: dict[str, Any] = {"ready": ready, "require_ready_for": mode,
                                "desired_received": self.desired_received,
                                "required": len(required), "missing": missing,
                                "server_reachable": self.server_reachable}
        return ready, body

    def state_view(self) -> dict[str, Any]:
        items = sorted(self.status.items(), key=lambda kv: str(kv[0]))
        return {"adapters": [status.view(ref) for ref, status in items],
                "routes": [self.routes[t] for t in sorted(self.routes)],
                "server_reachable": self.server_reachable, "last_pass": self.last_pass}


class _LazyClient:
    """An S3 client built on first use: a version already verified on the volume (restart,
    warm reload) never pays for building one (boto3 session and client: ~0.3 s)."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._client: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            self._client = self._make()
        return getattr(self._client, name)


# --------------------------------------------------------------------------- app


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None
           ) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


class _Unauthorized(Exception):
    pass


def create_app(settings: SyncSettings, *, s3_client: Any = None) -> FastAPI:
    reconciler = Reconciler(settings, s3_client=s3_client)
    token = settings.resolved_token()

    def require_token(request: Request) -> None:
        if not token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
            raise _Unauthorized()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await reconciler.start()
        try:
            yield
        finally:
            await reconciler.stop()

    # PUT /v1/desired: no Content-Type means JSON, other non-JSON types are a 415 (json_body).
    app = FastAPI(title="loramux-sync", lifespan=lifespan, strict_content_type=False,
                  dependencies=[Depends(require_json_body)])
    app.state.reconciler = reconciler
    auth = [Depends(require_token)]

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_: Request, __: _Unauthorized) -> JSONResponse:
        return _error(401, "unauthorized", "needs 'Authorization: Bearer <token>'",
                      {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(UnsupportedMediaType)
    async def _not_json(_: Request, exc: UnsupportedMediaType) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg')}")
        return _error(422, "invalid_request", "; ".join(problems)[:2000])

    @app.put("/v1/desired", status_code=202, dependencies=auth)
    async def put_desired(body: DesiredState) -> Any:
        reconciler.set_desired(body)
        return {"accepted": len(body.adapters)}

    @app.get("/v1/desired", dependencies=auth)
    async def get_desired() -> Any:
        # Credentials are masked: this endpoint is for looking, not for copying secrets.
        return {"adapters": [e.public_view() for e in reconciler.desired.values()]}

    @app.get("/v1/state", dependencies=auth)
    async def get_state() -> Any:
        return reconciler.state_view()

    @app.get("/healthz")
    async def healthz() -> Any:
        task = reconciler._loop_task
        if task is None or task.done():
            return _error(503, "loop_down", "the reconcile loop is not running")
        return {"status": "ok", "server_reachable": reconciler.server_reachable}

    @app.get("/readyz")
    async def readyz() -> Any:
        task = reconciler._loop_task
        if task is None or task.done():
            return _error(503, "loop_down", "the reconcile loop is not running")
        ready, body = reconciler.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(reconciler.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: list[str]) -> int:
    """``loramux sync ...``: parse flags / ``LORAMUX_SYNC_*`` and run the sidecar."""
    from pydantic_settings import CliApp

    class SyncCli(SyncSettings):
        model_config = SettingsConfigDict(
            env_prefix="LORAMUX_SYNC_", extra="forbid", cli_prog_name="loramux sync",
            cli_kebab_case=True, cli_implicit_flags=True, cli_avoid_json=True,
        )

    parsed = CliApp.run(SyncCli, cli_args=argv)
    settings = SyncSettings.model_validate(parsed.model_dump())
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # botocore's debug log prints request headers, session tokens included: never below INFO.
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level)
    return 0


__all__ = ["DesiredAdapter", "DesiredState", "EntryCredentials", "Reconciler", "SyncSettings",
           "create_app", "main"]
