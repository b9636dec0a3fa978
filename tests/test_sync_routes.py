"""The sidecar keeps a hot tenant's route on its server: set while the tenant's active
version is Ready locally (the fallback), removed when the desired set drops it. Real
processes: the pool's `loramux serve`, a merged `loramux serve` standing in for the
dedicated deployment, and `loramux sync` (file:// sources)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from factories import stage_adapter


def _publish(adapter_root: Path, out: Path, tenant: str) -> str:
    src, _ = stage_adapter(adapter_root, out, tenant, "v1")
    return src.as_uri() + "/"


def _wait(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_sidecar_sets_and_removes_routes(start_server, start_sidecar, tiny_model_dir: Path,
                                         adapter_root: Path, tmp_path: Path) -> None:
    uris = {t: _publish(adapter_root, tmp_path / "published", t) for t in ("legal", "medical")}
    pool = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                        "--log-format", "text")
    merged = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--log-format", "text",
                          "--merge-adapter", str(adapter_root / "legal" / "v1"))
    sidecar = start_sidecar("--root", str(tmp_path / "volume"), "--server-url", pool.url,
                            "--resync-seconds", "0.3", "--backoff-seconds", "0.05",
                            "--retries", "1")

    def put(adapters: list[dict[str, Any]]) -> None:
        r = httpx.put(f"{sidecar.url}/v1/desired", json={"adapters": adapters}, timeout=5)
        assert r.status_code == 202, r.text

    def routes() -> dict[str, dict]:
        items = httpx.get(f"{pool.url}/admin/routes", timeout=5).json()["routes"]
        return {r["tenant"]: r for r in items}

    ghost = (tmp_path / "nowhere").as_uri() + "/"
    put([{"tenant": "legal", "version": "v1", "uri": uris["legal"], "route": merged.url},
         {"tenant": "medical", "version": "v1", "uri": uris["medical"]},
         {"tenant": "ghost", "version": "v1", "uri": ghost, "route": merged.url}])
    _wait(lambda: "legal" in routes(), "legal routed")
    assert routes()["legal"]["url"] == merged.url and routes()["legal"]["version"] == "v1"
    state = httpx.get(f"{sidecar.url}/v1/state", timeout=5).json()
    assert [r["tenant"] for r in state["routes"]] == ["legal"]
    # flipping only `active` (as the operator does at the end of a rollout) keeps the
    # Ready status and its digest: nothing restarts
    legal_state = next(a for a in state["adapters"] if a["tenant"] == "legal")
    assert legal_state["phase"] == "Ready" and legal_state["digest"]
    put([{"tenant": "legal", "version": "v1", "uri": uris["legal"], "route": merged.url,
          "active": True},
         {"tenant": "medical", "version": "v1", "uri": uris["medical"]},
         {"tenant": "ghost", "version": "v1", "uri": ghost, "route": merged.url}])
    after = next(a for a in httpx.get(f"{sidecar.url}/v1/state").json()["adapters"]
                 if a["tenant"] == "legal")
    assert (after["phase"], after["digest"]) == ("Ready", legal_state["digest"])
    # a tenant whose version is not Ready here gets no route: there would be no fallback
    _wait(lambda: any(a["tenant"] == "ghost" and a["phase"] == "Failed"
                      for a in httpx.get(f"{sidecar.url}/v1/state").json()["adapters"]),
          "ghost failed")
    assert set(routes()) == {"legal"}
    r = httpx.post(f"{pool.url}/generate", timeout=60, json={
        "tenant_id": "legal", "prompt": "hello", "max_new_tokens": 4})
    # X-Loramux-Routed-To: <url>, or (servers that keep the URL internal) X-Loramux-Routed
    assert r.status_code == 200 and (r.headers.get("x-loramux-routed-to") == merged.url
                                     or r.headers.get("x-loramux-routed") == "dedicated")
    loaded_before = httpx.get(f"{pool.url}/admin/adapters", timeout=5).json()["adapters"]

    # demotion: the same version without a route; the adapter stays, only the route goes
    put([{"tenant": "legal", "version": "v1", "uri": uris["legal"]},
         {"tenant": "medical", "version": "v1", "uri": uris["medical"]}])
    _wait(lambda: routes() == {}, "route removed")
    loaded_after = httpx.get(f"{pool.url}/admin/adapters", timeout=5).json()["adapters"]
    legal_before = next(a for a in loaded_before if a["tenant"] == "legal")
    legal_after = next(a for a in loaded_after if a["tenant"] == "legal")
    assert legal_after["state"] == "ready"
    assert legal_after["bytes"] == legal_before["bytes"]  # not reloaded, only un-routed
    r = httpx.post(f"{pool.url}/generate", timeout=60, json={
        "tenant_id": "legal", "prompt": "hello", "max_new_tokens": 4})
    assert r.status_code == 200 and not {"x-loramux-routed-to", "x-loramux-routed"} & set(
        r.headers)

    # a route set by hand for a tenant the sidecar was not told about is removed (level)
    httpx.put(f"{pool.url}/admin/tenants/medical/route", json={"url": merged.url}, timeout=5)
    _wait(lambda: routes() == {}, "stray route removed")

    # pinning changed on a loaded version reaches the server both ways, without a reload
    def pinned() -> bool:
        items = httpx.get(f"{pool.url}/admin/adapters", timeout=5).json()["adapters"]
        return next(a for a in items if a["tenant"] == "medical")["pinned"]

    assert pinned() is False

    def medical_state() -> dict[str, Any]:
        items = httpx.get(f"{sidecar.url}/v1/state", timeout=5).json()["adapters"]
        return next(a for a in items if a["tenant"] == "medical")

    digest = medical_state()["digest"]
    assert digest
    for want in (True, False):
        put([{"tenant": "legal", "version": "v1", "uri": uris["legal"]},
             {"tenant": "medical", "version": "v1", "uri": uris["medical"], "pinned": want}])
        _wait(lambda w=want: pinned() is w, f"medical pinned={want} on the server")
        assert (medical_state()["phase"], medical_state()["digest"]) == ("Ready", digest)
    downloads = httpx.get(f"{sidecar.url}/metrics", timeout=5).text
    assert "loramux_sync_downloads_total 2.0" in downloads  # legal + medical, once each

    # bad route values are refused before anything changes
    r = httpx.put(f"{sidecar.url}/v1/desired", timeout=5, json={"adapters": [
        {"tenant": "legal", "version": "v1", "uri": uris["legal"], "route": "ftp://x"}]})
    assert r.status_code == 422
