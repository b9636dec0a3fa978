"""The wire contracts between loramux's three processes, typed once.

::

    operator ──PUT /v1/desired (DesiredState)──────────▶ sidecar
    operator ◀─GET /v1/state (SyncState)─────────────── sidecar
    sidecar ──PUT/DELETE /admin/adapters, PUT /admin/tenants/*/active|route──▶ server
    sidecar ◀─GET /admin/adapters (AdapterList), GET /admin/routes (RouteList)── server

Both ends build and parse these models: the operator builds :class:`DesiredState` and
parses :class:`SyncState`; the sidecar parses the first, serves the second, and parses the
server's :class:`AdapterList`. Every HTTP service answers errors with one body,
:class:`ErrorBody` (``{"error": {"message", "code", "status"}}``).

Each vocabulary of states is one ``StrEnum``: :class:`SyncPhase` (a desired version in the
sidecar), :class:`AdapterState` (a version on the server), :class:`Residency` (its tier),
:class:`PlacementState` (a pod row of a LoraAdapter's status) and :class:`AdapterPhase`
(a LoraAdapter's ``status.phase``).

Torch-free and kopf-free: every image imports this module.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from loramux.names import AdapterRef, TenantName, VersionName
from loramux.s3 import REGION_PATTERN, EndpointUrl, S3Credentials

MASK = "***"
KEY_SHA256_PATTERN = r"^[0-9a-f]{64}$"
ALL_TENANTS = "*"
ROUTE_URL_PATTERN = r"^https?://[A-Za-z0-9.\-\[\]:]+(:\d+)?/?$"


# --------------------------------------------------------------------------- vocabularies


class SyncPhase(StrEnum):
    """A desired version's phase in the sidecar (``SyncState.adapters[].phase``)."""

    PENDING = "Pending"
    DOWNLOADING = "Downloading"
    VERIFYING = "Verifying"
    LOADING = "Loading"
    READY = "Ready"
    FAILED = "Failed"


class AdapterState(StrEnum):
    """A version's state on the inference server (``AdapterView.state``)."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


class Residency(StrEnum):
    """Where a version's weights are: the device (usable by the next step), host RAM, or
    only its files on disk."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


class EvictionState(StrEnum):
    """The answer to ``DELETE /admin/adapters/{tenant}/{version}``."""

    EVICTED = "evicted"
    DRAINING = "draining"


class PlacementState(StrEnum):
    """A row of ``status.placements``: the sidecar's phase of that version on that pod, or
    ``Unknown`` when the pod could not be asked (or its server is unreachable)."""

    PENDING = "Pending"
    DOWNLOADING = "Downloading"
    VERIFYING = "Verifying"
    LOADING = "Loading"
    READY = "Ready"
    FAILED = "Failed"
    UNKNOWN = "Unknown"


class AdapterPhase(StrEnum):
    """A LoraAdapter's ``status.phase``."""

    PENDING = "Pending"
    PROGRESSING = "Progressing"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


# --------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    code: str
    status: int


class ErrorBody(BaseModel):
    """The one error body of every loramux HTTP service."""

    error: ErrorDetail


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    return ErrorBody(error=ErrorDetail(message=message, code=code, status=status)).model_dump()


def parse_error(payload: Any, default_code: str = "http_error",
                default_message: str = "") -> tuple[str, str]:
    """``(code, message)`` from an error response's JSON, tolerant of any shape."""
    try:
        detail = ErrorBody.model_validate(payload).error
        return detail.code, detail.message
    except ValueError:
        return default_code, default_message


# --------------------------------------------------------------------------- operator → sidecar


class EntryCredentials(BaseModel):
    """S3 credentials for one desired entry, resolved by the operator from the LoraAdapter's
    ``source.credentialsSecret`` (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional
    AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL). Never logged and never returned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    access_key_id: str = Field(min_length=1, max_length=256, repr=False)
    secret_access_key: SecretStr = Field(min_length=1, max_length=1024)
    session_token: SecretStr | None = Field(None, min_length=1, max_length=8192)
    region: str | None = Field(None, pattern=REGION_PATTERN)
    endpoint_url: EndpointUrl | None = None

    @field_validator("access_key_id", "secret_access_key", "session_token", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        # Secret data copied with `echo` ends in a newline, which would break the signature.
        return value.strip() if isinstance(value, str) else value

    def to_s3(self) -> S3Credentials:
        return S3Credentials(
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key.get_secret_value(),
            session_token=(self.session_token.get_secret_value()
                           if self.session_token is not None else None),
            region=self.region, endpoint_url=self.endpoint_url,
        )

    def wire(self) -> dict[str, Any]:
        """The JSON the operator sends (secrets in clear: this goes to the sidecar only)."""
        return {
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key.get_secret_value(),
            **({"session_token": self.session_token.get_secret_value()}
               if self.session_token is not None else {}),
            **({"region": self.region} if self.region else {}),
            **({"endpoint_url": self.endpoint_url} if self.endpoint_url else {}),
        }

    def public_view(self) -> dict[str, Any]:
        return {"access_key_id": MASK, "secret_access_key": MASK,
                "session_token": MASK if self.session_token is not None else None,
                "region": self.region, "endpoint_url": self.endpoint_url}


class DesiredAdapter(BaseModel):
    """One version a pod should hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: TenantName
    version: VersionName
    uri: str = Field(min_length=1, max_length=2048)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    pinned: bool = False
    active: bool = False
    credentials: EntryCredentials | None = None
    access: TenantAccess | None = Field(
        None, description="The tenant's key hashes, weight and limits (spec.access); None: "
                          "no keys of its own (only pool-wide grants reach it), weight 1 and "
                          "the server's default limits.")
    route: str | None = Field(
        None, max_length=512, pattern=ROUTE_URL_PATTERN,
        description="Hot tenant: the dedicated deployment's URL. While this (active) version "
                    "is Ready here, the server forwards the tenant's requests there and "
                    "serves them itself whenever that deployment cannot.")
    weight: int | None = Field(
        None, ge=0, le=100,
        description="Canary (a version that is not active): the percentage of the bare "
                    "tenant's requests it answers once Ready here (0: loaded, no traffic). "
                    "None: no split.")

    @model_validator(mode="after")
    def _weight_only_on_a_canary(self) -> DesiredAdapter:
        if self.weight is not None and self.active:
            raise ValueError("weight is for a canary version; the active one takes the rest")
        return self

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.tenant, self.version)

    def same_spec(self, other: DesiredAdapter | None) -> bool:
        """Equal apart from credentials, route, access, ``active``, ``pinned`` and ``weight``:
        none of them restarts a version (they are applied to the loaded version)."""
        skip = {"credentials", "route", "active", "pinned", "access", "weight"}
        return other is not None and (self.model_dump(exclude=skip)
                                      == other.model_dump(exclude=skip))

    def wire(self) -> dict[str, Any]:
        """The JSON the operator sends: unset optional fields left out, secrets in clear."""
        body = self.model_dump(mode="json", exclude={"credentials"}, exclude_none=True)
        if self.credentials is not None:
            body["credentials"] = self.credentials.wire()
        return body

    def public_view(self) -> dict[str, Any]:
        view = self.model_dump(mode="json", exclude={"credentials"})
        view["credentials"] = (self.credentials.public_view()
                               if self.credentials is not None else None)
        return view


class DesiredState(BaseModel):
    """``PUT /v1/desired``: every version one pod should hold (an empty list is a real
    answer: the pod should hold nothing)."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[DesiredAdapter] = Field(default_factory=list, max_length=10_000)
    peers: PeerTable | None = Field(
        None, description="Scale-out routing: where the pool's other pods hold which "
                          "tenants (None: leave the server's table as it is).")
    access: dict[TenantName, TenantAccess] = Field(
        default_factory=dict, max_length=100_000,
        description="Access of every tenant of the pod's pool, held here or not: with "
                    "scale-out routing a request is authenticated by the first pod it "
                    "reaches, before it is forwarded to a holder. An entry's own access "
                    "(DesiredAdapter.access) wins for the tenants held here.")

    @model_validator(mode="after")
    def _check(self) -> DesiredState:
        seen: set[tuple[str, str]] = set()
        active: set[str] = set()
        canary: set[str] = set()
        for entry in self.adapters:
            key = (entry.tenant, entry.version)
            if key in seen:
                raise ValueError(f"{entry.tenant}@{entry.version} is listed twice")
            seen.add(key)
            if entry.active:
                if entry.tenant in active:
                    raise ValueError(f"tenant {entry.tenant} has more than one active version")
                active.add(entry.tenant)
            if entry.weight is not None:
                if entry.tenant in canary:
                    raise ValueError(f"tenant {entry.tenant} has more than one canary version")
                canary.add(entry.tenant)
        return self

    def wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"adapters": [entry.wire() for entry in self.adapters]}
        if self.peers is not None:
            body["peers"] = self.peers.model_dump(mode="json")
        if self.access:
            body["access"] = {t: a.model_dump(mode="json") for t, a in self.access.items()}
        return body


# --------------------------------------------------------------------------- sidecar ↔ server


class LoadAdapterRequest(BaseModel):
    """``PUT /admin/adapters/{tenant}/{version}``."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096, description="local adapter directory")
    pinned: bool = False
    activate: bool = False


class ActivateRequest(BaseModel):
    """``PUT /admin/tenants/{tenant}/active``."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=63)


class SplitRequest(BaseModel):
    """``PUT /admin/tenants/{tenant}/split``: a canary version answers ``weight`` percent of
    the bare tenant's requests (chosen per split key, so a conversation sticks to one
    version); the active version answers the rest. ``DELETE`` removes the split."""

    model_config = ConfigDict(extra="forbid")

    version: VersionName
    weight: int = Field(ge=0, le=100)


# Upper bounds (seconds) of the per-version latency histograms in VersionStats; the last
# bucket is everything above. Fixed here so both ends agree on what a count means.
STATS_BUCKETS: tuple[float, ...] = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                    60.0, 120.0)


class VersionStats(BaseModel):
    """Cumulative outcomes of one version on one server since it was loaded: what a canary
    analysis compares (the operator sums pods and takes differences between two reports).
    ``ttft``/``latency`` are per-bucket counts (not cumulative) over :data:`STATS_BUCKETS`
    plus one overflow bucket."""

    model_config = ConfigDict(extra="ignore")

    requests: int = 0  # finished, whatever the outcome
    errors: int = 0  # finished with a server-side failure (5xx: generation failed, timeout)
    ttft: list[int] = Field(default_factory=lambda: [0] * (len(STATS_BUCKETS) + 1))
    latency: list[int] = Field(default_factory=lambda: [0] * (len(STATS_BUCKETS) + 1))


class RouteRequest(BaseModel):
    """``PUT /admin/tenants/{tenant}/route``: where a hot tenant's requests go, its dedicated
    deployment's public base URL."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=512, pattern=ROUTE_URL_PATTERN)
    version: str | None = Field(None, min_length=1, max_length=63)


class _Report(BaseModel):
    # Reports are read by the other side: fields it does not know yet are ignored, so a
    # newer server or sidecar does not break an older reader during an upgrade.
    model_config = ConfigDict(extra="ignore")


class AdapterView(_Report):
    """One version on the server (``GET /admin/adapters``)."""

    tenant: str
    version: str
    state: AdapterState
    reason: str | None = None
    reason_code: str | None = None
    residency: Residency = Residency.DISK
    pinned: bool = False
    active: bool = False
    bytes: int = 0
    rank: int = 0
    in_flight: int = 0
    hits: int = 0
    last_used: float | None = None
    path: str = ""
    merged: bool = False
    disk_load_seconds: float | None = None
    host_to_device_seconds: float | None = None
    weight: int | None = None  # a canary's share of the bare tenant's requests, percent
    stats: VersionStats | None = None

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.tenant, self.version)


class AdapterList(_Report):
    """``GET /admin/adapters``: every version the server knows, and its base model's names."""

    adapters: list[AdapterView] = Field(default_factory=list)
    base_model: str | None = None
    base_model_aliases: list[str] = Field(default_factory=list)
    queue_depth: int = 0  # requests waiting for a row (the server's load, for routing)
    running: int = 0  # rows decoding now

    @property
    def base_names(self) -> frozenset[str] | None:
        names = {n for n in self.base_model_aliases if n}
        if self.base_model:
            names.add(self.base_model)
        return frozenset(names) or None


class EvictResult(_Report):
    tenant: str
    version: str
    state: EvictionState


class RouteView(_Report):
    """One hot tenant's route on a pool server (``GET /admin/routes``)."""

    tenant: str
    url: str
    version: str | None = None
    healthy: bool | None = None
    forwarded: int = 0
    fallbacks: int = 0
    last_error: str | None = None


class RouteList(_Report):
    routes: list[RouteView] = Field(default_factory=list)


# --------------------------------------------------------------------------- tenant access


def hash_key(key: str) -> str:
    """The stored form of an API key: lower-case hex SHA-256 of its UTF-8 bytes (surrounding
    whitespace stripped: a key pasted with ``echo`` ends in a newline). Only this hash ever
    leaves the operator: keys are long random strings (the operator refuses short ones), so
    a fast hash is enough; a slow password hash would cost every request."""
    import hashlib

    return hashlib.sha256(key.strip().encode()).hexdigest()


def _fingerprint(payload: Any) -> str:
    import hashlib
    import json

    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TenantLimits(BaseModel):
    """Per-tenant limits on one server; ``None`` = the server's default for that limit.
    Beyond one, a request gets 429 with ``Retry-After`` and the limit's name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent: int | None = Field(
        None, ge=1, le=100_000, description="Requests of the tenant admitted or waiting.")
    tokens_per_minute: int | None = Field(
        None, ge=1, le=10**12, description="Prompt plus generated tokens over the last 60 s.")
    max_queued: int | None = Field(
        None, ge=1, le=100_000, description="Requests of the tenant waiting for a row (every "
        "request waits until the next engine step, so 0 would refuse them all).")


class TenantAccess(BaseModel):
    """One tenant's access and share on a server: the SHA-256 hashes of the API keys that
    may call it, its weight in the fair scheduler, and its limits.

    Sent by the operator (in :class:`DesiredAdapter`) to the sidecar, by the sidecar to the
    server (``PUT /admin/tenants/{tenant}/access``), and written by the operator into a
    dedicated deployment's access file. Hashes only: the keys never leave their Secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_sha256: tuple[str, ...] = Field(default=(), max_length=1000)
    weight: float = Field(1.0, gt=0, le=1000)
    limits: TenantLimits = Field(default_factory=TenantLimits)

    @field_validator("key_sha256", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(sorted({str(v).lower() for v in value}))
        return value

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import re

        for digest in value:
            if not re.fullmatch(KEY_SHA256_PATTERN, digest):
                raise ValueError("key_sha256 holds lower-case hex SHA-256 digests (64 chars)")
        return value

    def fingerprint(self) -> str:
        """A short digest of the whole access (keys, weight, limits): equal iff the same."""
        return _fingerprint(self.model_dump(mode="json"))


class KeyGrant(BaseModel):
    """One key of a server's access file: what its hash may call. ``tenants`` may hold
    ``"*"`` (every tenant); ``base`` grants the base model (and, on a dedicated deployment,
    nothing more: its merged tenant is granted by the tenant's own keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=KEY_SHA256_PATTERN)
    tenants: tuple[str, ...] = ()
    base: bool = False
    name: str | None = Field(None, max_length=63, pattern=r"^[A-Za-z0-9._-]+$",
                             description="A label for logs (never the key).")

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from loramux.names import validate_label

        for tenant in value:
            if tenant != ALL_TENANTS:
                validate_label(tenant, "tenant")
        return value


class AccessFile(BaseModel):
    """``--access-file`` of ``loramux serve`` (JSON; re-read when it changes): pool-wide key
    grants (the chart's ``auth.keys``) and per-tenant access (the operator writes one for
    each dedicated deployment). Access pushed through the admin API is added to it."""

    model_config = ConfigDict(extra="forbid")

    grants: list[KeyGrant] = Field(default_factory=list, max_length=10_000)
    tenants: dict[TenantName, TenantAccess] = Field(default_factory=dict)


class AccessView(_Report):
    """One tenant's access on a server (``GET /admin/access``): never the hashes, only how
    many and a fingerprint to compare with what was sent."""

    tenant: str
    keys: int = 0
    fingerprint: str = ""
    weight: float = 1.0
    limits: TenantLimits = Field(default_factory=TenantLimits)
    source: str = "admin"  # "admin" (pushed by the sidecar) or "file" (--access-file)


class AccessList(_Report):
    """``GET /admin/access``: the server's auth mode and every tenant's access."""

    auth: str = "keys"
    tenants: list[AccessView] = Field(default_factory=list)

# --------------------------------------------------------------------------- scale-out routing


class PeerHolder(BaseModel):
    """A pool pod holding a tenant (some of its versions Ready), as the operator last saw it
    in that pod's :class:`SyncState`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pod: str = Field(min_length=1, max_length=253)
    url: str = Field(max_length=512, pattern=ROUTE_URL_PATTERN,
                     description="the pod's public server URL (http://<pod IP>:<port>)")
    versions: tuple[VersionName, ...] = Field(default=(), max_length=64)
    residency: Residency = Residency.DISK  # the best tier among those versions
    queue_depth: int = Field(0, ge=0)  # the pod's waiting requests, at its last report
    running: int = Field(0, ge=0)  # the pod's running rows, at its last report


class PeerTenant(BaseModel):
    """Where one tenant is held in the pool. ``holders`` empty: no Ready placement, and
    ``reason`` says why (the server answers 503 with it, never the base model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: TenantName
    holders: tuple[PeerHolder, ...] = Field(default=(), max_length=256)
    reason: str | None = Field(None, max_length=512)
    # No holder because every placement Failed: a new table will not come by itself, so a
    # server answers 503 at once instead of waiting for one (--peer-failover-s).
    failed: bool = False


class PeerTable(BaseModel):
    """``PUT /admin/peers`` (and ``DesiredState.peers``): the pool's placement table as one
    pod should see it (the pod itself left out). A server forwards a request for a tenant
    it does not hold to the best holder here: device before host before disk, then least
    loaded; at most one extra hop (a forwarded request is never forwarded again)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: tuple[PeerTenant, ...] = Field(default=(), max_length=100_000)

    def fingerprint(self) -> str:
        return _fingerprint(self.model_dump(mode="json"))


class PeerTableView(_Report):
    """``GET /admin/peers``: the table the server holds, and its fingerprint."""

    fingerprint: str = ""
    tenants: list[dict[str, Any]] = Field(default_factory=list)



# --------------------------------------------------------------------------- sidecar → operator


class VersionStatus(_Report):
    """What the sidecar knows about one desired version."""

    tenant: str
    version: str
    phase: SyncPhase = SyncPhase.PENDING
    reason: str | None = None
    code: str | None = None
    digest: str | None = None
    bytes: int | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    credentials_source: str | None = None


class SyncState(_Report):
    """``GET /v1/state``: the sidecar's report, the one source of a pod's state for the
    operator. ``server`` is the server's own answer (``GET /admin/adapters``) as of the last
    pass, ``None`` while the server does not answer."""

    adapters: list[VersionStatus] = Field(default_factory=list)
    routes: list[RouteView] = Field(default_factory=list)
    server_reachable: bool | None = None
    last_pass: float | None = None
    server: AdapterList | None = None
    access: AccessList | None = None
    peers_fingerprint: str | None = None  # of the PeerTable the server holds


__all__ = [
    "ALL_TENANTS",
    "STATS_BUCKETS",
    "AccessFile",
    "AccessList",
    "AccessView",
    "ActivateRequest",
    "AdapterList",
    "AdapterPhase",
    "AdapterState",
    "AdapterView",
    "DesiredAdapter",
    "DesiredState",
    "EntryCredentials",
    "ErrorBody",
    "ErrorDetail",
    "EvictResult",
    "EvictionState",
    "KeyGrant",
    "LoadAdapterRequest",
    "PeerHolder",
    "PeerTable",
    "PeerTableView",
    "PeerTenant",
    "PlacementState",
    "Residency",
    "RouteList",
    "RouteRequest",
    "RouteView",
    "SplitRequest",
    "SyncPhase",
    "SyncState",
    "TenantAccess",
    "TenantLimits",
    "VersionStats",
    "VersionStatus",
    "error_body",
    "hash_key",
    "parse_error",
]
