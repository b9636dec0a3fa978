"""The sidecar carries each tenant's access (key hashes, weight, limits) from the desired set
to its server: pushed before the tenant's version is loaded, pushed again when it changes
(another fingerprint), removed when no entry of the tenant carries one any more or the tenant
is gone, reported in GET /v1/state; rows from the server's access file are left alone.

Real processes: `loramux serve --auth keys --access-file ...` and `loramux sync` (file://
sources). Calls through the public API prove what the server made of the pushed hashes."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx

from factories import stage_adapter
from loramux.contracts import AccessFile, KeyGrant, TenantAccess, TenantLimits, hash_key


def _wait(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _key(name: str) -> str:
    return f"lmx-{name}-{secrets.token_hex(16)}"


def test_sidecar_pushes_changes_and_removes_tenant_access(
        start_server, start_sidecar, tiny_model_dir: Path, adapter_root: Path,
        tmp_path: Path) -> None:
    keys = {name: _key(name) for name in ("legal1", "legal2", "medical", "finance", "admin")}
    # The access file: a pool-wide key for everything, and one tenant of its own ("file").
    access_file = tmp_path / "access.json"
    access_file.write_text(AccessFile(
        grants=[KeyGrant(sha256=hash_key(keys["admin"]), tenants=("*",), base=True,
                         name="admin")],
        tenants={"finance": TenantAccess(key_sha256=[hash_key(keys["finance"])])},
    ).model_dump_json())
    pool = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                        "--auth", "keys", "--access-file", str(access_file))
    sidecar = start_sidecar("--root", str(tmp_path / "volume"), "--server-url", pool.url,
                            "--resync-seconds", "0.3", "--backoff-seconds", "0.05",
                            "--retries", "1")
    uris = {t: stage_adapter(adapter_root, tmp_path / "published", t, "v1")[0].as_uri() + "/"
            for t in ("legal", "medical")}

    def entry(tenant: str, access: TenantAccess | None) -> dict[str, Any]:
        body: dict[str, Any] = {"tenant": tenant, "version": "v1", "uri": uris[tenant]}
        if access is not None:
            body["access"] = access.model_dump(mode="json")
        return body

    def put(*entries: dict[str, Any]) -> None:
        r = httpx.put(f"{sidecar.url}/v1/desired", json={"adapters": list(entries)}, timeout=5)
        assert r.status_code == 202, r.text

    def server_rows() -> dict[tuple[str, str], dict[str, Any]]:
        r = httpx.get(f"{pool.url}/admin/access", timeout=5)
        assert r.status_code == 200, r.text
        return {(t["tenant"], t["source"]): t for t in r.json()["tenants"]}

    def state() -> dict[str, Any]:
        return httpx.get(f"{sidecar.url}/v1/state", timeout=5).json()

    def phases() -> dict[str, str]:
        return {a["tenant"]: a["phase"] for a in state()["adapters"]}

    def call(tenant: str, key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{pool.url}/generate", timeout=60, headers=headers, json={
            "tenant_id": tenant, "prompt": "hello", "max_new_tokens": 2}).status_code

    # 1. push: legal carries access, medical none
    first = TenantAccess(key_sha256=[hash_key(keys["legal1"])], weight=2.0,
                         limits=TenantLimits(max_concurrent=4))
    put(entry("legal", first), entry("medical", None))
    _wait(lambda: phases() == {"legal": "Ready", "medical": "Ready"}, "both Ready")
    _wait(lambda: ("legal", "admin") in server_rows(), "legal's access on the server")
    row = server_rows()[("legal", "admin")]
    assert (row["fingerprint"], row["keys"], row["weight"]) == (first.fingerprint(), 1, 2.0)
    assert row["limits"]["max_concurrent"] == 4
    assert ("medical", "admin") not in server_rows()
    # the access went to the server before the version was loaded there
    events = [json.loads(line) for line in pool.log().splitlines() if line.startswith("{")]
    order = [e["msg"] for e in events if e.get("tenant") == "legal"
             and e["msg"] in ("tenant access set", "adapter read from disk")]
    assert order[:2] == ["tenant access set", "adapter read from disk"], order
    # what the server made of it
    assert call("legal", keys["legal1"]) == 200
    assert call("legal", None) == 401
    assert call("legal", keys["medical"]) == 401  # a key no one knows
    assert call("medical", keys["legal1"]) == 403  # legal's key, medical's adapter
    assert call("medical", keys["admin"]) == 200  # the access file's pool-wide grant
    # the state report: the server's access list, counts and fingerprints
    report = state()["access"]
    assert report["auth"] == "keys"
    rows = {(t["tenant"], t["source"]): t for t in report["tenants"]}
    assert rows[("legal", "admin")]["fingerprint"] == first.fingerprint()
    assert rows[("finance", "file")]["keys"] == 1
    legal_digest = next(a["digest"] for a in state()["adapters"] if a["tenant"] == "legal")

    # 2. change: another key (a rotation) -> another fingerprint -> PUT; nothing reloads
    second = TenantAccess(key_sha256=[hash_key(keys["legal2"])], weight=2.0,
                          limits=TenantLimits(max_concurrent=4))
    put(entry("legal", second), entry("medical", None))
    _wait(lambda: server_rows()[("legal", "admin")]["fingerprint"] == second.fingerprint(),
          "the new access on the server")
    assert call("legal", keys["legal2"]) == 200
    assert call("legal", keys["legal1"]) == 401  # the old key is gone
    legal = next(a for a in state()["adapters"] if a["tenant"] == "legal")
    assert (legal["phase"], legal["digest"]) == ("Ready", legal_digest)
    # only the limits change: another fingerprint too
    third = second.model_copy(update={"limits": TenantLimits(max_concurrent=4, max_queued=2)})
    put(entry("legal", third), entry("medical", None))
    _wait(lambda: server_rows()[("legal", "admin")]["fingerprint"] == third.fingerprint(),
          "the new limits on the server")
    assert server_rows()[("legal", "admin")]["limits"]["max_queued"] == 2

    # 3. level-triggered: access lost on the server is pushed again; a stray one goes; the
    # access file's rows are never the sidecar's
    assert httpx.delete(f"{pool.url}/admin/tenants/legal/access", timeout=5).status_code == 200
    stray = TenantAccess(key_sha256=[hash_key(_key("stray"))])
    r = httpx.put(f"{pool.url}/admin/tenants/ghost/access", timeout=5,
                  json=stray.model_dump(mode="json"))
    assert r.status_code == 200, r.text
    _wait(lambda: ("legal", "admin") in server_rows() and ("ghost", "admin") not in
          server_rows(), "legal's access back, the stray one gone")
    assert server_rows()[("legal", "admin")]["fingerprint"] == third.fingerprint()
    assert ("finance", "file") in server_rows()

    # 4. removal: legal's entries carry no access any more -> DELETE
    put(entry("legal", None), entry("medical", None))
    _wait(lambda: ("legal", "admin") not in server_rows(), "legal's access removed")
    assert call("legal", keys["legal2"]) == 401
    assert call("legal", keys["admin"]) == 200  # still served, by the pool-wide grant
    assert ("legal", "admin") not in {(t["tenant"], t["source"])
                                      for t in state()["access"]["tenants"]}

    # 5. removal: the tenant leaves the desired set -> DELETE; the others stay
    medical = TenantAccess(key_sha256=[hash_key(keys["medical"])], weight=0.5)
    put(entry("legal", second), entry("medical", medical))
    _wait(lambda: {("legal", "admin"), ("medical", "admin")} <= set(server_rows()),
          "both tenants' access on the server")
    put(entry("medical", medical))
    _wait(lambda: ("legal", "admin") not in server_rows(), "legal's access removed with it")
    assert server_rows()[("medical", "admin")]["fingerprint"] == medical.fingerprint()
    assert call("medical", keys["medical"]) == 200
    assert ("finance", "file") in server_rows()

    # never a key nor a full hash in the sidecar's report, metrics or log (fingerprints only)
    metrics = httpx.get(f"{sidecar.url}/metrics", timeout=5).text
    assert 'call="access' not in metrics  # no failed access call in this run
    texts = {"state": json.dumps(state()), "metrics": metrics, "log": sidecar.log()}
    for key in keys.values():
        for what, text in texts.items():
            assert key not in text, what
            assert hash_key(key) not in text, what
    assert third.fingerprint() in sidecar.log()
