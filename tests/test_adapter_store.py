"""The adapter store: atomic, verified downloads from S3 (moto on loopback) and file://."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from botocore.config import Config
from moto.server import ThreadedMotoServer
from safetensors.torch import save_file

from helpers import free_port
from loramux.inference.adapter_store import (
    INCOMING_DIR,
    FetchError,
    fetch_adapter,
    list_local,
    purge_incoming,
    remove_adapter,
)
from loramux.manifest import (
    MANIFEST_FILE,
    AdapterManifest,
    describe_files,
    sha256_file,
    write_manifest,
)
from loramux.names import AdapterRef

REF = AdapterRef("acme", "v1")
MAX = 10 << 20


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    return boto3.session.Session().client("s3", endpoint_url=moto_endpoint)


@dataclass
class Published:
    bucket: str
    prefix: str
    src: Path
    manifest: AdapterManifest
    manifest_sha256: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/"


def _build(directory: Path, extra: dict[str, bytes] | None = None) -> tuple[AdapterManifest, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    )
    torch.manual_seed(0)
    save_file(
        {"base_model.model.q_proj.lora_A.weight": torch.randn(4, 16)},
        str(directory / "adapter_model.safetensors"),
    )
    for name, data in (extra or {}).items():
        (directory / name).write_bytes(data)
    manifest = AdapterManifest(
        tenant=REF.tenant,
        version=REF.version,
        base_model="tiny",
        rank=4,
        lora_alpha=8.0,
        target_modules=["q_proj", "v_proj"],
        files=describe_files(directory),
    )
    return manifest, write_manifest(directory, manifest)


def _upload(s3: Any, directory: Path, bucket: str, prefix: str) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    # manifest last, as a publisher would
    files.sort(key=lambda p: p.name == MANIFEST_FILE)
    for path in files:
        key = f"{prefix}/{path.relative_to(directory).as_posix()}"
        s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def _publish(s3: Any, tmp_path: Path, extra: dict[str, bytes] | None = None) -> Published:
    bucket = f"adapters-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    src = tmp_path / "src" / REF.tenant / REF.version
    manifest, digest = _build(src, extra)
    prefix = f"published/{REF.tenant}/{REF.version}"
    _upload(s3, src, bucket, prefix)
    return Published(bucket, prefix, src, manifest, digest)


@pytest.fixture
def published(s3: Any, tmp_path: Path) -> Published:
    return _publish(s3, tmp_path)


def _assert_nothing_visible(root: Path) -> None:
    assert not (root / REF.tenant).exists()
    assert list_local(root) == {}
    incoming = root / INCOMING_DIR
    assert not incoming.exists() or list(incoming.iterdir()) == []


def test_s3_fetch_lands_verified_files(s3: Any, published: Published, tmp_path: Path) -> None:
    root = tmp_path / "store"
    result = fetch_adapter(
        REF, published.uri, root, expected_sha256=published.manifest_sha256, max_bytes=MAX,
        s3_client=s3,
    )
    target = root / "acme" / "v1"
    assert result.path == target
    assert result.downloaded
    assert result.manifest_sha256 == published.manifest_sha256
    assert result.bytes == published.manifest.total_bytes
    assert result.seconds >= 0
    for name in ("adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE):
        assert (target / name).read_bytes() == (published.src / name).read_bytes()
    assert list_local(root) == {REF: target}
    assert list((root / INCOMING_DIR).iterdir()) == []


def test_default_client_from_environment(published: Published, tmp_path: Path) -> None:
    result = fetch_adapter(REF, published.uri, tmp_path / "store", max_bytes=MAX)
    assert result.manifest_sha256 == published.manifest_sha256


def test_file_uri(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _, digest = _build(src)
    root = tmp_path / "store"
    result = fetch_adapter(
        REF, src.as_uri() + "/", root, expected_sha256=digest, max_bytes=MAX
    )
    assert result.manifest_sha256 == digest
    assert sha256_file(result.path / MANIFEST_FILE) == digest
    assert (result.path / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors"
    ).read_bytes()


def test_second_fetch_is_a_no_op(s3: Any, published: Published, tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = fetch_adapter(REF, published.uri, root, max_bytes=MAX, s3_client=s3)
    inode = (first.path / "adapter_model.safetensors").stat().st_ino

    class NoCalls:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the store was contacted ({name})")

    second = fetch_adapter(
        REF, published.uri, root, expected_sha256=published.manifest_sha256, max_bytes=MAX,
        s3_client=NoCalls(),
    )
    assert not second.downloaded
    assert second.manifest_sha256 == first.manifest_sha256
    assert (second.path / "adapter_model.safetensors").stat().st_ino == inode


def test_damaged_local_copy_is_replaced(s3: Any, published: Published, tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = fetch_adapter(REF, published.uri, root, max_bytes=MAX, s3_client=s3)
    (first.path / "adapter_model.safetensors").write_bytes(b"garbage")
    again = fetch_adapter(REF, published.uri, root, max_bytes=MAX, s3_client=s3)
    assert again.downloaded
    assert sha256_file(again.path / "adapter_model.safetensors") == sha256_file(
        published.src / "adapter_model.safetensors"
    )
    assert list((root / INCOMING_DIR).iterdir()) == []


def test_expected_sha256_mismatch(s3: Any, published: Published, tmp_path: Path) -> None:
    root = tmp_path / "store"
    with pytest.raises(FetchError) as info:
        fetch_adapter(
            REF, published.uri, root, expected_sha256="0" * 64, max_bytes=MAX, s3_client=s3
        )
    assert info.value.code == "digest_mismatch"
    assert not info.value.retryable
    _assert_nothing_visible(root)


@pytest.mark.parametrize("same_size", [True, False])
def test_corrupted_object(
    s3: Any, published: Published, tmp_path: Path, same_size: bool
) -> None:
    original = (published.src / "adapter_model.safetensors").read_bytes()
    bad = bytes(b ^ 0xFF for b in original) if same_size else original + b"extra"
    s3.put_object(
        Bucket=published.bucket, Key=f"{published.prefix}/adapter_model.safetensors", Body=bad
    )
    root = tmp_path / "store"
    with pytest.raises(FetchError) as info:
        fetch_adapter(
            REF, published.uri, root, expected_sha256=published.manifest_sha256, max_bytes=MAX,
            s3_client=s3,
        )
    assert info.value.code == "digest_mismatch"
    assert not info.value.retryable
    _assert_nothing_visible(root)


def test_too_large_refused_before_download(published: Published, tmp_path: Path) -> None:
    calls: list[str] = []

    class ManifestOnly:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def get_object(self, *, Bucket: str, Key: str) -> Any:
            calls.append(Key)
            return self.inner.get_object(Bucket=Bucket, Key=Key)

    client = ManifestOnly(boto3.session.Session().client("s3"))
    root = tmp_path / "store"
    with pytest.raises(FetchError) as info:
        fetch_adapter(
            REF, published.uri, root, max_bytes=published.manifest.total_bytes - 1,
            s3_client=client,
        )
    assert info.value.code == "too_large"
    assert not info.value.retryable
    assert calls == [f"{published.prefix}/{MANIFEST_FILE}"]
    _assert_nothing_visible(root)


@pytest.mark.parametrize("bad_path", ["../escape.json", "/etc/passwd", "a/../../b"])
def test_unsafe_manifest(s3: Any, published: Published, tmp_path: Path, bad_path: str) -> None:
    raw = json.loads((published.src / MANIFEST_FILE).read_bytes())
    raw["files"].append({"path": bad_path, "sha256": "a" * 64, "size": 1})
    s3.put_object(
        Bucket=published.bucket, Key=f"{published.prefix}/{MANIFEST_FILE}",
        Body=json.dumps(raw).encode(),
    )
    root = tmp_path / "store"
    with pytest.raises(FetchError) as info:
        fetch_adapter(REF, published.uri, root, max_bytes=MAX, s3_client=s3)
    assert info.value.code == "unsafe_manifest"
    assert not info.value.retryable
    _assert_nothing_visible(root)
    assert not (tmp_path / "escape.json").exists()


def test_bad_manifest(s3: Any, published: Published, tmp_path: Path) -> None:
    key = f"{published.prefix}/{MANIFEST_FILE}"
    root = tmp_path / "store"
    s3.put_object(Bucket=published.bucket, Key=key, Body=b"{not json")
    with pytest.raises(FetchError) as info:
        fetch_adapter(REF, published.uri, root, max_bytes=MAX, s3_client=s3)
    assert info.value.code == "bad_manifest"
    # a valid manifest for another tenant
    raw = json.loads((published.src / MANIFEST_FILE).read_bytes())
    raw["tenant"] = "other"
    s3.put_object(Bucket=published.bucket, Key=key, Body=json.dumps(raw).encode())
    with pytest.raises(FetchError) as info:
        fetch_adapter(REF, published.uri, root, max_bytes=MAX, s3_client=s3)
    assert info.value.code == "bad_manifest"
    assert not info.value.retryable
    _assert_nothing_visible(root)


def test_pickle_refused_unless_allowed(s3: Any, tmp_path: Path) -> None:
    pub = _publish(s3, tmp_path, extra={"adapter_model.bin": b"\x80\x04pickle"})
    root = tmp_path / "store"
    with pytest.raises(FetchError) as info:
        fetch_adapter(REF, pub.uri, root, max_bytes=MAX, s3_client=s3)
    assert info.value.code == "pickle_refused"
    assert not info.value.retryable
    _assert_nothing_visible(root)
    result = fetch_adapter(REF, pub.uri, root, max_bytes=MAX, allow_pickle=True, s3_client=s3)
    assert (result.path / "adapter_model.bin").read_bytes() == b"\x80\x04pickle"


def test_missing_object_not_found(s3: Any, published: Published, tmp_path: Path) -> None:
    root = tmp_path / "store"
    s3.delete_object(Bucket=published.bucket, Key=f"{published.prefix}/adapter_config.json")
    with pytest.raises(FetchError) as info:
        fetch_adapter(REF, published.uri, root, max_bytes=MAX, s3_client=s3)
    assert info.value.code == "not_found"
    assert not info.value.retryable
    _assert_nothing_visible(root)
    # no manifest at all, and no bucket at all
    for uri in (f"s3://{published.bucket}/nothing/here/", "s3://no-such-bucket-xyz/acme/v1/"):
        with pytest.raises(FetchError) as info:
            fetch_adapter(REF, uri, root, max_bytes=MAX, s3_client=s3)
        assert info.value.code == "not_found"
        assert not info.value.retryable


def test_unreachable_endpoint_is_retryable(tmp_path: Path) -> None:
    port = free_port()  # nothing listens on it
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1}),
    )
    root = tmp_path / "store"
    with pytest.raises(FetchError) as info:
        fetch_adapter(REF, "s3://adapters/acme/v1/", root, max_bytes=MAX, s3_client=client)
    assert info.value.code == "io_error"
    assert info.value.retryable
    _assert_nothing_visible(root)


@pytest.mark.parametrize(
    "uri", ["http://example.com/x", "s3://", "s3://Bad_Bucket/x", "s3://b-ok/a/../b", "file://host/x"]
)
def test_bad_uri(uri: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError) as info:
        fetch_adapter(REF, uri, tmp_path / "store", max_bytes=MAX, s3_client=object())
    assert info.value.code == "bad_uri"
    assert not info.value.retryable


def test_remove_adapter_only_inside_root(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _build(src)
    root = tmp_path / "store"
    fetch_adapter(REF, src.as_uri(), root, max_bytes=MAX)
    sibling = root / "acme" / "v2"
    sibling.mkdir()
    (sibling / MANIFEST_FILE).write_text("{}")
    assert remove_adapter(REF, root)
    assert not (root / "acme" / "v1").exists()
    assert (sibling / MANIFEST_FILE).is_file()  # siblings untouched
    assert remove_adapter(AdapterRef("acme", "v2"), root)
    assert not (root / "acme").exists()  # empty tenant directory removed too
    assert not remove_adapter(REF, root)
    assert src.is_dir() and (src / MANIFEST_FILE).is_file()

    # a tenant directory that is a symlink out of root is never followed for deletion
    outside = tmp_path / "outside" / "v1"
    outside.mkdir(parents=True)
    (outside / "keep.txt").write_text("keep")
    (root / "evil").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError):
        remove_adapter(AdapterRef("evil", "v1"), root)
    assert (outside / "keep.txt").read_text() == "keep"
    assert list_local(root) == {}


def test_list_local_and_purge_incoming(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _build(src)
    root = tmp_path / "store"
    fetch_adapter(REF, src.as_uri(), root, max_bytes=MAX)
    (root / "acme" / "half").mkdir()  # no manifest: not listed
    (root / INCOMING_DIR / "acme-v2-leftover").mkdir(parents=True)
    (root / INCOMING_DIR / "acme-v2-leftover" / MANIFEST_FILE).write_text("{}")
    (root / "Not_A_Label" / "v1").mkdir(parents=True)
    (root / "Not_A_Label" / "v1" / MANIFEST_FILE).write_text("{}")
    assert list_local(root) == {REF: root / "acme" / "v1"}
    purge_incoming(root)
    assert list((root / INCOMING_DIR).iterdir()) == []


def test_manifest_digest_is_the_pin(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _, digest = _build(src)
    assert hashlib.sha256((src / MANIFEST_FILE).read_bytes()).hexdigest() == digest


def test_file_source_longer_than_manifest_is_aborted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _build(src)
    with open(src / "adapter_model.safetensors", "ab") as handle:
        handle.write(b"\0" * (3 << 20))  # several chunks past the manifest's size
    root = tmp_path / "store"
    with pytest.raises(FetchError) as info:
        fetch_adapter(REF, src.as_uri(), root, max_bytes=MAX)
    assert info.value.code == "digest_mismatch"
    assert "longer than" in str(info.value)
    _assert_nothing_visible(root)


def test_file_source_symlink_out_of_source_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _build(src)
    secret = tmp_path / "secret.json"
    (src / "adapter_config.json").rename(secret)
    (src / "adapter_config.json").symlink_to(secret)
    root = tmp_path / "store"
    with pytest.raises(FetchError) as info:
        fetch_adapter(REF, src.as_uri(), root, max_bytes=MAX)
    assert info.value.code == "unsafe_manifest"
    _assert_nothing_visible(root)


def test_module_stays_out_of_operator_and_training() -> None:
    import subprocess
    import sys

    code = (
        "import sys, loramux.inference.adapter_store\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('kopf', 'kubernetes', 'torch')"
        " or m.startswith('loramux.training')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_install_is_fsynced_files_manifest_directory_then_parent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file, the manifest, the version directory (before the rename) and the parent
    directories (after it) reach the disk: a crash after "Ready" leaves no half version."""
    import os

    import loramux.inference.adapter_store as store

    src = tmp_path / "src"
    _build(src)
    root = tmp_path / "store"
    synced: list[int] = []  # inodes, in fsync order
    renamed_at: list[int] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    def rename(a: Any, b: Any) -> None:
        renamed_at.append(len(synced))
        real_rename(a, b)

    monkeypatch.setattr(store.os, "fsync", fsync)
    monkeypatch.setattr(store.os, "rename", rename)
    result = fetch_adapter(REF, src.as_uri() + "/", root, max_bytes=MAX)
    target = result.path
    inode = {name: (target / name).stat().st_ino
             for name in ("adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE)}
    before_rename, after_rename = synced[:renamed_at[-1]], synced[renamed_at[-1]:]
    for name, ino in inode.items():
        assert ino in before_rename, f"{name} not fsynced before the rename"
    version_ino = target.stat().st_ino
    assert version_ino in before_rename, "the version directory was not fsynced"
    assert max(before_rename.index(i) for i in inode.values()) < before_rename.index(version_ino)
    assert target.parent.stat().st_ino in after_rename, "the tenant directory was not fsynced"
    assert root.stat().st_ino in after_rename, "the new tenant directory's entry not fsynced"
    assert list_local(root) == {REF: target}
