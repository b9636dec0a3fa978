"""Fair shares between tenants: per-tenant policy (weight and limits) and the refusal a limit
gives. The token-fair admission queue lives here too (see issue 16).

Torch-free: the scheduler is pure bookkeeping over token counts, tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TenantPolicy:
    """One tenant's share and limits on this server (``None``: no limit)."""

    weight: float = 1.0
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None
    max_queued: int | None = None


LIMIT_NAMES = ("max_concurrent", "tokens_per_minute", "max_queued")


class TenantLimited(RuntimeError):
    """A per-tenant limit refuses a request (HTTP 429 with ``Retry-After``)."""

    def __init__(self, tenant: str, limit: str, value: int, retry_after_s: float) -> None:
        assert limit in LIMIT_NAMES
        self.tenant, self.limit, self.value = tenant, limit, value
        self.retry_after_s = max(1.0, retry_after_s)
        super().__init__(f"tenant {tenant} is at its {limit} limit of {value}")
