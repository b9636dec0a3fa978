"""Hot-tenant routing on the shared pool's server: forward to the dedicated (merged)
deployment, fall back locally whenever it cannot answer. Two real `loramux serve` processes
on loopback: the pool server (unmerged adapters) and a merged server for `legal`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import ServerProcess, preload_flags
from helpers import generate, metric_value, metrics

PROMPT = "Route this request"


@pytest.fixture(scope="module")
def pool(start_server, tiny_model_dir: Path, adapter_root: Path) -> ServerProcess:
    return start_server("--model", str(tiny_model_dir), "--quantization", "none",
                        "--log-format", "text", "--route-retry-s", "1",
                        *preload_flags(adapter_root, ["legal", "medical"]))


@pytest.fixture()
def dedicated(start_server, tiny_model_dir: Path, adapter_root: Path) -> ServerProcess:
    server = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--log-format", "text",
                          "--merge-adapter", str(adapter_root / "legal" / "v1"))
    yield server
    server.stop()


def _route(pool: ServerProcess, url: str, version: str | None = "v1") -> httpx.Response:
    return httpx.put(f"{pool.url}/admin/tenants/legal/route",
                     json={"url": url, "version": version}, timeout=10)


def _unroute(pool: ServerProcess) -> None:
    httpx.delete(f"{pool.url}/admin/tenants/legal/route", timeout=10)


def test_forwarded_requests_match_local_answers(pool, dedicated) -> None:
    local = generate(pool.url, "legal", PROMPT, tokens=16)
    assert _route(pool, dedicated.url).status_code == 200
    try:
        before = metric_value(metrics(dedicated.url), "loramux_requests_total", tenant="legal")
        r = httpx.post(f"{pool.url}/generate", json={"tenant_id": "legal", "prompt": PROMPT,
                       "max_new_tokens": 16, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-loramux-routed"] == "dedicated"
        # The dedicated deployment's URL is internal: no response header carries it.
        assert not [k for k, v in r.headers.items() if dedicated.url in v or "routed-to" in k]
        assert r.json()["text"] == local["text"]  # merged == unmerged (fp32, greedy)
        after = metric_value(metrics(dedicated.url), "loramux_requests_total", tenant="legal")
        assert after == before + 1  # the dedicated server did the work
        pool_metrics = metrics(pool.url)
        assert metric_value(pool_metrics, "loramux_forwarded_requests_total",
                            tenant="legal", outcome="forwarded") >= 1
        assert metric_value(pool_metrics, "loramux_requests_total", tenant="legal",
                            outcome="forwarded") >= 1

        # OpenAI streaming goes through as server-sent events.
        with httpx.stream("POST", f"{pool.url}/v1/chat/completions", timeout=60, json={
                "model": "legal", "stream": True, "max_tokens": 8, "ignore_eos": True,
                "messages": [{"role": "user", "content": PROMPT}]}) as stream:
            assert stream.status_code == 200
            assert stream.headers["x-loramux-routed"] == "dedicated"
            assert not [v for v in stream.headers.values() if dedicated.url in v]
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert any(json.loads(x[6:]).get("adapter") == "legal@v1" for x in lines[:-1])

        # Other tenants and other versions stay local.
        other = httpx.post(f"{pool.url}/generate", json={"tenant_id": "medical",
                           "prompt": PROMPT, "max_new_tokens": 4}, timeout=60)
        assert other.status_code == 200 and "x-loramux-routed" not in other.headers
        pinned = httpx.post(f"{pool.url}/generate", json={"tenant_id": "legal@v2",
                            "prompt": PROMPT, "max_new_tokens": 4}, timeout=60)
        assert "x-loramux-routed" not in pinned.headers
        # A client cannot opt out of routing by sending the forwarded header (with junk or
        # with well-formed hop ids it made up): only the server's own secret hop id counts.
        for forged in ("1", "0" * 32, "1, " + "ab" * 16):
            again = httpx.post(f"{pool.url}/generate", headers={"X-Loramux-Forwarded": forged},
                               json={"tenant_id": "legal", "prompt": PROMPT,
                                     "max_new_tokens": 4}, timeout=60)
            assert again.status_code == 200 and again.headers["x-loramux-routed"], forged
        listing = httpx.get(f"{pool.url}/admin/routes", timeout=10).json()["routes"]
        assert listing[0]["tenant"] == "legal" and listing[0]["forwarded"] >= 5
    finally:
        _unroute(pool)


def test_dead_dedicated_deployment_falls_back_without_failed_requests(
    pool, dedicated
) -> None:
    """A client loop runs while the route is set, the dedicated server dies, comes back
    (a new process on another port, route updated) and the route is removed: every request
    succeeds with the same text."""
    expected = generate(pool.url, "legal", PROMPT, tokens=8)["text"]
    assert _route(pool, dedicated.url).status_code == 200
    results: list[tuple[int, str, bool]] = []
    stop = False

    async def client_loop() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            while not stop:
                r = await client.post(f"{pool.url}/generate", json={
                    "tenant_id": "legal", "prompt": PROMPT, "max_new_tokens": 8,
                    "ignore_eos": True})
                text = r.json().get("text", r.text) if r.status_code == 200 else r.text
                results.append((r.status_code, text, "x-loramux-routed" in r.headers))

    async def scenario() -> None:
        nonlocal stop
        task = asyncio.create_task(client_loop())
        await asyncio.sleep(1.5)
        await asyncio.to_thread(dedicated.stop)  # promotion target dies
        await asyncio.sleep(2.5)  # > route_retry_s: the pool retries and falls back again
        await asyncio.to_thread(_unroute, pool)  # demotion
        await asyncio.sleep(1.0)
        stop = True
        await task

    asyncio.run(scenario())
    assert len(results) > 5
    assert all(status == 200 for status, _, _ in results), results
    assert all(text == expected for _, text, _ in results)
    assert any(routed for *_, routed in results) and any(not r for *_, r in results)
    assert metric_value(metrics(pool.url), "loramux_forwarded_requests_total",
                        tenant="legal", outcome="fallback") >= 1


def test_upstream_errors_fall_back_and_route_validation(pool) -> None:
    # An upstream that answers, but not for this tenant (a plain server without the
    # adapter answers 404): served locally.
    assert _route(pool, "http://127.0.0.1:9").status_code == 200  # nothing listens on 9
    try:
        started = time.monotonic()
        r = httpx.post(f"{pool.url}/generate", json={"tenant_id": "legal", "prompt": PROMPT,
                       "max_new_tokens": 4}, timeout=60)
        assert r.status_code == 200 and "x-loramux-routed" not in r.headers
        assert time.monotonic() - started < 30
        route = httpx.get(f"{pool.url}/admin/routes", timeout=10).json()["routes"][0]
        assert route["healthy"] is False and route["last_error"]
    finally:
        _unroute(pool)
    bad = [
        ("legal", {"url": "ftp://example.com"}),
        ("legal", {"url": "http://x", "extra": 1}),
        ("Bad_Tenant", {"url": "http://127.0.0.1:1"}),
        ("legal", {"url": "http://127.0.0.1:1", "version": "../v1"}),
    ]
    for tenant, body in bad:
        r = httpx.put(f"{pool.url}/admin/tenants/{tenant}/route", json=body, timeout=10)
        assert r.status_code == 422, (tenant, body, r.text)
        assert r.json()["error"]["message"]
    r = httpx.delete(f"{pool.url}/admin/tenants/legal/route", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_merged_server_refuses_routes(dedicated) -> None:
    r = _route(dedicated, "http://127.0.0.1:1")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"


def test_a_route_back_to_the_same_server_does_not_loop(pool) -> None:
    """Loops are cut by the server's own secret hop id: a route to itself is served on the
    second hop (a client's header could not have done that, see above)."""
    local = generate(pool.url, "legal", PROMPT, tokens=6)["text"]
    assert _route(pool, pool.url).status_code == 200
    try:
        r = httpx.post(f"{pool.url}/generate", json={"tenant_id": "legal", "prompt": PROMPT,
                       "max_new_tokens": 6, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == local
        assert pool.url not in " ".join(r.headers.values())
        listing = httpx.get(f"{pool.url}/admin/routes", timeout=10).json()["routes"]
        assert listing[0]["forwarded"] == 1  # one hop, then local
    finally:
        _unroute(pool)
