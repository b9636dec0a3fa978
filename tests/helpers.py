"""Small HTTP helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

_PORT_FLOOR = 10_000
_PORT_BLOCK = 2_000  # ports per pytest process (xdist worker)


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections and ``bind(0)``."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_block() -> range | None:
    """This pytest process's own block of ports, below the kernel's ephemeral range: a port
    handed out by the kernel (``bind(0)``) may be taken by any outgoing connection before the
    process that is told to listen on it gets there, and on a loaded CI machine it was (a
    sidecar started 30 s after its port was chosen exited with 'address already in use').
    Ports below the ephemeral range are never used for outgoing connections, and each xdist
    worker has its own block, so two workers cannot pick the same one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    start = _PORT_FLOOR + index * _PORT_BLOCK
    if start + _PORT_BLOCK > _ephemeral_low():
        return None
    return range(start, start + _PORT_BLOCK)


_BLOCK = _port_block()
# a random start, so that a pytest run right after another does not reuse its first ports
_NEXT = itertools.count(random.randrange(_BLOCK.stop - _BLOCK.start)) if _BLOCK else None


def free_port() -> int:
    """A loopback port for a process to listen on later (see ``_port_block``). Ports that
    cannot be bound now are skipped. Falls back to the kernel's choice where the ephemeral
    range leaves no room below it."""
    if _BLOCK is not None and _NEXT is not None:
        for _ in range(len(_BLOCK)):
            port = _BLOCK.start + next(_NEXT) % len(_BLOCK)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
