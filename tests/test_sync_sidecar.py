"""The adapter-sync sidecar end to end: moto S3 -> sidecar (in-process) -> real `loramux serve`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import uvicorn
from moto.server import ThreadedMotoServer

import loramux.sync.reconciler as sync_mod
from loramux.contracts import DesiredState, SyncState, error_body, parse_error
from loramux.inference.adapter_store import FetchError, list_local
from loramux.manifest import MANIFEST_FILE, AdapterManifest, describe_files, write_manifest
from loramux.names import AdapterRef
from loramux.sync.app import create_app
from loramux.sync.reconciler import Reconciler
from loramux.sync.settings import SyncSettings

TOKEN = "sidecar-secret"
PROMPT = "The quick brown fox"
OTHER_BASE = "meta-llama/Llama-2-7b-hf"


@dataclass
class Published:
    uri: str
    sha256: str


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    mp = pytest.MonkeyPatch()
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(key, raising=False)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        mp.setenv(key, value)
    try:
        yield boto3.session.Session().client("s3", endpoint_url=f"http://{host}:{port}")
    finally:
        mp.undo()
        server.stop()


@pytest.fixture(scope="module")
def published(s3: Any, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Published]:
    """legal@v1, legal@v2, medical@v1, finance@v1, retail@v1, travel@v1 and support@v1 with
    manifests, uploaded to one bucket.

    Plus badbase@v1: legal@v1's weights with an adapter_config.json that claims another base
    model, under a manifest that is valid for those files (so only the server can refuse it).
    """
    bucket = f"adapters-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    staging = tmp_path_factory.mktemp("publish")
    out: dict[str, Published] = {}
    for tenant, version, source in (("legal", "v1", "legal/v1"), ("legal", "v2", "legal/v2"),
                                    ("medical", "v1", "medical/v1"),
                                    ("finance", "v1", "finance/v1"),
                                    ("badbase", "v1", "legal/v1"),
                                    # for the credential tests, never loaded before them
                                    ("retail", "v1", "retail/v1"),
                                    ("travel", "v1", "travel/v1"),
                                    ("support", "v1", "support/v1")):
        src = staging / tenant / version
        shutil.copytree(adapter_root / source, src)
        config = json.loads((src / "adapter_config.json").read_text())
        if tenant == "badbase":
            config["base_model_name_or_path"] = OTHER_BASE
            (src / "adapter_config.json").write_text(json.dumps(config))
        manifest = AdapterManifest(
            tenant=tenant, version=version, base_model="tiny-llama", rank=config["r"],
            lora_alpha=float(config.get("lora_alpha", config["r"])),
            target_modules=config["target_modules"], files=describe_files(src),
        )
        digest = write_manifest(src, manifest)
        prefix = f"published/{tenant}/{version}"
        files = sorted(p for p in src.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == MANIFEST_FILE)  # manifest last
        for path in files:
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(src).as_posix()}",
                          Body=path.read_bytes())
        out[f"{tenant}@{version}"] = Published(f"s3://{bucket}/{prefix}/", digest)
    return out


@pytest.fixture(scope="module")
def server(start_server, tiny_model_dir: Path):
    return start_server("--model", str(tiny_model_dir), "--quantization", "none",
                        "--log-format", "text")


@contextmanager
def run_sidecar(root: Path, server_url: str, s3: Any, **overrides: Any) -> Iterator[Any]:
    """The sidecar in-process under uvicorn; yields an authenticated client (``.stop()``)."""
    settings = SyncSettings(**{"root": root, "server_url": server_url, "token": TOKEN,
                               "resync_seconds": 1.0, "backoff_seconds": 0.05, "retries": 2,
                               "max_adapter_bytes": 64 << 20, **overrides})
    app = create_app(settings, s3_client=s3)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "sidecar did not start"
        time.sleep(0.05)
    port = uv.servers[0].sockets[0].getsockname()[1]
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}",
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    client.root = root  # type: ignore[attr-defined]

    def stop() -> None:
        uv.should_exit = True
        thread.join(20)
        assert not thread.is_alive(), "sidecar did not stop"

    client.stop = stop  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        client.close()
        stop()


@pytest.fixture(scope="module")
def sidecar(server, s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with run_sidecar(tmp_path_factory.mktemp("sync-root"), server.url, s3) as client:
        yield client


def entry(published: dict[str, Published], ref: str, **extra: Any) -> dict[str, Any]:
    tenant, version = ref.split("@")
    return {"tenant": tenant, "version": version, "uri": published[ref].uri,
            "sha256": published[ref].sha256, **extra}


def put_desired(sidecar: Any, adapters: list[dict[str, Any]]) -> None:
    r = sidecar.put("/v1/desired", json={"adapters": adapters})
    assert r.status_code == 202, r.text


def wait_phases(sidecar: Any, want: dict[str, str], timeout: float = 40) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        state = sidecar.get("/v1/state").json()
        by_ref = {f"{a['tenant']}@{a['version']}": a for a in state["adapters"]}
        if all(ref in by_ref and by_ref[ref]["phase"] == phase for ref, phase in want.items()):
            return by_ref
        if time.monotonic() > deadline:
            raise AssertionError(f"phases not reached: want {want}, have {by_ref}")
        time.sleep(0.1)


def wait_until(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def server_adapters(server) -> dict[str, dict]:
    data = httpx.get(f"{server.url}/admin/adapters", timeout=10).json()
    return {f"{a['tenant']}@{a['version']}": a for a in data["adapters"]}


def generate(server, tenant: str) -> dict:
    r = httpx.post(f"{server.url}/generate", json={"tenant_id": tenant, "prompt": PROMPT,
                                                   "max_new_tokens": 12, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_api_auth_and_validation(sidecar: Any) -> None:
    assert httpx.get(f"{sidecar.base_url}/v1/state").status_code == 401
    assert sidecar.get("/healthz").json()["status"] == "ok"
    bad = sidecar.put("/v1/desired", json={"adapters": [
        {"tenant": "Bad_Name", "version": "v1", "uri": "s3://b/x/"}]})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_request"
    # the one error body of every loramux service: message, code and status
    assert parse_error(bad.json()) == ("invalid_request", bad.json()["error"]["message"])
    unauthorized = httpx.get(f"{sidecar.base_url}/v1/state")
    assert unauthorized.json() == error_body(401, "unauthorized",
                                             "needs 'Authorization: Bearer <token>'")
    missing = sidecar.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["status"] == 404


def test_two_tenants_become_ready_and_serve(sidecar: Any, server, published) -> None:
    started = time.monotonic()
    put_desired(sidecar, [entry(published, "legal@v1"), entry(published, "medical@v1")])
    state = wait_phases(sidecar, {"legal@v1": "Ready", "medical@v1": "Ready"})
    print(f"two tenants Ready in {time.monotonic() - started:.2f}s")
    assert state["legal@v1"]["digest"] == published["legal@v1"].sha256
    assert state["legal@v1"]["bytes"] > 0 and "fetch_seconds" in state["legal@v1"]["timings"]
    base = generate(server, "tiny-llama")
    assert base["adapter"] is None
    for tenant in ("legal", "medical"):
        out = generate(server, tenant)
        assert out["adapter"] == f"{tenant}@v1"
        assert out["text"] != base["text"]
    assert set(list_local(sidecar.root)) == {AdapterRef("legal", "v1"),
                                             AdapterRef("medical", "v1")}
    metrics = sidecar.get("/metrics").text
    assert 'loramux_sync_adapters{phase="Ready"} 2.0' in metrics


def test_state_carries_the_servers_own_answer(sidecar: Any, server) -> None:
    """GET /v1/state is the operator's one source of a pod's state: the sidecar's phases and
    the server's own GET /admin/adapters answer as of the last pass."""
    live = server_adapters(server)

    def reported() -> SyncState:
        return SyncState.model_validate(sidecar.get("/v1/state").json())

    wait_until(lambda: (s := reported().server) is not None and {
        str(a.ref) for a in s.adapters} == set(live), "the server's answer in /v1/state")
    state = reported()
    assert state.server_reachable is True and state.server is not None
    answer = httpx.get(f"{server.url}/admin/adapters", timeout=10).json()
    assert state.server.base_model == answer.get("base_model")
    by_ref = {str(a.ref): a for a in state.server.adapters}
    assert set(by_ref) == set(live)
    for ref, item in live.items():
        assert (by_ref[ref].state, by_ref[ref].path) == (item["state"], item["path"])


async def test_state_server_is_none_when_the_server_does_not_answer(tmp_path: Path) -> None:
    rec = Reconciler(SyncSettings(root=tmp_path / "vol", server_url="http://127.0.0.1:9",
                                  resync_seconds=60))
    await rec.start()
    try:
        await rec.reconcile_once()
    finally:
        await rec.stop()
    state = rec.state()
    assert state.server_reachable is False and state.server is None
    assert state.last_pass is not None


def test_wrong_digest_fails_alone(sidecar: Any, server, published) -> None:
    wrong = entry(published, "finance@v1", sha256="0" * 64)
    put_desired(sidecar, [entry(published, "legal@v1"), entry(published, "medical@v1"), wrong])
    state = wait_phases(sidecar, {"finance@v1": "Failed", "legal@v1": "Ready",
                                  "medical@v1": "Ready"})
    assert "digest_mismatch" in state["finance@v1"]["reason"]
    assert state["finance@v1"]["code"] == "digest_mismatch"
    assert "finance@v1" not in server_adapters(server)
    assert generate(server, "medical")["adapter"] == "medical@v1"
    assert 'loramux_sync_fetch_failures_total{code="digest_mismatch"}' in sidecar.get(
        "/metrics").text


def test_rollout_loads_activates_then_evicts(sidecar: Any, server, published) -> None:
    errors: list[str] = []
    stop = threading.Event()

    def hammer() -> None:  # the tenant must keep answering during the rollout
        while not stop.is_set():
            r = httpx.post(f"{server.url}/generate", json={
                "tenant_id": "legal", "prompt": PROMPT, "max_new_tokens": 2}, timeout=60)
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:200]}")

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        put_desired(sidecar, [entry(published, "legal@v2", active=True),
                              entry(published, "medical@v1")])
        wait_phases(sidecar, {"legal@v2": "Ready"})
        wait_until(lambda: "legal@v1" not in server_adapters(server), "legal@v1 evicted")
    finally:
        stop.set()
        thread.join(60)
    print(f"rollout v1->v2 done in {time.monotonic() - started:.2f}s")
    assert errors == []
    live = server_adapters(server)
    assert live["legal@v2"]["active"] and live["legal@v2"]["state"] == "ready"
    assert generate(server, "legal")["adapter"] == "legal@v2"
    wait_until(lambda: AdapterRef("legal", "v1") not in list_local(sidecar.root),
               "legal/v1 files deleted")
    state = sidecar.get("/v1/state").json()
    assert {f"{a['tenant']}@{a['version']}" for a in state["adapters"]} == {
        "legal@v2", "medical@v1"}


def test_removed_tenant_is_evicted_and_deleted(sidecar: Any, server, published) -> None:
    put_desired(sidecar, [entry(published, "legal@v2", active=True)])
    wait_until(lambda: "medical@v1" not in server_adapters(server), "medical evicted")
    wait_until(lambda: not (sidecar.root / "medical").exists(), "medical files deleted")
    assert set(list_local(sidecar.root)) == {AdapterRef("legal", "v2")}
    r = httpx.post(f"{server.url}/generate", json={"tenant_id": "medical", "prompt": PROMPT},
                   timeout=30)
    assert r.status_code == 404
    assert generate(server, "legal")["adapter"] == "legal@v2"


def readyz(sidecar: Any) -> httpx.Response:
    return httpx.get(f"{sidecar.base_url}/readyz", timeout=10)  # unauthenticated, like a probe


def local_inodes(root: Path, *refs: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for ref in refs:
        tenant, version = ref.split("@")
        for path in sorted((root / tenant / version).rglob("*")):
            if path.is_file():
                out[f"{ref}:{path.relative_to(root / tenant / version)}"] = path.stat().st_ino
    assert out, f"no local files for {refs}"
    return out


def test_server_422_becomes_failed_with_the_servers_reason(sidecar: Any, server,
                                                            published) -> None:
    put_desired(sidecar, [entry(published, "legal@v2", active=True),
                          entry(published, "medical@v1"), entry(published, "badbase@v1")])
    state = wait_phases(sidecar, {"badbase@v1": "Failed", "legal@v2": "Ready",
                                  "medical@v1": "Ready"})
    bad = state["badbase@v1"]
    assert bad["code"] == "wrong_base", bad
    assert "wrong_base" in bad["reason"] and OTHER_BASE in bad["reason"]
    assert bad["digest"] == published["badbase@v1"].sha256  # fetched and verified first
    live = server_adapters(server)["badbase@v1"]  # the server keeps a record of its refusal
    assert live["state"] == "failed" and OTHER_BASE in live["reason"]
    r = httpx.post(f"{server.url}/generate", json={"tenant_id": "badbase", "prompt": PROMPT},
                   timeout=30)
    assert r.status_code >= 400
    assert generate(server, "legal")["adapter"] == "legal@v2"
    assert generate(server, "medical")["adapter"] == "medical@v1"
    assert 'loramux_sync_load_failures_total{code="wrong_base"} 1.0' in sidecar.get(
        "/metrics").text
    # The only version of its tenant is required for readiness, so the sidecar is not ready.
    r = readyz(sidecar)
    assert r.status_code == 503
    assert [(m["tenant"], m["code"]) for m in r.json()["missing"]] == [("badbase", "wrong_base")]
    assert "wrong_base" in r.json()["missing"][0]["reason"]
    time.sleep(2.5)  # terminal: later passes neither retry nor change the others
    state = wait_phases(sidecar, {"badbase@v1": "Failed", "legal@v2": "Ready",
                                  "medical@v1": "Ready"}, timeout=1)
    assert 'loramux_sync_load_failures_total{code="wrong_base"} 1.0' in sidecar.get(
        "/metrics").text


def test_failed_new_version_keeps_the_old_one_active(sidecar: Any, server, published) -> None:
    put_desired(sidecar, [entry(published, "legal@v1", active=True)])
    wait_phases(sidecar, {"legal@v1": "Ready"})
    wait_until(lambda: set(server_adapters(server)) == {"legal@v1"}, "only legal@v1 loaded")
    assert server_adapters(server)["legal@v1"]["active"]

    # v2 becomes the target but its pin is wrong; v1 stays listed (not active).
    put_desired(sidecar, [entry(published, "legal@v1"),
                          entry(published, "legal@v2", active=True, sha256="0" * 64)])
    state = wait_phases(sidecar, {"legal@v2": "Failed", "legal@v1": "Ready"})
    assert state["legal@v2"]["code"] == "digest_mismatch"
    time.sleep(2.5)  # a few reconcile passes
    live = server_adapters(server)
    assert set(live) == {"legal@v1"} and live["legal@v1"]["active"]
    assert generate(server, "legal")["adapter"] == "legal@v1"
    r = readyz(sidecar)
    assert r.status_code == 503
    assert [(m["version"], m["code"]) for m in r.json()["missing"]] == [
        ("v2", "digest_mismatch")]

    # Even once v1 is no longer desired, it keeps serving while v2 cannot take over.
    put_desired(sidecar, [entry(published, "legal@v2", active=True, sha256="0" * 64)])
    wait_phases(sidecar, {"legal@v2": "Failed"})
    time.sleep(2.5)
    live = server_adapters(server)
    assert set(live) == {"legal@v1"} and live["legal@v1"]["active"]
    assert generate(server, "legal")["adapter"] == "legal@v1"
    assert AdapterRef("legal", "v1") in list_local(sidecar.root)


def test_readyz_is_503_until_the_pinned_adapter_is_ready(sidecar: Any, server, published,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    release = threading.Event()
    real_fetch = sync_mod.fetch_adapter

    def gated_fetch(ref: AdapterRef, *args: Any, **kwargs: Any) -> Any:
        if ref == AdapterRef("finance", "v1"):
            assert release.wait(30), "test never released the fetch"
        return real_fetch(ref, *args, **kwargs)

    monkeypatch.setattr(sync_mod, "fetch_adapter", gated_fetch)
    put_desired(sidecar, [entry(published, "legal@v1", active=True),
                          entry(published, "finance@v1", pinned=True)])
    wait_phases(sidecar, {"legal@v1": "Ready", "finance@v1": "Downloading"})
    r = readyz(sidecar)
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["require_ready_for"] == "pinned-or-active" and body["required"] == 2
    assert [(m["tenant"], m["version"], m["phase"]) for m in body["missing"]] == [
        ("finance", "v1", "Downloading")]
    release.set()
    wait_until(lambda: readyz(sidecar).status_code == 200, "/readyz 200")
    assert readyz(sidecar).json()["missing"] == []
    assert server_adapters(server)["finance@v1"]["state"] == "ready"
    assert sidecar.get("/v1/state").status_code == 200


def test_transient_fetch_errors_are_retried(sidecar: Any, server, published,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two io_error failures, then success: Ready after 3 attempts.

    The failures are injected into the sidecar's fetch function because a flaky network
    cannot be produced on loopback against moto.
    """
    real_fetch = sync_mod.fetch_adapter
    calls: list[float] = []

    def flaky_fetch(ref: AdapterRef, *args: Any, **kwargs: Any) -> Any:
        if ref == AdapterRef("medical", "v1"):
            calls.append(time.monotonic())
            if len(calls) <= 2:
                raise FetchError("io_error", "injected: connection reset by peer",
                                 retryable=True)
        return real_fetch(ref, *args, **kwargs)

    monkeypatch.setattr(sync_mod, "fetch_adapter", flaky_fetch)
    assert AdapterRef("medical", "v1") not in list_local(sidecar.root)
    put_desired(sidecar, [entry(published, "legal@v1", active=True),
                          entry(published, "finance@v1", pinned=True),
                          entry(published, "medical@v1")])
    state = wait_phases(sidecar, {"medical@v1": "Ready", "legal@v1": "Ready",
                                  "finance@v1": "Ready"})
    assert len(calls) == 3
    assert state["medical@v1"]["timings"]["attempts"] == 3
    assert state["medical@v1"]["code"] is None and state["medical@v1"]["reason"] is None
    assert calls[2] - calls[1] >= calls[1] - calls[0] > 0  # exponential backoff
    assert 'loramux_sync_fetch_failures_total{code="io_error"} 2.0' in sidecar.get(
        "/metrics").text
    assert generate(server, "medical")["adapter"] == "medical@v1"


READY_SET = ("legal@v1", "finance@v1", "medical@v1")


def final_desired(published: dict[str, Published]) -> list[dict[str, Any]]:
    return [entry(published, "legal@v1", active=True),
            entry(published, "finance@v1", pinned=True), entry(published, "medical@v1")]


def test_sidecar_restart_converges_without_redownloading(sidecar: Any, server, s3: Any,
                                                         published) -> None:
    wait_phases(sidecar, dict.fromkeys(READY_SET, "Ready"))
    before = local_inodes(sidecar.root, *READY_SET)
    sidecar.stop()  # the module's sidecar is done; a new one takes over the same volume
    with run_sidecar(sidecar.root, server.url, s3) as fresh:
        # Not told the desired set yet: passes run, but nothing is evicted or deleted.
        wait_until(lambda: "loramux_sync_reconcile_passes_total 2.0" in fresh.get(
            "/metrics").text, "two passes of the new sidecar", timeout=10)
        assert set(server_adapters(server)) == set(READY_SET)
        assert local_inodes(fresh.root, *READY_SET) == before
        r = readyz(fresh)
        assert r.status_code == 503 and r.json()["desired_received"] is False
        started = time.monotonic()
        put_desired(fresh, final_desired(published))
        state = wait_phases(fresh, dict.fromkeys(READY_SET, "Ready"), timeout=10)
        wait_until(lambda: readyz(fresh).status_code == 200, "/readyz 200", timeout=10)
        took = time.monotonic() - started
        print(f"restarted sidecar Ready in {took:.2f}s")
        assert took < 5
        assert local_inodes(fresh.root, *READY_SET) == before  # nothing rewritten
        # Already loaded on the server: nothing was even fetched, let alone downloaded.
        assert all("fetch_seconds" not in state[ref]["timings"] for ref in READY_SET)
        assert "loramux_sync_last_fetch_seconds 0.0" in fresh.get("/metrics").text
        assert generate(server, "legal")["adapter"] == "legal@v1"


def test_server_restart_reloads_adapters_from_local_files(sidecar: Any, start_server,
                                                          tiny_model_dir: Path, s3: Any,
                                                          published) -> None:
    before = local_inodes(sidecar.root, *READY_SET)
    new_server = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                              "--log-format", "text")
    assert server_adapters(new_server) == {}
    with run_sidecar(sidecar.root, new_server.url, s3) as fresh:
        started = time.monotonic()
        put_desired(fresh, final_desired(published))
        state = wait_phases(fresh, dict.fromkeys(READY_SET, "Ready"), timeout=30)
        print(f"sidecar reloaded a fresh server in {time.monotonic() - started:.2f}s")
        assert local_inodes(fresh.root, *READY_SET) == before  # loaded from local files
        assert all(state[ref]["timings"].get("attempts") == 1 for ref in READY_SET)
        assert "loramux_sync_last_fetch_seconds 0.0" in fresh.get("/metrics").text
        live = server_adapters(new_server)
        assert set(live) == set(READY_SET) and live["legal@v1"]["active"]
        for tenant in ("legal", "finance", "medical"):
            assert generate(new_server, tenant)["adapter"] == f"{tenant}@v1"
        assert readyz(fresh).status_code == 200


def test_require_ready_for_selects_what_readyz_waits_for(tmp_path: Path) -> None:
    desired = DesiredState.model_validate({"adapters": [
        {"tenant": "a", "version": "v1", "uri": "s3://b/a/v1/"},  # only version: required
        {"tenant": "b", "version": "v1", "uri": "s3://b/b/v1/"},
        {"tenant": "b", "version": "v2", "uri": "s3://b/b/v2/", "active": True},
        {"tenant": "c", "version": "v1", "uri": "s3://b/c/v1/", "pinned": True},
        {"tenant": "c", "version": "v2", "uri": "s3://b/c/v2/"},
    ]})

    def missing(mode: str) -> tuple[bool, list[str]]:
        rec = Reconciler(SyncSettings(root=tmp_path, require_ready_for=mode))
        ready, body = rec.readiness()
        assert not ready or mode == "none"  # nothing desired was ever received
        rec.server_reachable, rec.last_pass = True, time.time()
        rec.set_desired(desired)
        rec.status[AdapterRef("b", "v2")].phase = "Ready"
        ready, body = rec.readiness()
        return ready, [f"{m['tenant']}@{m['version']}" for m in body["missing"]]

    assert missing("pinned-or-active") == (False, ["a@v1", "c@v1"])
    assert missing("all") == (False, ["a@v1", "b@v1", "c@v1", "c@v2"])
    assert missing("none") == (True, [])


# --------------------------------------------------------------------------- credentials

ENTRY_KEY = "AKIAENTRYKEY0001"
ENTRY_SECRET = "entry-secret-Xy7-never-shown"
ENTRY_TOKEN = "entry-session-Pq2-never-shown"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: connection refused


def no_env_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard AWS environment points at a dead endpoint and has no credentials."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD_ENDPOINT)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


def endpoint_of(s3: Any) -> str:
    return s3.meta.endpoint_url


def creds(s3: Any, secret: str = ENTRY_SECRET, **extra: Any) -> dict[str, Any]:
    return {"access_key_id": ENTRY_KEY, "secret_access_key": secret,
            "session_token": ENTRY_TOKEN, "region": "us-east-1",
            "endpoint_url": endpoint_of(s3), **extra}


def test_entry_credentials_are_used_masked_and_never_logged(
        server, s3: Any, published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """retail@v1 carries credentials whose endpoint_url is moto; the environment has no
    credentials and a dead endpoint, so only the entry's own can have fetched it."""
    caplog.set_level(logging.DEBUG, logger="loramux")
    no_env_credentials(monkeypatch)
    with run_sidecar(tmp_path / "root", server.url, None, retries=0) as car:
        bad = car.put("/v1/desired", json={"adapters": [entry(
            published, "retail@v1", credentials=creds(
                s3, endpoint_url="http://user:pw@127.0.0.1:1/"))]})
        assert bad.status_code == 422 and "user:password" in bad.json()["error"]["message"]
        for broken in ({"access_key_id": ENTRY_KEY},  # no secret
                       {**creds(s3), "role_arn": "x"},  # unknown field
                       {**creds(s3), "secret_access_key": ""}):
            r = car.put("/v1/desired", json={"adapters": [
                entry(published, "retail@v1", credentials=broken)]})
            assert r.status_code == 422, r.text
            assert "credentials" in r.json()["error"]["message"]
            assert ENTRY_TOKEN not in r.text and ENTRY_SECRET not in r.text

        put_desired(car, [entry(published, "retail@v1", credentials=creds(s3)),
                          entry(published, "travel@v1")])
        state = wait_phases(car, {"retail@v1": "Ready", "travel@v1": "Failed"})
        assert state["retail@v1"]["credentials_source"] == "entry"
        assert state["travel@v1"]["credentials_source"] == "environment"
        assert state["travel@v1"]["code"] == "access_denied"  # no credentials in the env
        assert generate(server, "retail")["adapter"] == "retail@v1"

        # New credentials alone: the Ready version is neither refetched nor reloaded, and
        # the Failed(access_denied) one gets a fresh try with the credentials it now has.
        before = server_adapters(server)["retail@v1"]
        retail_timings = state["retail@v1"]["timings"]
        downloads = car.get("/metrics").text
        assert "loramux_sync_downloads_total 1.0" in downloads
        put_desired(car, [entry(published, "retail@v1", credentials=creds(s3, "rotated-1")),
                          entry(published, "travel@v1", credentials=creds(s3))])
        state = wait_phases(car, {"retail@v1": "Ready", "travel@v1": "Ready"})
        assert state["travel@v1"]["credentials_source"] == "entry"
        time.sleep(1.5)  # a few passes
        state = wait_phases(car, {"retail@v1": "Ready"}, timeout=1)
        assert state["retail@v1"]["timings"] == retail_timings
        after = server_adapters(server)["retail@v1"]
        assert after["disk_load_seconds"] == before["disk_load_seconds"]
        assert "loramux_sync_downloads_total 2.0" in car.get("/metrics").text

        desired = car.get("/v1/desired")
        views = {e["tenant"]: e["credentials"] for e in desired.json()["adapters"]}
        assert views["retail"] == {"access_key_id": "***", "secret_access_key": "***",
                                   "session_token": "***", "region": "us-east-1",
                                   "endpoint_url": endpoint_of(s3)}
        shown = desired.text + car.get("/v1/state").text + car.get("/metrics").text
        logged = caplog.text
        assert "retail@v1 ready on the server" in logged  # the sidecar's log was captured
        for secret in (ENTRY_KEY, ENTRY_SECRET, ENTRY_TOKEN, "rotated-1"):
            assert secret not in shown and secret not in logged
        put_desired(car, [])  # leave the module's server as it was
        wait_until(lambda: not {"retail@v1", "travel@v1"} & set(server_adapters(server)),
                   "retail and travel evicted")


def write_secret(directory: Path, name: str, value: str) -> None:
    """Like the kubelet: the new file appears atomically."""
    tmp = directory / f".{name}.tmp"
    tmp.write_text(value + "\n")  # secrets often end in a newline
    os.replace(tmp, directory / name)


def test_mounted_credentials_dir_is_reread_so_rotation_works(
        server, s3: Any, published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_env_credentials(monkeypatch)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    write_secret(secret_dir, "AWS_ACCESS_KEY_ID", "AKIAMOUNTED0001")  # the secret is missing
    write_secret(secret_dir, "AWS_ENDPOINT_URL", endpoint_of(s3))
    write_secret(secret_dir, "AWS_REGION", "us-east-1")
    with run_sidecar(tmp_path / "root", server.url, None, retries=0,
                     s3_credentials_dir=secret_dir) as car:
        put_desired(car, [entry(published, "support@v1")])
        state = wait_phases(car, {"support@v1": "Failed"})
        assert state["support@v1"]["code"] == "access_denied"
        assert "AWS_SECRET_ACCESS_KEY" in state["support@v1"]["reason"]
        time.sleep(1.5)  # terminal: not retried while the credentials stay the same
        state = wait_phases(car, {"support@v1": "Failed"}, timeout=1)
        assert 'loramux_sync_fetch_failures_total{code="access_denied"} 1.0' in car.get(
            "/metrics").text

        write_secret(secret_dir, "AWS_SECRET_ACCESS_KEY", "mounted-secret-never-shown")
        state = wait_phases(car, {"support@v1": "Ready"})  # no new PUT: the file changed
        assert state["support@v1"]["credentials_source"] == "mounted"
        assert generate(server, "support")["adapter"] == "support@v1"
        assert "mounted-secret-never-shown" not in car.get("/v1/state").text
        put_desired(car, [])
        wait_until(lambda: "support@v1" not in server_adapters(server), "support evicted")

    with pytest.raises(ValueError, match="s3_credentials_dir"):
        SyncSettings(root=tmp_path, s3_credentials_dir=tmp_path / "missing")


def test_ownership_is_by_path_under_root_and_credentials_hide_in_repr(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rec = Reconciler(SyncSettings(root=Path("vol")))
    assert rec.root == tmp_path / "vol"  # relative --root made absolute (the server needs it)
    assert rec._owns(str(tmp_path / "vol" / "legal" / "v1"))
    assert rec._owns(str(tmp_path / "vol" / "x" / ".." / "legal" / "v1"))
    for foreign in (str(tmp_path / "vol"), str(tmp_path / "volume" / "legal" / "v1"),
                    str(tmp_path / "vol" / ".." / "other" / "v1"), "/models/legal/v1", ".",
                    "vol/legal/v1", None):
        assert not rec._owns(foreign), foreign
    spec = DesiredState.model_validate({"adapters": [{
        "tenant": "a", "version": "v1", "uri": "s3://b/a/v1/", "credentials": {
            "access_key_id": " AKIAREPR \n", "secret_access_key": "repr-secret\n",
            "session_token": "repr-token"}}]}).adapters[0]
    assert spec.credentials is not None and spec.credentials.access_key_id == "AKIAREPR"
    assert spec.credentials.to_s3().secret_access_key == "repr-secret"  # newline stripped
    for text in (repr(spec), str(spec), repr(spec.credentials.to_s3()), str(spec.public_view())):
        assert "AKIAREPR" not in text and "repr-secret" not in text and "repr-token" not in text
    other = spec.model_copy(update={"credentials": None})
    assert spec.same_spec(other) and spec != other
    # pinning and activation are applied to the loaded version; a new uri is a new spec
    assert spec.same_spec(spec.model_copy(update={"pinned": True, "active": True}))
    assert not spec.same_spec(spec.model_copy(update={"uri": "s3://b/a/v1-new/"}))


def test_package_stays_out_of_torch_operator_and_training() -> None:
    """ARCHITECTURE.md: loramux.sync imports neither torch, kopf nor loramux.training."""
    import subprocess
    import sys

    code = (
        "import sys, loramux.sync.app, loramux.sync.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('kopf', 'kubernetes', 'torch')"
        " or m.startswith(('loramux.training', 'loramux.operator'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True)
