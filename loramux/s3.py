"""The one S3 layer: credentials, the key map, URI and endpoint validation, the client
factory, error classification and the retry policy.

Every process that touches S3 uses this module: the server's adapter store and the sidecar
(downloads), ``loramux fetch`` (init containers), ``loramux push`` (uploads) and the
operator (which reads a LoraAdapter's credentials Secret and hands it to the sidecar).

Torch-free and boto3-free at import time (pydantic only): boto3 and botocore are imported inside the
functions that need them, so the operator image (no boto3) can use the key map and the
validators.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

# The key names of a Kubernetes Secret and of the standard AWS environment variables, and
# the field each fills. A mounted secret directory has one file per key.
CREDENTIAL_KEYS: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "access_key_id",
    "AWS_SECRET_ACCESS_KEY": "secret_access_key",
    "AWS_SESSION_TOKEN": "session_token",
    "AWS_REGION": "region",
    "AWS_ENDPOINT_URL": "endpoint_url",
}
REQUIRED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MAX_CREDENTIAL_FILE_BYTES = 16 << 10
REGION_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_REGION = re.compile(REGION_PATTERN)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

# What a failure to reach the store is. The first four come from this module; the adapter
# store adds the content codes (digest_mismatch, too_large, ...).
ErrorCode = Literal["not_found", "access_denied", "io_error", "bad_uri"]


class S3Error(Exception):
    """Reaching S3 failed or was refused. ``retryable``: trying the same call again later
    can succeed (network trouble, throttling), not content that is wrong or forbidden."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# --------------------------------------------------------------------------- validation


def region_problem(region: str) -> str | None:
    return None if _REGION.fullmatch(region) else "is not a region name"


def endpoint_problem(url: str) -> str | None:
    """Why ``url`` is not a usable S3 endpoint (http(s), a host, no user:password, no query
    or fragment, no whitespace or control characters), or None."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        return "must not contain whitespace or control characters"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry user:password (send them as the keys)"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    return None


def _valid_endpoint(url: str) -> str:
    problem = endpoint_problem(url)
    if problem:
        raise ValueError(problem)
    return url


# A settings or wire field holding an S3 endpoint URL, checked by endpoint_problem.
EndpointUrl = Annotated[str, Field(max_length=2048), AfterValidator(_valid_endpoint)]


def bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` breaks the S3 bucket naming rules (the general-purpose subset every S3
    clone accepts), or None."""
    if not _BUCKET.fullmatch(bucket):
        return ("is not a valid S3 bucket name (3-63 characters: lower-case letters, digits, "
                "'.' and '-', starting and ending with a letter or digit)")
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "is not a valid S3 bucket name (bad '.' placement)"
    with contextlib.suppress(ValueError):
        ipaddress.IPv4Address(bucket)
        return "must not be formatted as an IP address"
    if bucket.startswith(("xn--", "sthree-")) or bucket.endswith(("-s3alias", "--ol-s3")):
        return "uses a prefix or suffix S3 reserves"
    return None


@dataclass(frozen=True, slots=True)
class S3Uri:
    """A parsed ``s3://bucket/prefix`` URI; ``prefix`` has no leading or trailing slash."""

    bucket: str
    prefix: str

    @property
    def segments(self) -> list[str]:
        return self.prefix.split("/") if self.prefix else []

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/" if self.prefix else f"s3://{self.bucket}/"


def parse_s3_uri(uri: Any) -> S3Uri:
    """Parse ``s3://bucket[/prefix][/]``; :class:`S3Error` ``bad_uri`` names what is wrong."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise S3Error("bad_uri", f"{str(uri)[:100]!r} is not an s3:// URI")
    if any(c in uri for c in "?#\\") or any(ord(c) < 0x21 or ord(c) == 0x7F for c in uri):
        raise S3Error("bad_uri", f"{uri[:100]!r}: query strings, fragments, backslashes and "
                                 "whitespace are not allowed in the URI")
    bucket, _, path = uri[len("s3://"):].partition("/")
    problem = bucket_problem(bucket)
    if problem:
        raise S3Error("bad_uri", f"bucket {bucket[:70]!r} {problem}")
    prefix = path.strip("/")
    if prefix and any(s in ("", ".", "..") for s in prefix.split("/")):
        raise S3Error("bad_uri", f"{uri[:100]!r} has an empty, '.' or '..' path segment")
    return S3Uri(bucket=bucket, prefix=prefix)


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class S3Credentials:
    """Where and as whom to reach S3. Every field is optional; what is unset comes from the
    next source (:meth:`over`) and finally from the standard AWS environment.

    The secret parts never appear in ``repr`` (so not in logs or tracebacks either).
    """

    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    endpoint_url: str | None = None

    def over(self, fallback: S3Credentials | None) -> S3Credentials:
        """These credentials with unset parts filled from ``fallback``. The key pair and
        the session token travel together: a token is never mixed with another source's keys.
        """
        if fallback is None:
            return self
        keys = self if (self.access_key_id or self.secret_access_key) else fallback
        return S3Credentials(
            access_key_id=keys.access_key_id,
            secret_access_key=keys.secret_access_key,
            session_token=keys.session_token,
            region=self.region or fallback.region,
            endpoint_url=self.endpoint_url or fallback.endpoint_url,
        )

    def fingerprint(self) -> str:
        """A digest that changes whenever any part changes (a cache key; never logged)."""
        parts = (self.access_key_id, self.secret_access_key, self.session_token, self.region,
                 self.endpoint_url)
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.access_key_id, self.secret_access_key,
                                 self.session_token) if s)


def credentials_from_values(values: dict[str, str], name: str
                            ) -> tuple[dict[str, str] | None, str | None]:
    """A Secret's decoded values as credential fields (``access_key_id``, ...) for a desired
    entry: ``(fields, None)``, or ``(None, problem)`` naming keys only, never values."""
    values = {k: v.strip() for k, v in values.items()}
    missing = [k for k in REQUIRED_KEYS if not values.get(k)]
    if missing:
        return None, f"Secret {name!r} lacks {', '.join(missing)}"
    creds = {CREDENTIAL_KEYS[k]: values[k] for k in CREDENTIAL_KEYS if values.get(k)}
    region = creds.get("region")
    if region is not None and region_problem(region):
        return None, f"Secret {name!r}: AWS_REGION is not a region name"
    endpoint = creds.get("endpoint_url")
    if endpoint is not None and endpoint_problem(endpoint):
        return None, f"Secret {name!r}: AWS_ENDPOINT_URL is not an http(s) URL with a host"
    return creds, None


def read_credentials_dir(directory: Path) -> S3Credentials:
    """The credentials in a mounted secret directory (files named like :data:`CREDENTIAL_KEYS`).
    Read afresh on every call, so a rotated Secret (kubelet swaps the files atomically)
    takes effect with the next client. Missing files are unset; surrounding whitespace (a
    trailing newline) is stripped.
    """
    directory = Path(directory)
    values: dict[str, str | None] = {}
    for name, attr in CREDENTIAL_KEYS.items():
        path = directory / name
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_CREDENTIAL_FILE_BYTES + 1)
        except FileNotFoundError:
            values[attr] = None
            continue
        except OSError as exc:
            raise S3Error("io_error", f"mounted credentials: cannot read {name} in "
                          f"{directory}: {exc.strerror or type(exc).__name__}",
                          retryable=True) from None
        if len(data) > MAX_CREDENTIAL_FILE_BYTES:
            raise S3Error("access_denied", f"mounted credentials: {name} in {directory} "
                          f"is larger than {MAX_CREDENTIAL_FILE_BYTES} bytes")
        values[attr] = data.decode("utf-8", errors="replace").strip() or None
    return S3Credentials(**values)


# --------------------------------------------------------------------------- the client


def make_client(credentials: S3Credentials | None = None) -> Any:
    """An S3 client, with short connect timeouts so an unreachable store fails fast.

    ``credentials`` override the standard AWS environment (``AWS_ENDPOINT_URL[_S3]``,
    region, credentials, profiles) part by part; without them the environment alone
    applies. ``AWS_REGION`` is read here because botocore only knows ``AWS_DEFAULT_REGION``.
    A key without its secret (or the reverse) is refused with ``access_denied`` rather than
    silently mixed with the environment's.
    """
    import boto3.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    creds = credentials or S3Credentials()
    if bool(creds.access_key_id) != bool(creds.secret_access_key):
        have, missing = (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if creds.access_key_id
                         else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"))
        raise S3Error("access_denied", f"S3 credentials have {have} but no {missing}")
    if creds.session_token and not creds.access_key_id:
        raise S3Error("access_denied", "S3 credentials have a session token but no keys")
    region = (creds.region or os.environ.get("AWS_REGION")
              or os.environ.get("AWS_DEFAULT_REGION") or None)
    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3})
    kwargs: dict[str, Any] = {}
    if creds.access_key_id:
        kwargs = {"aws_access_key_id": creds.access_key_id,
                  "aws_secret_access_key": creds.secret_access_key,
                  "aws_session_token": creds.session_token}
    try:
        # A fresh session, not boto3's module-level default: that one caches the credentials
        # it resolved first, which would ignore later changes in a long-running process.
        return boto3.session.Session().client(
            "s3", region_name=region, endpoint_url=creds.endpoint_url or None, config=config,
            **kwargs,
        )
    except ValueError as exc:  # e.g. an endpoint URL botocore cannot use
        raise S3Error("bad_uri", f"cannot build an S3 client: {exc}") from None
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names a profile that does not exist
        error = classify(exc)
        raise S3Error(error.code, f"cannot build an S3 client: {error.message}",
                      retryable=error.retryable) from None


# --------------------------------------------------------------------------- errors


def _client_error_parts(exc: Any) -> tuple[str, str, int | None]:
    err = exc.response.get("Error", {}) or {}
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(err.get("Code") or ""), str(err.get("Message") or ""), status


def classify(exc: BaseException) -> S3Error:
    """A botocore/boto3 (or socket) failure as an :class:`S3Error`: a code, a retry verdict
    and one readable line with the store's own error code and message, no traceback."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    cause: BaseException = exc
    # boto3's transfer manager wraps the ClientError in S3UploadFailedError / its __cause__.
    while not isinstance(cause, ClientError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, ClientError):
        code, message, status = _client_error_parts(cause)
        if code in ("404", "NoSuchBucket") and not message:
            message = "not found"
        if code == "403" and not message:
            message = "access denied"
        detail = f"{code or 'Error'}: {message}".rstrip(": ")
        if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404") or status == 404:
            return S3Error("not_found", detail)
        denied = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                  "Forbidden"}
        if code in denied or status == 403:
            return S3Error("access_denied", detail)
        throttled = {"SlowDown", "Throttling", "RequestTimeout", "InternalError",
                     "ServiceUnavailable"}
        retryable = code in throttled or status is None or status >= 500 or status == 429
        return S3Error("io_error", detail, retryable=retryable)
    text = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return S3Error("access_denied", detail)
    if isinstance(exc, BotoCoreError | Boto3Error | OSError):
        # EndpointConnectionError, connect/read timeouts, truncated bodies, resets.
        return S3Error("io_error", detail, retryable=True)
    return S3Error("io_error", detail)


def is_missing_key(exc: BaseException) -> bool:
    """A GET or HEAD of a key that does not exist (a missing *bucket* is not this)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code, _, status = _client_error_parts(exc)
    return code in ("NoSuchKey", "404", "NotFound") or (status == 404 and code != "NoSuchBucket")


@contextlib.contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """Turn S3 failures inside the block into :class:`S3Error` (``what: detail``)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error, OSError) as exc:
        error = classify(exc)
        raise S3Error(error.code, f"{what}: {error.message}",
                      retryable=error.retryable) from exc


# --------------------------------------------------------------------------- retries

Verdict = Literal["retry", "later", "give_up"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """One retry policy for every download (sidecar and ``loramux fetch``).

    - a transient failure (``retryable``) and ``not_found`` are retried with exponential
      backoff and jitter: the operator may name a version whose upload (manifest last) is
      still under way;
    - ``disk_budget`` waits for a later pass (other versions may be deleted meanwhile);
    - anything else (wrong, forbidden or unsafe content) gives up at once.
    """

    retries: int = 4
    backoff_seconds: float = 0.5

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def verdict(self, error: S3Error, attempt: int) -> Verdict:
        """What to do after ``error`` on attempt ``attempt`` (0-based)."""
        if error.code == "disk_budget":
            return "later"
        if not error.retryable and error.code != "not_found":
            return "give_up"
        return "retry" if attempt + 1 < self.attempts else "later"

    def delay(self, attempt: int) -> float:
        base = self.backoff_seconds * (2 ** attempt)
        return base + random.uniform(0, base / 2 if base else 0)


__all__ = [
    "CREDENTIAL_KEYS",
    "REQUIRED_KEYS",
    "EndpointUrl",
    "RetryPolicy",
    "S3Credentials",
    "S3Error",
    "S3Uri",
    "bucket_problem",
    "classify",
    "credentials_from_values",
    "endpoint_problem",
    "is_missing_key",
    "make_client",
    "parse_s3_uri",
    "read_credentials_dir",
    "region_problem",
    "s3_errors",
]
