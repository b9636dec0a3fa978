"""Per-tenant API keys on a real `loramux serve` process (tiny fp32 model, loopback).

The server runs with ``--auth keys`` and an access file holding key *hashes*; tenant access
is also pushed through the admin API, as the sidecar does from a LoraAdapter's
``spec.access``. Each access rule has its test: 401 without a key or with an unknown one,
403 for a key of another tenant (also for a tenant that does not exist here), the base model
only with a base grant, a filtered ``/v1/models``, rotation through the access file without a
restart, and keys never appearing in logs, admin views or metrics.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import preload_flags
from helpers import metric_value
from loramux.contracts import AccessFile, KeyGrant, TenantAccess, hash_key
from loramux.inference.routing import UsageReader

OPS_KEY = "ops-" + secrets.token_hex(20)  # every tenant and the base
LEGAL_KEY = "legal-" + secrets.token_hex(20)
FINANCE_KEY = "fin-" + secrets.token_hex(20)
BASE_KEY = "base-" + secrets.token_hex(20)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _write(path: Path, access: AccessFile) -> None:
    """Write like the kubelet swaps a mounted Secret: a new file renamed into place."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(access.model_dump_json())
    os.replace(tmp, path)


def _file(legal_key: str = LEGAL_KEY) -> AccessFile:
    return AccessFile(
        grants=[KeyGrant(sha256=hash_key(OPS_KEY), tenants=("*",), base=True, name="ops"),
                KeyGrant(sha256=hash_key(BASE_KEY), base=True, name="base-only")],
        tenants={"legal": TenantAccess(key_sha256=(hash_key(legal_key),))})


@pytest.fixture(scope="module")
def access_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("access") / "access.json"
    _write(path, _file())
    return path


@pytest.fixture(scope="module")
def keyed(start_server, tiny_model_dir: Path, adapter_root: Path, access_path: Path):
    return start_server(
        "--model", str(tiny_model_dir), "--quantization", "none", "--auth", "keys",
        "--access-file", str(access_path), "--log-format", "json",
        *preload_flags(adapter_root, ["legal", "finance"]))


def _gen(url: str, model: str, key: str | None, route: str = "/generate") -> httpx.Response:
    headers = _bearer(key) if key is not None else {}
    if route == "/generate":
        body = {"tenant_id": model, "prompt": "hello", "max_new_tokens": 2, "temperature": 0}
    elif route == "/v1/completions":
        body = {"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2, "temperature": 0}
    return httpx.post(url + route, json=body, headers=headers, timeout=60)


def _code(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["code"]


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_no_key_or_an_unknown_key_is_401_on_every_generation_route(keyed, route):
    r = _gen(keyed.url, "legal", None, route)
    assert _code(r, 401) == "missing_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert _code(_gen(keyed.url, "legal", "not-a-key-" + "x" * 30, route), 401) == \
        "invalid_api_key"
    # Not a bearer scheme at all.
    r = httpx.post(keyed.url + route, json={}, headers={"Authorization": f"Basic {LEGAL_KEY}"})
    assert _code(r, 401) == "missing_api_key"


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_a_tenant_key_calls_its_tenant_and_gets_403_elsewhere(keyed, route):
    ok = _gen(keyed.url, "legal", LEGAL_KEY, route)
    assert ok.status_code == 200, ok.text
    assert _gen(keyed.url, "legal@v1", LEGAL_KEY, route).status_code == 200
    assert _code(_gen(keyed.url, "finance", LEGAL_KEY, route), 403) == "forbidden"
    # A tenant that is not here is a 403 too: a 404 would tell a stranger who lives here.
    assert _code(_gen(keyed.url, "ghost", LEGAL_KEY, route), 403) == "forbidden"
    assert _code(_gen(keyed.url, "Not A Name!", LEGAL_KEY, route), 403) == "forbidden"


def test_the_base_model_needs_a_key_that_grants_it(keyed):
    base = httpx.get(keyed.url + "/v1/models", headers=_bearer(OPS_KEY)).json()["base_model"]
    assert _code(_gen(keyed.url, base, LEGAL_KEY), 403) == "forbidden"
    assert _gen(keyed.url, base, BASE_KEY).status_code == 200
    assert _code(_gen(keyed.url, "legal", BASE_KEY), 403) == "forbidden"
    # The every-tenant key reaches everything, and an invalid name gets its own answer.
    assert _gen(keyed.url, base, OPS_KEY).status_code == 200
    assert _gen(keyed.url, "finance", OPS_KEY).status_code == 200
    assert _code(_gen(keyed.url, "Not A Name!", OPS_KEY), 422) == "invalid_name"


def test_models_lists_only_what_the_key_may_use(keyed):
    def ids(key: str) -> set[str]:
        r = httpx.get(keyed.url + "/v1/models", headers=_bearer(key))
        assert r.status_code == 200, r.text
        return {m["id"] for m in r.json()["data"]}

    assert _code(httpx.get(keyed.url + "/v1/models"), 401) == "missing_api_key"
    assert ids(LEGAL_KEY) == {"legal", "legal@v1"}
    base_only = ids(BASE_KEY)
    assert len(base_only) == 1 and not base_only & {"legal", "finance"}
    assert ids(OPS_KEY) == {"legal", "legal@v1", "finance", "finance@v1"} | base_only


def test_admin_pushed_access_grants_and_revokes_without_restart(keyed):
    admin = keyed.url + "/admin"
    assert _code(_gen(keyed.url, "finance", FINANCE_KEY), 401) == "invalid_api_key"
    access = TenantAccess(key_sha256=(hash_key(FINANCE_KEY),), weight=3)
    r = httpx.put(f"{admin}/tenants/finance/access", json=access.model_dump(mode="json"))
    assert r.status_code == 200, r.text
    view = r.json()
    assert view == {**view, "tenant": "finance", "keys": 1, "weight": 3.0, "source": "admin",
                    "fingerprint": access.fingerprint()}
    assert _gen(keyed.url, "finance", FINANCE_KEY).status_code == 200
    assert _code(_gen(keyed.url, "legal", FINANCE_KEY), 403) == "forbidden"
    listed = httpx.get(f"{admin}/access").json()
    assert listed["auth"] == "keys"
    rows = {row["tenant"]: row for row in listed["tenants"]}
    assert rows["finance"]["source"] == "admin" and rows["legal"]["source"] == "file"
    # Hashes never leave the server either; only counts and fingerprints.
    assert hash_key(FINANCE_KEY) not in json.dumps(listed)

    assert httpx.delete(f"{admin}/tenants/finance/access").status_code == 200
    assert _code(_gen(keyed.url, "finance", FINANCE_KEY), 401) == "invalid_api_key"
    assert _code(httpx.delete(f"{admin}/tenants/finance/access"), 404) == "not_found"


@pytest.mark.parametrize("body", [
    {"key_sha256": ["not-hex"]},
    {"key_sha256": [], "weight": 0},
    {"key_sha256": [], "limits": {"max_concurrent": 0}},
    {"key_sha256": [], "surprise": 1},
])
def test_bad_access_bodies_are_422(keyed, body):
    r = httpx.put(f"{keyed.url}/admin/tenants/finance/access", json=body)
    assert r.status_code == 422, r.text
    r = httpx.put(f"{keyed.url}/admin/tenants/Bad_Name/access", json={"key_sha256": []})
    assert _code(r, 422) == "invalid_name"


def test_rotating_keys_through_the_access_file_takes_effect_without_restart(keyed,
                                                                          access_path: Path):
    new_key = "legal-rotated-" + secrets.token_hex(20)
    pid = keyed.proc.pid
    _write(access_path, _file(legal_key=new_key))
    try:
        deadline_ok = _wait(lambda: _gen(keyed.url, "legal", new_key).status_code == 200)
        assert deadline_ok, "the rotated key was not accepted"
        assert _code(_gen(keyed.url, "legal", LEGAL_KEY), 401) == "invalid_api_key"
        # A broken file keeps the last good content (nothing is lost, nobody is locked out).
        access_path.write_text("{not json")
        # The server looks at the file when requests come (at most once a second).
        assert _wait(lambda: _gen(keyed.url, "legal", new_key).status_code == 200
                     and "invalid; keeping its last good" in keyed.log())
        assert keyed.proc.pid == pid and keyed.proc.poll() is None
    finally:
        _write(access_path, _file())
        assert _wait(lambda: _gen(keyed.url, "legal", LEGAL_KEY).status_code == 200)


def _wait(check, timeout: float = 15.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_keys_never_appear_in_logs_views_or_metrics(keyed):
    # Exercise success, 401 and 403 first, so every path has logged what it logs.
    _gen(keyed.url, "legal", LEGAL_KEY)
    _gen(keyed.url, "finance", LEGAL_KEY)
    _gen(keyed.url, "legal", "wrong-" + LEGAL_KEY)
    shown = (keyed.log() + httpx.get(keyed.url + "/admin/access").text
             + httpx.get(keyed.url + "/admin/metrics").text
             + httpx.get(keyed.url + "/metrics").text
             + httpx.get(keyed.url + "/admin/adapters").text)
    for key in (OPS_KEY, LEGAL_KEY, FINANCE_KEY, BASE_KEY):
        assert key not in shown
        assert hash_key(key) not in shown
    metrics = httpx.get(keyed.url + "/admin/metrics").text
    assert metric_value(metrics, "loramux_auth_failures_total", status="401") >= 1
    assert metric_value(metrics, "loramux_auth_failures_total", status="403") >= 1


def test_public_metrics_are_summed_over_tenants(keyed):
    _gen(keyed.url, "legal", LEGAL_KEY)
    public = httpx.get(keyed.url + "/metrics").text
    per_tenant = httpx.get(keyed.url + "/admin/metrics").text
    assert 'tenant="' not in public
    assert 'tenant="legal"' in per_tenant
    total = metric_value(per_tenant, "loramux_requests_total", outcome="ok")
    assert total >= 1
    assert metric_value(public, "loramux_requests_total", outcome="ok") == total


def test_metrics_port_serves_per_tenant_series_and_nothing_else(start_server, tiny_model_dir,
                                                                adapter_root):
    server = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--metrics-port", "0", "--log-format", "text",
                          *preload_flags(adapter_root, ["legal"]))
    match = re.search(r"per-tenant metrics listening on (http://127\.0\.0\.1:\d+)", server.log())
    assert match, server.log()[-2000:]
    metrics_url = match.group(1)
    assert _gen(server.url, "legal", None).status_code == 200  # --auth none (the test env)
    assert 'tenant="legal"' in httpx.get(metrics_url + "/metrics").text
    assert 'tenant="' not in httpx.get(server.url + "/metrics").text
    for path in ("/generate", "/v1/models", "/admin/adapters", "/healthz"):
        assert httpx.get(metrics_url + path).status_code == 404, path
    assert "AUTH IS OFF" in server.log()


def test_a_bad_access_file_stops_start_up_with_one_line(tmp_path: Path, tiny_model_dir):
    bad = tmp_path / "access.json"
    bad.write_text(json.dumps({"grants": [{"sha256": "short", "tenants": ["*"]}]}))
    done = subprocess.run(
        [sys.executable, "-P", "-m", "loramux.cli", "serve", "--model", str(tiny_model_dir),
         "--quantization", "none", "--auth", "keys", "--access-file", str(bad), "--port", "0"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "access file" in done.stderr and "grants.0.sha256" in done.stderr
    assert "Traceback" not in done.stderr


def test_usage_reader_counts_forwarded_tokens_from_json_and_split_sse():
    body = UsageReader()
    body.body(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}')
    assert body.tokens == 7
    stream = UsageReader()
    events = (b'data: {"text": "a"}\n\n'
              b'data: {"tenant_id": "x", "usage": {"prompt_tokens": 5, "completion_tokens": 6,'
              b' "total_tokens": 11}}\n\ndata: [DONE]\n\n')
    for i in range(0, len(events), 7):  # chunk boundaries anywhere
        stream.feed(events[i:i + 7])
    assert stream.tokens == 11
    junk = UsageReader()
    junk.feed(b"data: {not json, \"usage\": 1}\n\n")
    junk.body(b"<html>")
    assert junk.tokens is None
