"""``loramux fetch``: one verified, atomic adapter download, then exit.

The init container of a hot tenant's dedicated (merged) pod runs this before the server
starts with ``--merge-adapter <root>/<tenant>/<version>``. It is the sync sidecar's download
path (:func:`fetch_adapter`: manifest, sha256 and size of every file, optional digest pin,
no pickles, a byte bound, atomic rename), with the same retry policy for transient errors,
so a dedicated pod holds exactly what a pool pod would.

Exit status: 0 when the version is in place (a JSON line on stdout says what happened),
2 when the fetch is refused or keeps failing (the reason on stderr, no traceback).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from loramux.inference.adapter_store import (
    FetchError,
    fetch_adapter,
    make_s3_client,
    read_credentials_dir,
)
from loramux.names import AdapterRef, TenantName, VersionName

log = logging.getLogger("loramux.fetch")


class FetchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAMUX_FETCH_", extra="forbid")

    root: Path = Field(description="Adapter volume: lands in <root>/<tenant>/<version>/.")
    tenant: TenantName
    version: VersionName
    uri: str = Field(min_length=1, max_length=2048, description="s3://bucket/prefix/ or file:///dir/")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                               description="Pin: the manifest's sha256 must equal this.")
    max_adapter_bytes: int = Field(2 * 1024**3, ge=1)
    allow_pickle: bool = False
    retries: int = Field(6, ge=0, description="Retries of a transient failure.")
    backoff_seconds: float = Field(1.0, ge=0)
    s3_credentials_dir: Path | None = Field(
        None, description="Mounted Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...")


def run(settings: FetchSettings) -> dict:
    """Fetch with retries; return a summary, or raise the last :class:`FetchError`."""
    ref = AdapterRef(settings.tenant, settings.version)
    attempts = settings.retries + 1
    for attempt in range(attempts):
        try:
            client = None
            if settings.uri.startswith("s3://"):
                creds = (read_credentials_dir(settings.s3_credentials_dir)
                         if settings.s3_credentials_dir else None)
                client = make_s3_client(creds)
            result = fetch_adapter(ref, settings.uri, settings.root,
                                   expected_sha256=settings.sha256,
                                   max_bytes=settings.max_adapter_bytes,
                                   allow_pickle=settings.allow_pickle, s3_client=client)
        except FetchError as exc:
            if not exc.retryable or attempt + 1 >= attempts:
                raise
            delay = settings.backoff_seconds * 2**attempt
            delay += random.uniform(0, delay / 2)
            log.warning("fetch failed, retrying", extra={
                "tenant": ref.tenant, "version": ref.version, "code": exc.code,
                "attempt": attempt + 1, "retry_in_s": round(delay, 2)})
            time.sleep(delay)
            continue
        return {"tenant": ref.tenant, "version": ref.version, "path": str(result.path),
                "digest": result.manifest_sha256, "bytes": result.bytes,
                "downloaded": result.downloaded, "seconds": round(result.seconds, 3),
                "attempts": attempt + 1}
    raise AssertionError("unreachable")


def main(argv: list[str]) -> int:
    class FetchCli(FetchSettings):
        model_config = SettingsConfigDict(
            env_prefix="LORAMUX_FETCH_", extra="forbid", cli_prog_name="loramux fetch",
            cli_kebab_case=True, cli_implicit_flags=True, cli_avoid_json=True,
        )

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        parsed = CliApp.run(FetchCli, cli_args=argv)
        settings = FetchSettings.model_validate(parsed.model_dump())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}"
                             for e in exc.errors())
        print(f"loramux fetch: invalid arguments: {problems}", file=sys.stderr)
        return 2
    try:
        summary = run(settings)
    except FetchError as exc:
        print(f"loramux fetch: {settings.tenant}@{settings.version} failed: {exc}",
              file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
