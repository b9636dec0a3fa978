"""Scale-out routing (issue 17) between real `loramux serve` processes on loopback: a pool
pod forwards a request for a tenant it does not hold to a peer that holds it, picked from
the pool's placement table (``PUT /admin/peers``) by residency, then load.

Three servers, each holding different tenants, all with ``--auth keys`` and one access file
(an every-tenant key, a key for ``legal`` only, a key for ``finance`` only):

- ``a``: legal
- ``b``: finance, retail, medical
- ``c``: retail, medical (stopped by the last test: a holder that dies)

``medical`` may use 20 tokens per minute on each server (the access file): a holder over it
answers 429, a busy holder that is alive.

``a``, ``b`` and ``c`` run with ``--peer-failover-s 0`` (no failover wait: a 503 as soon as
no holder answers). ``d`` holds nothing and waits up to ``FAILOVER_S`` for a holder
(``--peer-failover-s``), with a short hang probe (``--peer-hang-timeout-s``): the failover
tests send their requests to it. A holder that is killed is a server of its own (``finance``
again), started and SIGKILLed by its test.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import helpers
from conftest import ServerProcess, preload_flags
from helpers import metric_value, metrics
from loramux.contracts import (
    AccessFile,
    KeyGrant,
    PeerTable,
    TenantAccess,
    TenantLimits,
    hash_key,
)

OPS_KEY = "ops-" + secrets.token_hex(20)
LEGAL_KEY = "legal-" + secrets.token_hex(20)
FINANCE_KEY = "fin-" + secrets.token_hex(20)
PROMPT = "Peer routing"
FAILOVER_S = 8.0
HANG_S = 0.5
MAX_WAITING = 3  # d's --max-queue, which bounds the requests waiting for a holder too


def _bearer(key: str = OPS_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def access_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("peer-access") / "access.json"
    access = AccessFile(
        grants=[KeyGrant(sha256=hash_key(OPS_KEY), tenants=("*",), base=True, name="ops")],
        tenants={"legal": TenantAccess(key_sha256=(hash_key(LEGAL_KEY),)),
                 "finance": TenantAccess(key_sha256=(hash_key(FINANCE_KEY),)),
                 "medical": TenantAccess(limits=TenantLimits(tokens_per_minute=20))})
    path.write_text(access.model_dump_json())
    return path


@pytest.fixture(scope="module")
def pods(start_server, tiny_model_dir: Path, adapter_root: Path,
         access_path: Path) -> dict[str, ServerProcess]:
    def start(tenants: list[str], *flags: str) -> ServerProcess:
        return start_server("--model", str(tiny_model_dir), "--quantization", "none",
                            "--log-format", "text", "--auth", "keys",
                            "--access-file", str(access_path), "--route-retry-s", "30",
                            *flags, *preload_flags(adapter_root, tenants))

    no_wait = ("--peer-failover-s", "0")
    return {"a": start(["legal"], *no_wait), "b": start(["finance", "retail", "medical"], *no_wait),
            "c": start(["retail", "medical"], *no_wait),
            "d": start([], "--peer-failover-s", str(FAILOVER_S),
                       "--peer-hang-timeout-s", str(HANG_S), "--max-queue", str(MAX_WAITING))}


def _holder(pod: str, server: ServerProcess | str, residency: str = "device",
            queue_depth: int = 0, versions: tuple[str, ...] = ("v1",)) -> dict:
    url = server if isinstance(server, str) else server.url
    return {"pod": pod, "url": url, "versions": list(versions), "residency": residency,
            "queue_depth": queue_depth, "running": 0}


def _put_table(server: ServerProcess, tenants: dict[str, list[dict]],
               reasons: dict[str, str] | None = None, failed: frozenset[str] = frozenset()
               ) -> dict:
    table = {"tenants": [{"tenant": t, "holders": h, "reason": (reasons or {}).get(t),
                          "failed": t in failed}
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
    """``a`` does not wait (``--peer-failover-s 0``): a 503 at once, whatever the reason.
    ``d`` waits for a reason that may pass, but not when every placement Failed."""
    a, d = pods["a"], pods["d"]
    passing = "no Ready placement: travel@v1 is Downloading on pod-2"
    failed = ("no Ready placement: travel@v1 is Failed on pod-2 (invalid_adapter: rank 512 "
              "exceeds 64), Failed on pod-3 (invalid_adapter: rank 512 exceeds 64)")
    _put_table(a, {"travel": []}, reasons={"travel": passing})
    _put_table(d, {"travel": []}, reasons={"travel": failed}, failed=frozenset({"travel"}))
    for server, words in ((a, "Downloading on pod-2"), (d, "Failed on pod-2")):
        waits = _peer(server, "failover_wait")
        for route in ("/generate", "/v1/completions", "/v1/chat/completions"):
            started = time.monotonic()
            r = _gen(server.url, "travel", route)
            assert time.monotonic() - started < FAILOVER_S / 2, "waited for a new placement"
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "tenant_unavailable"
            assert "travel" in error["message"] and words in error["message"]
            assert r.headers["retry-after"]
        assert _peer(server, "failover_wait") == waits
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


def _call(url: str, model: str, stream: bool, timeout: float = 60) -> tuple[int, str, float]:
    """(status, the adapter that answered or the error body, seconds) of one completion."""
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", headers=_bearer(), timeout=timeout, json={
        "model": model, "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True,
        "temperature": 0, "stream": stream})
    took = time.monotonic() - started
    if r.status_code != 200:
        return r.status_code, r.text, took
    if stream:
        adapters = {e.get("adapter") for e in _events(r)}
        return 200, ",".join(sorted(map(str, adapters))), took
    return 200, r.json()["adapter"], took


def test_the_only_holder_killed_requests_wait_for_the_new_table(
        pods, start_server, tiny_model_dir: Path, adapter_root: Path,
        access_path: Path) -> None:
    """``finance``'s only holder in ``d``'s table is SIGKILLed. Requests to ``d`` wait (no
    503) until the table names a live holder (``b``, PUT while they wait, as the operator
    does once it re-placed the tenant), then get ``finance@v1`` from it, streaming or not."""
    b, d = pods["b"], pods["d"]
    victim = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--log-format", "text", "--auth", "keys",
                          "--access-file", str(access_path),
                          *preload_flags(adapter_root, ["finance"]))
    _put_table(d, {"finance": [_holder("victim", victim)]})
    assert _call(d.url, "finance", False)[:2] == (200, "finance@v1")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    waits, before = _peer(d, "failover_wait"), _generated(b, "finance")

    with ThreadPoolExecutor(max_workers=4) as pool:
        calls = [pool.submit(_call, d.url, "finance", stream) for stream in (False, True)]
        helpers.wait(lambda: _peer(d, "failover_wait") == waits + 2, "both requests waiting",
                     FAILOVER_S / 2, 0.05)
        assert not any(c.done() for c in calls)
        _put_table(d, {"finance": [_holder("victim", victim.url, "device"),  # still listed
                                   _holder("b", b, "disk")]})
        results = [c.result(30) for c in calls]
    assert [r[:2] for r in results] == [(200, "finance@v1")] * 2, results
    assert all(took < FAILOVER_S for *_, took in results), results
    assert _generated(b, "finance") == before + 2 * 4  # b answered them
    assert _peer(d, "failover_expired") == 0
    # The dead holder's breaker is open: the next request goes to b at once.
    assert _call(d.url, "finance", False)[:2] == (200, "finance@v1")
    view = httpx.get(f"{d.url}/admin/peers", timeout=10).json()["tenants"][0]["holders"]
    assert next(h for h in view if h["pod"] == "victim")["healthy"] is False


def test_the_failover_wait_ends_with_a_503_or_when_the_client_leaves(pods) -> None:
    """No live holder comes: after ``FAILOVER_S`` the answer is a 503 naming the reason (a
    holder that failed, or the table's reason that may pass), never a hang. A client that
    disconnects meanwhile ends its wait. No more than ``MAX_WAITING`` requests wait: the
    next one gets its 503 at once."""
    d = pods["d"]
    dead = f"http://127.0.0.1:{helpers.free_port()}"  # nothing listens: like a killed process
    _put_table(d, {"finance": [_holder("gone", dead)], "travel": []},
               reasons={"travel": "no Ready placement: travel@v1 is Pending on pod-9"})
    expired, gone = _peer(d, "failover_expired"), _peer(d, "client_gone")
    # a client that gives up after 1 s (its read timeout)
    with pytest.raises(httpx.ReadTimeout):
        _call(d.url, "travel", False, timeout=1)
    helpers.wait(lambda: _peer(d, "client_gone") == gone + 1, "the wait of a client that "
                 "left ended", 5, 0.1)
    waits = _peer(d, "failover_wait")
    with ThreadPoolExecutor(max_workers=4) as pool:
        calls = [pool.submit(_call, d.url, model, stream)
                 for model, stream in (("finance", False), ("finance", True), ("travel", True))]
        helpers.wait(lambda: _peer(d, "failover_wait") == waits + MAX_WAITING,
                     "the requests waiting", FAILOVER_S / 2, 0.05)
        status, text, took = _call(d.url, "travel", False)
        assert status == 503 and "too many requests already wait" in text, text
        assert took < FAILOVER_S / 2
        results = [c.result(FAILOVER_S + 30) for c in calls]
    for (status, text, took), words in zip(results, ("none of its 1 holder(s) could answer",
                                                     "none of its 1 holder(s) could answer",
                                                     "Pending on pod-9"), strict=True):
        assert status == 503, text
        error = json.loads(text)["error"]
        assert error["code"] == "tenant_unavailable"
        assert words in error["message"] and f"waited {FAILOVER_S:g}s" in error["message"]
        assert FAILOVER_S - 0.5 <= took < FAILOVER_S + 5, took
    assert _peer(d, "failover_expired") == expired + 3


def test_a_hanging_holder_is_skipped_within_the_probe_bound(pods) -> None:
    """A holder whose socket accepts but never answers (a wedged process) and is ranked
    first (device): after ``HANG_S`` without headers it is probed, does not answer that
    either, and the request goes to the next holder; a busy holder that answers the probe
    keeps a request that takes longer than the probe interval."""
    b, d = pods["b"], pods["d"]
    with SilentServer() as hung:
        _put_table(d, {"retail": [_holder("hung", hung, "device"), _holder("b", b, "disk")]})
        failed = _peer(d, "holder_failed")
        for stream in (False, True):
            status, adapter, took = _call(d.url, "retail", stream)
            assert (status, adapter) == (200, "retail@v1")
            if not stream:  # the first one met the hung holder; its breaker is open now
                assert 2 * HANG_S - 0.2 < took < 2 * HANG_S + 5, took
        assert _peer(d, "holder_failed") == failed + 1
        view = httpx.get(f"{d.url}/admin/peers", timeout=10).json()["tenants"][0]["holders"]
        row = next(h for h in view if h["pod"] == "hung")
        assert row["healthy"] is False and "hung" in row["last_error"], row
    # A non-streaming generation on a live holder that outlasts the probe interval and the
    # probe's own bound (the holder answered the probe) is not cut. Longer until it does:
    # how long a token takes depends on the machine.
    _put_table(d, {"retail": [_holder("b", b)]})
    for tokens in (48, 192, 768):
        started = time.monotonic()
        r = _gen(d.url, "retail", "/v1/completions", tokens=tokens)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == tokens, r.text
        assert _peer(d, "holder_failed") == failed + 1
        if time.monotonic() - started > 2 * HANG_S + 0.5:
            break
    else:
        raise AssertionError("no generation outlasted the probe bound")


def test_a_busy_holder_is_passed_over_and_the_last_ones_429_relayed(pods) -> None:
    """``c`` has spent ``medical``'s tokens per minute: its 429 says busy, not gone. ``d``
    tries the next holder (no breaker for ``c``); with ``c`` the only holder, its 429 (and
    ``Retry-After``) is the answer at once, not a failover wait."""
    b, c, d = pods["b"], pods["c"], pods["d"]
    spend = _gen(c.url, "medical", "/v1/completions", tokens=24)  # served by c itself
    assert spend.status_code == 200 and "x-loramux-routed" not in spend.headers, spend.text
    assert _gen(c.url, "medical").status_code == 429
    _put_table(d, {"medical": [_holder("c", c, "device"), _holder("b", b, "disk")]})
    busy, waits, before = _peer(d, "holder_busy"), _peer(d, "failover_wait"), \
        _generated(b, "medical")
    for stream in (False, True):
        assert _call(d.url, "medical", stream)[:2] == (200, "medical@v1")
    assert _peer(d, "holder_busy") == busy + 2  # c was tried each time: no breaker
    assert _generated(b, "medical") == before + 2 * 4
    _put_table(d, {"medical": [_holder("c", c)]})
    for stream in (False, True):
        status, text, took = _call(d.url, "medical", stream)
        assert status == 429, text
        assert json.loads(text)["error"]["code"] == "tenant_tokens_per_minute"
        assert took < FAILOVER_S / 2
    assert _peer(d, "failover_wait") == waits


class SilentServer:
    """A TCP server on loopback that accepts connections and never answers (a hung
    process: the kernel accepts for it). Its URL while the block runs."""

    def __enter__(self) -> str:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                self.conns.append(self.sock.accept()[0])
            except TimeoutError:
                continue

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        for conn in self.conns:
            conn.close()
        self.sock.close()


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
