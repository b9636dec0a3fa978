"""The sidecar's settings: ``loramux sync`` flags and ``LORAMUX_SYNC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import DirectoryPath, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loramux.logs import LogSettings
from loramux.s3 import RetryPolicy
from loramux.tokens import Token


class SyncSettings(LogSettings, BaseSettings):
    """One sidecar beside one inference server, sharing the adapter volume ``root``."""

    model_config = SettingsConfigDict(env_prefix="LORAMUX_SYNC_", extra="forbid")

    root: Path = Field(description="Adapter volume: <root>/<tenant>/<version>/.")
    server_url: str = "http://127.0.0.1:8000"
    server_token: str | None = Field(None, description="Bearer token of the server's /admin.")
    server_token_file: Path | None = Field(
        None, description="File holding the server's admin token (a mounted Secret); re-read "
                          "when it changes, so a rotated token is sent from the next call on.")
    token: str | None = Field(None, description="Bearer token for this sidecar's /v1 API.")
    token_file: Path | None = Field(
        None, description="File holding this sidecar's /v1 token; re-read when it changes "
                          "(rotation without a restart).")
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

    def server_token_source(self) -> Token:
        """The server's admin token, following its file (read per call by the reconciler)."""
        return Token(self.server_token, self.server_token_file)

    def token_source(self) -> Token:
        """This sidecar's /v1 token, following its file (checked per request)."""
        return Token(self.token, self.token_file)

    @property
    def token_configured(self) -> bool:
        """Whether /v1 is protected: a token or a token file was given (an empty or
        unreadable file then refuses every request rather than opening the API)."""
        return bool(self.token) or self.token_file is not None

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, backoff_seconds=self.backoff_seconds)


__all__ = ["SyncSettings"]
