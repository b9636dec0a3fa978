"""Typed settings of ``loramux operator``: flags, or ``LORAMUX_OPERATOR_*`` environment variables.

Imports nothing heavy (no kopf, no kubernetes), so ``loramux operator --help`` answers at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loramux.logs import LogSettings
from loramux.tokens import Token

ENV_PREFIX = "LORAMUX_OPERATOR_"


class OperatorSettings(LogSettings, BaseSettings):
    """One operator process: watches LoraAdapters, talks to every inference pod's sidecar."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    namespace: str | None = Field(
        None, description="Watch this namespace only (default: every namespace, clusterwide)."
    )
    sidecar_port: int = Field(
        8001, ge=1, le=65535,
        description="Sidecar port when the pod declares no container port named 'sync'.",
    )
    server_port: int = Field(
        8000, ge=1, le=65535,
        description="Server port when the pod declares no container port named 'http'.",
    )
    sidecar_token: str | None = Field(None, description="Bearer token of the sidecars' /v1 API.")
    sidecar_token_file: Path | None = None
    server_token: str | None = Field(
        None, description="Bearer token sent to the servers' /metrics (hot tenants' traffic).",
    )
    server_token_file: Path | None = None
    resync_seconds: float = Field(
        30.0, gt=0, description="Full reconcile at least this often (drift, new pods)."
    )
    relist_seconds: float = Field(
        300.0, gt=0, description="With kopf's watches feeding the operator's index, list "
        "every LoraAdapter and pod from the API server only this often (a safety net); a pass "
        "in between reads the index.",
    )
    debounce_seconds: float = Field(
        0.2, ge=0, description="Coalesce bursts of events into one reconcile pass."
    )
    request_timeout_seconds: float = Field(10.0, gt=0, description="Per HTTP call to a pod.")
    delete_timeout_seconds: float = Field(
        300.0, gt=0,
        description="Give up waiting for sidecars to drop a deleted adapter after this long.",
    )
    placement_policy: Literal["leastAdapters", "leastLoaded"] = Field(
        "leastAdapters", description="How 'replicas: N' picks new pods: leastAdapters (fewest "
        "adapters) or leastLoaded (least measured tokens/s of the tenants placed there, pods "
        "with a free device slot first)."
    )
    placement_device_slots: int | None = Field(
        None, ge=1, description="leastLoaded: each pool pod's device adapter slots (the "
        "server's --device-adapter-slots); a pod whose adapters fill them comes last.")
    rebalance: bool = Field(
        False, description="leastLoaded: move placed tenants ('replicas: N') from the "
        "pool's most loaded pod to its least loaded one (load, route, drain, evict), one "
        "move per pool at a time.")
    rebalance_ratio: float = Field(
        1.5, gt=1, le=100, description="Rebalance when the most loaded pod's tokens/s is "
        "above this ratio times the least loaded one's, plus --rebalance-floor-tokens-per-s.")
    rebalance_floor_tokens_per_s: float = Field(
        10.0, ge=0, description="Rebalancing: the tokens/s a move must be worth (above the "
        "ratio, and the narrowing of the pool's spread it must bring).")
    rebalance_cooldown_seconds: float = Field(
        600.0, ge=0, description="Rebalancing: a tenant moved (or whose move was abandoned) "
        "is not moved again for this long.")
    move_drain_timeout_seconds: float = Field(
        60.0, gt=0, description="A move evicts its source at the latest this long after "
        "the target took its requests, even if a pod has not confirmed its new table or "
        "requests are still in flight (the server still drains them).")
    move_load_timeout_seconds: float = Field(
        600.0, gt=0, description="A move whose target has not loaded the adapter after "
        "this long is abandoned (the source keeps it).")
    unready_grace_seconds: float = Field(
        300.0, ge=0, description="A placement ('replicas: N') on a pod NotReady for longer "
        "than this moves to a Ready pod (load, route, drain, evict); a pod briefly not Ready "
        "keeps its placements. 0: never.")
    peering: str | None = Field(
        None, description="kopf peering name (default: standalone, no peering objects)."
    )
    priority: int | None = Field(
        None, ge=0, le=2**31 - 1,
        description="kopf peering priority: the highest live one works, the others wait "
                    "(default: random per process, so two replicas never tie and freeze).",
    )
    peering_lifetime_seconds: int = Field(
        60, ge=2, le=3600,
        description="How long a replica that stopped refreshing its peering entry still "
                    "counts as alive (how fast a standby replica takes over).",
    )
    health_port: int = Field(
        8080, ge=0, le=65535,
        description="Liveness endpoint http://0.0.0.0:PORT/healthz (0 disables it).",
    )
    dedicated_template_file: Path | None = Field(
        None, description="Hot tenants: YAML pod template (metadata, spec with a 'server' "
                          "container) of dedicated merged Deployments; the chart renders it.",
    )
    pool_owner_labels: str | None = Field(
        None, pattern=r"^[^=,\s]+=[^=,\s]*(,[^=,\s]+=[^=,\s]*)*$",
        description="Trust boundary: only pods carrying every one of these labels "
                    "(key=value[,key=value]) get the sidecar token, S3 keys and routes; "
                    "the chart sets its inference pods' selector labels.",
    )
    pool_owner_deployment: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Trust boundary: only pods controlled by a ReplicaSet of this "
                    "Deployment (namespace/name) get the sidecar token, S3 keys and "
                    "routes; the chart names its inference Deployment.",
    )
    tokens_secret: str | None = Field(
        None, pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Secret (namespace/name) holding 'admin-token' and 'sidecar-token': "
                    "created with random tokens when absent, and read every pass for "
                    "the sidecar token (the chart's default, stable under helm template).",
    )
    max_dedicated_replicas: int = Field(
        8, ge=1, le=64,
        description="Largest spec.dedicated.replicas accepted (the CRD's hard maximum is 64).",
    )
    max_state_bytes: int = Field(
        4 * 1024 * 1024, ge=1024,
        description="Largest GET /v1/state body read from a sidecar; beyond it the pod's "
                    "placements are Unknown.",
    )
    cluster_domain: str = Field(
        "cluster.local", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="DNS domain of Service names, used when a Service has no cluster IP.",
    )

    def sidecar_token_source(self) -> Token:
        """The sidecar token; ``.current()`` follows a rotated file."""
        return Token(self.sidecar_token, self.sidecar_token_file)

    def server_token_source(self) -> Token:
        """The server token (its /metrics); ``.current()`` follows a rotated file."""
        return Token(self.server_token, self.server_token_file)

    def resolved_sidecar_token(self) -> str | None:
        return self.sidecar_token_source().current()

    def resolved_server_token(self) -> str | None:
        return self.server_token_source().current()

