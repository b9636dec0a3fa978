"""A canary split on one real server: the admin API, bad input, and who answers what.

``PUT /admin/tenants/{t}/split`` is what the sidecar calls for a canary (tests of the whole
rollout: test_canary_e2e.py). Here the server alone: a split sends the bare tenant's share
of split keys to the canary, the same key always to the same version, ``tenant@version``
still pins, each version counts its own outcomes, and bad input is a 4xx with a reason.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from helpers import wait
from loramux.inference.tenants import in_canary_share


@pytest.fixture(scope="module")
def server(fp32_server, adapter_root: Path):
    """fp32_server (every tenant's v1 preloaded) with legal@v2 loaded beside legal@v1."""
    url = fp32_server.url
    r = httpx.put(f"{url}/admin/adapters/legal/v2",
                  json={"path": str(adapter_root / "legal" / "v2")}, timeout=60)
    assert r.status_code in (200, 201, 202), r.text
    wait(lambda: views(url)["v2"]["state"] == "ready", "legal@v2 ready")
    yield url
    httpx.delete(f"{url}/admin/tenants/legal/split", timeout=10)
    httpx.delete(f"{url}/admin/adapters/legal/v2", timeout=10)


def views(url: str) -> dict[str, dict]:
    r = httpx.get(f"{url}/admin/adapters", timeout=10)
    return {a["version"]: a for a in r.json()["adapters"] if a["tenant"] == "legal"}


def ask(url: str, key: str, model: str = "legal") -> httpx.Response:
    return httpx.post(f"{url}/generate", headers={"X-Loramux-Split-Key": key}, timeout=30,
                      json={"tenant_id": model, "prompt": "Hi", "max_new_tokens": 1})


def test_bad_split_requests_are_4xx_with_a_reason(server):
    cases = [
        ({"version": "v9", "weight": 10}, 404),  # not registered
        ({"version": "v1", "weight": 10}, 409),  # the active version is not a canary
        ({"version": "v2", "weight": 101}, 422),
        ({"version": "v2", "weight": -1}, 422),
        ({"version": "V2!", "weight": 10}, 422),
        ({"version": "v2"}, 422),
    ]
    for body, status in cases:
        r = httpx.put(f"{server}/admin/tenants/legal/split", json=body, timeout=10)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"], r.text
    r = httpx.put(f"{server}/admin/tenants/Bad_Name/split", json={"version": "v2", "weight": 1},
                  timeout=10)
    assert r.status_code == 422
    r = httpx.post(f"{server}/generate", headers={"X-Loramux-Split-Key": "k" * 300},
                   json={"tenant_id": "legal", "prompt": "Hi", "max_new_tokens": 1}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_split_key"
    assert all(v.get("weight") is None for v in views(server).values())  # nothing was set


def test_a_split_sends_the_keys_in_its_share_to_the_canary_and_counts_each_version(server):
    before = {v: a["stats"]["requests"] for v, a in views(server).items()}
    r = httpx.put(f"{server}/admin/tenants/legal/split", json={"version": "v2", "weight": 30},
                  timeout=10)
    assert r.status_code == 200 and r.json()["weight"] == 30
    assert views(server)["v2"]["weight"] == 30 and views(server)["v1"]["active"]
    keys = [f"user-{i}" for i in range(40)]
    answered = {}
    for key in keys:
        r = ask(server, key)
        assert r.status_code == 200, r.text
        answered[key] = r.json()["adapter"]
        # the split is a pure function of tenant and key: the same on every pod
        want = "legal@v2" if in_canary_share("legal", key, 30) else "legal@v1"
        assert answered[key] == want, key
    assert {"legal@v1", "legal@v2"} == set(answered.values())
    assert all(ask(server, key).json()["adapter"] == answered[key] for key in keys[:10])
    # tenant@version still pins, whatever the split says
    assert ask(server, keys[0], "legal@v1").json()["adapter"] == "legal@v1"
    assert ask(server, keys[0], "legal@v2").json()["adapter"] == "legal@v2"
    after = views(server)
    to_v2 = sum(1 for k in keys[:10] if answered[k] == "legal@v2")
    n_v2 = sum(1 for a in answered.values() if a == "legal@v2") + to_v2 + 1
    assert after["v2"]["stats"]["requests"] - before["v2"] == n_v2
    assert after["v1"]["stats"]["requests"] - before["v1"] == 50 + 2 - n_v2
    assert sum(after["v2"]["stats"]["ttft"]) >= n_v2 and after["v2"]["stats"]["errors"] == 0
    # the per-version series, on the per-tenant registry only while the split exists
    metrics = httpx.get(f"{server}/admin/metrics", timeout=10).text
    assert 'loramux_version_requests_total{outcome="ok",role="canary",tenant="legal",' \
           'version="v2"}' in metrics
    # removing the split: the active version answers every bare request again
    r = httpx.delete(f"{server}/admin/tenants/legal/split", timeout=10)
    assert r.status_code == 200 and r.json()["removed"] is True
    assert all(ask(server, key).json()["adapter"] == "legal@v1" for key in keys[:10])
    assert "loramux_version_requests_total{" not in httpx.get(
        f"{server}/admin/metrics", timeout=10).text


def test_activating_the_canary_ends_the_split(server):
    assert httpx.put(f"{server}/admin/tenants/legal/split", json={"version": "v2",
                     "weight": 100}, timeout=10).status_code == 200
    assert ask(server, "anyone").json()["adapter"] == "legal@v2"
    r = httpx.put(f"{server}/admin/tenants/legal/active", json={"version": "v2"}, timeout=10)
    assert r.status_code == 200
    assert all(v.get("weight") is None for v in views(server).values())
    assert ask(server, "anyone").json()["adapter"] == "legal@v2"
    httpx.put(f"{server}/admin/tenants/legal/active", json={"version": "v1"}, timeout=10)
