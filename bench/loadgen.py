"""Async HTTP load generator for loramux benchmarks (library + small CLI).

Each of ``clients`` concurrent clients sends ``requests_per_client`` requests one after the
other. Client ``i`` always uses ``tenants[i % len(tenants)]`` and ``prompts[i % len(prompts)]``
and asks for exactly ``max_new_tokens`` tokens (``ignore_eos``). A tenant of ``None`` means
"the bare base model" and goes to the OpenAI-style ``/v1/completions`` endpoint instead of
``/generate``.

    python bench/loadgen.py --url http://127.0.0.1:8000 --tenants a,b,c \
        --clients 8 --max-new-tokens 64 --requests-per-client 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

MAX_FAILURE_SAMPLES = 5
BASE_TENANT_TOKEN = "-"  # CLI: a tenant written as "-" means the base model (None)
DEFAULT_PROMPTS = [
    "Summarise the main obligations of a tenant under a residential lease.",
    "Explain the difference between a virus and a bacterium.",
    "Write a short note to a colleague about tomorrow's meeting.",
    "List three ways to reduce memory use when serving a language model.",
]


@dataclass
class LoadResult:
    wall_seconds: float
    total_completion_tokens: int
    tokens_per_s: float
    p50_latency_s: float | None
    p99_latency_s: float | None
    requests: int
    failures: int
    failure_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Record:
    latency_s: float
    completion_tokens: int
    status: int | None  # None when the request never got a response (timeout, refused...)
    error: str | None = None


def _percentile(values: list[float], pct: int) -> float | None:
    """Percentile by LINEAR interpolation between closest ranks.

    statistics.quantiles(method="inclusive") is the same as numpy.percentile's default
    ("linear"); with one sample that sample is every percentile.
    """
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


async def _one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> _Record:
    start = time.perf_counter()
    try:
        resp = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        return _Record(time.perf_counter() - start, 0, None, f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    if resp.status_code != 200:
        return _Record(latency, 0, resp.status_code, f"HTTP {resp.status_code}: {resp.text[:500]}")
    try:
        tokens = int(resp.json()["usage"]["completion_tokens"])
    except (ValueError, KeyError, TypeError) as exc:
        return _Record(latency, 0, resp.status_code, f"bad body ({exc!r}): {resp.text[:500]}")
    return _Record(latency, tokens, resp.status_code)


async def run_load(
    base_url: str,
    tenants: list[str | None],
    prompts: list[str],
    clients: int,
    requests_per_client: int,
    max_new_tokens: int,
    timeout: float = 600,
    base_model: str | None = None,
) -> LoadResult:
    """Drive the server and measure; latency percentiles cover successful requests only."""
    if not tenants or not prompts:
        raise ValueError("tenants and prompts must be non-empty")
    if None in tenants and not base_model:
        raise ValueError("a None tenant (base model) needs base_model")
    base_url = base_url.rstrip("/")

    def request_for(i: int) -> tuple[str, dict[str, Any]]:
        tenant, prompt = tenants[i % len(tenants)], prompts[i % len(prompts)]
        if tenant is None:
            return f"{base_url}/v1/completions", {
                "model": base_model,
                "prompt": prompt,
                "max_tokens": max_new_tokens,
                "ignore_eos": True,
                # /v1/completions defaults to temperature 1 (OpenAI); /generate to greedy.
                # Ask for greedy here too, so that every workload decodes the same way.
                "temperature": 0.0,
            }
        return f"{base_url}/generate", {
            "tenant_id": tenant,
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
            "ignore_eos": True,
        }

    async def client_loop(client: httpx.AsyncClient, i: int) -> list[_Record]:
        url, body = request_for(i)
        return [await _one_request(client, url, body) for _ in range(requests_per_client)]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
        wall = time.perf_counter() - start

    records = [r for batch in per_client for r in batch]
    ok = [r for r in records if r.status == 200 and r.error is None]
    failed = [r for r in records if not (r.status == 200 and r.error is None)]
    latencies = [r.latency_s for r in ok]
    total = sum(r.completion_tokens for r in ok)
    return LoadResult(
        wall_seconds=wall,
        total_completion_tokens=total,
        tokens_per_s=total / wall if wall > 0 else 0.0,
        p50_latency_s=_percentile(latencies, 50),
        p99_latency_s=_percentile(latencies, 99),
        requests=len(records),
        failures=len(failed),
        failure_samples=[r.error or "" for r in failed[:MAX_FAILURE_SAMPLES]],
    )


async def wait_healthy(base_url: str, timeout_s: float) -> None:
    """Poll GET /healthz until it answers 200; raise TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    url = f"{base_url.rstrip('/')}/healthz"
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{url} not healthy after {timeout_s}s")
            await asyncio.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description="loramux benchmark load generator")
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--tenants",
        required=True,
        help=f"comma-separated tenant ids; '{BASE_TENANT_TOKEN}' = base model",
    )
    parser.add_argument("--base-model", default=None, help="model name for base-model requests")
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt text, repeatable (default: a built-in set)",
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--wait-healthy",
        type=float,
        default=0,
        help="first wait up to this many seconds for GET /healthz",
    )
    args = parser.parse_args()
    tenants: list[str | None] = [
        None if t == BASE_TENANT_TOKEN else t for t in (s.strip() for s in args.tenants.split(","))
    ]

    async def go() -> LoadResult:
        if args.wait_healthy > 0:
            await wait_healthy(args.url, args.wait_healthy)
        return await run_load(
            args.url,
            tenants,
            args.prompt or DEFAULT_PROMPTS,
            args.clients,
            args.requests_per_client,
            args.max_new_tokens,
            args.timeout,
            args.base_model,
        )

    print(json.dumps(asyncio.run(go()).to_dict(), indent=2))


if __name__ == "__main__":
    main()
