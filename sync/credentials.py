"""Which S3 credentials each desired entry's fetch uses, the clients built from them, and
keeping their secrets out of every message.

Per fetch: the entry's own ``credentials`` (sent by the operator from the LoraAdapter's
``source.credentialsSecret``), else the mounted secret directory ``s3_credentials_dir``
(re-read for every fetch, so rotation works), else the standard AWS environment. Parts an
entry leaves unset (region, endpoint) come from the mounted secret, then the environment.
Clients are cached by a digest of the credentials (a small LRU). Secrets are never logged
nor returned: :meth:`CredentialResolver.scrub` masks them in any text before it is stored
or logged.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loramux.contracts import MASK, DesiredAdapter
from loramux.s3 import S3Credentials, S3Error, make_client, read_credentials_dir

# Failures of reaching the store that other credentials (or another endpoint) can cure: a
# Failed entry with one of these codes gets a fresh try when its credentials change.
CREDENTIAL_CURABLE = frozenset({"access_denied", "not_found", "io_error"})
MAX_CACHED_CLIENTS = 32
ENVIRONMENT = "environment"  # the fingerprint (and source) of "no explicit credentials"


def fingerprint(creds: S3Credentials | None) -> str:
    return creds.fingerprint() if creds is not None else ENVIRONMENT


class CredentialResolver:
    """Resolves an entry's credentials and hands out one cached S3 client per set of them."""

    def __init__(self, mounted_dir: Path | None, *, s3_client: Any = None) -> None:
        self.mounted_dir = mounted_dir
        self._fixed = s3_client  # given by the caller (tests, embedding): the environment's
        self._clients: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def mounted(self) -> S3Credentials | None:
        """The mounted secret, read afresh (a rotated Secret is picked up); raises
        :class:`~loramux.s3.S3Error` when it cannot be read."""
        return read_credentials_dir(self.mounted_dir) if self.mounted_dir is not None else None

    def resolve(self, spec: DesiredAdapter) -> tuple[str, S3Credentials | None]:
        """``(source, credentials)``: the entry's own (parts it leaves unset come from the
        mounted secret), else the mounted secret, else the AWS environment (None)."""
        mounted = self.mounted()
        if spec.credentials is not None:
            return "entry", spec.credentials.to_s3().over(mounted)
        if mounted is not None:
            return "mounted", mounted
        return ENVIRONMENT, None

    def current_fingerprint(self, spec: DesiredAdapter) -> str | None:
        """The fingerprint of the credentials a fetch of ``spec`` would use now, or None when
        they cannot be read."""
        try:
            return fingerprint(self.resolve(spec)[1])
        except S3Error:
            return None

    def client_for(self, creds: S3Credentials | None) -> Any:
        """A cached S3 client per set of credentials (keyed by their digest)."""
        if creds is None and self._fixed is not None:
            return self._fixed
        key = fingerprint(creds)
        with self._lock:
            client = self._clients.get(key)
            if client is not None:
                self._clients.move_to_end(key)
                return client
        client = make_client(creds)
        with self._lock:
            self._clients[key] = client
            while len(self._clients) > MAX_CACHED_CLIENTS:
                self._clients.popitem(last=False)
        return client

    def lazy_client(self, creds: S3Credentials | None) -> LazyClient:
        return LazyClient(lambda: self.client_for(creds))

    def scrub(self, text: str, spec: DesiredAdapter | None) -> str:
        """``text`` without any secret of the entry's or the mounted credentials (defence in
        depth: an S3-compatible store might echo a key id in its error message)."""
        secrets: list[str] = []
        if spec is not None and spec.credentials is not None:
            secrets += spec.credentials.to_s3().secrets()
        with contextlib.suppress(S3Error):
            mounted = self.mounted()
            if mounted is not None:
                secrets += mounted.secrets()
        for secret in sorted(set(secrets), key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, MASK)
        return text


class LazyClient:
    """An S3 client built on first use: a version already verified on the volume (restart,
    warm reload) never pays for building one (boto3 session and client: ~0.3 s)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._client: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            self._client = self._make()
        return getattr(self._client, name)


__all__ = ["CREDENTIAL_CURABLE", "ENVIRONMENT", "CredentialResolver", "LazyClient",
           "fingerprint"]
