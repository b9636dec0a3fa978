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
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
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


# --------------------------------------------------------------------------- a stub server
# For what the real server cannot be made to do on demand: answer garbage, or check a token
# that follows a rotated file. It speaks the admin contract (loramux.contracts) and nothing
# else.


class StubServer:
    """The server's admin API, in-process: loads are instant; ``adapters_answer`` and
    ``routes_answer`` (raw bytes) replace the good answers; ``token`` (a
    :class:`loramux.tokens.Token`) is checked on every call. Tenant access: ``access`` None
    is a server from before issue 16 (``/admin/access`` is 404), else tenant -> the
    TenantAccess JSON pushed; ``access_fail`` (method -> status code) fails those calls."""

    def __init__(self, token: Any = None) -> None:
        self.token = token
        self.adapters: dict[tuple[str, str], dict[str, Any]] = {}
        self.adapters_answer: bytes | None = None
        self.routes_answer: bytes | None = None
        self.calls: list[tuple[str, str, int]] = []  # method, path, status
        self.deleted: list[str] = []
        self.access: dict[str, dict[str, Any]] | None = None
        self.access_fail: dict[str, int] = {}
        # Scale-out routing: ``peers`` None is a server from before issue 17
        # (``/admin/peers`` is 404), else the PeerTable JSON it holds; ``peers_fail``
        # (method -> status code) fails those calls.
        self.peers: dict[str, Any] | None = None
        self.peers_fail: dict[str, int] = {}
        app = FastAPI()

        @app.middleware("http")
        async def auth(request: Request, call_next: Any) -> Any:
            expected = self.token.current() if self.token is not None else None
            if expected and request.headers.get("authorization") != f"Bearer {expected}":
                self.calls.append((request.method, request.url.path, 401))
                return JSONResponse(error_body(401, "unauthorized", "bad token"), 401)
            response = await call_next(request)
            self.calls.append((request.method, request.url.path, response.status_code))
            return response

        @app.get("/admin/adapters")
        async def adapters() -> Any:
            if self.adapters_answer is not None:
                return Response(self.adapters_answer, media_type="application/json")
            return {"adapters": list(self.adapters.values()), "base_model": "tiny-llama"}

        @app.put("/admin/adapters/{tenant}/{version}")
        async def load(tenant: str, version: str, request: Request) -> Any:
            body = await request.json()
            view = {"tenant": tenant, "version": version, "state": "ready",
                    "path": body["path"], "pinned": body.get("pinned", False),
                    "active": not any(t == tenant for t, _ in self.adapters)}
            self.adapters[(tenant, version)] = view
            return view

        @app.delete("/admin/adapters/{tenant}/{version}")
        async def evict(tenant: str, version: str) -> Any:
            if self.adapters.pop((tenant, version), None) is None:
                return JSONResponse(error_body(404, "not_found", "no such adapter"), 404)
            self.deleted.append(f"{tenant}@{version}")
            return {"tenant": tenant, "version": version, "state": "evicted"}

        @app.put("/admin/tenants/{tenant}/active")
        async def activate(tenant: str, request: Request) -> Any:
            version = (await request.json())["version"]
            for (t, v), view in self.adapters.items():
                if t == tenant:
                    view["active"] = v == version
            return {"tenant": tenant, "version": version}

        def access_problem(method: str) -> JSONResponse | None:
            if self.access is None:
                return JSONResponse(error_body(404, "not_found", "Not Found"), 404)
            status = self.access_fail.get(method)
            if status is not None:
                return JSONResponse(error_body(status, "unavailable", "down"), status)
            return None

        def access_view(tenant: str, body: dict[str, Any]) -> dict[str, Any]:
            from loramux.contracts import TenantAccess

            access = TenantAccess.model_validate(body)
            return {"tenant": tenant, "keys": len(access.key_sha256),
                    "fingerprint": access.fingerprint(), "weight": access.weight,
                    "limits": access.limits.model_dump(), "source": "admin"}

        @app.get("/admin/access")
        async def access_list() -> Any:
            problem = access_problem("GET")
            if problem is not None:
                return problem
            assert self.access is not None
            return {"auth": "keys", "tenants": [access_view(t, a)
                                                for t, a in sorted(self.access.items())]}

        @app.put("/admin/tenants/{tenant}/access")
        async def set_access(tenant: str, request: Request) -> Any:
            problem = access_problem("PUT")
            if problem is not None:
                return problem
            assert self.access is not None
            self.access[tenant] = await request.json()
            return access_view(tenant, self.access[tenant])

        @app.delete("/admin/tenants/{tenant}/access")
        async def delete_access(tenant: str) -> Any:
            problem = access_problem("DELETE")
            if problem is not None:
                return problem
            assert self.access is not None
            if self.access.pop(tenant, None) is None:
                return JSONResponse(error_body(404, "not_found", "no access"), 404)
            return {"tenant": tenant, "state": "removed"}

        def peers_problem(method: str) -> JSONResponse | None:
            if self.peers is None:
                return JSONResponse(error_body(404, "not_found", "Not Found"), 404)
            status = self.peers_fail.get(method)
            if status is not None:
                return JSONResponse(error_body(status, "unavailable", "down"), status)
            return None

        def peers_view() -> dict[str, Any]:
            from loramux.contracts import PeerTable

            table = PeerTable.model_validate(self.peers)
            return {"fingerprint": table.fingerprint(),
                    "tenants": table.model_dump(mode="json")["tenants"]}

        @app.get("/admin/peers")
        async def get_peers() -> Any:
            return peers_problem("GET") or peers_view()

        @app.put("/admin/peers")
        async def put_peers(request: Request) -> Any:
            problem = peers_problem("PUT")
            if problem is not None:
                return problem
            self.peers = await request.json()
            return peers_view()

        @app.get("/admin/routes")
        async def routes() -> Any:
            if self.routes_answer is not None:
                return Response(self.routes_answer, media_type="application/json")
            return {"routes": []}

        self.app = app

    @contextmanager
    def running(self) -> Iterator[str]:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning")
        uv = uvicorn.Server(config)
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not uv.started:
            assert time.monotonic() < deadline, "stub server did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
        finally:
            uv.should_exit = True
            thread.join(20)


def _file_source(adapter_root: Path, out: Path, tenant: str) -> dict[str, Any]:
    from factories import stage_adapter

    src, _ = stage_adapter(adapter_root, out, tenant, "v1")
    return {"tenant": tenant, "version": "v1", "uri": src.as_uri() + "/"}


def _rotate(path: Path, value: str) -> None:
    """As the kubelet does: a new file swapped in behind the same path."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(value + "\n")
    os.replace(fresh, path)


def test_tokens_rotate_without_a_restart(adapter_root: Path, tmp_path: Path) -> None:
    """The sidecar's own /v1 token and the server admin token it sends both follow their
    files: after a rotation the old /v1 token gets 401 and the new one 200, and the sidecar
    keeps loading adapters on a server whose token rotated at the same moment."""
    from loramux.tokens import Token

    api_file, admin_file = tmp_path / "api-token", tmp_path / "admin-token"
    api_file.write_text("api-old\n")
    admin_file.write_text("admin-old\n")
    stub = StubServer(Token(path=admin_file))  # the server mounts the same Secret
    sources = {t: _file_source(adapter_root, tmp_path / "pub", t) for t in ("legal", "medical")}
    with stub.running() as url, run_sidecar(tmp_path / "volume", url, None, token=None,
                                            token_file=api_file,
                                            server_token_file=admin_file) as client:
        base = str(client.base_url)

        def call(token: str, method: str = "GET", path: str = "/v1/state",
                 **kwargs: Any) -> httpx.Response:
            return httpx.request(method, base + path, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}, **kwargs)

        assert call("api-old").status_code == 200
        assert call("api-new").status_code == 401
        assert call("api-old", "PUT", "/v1/desired",
                    json={"adapters": [sources["legal"]]}).status_code == 202

        def phase(token: str, tenant: str) -> str | None:
            items = call(token).json()["adapters"]
            return next((a["phase"] for a in items if a["tenant"] == tenant), None)

        wait_until(lambda: phase("api-old", "legal") == "Ready", "legal Ready")
        assert ("legal", "v1") in stub.adapters

        _rotate(api_file, "api-new")
        _rotate(admin_file, "admin-new")
        old = call("api-old")
        assert old.status_code == 401 and old.json()["error"]["code"] == "unauthorized"
        assert call("api-new").status_code == 200
        assert call("api-new", "PUT", "/v1/desired",
                    json={"adapters": [sources["legal"], sources["medical"]]}
                    ).status_code == 202
        wait_until(lambda: phase("api-new", "medical") == "Ready", "medical Ready after rotation")
        assert ("medical", "v1") in stub.adapters
        state = call("api-new").json()
        assert state["server_reachable"] is True
        assert phase("api-new", "legal") == "Ready"
        # Every call since the rotation carried the new token (a 401 could only happen in
        # the instant between the two files' swaps).
        mark = len(stub.calls)
        wait_until(lambda: len(stub.calls) >= mark + 2, "another pass")
        assert all(status != 401 for _, _, status in stub.calls[mark:]), stub.calls[mark:]
        # An emptied token file refuses everything rather than opening the API.
        _rotate(api_file, "")
        assert call("api-new").status_code == 401
        assert httpx.get(base + "/v1/state", timeout=10).status_code == 401


@pytest.mark.parametrize("garbage", [
    b"<html>502 Bad Gateway</html>",  # not JSON
    b"\xff\xfe\x00garbage",  # not even UTF-8
    b'{"adapters": "all of them"}',  # JSON, not an AdapterList
    b"[1, 2, 3]",
])
def test_malformed_server_answers_fail_only_their_pass(adapter_root: Path, tmp_path: Path,
                                                       garbage: bytes) -> None:
    """A malformed GET /admin/adapters is that pass's failure only (like an unreachable
    server: nothing that needs the answer happens, Ready stays Ready, the loop goes on); a
    malformed GET /admin/routes fails only the routes step (eviction and the deletion of
    local files in the same pass still happen). Both are counted; good answers heal."""
    stub = StubServer()
    sources = {t: _file_source(adapter_root, tmp_path / "pub", t) for t in ("legal", "medical")}
    root = tmp_path / "volume"
    with stub.running() as url, run_sidecar(root, url, None, resync_seconds=0.2) as client:
        put_desired(client, [sources["legal"], sources["medical"]])
        wait_phases(client, {"legal@v1": "Ready", "medical@v1": "Ready"})

        def metric(name: str) -> float:
            text = client.get("/metrics").text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(name))

        # 1. the adapters report is garbage
        passes = metric("loramux_sync_reconcile_passes_total")
        stub.adapters_answer = garbage
        wait_until(lambda: client.get("/v1/state").json()["server_reachable"] is False,
                   "the bad answer noticed")
        wait_until(lambda: metric("loramux_sync_reconcile_passes_total") >= passes + 3,
                   "the loop goes on")
        state = client.get("/v1/state").json()
        assert {a["phase"] for a in state["adapters"]} == {"Ready"}, state
        assert state["server"] is None
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503  # no answer: not ready, not dead
        assert 'call="adapters",code="bad_response"' in client.get("/metrics").text
        stub.adapters_answer = None
        wait_until(lambda: client.get("/readyz").status_code == 200, "ready again")

        # 2. the routes report is garbage: only the routes wait
        stub.routes_answer = garbage.replace(b'"adapters"', b'"routes"')
        wait_until(lambda: 'call="routes",code="bad_response"' in client.get("/metrics").text,
                   "the bad routes answer noticed")
        put_desired(client, [sources["legal"]])
        wait_until(lambda: "medical@v1" in stub.deleted, "medical evicted despite bad routes")
        wait_until(lambda: not (root / "medical").exists(), "medical's files deleted")
        state = client.get("/v1/state").json()
        assert state["server_reachable"] is True
        assert [(a["tenant"], a["phase"]) for a in state["adapters"]] == [("legal", "Ready")]
        stub.routes_answer = None
        assert client.get("/readyz").status_code == 200


# --------------------------------------------------------------------------- tenant access
# The happy paths against the real server: tests/test_sync_access.py. Here what the real
# server cannot be made to do on demand: predate /admin/access, or fail its access calls.
ACCESS = {"key_sha256": ["ab" * 32], "weight": 3.0, "limits": {"max_queued": 5}}


def test_a_server_without_admin_access_is_logged_once_and_skipped(
        adapter_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stub = StubServer()  # access None: GET /admin/access answers 404
    source = {**_file_source(adapter_root, tmp_path / "pub", "legal"), "access": ACCESS}
    caplog.set_level(logging.INFO, logger="loramux.sync")
    with stub.running() as url, run_sidecar(tmp_path / "volume", url, None,
                                            resync_seconds=0.1) as client:
        put_desired(client, [source])
        wait_phases(client, {"legal@v1": "Ready"})  # the adapter is served all the same

        def passes() -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in
                       client.get("/metrics").text.splitlines()
                       if line.startswith("loramux_sync_reconcile_passes_total"))

        start = passes()
        wait_until(lambda: passes() >= start + 5, "more passes")
        state = client.get("/v1/state").json()
        assert state["access"] is None and state["server_reachable"] is True
        asked = [c for c in stub.calls if c[1] == "/admin/access"]
        assert len(asked) >= 5 and all(status == 404 for _, _, status in asked)
        # no PUT tried (the load's own check knows the server has no such route)
        assert not [c for c in stub.calls if c[1].endswith("/access") and c[0] != "GET"]
        said = [r for r in caplog.records if "no GET /admin/access" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING
        assert "call=\"access" not in client.get("/metrics").text  # not an error
        # the server is upgraded in place: from the next pass on, access is pushed
        stub.access = {}
        wait_until(lambda: "legal" in (stub.access or {}), "legal's access pushed")
        assert stub.access["legal"]["key_sha256"] == ACCESS["key_sha256"]


def test_failed_access_calls_are_counted_and_retried(adapter_root: Path,
                                                     tmp_path: Path) -> None:
    from loramux.contracts import TenantAccess

    stub = StubServer()
    stub.access, stub.access_fail = {}, {"GET": 503, "PUT": 503}
    source = _file_source(adapter_root, tmp_path / "pub", "legal")
    with stub.running() as url, run_sidecar(tmp_path / "volume", url, None,
                                            resync_seconds=0.1) as client:
        put_desired(client, [{**source, "access": ACCESS}])
        wait_phases(client, {"legal@v1": "Ready"})  # the server's other calls still work

        def errors(call: str) -> float:
            prefix = f'loramux_sync_server_errors_total{{call="{call}",code="unavailable"}}'
            return sum(float(line.rsplit(" ", 1)[1]) for line in
                       client.get("/metrics").text.splitlines() if line.startswith(prefix))

        wait_until(lambda: errors("access") >= 2, "failed reads of the access list counted")
        assert errors("access_push") >= 1  # the load's own push before loading legal@v1
        assert client.get("/v1/state").json()["access"] is None
        assert stub.access == {}
        # it heals: the next pass pushes, and reports
        stub.access_fail = {}
        wait_until(lambda: "legal" in (stub.access or {}), "legal's access pushed")
        wait_until(lambda: (client.get("/v1/state").json()["access"] or {}).get("tenants"),
                   "reported")
        (row,) = client.get("/v1/state").json()["access"]["tenants"]
        assert row["fingerprint"] == TenantAccess.model_validate(ACCESS).fingerprint()
        # a removal that fails is counted and tried again each pass until it works
        stub.access_fail = {"DELETE": 500}
        put_desired(client, [source])  # no access any more
        wait_until(lambda: errors("access_remove") >= 2, "failed removals counted")
        assert "legal" in stub.access
        stub.access_fail = {}
        wait_until(lambda: stub.access == {}, "legal's access removed once the server heals")
        wait_until(lambda: client.get("/v1/state").json()["access"]["tenants"] == [],
                   "the report follows")


# --------------------------------------------------------------------------- scale-out routing
# The pool's placement table (DesiredState.peers) goes to the server's PUT /admin/peers when
# the server holds another one (by fingerprint). Against the real server at the end; here
# what the real server cannot be made to do on demand: forget its table, predate the API,
# or fail.


def peer_table(*tenants: str, url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    """A PeerTable's JSON: each tenant held by one other pod (or none, with a reason)."""
    rows = []
    for tenant in tenants:
        if tenant.startswith("nowhere"):
            rows.append({"tenant": tenant, "holders": [],
                         "reason": f"no Ready placement: {tenant}@v1 is Downloading on p2"})
        else:
            rows.append({"tenant": tenant, "holders": [
                {"pod": "p2", "url": url, "versions": ["v1"], "residency": "device",
                 "queue_depth": 1, "running": 2}]})
    return {"tenants": rows}


def fingerprint_of(table: dict[str, Any]) -> str:
    from loramux.contracts import PeerTable

    return PeerTable.model_validate(table).fingerprint()


def peer_puts(stub: StubServer) -> list[tuple[str, str, int]]:
    return [c for c in stub.calls if c[:2] == ("PUT", "/admin/peers")]


def test_the_placement_table_is_pushed_once_and_again_when_the_server_forgot_it(
        adapter_root: Path, tmp_path: Path) -> None:
    stub = StubServer()
    stub.peers = {"tenants": []}
    source = _file_source(adapter_root, tmp_path / "pub", "legal")
    table = peer_table("medical", "nowhere")
    want = fingerprint_of(table)
    with stub.running() as url, run_sidecar(tmp_path / "volume", url, None,
                                            resync_seconds=0.1) as client:
        state = client.get("/v1/state").json()
        assert state["peers_fingerprint"] is None  # nothing told: nothing asked
        assert not [c for c in stub.calls if c[1] == "/admin/peers"]
        r = client.put("/v1/desired", json={"adapters": [source], "peers": table})
        assert r.status_code == 202, r.text
        wait_until(lambda: client.get("/v1/state").json()["peers_fingerprint"] == want,
                   "the table's fingerprint reported")
        assert stub.peers == table
        assert client.get("/v1/desired").json()["peers"] == {
            "tenants": 2, "fingerprint": want, "server_fingerprint": want}
        # passes go on; the server holds it: no second push
        mark = len(stub.calls)
        wait_until(lambda: len([c for c in stub.calls[mark:]
                                if c[:2] == ("GET", "/admin/peers")]) >= 5, "more passes")
        assert len(peer_puts(stub)) == 1
        # a desired set without a table leaves the server's as it is
        put_desired(client, [source])
        mark = len(stub.calls)
        wait_until(lambda: len([c for c in stub.calls[mark:]
                                if c[:2] == ("GET", "/admin/peers")]) >= 3, "more passes")
        assert len(peer_puts(stub)) == 1 and stub.peers == table
        # the server restarted (its table is empty): pushed again
        stub.peers = {"tenants": []}
        wait_until(lambda: stub.peers == table, "the table pushed again")
        assert len(peer_puts(stub)) == 2
        # a new table replaces it
        newer = peer_table("medical", "finance")
        r = client.put("/v1/desired", json={"adapters": [source], "peers": newer})
        assert r.status_code == 202
        wait_until(lambda: client.get("/v1/state").json()["peers_fingerprint"]
                   == fingerprint_of(newer), "the new table reported")
        assert stub.peers == newer
        assert 'call="peers' not in client.get("/metrics").text  # no error on the way


def test_a_server_without_the_peers_api_is_logged_once_and_failures_are_retried(
        adapter_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stub = StubServer()  # peers None: GET /admin/peers answers 404
    source = _file_source(adapter_root, tmp_path / "pub", "legal")
    table = peer_table("medical")
    caplog.set_level(logging.INFO, logger="loramux.sync")
    with stub.running() as url, run_sidecar(tmp_path / "volume", url, None,
                                            resync_seconds=0.1) as client:
        r = client.put("/v1/desired", json={"adapters": [source], "peers": table})
        assert r.status_code == 202
        wait_phases(client, {"legal@v1": "Ready"})  # served all the same
        wait_until(lambda: len([c for c in stub.calls if c[1] == "/admin/peers"]) >= 5,
                   "more passes")
        assert not peer_puts(stub)
        said = [r for r in caplog.records if "no GET /admin/peers" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING
        assert 'call="peers' not in client.get("/metrics").text  # not an error
        assert client.get("/v1/state").json()["peers_fingerprint"] is None

        def errors(call: str) -> float:
            prefix = f'loramux_sync_server_errors_total{{call="{call}",code="unavailable"}}'
            return sum(float(line.rsplit(" ", 1)[1]) for line in
                       client.get("/metrics").text.splitlines() if line.startswith(prefix))

        # upgraded in place, but its peers API fails for a while: counted, retried
        stub.peers_fail = {"GET": 503}
        stub.peers = {"tenants": []}
        wait_until(lambda: errors("peers") >= 2, "failed reads counted")
        stub.peers_fail = {"PUT": 503}
        wait_until(lambda: errors("peers_push") >= 2, "failed pushes counted")
        assert stub.peers == {"tenants": []}
        assert client.get("/v1/state").json()["peers_fingerprint"] == fingerprint_of(
            {"tenants": []})  # what the server holds, not what was sent
        stub.peers_fail = {}
        wait_until(lambda: stub.peers == table, "pushed once the server heals")
        wait_until(lambda: client.get("/v1/state").json()["peers_fingerprint"]
                   == fingerprint_of(table), "reported")
        assert any("now answers GET /admin/peers" in r.getMessage() for r in caplog.records)


def test_the_placement_table_reaches_the_real_server(server, tmp_path: Path) -> None:
    """The real ``loramux serve``: after the push its GET /admin/peers has the fingerprint
    the sidecar reports, and a request for a tenant only a peer holds is forwarded there
    (here the peer is gone: 503 naming the tenant, never the base model). A sidecar of its
    own (the module's is stopped by then), on an empty volume: it owns nothing loaded."""
    table = peer_table("peer-only", "nowhere-else")
    want = fingerprint_of(table)
    empty = {"tenants": []}
    with run_sidecar(tmp_path / "volume", server.url, None) as sidecar:
        r = sidecar.put("/v1/desired", json={"adapters": [], "peers": table})
        assert r.status_code == 202, r.text
        try:
            wait_until(lambda: sidecar.get("/v1/state").json()["peers_fingerprint"] == want,
                       "the table on the server")
            held = httpx.get(f"{server.url}/admin/peers", timeout=10).json()
            assert held["fingerprint"] == want
            assert [t["tenant"] for t in held["tenants"]] == ["peer-only", "nowhere-else"]
            for tenant in ("peer-only", "nowhere-else"):
                r = httpx.post(f"{server.url}/generate", json={
                    "tenant_id": tenant, "prompt": PROMPT, "max_new_tokens": 4}, timeout=30)
                assert r.status_code == 503, r.text
                assert tenant in r.json()["error"]["message"]
        finally:
            sidecar.put("/v1/desired", json={"adapters": [], "peers": empty})
            wait_until(lambda: sidecar.get("/v1/state").json()["peers_fingerprint"]
                       == fingerprint_of(empty), "the table emptied")
