"""Loading, activating and evicting adapters through the admin API while traffic flows."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from conftest import preload_flags
from helpers import generate, metric_value, metrics


@pytest.fixture(scope="module")
def server(start_server, tiny_model_dir, adapter_root):
    return start_server("--model", str(tiny_model_dir), "--quantization", "none",
                        "--log-format", "text", *preload_flags(adapter_root, ["legal"]))


def _put(url: str, tenant: str, version: str, path, **extra) -> httpx.Response:
    return httpx.put(f"{url}/admin/adapters/{tenant}/{version}",
                     json={"path": str(path), **extra}, timeout=60)


def test_eviction_waits_for_inflight_requests(server, adapter_root):
    assert _put(server.url, "support", "v1", adapter_root / "support" / "v1").status_code == 200
    prompt, tokens = "An in-flight request", 400
    expected = generate(server.url, "support", prompt, tokens)["text"]

    async def scenario() -> tuple[dict, float, float, int]:
        async with httpx.AsyncClient(timeout=300) as client:
            async def long_request() -> tuple[dict, float]:
                r = await client.post(f"{server.url}/generate", json={
                    "tenant_id": "support", "prompt": prompt, "max_new_tokens": tokens,
                    "ignore_eos": True})
                assert r.status_code == 200, r.text
                return r.json(), time.monotonic()

            async def evict() -> tuple[float, int]:
                await asyncio.sleep(0.3)  # the request is decoding by now
                listing = (await client.get(f"{server.url}/admin/adapters")).json()
                support = next(a for a in listing["adapters"] if a["tenant"] == "support")
                assert support["in_flight"] == 1
                delete = asyncio.ensure_future(
                    client.delete(f"{server.url}/admin/adapters/support/v1"))
                await asyncio.sleep(0.1)
                # While draining, new requests for the version are refused, not queued.
                refused = await client.post(f"{server.url}/generate", json={
                    "tenant_id": "support@v1", "prompt": "late", "max_new_tokens": 2})
                r = await delete
                assert r.status_code == 200 and r.json()["state"] == "evicted", r.text
                return time.monotonic(), refused.status_code

            (body, request_done), (evicted_at, refused_status) = await asyncio.gather(
                long_request(), evict())
            return body, request_done, evicted_at, refused_status

    body, request_done, evicted_at, refused_status = asyncio.run(scenario())
    assert body["text"] == expected  # the request completed, correctly, on its adapter
    assert evicted_at >= request_done  # and the eviction happened after it
    assert refused_status in (404, 503)
    listing = httpx.get(f"{server.url}/admin/adapters").json()["adapters"]
    assert all(a["tenant"] != "support" for a in listing)
    gone = httpx.post(f"{server.url}/generate", json={"tenant_id": "support", "prompt": "x"})
    assert gone.status_code == 404


def test_new_version_activates_and_old_version_stays_addressable(server, adapter_root):
    v1 = generate(server.url, "legal", "Versioned prompt")
    assert v1["version"] == "v1"
    r = _put(server.url, "legal", "v2", adapter_root / "legal" / "v2")
    assert r.status_code == 200 and r.json()["active"] is False
    assert generate(server.url, "legal", "Versioned prompt")["version"] == "v1"
    r = httpx.put(f"{server.url}/admin/tenants/legal/active", json={"version": "v2"})
    assert r.status_code == 200, r.text
    v2 = generate(server.url, "legal", "Versioned prompt")
    assert v2["version"] == "v2" and v2["text"] != v1["text"]
    pinned_v1 = generate(server.url, "legal@v1", "Versioned prompt")
    assert pinned_v1["text"] == v1["text"]
    models = {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert {"legal", "legal@v1", "legal@v2", "tiny-llama"} <= models
    # Evicting the active version falls back to the remaining one instead of failing.
    assert httpx.delete(f"{server.url}/admin/adapters/legal/v2").status_code == 200
    assert generate(server.url, "legal", "Versioned prompt")["version"] == "v1"


def test_activating_an_unknown_version_is_404(server):
    r = httpx.put(f"{server.url}/admin/tenants/legal/active", json={"version": "v9"})
    assert r.status_code == 404
    assert "v9" in r.json()["error"]["message"]


def test_client_disconnect_cancels_the_sequence_and_frees_its_slot(start_server,
                                                                   tiny_model_dir,
                                                                   adapter_root):
    server = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--max-batch-size", "1", "--log-format", "text",
                          *preload_flags(adapter_root, ["legal", "retail"]))
    body = {"tenant_id": "legal", "prompt": "never ending", "max_new_tokens": 2000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=60) as r:
        chunks = 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                chunks += 1
            if chunks >= 3:
                break  # leaving the block closes the connection mid-stream
    # With one batch slot, this only finishes if the cancelled sequence let go of it.
    started = time.monotonic()
    assert generate(server.url, "retail", "next in line", tokens=4)["adapter"] == "retail@v1"
    assert time.monotonic() - started < 20
    deadline = time.monotonic() + 10
    while metric_value(metrics(server.url), "loramux_requests_total", tenant="legal",
                       outcome="cancelled") < 1:
        assert time.monotonic() < deadline, "cancelled stream was not counted"
        time.sleep(0.2)
    # A non-streaming client that gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/generate", json={**body, "stream": False}, timeout=1.0)
    deadline = time.monotonic() + 10
    while metric_value(metrics(server.url), "loramux_requests_total", tenant="legal",
                       outcome="cancelled") < 2:
        assert time.monotonic() < deadline, "abandoned request was not cancelled"
        time.sleep(0.2)
    assert generate(server.url, "retail", "after the abandoned one", tokens=4)


def test_request_timeout_is_a_504_with_reason(start_server, tiny_model_dir, adapter_root):
    server = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--request-timeout-s", "1", "--log-format", "text",
                          *preload_flags(adapter_root, ["legal"]))
    r = httpx.post(f"{server.url}/generate", json={
        "tenant_id": "legal", "prompt": "slow", "max_new_tokens": 2000, "ignore_eos": True},
        timeout=60)
    assert r.status_code == 504
    assert "timeout" in r.json()["error"]["message"]
    assert generate(server.url, "legal", "still serving", tokens=3)
