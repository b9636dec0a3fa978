"""The adapter-sync sidecar end to end: moto S3 -> sidecar (in-process) -> real `loramux serve`."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import uvicorn
from moto.server import ThreadedMotoServer

from loramux.inference.adapter_store import list_local
from loramux.inference.sync_sidecar import SyncSettings, create_app
from loramux.manifest import MANIFEST_FILE, AdapterManifest, describe_files, write_manifest
from loramux.names import AdapterRef

TOKEN = "sidecar-secret"
PROMPT = "The quick brown fox"


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
    """legal@v1, legal@v2, medical@v1 and finance@v1 with manifests, uploaded to one bucket."""
    bucket = f"adapters-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    staging = tmp_path_factory.mktemp("publish")
    out: dict[str, Published] = {}
    for tenant, version in (("legal", "v1"), ("legal", "v2"), ("medical", "v1"),
                            ("finance", "v1")):
        src = staging / tenant / version
        shutil.copytree(adapter_root / tenant / version, src)
        config = json.loads((src / "adapter_config.json").read_text())
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


@pytest.fixture(scope="module")
def sidecar(server, s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("sync-root")
    settings = SyncSettings(root=root, server_url=server.url, token=TOKEN, resync_seconds=1.0,
                            backoff_seconds=0.05, retries=2, max_adapter_bytes=64 << 20)
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
    try:
        yield client
    finally:
        client.close()
        uv.should_exit = True
        thread.join(20)


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
