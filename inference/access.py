"""Who may call which model: per-tenant API keys, stored as hashes.

A request presents ``Authorization: Bearer <key>``. The server keeps only SHA-256 hashes of
keys (:func:`loramux.contracts.hash_key`), from two sources:

* the access file (``--access-file``, :class:`~loramux.contracts.AccessFile`): pool-wide
  grants from the chart's ``auth.keys`` (a key may grant named tenants, every tenant
  ``"*"``, and the base model), and per-tenant access the operator writes for a dedicated
  deployment. The file is re-read when it changes (a mounted Secret is swapped by the
  kubelet), checked at most once a second; a file that stops parsing keeps the last good
  content and says so in the log;
* the admin API (``PUT /admin/tenants/{tenant}/access``): the sidecar pushes each tenant's
  :class:`~loramux.contracts.TenantAccess` from its LoraAdapter's ``spec.access``. For a
  tenant present in both, the admin API's access wins (it is the newer, per-tenant truth).

A key grants a tenant's every version (``tenant`` and ``tenant@version``). The base model
needs a grant with ``base: true``. No key: 401; a key no source knows: 401; a known key that
does not grant the model asked for: 403, whether or not that model exists here (a 404 would
tell a stranger which tenants live on this pool).

**Comparison.** The presented key is hashed, and the index is looked up by that digest, then
the digests are compared with :func:`hmac.compare_digest`. The lookup's timing depends only
on the SHA-256 of what the caller sent, which a caller cannot steer toward a stored digest
without a preimage, so timing tells nothing about stored keys; comparing against every
stored digest instead would cost O(keys) per request for no gain.

``--auth none`` turns all of this off (local use and the demo); it is logged as a warning at
start-up and on ``GET /admin/access``.

Each tenant's weight and limits go to the engine's fair scheduler through ``on_policy``.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from loramux.contracts import (
    ALL_TENANTS,
    AccessFile,
    AccessList,
    AccessView,
    TenantAccess,
    hash_key,
)

log = logging.getLogger("loramux.access")

_MAX_KEY_CHARS = 1024
_MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Principal:
    """What one key may call."""

    tenants: frozenset[str] = frozenset()
    all_tenants: bool = False
    base: bool = False

    def may(self, tenant: str | None) -> bool:
        """``tenant`` None: the base model."""
        if tenant is None:
            return self.base
        return self.all_tenants or tenant in self.tenants

    def union(self, other: Principal) -> Principal:
        return Principal(self.tenants | other.tenants, self.all_tenants or other.all_tenants,
                         self.base or other.base)


ANYONE = Principal(all_tenants=True, base=True)


class Unauthenticated(Exception):
    """No key, or a key no source knows (HTTP 401). ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class AccessFileError(ValueError):
    """The access file cannot be read or parsed (start-up refuses it)."""


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or None."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    return key


def read_access_file(path: Path) -> AccessFile:
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise AccessFileError(f"{path} is {size} bytes (limit {_MAX_FILE_BYTES})")
        return AccessFile.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise AccessFileError(f"cannot read the access file {path}: {exc.strerror}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise AccessFileError(f"the access file {path} is invalid at {where or 'top'}: "
                              f"{first.get('msg')}") from None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class AccessControl:
    def __init__(self, mode: str, file: Path | None = None,
                 on_policy: Callable[[str, TenantAccess | None], None] | None = None,
                 check_interval_s: float = 1.0) -> None:
        self.mode = mode
        self.file = file
        self.on_policy = on_policy
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._admin: dict[str, TenantAccess] = {}
        self._from_file = AccessFile()
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self._index: dict[str, tuple[str, Principal]] = {}
        self._effective: dict[str, tuple[TenantAccess, str]] = {}
        if file is not None:
            self._from_file = read_access_file(file)  # start-up: a bad file is an error
            self._stamp = _stamp(file)
            self._checked_at = time.monotonic()
        self._rebuild()
        if mode == "none":
            log.warning("AUTH IS OFF (--auth none): any client may call every tenant's adapter "
                        "and the base model. For local use and demos only; never in a shared "
                        "deployment.")
        else:
            log.info("API keys required", extra={"keys": len(self._index),
                                                 "access_file": str(file) if file else None})

    def attach(self, on_policy: Callable[[str, TenantAccess | None], None]) -> None:
        """Send every tenant's access to ``on_policy`` now, and each change from now on."""
        with self._lock:
            self.on_policy = on_policy
            for tenant, (access, _) in self._effective.items():
                on_policy(tenant, access)

    # ------------------------------------------------------------------ requests
    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of a request's ``Authorization`` header (raises Unauthenticated)."""
        if not self.enabled:
            return ANYONE
        self._maybe_reload()
        key = bearer_key(authorization)
        if key is None:
            raise Unauthenticated("missing_api_key",
                                  "this server needs 'Authorization: Bearer <API key>'")
        if len(key) > _MAX_KEY_CHARS:
            raise Unauthenticated("invalid_api_key", "the API key is not valid")
        digest = hash_key(key)
        found = self._index.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            raise Unauthenticated("invalid_api_key", "the API key is not valid")
        return found[1]

    # ------------------------------------------------------------------ admin API
    def set(self, tenant: str, access: TenantAccess) -> AccessView:
        with self._lock:
            self._admin[tenant] = access
            self._rebuild()
        log.info("tenant access set", extra={"tenant": tenant, "keys": len(access.key_sha256),
                                             "fingerprint": access.fingerprint(),
                                             "weight": access.weight})
        return self._view(tenant, access, "admin")

    def remove(self, tenant: str) -> bool:
        with self._lock:
            if self._admin.pop(tenant, None) is None:
                return False
            self._rebuild()
        log.info("tenant access removed", extra={"tenant": tenant})
        return True

    def views(self) -> AccessList:
        self._maybe_reload()
        with self._lock:
            rows = [self._view(t, a, src) for t, (a, src) in sorted(self._effective.items())]
        return AccessList(auth=self.mode, tenants=rows)

    @staticmethod
    def _view(tenant: str, access: TenantAccess, source: str) -> AccessView:
        return AccessView(tenant=tenant, keys=len(access.key_sha256),
                          fingerprint=access.fingerprint(), weight=access.weight,
                          limits=access.limits, source=source)

    # ------------------------------------------------------------------ internals
    def _maybe_reload(self) -> None:
        if self.file is None:
            return
        now = time.monotonic()
        if now - self._checked_at < self.check_interval_s:
            return
        self._checked_at = now
        stamp = _stamp(self.file)
        if stamp is None or stamp == self._stamp:
            if stamp is None and self._stamp is not None:
                log.error("the access file is gone; keeping its last content",
                          extra={"access_file": str(self.file)})
                self._stamp = None
            return
        try:
            content = read_access_file(self.file)
        except AccessFileError as exc:
            log.error("the access file changed but is invalid; keeping its last good "
                      "content: %s", exc)
            self._stamp = stamp
            return
        with self._lock:
            self._from_file, self._stamp = content, stamp
            self._rebuild()
        log.info("access file reloaded", extra={"grants": len(content.grants),
                                                "tenants": len(content.tenants)})

    def _rebuild(self) -> None:
        """Recompute the key index and each tenant's effective access (lock held)."""
        effective: dict[str, tuple[TenantAccess, str]] = {
            t: (a, "file") for t, a in self._from_file.tenants.items()}
        effective.update({t: (a, "admin") for t, a in self._admin.items()})
        principals: dict[str, Principal] = {}

        def grant(digest: str, principal: Principal) -> None:
            previous = principals.get(digest)
            principals[digest] = principal if previous is None else previous.union(principal)

        for g in self._from_file.grants:
            grant(g.sha256, Principal(
                tenants=frozenset(t for t in g.tenants if t != ALL_TENANTS),
                all_tenants=ALL_TENANTS in g.tenants, base=g.base))
        for tenant, (access, _) in effective.items():
            for digest in access.key_sha256:
                grant(digest, Principal(tenants=frozenset({tenant})))
        old = self._effective
        self._index = {d: (d, p) for d, p in principals.items()}
        self._effective = effective
        if self.on_policy is not None:
            for tenant in old.keys() - effective.keys():
                self.on_policy(tenant, None)
            for tenant, (access, _) in effective.items():
                if old.get(tenant, (None,))[0] != access:
                    self.on_policy(tenant, access)


__all__ = ["ANYONE", "AccessControl", "AccessFileError", "Principal", "Unauthenticated",
           "bearer_key", "read_access_file"]
