"""``loramux fetch``: one verified, atomic adapter download, then exit.

The init container of a hot tenant's dedicated (merged) pod runs this before the server
starts with ``--merge-adapter <root>/<tenant>/<version>``. It is the sync sidecar's download
path (:func:`fetch_adapter`: manifest, sha256 and size of every file, optional digest pin,
no pickles, a byte bound, atomic rename) with the sidecar's retry policy
(:class:`loramux.s3.RetryPolicy`): transient errors and ``not_found`` (an upload still under
way writes its manifest last) are retried with exponential backoff, anything else fails at
once. So a dedicated pod holds exactly what a pool pod would.

Exit status: 0 when the version is in place (a JSON line on stdout says what happened),
2 when the fetch is refused or keeps failing, and on bad flags (the reason on stderr, one
line, no traceback).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loramux.inference.adapter_store import fetch_adapter
from loramux.logs import LogSettings
from loramux.names import AdapterRef, TenantName, VersionName
from loramux.s3 import RetryPolicy, S3Error, make_client, read_credentials_dir

log = logging.getLogger("loramux.fetch")
PROG = "loramux fetch"
EXIT_ERROR = 2


class FetchSettings(LogSettings, BaseSettings):
    """Download and verify one adapter version into <root>/<tenant>/<version>/, then exit."""

    model_config = SettingsConfigDict(env_prefix="LORAMUX_FETCH_", extra="forbid")

    root: Path = Field(description="Adapter volume: lands in <root>/<tenant>/<version>/.")
    tenant: TenantName
    version: VersionName
    uri: str = Field(min_length=1, max_length=2048, description="s3://bucket/prefix/ or file:///dir/")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                               description="Pin: the manifest's sha256 must equal this.")
    max_adapter_bytes: int = Field(2 * 1024**3, ge=1)
    allow_pickle: bool = False
    retries: int = Field(6, ge=0, description="Retries of a transient or not_found failure.")
    backoff_seconds: float = Field(1.0, ge=0, description="Base of the exponential backoff.")
    s3_credentials_dir: Path | None = Field(
        None, description="Mounted Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...")

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, backoff_seconds=self.backoff_seconds)


def run(settings: FetchSettings) -> dict[str, Any]:
    """Fetch with retries; return a summary, or raise the last :class:`~loramux.s3.S3Error`
    (a :class:`~loramux.inference.adapter_store.FetchError` for anything about the content)."""
    ref = AdapterRef(settings.tenant, settings.version)
    policy = settings.retry_policy
    for attempt in range(policy.attempts):
        try:
            client = None
            if settings.uri.startswith("s3://"):
                creds = (read_credentials_dir(settings.s3_credentials_dir)
                         if settings.s3_credentials_dir else None)
                client = make_client(creds)
            result = fetch_adapter(ref, settings.uri, settings.root,
                                   expected_sha256=settings.sha256,
                                   max_bytes=settings.max_adapter_bytes,
                                   allow_pickle=settings.allow_pickle, s3_client=client)
        except S3Error as exc:
            if policy.verdict(exc, attempt) != "retry":
                raise
            delay = policy.delay(attempt)
            log.warning("fetch failed, retrying", extra={
                "tenant": ref.tenant, "version": ref.version, "code": exc.code,
                "attempt": attempt + 1, "retry_in_s": round(delay, 2)})
            time.sleep(delay)
            continue
        return {"tenant": ref.tenant, "version": ref.version, "path": str(result.path),
                "digest": result.manifest_sha256, "bytes": result.bytes,
                "downloaded": result.downloaded, "seconds": round(result.seconds, 3),
                "attempts": attempt + 1}
    raise AssertionError("unreachable: the last attempt's verdict is never 'retry'")


def main(argv: list[str]) -> int:
    """Run ``loramux fetch``; returns the exit code (0 in place, 2 on any error)."""
    from loramux.logs import configure_logging
    from loramux.settings_cli import settings_from_cli

    try:
        settings = settings_from_cli(FetchSettings, argv, PROG)
    except SystemExit as exc:  # --help (0), or bad flags (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    configure_logging(settings.log_level, settings.log_format)
    try:
        summary = run(settings)
    except S3Error as exc:
        print(f"{PROG}: {settings.tenant}@{settings.version} failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
