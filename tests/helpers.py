"""Small HTTP helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


def wait(fn: Callable[[], T], what: str, timeout: float = 60, interval: float = 0.2,
         tolerate: tuple[type[BaseException], ...] = (httpx.HTTPError, AssertionError)) -> T:
    """Poll ``fn`` until it returns something truthy (an exception in ``tolerate`` counts as
    not yet); fail with ``what`` and the last value or exception."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except tolerate as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def generate(url: str, tenant: str, prompt: str, tokens: int = 24, **extra) -> dict:
    body = {"tenant_id": tenant, "prompt": prompt, "max_new_tokens": tokens,
            "ignore_eos": True, **extra}
    response = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


async def generate_many(url: str, jobs: list[tuple[str, str, int]],
                        delays: list[float] | None = None) -> list[dict]:
    """Run (tenant, prompt, tokens) jobs concurrently; optional per-job start delays."""
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int, tenant: str, prompt: str, tokens: int) -> dict:
            if delays:
                await asyncio.sleep(delays[i])
            r = await client.post(f"{url}/generate", json={
                "tenant_id": tenant, "prompt": prompt, "max_new_tokens": tokens,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()

        return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN|\+Inf)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def metrics(url: str, headers: dict[str, str] | None = None) -> str:
    """Every series, per tenant: ``/admin/metrics`` (the public ``/metrics`` sums over
    tenants). Loopback clients need no token unless the server has one."""
    return httpx.get(f"{url}/admin/metrics", timeout=10, headers=headers).text
