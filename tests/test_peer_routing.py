"""Scale-out routing (issue 17) between real `loramux serve` processes on loopback: a pool
pod forwards a request for a tenant it does not hold to a peer that holds it, picked from
the pool's placement table (``PUT /admin/peers``) by residency, then load.

Three servers, each holding different tenants, all with ``--auth keys`` and one access file
(an every-tenant key, a key for ``legal`` only, a key for ``finance`` only):

- ``a``: legal
- ``b``: finance, retail
- ``c``: retail, medical (stopped by the last test: a holder that dies)
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import httpx
import pytest

from conftest import ServerProcess, preload_flags
from helpers import metric_value, metrics
from loramux.contracts import AccessFile, KeyGrant, PeerTable, TenantAccess, hash_key

OPS_KEY = "ops-" + secrets.token_hex(20)
LEGAL_KEY = "legal-" + secrets.token_hex(20)
FINANCE_KEY = "fin-" + secrets.token_hex(20)
PROMPT = "Peer routing"


def _bearer(key: str = OPS_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def access_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("peer-access") / "access.json"
    access = AccessFile(
        grants=[KeyGrant(sha256=hash_key(OPS_KEY), tenants=("*",), base=True, name="ops")],
        tenants={"legal": TenantAccess(key_sha256=(hash_key(LEGAL_KEY),)),
                 "finance": TenantAccess(key_sha256=(hash_key(FINANCE_KEY),))})
    path.write_text(access.model_dump_json())
    return path


@pytest.fixture(scope="module")
def pods(start_server, tiny_model_dir: Path, adapter_root: Path,
         access_path: Path) -> dict[str, ServerProcess]:
    def start(tenants: list[str]) -> ServerProcess:
        return start_server("--model", str(tiny_model_dir), "--quantization", "none",
                            "--log-format", "text", "--auth", "keys",
                            "--access-file", str(access_path), "--route-retry-s", "30",
                            *preload_flags(adapter_root, tenants))

    return {"a": start(["legal"]), "b": start(["finance", "retail"]),
            "c": start(["retail", "medical"])}


def _holder(pod: str, server: ServerProcess | str, residency: str = "device",
            queue_depth: int = 0, versions: tuple[str, ...] = ("v1",)) -> dict:
    url = server if isinstance(server, str) else server.url
    return {"pod": pod, "url": url, "versions": list(versions), "residency": residency,
            "queue_depth": queue_depth, "running": 0}


def _put_table(server: ServerProcess, tenants: dict[str, list[dict]],
               reasons: dict[str, str] | None = None) -> dict:
    table = {"tenants": [{"tenant": t, "holders": h, "reason": (reasons or {}).get(t)}
                         for t, h in tenants.items()]}
    r = httpx.put(f"{server.url}/admin/peers", json=table, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["fingerprint"] == PeerTable.model_validate(table).fingerprint()
    return r.json()


def _gen(url: str, model: str, route: str = "/generate", key: str = OPS_KEY,
         stream: bool = False, tokens: int = 4) -> httpx.Response:
    if route == "/generate":
        body: dict = {"tenant_id": model, "prompt": PROMPT, "max_new_tokens": tokens}
    elif route == "/v1/completions":
        body = {"model": model, "prompt": PROMPT, "max_tokens": tokens}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": tokens}
    body.update({"ignore_eos": True, "temperature": 0, "stream": stream})
    return httpx.post(url + route, json=body, headers=_bearer(key), timeout=60)


def _generated(server: ServerProcess, tenant: str) -> float:
    return metric_value(metrics(server.url), "loramux_completion_tokens_total", tenant=tenant)


def _peer(server: ServerProcess, outcome: str) -> float:
    return metric_value(metrics(server.url), "loramux_peer_forwarded_requests_total",
                        outcome=outcome)


def _events(r: httpx.Response) -> list[dict]:
    lines = [x for x in r.text.splitlines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", r.text
    return [json.loads(x[6:]) for x in lines[:-1]]


def test_a_tenant_held_elsewhere_is_answered_by_its_holder(pods) -> None:
    a, b, c = pods["a"], pods["b"], pods["c"]
    _put_table(a, {"finance": [_holder("b", b)], "medical": [_holder("c", c)]})
    before = _generated(b, "finance")
    forwarded = _peer(a, "forwarded")

    r = _gen(a.url, "finance")
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == "finance@v1"
    assert r.headers["x-loramux-routed"] == "peer"
    assert not [v for v in r.headers.values() if b.url in v or c.url in v]
    assert _gen(a.url, "finance@v1").json()["adapter"] == "finance@v1"
    assert _gen(a.url, "medical").json()["adapter"] == "medical@v1"

    for route in ("/v1/completions", "/v1/chat/completions"):
        r = _gen(a.url, "finance", route)
        assert r.status_code == 200, r.text
        assert r.json()["adapter"] == "finance@v1" and r.headers["x-loramux-routed"] == "peer"
        assert r.json()["usage"]["completion_tokens"] == 4
    for route in ("/generate", "/v1/completions", "/v1/chat/completions"):
        r = _gen(a.url, "finance", route, stream=True)
        assert r.status_code == 200, r.text
        assert r.headers["x-loramux-routed"] == "peer"
        assert r.headers["content-type"].startswith("text/event-stream")
        assert any(e.get("adapter") == "finance@v1" for e in _events(r)), (route, r.text)

    # The holder did the work (7 requests of 4 tokens); the forwarding pod counts the
    # forwards without a tenant label, and not as the tenant's tokens (the pool's sum of
    # a tenant's tokens decides hot-tenant promotion: no double counting).
    assert _generated(b, "finance") == before + 7 * 4
    assert _peer(a, "forwarded") == forwarded + 8
    a_metrics = metrics(a.url)
    assert metric_value(a_metrics, "loramux_forwarded_tokens_total", tenant="finance") == 0
    assert metric_value(a_metrics, "loramux_completion_tokens_total", tenant="finance") == 0
    # A tenant held here is served here.
    local = _gen(a.url, "legal")
    assert local.status_code == 200 and "x-loramux-routed" not in local.headers
    # A client error the holder finds (every holder would) is relayed, not retried or
    # turned into a 503, streaming or not.
    for stream in (False, True):
        r = _gen(a.url, "finance", "/v1/completions", stream=stream, tokens=10**6)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "max_tokens_too_large"
        assert r.headers["x-loramux-routed"] == "peer"
    # A pinned version no holder has is a 503, never another version or the base.
    r = _gen(a.url, "finance@v9")
    assert r.status_code == 503 and r.json()["error"]["code"] == "tenant_unavailable"
    assert "v9" in r.json()["error"]["message"]


def test_the_best_residency_then_the_least_loaded_holder_is_picked(pods) -> None:
    a, b, c = pods["a"], pods["b"], pods["c"]

    def served_by() -> str:
        counts = {name: _generated(pods[name], "retail") for name in ("b", "c")}
        r = _gen(a.url, "retail")
        assert r.status_code == 200 and r.json()["adapter"] == "retail@v1", r.text
        after = {name: _generated(pods[name], "retail") for name in ("b", "c")}
        changed = [name for name in counts if after[name] != counts[name]]
        assert len(changed) == 1, (counts, after)
        return changed[0]

    _put_table(a, {"retail": [_holder("b", b, "disk"), _holder("c", c, "device")]})
    assert served_by() == "c"
    _put_table(a, {"retail": [_holder("b", b, "device"), _holder("c", c, "host")]})
    assert served_by() == "b"
    # Same tier: the less loaded holder (its reported queue and running rows).
    _put_table(a, {"retail": [_holder("b", b, "host", queue_depth=6),
                              _holder("c", c, "host", queue_depth=1)]})
    assert served_by() == "c"
    # Residency comes before load.
    _put_table(a, {"retail": [_holder("b", b, "device", queue_depth=50),
                              _holder("c", c, "host")]})
    assert served_by() == "b"


def test_no_holder_is_a_503_with_the_reason_and_unknown_tenants_stay_404(pods) -> None:
    a = pods["a"]
    _put_table(a, {"travel": []},
               reasons={"travel": "no Ready placement: pod-2 failed to load travel@v1"})
    for route in ("/generate", "/v1/completions", "/v1/chat/completions"):
        r = _gen(a.url, "travel", route)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "tenant_unavailable"
        assert "travel" in error["message"] and "failed to load" in error["message"]
        assert r.headers["retry-after"]
    # Not in the table and not here: the existing answer (404), not a 503.
    r = _gen(a.url, "support")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_tables_that_point_at_each_other_do_not_loop(pods) -> None:
    """b's table says c holds legal, c's says b does: neither does. The request goes one
    hop (b -> c); c does not forward a forwarded request again, so b gets a 503 from c,
    skips it and answers 503 itself."""
    a, b, c = pods["a"], pods["b"], pods["c"]
    _put_table(b, {"legal": [_holder("c", c)]})
    _put_table(c, {"legal": [_holder("b", b)]})
    before = {name: (_peer(pods[name], "forwarded"), _peer(pods[name], "not_held"))
              for name in ("b", "c")}
    r = _gen(b.url, "legal")
    assert r.status_code == 503 and r.json()["error"]["code"] == "tenant_unavailable", r.text
    assert _peer(b, "holder_failed") >= 1
    assert _peer(c, "not_held") == before["c"][1] + 1  # one hop, refused
    assert _peer(c, "forwarded") == before["c"][0]  # and never forwarded on
    assert _peer(b, "not_held") == before["b"][1]  # nothing came back to b
    # A table that lists the server itself: one hop to itself, then a 503, no loop.
    _put_table(b, {"legal": [_holder("b", b)]})
    r = _gen(b.url, "legal")
    assert r.status_code == 503, r.text
    # With a correct entry next to the wrong one, the request still succeeds.
    _put_table(b, {"legal": [_holder("c", c, "device"), _holder("a", a, "disk")]})
    r = _gen(b.url, "legal")
    assert r.status_code == 200 and r.json()["adapter"] == "legal@v1", r.text
    _put_table(b, {})
    _put_table(c, {})


def test_keys_are_checked_before_forwarding_and_again_at_the_holder(pods) -> None:
    a, b = pods["a"], pods["b"]
    _put_table(a, {"finance": [_holder("b", b)]})
    before, forwarded = _generated(b, "finance"), _peer(a, "forwarded")
    for route in ("/generate", "/v1/completions", "/v1/chat/completions"):
        r = _gen(a.url, "finance", route, key=LEGAL_KEY)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
        assert "x-loramux-routed" not in r.headers
    assert _peer(a, "forwarded") == forwarded  # nothing was forwarded
    assert _generated(b, "finance") == before
    # No key at all: 401 at the first pod.
    r = httpx.post(a.url + "/generate", json={"tenant_id": "finance", "prompt": PROMPT})
    assert r.status_code == 401
    # A key granting the tenant works through the hop (the holder checks it again).
    for route in ("/generate", "/v1/chat/completions"):
        r = _gen(a.url, "finance", route, key=FINANCE_KEY)
        assert r.status_code == 200 and r.json()["adapter"] == "finance@v1", r.text
        assert r.headers["x-loramux-routed"] == "peer"
    assert _generated(b, "finance") == before + 2 * 4


def test_admin_peers_validation_and_published_load(pods) -> None:
    a = pods["a"]
    view = _put_table(a, {"finance": [_holder("b", pods["b"])]})
    got = httpx.get(f"{a.url}/admin/peers", timeout=10).json()
    assert got["fingerprint"] == view["fingerprint"]
    assert got["tenants"][0]["tenant"] == "finance"
    bad = [
        {"tenants": [{"tenant": "Bad_Name", "holders": []}]},
        {"tenants": [{"tenant": "x", "holders": [{"pod": "p", "url": "ftp://h"}]}]},
        {"tenants": [{"tenant": "x", "holders": [], "extra": 1}]},
        {"tenants": [{"tenant": "x", "holders": [
            {"pod": "p", "url": "http://127.0.0.1:1", "residency": "cloud"}]}]},
        {"tenants": "finance"},
    ]
    for body in bad:
        r = httpx.put(f"{a.url}/admin/peers", json=body, timeout=10)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["message"]
    assert httpx.get(f"{a.url}/admin/peers", timeout=10).json()["fingerprint"] == \
        view["fingerprint"]  # a refused table leaves the old one in place
    # The admin gate: not through a proxy without a token.
    r = httpx.put(f"{a.url}/admin/peers", json={"tenants": []},
                  headers={"X-Forwarded-For": "10.0.0.1"}, timeout=10)
    assert r.status_code == 403

    listing = httpx.get(f"{a.url}/admin/adapters", timeout=10).json()
    assert listing["queue_depth"] == 0 and listing["running"] == 0  # idle now
    assert _gen(a.url, "legal").status_code == 200
    text = metrics(a.url)
    # Device-resident tenants (and those with requests in flight) have a series; the
    # tenants this server does not hold have none.
    assert 'loramux_tenant_in_flight{residency="device",tenant="legal"} 0.0' in text
    assert 'tenant="finance"' not in "\n".join(
        x for x in text.splitlines() if x.startswith("loramux_tenant_in_flight"))


def test_a_dead_holder_is_skipped_without_failed_requests(pods) -> None:
    """A client loop on a for retail (c listed first, on the device) while c dies: every
    request succeeds, answered by c and then by b. Runs last: it stops c."""
    a, b, c = pods["a"], pods["b"], pods["c"]
    _put_table(a, {"retail": [_holder("c", c, "device"), _holder("b", b, "disk")]})
    results: list[tuple[int, str]] = []
    stop = False

    async def client_loop() -> None:
        async with httpx.AsyncClient(timeout=60, headers=_bearer()) as client:
            i = 0
            while not stop:
                i += 1
                stream = i % 2 == 0
                r = await client.post(f"{a.url}/v1/completions", json={
                    "model": "retail", "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True,
                    "stream": stream})
                if r.status_code != 200:
                    results.append((r.status_code, r.text))
                elif stream:
                    adapters = {e.get("adapter") for e in _events(r)}
                    results.append((200, "retail@v1" if adapters == {"retail@v1"}
                                    else str(adapters)))
                else:
                    results.append((200, r.json()["adapter"]))

    async def scenario() -> None:
        nonlocal stop
        task = asyncio.create_task(client_loop())
        while len(results) < 4:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(c.stop)
        count = len(results)
        while len(results) < count + 6:
            await asyncio.sleep(0.05)
        stop = True
        await task

    before_b = _generated(b, "retail")
    asyncio.run(asyncio.wait_for(scenario(), 120))
    assert results and all(r == (200, "retail@v1") for r in results), results
    assert _generated(b, "retail") > before_b  # b took over
    peers = httpx.get(f"{a.url}/admin/peers", timeout=10).json()["tenants"][0]["holders"]
    dead = next(h for h in peers if h["pod"] == "c")
    assert dead["healthy"] is False and dead["last_error"] and dead["in_flight"] == 0
    assert next(h for h in peers if h["pod"] == "b")["in_flight"] == 0
