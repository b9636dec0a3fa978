"""Which adapter version a request gets: the tenant directory.

A request names a model: the base model (by one of its names), a tenant (its *active*
version) or ``tenant@version``. :class:`TenantDirectory` is the one place that turns that
name into a version, and the home of every decision on the way:

- the active version of each tenant: set by a load with ``activate``, by
  ``PUT /admin/tenants/{t}/active``, by the first version of a tenant that loads, and moved
  to the newest remaining ready version when the active one is evicted;
- failed versions: a known tenant whose versions failed to load is broken, not unknown;
  its requests are a 503 naming the reason, never answered by the base model;
- the unknown-tenant policy (``--unknown-tenant reject|base``): only a tenant the server has
  never heard of may fall back to the base model;
- the base model's names, and merge mode (a merged server serves only its adapter).

The versions themselves - their entries, tiers and reference counts - are
:class:`~.adapter_cache.AdapterCache`'s. The directory registers, activates and evicts
through the cache, and takes a request's reference with :meth:`AdapterCache.acquire` on the
entry it resolved, under its own lock, so that a request never sees an active version that
an eviction has just retired. Lock order: the directory's, then the cache's (the cache never
calls into the directory).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loramux.contracts import AdapterView
from loramux.names import AdapterRef, InvalidName, TenantRef

from .adapter_cache import (
    AdapterCache,
    AdapterConflict,
    AdapterEntry,
    AdapterState,
    AdapterUnavailable,
    UnknownAdapter,
)
from .metrics import Metrics

log = logging.getLogger("loramux.tenants")


@dataclass(frozen=True, slots=True)
class ModelName:
    """The model a request names (``model`` or ``tenant_id``), parsed once per request.

    ``ref`` is the parsed ``tenant[@version]`` (``None`` when the text is not a valid
    reference; ``invalid`` then says why). ``base`` is true when the text is one of the base
    model's names.
    """

    text: str
    base: bool
    ref: TenantRef | None
    invalid: InvalidName | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """What a request resolved to: an adapter entry holding one reference (the caller
    releases it with ``AdapterCache.release``), or ``None`` for the base model."""

    entry: AdapterEntry | None

    @property
    def adapter(self) -> str | None:
        return str(self.entry.ref) if self.entry is not None else None


class TenantDirectory:
    def __init__(
        self,
        cache: AdapterCache,
        metrics: Metrics,
        *,
        base_names: Iterable[str],
        unknown_tenant: Literal["reject", "base"] = "reject",
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self.base_names = frozenset(base_names)
        self.unknown_tenant = unknown_tenant
        self.merged: AdapterEntry | None = None
        self._lock = threading.RLock()
        self._active: dict[str, str] = {}
        self._split: dict[str, tuple[str, int]] = {}  # tenant -> (canary version, percent)

    # ------------------------------------------------------------------ names
    def name(self, text: str) -> ModelName:
        """Parse what a request names, once."""
        try:
            ref: TenantRef | None = TenantRef.parse(text)
            invalid = None
        except InvalidName as exc:
            ref, invalid = None, exc
        return ModelName(text, text in self.base_names, ref, invalid)

    # ------------------------------------------------------------------ versions
    def register(
        self, ref: AdapterRef, path: Path, *, pinned: bool = False, activate: bool = False
    ) -> concurrent.futures.Future:
        """Register a version with the cache; the future gives its entry once read. The
        version becomes active once read when ``activate`` is set or its tenant has no
        active version yet; a version already registered is activated at once."""
        with self._lock:
            future, created = self._cache.register(ref, path, pinned=pinned)
            if not created:
                entry = self._cache.get(ref)
                if activate and entry is not None and entry.state != AdapterState.DRAINING:
                    self._active[ref.tenant] = ref.version
                return future

        def _after(fut: concurrent.futures.Future) -> None:
            if fut.exception() is not None:
                return
            with self._lock:
                # Only the version as still registered and servable: an eviction (or a
                # failed re-read) may have come first.
                entry = self._cache.get(ref)
                if entry is not fut.result() or entry.state != AdapterState.READY:
                    return
                if activate or ref.tenant not in self._active:
                    self._active[ref.tenant] = ref.version

        future.add_done_callback(_after)
        return future

    def register_merged(self, ref: AdapterRef, nbytes: int, rank: int) -> AdapterEntry:
        """The adapter merged into the base (merge mode): the only thing this server serves."""
        with self._lock:
            self.merged = self._cache.register_merged(ref, nbytes, rank)
            self._active[ref.tenant] = ref.version
            return self.merged

    def activate(self, tenant: str, version: str) -> AdapterEntry:
        with self._lock:
            entry = self._cache.get(AdapterRef(tenant, version))
            if entry is None:
                raise UnknownAdapter(f"{tenant}@{version} is not registered")
            if entry.state in (AdapterState.FAILED, AdapterState.DRAINING):
                raise AdapterUnavailable(
                    f"{tenant}@{version} cannot be activated: {entry.state}"
                    + (f" ({entry.reason})" if entry.reason else "")
                )
            self._active[tenant] = version
            if self._split.get(tenant, ("",))[0] == version:
                self._split.pop(tenant)  # the canary was promoted: nothing left to split
        log.info("active version set", extra={"tenant": tenant, "version": version})
        return entry

    def set_split(self, tenant: str, version: str, weight: int) -> AdapterEntry:
        """``version`` (registered, not the active one) answers ``weight`` percent of the
        bare tenant's requests while it is Ready; the active version answers the rest."""
        with self._lock:
            entry = self._cache.get(AdapterRef(tenant, version))
            if entry is None:
                raise UnknownAdapter(f"{tenant}@{version} is not registered")
            if entry.state in (AdapterState.FAILED, AdapterState.DRAINING):
                raise AdapterUnavailable(f"{tenant}@{version} cannot take a share of traffic: "
                                         f"{entry.state}")
            if self._active.get(tenant) == version:
                raise AdapterConflict(f"{tenant}@{version} is the active version; a split "
                                      "names the canary")
            self._split[tenant] = (version, weight)
        log.info("canary split set", extra={"tenant": tenant, "version": version,
                                            "weight": weight})
        return entry

    def clear_split(self, tenant: str) -> bool:
        with self._lock:
            removed = self._split.pop(tenant, None)
        if removed is not None:
            log.info("canary split removed", extra={"tenant": tenant, "version": removed[0]})
        return removed is not None

    def canary_takes(self, tenant: str, split_key: str | None) -> bool:
        """Whether a bare request for ``tenant`` with this key goes to its (Ready) canary."""
        with self._lock:
            return self._canary(tenant, split_key) is not None

    def _canary(self, tenant: str, split_key: str | None) -> AdapterEntry | None:
        """The tenant's canary when it is Ready and this key falls in its share (lock held)."""
        split = self._split.get(tenant)
        if split is None or not in_canary_share(tenant, split_key, split[1]):
            return None
        canary = self._cache.get(AdapterRef(tenant, split[0]))
        return canary if canary is not None and canary.state == AdapterState.READY else None

    def split_tenants(self) -> dict[str, tuple[str, int]]:
        with self._lock:
            return dict(self._split)

    def evict(self, ref: AdapterRef) -> concurrent.futures.Future:
        """Stop new requests on ``ref`` and remove it once idle (the cache's future). If it
        was its tenant's active version, the newest remaining ready version takes over."""
        with self._lock:
            future = self._cache.begin_evict(ref)
            if self._split.get(ref.tenant, ("",))[0] == ref.version:
                self._split.pop(ref.tenant)  # an evicted canary takes no more requests
            if self._active.get(ref.tenant) == ref.version:
                # The sidecar activates a new version before evicting the old one; if it
                # did not, fall back to the newest remaining ready version, else none.
                others = sorted(
                    (e for e in self._cache.entries()
                     if e.ref.tenant == ref.tenant and e.ref != ref
                     and e.state == AdapterState.READY),
                    key=lambda e: e.registered_at,
                )
                if others:
                    self._active[ref.tenant] = others[-1].ref.version
                else:
                    self._active.pop(ref.tenant, None)
            return future

    # ------------------------------------------------------------------ reading
    def is_active(self, ref: AdapterRef) -> bool:
        with self._lock:
            return self._active.get(ref.tenant) == ref.version

    def views(self) -> list[AdapterView]:
        """Every version the server knows, sorted by reference (``GET /admin/adapters``)."""
        with self._lock:
            def weight(entry: AdapterEntry) -> int | None:
                split = self._split.get(entry.ref.tenant)
                return split[1] if split is not None and split[0] == entry.ref.version else None

            return [entry.view(active=self._active.get(entry.ref.tenant) == entry.ref.version,
                               weight=weight(entry))
                    for entry in sorted(self._cache.entries(), key=lambda e: str(e.ref))]

    def tenant_views(self, tenant: str) -> list[AdapterView]:
        return [v for v in self.views() if v.tenant == tenant]

    # ------------------------------------------------------------------ requests
    def resolve(self, want: TenantRef, split_key: str | None = None) -> AdapterEntry:
        """The entry ``want`` names: its version, else its tenant's active version, or its
        canary for the share of split keys the canary's weight covers (a Ready canary
        only; otherwise the active version answers)."""
        with self._lock:
            version = want.version or self._active.get(want.tenant)
            if want.version is None and version is not None:
                canary = self._canary(want.tenant, split_key)
                if canary is not None:
                    return canary
            entry = self._cache.get(AdapterRef(want.tenant, version)) if version else None
            if entry is None:
                raise UnknownAdapter(f"no adapter for {want}")
            return entry

    def holds(self, want: TenantRef) -> bool:
        """Whether a request for ``want`` is served here: the version asked for (or the
        tenant's active one, for a bare name) is registered and neither failed nor
        draining. Otherwise a peer that holds it may answer (scale-out routing)."""
        with self._lock:
            try:
                entry = self.resolve(want)
            except UnknownAdapter:
                return False
            return entry.state not in (AdapterState.FAILED, AdapterState.DRAINING)

    def acquire(self, want: TenantRef, split_key: str | None = None) -> AdapterEntry:
        """Resolve ``want`` and take a reference for one request; ``release`` must follow."""
        with self._lock:
            return self._cache.acquire(self.resolve(want, split_key))

    def target(self, name: ModelName, split_key: str | None = None) -> Target:
        """What a request for ``name`` is served by, holding a reference.

        Raises :class:`InvalidName` (not a reference), :class:`UnknownAdapter` (nothing
        answers to it) or :class:`AdapterUnavailable` (failed or draining).
        """
        if name.base:
            if self.merged is not None:
                raise UnknownAdapter(f"this deployment serves only {self.merged.ref} (merged); "
                                     "the plain base is not available")
            return Target(None)
        if name.ref is None:
            raise name.invalid or InvalidName(f"invalid model name {name.text[:80]!r}")
        want = name.ref
        try:
            return Target(self.acquire(want, split_key))
        except UnknownAdapter as exc:
            versions = [e for e in self._cache.entries() if e.ref.tenant == want.tenant]
            failed = [e for e in versions if e.state == AdapterState.FAILED]
            if want.version is None and failed:
                # A known tenant whose versions failed to load is broken, not unknown: say
                # why, and never answer it from the base model.
                newest = max(failed, key=lambda e: e.registered_at)
                raise AdapterUnavailable(
                    f"adapter {newest.ref} failed to load: {newest.reason}") from exc
            # Only a tenant the server has never heard of may fall back to the base model.
            if self.unknown_tenant == "base" and self.merged is None and not versions:
                self._metrics.fallback_requests.inc()
                log.info("unknown tenant served by the base model",
                         extra={"tenant": want.tenant})
                return Target(None)
            raise


def in_canary_share(tenant: str, split_key: str | None, weight: int) -> bool:
    """Whether a request falls in a canary's ``weight`` percent: a hash of the tenant and the
    client's split key (the same key, the same version, on every pod), or a fresh random
    draw when the request has no key."""
    if weight <= 0:
        return False
    if weight >= 100:
        return True
    if split_key is None:
        return secrets.randbelow(10_000) < weight * 100
    digest = hashlib.sha256(f"{tenant}\0{split_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < weight * 100


__all__ = ["ModelName", "Target", "TenantDirectory", "in_canary_share"]
