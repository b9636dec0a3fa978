"""The sidecar's settings: ``loramux sync`` flags and ``LORAMUX_SYNC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import DirectoryPath, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loramux.logs import LogSettings
from loramux.s3 import RetryPolicy
from loramux.tokens import read_token


class SyncSettings(LogSettings, BaseSettings):
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
    retries: int = Field(4, ge=0, description="Retries of a transient or not_found fetch "
                                              "failure.")
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
    require_ready_for: Literal["pinned-or-active", "all", "none"] = Field(
        "pinned-or-active",
        description="Which desired versions GET /readyz waits for: pinned ones and each "
                    "tenant's active (or only) version, every one, or none.",
    )

    def resolved_server_token(self) -> str | None:
        return read_token(self.server_token, self.server_token_file)

    def resolved_token(self) -> str | None:
        return read_token(self.token, self.token_file)

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, backoff_seconds=self.backoff_seconds)


__all__ = ["SyncSettings"]
