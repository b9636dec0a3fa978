"""The sidecar as real processes: moto S3 <- `loramux sync` (own process) -> `loramux serve`.

Everything here is a real component on loopback: moto's ThreadedMotoServer for S3, the
`loramux push` CLI for publishing, the `loramux sync` CLI (started with ``--port 0``; the
port is parsed from uvicorn's log line) and `loramux serve` on the tiny fp32 model. The
tests run in order and share one S3, one server and one sidecar volume; each one moves the
desired set on from where the previous one left it, like an operator would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from factories import stage_adapter
from helpers import free_port
from loramux.inference.adapter_store import INCOMING_DIR
from loramux.training.publish import push

TOKEN = "process-sidecar-token"
PROMPT = "The quick brown fox"
# Per-entry credentials sent for medical@v1. moto accepts any; they must never be echoed.
ENTRY_KEY_ID = "AKIAPROCESSENTRY01"
ENTRY_SECRET = "entry-secret-Zq81-do-not-print"
ENTRY_TOKEN = "entry-session-token-7Hc3-do-not-print"
ENV_SECRET = "env-secret-4Rt0-do-not-print"
RETRIES = 2


class Moto:
    """moto's S3 server that can be stopped and started again on the same port (its state
    lives in this process, so buckets and objects survive a restart)."""

    def __init__(self) -> None:
        self.port = 0
        self.server: ThreadedMotoServer | None = None
        self.start()

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]

    def stop(self) -> None:
        assert self.server is not None
        self.server.stop()
        self.server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    server = Moto()
    yield server
    if server.server is not None:
        server.stop()


def aws_env(moto: Moto) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": ENV_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


@pytest.fixture(scope="module")
def s3(moto: Moto) -> Any:
    return boto3.session.Session().client(
        "s3", endpoint_url=moto.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key=ENV_SECRET)


def stage(adapter_root: Path, staging: Path, tenant: str, version: str) -> Path:
    """A copy of the session's adapter with its manifest, ready for `loramux push`."""
    return stage_adapter(adapter_root, staging, tenant, version)[0]


@pytest.fixture(scope="module")
def published(moto: Moto, s3: Any, adapter_root: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """legal@v1 and legal@v2 through the real `loramux push` CLI (two processes at once);
    medical, finance, support and travel through the same code as a function (faster)."""
    bucket = f"proc-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    staging = tmp_path_factory.mktemp("stage")
    uris: dict[str, str] = {}
    env = {**os.environ, **aws_env(moto)}
    procs = {}
    for ref in ("legal@v1", "legal@v2"):
        tenant, version = ref.split("@")
        uris[ref] = f"s3://{bucket}/pub/{tenant}/{version}/"
        procs[ref] = subprocess.Popen(
            [sys.executable, "-P", "-m", "loramux.cli", "push",
             str(stage(adapter_root, staging, tenant, version)), uris[ref],
             "--endpoint-url", moto.endpoint, "--no-progress"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    digests: dict[str, str] = {}
    for ref, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "published" in err and "manifest sha256" in err, err
        digests[ref] = err.rsplit("manifest sha256 ", 1)[1].split()[0]
    for ref in ("medical@v1", "finance@v1", "support@v1", "travel@v1"):
        tenant, version = ref.split("@")
        uris[ref] = f"s3://{bucket}/pub/{tenant}/{version}/"
        result = push(stage(adapter_root, staging, tenant, version), uris[ref], client=s3,
                      progress=False)
        digests[ref] = result.manifest_sha256
    uris["ghost@v1"] = f"s3://{bucket}/pub/ghost/v1/"  # never pushed
    return {"bucket": bucket, "uris": uris, "digests": digests}


def server_args(tiny_model_dir: Path, adapter_root: Path) -> list[str]:
    # retail@v1 is preloaded from outside the sidecar's root: not the sidecar's to evict.
    return ["--model", str(tiny_model_dir), "--quantization", "none", "--log-format", "text",
            "--adapter", f"retail@v1={adapter_root / 'retail' / 'v1'}"]


class Env:
    """The shared pieces: server, sidecar process, volume; replaced by the restart tests."""

    server: Any
    sidecar: Any
    root: Path


@pytest.fixture(scope="module")
def env(start_server, start_sidecar, tiny_model_dir: Path, adapter_root: Path, moto: Moto,
        tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env()
    # a port of this worker's block: a test restarts the server on it (see helpers.free_port)
    e.server = start_server(*server_args(tiny_model_dir, adapter_root), "--port",
                            str(free_port()))
    e.root = tmp_path_factory.mktemp("proc-volume")
    e.sidecar = launch_sidecar(start_sidecar, e, moto)
    return e


def launch_sidecar(start_sidecar, e: Env, moto: Moto) -> Any:
    sidecar = start_sidecar(
        "--root", str(e.root), "--server-url", e.server.url, "--token", TOKEN,
        "--resync-seconds", "0.3", "--backoff-seconds", "0.05", "--retries", str(RETRIES),
        "--max-adapter-bytes", str(64 << 20), "--log-level", "debug", "--log-format", "text",
        env=aws_env(moto))
    port = urlsplit(sidecar.url).port
    assert port and port > 0, sidecar.url  # --port 0: the kernel's pick, read from the log
    return sidecar


# --------------------------------------------------------------------------- helpers


def api(e: Env) -> httpx.Client:
    return httpx.Client(base_url=e.sidecar.url, headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=30)


def entry(published: dict[str, Any], ref: str, **extra: Any) -> dict[str, Any]:
    tenant, version = ref.split("@")
    out = {"tenant": tenant, "version": version, "uri": published["uris"][ref], **extra}
    if ref in published["digests"]:
        out["sha256"] = published["digests"][ref]
    return out


def medical(published: dict[str, Any], moto: Moto) -> dict[str, Any]:
    return entry(published, "medical@v1", credentials={
        "access_key_id": ENTRY_KEY_ID, "secret_access_key": ENTRY_SECRET,
        "session_token": ENTRY_TOKEN, "region": "us-east-1", "endpoint_url": moto.endpoint})


def put_desired(e: Env, adapters: list[dict[str, Any]]) -> None:
    with api(e) as c:
        r = c.put("/v1/desired", json={"adapters": adapters})
    assert r.status_code == 202, r.text


def state(e: Env) -> dict[str, dict]:
    with api(e) as c:
        r = c.get("/v1/state")
    assert r.status_code == 200, r.text
    return {f"{a['tenant']}@{a['version']}": a for a in r.json()["adapters"]}


def wait_phases(e: Env, want: dict[str, str], timeout: float = 40) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        have = state(e)
        if all(ref in have and have[ref]["phase"] == phase for ref, phase in want.items()):
            return have
        if time.monotonic() > deadline:
            raise AssertionError(f"phases not reached: want {want}, have {have}")
        time.sleep(0.1)


def wait_each(e: Env, want: dict[str, str], timeout: float = 40) -> dict[str, dict]:
    """Like wait_phases, but each version's snapshot is taken when *it* reaches its phase
    (a non-terminal Failed is retried after resync_seconds, so two may not coincide)."""
    deadline = time.monotonic() + timeout
    got: dict[str, dict] = {}
    while len(got) < len(want):
        for ref, item in state(e).items():
            if ref in want and ref not in got and item["phase"] == want[ref]:
                got[ref] = item
        if time.monotonic() > deadline:
            raise AssertionError(f"phases not reached: want {want}, have {got}")
        time.sleep(0.05)
    return got


def wait_until(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def server_adapters(e: Env) -> dict[str, dict]:
    data = httpx.get(f"{e.server.url}/admin/adapters", timeout=10).json()
    return {f"{a['tenant']}@{a['version']}": a for a in data["adapters"]}


def generate(e: Env, tenant: str) -> dict:
    r = httpx.post(f"{e.server.url}/generate", json={
        "tenant_id": tenant, "prompt": PROMPT, "max_new_tokens": 10, "temperature": 0},
        timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def metric(e: Env, name: str) -> float:
    with api(e) as c:
        text = c.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def weights_inode(e: Env, ref: str) -> int:
    tenant, version = ref.split("@")
    return (e.root / tenant / version / "adapter_model.safetensors").stat().st_ino


def no_trace_on_volume(e: Env, ref: str) -> None:
    tenant, version = ref.split("@")
    assert not (e.root / tenant / version).exists()
    incoming = e.root / INCOMING_DIR
    assert not incoming.exists() or not any(incoming.iterdir()), list(incoming.iterdir())


FINAL = ("legal@v2", "medical@v1", "travel@v1")


def final_desired(published: dict[str, Any], moto: Moto) -> list[dict[str, Any]]:
    return [entry(published, "legal@v2", active=True), medical(published, moto),
            entry(published, "travel@v1", pinned=True)]


# --------------------------------------------------------------------------- scenarios


def test_two_pushed_tenants_become_ready_and_differ_from_base(env: Env, published, moto
                                                              ) -> None:
    started = time.monotonic()
    put_desired(env, [entry(published, "legal@v1"), medical(published, moto)])
    have = wait_phases(env, {"legal@v1": "Ready", "medical@v1": "Ready"})
    print(f"two tenants Ready in {time.monotonic() - started:.2f}s")
    assert have["legal@v1"]["digest"] == published["digests"]["legal@v1"]
    assert have["medical@v1"]["credentials_source"] == "entry"
    assert have["legal@v1"]["credentials_source"] == "environment"
    base = generate(env, "tiny-llama")
    for tenant in ("legal", "medical"):
        out = generate(env, tenant)
        assert out["adapter"] == f"{tenant}@v1"
        assert out["text"] != base["text"]
    live = server_adapters(env)
    assert live["legal@v1"]["path"] == str(env.root / "legal" / "v1")
    assert metric(env, "loramux_sync_downloads_total") == 2


def test_version_cutover_never_fails_a_request(env: Env, published, moto) -> None:
    """A client loop on `legal` runs from before the PUT of v2 until after v1 is evicted;
    every answer is v1's or v2's exact greedy text, and none fails."""
    v1_text = generate(env, "legal")["text"]
    seen: list[tuple[int, str | None, str]] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{env.server.url}/generate", json={
                    "tenant_id": "legal", "prompt": PROMPT, "max_new_tokens": 10,
                    "temperature": 0})
                body = r.json() if r.status_code == 200 else {}
                seen.append((r.status_code, body.get("adapter"), body.get("text", r.text)))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(seen) >= 2, "requests before the cutover")
        put_desired(env, [entry(published, "legal@v1"), entry(published, "legal@v2", active=True),
                          medical(published, moto)])
        wait_phases(env, {"legal@v2": "Ready"})
        wait_until(lambda: server_adapters(env)["legal@v2"]["active"], "v2 active")
        # v1 stays desired (not active) until the operator drops it: then it is evicted.
        put_desired(env, [entry(published, "legal@v2", active=True), medical(published, moto)])
        wait_until(lambda: "legal@v1" not in server_adapters(env), "v1 evicted")
        count = len(seen)
        wait_until(lambda: len(seen) >= count + 2, "requests after the cutover")
    finally:
        stop.set()
        thread.join(60)
    v2_text = generate(env, "legal")["text"]
    assert v1_text != v2_text
    assert [s for s in seen if s[0] != 200] == []
    allowed = {("legal@v1", v1_text), ("legal@v2", v2_text)}
    assert {(a, t) for _, a, t in seen} <= allowed, set(seen) - allowed
    assert {a for _, a, _ in seen} == {"legal@v1", "legal@v2"}  # both sides of the cutover
    print(f"{len(seen)} requests through the cutover, none failed")


def test_shrunk_desired_set_evicts_and_deletes_files(env: Env, published) -> None:
    put_desired(env, [entry(published, "legal@v2", active=True)])
    wait_until(lambda: "medical@v1" not in server_adapters(env), "medical evicted")
    wait_until(lambda: not (env.root / "medical").exists(), "medical files deleted")
    wait_until(lambda: not (env.root / "legal" / "v1").exists(), "legal/v1 files deleted")
    assert set(state(env)) == {"legal@v2"}
    r = httpx.post(f"{env.server.url}/generate", json={"tenant_id": "medical",
                                                       "prompt": PROMPT}, timeout=30)
    assert r.status_code == 404


def test_adapter_preloaded_outside_the_root_is_left_alone(env: Env, adapter_root: Path
                                                          ) -> None:
    """`serve --adapter retail@v1=...` is not in any desired set and never was; the
    sidecar has run many passes with evictions since, and retail still serves."""
    passes = metric(env, "loramux_sync_reconcile_passes_total")
    wait_until(lambda: metric(env, "loramux_sync_reconcile_passes_total") >= passes + 3,
               "three more passes")
    live = server_adapters(env)["retail@v1"]
    assert live["state"] == "ready" and live["active"]
    assert live["path"] == str(adapter_root / "retail" / "v1")
    assert generate(env, "retail")["adapter"] == "retail@v1"
    assert (adapter_root / "retail" / "v1" / "adapter_model.safetensors").is_file()


def test_corrupt_object_fails_with_digest_mismatch_and_loads_nothing(env: Env, published,
                                                                     s3: Any) -> None:
    key = urlsplit(published["uris"]["finance@v1"]).path.lstrip("/") + \
        "adapter_model.safetensors"
    data = bytearray(s3.get_object(Bucket=published["bucket"], Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    s3.put_object(Bucket=published["bucket"], Key=key, Body=bytes(data))
    put_desired(env, [entry(published, "legal@v2", active=True),
                      entry(published, "finance@v1")])
    have = wait_phases(env, {"finance@v1": "Failed", "legal@v2": "Ready"})
    assert have["finance@v1"]["code"] == "digest_mismatch"
    assert "adapter_model.safetensors does not match the manifest" in have["finance@v1"]["reason"]
    assert "finance@v1" not in server_adapters(env)
    no_trace_on_volume(env, "finance@v1")
    assert generate(env, "legal")["adapter"] == "legal@v2"


def test_missing_objects_fail_not_found_after_retries(env: Env, published, moto, s3: Any
                                                      ) -> None:
    """support@v1's weights object deleted after the push; ghost@v1 never pushed at all."""
    key = urlsplit(published["uris"]["support@v1"]).path.lstrip("/") + \
        "adapter_model.safetensors"
    s3.delete_object(Bucket=published["bucket"], Key=key)
    put_desired(env, [entry(published, "legal@v2", active=True), medical(published, moto),
                      entry(published, "support@v1"), entry(published, "ghost@v1")])
    have = wait_each(env, {"support@v1": "Failed", "ghost@v1": "Failed",
                           "medical@v1": "Ready", "legal@v2": "Ready"})
    for ref in ("support@v1", "ghost@v1"):
        assert have[ref]["code"] == "not_found", have[ref]
        assert "NoSuchKey" in have[ref]["reason"]
        assert have[ref]["timings"]["attempts"] == RETRIES + 1  # the whole retry budget
        assert ref not in server_adapters(env)
        no_trace_on_volume(env, ref)
    assert metric(env, 'loramux_sync_fetch_failures_total{code="not_found"}') >= 2 * (
        RETRIES + 1)
    assert generate(env, "medical")["adapter"] == "medical@v1"


def test_s3_stopped_then_restarted_on_the_same_port_converges(env: Env, published, moto
                                                              ) -> None:
    """Honest scope: S3 is stopped *before* the PUT (a download of these small adapters on
    loopback takes milliseconds, too short to interrupt reliably), the sidecar's first
    attempts fail with connection errors, then S3 comes back on the same port (moto keeps
    its objects in this process) and the sidecar converges without another PUT."""
    failures = metric(env, 'loramux_sync_fetch_failures_total{code="io_error"}')
    port = moto.port
    moto.stop()
    try:
        put_desired(env, final_desired(published, moto))
        wait_until(lambda: state(env)["travel@v1"]["code"] == "io_error",
                   "a failed attempt while S3 is down", timeout=30)
        have = state(env)
        assert have["travel@v1"]["phase"] in ("Pending", "Downloading", "Failed")
        assert "Could not connect" in have["travel@v1"]["reason"]
        assert metric(env, 'loramux_sync_fetch_failures_total{code="io_error"}') > failures
        assert not (env.root / "travel" / "v1").exists()
    finally:
        moto.start()
    assert moto.port == port
    wait_phases(env, dict.fromkeys(FINAL, "Ready"), timeout=40)
    assert generate(env, "travel")["adapter"] == "travel@v1"
    assert server_adapters(env)["travel@v1"]["pinned"]


def test_server_killed_and_restarted_gets_everything_back_without_a_put(
        env: Env, start_server, tiny_model_dir: Path, adapter_root: Path) -> None:
    downloads = metric(env, "loramux_sync_downloads_total")
    inodes = {ref: weights_inode(env, ref) for ref in FINAL}
    port = urlsplit(env.server.url).port
    env.server.proc.send_signal(signal.SIGKILL)
    env.server.proc.wait(10)
    wait_until(lambda: httpx.get(f"{env.sidecar.url}/readyz", timeout=5).status_code == 503,
               "sidecar not ready while the server is gone")
    started = time.monotonic()
    env.server = start_server(*server_args(tiny_model_dir, adapter_root), "--port", str(port))
    assert urlsplit(env.server.url).port == port
    wait_until(lambda: all(server_adapters(env).get(ref, {}).get("state") == "ready"
                           for ref in FINAL), "everything desired reloaded", timeout=40)
    print(f"server restart: desired set back in {time.monotonic() - started:.2f}s")
    wait_phases(env, dict.fromkeys(FINAL, "Ready"), timeout=10)
    wait_until(lambda: httpx.get(f"{env.sidecar.url}/readyz", timeout=5).status_code == 200,
               "sidecar ready again")
    assert server_adapters(env)["legal@v2"]["active"]
    assert metric(env, "loramux_sync_downloads_total") == downloads  # from the volume
    assert {ref: weights_inode(env, ref) for ref in FINAL} == inodes
    for tenant, version in (ref.split("@") for ref in FINAL):
        assert generate(env, tenant)["adapter"] == f"{tenant}@{version}"
    assert generate(env, "retail")["adapter"] == "retail@v1"


def test_sidecar_restarted_rebuilds_from_volume_and_server_without_download(
        env: Env, start_sidecar, published, moto) -> None:
    inodes = {ref: weights_inode(env, ref) for ref in FINAL}
    loaded = set(server_adapters(env))
    env.sidecar.proc.send_signal(signal.SIGKILL)
    env.sidecar.proc.wait(10)
    env.sidecar = launch_sidecar(start_sidecar, env, moto)
    # Not told the desired set yet: passes run, nothing is evicted or deleted.
    wait_until(lambda: metric(env, "loramux_sync_reconcile_passes_total") >= 3,
               "three passes of the new sidecar", timeout=15)
    assert set(server_adapters(env)) == loaded
    assert {ref: weights_inode(env, ref) for ref in FINAL} == inodes
    started = time.monotonic()
    put_desired(env, final_desired(published, moto))
    wait_phases(env, dict.fromkeys(FINAL, "Ready"), timeout=15)
    wait_until(lambda: httpx.get(f"{env.sidecar.url}/readyz", timeout=5).status_code == 200,
               "restarted sidecar ready")
    print(f"restarted sidecar Ready in {time.monotonic() - started:.2f}s")
    assert metric(env, "loramux_sync_downloads_total") == 0
    assert metric(env, "loramux_sync_downloaded_bytes_total") == 0
    assert {ref: weights_inode(env, ref) for ref in FINAL} == inodes
    assert set(server_adapters(env)) == loaded


def test_secrets_never_leave_the_sidecar(env: Env, published, moto) -> None:
    """The per-entry credentials went through every PUT above; neither the API nor the
    debug-level logs of any sidecar process (the killed one included) show them."""
    with api(env) as c:
        desired = c.get("/v1/desired")
        got_state = c.get("/v1/state")
    assert desired.status_code == got_state.status_code == 200
    creds = {e["tenant"]: e["credentials"] for e in desired.json()["adapters"]}
    assert creds["medical"] == {"access_key_id": "***", "secret_access_key": "***",
                                "session_token": "***", "region": "us-east-1",
                                "endpoint_url": moto.endpoint}
    assert creds["legal"] is None
    logs = sorted(env.sidecar.log_path.parent.glob("sidecar-*.log"))
    assert len(logs) >= 2 and all(p.stat().st_size > 0 for p in logs)
    for text in (desired.text, got_state.text, *(p.read_text() for p in logs)):
        for secret in (ENTRY_KEY_ID, ENTRY_SECRET, ENTRY_TOKEN, ENV_SECRET):
            assert secret not in text
    assert "DEBUG" in logs[0].read_text()  # the logs were at debug level


def test_tokens_rotate_between_real_processes(start_server, start_sidecar, tiny_model_dir: Path,
                                              adapter_root: Path, tmp_path: Path) -> None:
    """One Secret mounted in both containers, rotated (a new file behind the same path, as
    the kubelet does): the sidecar's /v1 refuses the old token and takes the new one, and
    the sidecar keeps loading adapters on the real server, whose admin token rotated at the
    same moment - no restart of either."""
    api_file, admin_file = tmp_path / "sync-token", tmp_path / "admin-token"
    api_file.write_text("sync-old\n")
    admin_file.write_text("admin-old\n")
    server = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--log-format", "text", "--admin-token-file", str(admin_file))
    sidecar = start_sidecar("--root", str(tmp_path / "volume"), "--server-url", server.url,
                            "--resync-seconds", "0.5", "--token-file", str(api_file),
                            "--server-token-file", str(admin_file))
    sources = {}
    for tenant in ("legal", "medical"):
        src = stage(adapter_root, tmp_path / "pub", tenant, "v1")
        sources[tenant] = {"tenant": tenant, "version": "v1", "uri": src.as_uri() + "/"}

    def call(token: str, method: str = "GET", path: str = "/v1/state",
             **kwargs: Any) -> httpx.Response:
        return httpx.request(method, sidecar.url + path, timeout=10,
                             headers={"Authorization": f"Bearer {token}"}, **kwargs)

    def loaded(admin: str) -> set[str]:
        r = httpx.get(f"{server.url}/admin/adapters", timeout=10,
                      headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200, r.text
        return {a["tenant"] for a in r.json()["adapters"] if a["state"] == "ready"}

    assert call("sync-old", "PUT", "/v1/desired",
                json={"adapters": [sources["legal"]]}).status_code == 202
    wait_until(lambda: "legal" in loaded("admin-old"), "legal loaded with the old tokens")

    for path, value in ((api_file, "sync-new"), (admin_file, "admin-new")):
        fresh = path.with_name(path.name + ".new")
        fresh.write_text(value + "\n")
        os.replace(fresh, path)
    assert call("sync-old").status_code == 401
    assert call("sync-new").status_code == 200
    assert httpx.get(f"{server.url}/admin/adapters", timeout=10,
                     headers={"Authorization": "Bearer admin-old"}).status_code == 401
    assert call("sync-new", "PUT", "/v1/desired",
                json={"adapters": [sources["legal"], sources["medical"]]}).status_code == 202
    wait_until(lambda: {"legal", "medical"} <= loaded("admin-new"),
               "medical loaded by the sidecar after the rotation")
    state = call("sync-new").json()
    assert state["server_reachable"] is True
    assert {(a["tenant"], a["phase"]) for a in state["adapters"]} == {
        ("legal", "Ready"), ("medical", "Ready")}
